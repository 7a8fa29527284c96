"""Issue 26, the first hour's time, from the user's side: `mbmerge eval` prints a table and says its
progress, statistics are cached per example count, tiny models' statistics and evaluation run on
one thread (no collapse beside a busy core), and whole-tensor SVD merges write the same bytes
whatever torch's thread count. (The micro demo's own checks are in test_demo.py; the micro zoo's
experts beating the base in test_zoo.py.)"""
import json
import re

import pytest
import torch

from conftest import read_model

# --- `mbmerge eval`: a table on stdout, the JSON in --out (or on stdout with --json), progress on stderr --


def _eval(run_main, zoo, *extra):
    return run_main("eval", zoo / "multitask", "--zoo", zoo, "--domains", "math", "--limit", 48, *extra)


def test_eval_prints_a_table_keeps_the_json_in_out_and_says_k_of_n(micro_zoo, tmp_path, run_main):
    out = tmp_path / "reports" / "multitask.json"
    assert not out.parent.exists()
    code, stdout, err = _eval(run_main, micro_zoo, "--out", out)
    assert code == 0, err
    rep = json.loads(out.read_text())
    score, expert = rep["scores"]["math"], rep["experts"]["math"]["score"]
    base, general = rep["base"]["tasks"]["mbmerge_zoo_general"], rep["tasks"]["mbmerge_zoo_general"]
    assert expert > 0     # the micro zoo's math expert scores on its first 48 test examples
    np_ = score / expert
    assert rep["normalised_performance"]["mean"] == pytest.approx(np_)
    assert stdout.splitlines()[:5] == [f"{micro_zoo / 'multitask'} (zoo, 48 examples a task)", "",
                                       "| domain | score | expert | normalised |", "|---|---|---|---|",
                                       f"| math | {score:.3f} | {expert:.3f} | {np_:.3f} |"]
    assert f"| mbmerge_zoo_general | {general:.3f} | {base:.3f} | " in stdout
    assert f"\nnormalised performance: {np_:.3f}\n" in stdout
    assert "forgetting: undefined (the base scores 0 on the general tasks)" in stdout     # base 0 on general
    assert base == 0 and not stdout.lstrip().startswith("{")
    steps = ["the model: mbmerge_zoo_math", "the model: mbmerge_zoo_general", "the math expert: mbmerge_zoo_math",
             "the base: mbmerge_zoo_general"]
    lines = err.splitlines()
    assert len(lines) == 4, err
    for k, (line, step) in enumerate(zip(lines, steps), start=1):
        assert re.fullmatch(rf"mbmerge eval: {k} of 4: {step}(; (about \d+ s|under a second) left)?", line), line
    assert "left" in lines[0] and "left" not in lines[-1]

    code, again, err = _eval(run_main, micro_zoo, "--json")     # every score cached now: said, and not timed
    assert code == 0 and json.loads(again) == rep
    assert err.splitlines() == [f"mbmerge eval: {k} of 4: {s} (cached)" for k, s in enumerate(steps, start=1)]


def test_a_quiet_eval_says_nothing_on_stderr(micro_zoo, tmp_path, run_main):
    code, stdout, err = _eval(run_main, micro_zoo, "-q")
    assert (code, err) == (0, "") and "| math |" in stdout


def test_eval_tables_say_why_a_mean_has_no_value():
    from mbmerge.eval.report import eval_table
    rep = {"scores": {"math": 0.25, "coding": None}, "tasks": {"g": 0.5}, "skipped": ["humaneval_plus"],
           "experts": {"math": {"score": 0.0}, "coding": {"score": None}},
           "normalised_performance": {"mean": None, "per_domain": {"math": None, "coding": None}},
           "base": {"tasks": {"g": 0.0}}, "forgetting": {"mean": None, "per_task": {"g": None}},
           "merge": {"method": "ties", "wall_seconds": 1.5}}
    assert eval_table(rep).splitlines() == [
        "| domain | score | expert | normalised |", "|---|---|---|---|", "| math | 0.250 | 0.000 | — |",
        "| coding | — | — | — |", "", "| general task | score | base | forgetting |", "|---|---|---|---|",
        "| g | 0.500 | 0.000 | — |", "",
        "normalised performance: undefined (the math expert scores 0 on its own domain)",
        "forgetting: undefined (the base scores 0 on the general tasks)",
        "not run: humaneval_plus (they execute code: HF_ALLOW_CODE_EVAL=1 allows it)", "merge: ties, 1.50 s"]


