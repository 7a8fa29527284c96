"""Where a tune writes its best merge. --out is checked before anything is scored: absent or empty, an
earlier output of this same study (a rerun resumes the study and may replace it), or, with --overwrite,
an earlier mbmerge output; anything else is refused in one line. At the end the best is merged there,
unless the folder already holds this study's output of that very trial (a finished study's rerun)."""
import json
from pathlib import Path

from ..common.errors import OutputExists
from ..engine import api
from ..engine.output import place
from .score import Candidate

RECORD = "tune.json"
PLOT = "tune-params.png"
FRONT_PLOT = "tune-front.png"


def earlier_tune(out: Path) -> dict | None:
    """The tune.json of an earlier tune's output in `out` (an mbmerge output whose files are all
    there), else None."""
    card = place.read_record(out)
    if card is None or not all((out / f).is_file() for f in card.get("files", [])):
        return None
    try:
        record = json.loads((out / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("best"), dict) else None


def check_out(out: Path, overwrite: bool) -> dict | None:
    """Refuse now (one line) an --out this tune may not write; an earlier tune's output is judged by
    check_study once the study's name is known. Returns that output's tune.json, or None."""
    earlier = earlier_tune(out)
    if earlier is None or overwrite:
        place.check_location(out, overwrite)
    return earlier


def check_study(out: Path, earlier: dict | None, name: str, url: str, overwrite: bool) -> bool:
    """Whether `out` holds this study's own earlier output (which a rerun may replace); refuse another
    study's without --overwrite."""
    ours = earlier is not None and (earlier.get("study"), earlier.get("storage")) == (name, url)
    if earlier is not None and not ours and not overwrite:
        raise OutputExists(f"output {out} holds the best merge of another study ({earlier.get('study')}): pass "
                           f"--overwrite to replace it, or choose another --out")
    return ours


def write(merge: Candidate, best: dict, out: Path, earlier: dict | None, ours: bool, overwrite: bool,
          device: str) -> bool:
    """Merge the best trial (its candidate: `merge`) into `out`; False (nothing written) when `out` already
    holds this study's merge of the same trial."""
    if ours and all(earlier["best"].get(k) == best[k] for k in ("number", "params")):
        return False
    api.run(merge.spec(out, overwrite=overwrite or ours, resume=True, device=device))
    return True


def save_record(out: Path, record: dict) -> None:
    """tune.json beside the merge, listed among the output's own files (so --overwrite may replace it)."""
    (out / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
    place.own_files(out, RECORD)


def save_plots(out: Path, record: dict) -> tuple[Path | None, Path | None]:
    """The study's plots (tune.show) beside the merge, listed among its files: NP against each parameter
    (None when no trial has an NP) and, with several objectives, the Pareto front (None for one objective,
    or no trial with every value)."""
    from .show import plot, plot_front
    paths = plot(record, out / PLOT), plot_front(record, out / FRONT_PLOT)
    place.own_files(out, *[p.name for p in paths if p is not None])
    return paths
