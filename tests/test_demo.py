"""`mbmerge demo` end to end on the micro zoo: merges, evaluation through lm-eval, report files, and
the report's normalised performance and forgetting recomputed here from its own scores. The whole
micro demo runs once for this module, as a user runs it (a subprocess, without -q)."""
import json
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mbmerge.bin.cli import cli
from mbmerge.bin.demo import MICRO, five_expert_methods
from mbmerge.common.domains import DOMAINS


@pytest.fixture(scope="module")
def micro_demo(micro_zoo, tmp_path_factory):
    """`mbmerge demo --micro` with every method, once: {"out", "cache", "stdout", "stderr"}."""
    root = tmp_path_factory.mktemp("micro-demo")
    out, cache = root / "demo", root / "cache"
    assert not out.exists() and not cache.exists()
    env = {**os.environ, "MBMERGE_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf-home")}
    done = subprocess.run([sys.executable, "-c", "from mbmerge.bin.cli import main; main()", "demo", "--micro",
                           "--cache", str(micro_zoo.parent.parent), "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"out": out, "cache": cache, "stdout": done.stdout, "stderr": done.stderr}


def _rows(demo) -> dict:
    return {r["model"]: r for r in json.loads((demo["out"] / "report.json").read_text())["models"]}


def test_demo_on_the_micro_zoo(micro_demo):
    out = micro_demo["out"]
    assert {p.name for p in out.iterdir()} >= {"report.md", "report.json", "scores.png", "efficiency.png",
                                                "forgetting.png", "merges"}
    rows = _rows(micro_demo)
    names = five_expert_methods()
    assert list(rows) == ["base", *DOMAINS, "multitask", *names, "moe (top-2 of 5)"]
    assert rows["regmean"]["stats_seconds"] > 0 and rows["ties"]["stats_seconds"] is None   # Grams on each domain
    assert all(0 <= v <= 1 for r in rows.values() for v in r["scores"].values() if v is not None)
    for name in [*names, "moe (top-2 of 5)"]:
        r = rows[name]
        assert r["kind"] == ("moe" if name.startswith("moe") else "merge") and r["merge_seconds"] > 0
        ratios = [r["scores"][d] / rows[d]["scores"][d] for d in DOMAINS if rows[d]["scores"][d]]
        assert r["normalised"] == pytest.approx(sum(ratios) / len(ratios))
        base = rows["base"]["general"]
        assert r["forgetting"] == ((base - r["general"]) / base if base else None)
    for name in names:
        assert json.loads((out / "merges" / name / "mbmerge.json").read_text())["method"] == name
    moe = json.loads((out / "moe" / "mbmerge.json").read_text())
    assert moe["kind"] == "moe" and len(moe["experts"]) == len(DOMAINS)
    assert "| localize_stitch | merge |" in (out / "report.md").read_text()
    assert f"report: {out / 'report.md'}" in micro_demo["stdout"]


def test_micro_experts_beat_the_base_so_every_merge_has_an_np(micro_demo):
    """Issue 26: on the micro zoo every expert scored 0 and NP had no value anywhere."""
    rows = _rows(micro_demo)
    for d in DOMAINS:
        assert rows[d]["scores"][d] > rows["base"]["scores"][d], d
    assert all(r["normalised"] is not None for r in rows.values())
    assert "undefined" not in micro_demo["stdout"] + micro_demo["stderr"]
    assert len({round(rows[m]["normalised"], 6) for m in five_expert_methods()}) > 1    # methods differ


def test_the_micro_demo_says_k_of_n_with_an_estimate(micro_demo):
    lines = [ln for ln in micro_demo["stderr"].splitlines() if ln.startswith("mbmerge demo: ")]
    names = ["base", *DOMAINS, "multitask", *five_expert_methods(), "moe (top-2 of 5)"]
    assert len(lines) == len(names)
    for k, (line, name) in enumerate(zip(lines, names), start=1):
        m = re.fullmatch(rf"mbmerge demo: {k} of {len(names)}: {re.escape(name)}(?P<what>: normalised performance \S+| "
                         r"evaluated)(?P<left>; (about \d+(\.\d)? (s|min|h)|under a second) left)?", line)
        assert m, line
        assert (m["left"] is None) == (k == len(names)), line     # an estimate until the last
    rows = _rows(micro_demo)
    for line, name in zip(lines[7:], names[7:]):
        assert f"{name}: normalised performance {rows[name]['normalised']:.3f}" in line


def test_micro_statistics_are_a_handful_of_examples(micro_demo):
    """Each data-aware method's statistics on MICRO's few examples of each expert's domain, cached
    under a key with that count (a full run's 1000 are another folder)."""
    cards = [json.loads(p.read_text()) for p in (micro_demo["cache"] / "stats").glob("*/mbmerge-stats.json")]
    kinds = {c["kind"] for c in cards}
    assert kinds == {"fisher", "gram", "gram_plusplus", "mask"}
    assert len(cards) == 4 * len(DOMAINS)
    assert {(c["data"]["n"], c["data"]["examples"], c["params"]["samples"]) for c in cards} == \
        {(MICRO["samples"], MICRO["samples"], MICRO["samples"])}
    preface = (micro_demo["out"] / "report.md").read_text()
    assert f"Evaluated on {MICRO['limit']} test examples per domain; statistics on {MICRO['samples']} " in preface


def test_every_method_taking_five_experts_is_in_the_demo():
    assert "slerp" not in five_expert_methods()
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "consensus", "localize_stitch"} <= set(five_expert_methods())


def test_demo_tune_adds_tuned_rows_with_merge_and_validation_time(micro_zoo, tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--micro", "--cache", str(micro_zoo.parent.parent), "--out", str(out),
                                      "--methods", "task_arithmetic", "--tune", "--tune-methods", "task_arithmetic",
                                      "--limit", "2", "-q"])
    assert result.exit_code == 0, result.output
    rows = {r["model"]: r for r in json.loads((out / "report.json").read_text())["models"]}
    tuned = rows["task_arithmetic (tuned)"]
    assert tuned["kind"] == "tuned" and tuned["merge_seconds"] > 0 and tuned["validation_seconds"] > 0
    record = json.loads((out / "tuned" / "task_arithmetic" / "tune.json").read_text())
    assert [c["params"]["scale"] for c in record["trials"]] == [0.2, 0.4, 0.6, 0.8, 1.0]   # MergeBench's grid


