"""`mbmerge tune` on the micro zoo: an Optuna study that picks what a brute-force loop written here
picks, prunes as a successive halving written here prunes, searches ranges with TPE and CMA-ES,
resumes, and shares its study with another process without losing or repeating a trial.

The micro zoo's experts score 0 on their tasks, so the selection tests score a merge by a proxy of
its weights instead (closeness to each domain's expert, times a wobble that depends on the range of
examples, so that subsets disagree with the whole), patched in where the eval layer is called; the
references compute the same proxy on merges they make themselves. The real lm-eval path runs too."""
import json
import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from safetensors.torch import load_file

import mbmerge
from mbmerge.eval import harness
from mbmerge.tune.score import Candidate, Validation
from mbmerge.tune.search import Search, tune
from mbmerge.tune.space import parse_grid

DOMAINS = ["math", "coding"]


def _weights(folder):
    return {k: v.float() for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _proxy(zoo, wobble: float = 0.0):
    """evaluate_ranges' stand-in: a merge's 'score' on a domain's examples start..stop-1 is
    1 / (1 + 1000 * mean squared distance to the domain's expert) * (1 + wobble * sin(start, stop))."""
    experts = {d: _weights(zoo / d) for d in DOMAINS}

    def score(folder, domain, start, stop):
        w = _weights(folder)
        close = 1 / (1 + 1000 * sum((w[k] - experts[domain][k]).square().mean() for k in w).item() / len(w))
        return close * (1 + wobble * math.sin(3.7 * start + 1.3 * stop + len(domain)))

    def evaluate_ranges(folder, requests, **kw):
        return [score(folder, t.name.removeprefix("mbmerge_zoo_"), a, b) for t, a, b in requests]
    evaluate_ranges.score = score
    return evaluate_ranges


@pytest.fixture
def setup(micro_zoo, monkeypatch):
    calls = []
    proxy = _proxy(micro_zoo, wobble=0.3)
    monkeypatch.setattr(harness, "evaluate_ranges", lambda f, r, **k: calls.append((f, r)) or proxy(f, r, **k))
    kw = dict(experts=[str(micro_zoo / d) for d in DOMAINS], base=str(micro_zoo / "base"), validate=DOMAINS)
    return micro_zoo, kw, proxy.score, calls


def _tune(method, *, experts, base, validate, out, limit=None, show=False, **search):
    """tune of METHOD's candidates over these experts, scored on `validate`'s domains (limit examples a task)."""
    return tune(Candidate(method=method, experts=tuple(experts), base=base), out=out,
                validation=Validation(tuple(validate), limit=limit), search=Search(**search), show=show)


def _np(score, folder, zoo, ranges):
    """NP of a model on example ranges [(start, stop)]: per domain the example-weighted mean of its range
    scores over the expert's, averaged over domains."""
    def mean(f, d):
        return sum((b - a) * score(f, d, a, b) for a, b in ranges) / sum(b - a for a, b in ranges)
    return sum(mean(folder, d) / mean(zoo / d, d) for d in DOMAINS) / len(DOMAINS)


def _merge(tmp_path, kw, method, **params):
    out = tmp_path / ("bf-" + "-".join(f"{k}{v}" for k, v in params.items()))
    return mbmerge.merge(method, out=out, protocol="mergebench", progress=False, experts=kw["experts"],
                         base=kw["base"], **params)


def test_the_grid_picks_what_a_brute_force_loop_picks(setup, tmp_path):
    zoo, kw, score, _ = setup
    grid = {"density": [0.1, 0.3, 1.0], "scale": [0.2, 0.6, 1.0]}
    record = _tune("ties", out=tmp_path / "best", grid=grid, limit=10, **kw)
    brute = {(d, s): _np(score, _merge(tmp_path, kw, "ties", density=d, scale=s), zoo, [(0, 10)])
             for d in grid["density"] for s in grid["scale"]}
    best = max(brute, key=brute.get)
    assert (record["best"]["params"]["density"], record["best"]["params"]["scale"]) == best
    assert len(record["trials"]) == 9 and {r["state"] for r in record["trials"]} == {"complete"}
    for row in record["trials"]:
        assert row["np"] == pytest.approx(brute[(row["params"]["density"], row["params"]["scale"])], rel=1e-6)
        assert row["np"] == pytest.approx(sum(row["np_by_domain"].values()) / 2, rel=1e-12)
        assert row["examples"] == 20
    card = json.loads((tmp_path / "best" / "mbmerge.json").read_text())
    assert card["params"]["density"] == [best[0]] * 2 and card["params"]["scale"] == best[1]
    assert json.loads((tmp_path / "best" / "tune.json").read_text())["best"] == record["best"]


def test_halving_prunes_as_successive_halving_does_and_scores_the_best_on_everything(setup, tmp_path):
    """18 examples a domain: rungs on examples 0-1, 0-5, 0-17; nine candidates, the best third go on."""
    zoo, kw, score, calls = setup
    grid = {"density": [0.1, 0.3, 1.0], "scale": [0.2, 0.6, 1.0]}
    record = _tune("ties", out=tmp_path / "best", grid=grid, limit=18, prune="halving", **kw)
    folders = {(d, s): _merge(tmp_path, kw, "ties", density=d, scale=s) for d in grid["density"] for s in grid["scale"]}
    alive, reached = list(folders), {}
    for rung, cuts in enumerate([[(0, 2)], [(0, 2), (2, 6)], [(0, 2), (2, 6), (6, 18)]]):
        nps = {p: _np(score, folders[p], zoo, cuts) for p in alive}
        reached.update({p: (rung, nps[p]) for p in alive})
        if rung < 2:
            alive = [p for p in alive if sum(v > nps[p] for v in nps.values()) < math.ceil(len(alive) / 3)]
    assert len(alive) == 1
    got = {(r["params"]["density"], r["params"]["scale"]): r for r in record["trials"]}
    for p, (rung, np) in reached.items():
        assert (got[p]["state"], got[p]["rung"]) == ("complete" if p in alive else "pruned", rung)
        assert got[p]["np"] == pytest.approx(np, rel=1e-6)
        assert got[p]["examples"] == 2 * [2, 6, 18][rung]
    assert (record["best"]["params"]["density"], record["best"]["params"]["scale"]) == alive[0]
    assert record["examples"] == sum(r["examples"] for r in record["trials"]) < 9 * 2 * 18 / 3
    merged = [f for f, _ in calls if "mbmerge-tune-" in str(f)]
    assert len(merged) == 9 + 3 + 1       # a survivor is merged again for each rung it reaches


def test_halving_a_tpe_search_judges_brackets_of_nine(setup, tmp_path):
    """A search sampler with halving claims nine trials at a time: three reach the second rung, one
    completes; the next bracket's trials are judged against the first's at each rung."""
    zoo, kw, _, _ = setup
    grid = parse_grid("scale=0.2:1.0")
    record = _tune("task_arithmetic", out=tmp_path / "best", grid=grid, sampler="tpe", trials=9, prune="halving",
                   limit=18, **kw)
    states = sorted((r["state"], r["rung"]) for r in record["trials"])
    assert states == [("complete", 2)] + [("pruned", 0)] * 6 + [("pruned", 1)] * 2
    assert record["best"]["number"] == next(r["number"] for r in record["trials"] if r["state"] == "complete")


def test_a_rerun_scores_nothing_and_other_settings_score_again(setup, tmp_path):
    zoo, kw, _, calls = setup
    grid = {"scale": [0.4, 0.8]}
    merges = lambda: [f for f, _ in calls if "mbmerge-tune-" in str(f)]  # noqa: E731 (not the experts)
    first = _tune("task_arithmetic", out=tmp_path / "a", grid=grid, **kw)
    n = len(merges())
    again = _tune("task_arithmetic", out=tmp_path / "b", grid=grid, **kw)
    assert n == 2 and len(merges()) == n and again["this_run"]["evaluated"] == 0
    assert [r["np"] for r in again["trials"]] == [r["np"] for r in first["trials"]]
    assert again["study"] == first["study"] and len(again["trials"]) == 2      # the same study, resumed
    other = _tune("task_arithmetic", out=tmp_path / "c", grid=grid, limit=3, **kw)
    assert other["study"] != first["study"] and other["this_run"]["evaluated"] == 2 * 2 * 3


def test_a_bigger_grid_resumes_the_same_points_and_scores_only_the_new_ones(setup, tmp_path):
    """A study is named by its space: a rerun with an extra value is a new study whose shared points
    come from the score store (no merge)."""
    zoo, kw, _, calls = setup
    _tune("task_arithmetic", out=tmp_path / "a", grid={"scale": [0.4, 0.8]}, **kw)
    before = len([f for f, _ in calls if "mbmerge-tune-" in str(f)])
    record = _tune("task_arithmetic", out=tmp_path / "b", grid={"scale": [0.4, 0.8, 1.0]}, **kw)
    assert len([f for f, _ in calls if "mbmerge-tune-" in str(f)]) == before + 1
    assert len(record["trials"]) == 3


@pytest.mark.parametrize("sampler", ["tpe", "cmaes"])
def test_search_samplers_search_per_expert_weights_within_their_ranges(setup, tmp_path, sampler):
    zoo, kw, score, _ = setup
    grid = parse_grid("weights=0.2:1.0 scale=0.5:1.0")
    record = _tune("task_arithmetic", out=tmp_path / "best", grid=grid, sampler=sampler, trials=6,
                   per_expert=("weights",), limit=4, **kw)
    assert len(record["trials"]) == 6 and all(r["state"] == "complete" for r in record["trials"])
    for r in record["trials"]:
        w = r["params"]["weights"]
        assert len(w) == 2 and all(0.2 <= x <= 1.0 for x in w) and 0.5 <= r["params"]["scale"] <= 1.0
    assert len({tuple(r["params"]["weights"]) for r in record["trials"]}) == 6     # searched, not repeated
    best = max(record["trials"], key=lambda r: r["np"])
    assert record["best"]["number"] == best["number"]
    folder = _merge(tmp_path, kw, "task_arithmetic", **best["params"])
    assert best["np"] == pytest.approx(_np(score, folder, zoo, [(0, 4)]), rel=1e-6)
    more = _tune("task_arithmetic", out=tmp_path / "more", grid=grid, sampler=sampler, trials=8,
                 per_expert=("weights",), limit=4, **kw)
    assert len(more["trials"]) == 8 and more["this_run"]["evaluated"] == 2 * 2 * 4     # resumed: two more


def test_show_prints_the_study_and_plots_it_without_running_anything(setup, tmp_path, run_main):
    zoo, kw, _, calls = setup
    args = ["tune", "--method", "ties", "--experts", ",".join(kw["experts"]), "--base", kw["base"], "--validate",
            "math,coding", "--grid", "density=0.2,0.4 scale=0.5,1.0", "--limit", "3", "--out", tmp_path / "best"]
    code, out, err = run_main(*args)
    assert code == 0, err
    n = len(calls)
    code, shown, err = run_main(*args, "--show")
    assert code == 0, err
    assert len(calls) == n
    rows = [ln for ln in shown.splitlines() if ln.startswith("| ") and not ln.startswith("| trial")]
    assert len(rows) == 4 and sum("best" in ln for ln in rows) == 1
    assert "| trial | params | math NP | coding NP | NP | examples | merge s | validation s |  |" in shown
    assert "| 0 | density=0.2 scale=0.5 |" in shown and (tmp_path / "best" / "tune-params.png").stat().st_size > 5000


def test_errors_are_one_line_and_write_nothing(setup, tmp_path):
    zoo, kw, _, _ = setup
    cases = [(dict(grid={"densty": [0.1]}), "densty"), (dict(grid={"density": [2.0]}), "(0, 1]"),
             (dict(grid={"density": ("0.1", "0.3")}), "--sampler tpe"),
             (dict(grid={"density": [0.1]}, sampler="tpe", per_expert=("weights",)), "--per-expert weights"),
             (dict(grid={"density": [0.1]}, sampler="annealing"), "annealing"),
             (dict(grid={"density": [0.1]}, storage="nosuchdb://x"), "tuning database nosuchdb://x"),
             (dict(grid={"density": [0.1]}, show=True), "without --show first")]
    for extra, words in cases:
        with pytest.raises(mbmerge.MbmergeError) as e:
            _tune("ties", out=tmp_path / "x", **kw, **extra)
        assert words in str(e.value) and "\n" not in str(e.value), (extra, str(e.value))
    with pytest.raises(mbmerge.MbmergeError, match="no default grid for slerp"):
        _tune("slerp", out=tmp_path / "x", **{**kw, "experts": kw["experts"][:1], "validate": DOMAINS[:1]})
    with pytest.raises(mbmerge.MbmergeError, match="name=v1,v2"):
        parse_grid("scale")
    assert parse_grid("scale=0.2,0.4 tall-lambda=0.3 density=0.1:0.5") == {
        "scale": ["0.2", "0.4"], "tall_lambda": ["0.3"], "density": ("0.1", "0.5")}
    assert not (tmp_path / "x").exists()


def test_an_interrupted_run_resumes_where_it_stopped(setup, tmp_path, monkeypatch):
    """Ctrl-C in the third trial: its trial is failed on the way out; the rerun scores only it and the
    one after it."""
    zoo, kw, _, calls = setup
    proxy = harness.evaluate_ranges

    def interrupting(folder, requests, **k):
        if len([f for f, _ in calls if "mbmerge-tune-" in str(f)]) == 2 and "mbmerge-tune-" in str(folder):
            calls.append((folder, requests))
            raise KeyboardInterrupt
        return proxy(folder, requests, **k)
    monkeypatch.setattr(harness, "evaluate_ranges", interrupting)
    grid = {"scale": [0.2, 0.4, 0.6, 0.8]}
    with pytest.raises(KeyboardInterrupt):
        _tune("task_arithmetic", out=tmp_path / "a", grid=grid, limit=4, **kw)
    monkeypatch.setattr(harness, "evaluate_ranges", proxy)
    record = _tune("task_arithmetic", out=tmp_path / "a", grid=grid, limit=4, **kw)
    states = sorted((r["params"]["scale"], r["state"]) for r in record["trials"])
    assert states == [(0.2, "complete"), (0.4, "complete"), (0.6, "complete"), (0.6, "interrupted"),
                      (0.8, "complete")]
    assert record["this_run"]["evaluated"] == 2 * 2 * 4


def test_the_score_key_names_files_not_spellings(micro_zoo, monkeypatch):
    """Domain names, folders and a trailing slash naming the same files give the same key; another
    parameter, input or range does not."""
    from mbmerge.tune.score import Candidate, Validation, model_key, score_key, task_identity
    monkeypatch.setenv("MBMERGE_CACHE", str(micro_zoo.parents[1]))     # domain names -> this zoo
    v = Validation(tuple(DOMAINS))
    task = task_identity(v.tasks("math")[0])

    def key(c, start=0, stop=10):
        return score_key(model_key(c), v, task, start, stop)
    by_name = Candidate(method="ties", experts=tuple(DOMAINS), params={"density": 0.2})
    by_folder = Candidate(method="ties", experts=tuple(f"{micro_zoo / d}/" for d in DOMAINS),
                          base=str(micro_zoo / "base"), params={"density": 0.2})
    assert key(by_name) == key(by_folder) and key(by_name) != key(by_name, 10, 20)
    other = [Candidate(method="ties", experts=tuple(DOMAINS), params={"density": 0.3}),
             Candidate(method="ties", experts=("math", "safety"), params={"density": 0.2})]
    assert all(key(by_name) != key(c) for c in other)
    assert model_key(str(micro_zoo / "math")) == model_key(str(micro_zoo / "math") + "/") != model_key(
        str(micro_zoo / "coding"))


# --- the real scorer: lm-eval on the zoo's validation split, serial, on Ray, in two processes ------------

def _cli(zoo, out, *extra):
    return [sys.executable, "-c", "from mbmerge.bin.cli import main; main()", "tune", "--method", "task_arithmetic",
            "--experts", f"{zoo / 'math'},{zoo / 'coding'}", "--base", str(zoo / "base"), "--validate",
            "math,coding", "--limit", "4", "--out", str(out), *map(str, extra)]


def _trials(db, name=None):
    url = f"sqlite:///{db}"
    study = optuna.load_study(study_name=name or optuna.get_all_study_names(url)[0], storage=url)
    return study.get_trials(deepcopy=False)


def test_serial_and_local_ray_give_the_same_scores_and_pick(micro_zoo, tmp_path, run_main):
    """MergeBench's TA grid (scale 0.2..1.0), serially and on a local Ray of this machine's 2 cores."""
    records = []
    for name, extra in [("serial", ()), ("ray", ("--ray", "--cpus-per-trial", "1"))]:
        code, out, err = run_main(*_cli(micro_zoo, tmp_path / name, "--storage", f"sqlite:///{tmp_path / name}.db",
                                        *extra)[3:])
        assert code == 0, err
        assert "merge (algorithm) time" in out and (tmp_path / name / "model.safetensors").exists()
        records.append(json.loads((tmp_path / name / "tune.json").read_text()))
    serial, ray = records
    assert ray["this_run"]["evaluated"] == serial["this_run"]["evaluated"] == 5 * 2 * 4
    key = lambda r: r["params"]["scale"]   # noqa: E731
    assert [(key(r), r["scores"]) for r in sorted(serial["trials"], key=key)] == \
        [(key(r), r["scores"]) for r in sorted(ray["trials"], key=key)]
    assert all(isinstance(r["scores"]["math"], float) for r in serial["trials"])
    assert serial["best"]["params"] == ray["best"]["params"]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of this machine's binaries on loopback, for the module (skipped without
    initdb or psycopg2): run as the postgres user when the tests run as root, as servers refuse root."""
    import os
    import shutil
    import socket
    import tempfile
    pytest.importorskip("psycopg2")
    if not (shutil.which("initdb") and shutil.which("pg_ctl")):
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl)")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user and not (shutil.which("runuser") and _has_user("postgres")):
        pytest.skip("running as root, with no postgres user to run the server as")
    root = Path(tempfile.mkdtemp(prefix="mbmerge-pg-"))
    if as_user:
        shutil.chown(root, "postgres")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    subprocess.run(as_user + ["initdb", "-D", str(root / "data"), "-A", "trust", "-U", "mbmerge"], check=True,
                   capture_output=True)
    subprocess.run(as_user + ["pg_ctl", "-D", str(root / "data"), "-w", "-l", str(root / "log"), "-o",
                              f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True,
                   capture_output=True)
    yield f"postgresql+psycopg2://mbmerge@127.0.0.1:{port}"
    subprocess.run(as_user + ["pg_ctl", "-D", str(root / "data"), "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def _has_user(name: str) -> bool:
    import pwd
    try:
        return bool(pwd.getpwnam(name))
    except KeyError:
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """A fresh tuning database: a SQLite file, or a new database on the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    import sqlalchemy as sa
    server = request.getfixturevalue("postgres")
    name = f"t{tmp_path.name[-20:].replace('-', '_').lower()}"
    with sa.create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT").connect() as c:
        c.execute(sa.text(f"CREATE DATABASE {name}"))
    return f"{server}/{name}"


