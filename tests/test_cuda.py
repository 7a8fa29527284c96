"""The CUDA path, where a GPU is present (skipped elsewhere): the compiled Triton kernels against
the CPU torch references, and whole merges on the device against the same merges on the CPU.

Triton decides at import whether kernels are interpreted, and conftest asks for the interpreter,
so this module runs in its own process:  TRITON_INTERPRET=0 python -m pytest tests/test_cuda.py
"""
import json
import os

import pytest
import torch

import mbmerge
from mbmerge import kernels, methods
from mbmerge.kernels.dare import uniform_ref
from conftest import read_model

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                 reason="run alone with TRITON_INTERPRET=0 (compiled kernels)")]


@pytest.fixture(autouse=True)
def _triton_backend():
    with kernels.using("triton"):
        yield


def _ulps(got: torch.Tensor, ref: torch.Tensor) -> int:
    """Largest distance in units of the last place of got's dtype (1 ulp = one step of the bits)."""
    kind = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[got.dtype]
    a, b = got.cpu().view(kind).long(), ref.to(got.dtype).cpu().view(kind).long()
    # two's-complement bits to a monotone integer line, so -0 and +0 are 0 ulps apart
    top = 1 << (8 * got.element_size() - 1)
    a, b = torch.where(a < 0, -(a + top), a), torch.where(b < 0, -(b + top), b)
    return int((a - b).abs().max()) if a.numel() else 0


def test_uniforms_equal_the_cpu_generator_bit_for_bit():
    seed, start, n = 0x1234_5678_9ABC, (1 << 33) - 100, 100_003
    got = kernels.uniform(seed, start, n, "cuda").cpu()
    ref = uniform_ref(seed, torch.arange(start, start + n, dtype=torch.int64))
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("n", [1, 4097, (1 << 24) + 3])
def test_thresholds_equal_the_cpu_ones(n):
    g = torch.Generator().manual_seed(n)
    v = (torch.randn(n, generator=g) * 1e-3).to(torch.bfloat16).float()   # many ties
    ks = [[1, max(1, n // 5), n]]
    cpu = kernels.kth_largest_abs(lambda: [[v]], ks)
    gpu = kernels.kth_largest_abs(lambda: [[v.cuda()]], ks)
    assert cpu == gpu


CASES = [("task_arithmetic", dict(weights=[1.0, 0.5, 0.7], scale=0.8)),
         ("linear", dict(weights=[0.5, 0.3, 0.2])),
         ("ties", dict(density=[0.2, 0.5, 0.3], weights=[1.0, 0.0, 1.2])),
         ("ties", dict(density=0.3, consensus="count", aggregate="sum")),
         ("breadcrumbs_ties", dict(density=0.3, gamma=0.05)),
         ("dare_ties", dict(density=0.4, seed=3)),
         ("dare_linear", dict(density=0.4, seed=5, rescale="l1")),
         ("localize_stitch", dict(sparsity=0.2)),
         ("consensus", dict())]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name,params", CASES)
def test_fused_kernels_match_the_torch_methods(name, params, dtype):
    g = torch.Generator().manual_seed(0)
    n = 3 * 1024 * 1024 + 5
    b = (torch.randn(n, generator=g) * 0.02).to(dtype)
    xs = [(b.float() + torch.randn(n, generator=g) * 1e-3).to(dtype) for _ in range(3)]
    ref = methods.merge_tensors(name, b, xs, key="t", **params)           # CPU: the torch reference
    got = methods.merge_tensors(name, b.cuda(), [x.cuda() for x in xs], key="t", **params)
    assert got.device.type == "cuda" and got.dtype == dtype
    assert _ulps(got, ref) <= 1


@pytest.mark.parametrize("method", sorted(methods.REGISTRY))
def test_merges_on_the_gpu_equal_merges_on_the_cpu(wide_family, tmp_path, method):
    p = wide_family["paths"]
    names = ["e0", "e1", "e2"][:methods.get(method).max_experts or 3]
    st = methods.get(method).data_statistic
    stats = [str(wide_family["stats"][st.kind][e][0]) for e in names] if st else None

    def merge(device):
        return mbmerge.merge(method, base=str(p["base"]), experts=[str(p[e]) for e in names], out=tmp_path / device,
                             progress=False, memory_budget="100KB", device=device, stats_folders=stats)
    cpu, gpu = read_model(merge("cpu")), read_model(merge("cuda"))
    assert cpu.keys() == gpu.keys()
    for k in cpu:
        if methods.get(method).span == "tensor":   # SVDs: LAPACK and cuSOLVER round differently
            torch.testing.assert_close(gpu[k].float(), cpu[k].float(), rtol=2e-2, atol=1e-4, msg=k)
        else:
            assert _ulps(gpu[k], cpu[k]) <= 1, k
    card = json.loads((tmp_path / "cuda" / "mbmerge.json").read_text())
    assert card["device"].startswith("cuda") and card["peak_gpu_bytes"] > 0


@pytest.mark.parametrize("kind", ["fisher", "gram", "mask"])
def test_statistics_collected_on_the_gpu_equal_those_collected_on_the_cpu(micro_zoo, tmp_path, kind):
    """The collectors on CUDA (float32, so only summation order differs) against the CPU."""
    from safetensors.torch import load_file
    from mbmerge.stats.collect import CollectOptions, collect

    def run(device):
        out = collect(kind, micro_zoo / "math", "math", tmp_path / device, base=micro_zoo / "base",
                      params={"samples": 16, "lr": 1e6},
                      options=CollectOptions(device=device, dtype="float32", progress=False))
        card = json.loads((out / "mbmerge-stats.json").read_text())
        return {k: v for f in sorted(out.glob("stats-*.safetensors")) for k, v in load_file(str(f)).items()}, card
    (cpu, _), (gpu, card) = run("cpu"), run("cuda")
    assert card["peak_gpu_bytes"] > 0 and cpu.keys() == gpu.keys()
    for k in cpu:
        if kind == "mask":  # a logit within rounding of 0 may flip
            assert (cpu[k] != gpu[k]).float().mean() < 1e-3, k
        else:
            torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-3, atol=1e-9, msg=k)