def test_demo_on_local_ray_reports_what_the_serial_demo_reports(micro_zoo, tmp_path):
    """--ray merges and evaluates each method as a Ray task, and tunes on Ray (here with halving)."""
    reports = {}
    for name, extra in [("serial", []), ("ray", ["--ray"])]:
        out = tmp_path / name
        result = CliRunner().invoke(cli, ["demo", "--micro", "--cache", str(micro_zoo.parent.parent), "--out",
                                          str(out), "--methods", "task_arithmetic,ties", "--tune", "--tune-methods",
                                          "task_arithmetic", "--prune", "halving", "--limit", "3", "-q", *extra])
        assert result.exit_code == 0, result.output
        reports[name] = {r["model"]: r for r in json.loads((out / "report.json").read_text())["models"]}
    assert list(reports["serial"]) == list(reports["ray"])
    for model, row in reports["serial"].items():
        assert reports["ray"][model]["scores"] == row["scores"], model
    record = json.loads((tmp_path / "ray" / "tuned" / "task_arithmetic" / "tune.json").read_text())
    assert record["prune"] == "halving" and len(record["trials"]) == 5


def test_demo_runs_tunes_searches_per_layer_and_for_several_objectives(micro_zoo, tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--micro", "--cache", str(micro_zoo.parent.parent), "--out", str(out), "--methods",
            "task_arithmetic", "--no-moe", "--tune", "--tune-methods", "task_arithmetic,ties", "--sampler", "tpe",
            "--trials", "3", "--per-layer", "2", "--per-expert", "weights", "--grid",
            "density=0.1:0.9 scale=0.2:1.0 weights=0.2:1.0", "--objective", "np,forgetting", "--limit", "2", "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    rows = {r["model"]: r for r in json.loads((out / "report.json").read_text())["models"]}
    label = ("task_arithmetic (tuned: tpe, 3 trials, per expert weights, per layer (2 groups), objectives "
             "np,forgetting)")
    assert rows[label]["kind"] == "tuned"
    folder = out / "tuned" / "task_arithmetic-tpe-l2-e-weights-np,forgetting"
    record = json.loads((folder / "tune.json").read_text())
    assert record["per_layer"] == 2 and record["objectives"] == ["np", "forgetting"] and len(record["trials"]) == 3
    assert "density" not in record["ranges"]          # task arithmetic takes no density: the grid's others
    assert "density" in json.loads((out / "tuned" / "ties-tpe-l2-e-weights-np,forgetting" / "tune.json").read_text()
                                   )["ranges"]
    assert (folder / "mbmerge_config.yml").exists()
    result = CliRunner().invoke(cli, [*args[:-1], "--grid", "denisty=0.1:0.9", "-q"])
    assert result.exit_code != 0 and "--grid/--per-expert denisty: none of the tuned methods" in result.output


def test_demo_methods_take_svc_and_nan_steps_in_rows_of_their_own(micro_zoo, tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--micro", "--cache", str(micro_zoo.parent.parent), "--out", str(out), "--no-moe", "--limit", "2",
            "--methods", "task_arithmetic,task_arithmetic+svc,tsv+svc,ties+nan", "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    rows = [r["model"] for r in json.loads((out / "report.json").read_text())["models"]]
    assert rows[-4:] == ["task_arithmetic", "task_arithmetic + svc", "tsv + svc", "ties + nan"]
    cards = {n: json.loads((out / "merges" / n / "mbmerge.json").read_text())
             for n in ("task_arithmetic+svc", "tsv+svc", "ties+nan")}
    assert "--calibrate svc" in cards["task_arithmetic+svc"]["command"]
    assert cards["tsv+svc"]["params"]["svc_alpha"] == 1.0 and cards["task_arithmetic+svc"]["params"]["svc_alpha"] == 0.1
    assert "--weights-from nan" in cards["ties+nan"]["command"]
    tuned = CliRunner().invoke(cli, [*args[:-2], "task_arithmetic", "--tune", "--tune-methods", "task_arithmetic+svc",
                                     "-q"])
    assert tuned.exit_code == 0, tuned.output
    assert "task_arithmetic + svc (tuned)" in [r["model"] for r in json.loads((out / "report.json").read_text())["models"]]
    card = json.loads((out / "tuned" / "task_arithmetic+svc" / "mbmerge.json").read_text())
    assert "--calibrate svc" in card["command"] and card["params"]["svc_alpha"] == 0.1
    result = CliRunner().invoke(cli, [*args[:-2], "ties+svd", "-q"])
    assert result.exit_code != 0 and "--methods ties+svd: no step 'svd'" in result.output
