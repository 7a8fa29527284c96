"""TATR (zero-shot task arithmetic in a trust region) against a plain reference written here: the
conflict sum_{i != j} |d_i||d_j| of every tensor flattened into one vector, sorted, the value at
floor(q n) as the threshold; through the command line and on a hand-worked tensor with ties; and
against FusionBench 0.2.33's own TaskArithmeticWithTrustRegionForCLIP (zero_shot) where
MBMERGE_FUSIONBENCH names a python that has it."""
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from mbmerge.methods import merge_state_dicts, merge_tensors
from conftest import read_model

FUSIONBENCH = os.environ.get("MBMERGE_FUSIONBENCH")


def ref_tatr(base: dict, experts: list[dict], scale: float, q: float) -> dict:
    """b + scale * sum_i d_i [Omega < t], t the sorted Omega of the whole model at floor(q n)."""
    ds = [{k: x[k] - b for k, b in base.items()} for x in experts]
    omega = {k: sum(ds[i][k].abs() * ds[j][k].abs() for i in range(len(ds)) for j in range(len(ds)) if i != j)
             for k in base}
    flat = torch.cat([o.flatten() for o in omega.values()]).sort().values
    t = flat[min(int(flat.numel() * q), flat.numel() - 1)]
    return {k: b + scale * sum(d[k] for d in ds) * (omega[k] < t) for k, b in base.items()}


def test_the_command_line_merge_equals_the_reference_tensor_by_tensor(family, tmp_path, run_main):
    p, t = family["paths"], family["tensors"]
    names = ["math", "code", "ifeval"]
    code, out, err = run_main("--method", "tatr", "--base", p["base"], "--experts", ",".join(str(p[e]) for e in names),
                              "--quantile", "0.9", "--scale", "0.3", "--out", tmp_path / "m")
    assert code == 0, err
    got = read_model(tmp_path / "m")
    want = ref_tatr(t["base"], [t[e] for e in names], 0.3, 0.9)
    for name in t["base"]:
        assert torch.equal(got[name], want[name].bfloat16()), name
    dropped = sum(int(((w - t["base"][k]) == 0).sum()) for k, w in want.items())
    assert dropped >= 0.1 * sum(b.numel() for b in t["base"].values())     # the top 10% of the conflict


def test_ties_at_the_threshold_all_dropped_or_exactly_m_by_position():
    # Omega = 2 |d_1||d_2| = 2 [1, 2, 2, 2, 3, 1, 1, 1, 1, 1]; q 0.8: t is the 2nd largest (2)
    b = torch.zeros(10)
    d1, d2 = torch.ones(10), torch.tensor([1.0, 2, 2, 2, 3, 1, 1, 1, 1, 1])
    keep_all_ties = torch.tensor([1.0, 0, 0, 0, 0, 1, 1, 1, 1, 1])      # FusionBench: Omega < 2 kept
    keep_exactly = torch.tensor([1.0, 0, 1, 1, 0, 1, 1, 1, 1, 1])       # exactly 2 dropped: 3, then the first 2
    for keep_ties, keep in [(True, keep_all_ties), (False, keep_exactly)]:
        got = merge_tensors("tatr", b, [d1, d2], quantile=0.8, scale=0.5, sparsify_scope="tensor", keep_ties=keep_ties)
        assert torch.equal(got, 0.5 * (d1 + d2) * keep), keep_ties


def test_quantile_one_drops_only_the_largest_conflict():
    b = torch.zeros(6)
    xs = [torch.tensor([1.0, -2, 3, 0.5, 1, 1]), torch.tensor([1.0, 1, 1, 1, 4, -1])]
    got = merge_tensors("tatr", b, xs, quantile=1.0, sparsify_scope="tensor")
    assert torch.equal(got, (xs[0] + xs[1]) * torch.tensor([1.0, 1, 1, 1, 0, 1]))     # |1 * 4| the largest


FB_SCRIPT = """
import sys
from torch import nn
from safetensors.torch import load_file, save_file
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.method.trust_region import TaskArithmeticWithTrustRegionForCLIP
folder, n, scale, q = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])

def module(path):
    m = nn.Module()
    for k, v in load_file(path).items():
        m.register_parameter(k, nn.Parameter(v))
    return m
pool = BaseModelPool({"_pretrained_": module(f"{folder}/base.safetensors"),
                      **{f"e{i}": module(f"{folder}/x{i}.safetensors") for i in range(n)}})
merged = TaskArithmeticWithTrustRegionForCLIP(scaling_factor=scale, threshold_quantile=q, max_samples=1,
                                              batch_size=1, zero_shot=True).run(pool)
save_file({k: p.detach().contiguous() for k, p in merged.named_parameters()}, f"{folder}/merged.safetensors")
"""


@pytest.mark.skipif(not FUSIONBENCH, reason="FusionBench not found (set MBMERGE_FUSIONBENCH to its python)")
@pytest.mark.parametrize("q", [0.9, 0.99])
def test_tatr_matches_fusionbench(tmp_path, q):
    g = torch.Generator().manual_seed(3)
    shapes = {"q_weight": (24, 16), "norm_weight": (16,), "up_weight": (40, 16), "bias": (40,)}
    base = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    experts = [{k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    save_file(base, str(tmp_path / "base.safetensors"))
    for i, x in enumerate(experts):
        save_file(x, str(tmp_path / f"x{i}.safetensors"))
    subprocess.run([FUSIONBENCH, "-c", FB_SCRIPT, str(tmp_path), "3", "0.3", str(q)], check=True, capture_output=True,
                   cwd=tmp_path)   # not the repository, whose folders would shadow modules
    theirs = load_file(str(tmp_path / "merged.safetensors"))
    ours = merge_state_dicts("tatr", base, experts, scale=0.3, quantile=q)
    for k in base:
        assert torch.equal(ours[k], theirs[k]), k
    assert sum(int((ours[k] == base[k]).sum()) for k in base) >= (1 - q) * sum(b.numel() for b in base.values())
