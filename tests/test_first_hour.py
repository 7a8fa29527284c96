"""Issue 16, a first hour without surprises, from the user's side: the demo on a zoo whose experts
score 0, a mistyped command, the zoo's progress, lm-eval's noise, the report's pictures, the
kernel bench's warm-up and the tuning score cache under two writers. The micro zoo's experts beat
the base since issue 26, so a scorer that gives every model 0 stands in for such a zoo."""
import json
import sys

import pytest
from conftest import run_cli

NOISE = ("fatal: not a git repository", "Overwriting default num_fewshot", "\r")


def run_in_process(monkeypatch, capfd, *args):
    """`mbmerge ARGS...` through main(), capturing file descriptors 1 and 2 (subprocesses such as
    lm-eval's `git` included): (exit code, stdout, stderr)."""
    return run_cli(monkeypatch, capfd, *args)


@pytest.fixture
def every_score_zero(monkeypatch):
    """Every lm-eval score 0 (as on the micro zoo before issue 26, where every expert scored 0 on its
    own domain): the harness's one way into lm-eval, replaced."""
    from mbmerge.eval import harness
    monkeypatch.setattr(harness, "_run_lm_eval", lambda model_dir, todo, **kw: {item[1]: 0.0 for item in todo})


# --- 4. lm-eval's noise stays out of our output unless asked for --------------------------------

@pytest.mark.parametrize("verbose", [False, True])
def test_eval_keeps_lm_eval_noise_out_unless_verbose(micro_zoo, tmp_path, monkeypatch, capfd, caplog, verbose):
    """Stderr and the log records (pytest's log capture takes lm-eval's warnings off stderr, so
    both are read) hold none of lm-eval's noise, unless -v asks for it: only our own progress lines."""
    monkeypatch.chdir(tmp_path)     # not a git repository: lm-eval's `git describe` fails here
    out = tmp_path / "report.json"
    code, stdout, err = run_in_process(monkeypatch, capfd, "eval", micro_zoo / "math", "--zoo", micro_zoo,
                                       "--domains", "math", "--limit", 2, "--out", out, *(["-v"] if verbose else []))
    assert code == 0, err
    report = json.loads(out.read_text())
    assert set(report["scores"]) == {"math", "general"}
    assert f"| math | {report['scores']['math']:.3f} | {report['experts']['math']['score']:.3f} |" in stdout
    said = err + caplog.text
    if verbose:
        assert [noise for noise in NOISE if noise in said] == list(NOISE), said
    else:
        assert [noise for noise in NOISE if noise in said] == [], said
        assert [ln for ln in err.splitlines() if not ln.startswith("mbmerge eval: ")] == [], err


# --- 1. normalised performance undefined (every expert scores 0): said, not a crash ----------------

def test_demo_without_quiet_says_np_is_undefined(micro_zoo, tmp_path, run_main, every_score_zero):
    out = tmp_path / "demo"
    assert not out.exists()
    code, stdout, err = run_main("demo", "--micro", "--cache", micro_zoo.parent.parent, "--out", out,
                                 "--methods", "linear", "--limit", 1, "--tune", "--tune-methods", "hi_merging", "--no-moe")
    assert code == 0, err
    assert "linear: normalised performance undefined (expert scores 0)" in err
    assert "mbmerge: warning: hi_merging (tuned) left out: hi_merging: every expert scores 0" in err
    rows = {r["model"]: r for r in json.loads((out / "report.json").read_text())["models"]}
    assert list(rows) == ["base", "instruction", "math", "multilingual", "coding", "safety", "multitask", "linear"]
    assert all(r["normalised"] is None for r in rows.values())
    assert all(rows[d]["scores"][d] == 0 for d in ("instruction", "math", "multilingual", "coding", "safety"))
    line = next(ln for ln in stdout.splitlines() if ln.startswith("| linear | merge |"))
    assert line.split(" | ")[8] == "undefined (expert scores 0)"
    report = (out / "report.md").read_text()
    assert "| linear | merge |" in report and report.count("undefined (expert scores 0)") == len(rows)
    note = ("is undefined for 8 of 8 models: the instruction, math, multilingual, coding, safety experts score 0 "
            "on their own domain")
    assert note in report and note in stdout
    assert f"report: {out / 'report.md'}" in stdout


