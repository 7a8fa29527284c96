"""`mbmerge bench-kernels` runs both paths (the torch methods, and the fused kernels in Triton's
interpreter) and reports what it moved."""
import json


def test_bench_kernels_reports_every_case(tmp_path, run_main, both_impls):
    out = tmp_path / "k.json"
    code, stdout, err = run_main("bench-kernels", "--elements", 5000, "--experts", 2, "--repeat", 1,
                                 "--device", "cpu", "--json", out)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["path"] == ("triton (fused)" if both_impls == "triton" else "torch")
    cases = [r["case"] for r in report["rows"]]
    assert cases[:-1] == ["task_arithmetic", "ties", "breadcrumbs_ties", "dare_ties", "localize_stitch", "consensus"]
    assert all(r["seconds"] > 0 and r["GBps"] > 0 for r in report["rows"])
    assert "| ties |" in stdout
