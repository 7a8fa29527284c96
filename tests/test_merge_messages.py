"""Issue 26, from the user's side: what a merge says about an output that is one of its inputs, an
--override that matches nothing, and experts stored in another float width than the base."""
import pytest
import torch

from conftest import read_model, write_model


def tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_output_that_is_an_expert_is_named_once(family, tmp_path, run_main, monkeypatch):
    p = family["paths"]
    monkeypatch.chdir(tmp_path)
    assert run_main("--method", "linear", "--experts", f"{p['math']},{p['code']}", "--out", "prev", "-q")[0] == 0
    before = tree(tmp_path)
    code, _, err = run_main("--method", "task_arithmetic", "--base", p["base"], "--experts", f"prev,{p['ifeval']}",
                            "--out", "prev", "--overwrite")
    assert code == 2 and err.count("\n") == 1
    assert "output prev is expert prev: the merge would overwrite its own inputs" in err
    assert tree(tmp_path) == before


def test_an_override_that_matches_no_merged_tensor_is_refused(family, tmp_path, run_main):
    p, out = family["paths"], tmp_path / "o"
    code, _, err = run_main("--method", "task_arithmetic", "--base", p["base"], "--experts", f"{p['math']},{p['code']}",
                            "--override", r"\.layers\.7\.", "scale=0", "--out", out)
    assert code == 2 and err.count("\n") == 1
    assert r"--override '\\.layers\\.7\\.' matches none of the" in err and "merged tensors" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("expert_dtype", [torch.float16, torch.float32])
def test_an_expert_in_another_float_width_merges_in_float32_with_a_notice(family, tmp_path, run_main, expert_dtype):
    t = family["tensors"]
    wide = write_model(tmp_path / "math16", t["math"], dtype=expert_dtype)
    out = tmp_path / "o"
    code, _, err = run_main("--method", "task_arithmetic", "--base", family["paths"]["base"],
                            "--experts", f"{wide},{family['paths']['code']}", "--scale", "0.5", "--out", out)
    assert code == 0, err
    notices = [line for line in err.splitlines() if line.startswith("mbmerge: notice:")]
    name = str(expert_dtype).removeprefix("torch.")
    assert notices == [f"mbmerge: notice: expert {str(wide)!r} is stored in {name} where the base is in bfloat16: "
                       f"the merge computes in float32 and writes the base's dtype (--dtype to choose another)"]
    got = read_model(out)
    for n, b in t["base"].items():       # plain torch: the fp16/fp32 expert as stored, float32 maths, bf16 out
        m = t["math"][n].to(expert_dtype).float()
        want = (b + 0.5 * ((m - b) + (t["code"][n] - b))).bfloat16()
        assert got[n].dtype == torch.bfloat16 and got[n].equal(want), n


@pytest.mark.parametrize("flags, backend", [(["--kernels", "torch"], "torch"), (["--no-compile"], "torch"),
                                            ([], "compiled C loops")])
def test_the_card_says_which_kernels_merged_and_on_how_many_threads(family, tmp_path, run_main, flags, backend):
    import json
    from mbmerge.kernels import cpu
    if backend != "torch" and cpu.library() is None:
        pytest.skip("the compiled CPU loops are not built here")
    p, out = family["paths"], tmp_path / "o"
    code, _, err = run_main("--method", "ties", "--base", p["base"], "--experts", f"{p['math']},{p['code']}",
                            "--out", out, *flags)
    assert code == 0, err
    record = json.loads((out / "mbmerge.json").read_text())
    assert record["kernels"]["backend"] == backend and record["kernels"]["threads"] >= 1
    threads = record["kernels"]["threads"]
    assert f"on cpu ({backend}, {threads} thread{'s' * (threads != 1)})." in (out / "README.md").read_text()