def test_tune_says_when_no_candidate_has_an_np(micro_zoo, tmp_path, run_main, every_score_zero):
    out = tmp_path / "best"
    code, stdout, err = run_main("tune", "--method", "task_arithmetic", "--experts",
                                 f"{micro_zoo / 'math'},{micro_zoo / 'coding'}", "--base", micro_zoo / "base",
                                 "--validate", "math,coding", "--grid", "scale=0.5,1.0", "--limit", 1, "--out", out)
    assert code == 0, err
    note = ("every candidate's NP is undefined (every expert scores 0 on its own domain, or no domain was scored); "
            "picked the first candidate")
    assert f"mbmerge: warning: {note}" in err
    assert f"best: {note}" in stdout
    record = json.loads((out / "tune.json").read_text())
    assert record["best"] == {"number": 0, "params": {"scale": 0.5}, "np": None, "values": {"np": None}, "note": note}
    assert [r["np"] for r in record["trials"]] == [None, None]
    assert json.loads((out / "mbmerge.json").read_text())["params"]["scale"] == 0.5


# --- 2. a mistyped command is named, not taken for a merge missing --out ------------------------------

@pytest.mark.parametrize("args, message", [
    (["verfiy", "x"], "no command 'verfiy'; did you mean 'verify'?"),
    (["demoo", "--micro"], "no command 'demoo'; did you mean 'demo'?"),
    (["bench_kernels"], "no command 'bench_kernels'; did you mean 'bench-kernels'?"),
    (["xyzzy"], "no command 'xyzzy' (commands: bench, bench-kernels, demo, eval, extract-lora, merge, methods, "
                "moe, stats, tokensurgeon, tune, verify, zoo; default: merge --method ...)"),
    (["recipe.yml", "--out", "m"], "no command 'recipe.yml'; for a mergekit recipe, pass --config recipe.yml"),
])
def test_a_mistyped_command_gets_the_nearest_one(tmp_path, monkeypatch, run_main, args, message):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_main(*args)
    assert (code, stdout, err) == (2, "", f"mbmerge: error: {message} (see 'mbmerge --help')\n")
    assert list(tmp_path.iterdir()) == []


def test_options_first_are_still_a_merge(family, tmp_path, run_main):
    p = family["paths"]
    code, _, err = run_main("--method", "ties", "--base", p["base"], "--experts", f"{p['math']},{p['code']}")
    assert code == 2 and "Missing option '--out'" in err and "no command" not in err
    out = tmp_path / "merged"
    code, stdout, err = run_main("--method", "ties", "--base", p["base"], "--experts", f"{p['math']},{p['code']}",
                                 "--out", out, "-q")
    assert (code, err) == (0, "") and (out / "mbmerge.json").exists()
    assert json.loads((out / "mbmerge.json").read_text())["method"] == "ties"


# --- 3. building the zoo says why, up front, and shows each model's progress --------------------------

@pytest.fixture
def small_micro(monkeypatch):
    """The micro zoo with fewer steps (the bars count what the size says)."""
    from dataclasses import replace
    from mbmerge.eval import zoo
    monkeypatch.setitem(zoo.SIZES, "micro", replace(zoo.SIZES["micro"], pretrain_steps=7, finetune_steps=3,
                                                    multitask_steps=5, eval_n=1))


