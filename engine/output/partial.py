"""The partial folder a run writes into, beside its output: resumed where an interrupted run of the same
fingerprint left it (its journal), else started fresh; kept on Ctrl-C so the same command resumes, removed on
any other error; and, once written, checked against its inputs before it is finished and published. Used by
the merge (engine/api.py) and the MoE assembly (engine/moe/assemble.py) alike; the input check by the
tokenizer transplant too."""
import contextlib
import sys
from pathlib import Path

from ...common.errors import InputChanged
from ..journal import JOURNAL, Journal
from ..plan import Plan
from .place import discard
from .verify import input_changes


def resumed_or_fresh(tmp: Path, fingerprint: str, plan: Plan, resume: bool, what: str | None = None) -> tuple | None:
    """What an interrupted run with this fingerprint left in `tmp` (Journal.resume), saying so when `what` (e.g.
    "merge into OUT") is given; else None and a fresh, empty `tmp`."""
    resumed = Journal.resume(tmp, fingerprint, plan) if resume else None
    if resumed is None:
        discard(tmp, notice=True)
        tmp.mkdir()
    elif what:
        print(f"mbmerge: resuming the interrupted {what}: {len(resumed[0])} of {len(plan.tensors)} tensors are "
              f"written and check out, writing the rest", file=sys.stderr)
    return resumed


@contextlib.contextmanager
def kept_for_resume(tmp: Path):
    """The body writes `tmp`: Ctrl-C leaves it and its journal for the same command to resume; any other error
    removes it."""
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException:
        discard(tmp)
        raise


def unchanged(identity: dict, what: str) -> None:
    """InputChanged in one line if an input changed since it was read ("... changed while `what`")."""
    if changed := input_changes(identity):
        raise InputChanged(f"input {min(changed)} changed while {what}; nothing was written")


def written(tmp: Path, identity: dict, what: str) -> None:
    """The tensors are all in `tmp`: refused (InputChanged) if an input changed meanwhile, else its journal goes."""
    unchanged(identity, what)
    (tmp / JOURNAL).unlink()