def test_progress_estimates_from_the_steps_that_ran():
    from mbmerge.common.progress import Progress
    said, now = [], [0.0]
    steps = Progress(total=5, say=said.append, prefix="x", clock=lambda: now[0])
    for t, cached in [(2.0, False), (2.0, True), (6.0, False), (306.0, False), (306.5, False)]:
        now[0] = t
        steps.step("s", timed=not cached)
    assert said == ["x: 1 of 5: s; about 8 s left",         # 2 s a step, 4 to go
                    "x: 2 of 5: s; about 6 s left",         # a cached step is not timed: 2 s a step, 3 to go
                    "x: 3 of 5: s; about 8 s left",         # the first step (start-up) left out: 4 s, 2 to go
                    "x: 4 of 5: s; about 2.5 min left",     # (4 + 300) / 2 = 152 s, 1 to go
                    "x: 5 of 5: s"]


# --- statistics: cached per example count; tiny models collect and evaluate on one thread ------------

def test_statistics_of_another_example_count_are_collected_again(micro_zoo, tmp_path, run_main):
    """The cache keys on --samples: a few examples never stand for more (the demo's micro run takes 8)."""
    z = micro_zoo
    args = ["--method", "regmean", "--base", z / "base", "--experts", f"{z / 'math'},{z / 'coding'}",
            "--data", "math,coding"]
    cards = {}
    for n, out in [(2, "a"), (3, "b"), (2, "c")]:
        assert not (tmp_path / out).exists()
        code, _, err = run_main(*args, "--samples", n, "--out", tmp_path / out)
        assert code == 0, err
        assert ("mbmerge stats: gram of" in err) == (out != "c"), err     # c: found in the cache
        stats = [s["path"] for s in json.loads((tmp_path / out / "mbmerge.json").read_text())["statistics"]]
        cards[out] = [(p, json.loads((tmp_path.parent / p / "mbmerge-stats.json").read_text())["data"]["examples"])
                      for p in stats]
    assert [n for _, n in cards["a"]] == [2, 2] and [n for _, n in cards["b"]] == [3, 3]
    assert {p for p, _ in cards["a"]}.isdisjoint(p for p, _ in cards["b"]) and cards["c"] == cards["a"]


def test_tiny_models_collect_and_evaluate_on_one_thread_and_restore_it(micro_zoo, tmp_path, run_main,
                                                                        monkeypatch):
    """Statistics and evaluation of a 25k-parameter model run on one intra-op thread (on two they
    collapsed beside a busy core), and the caller's thread count is back afterwards."""
    import lm_eval
    import mbmerge.stats.collect as collect
    seen = []
    real_gram, real_eval = collect.gram, lm_eval.simple_evaluate
    monkeypatch.setattr(collect, "gram", lambda *a, **k: seen.append(("gram", torch.get_num_threads()))
                        or real_gram(*a, **k))
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **k: seen.append(("eval", torch.get_num_threads()))
                        or real_eval(**k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        z = micro_zoo
        code, _, err = run_main("--method", "regmean", "--base", z / "base", "--experts",
                                f"{z / 'math'},{z / 'coding'}", "--data", "math,coding", "--samples", 2,
                                "--out", tmp_path / "m", "-q")
        assert code == 0, err
        code, _, err = run_main("eval", tmp_path / "m", "--zoo", z, "--domains", "math", "--limit", 2, "-q")
        assert code == 0, err
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [("gram", 1)] * 2 + [("eval", 1)] * 3     # -q: the model's two tasks in one lm-eval call


def test_threads_for_a_model_grow_with_its_size_up_to_the_cores():
    from mbmerge.common.threads import PER_THREAD, threads_for, torch_threads
    with torch_threads(4):
        assert [threads_for(n) for n in (25_000, PER_THREAD - 1, 2 * PER_THREAD, 10**12)] == [1, 1, 2, 4]
        with pytest.raises(RuntimeError), torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError
        assert torch.get_num_threads() == 4


# --- tsv / iso_c / iso_cts: the same bytes on any thread count -----------------------------------------

@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_svd_merges_write_the_same_bytes_whatever_torchs_threads(micro_zoo, tmp_path, run_main, method):
    """LAPACK's SVD of the micro zoo's 16x32 k_proj deltas differed in its last bits between one and
    two threads; the SVD methods now run small tensors on one thread (fast beside a busy core too)."""
    z, before, merged = micro_zoo, torch.get_num_threads(), {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = tmp_path / f"t{threads}"
            code, _, err = run_main("--method", method, "--base", z / "base", "--experts",
                                    ",".join(str(z / d) for d in ("math", "coding", "safety")), "--out", out, "-q")
            assert code == 0, err
            merged[threads] = read_model(out)
    finally:
        torch.set_num_threads(before)
    assert merged[1].keys() == merged[2].keys()
    assert [n for n in merged[1] if not torch.equal(merged[1][n], merged[2][n])] == []