def test_building_the_zoo_says_why_and_shows_a_bar_per_model(small_micro, tmp_path, run_main):
    from mbmerge.eval.zoo import BUILD_TIME, VERSIONS
    folder = tmp_path / "zoo" / f"llama-micro-{VERSIONS['micro']}"
    code, stdout, err = run_main("zoo", "--micro", "--cache", tmp_path)
    assert code == 0, err
    assert stdout.startswith(f"{folder}\n") and (folder / "zoo.json").exists()
    why = ("mbmerge: building the mini zoo (the built-in default family: a tiny base and one expert per domain, "
           f"trained once on CPU, {BUILD_TIME['micro']}, cached in {folder})\n")
    assert err.startswith(why) and err.count("building the mini zoo") == 1
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if "|" in ln]
    for n, (name, steps) in enumerate([("base", 7), ("instruction", 3), ("math", 3), ("multilingual", 3),
                                       ("coding", 3), ("safety", 3), ("multitask", 5)], start=1):
        done = [ln for ln in lines if ln.startswith(f"{n}/7 {name}: 100%") and f"| {steps}/{steps} [" in ln]
        assert done and "step/s, loss=" in done[-1] and "<00:00" in done[-1], lines   # rate, loss and ETA
    assert any(ln.startswith("scoring: 100%") and "| 7/7 [" in ln for ln in lines)

    code, stdout, again = run_main("zoo", "--micro", "--cache", tmp_path)   # cached: nothing to say
    assert (code, again) == (0, "") and stdout.startswith(f"{folder}\n")


def test_a_quiet_zoo_build_prints_nothing(small_micro, tmp_path, run_main):
    from mbmerge.eval.zoo import VERSIONS
    code, stdout, err = run_main("zoo", "--micro", "--cache", tmp_path, "-q")
    assert (code, err) == (0, "") and (tmp_path / "zoo" / f"llama-micro-{VERSIONS['micro']}" / "zoo.json").exists()


# --- 6. bench-kernels warms up before it times, the copy reference too ----------------------------------

def test_timing_skips_the_slow_first_calls():
    """A closure whose first call is slow (compiling, first-touch page faults) is timed at its speed."""
    import time
    import torch
    from mbmerge.bin import bench_kernels
    calls = []

    def first_slow():
        calls.append(None)
        time.sleep(0.2 if len(calls) == 1 else 0.001)
    assert bench_kernels._timed(first_slow, torch.device("cpu"), 2) < 0.1
    assert len(calls) == bench_kernels.WARMUP + 2 and bench_kernels.WARMUP >= 1


def test_bench_kernels_figures_are_shares_a_copy_can_reach(tmp_path, run_main):
    out = tmp_path / "k.json"
    code, stdout, err = run_main("bench-kernels", "--elements", 20000, "--experts", 2, "--repeat", 3,
                                 "--device", "cpu", "--json", out)
    assert code == 0, err
    report = json.loads(out.read_text())
    shares = {r["case"]: 100 * r["GBps"] / report["copy_GBps"] for r in report["rows"]}
    assert len(shares) == 7 and all(0 < s < 150 for s in shares.values()), shares
    printed = {ln.split(" | ")[0].lstrip("| "): ln.rsplit(" | ", 1)[1] for ln in stdout.splitlines()
               if ln.startswith("| ") and not ln.startswith("| case")}
    assert printed == {case: f"{s:.0f}% |" for case, s in shares.items()}
    assert "best of 3 timed runs (the copy: 10), each after 3 untimed" in stdout


# --- 7. two processes storing tuning scores at once keep every entry ---------------------------------

STORE = """
import sys, time
from pathlib import Path
from mbmerge.tune.database import ScoreStore
url, who, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
store = ScoreStore(url)
while not go.exists():
    time.sleep(0.01)
for i in range(200):
    store.put({f"{who}-{i}": {"score": i / 200, "examples": 4, "merge_seconds": 1.0, "validation_seconds": 2.0}})
store.put({"both": {"score": 0.25 if who == "a" else 0.75, "examples": 4, "merge_seconds": 1.0,
                    "validation_seconds": 2.0}})
"""


def test_two_processes_storing_scores_keep_all_of_them(tmp_path):
    import subprocess
    from mbmerge.tune.database import ScoreStore
    url, go = f"sqlite:///{tmp_path / 'tune.db'}", tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, "-c", STORE, url, who, str(go)], stderr=subprocess.PIPE,
                                text=True, cwd=tmp_path) for who in ("a", "b")]
    go.touch()     # both start storing at once
    assert [(w.wait(timeout=120), w.stderr.read()) for w in writers] == [(0, ""), (0, "")]
    keys = [f"{who}-{i}" for who in "ab" for i in range(200)]
    data = ScoreStore(url).get(keys + ["both"])
    assert sorted(data) == sorted(keys + ["both"])
    assert data["b-100"] == {"score": 0.5, "examples": 4, "merge_seconds": 1.0, "validation_seconds": 2.0}
    assert data["both"]["score"] in (0.25, 0.75)      # the first writer's score stays