def test_two_processes_on_one_study_neither_lose_nor_repeat_a_trial(micro_zoo, tmp_path, database):
    """Two `mbmerge tune` processes on one study, in a SQLite file or on a PostgreSQL server (as
    machines would share one): every grid point has one trial, and every (candidate, task, range) one score."""
    import sqlalchemy as sa
    grid = "scale=0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8"
    procs = [subprocess.Popen(_cli(micro_zoo, tmp_path / f"out{i}", "--grid", grid, "--storage", database,
                                   "--study", "shared"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
             for i in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert [code for code, _ in results] == [0, 0], "\n".join(err[-3000:] for _, err in results)
    trials = optuna.load_study(study_name="shared", storage=database).get_trials(deepcopy=False)
    assert sorted(t.params["scale"] for t in trials) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    assert {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE}
    with sa.create_engine(database).connect() as c:     # a task's 4 examples: pieces 0-0, 1-1, 2-3 (halving's cuts)
        assert c.execute(sa.text("select count(*) from mbmerge_scores")).scalar() == (8 * 2 + 2) * 3


HOLD = """
import sys, time
from mbmerge.tune.database import mutex
url, log = sys.argv[1], sys.argv[2]
for _ in range(25):
    with mutex(url, "test"):
        start = time.time()
        time.sleep(0.005)
        with open(log, "a") as f:
            f.write(f"{start} {time.time()}\\n")
"""


def test_the_mutex_is_held_by_one_process_at_a_time(tmp_path, database):
    """Two processes take the study mutex 25 times each: no two holds overlap."""
    log = tmp_path / "holds"
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, database, str(log)], stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path) for _ in range(2)]
    assert [(p.wait(timeout=300), p.stderr.read()) for p in procs] == [(0, ""), (0, "")]
    holds = sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines())
    assert len(holds) == 50 and all(end <= start for (_, end), (start, _) in zip(holds, holds[1:]))


