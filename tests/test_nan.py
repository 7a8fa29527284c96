"""`--weights-from nan` (NAN, arXiv:2505.16148): w_i = (1/||x_i||) / sum_j (1/||x_j||) over the merged
tensors, against plain float64 norms and task arithmetic written here; with the family's other members,
chunk invariance, transformers, and bad input."""
import json
import re

import pytest
import torch

import mbmerge
from mbmerge.methods import merge_tensors
from conftest import read_model

EXPERTS = ["math", "code", "ifeval"]


def ref_nan_weights(t: dict, experts: list[str], keep: str | None = None) -> tuple[list[float], list[float]]:
    """The experts' norms over the merged tensors (float64) and the normalised inverse norms."""
    norms = [torch.cat([v.double().flatten() for n, v in t[e].items() if not (keep and re.search(keep, n))]).norm().item()
             for e in experts]
    inverse = [1 / n for n in norms]
    return norms, [v / sum(inverse) for v in inverse]


def _bf16_close(got, want, name):
    """Equal up to one bf16 rounding step (the engine sums in float32, the reference in float64)."""
    assert ((got.float() - want.float()).abs() <= want.abs() * 2 ** -7 + 1e-8).all(), name


@pytest.mark.parametrize("keep", [None, "embed_tokens|lm_head"])
def test_cli_task_arithmetic_with_nan_weights_equals_the_reference(family, tmp_path, run_main, keep):
    p, t = family["paths"], family["tensors"]
    out = tmp_path / "m"
    code, stdout, err = run_main("merge", "-m", "task_arithmetic", "-b", p["base"], "-e",
                                 ",".join(str(p[e]) for e in EXPERTS), "--weights-from", "nan", "--scale", "0.8",
                                 *(["--keep-base", keep] if keep else []), "-o", out)
    assert code == 0, err
    assert "merged model written" in stdout
    norms, w = ref_nan_weights(t, EXPERTS, keep)
    record = json.loads((out / "mbmerge.json").read_text())
    assert record["weights_from"] == "nan"
    assert record["expert_norms"] == pytest.approx(norms, rel=1e-12)
    assert record["params"]["weights"] == pytest.approx(w, rel=1e-12) and sum(record["params"]["weights"]) == \
        pytest.approx(1.0)
    assert "--weights-from nan" in record["command"] and "--weights " not in record["command"]
    got = read_model(out)
    for name, b in t["base"].items():
        kept = keep and re.search(keep, name)
        want = b if kept else b + 0.8 * sum(wi * (t[e][name] - b) for wi, e in zip(w, EXPERTS))
        _bf16_close(got[name], want, name)


def test_ties_with_nan_weights_and_transformers_loads_it(family, tmp_path):
    from transformers import AutoModelForCausalLM
    p, t = family["paths"], family["tensors"]
    out = mbmerge.merge("dare_ties", base=str(p["base"]), experts=[str(p[e]) for e in EXPERTS], out=tmp_path / "m",
                        progress=False, weights_from="nan", density=0.5)
    _, w = ref_nan_weights(t, EXPERTS)
    got = read_model(out)
    for name, b in t["base"].items():
        want = merge_tensors("dare_ties", b, [t[e][name] for e in EXPERTS], key=name, weights=w, density=0.5)
        _bf16_close(got[name], want, name)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 3]])).logits).all()


def test_norms_and_bytes_do_not_depend_on_the_memory_budget(wide_family, tmp_path):
    p = wide_family["paths"]
    runs, norms = {}, {}
    for budget in ("2GB", "100KB"):                                   # 100KB: 4096-element chunks
        out = mbmerge.merge("ties", base=str(p["base"]), experts=[str(p[e]) for e in ("e0", "e1", "e2")],
                            out=tmp_path / budget, progress=False, weights_from="nan", memory_budget=budget)
        runs[budget] = {f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))}
        norms[budget] = json.loads((out / "mbmerge.json").read_text())["expert_norms"]
    assert norms["2GB"] == norms["100KB"]
    assert norms["2GB"] == pytest.approx(ref_nan_weights(wide_family["tensors"], ["e0", "e1", "e2"])[0], rel=1e-12)
    assert runs["2GB"] == runs["100KB"]


@pytest.mark.parametrize("args,message", [
    (["-m", "task_arithmetic", "--weights-from", "nan", "--weights", "1,2"], "do not also pass --weights"),
    (["-m", "magmax", "--weights-from", "nan"], "method magmax takes no per-expert weights"),
    (["-m", "ties", "--weights-from", "norm"], "'norm' is not 'nan'"),
])
def test_bad_weights_from_is_one_line_and_writes_nothing(family, tmp_path, run_main, args, message):
    p = family["paths"]
    code, _, err = run_main("merge", *args, "-b", p["base"], "-e", f"{p['math']},{p['code']}", "-o", tmp_path / "m")
    assert code != 0 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m").exists()
