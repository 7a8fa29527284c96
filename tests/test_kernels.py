"""Kernels against independent references: radix select against torch.kthvalue (its histograms
from torch.bincount or, with both_impls, the Triton kernel), the Philox uniforms against Triton's
own tl.rand (run by Triton's CPU interpreter), DARE against a plain reference built on those
uniforms. The fused merges are in test_kernels_fused.py."""
import pytest
import torch
import triton
import triton.language as tl

import mbmerge
from mbmerge import kernels
from mbmerge.kernels.dare import expert_seed, uniform_ref
from mbmerge.kernels.select import kth_largest_abs


@triton.jit
def _tl_rand(out_ptr, seed, start, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.rand(seed, start + offs), mask=offs < n)


def tl_rand(seed: int, start: int, n: int) -> torch.Tensor:
    out = torch.empty(n)
    _tl_rand[(triton.cdiv(n, 128),)](out, seed, start, n, BLOCK=128)
    return out


@pytest.mark.parametrize("seed", [0, 1, 123456789012, 2**62 + 12345])
@pytest.mark.parametrize("start", [0, 1000, 2**31 - 5, 2**32 - 7, 2**40 + 3])
def test_philox_reference_is_bit_identical_to_triton(seed, start):
    assert torch.equal(uniform_ref(seed, torch.arange(start, start + 777)), tl_rand(seed, start, 777))


@pytest.mark.parametrize("n", [0, 1, 1023, 1025, 5000])
def test_uniform_backends_agree(both_impls, n):
    assert torch.equal(kernels.uniform(42, 17, n), tl_rand(42, 17, n))


def test_uniform_looks_uniform():
    u = uniform_ref(7, torch.arange(200_000))
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float((u < 0.2).float().mean()) - 0.2) < 0.005


def _kth(v, k):
    return float(v.abs().flatten().kthvalue(v.numel() - k + 1).values)


@pytest.mark.parametrize("n,k", [(1, 1), (10, 1), (10, 10), (1823 * 781, 12345), (1823 * 781, 1823 * 781 - 1)])
def test_kth_largest_matches_kthvalue(n, k):
    v = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 1e-3
    assert kth_largest_abs(lambda: [[v]], [[k]]) == [[_kth(v, k)]]


def test_kth_largest_with_ties_zeros_and_several_series(both_impls):
    ties = torch.tensor([0.5, -0.5, 0.5, 0.25, 0.0, -0.0])
    zeros = torch.zeros(6)
    sub = torch.tensor([1e-40, -3e-41, 2e-45, 0.0, 1.0, -2.0])     # subnormals order by bits too
    got = kth_largest_abs(lambda: [[ties, zeros, sub]], [[2, 4], [3], [4, 1]])
    assert got == [[0.5, 0.25], [0.0], [torch.tensor(3e-41).item(), 2.0]]
    assert got == [[_kth(ties, 2), _kth(ties, 4)], [_kth(zeros, 3)], [_kth(sub, 4), _kth(sub, 1)]]


def test_kth_largest_skips_series_without_ranks(both_impls):
    v = torch.tensor([1.0, -3.0, 2.0])
    assert kth_largest_abs(lambda: [[torch.full((3,), float("nan")), v]], [[], [2]]) == [[], [2.0]]


def test_kth_largest_of_nonfinite_values_is_inf(both_impls):
    v = torch.tensor([float("nan"), float("inf"), 1.0, 2.0])
    assert kth_largest_abs(lambda: [[v, v]], [[1], [3]]) == [[float("inf")], [2.0]]      # NaN > Inf > 2 > 1