def test_a_killed_ray_worker_is_retried_and_without_retries_reported_then_resumed(micro_zoo, tmp_path):
    """SIGKILL the first Ray worker that runs a trial's job: with --retries 1 Ray runs it again and every
    trial completes; with --retries 0 its trial fails, the run says so, and a rerun completes the study.
    (The experts' scores are stored by a serial run first, so every Ray job is a trial's.)"""
    for retries in (1, 0):
        db, out = tmp_path / f"r{retries}.db", tmp_path / f"out{retries}"
        subprocess.run(_cli(micro_zoo, tmp_path / "refs", "--grid", "scale=1.0", "--storage", f"sqlite:///{db}",
                            "--overwrite"), check=True, capture_output=True, cwd=tmp_path)
        args = _cli(micro_zoo, out, "--grid", "scale=0.3,0.6,0.9", "--storage", f"sqlite:///{db}", "--study", "killed",
                    "--ray", "--retries", retries)
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        killed = _kill_a_job_worker(proc)
        code, err = proc.wait(timeout=600), proc.stderr.read()
        assert killed and code == 0, err
        states = sorted(t.state.name for t in _trials(db, "killed"))
        if retries:
            assert states == ["COMPLETE"] * 3, err
        else:
            assert states == ["COMPLETE", "COMPLETE", "FAIL"] and "Ray worker died" in err, err
            again = subprocess.run(args[:-3] + ["--overwrite"], capture_output=True, text=True, timeout=600,
                                   cwd=tmp_path)
            assert again.returncode == 0, again.stderr
            assert sorted(t.state.name for t in _trials(db, "killed")) == ["COMPLETE"] * 3 + ["FAIL"]


