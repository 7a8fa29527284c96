"""The Optuna study behind a tune: opened (or resumed) in the tuning database, trials claimed in batches
so that processes and machines sharing a study neither lose nor duplicate one, and kept alive by
heartbeats so that the trials of a process that died are failed and claimed again.

Claims happen under a mutex (tune.database.mutex): a grid's points that have no running, finished or
waiting trial are enqueued and asked for at once; a search sampler asks while fewer than its budget of
trials are running or done. A trial that fails (a worker that died for good) frees its point for the
next run, not this one. With nothing left to claim, a driver waits for the trials other processes
still run before it picks the best (wait_for_others).
"""
import contextlib
import logging
import threading
import time
import warnings

import optuna
from optuna.trial import TrialState

from ..common.errors import BadParameter
from .record import params_text
from .space import Space, point_key
from .database import engine, mutex, retrying

HEARTBEAT = 15         # seconds between a running trial's heartbeats
GRACE = 60             # a running trial with no heartbeat for this long belongs to a process that died
POLL = 1.0             # seconds between looks at the trials other processes run, while waiting for them
TAKEN = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING)


def open_study(name: str, url: str, space: Space, pruner: optuna.pruners.BasePruner, create: bool = True,
               directions=("maximize",)):
    """(the study, its storage): created, or loaded when another run made it (create=False: only loaded);
    directions: one an objective (tune.objectives)."""
    optuna.logging.set_verbosity(logging.WARNING)
    engine(url)     # the database reached (a SQLite file's folder made) or one line saying why not
    with mutex(url, "open"), warnings.catch_warnings():    # one process at a time creates the tables
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = retrying(lambda: optuna.storages.RDBStorage(
            url, heartbeat_interval=HEARTBEAT, grace_period=GRACE,
            engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None))
        if not create and name not in optuna.get_all_study_names(storage):
            raise BadParameter(f"no study {name} in {url}: run the same command without --show first")
        study = optuna.create_study(study_name=name, storage=storage, sampler=space.sampler_object(),
                                    pruner=pruner, directions=list(directions), load_if_exists=True)
    return study, storage


def point(t: optuna.trial.FrozenTrial) -> dict:
    """A trial's parameters, known from its claim on (enqueued ones), before it suggests them."""
    return t.system_attrs.get("fixed_params") or t.params


def claim(study: optuna.Study, storage, url: str, space: Space, n: int, budget: int,
          failed: set) -> list[optuna.Trial]:
    """Up to n trials for this process to run, marked RUNNING; [] when the study needs no more.
    failed: the keys of grid points that failed in this run (not retried until the next)."""
    with mutex(url, f"study:{study.study_name}"), _unwarned():
        optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        if space.sampler == "grid":
            taken = {point_key(point(t)) for t in trials if t.state in TAKEN} | failed
            free = [p for p in space.points() if point_key(p) not in taken]
            for p in free[:n]:
                study.enqueue_trial(p)
            want = min(n, len(free) + waiting)
        else:   # a budget of trials; as many failures in this run end it
            want = 0 if len(failed) >= budget else min(n, budget - sum(t.state in TAKEN for t in trials) + waiting)
        out = [study.ask() for _ in range(max(0, want))]
        for t in out:
            storage.record_heartbeat(t._trial_id)
    return out


def wait_for_others(study: optuna.Study, url: str, say=None) -> bool:
    """Wait while other processes run trials of the study (heartbeats fresh): a point still running
    elsewhere may beat the best, so a driver picks and writes the best only once none runs. A trial
    whose heartbeat is GRACE seconds old is failed (fail_stale_trials) and not waited for. True when
    it waited (then claim again: a trial failed meanwhile freed its point)."""
    waited, said = False, None
    while True:
        with mutex(url, f"study:{study.study_name}"), _unwarned():
            optuna.storages.fail_stale_trials(study)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return waited
        numbers = [t.number for t in running]
        if say and numbers != said:
            shown = ", ".join(f"{t.number} ({params_text(point(t))})" for t in running)
            say(f"waiting for trial(s) {shown}, running in another process, before picking the best (a trial "
                f"whose process stops beating is given up after {GRACE} s)")
        waited, said = True, numbers
        time.sleep(POLL)


@contextlib.contextmanager
def heartbeats(study: optuna.Study, storage, trials: list[optuna.Trial]):
    """Beat for the trials still running while the block runs; on the way out (an error, Ctrl-C), fail
    those left running, saying why (the table calls them interrupted), so the next run takes their
    points again."""
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT):
            for t in trials:
                if _running(storage, t):
                    storage.record_heartbeat(t._trial_id)
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    stopped = None
    try:
        yield
    except BaseException as e:
        stopped = e
        raise
    finally:
        stop.set()
        thread.join()
        for t in trials:
            if _running(storage, t):
                _give_up(study, t, stopped)


def _give_up(study: optuna.Study, t: optuna.Trial, stopped: BaseException | None) -> None:
    """Fail a trial this process stops running, with why in its "error" (and "interrupted" on Ctrl-C)."""
    if isinstance(stopped, KeyboardInterrupt):
        t.set_user_attr("interrupted", True)
        why = "interrupted (Ctrl-C) before it was scored"
    elif stopped is None:
        why = "not scored"
    else:
        first = (str(stopped).splitlines() or [""])[0]
        why = f"stopped by {type(stopped).__name__}" + (f": {first}" if first else "")
    t.set_user_attr("error", why)
    study.tell(t, state=TrialState.FAIL)


@contextlib.contextmanager
def _unwarned():
    """Heartbeats outside Study.optimize, fail_stale_trials: both documented, both warned about."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "Heartbeat of storage")
        yield


def _running(storage, t) -> bool:
    return storage.get_trial(t._trial_id).state == TrialState.RUNNING
