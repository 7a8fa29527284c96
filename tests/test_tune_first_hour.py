"""`mbmerge tune` as a user first meets it (issue 26): a driver that waits for trials running elsewhere
before it writes the best, one-line errors for a mistyped domain and --limit 0, a plot line only when
a plot was written, a finished study's rerun that scores nothing, an interrupted trial listed once, a
halving study that reuses an unpruned study's scores exactly, and Ray's banner kept out of the output.

Scores are injected where the eval layer is called (the micro zoo's own scores are not relied on): a
model's value on example i of a domain is a function of its closeness to that domain's expert and of
i, and a range's score is the mean of its examples' values, as lm-eval's per-example metrics are."""
import hashlib
import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import optuna
import pytest
from safetensors.torch import load_file

import mbmerge
from mbmerge.eval import harness

DOMAINS = ["math", "coding"]


def _weights(folder):
    return {k: v.float() for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _value(g: float, i: int, domain: str) -> float:
    """A model's value on example i (g: its closeness to the domain's expert; not separable in g and i,
    so that subsets of the examples rank models differently)."""
    return g * (1 + 0.4 * math.sin(3.7 * i + 7 * g + len(domain)))


class Scorer:
    """harness.evaluate_ranges' stand-in: each range's mean of _value; every call recorded."""

    def __init__(self, zoo):
        self.zoo, self.experts = zoo, {d: _weights(zoo / d) for d in DOMAINS}
        self.calls, self.interrupt_at = [], None

    def closeness(self, folder, domain) -> float:
        w, e = _weights(folder), self.experts[domain]
        return 1 / (1 + 1000 * sum((w[k] - e[k]).square().mean() for k in w).item() / len(w))

    def __call__(self, folder, requests, **kw):
        self.calls.append((str(folder), requests))
        if self.interrupt_at and len(self.merges()) == self.interrupt_at:
            raise KeyboardInterrupt
        out = []
        for t, start, stop in requests:
            d = t.name.removeprefix("mbmerge_zoo_")
            g = self.closeness(folder, d)
            out.append(sum(_value(g, i, d) for i in range(start, stop)) / (stop - start))
        return out

    def merges(self) -> list:
        return [f for f, _ in self.calls if "mbmerge-tune-" in f]


@pytest.fixture
def scorer(micro_zoo, monkeypatch):
    s = Scorer(micro_zoo)
    monkeypatch.setattr(harness, "evaluate_ranges", s)
    return s


def _args(zoo, out, db, *extra, grid="scale=0.5,1.0", limit=4):
    return ["tune", "--method", "task_arithmetic", "--experts", f"{zoo / 'math'},{zoo / 'coding'}", "--base",
            zoo / "base", "--validate", "math,coding", "--grid", grid, "--limit", limit, "--storage", f"sqlite:///{db}",
            "--out", out, *extra]


def _files(folder: Path) -> dict:
    """{relative path: (sha256, mtime_ns)} of every file under folder."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(stdout: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if ln.startswith("| ") and not ln.startswith("| trial")]


# --- 1. a driver waits for trials running elsewhere before it picks the best ---------------------------

def _hold(url: str, scale: float, grid=(0.5, 1.0)):
    """A trial of study 'held' claimed as another driver would: RUNNING, its point enqueued, a heartbeat."""
    with warnings.catch_warnings():     # heartbeats outside Study.optimize: supported, warned about
        warnings.simplefilter("ignore")
        storage = optuna.storages.RDBStorage(url, heartbeat_interval=15, grace_period=60)
        study = optuna.create_study(study_name="held", storage=storage, direction="maximize")
        study.enqueue_trial({"scale": scale})
        trial = study.ask()
    trial.suggest_categorical("scale", grid)
    trial.set_user_attr("params", {"scale": scale})
    storage.record_heartbeat(trial._trial_id)
    return study, storage, trial


def test_a_driver_waits_for_a_trial_running_elsewhere_and_writes_the_true_best(micro_zoo, tmp_path, run_main):
    """The test holds grid point scale=1.0 RUNNING with a live heartbeat; a real `mbmerge tune` process
    runs the other point, says it waits (--show meanwhile warns that the best may change), and once the
    test finishes the held trial with a better NP writes that trial's merge, the study's true best."""
    url, out = f"sqlite:///{tmp_path / 'shared.db'}", tmp_path / "best"
    study, storage, held = _hold(url, 1.0)
    args = [sys.executable, "-c", "from mbmerge.bin.cli import main; main()",
            *map(str, _args(micro_zoo, out, tmp_path / "shared.db", "--study", "held", limit=1))]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    seen = []
    for line in proc.stderr:     # until the driver says it waits (or ends, which fails below)
        seen.append(line)
        if line.startswith("waiting for trial"):
            break
    assert seen and seen[-1].startswith("waiting for trial(s) 0 (scale=1), running in another process"), seen
    assert not out.exists()      # nothing written while the held trial runs
    code, _, err = run_main(*_args(micro_zoo, tmp_path / "shown", tmp_path / "shared.db", "--study", "held", "--show",
                                   limit=1))
    assert code == 0 and "mbmerge: warning: trial(s) 0 still run in another process: the best may change" in err, err
    storage.record_heartbeat(held._trial_id)
    for k, x in {"np": 1e6, "scores": {}, "np_by_domain": {}, "rung": 0, "examples": 2}.items():
        held.set_user_attr(k, x)
    study.tell(held, 1e6)
    stdout, rest = proc.communicate(timeout=600)
    assert proc.returncode == 0, "".join(seen) + rest
    trials = optuna.load_study(study_name="held", storage=url).get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    true_best = max(done, key=lambda t: (t.user_attrs["np"] is not None, t.user_attrs["np"] or 0))
    assert sorted(t.params["scale"] for t in done) == [0.5, 1.0] and true_best.number == held.number
    assert json.loads((out / "mbmerge.json").read_text())["params"]["scale"] == 1.0
    assert json.loads((out / "tune.json").read_text())["best"]["number"] == held.number
    assert f"best merge (trial {held.number}) written to {out}" in stdout


def test_a_trial_whose_heartbeat_went_stale_is_given_up_and_run_here(micro_zoo, tmp_path, scorer, run_main,
                                                                     monkeypatch):
    """A held trial that stops beating is failed after the grace period, not waited for: the driver
    runs its point itself, lists the given-up trial once, and writes the best of what completed."""
    from mbmerge.tune import study as study_module
    monkeypatch.setattr(study_module, "GRACE", 2)
    monkeypatch.setattr(study_module, "POLL", 0.2)
    db, out = tmp_path / "shared.db", tmp_path / "best"
    _, _, held = _hold(f"sqlite:///{db}", 1.0)
    code, stdout, err = run_main(*_args(micro_zoo, out, db, "--study", "held"))
    assert code == 0, err      # (whether it was given up before or while this driver waited depends on the load)
    record = json.loads((out / "tune.json").read_text())
    rows = {r["number"]: r for r in record["trials"]}
    assert rows[held.number]["state"] == "fail" and "stopped beating" in rows[held.number]["error"]
    again = rows[held.number]["superseded_by"]
    assert rows[again]["state"] == "complete" and rows[again]["params"]["scale"] == 1.0
    done = [r for r in record["trials"] if r["state"] == "complete"]
    assert record["best"]["number"] == max(done, key=lambda r: r["np"])["number"]
    assert json.loads((out / "mbmerge.json").read_text())["params"]["scale"] == rows[record["best"]["number"]][
        "params"]["scale"]
    assert len(_rows(stdout)) == 2 and f"trial {held.number} (scale=1): fail, run again as trial {again}" in stdout


# --- 2., 3. a mistyped domain and --limit 0: one line, nothing written -----------------------------------

@pytest.mark.parametrize("extra, words", [
    (["--validate", "math,codng"], "--validate: unknown domain(s) codng: choose from instruction, math, "
                                   "multilingual, coding, safety"),
    (["--limit", "0"], "--limit 0: tuning needs at least one validation example a task"),
    (["--limit", "-3"], "--limit -3: tuning needs at least one validation example a task"),
])
def test_bad_validation_settings_are_one_line_and_write_nothing(micro_zoo, tmp_path, scorer, run_main, extra, words):
    db, out = tmp_path / "t.db", tmp_path / "best"
    code, stdout, err = run_main(*_args(micro_zoo, out, db), *extra)
    assert code != 0 and stdout == "" and err.startswith("mbmerge: error: ") and words in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and not db.exists() and scorer.calls == []


# --- 4., 5. the plot line, and a finished study's rerun -------------------------------------------------

def test_no_plot_is_announced_when_no_trial_has_an_np(micro_zoo, tmp_path, monkeypatch, run_main):
    monkeypatch.setattr(harness, "evaluate_ranges", lambda folder, requests, **kw: [0.0] * len(requests))
    db, out = tmp_path / "t.db", tmp_path / "best"
    for extra in ((), ("--show",)):
        code, stdout, err = run_main(*_args(micro_zoo, out, db), *extra)
        assert code == 0, err
        assert "no plot: no trial has an NP to show" in stdout and "NP against each parameter" not in stdout
        assert not (out / "tune-params.png").exists()


def test_a_finished_study_rerun_scores_nothing_and_says_where_its_best_is(micro_zoo, tmp_path, scorer, run_main):
    db, out = tmp_path / "t.db", tmp_path / "best"
    code, first, err = run_main(*_args(micro_zoo, out, db))
    assert code == 0, err
    assert f"NP against each parameter: {out / 'tune-params.png'}" in first and (out / "tune-params.png").exists()
    before, calls = _files(out), len(scorer.calls)
    code, again, err = run_main(*_args(micro_zoo, out, db))
    assert code == 0, err
    assert len(scorer.calls) == calls                       # not even the experts scored again
    best = json.loads((out / "tune.json").read_text())["best"]["number"]
    assert f"best merge (trial {best}) already in {out}" in again and _rows(again) == _rows(first)
    after = _files(out)           # the merge not written again; its record and plot the same bytes
    assert {k: v[0] for k, v in after.items() if k != "tune.json"} == {k: v[0] for k, v in before.items()
                                                                        if k != "tune.json"}
    assert all(after[k] == before[k] for k in before if k.endswith(".safetensors"))


def test_an_out_holding_something_else_is_refused_before_any_scoring(micro_zoo, tmp_path, scorer, run_main):
    db, out, mine = tmp_path / "t.db", tmp_path / "best", tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my evaluation\n")
    code, stdout, err = run_main(*_args(micro_zoo, mine, db))
    assert code != 0 and stdout == "" and err.count("\n") == 1 and "already exists and is not empty" in err, err
    assert scorer.calls == [] and _files(mine).keys() == {"notes.txt"}
    assert run_main(*_args(micro_zoo, out, db))[0] == 0
    before, calls = _files(out), len(scorer.calls)
    other = _args(micro_zoo, out, db, grid="scale=0.3,0.7")      # another study into the first one's folder
    code, stdout, err = run_main(*other)
    assert code != 0 and err.count("\n") == 1 and "holds the best merge of another study" in err, err
    assert len(scorer.calls) == calls and _files(out) == before
    code, stdout, err = run_main(*other, "--overwrite")
    assert code == 0, err
    assert json.loads((out / "mbmerge.json").read_text())["params"]["scale"] in (0.3, 0.7)


# --- 6. an interrupted trial: listed as interrupted, each grid point once -------------------------------

def test_an_interrupted_trial_is_listed_once_and_said_interrupted(micro_zoo, tmp_path, scorer, run_main):
    db, out = tmp_path / "t.db", tmp_path / "best"
    args = _args(micro_zoo, out, db, grid="scale=0.2,0.4,0.6,0.8")
    scorer.interrupt_at = 3                 # Ctrl-C while the third candidate is scored
    code, _, err = run_main(*args)
    assert code == 130 and "mbmerge: interrupted" in err and not out.exists()
    scorer.interrupt_at = None
    code, stdout, err = run_main(*args)
    assert code == 0, err
    rows = _rows(stdout)
    assert sorted(r.split(" | ")[1] for r in rows) == ["scale=0.2", "scale=0.4", "scale=0.6", "scale=0.8"]
    record = json.loads((out / "tune.json").read_text())
    stopped = [r for r in record["trials"] if r["state"] != "complete"]
    assert len(stopped) == 1 and stopped[0]["params"]["scale"] == 0.6 and stopped[0]["state"] == "interrupted"
    assert stopped[0]["error"].startswith("interrupted (Ctrl-C)")
    redone = next(r for r in record["trials"] if r["state"] == "complete" and r["params"]["scale"] == 0.6)
    assert stopped[0]["superseded_by"] == redone["number"]
    assert f"trial {stopped[0]['number']} (scale=0.6): interrupted, run again as trial {redone['number']}" in stdout


# --- 7. a halving study and an unpruned one reuse each other's scores, exactly ---------------------------

def _reference_np(scorer: Scorer, folder, stop: int) -> float:
    """NP on examples 0..stop-1, summed here example by example: per domain the candidate's total over
    its expert's, averaged over the domains."""
    ratios = []
    for d in DOMAINS:
        g, e = scorer.closeness(folder, d), scorer.closeness(scorer.zoo / d, d)
        ratios.append(sum(_value(g, i, d) for i in range(stop)) / sum(_value(e, i, d) for i in range(stop)))
    return sum(ratios) / len(ratios)


def test_halving_and_unpruned_studies_reuse_each_others_scores_exactly(micro_zoo, tmp_path, scorer, run_main):
    """18 examples a domain: halving's rungs end at 2, 6 and 18. Unpruned first: the halving study then
    scores nothing, and each trial's NP at its last rung is the NP on its examples summed here. Halving
    first: the unpruned study scores only what the pruned trials did not reach."""
    grid, scales, ends = "scale=0.2,0.6,1.0", [0.2, 0.6, 1.0], [2, 6, 18]
    inputs = dict(experts=[str(micro_zoo / d) for d in DOMAINS], base=str(micro_zoo / "base"))
    folders = {s: mbmerge.merge("task_arithmetic", out=tmp_path / f"ref{s}", protocol="mergebench", progress=False,
                                scale=s, **inputs) for s in scales}
    for first, then in [((), ("--prune", "halving")), (("--prune", "halving"), ())]:
        db, merged = tmp_path / f"{'-'.join(first) or 'none'}.db", len(scorer.merges())
        assert run_main(*_args(micro_zoo, tmp_path / f"a{len(first)}", db, *first, grid=grid, limit=18))[0] == 0
        a = json.loads((tmp_path / f"a{len(first)}" / "tune.json").read_text())
        calls = len(scorer.calls)
        code, _, err = run_main(*_args(micro_zoo, tmp_path / f"b{len(first)}", db, *then, grid=grid, limit=18))
        assert code == 0, err
        b = json.loads((tmp_path / f"b{len(first)}" / "tune.json").read_text())
        halving = b if then else a
        for r in halving["trials"]:
            stop = ends[r["rung"]]
            assert r["np"] == pytest.approx(_reference_np(scorer, folders[r["params"]["scale"]], stop), rel=1e-12)
        if then:
            assert b["this_run"]["evaluated"] == 0 and len(scorer.calls) == calls
            assert {r["state"] for r in b["trials"]} == {"complete", "pruned"}
        else:
            unreached = sum(2 * (18 - ends[r["rung"]]) for r in a["trials"])
            assert b["this_run"]["evaluated"] == unreached > 0
            assert len(scorer.merges()) - merged == 3 + 1 + 1 + 2     # halving's 3 + 1 + 1, then the 2 it pruned
            for r in b["trials"]:
                assert r["np"] == pytest.approx(_reference_np(scorer, folders[r["params"]["scale"]], 18), rel=1e-12)


# --- 8. Ray's own banner and logging stay out of the user's output -----------------------------------

def test_a_local_ray_says_nothing_of_its_own(micro_zoo, tmp_path):
    from mbmerge.tune.runners import ray_options
    out = tmp_path / "best"
    args = [sys.executable, "-c", "from mbmerge.bin.cli import main; main()",
            *map(str, _args(micro_zoo, out, tmp_path / "t.db", "--ray", "--cpus-per-trial", "1", grid="scale=1.0",
                            limit=1))]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rays = re.compile(r"\bRay\b|Token authentication|RAY_|ray\.io|\bINFO\b|\bWARNING\b|raylet|dashboard|pid=")
    assert not [ln for ln in (done.stdout + done.stderr).splitlines() if rays.search(ln)], done.stderr
    assert (out / "mbmerge.json").exists()
    assert ray_options(False)["log_to_driver"] is False and ray_options(True)["log_to_driver"] is True