def _kill_a_job_worker(proc) -> bool:
    """SIGKILL the first process titled ray::run_job (a Ray worker running a job) while proc runs."""
    import os
    import signal
    import time
    while proc.poll() is None:
        ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
        pids = [int(line.split()[0]) for line in ps.splitlines()[1:] if "ray::run_job" in line]
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            return True
        time.sleep(0.02)
    return False


def test_the_command_says_its_errors_in_one_line_and_writes_nothing(micro_zoo, tmp_path, run_main, monkeypatch):
    out = tmp_path / "best"
    base = _cli(micro_zoo, out)[3:]
    for extra, words in [(["--grid", "scale=0.2:0.8"], "--sampler grid takes lists of values, not ranges (scale)"),
                         (["--storage", "nosuchdb://x"], "tuning database nosuchdb://x"),
                         (["--show"], "without --show first")]:
        code, stdout, err = run_main(*base, *extra)
        assert code != 0 and stdout == "" and err.startswith("mbmerge: error: ") and words in err, err
        assert err.count("\n") == 1 and not out.exists()
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    code, _, err = run_main(*base)
    assert code != 0 and "pip install 'mbmerge[tune]'" in err and err.count("\n") == 1 and not out.exists()


def test_a_group_of_tasks_scored_whole_gives_its_score():
    """A group of tasks (mmlu_stem) is one range with no example count: its score stands as it is, and
    the job's seconds are shared out whole."""
    from mbmerge.eval.domain_tasks import Task
    from mbmerge.tune.rungs import _combine, bounds, entries
    group = Task(name="mmlu_stem", metric="acc,none", num_fewshot=0)
    single = Task(name="lambada_openai", metric="acc,none", num_fewshot=0)
    assert bounds(group, None, (1.0,)) == [0, None]
    with pytest.raises(mbmerge.MbmergeError, match="mmlu_stem is a group of tasks"):
        bounds(group, None, (1 / 9, 1 / 3, 1.0))
    ranges = [((group, 0, None), "g"), ((single, 0, 10), "s0"), ((single, 10, 30), "s1")]
    new = entries(ranges, {"scores": [0.5, 0.2, 0.8], "merge_seconds": 3.0, "validation_seconds": 6.0})
    assert [new[k]["examples"] for k in ("g", "s0", "s1")] == [0, 10, 20]
    got = _combine(["stem", "lambada"], [(r, new[k]) for r, k in ranges], 30, {"stem": (group,), "lambada": (single,)})
    assert got.scores == {"stem": 0.5, "lambada": pytest.approx((10 * 0.2 + 20 * 0.8) / 30)}
    assert got.merge_seconds == pytest.approx(3.0) and got.validation_seconds == pytest.approx(6.0)
