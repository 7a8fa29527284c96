"""DOGE-TA against a plain reference written here: autograd on the loss as the paper's code writes it
(stacked, lam_i-weighted), the projection as the full [m, m] matrix P = U_k U_k^T from zero-padded
singular vectors, torch's Adam, and the masks by kthvalue over each expert's flattened model; through
the command line on the tiny Llama family; and against FusionBench 0.2.33's own DOGE_TA_Algorithm where
MBMERGE_FUSIONBENCH names a python that has it."""
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from mbmerge.methods import merge_state_dicts, merge_tensors
from conftest import read_model

FUSIONBENCH = os.environ.get("MBMERGE_FUSIONBENCH")


def ref_projection(ds, subspace):
    r, t = min(ds[0].shape), len(ds)
    k = r // t
    u = torch.zeros(ds[0].shape[0], r)
    for i, d in enumerate(ds):
        u[:, i * k:(i + 1) * k] = torch.linalg.svd(d, full_matrices=False).U[:, :k]
    uu = torch.linalg.svd(u, full_matrices=False).U[:, :r // subspace]
    return uu @ uu.T                                                       # [m, m]


def ref_correction(ds, lam, steps, lr, subspace):
    stack, lam = torch.stack(ds), torch.stack(lam).view(-1, 1, 1)         # [T, m, n], [T, 1, 1]
    proj = ref_projection(ds, subspace)
    delta = torch.nn.Parameter(torch.zeros_like(ds[0]))
    adam = torch.optim.Adam([delta], lr=lr)
    for _ in range(steps):
        rest = (stack * lam).sum(0) + (delta.unsqueeze(0) * lam).sum(0)
        loss = sum((d * (d - rest)).sum(1).pow(2).sum() for d in ds)
        adam.zero_grad()
        loss.backward()
        delta.grad -= proj @ delta.grad
        adam.step()
    return delta.detach()


def ref_doge_ta(base, experts, names, *, steps, lr=1e-4, norm_scale=0.07, density=0.3, subspace=6):
    """b + sum_i lam_i (d_i + delta) mask_i on `names` (2-D), masks over those names' deltas; others b."""
    ds = [{k: x[k] - base[k] for k in names} for x in experts]
    masks = []
    for d in ds:
        flat = torch.cat([d[k].flatten() for k in names]).abs()
        kth = flat.kthvalue(flat.numel() - int(flat.numel() * density)).values
        masks.append({k: d[k].abs() >= kth for k in names})
    out = dict(base)
    for k in names:
        lam = [norm_scale / d[k].norm() for d in ds]
        delta = ref_correction([d[k] for d in ds], lam, steps, lr, subspace)
        out[k] = base[k] + sum(((d[k] + delta) * m[k]) * l for d, m, l in zip(ds, masks, lam))
    return out


def _random(shapes, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    return base, [{k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]


@pytest.mark.parametrize("shape,n", [((24, 16), 3), ((12, 30), 2), ((18, 18), 5)])
def test_doge_ta_matches_the_reference_on_one_tensor(shape, n):
    base, experts = _random({"w": shape}, n, seed=sum(shape) + n)
    got = merge_tensors("doge_ta", base["w"], [x["w"] for x in experts], steps=40, sparsify_scope="tensor")
    want = ref_doge_ta(base, experts, ["w"], steps=40)["w"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    no_steps = merge_tensors("doge_ta", base["w"], [x["w"] for x in experts], steps=0, sparsify_scope="tensor")
    assert (got - no_steps).abs().max() > 1e-4          # the correction counts


def test_tensors_that_are_not_matrices_stay_at_the_base():
    b = torch.randn(7)
    assert torch.equal(merge_tensors("doge_ta", b, [b + 1, b - 2], sparsify_scope="tensor"), b)


def test_the_command_line_merge_equals_the_reference_tensor_by_tensor(family, tmp_path, run_main):
    p, t = family["paths"], family["tensors"]
    names = ["math", "code", "ifeval"]
    code, out, err = run_main("--method", "doge_ta", "--base", p["base"], "--experts", ",".join(str(p[e]) for e in names),
                              "--steps", "30", "--out", tmp_path / "m")
    assert code == 0, err
    got = read_model(tmp_path / "m")
    layers = [k for k, v in t["base"].items() if v.dim() == 2 and "embed" not in k and "lm_head" not in k]
    want = ref_doge_ta(t["base"], [t[e] for e in names], layers, steps=30)
    for name, b in t["base"].items():
        if name not in layers:                            # embeddings, head, norms: the base's
            assert torch.equal(got[name], b.bfloat16()), name
        else:   # float32 sums in another order, then one bf16 rounding: at most one bf16 step apart
            torch.testing.assert_close(got[name].float(), want[name], rtol=2 ** -7, atol=1e-6, msg=name)


FB_SCRIPT = """
import sys
from torch import nn
from safetensors.torch import load_file, save_file
from fusion_bench.method.doge_ta.doge_ta import DOGE_TA_Algorithm
folder, n = sys.argv[1], int(sys.argv[2])

def module(path):
    m = nn.Module()
    for k, v in load_file(path).items():
        m.register_parameter(k, nn.Parameter(v))
    return m
pool = {"_pretrained_": module(f"{folder}/base.safetensors"),
        **{f"e{i}": module(f"{folder}/x{i}.safetensors") for i in range(n)}}
merged = DOGE_TA_Algorithm(subspace=6, K=30, lamda=0.07).run(pool)
save_file({k: p.detach().contiguous() for k, p in merged.named_parameters()}, f"{folder}/merged.safetensors")
"""


@pytest.mark.skipif(not FUSIONBENCH, reason="FusionBench not found (set MBMERGE_FUSIONBENCH to its python)")
def test_doge_ta_matches_fusionbench(tmp_path):
    # FusionBench merges the weights of names with "encoder" (not "layer_norm"); 400 steps, its fixed count
    shapes = {"encoder_q_weight": (24, 16), "encoder_layer_norm_weight": (16,), "encoder_up_weight": (40, 16),
              "encoder_up_bias": (40,)}
    base, experts = _random(shapes, 3, seed=3)
    save_file(base, str(tmp_path / "base.safetensors"))
    for i, x in enumerate(experts):
        save_file(x, str(tmp_path / f"x{i}.safetensors"))
    subprocess.run([FUSIONBENCH, "-c", FB_SCRIPT, str(tmp_path), "3"], check=True, capture_output=True,
                   cwd=tmp_path)   # not the repository, whose folders would shadow modules
    theirs = load_file(str(tmp_path / "merged.safetensors"))
    ours = merge_state_dicts("doge_ta", base, experts, keep_base="norm|bias")
    for k in base:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=5e-7, msg=k)