# --- 5. the report's pictures read with 30 models ------------------------------------------------------

DOMAIN_NAMES = ["instruction", "math", "multilingual", "coding", "safety"]


def made_up_rows(n_merges: int = 22) -> list[dict]:
    """Base, five experts, the multi-task model, merges and tuned merges, with plausible numbers."""
    import random
    rng = random.Random(0)

    def row(model, kind, np_, forgetting, seconds=None, stats=None, validation=None):
        return {"model": model, "kind": kind, "scores": {d: round(rng.uniform(0.2, 0.95), 3) for d in DOMAIN_NAMES},
                "general": round(rng.uniform(0.3, 0.9), 3), "normalised": np_, "forgetting": forgetting,
                "merge_seconds": seconds, "stats_seconds": stats, "validation_seconds": validation}
    rows = [row("base", "base", 0.49, 0.0), *(row(d, "expert", 0.6, 0.1) for d in DOMAIN_NAMES),
            row("multitask", "multitask", 0.98, 0.5)]
    rows += [row(f"merge_{i}", "merge", rng.choice([0.72, 0.67, 0.67, 0.61, 0.61, 0.61, 0.59]),
                 rng.choice([0.0, 0.05]), rng.choice([0.2, 0.3, 0.5]), rng.choice([None, 8.0]))
             for i in range(n_merges)]
    rows += [row("ties (tuned)", "tuned", 0.7, 0.0, 3.0, None, 120.0)]
    rows[-3]["normalised"] = None   # a merge with no NP sorts last
    return rows


def test_the_report_pictures_are_written_and_the_heatmap_rows_sorted(tmp_path):
    from PIL import Image
    from mbmerge.eval.report import heatmap_order, write_report
    rows = made_up_rows()
    assert len(rows) == 30
    table = write_report(rows, DOMAIN_NAMES, tmp_path / "report")
    assert table.count("\n") == 31 and "| merge_20 | merge |" in table
    for name, (min_w, min_h) in {"scores": (600, 900), "efficiency": (600, 450), "forgetting": (900, 400)}.items():
        with Image.open(tmp_path / "report" / f"{name}.png") as image:
            image.verify()
        with Image.open(tmp_path / "report" / f"{name}.png") as image:
            assert image.format == "PNG" and image.width >= min_w and image.height >= min_h, (name, image.size)
            assert image.width <= 3000 and image.height <= 3000, (name, image.size)
    assert "![scores](scores.png)" in (tmp_path / "report" / "report.md").read_text()

    order = [r["model"] for r in heatmap_order(rows)]
    assert order[:7] == ["base", *DOMAIN_NAMES, "multitask"]          # references first, as given
    merges = [r for r in heatmap_order(rows)][7:]
    nps = [r["normalised"] for r in merges]
    assert nps[-1] is None and nps[:-1] == sorted(nps[:-1], reverse=True) and nps[0] == 0.72
    assert order[-1] == rows[-3]["model"] and sorted(order) == sorted(r["model"] for r in rows)


def test_efficiency_labels_are_spread_apart():
    from mbmerge.eval.report import spread
    heights = [0.5, 0.5, 0.51, 0.2, 0.99, 1.0, 0.0]
    placed = spread(heights, 0.05)
    ordered = sorted(placed)
    assert all(b - a >= 0.05 - 1e-9 for a, b in zip(ordered, ordered[1:]))
    assert max(placed) <= 1.0 and placed[3] == 0.2 and placed[6] == 0.0      # alone: where its point is
    assert [sorted(range(7), key=placed.__getitem__)] == [sorted(range(7), key=lambda i: (heights[i], i))]
