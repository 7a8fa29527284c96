"""`mbmerge demo` end to end on the micro zoo: merges, evaluation through lm-eval, report files, and
the report's normalised performance and forgetting recomputed here from its own scores."""
import json

from click.testing import CliRunner

from mbmerge.bin.cli import cli
from mbmerge.bin.demo import five_expert_methods
from mbmerge.eval.domains import DOMAINS


def test_demo_on_the_micro_zoo(micro_zoo, tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--micro", "--cache", str(micro_zoo.parent.parent), "--out", str(out),
                                      "--methods", "linear,ties,localize_stitch,regmean", "--limit", "4", "-q"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {"report.md", "report.json", "scores.png", "efficiency.png",
                                                "forgetting.png", "merges"}
    rows = {r["model"]: r for r in json.loads((out / "report.json").read_text())["models"]}
    assert list(rows) == ["base", *DOMAINS, "multitask", "linear", "ties", "localize_stitch", "regmean"]
    assert rows["regmean"]["stats_seconds"] > 0 and rows["ties"]["stats_seconds"] is None   # Grams on each domain
    assert all(0 <= v <= 1 for r in rows.values() for v in r["scores"].values() if v is not None)
    for name in ["linear", "ties", "localize_stitch", "regmean"]:
        r = rows[name]
        assert r["kind"] == "merge" and r["merge_seconds"] > 0
        ratios = [r["scores"][d] / rows[d]["scores"][d] for d in DOMAINS if rows[d]["scores"][d]]
        assert r["normalised"] == (sum(ratios) / len(ratios) if ratios else None)
        base = rows["base"]["general"]
        assert r["forgetting"] == ((base - r["general"]) / base if base else None)
    assert (out / "merges" / "ties" / "mbmerge.json").exists()
    assert "| localize_stitch | merge |" in (out / "report.md").read_text()


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