def test_kth_largest_is_independent_of_chunking():
    v = torch.randn(100_003, generator=torch.Generator().manual_seed(1))
    w = torch.randn(100_003, generator=torch.Generator().manual_seed(2))
    whole = kth_largest_abs(lambda: [[v, w]], [[17], [50_000, 3]])
    for step in (997, 4096, 33_333):
        pieces = lambda: ([v[i:i + step], w[i:i + step]] for i in range(0, v.numel(), step))  # noqa: E731
        assert kth_largest_abs(pieces, [[17], [50_000, 3]]) == whole
    assert whole == [[_kth(v, 17)], [_kth(w, 50_000), _kth(w, 3)]]


def test_kth_largest_beyond_two_to_the_24():
    v = torch.rand(2**24 + 3, generator=torch.Generator().manual_seed(3))  # torch.quantile refuses this size
    k = 2**22 + 1
    assert kth_largest_abs(lambda: [[v]], [[k]]) == [[_kth(v, k)]]


def ref_dare(b, xs, w, p, seed, key, rescale, lam=1.0, ties=False):
    es = []
    for i, (x, wi, pi) in enumerate(zip(xs, w, p)):
        d = (x - b).flatten()
        keep = tl_rand(expert_seed(seed, key, i), 0, d.numel()) < pi
        kept = d * keep
        g = {"inverse": 1 / pi, "none": 1.0, "l1": float(d.abs().sum() / kept.abs().sum())}[rescale]
        es.append(wi * kept * g)
    e = torch.stack(es)                                                         # [T, n]
    if not ties:
        return b + lam * e.sum(0).view(b.shape)
    s = torch.where(e.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(e) == s) & (e != 0)
    den = (torch.tensor(w).view(-1, 1) * agree).sum(0)
    return b + lam * ((e * agree).sum(0) / torch.where(den == 0, 1.0, den)).view(b.shape)


@pytest.mark.parametrize("rescale", ["inverse", "l1", "none"])
def test_dare_matches_reference(rescale):
    g = torch.Generator().manual_seed(5)
    b = torch.randn(37, 29, generator=g)
    xs = [b + torch.randn(37, 29, generator=g) * 0.1 for _ in range(3)]
    w, p = [1.0, 0.5, 0.8], [0.3, 0.6, 0.9]
    lin = mbmerge.methods.dare_linear(b, xs, weights=w, density=p, rescale=rescale, seed=9, key="layer.w", scale=0.7)
    torch.testing.assert_close(lin, ref_dare(b, xs, w, p, 9, "layer.w", rescale, 0.7), rtol=1e-5, atol=1e-6)
    ties = mbmerge.methods.dare_ties(b, xs, weights=w, density=p, rescale=rescale, seed=9, key="layer.w")
    torch.testing.assert_close(ties, ref_dare(b, xs, w, p, 9, "layer.w", rescale, ties=True), rtol=1e-5, atol=1e-6)


def test_dare_masks_differ_across_tensors_experts_and_seeds():
    b, x = torch.zeros(4000), torch.ones(4000)
    out = lambda **kw: mbmerge.methods.dare_linear(b, [x], density=0.5, rescale="none", **kw)  # noqa: E731
    a = out(key="a", seed=0)
    assert abs(float(a.mean()) - 0.5) < 0.03
    assert not torch.equal(a, out(key="b", seed=0)) and not torch.equal(a, out(key="a", seed=1))
    assert torch.equal(a, out(key="a", seed=0))


def test_compiled_cpu_uniforms_equal_the_reference_bit_for_bit():
    """The C loops' Philox draws the reference's bits for any seed, start (here across 2^32, the
    counter's second word) and length (pieces and vectors cut at the end), on one thread or several."""
    from mbmerge.kernels import cpu
    for seed, start, n in [(expert_seed(3, "a.weight", 1), (1 << 32) - 70_000, 2 * cpu.PIECE + 5),
                           ((1 << 62) + 12345, 17, 13), (5, 0, 0)]:
        got = mbmerge.kernels.uniform(seed, start, n)
        assert torch.equal(got.view(torch.int32), uniform_ref(seed, torch.arange(start, start + n)).view(torch.int32))
