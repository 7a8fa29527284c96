"""Each method against a plain reference written here (torch.stack, a stable sort, explicit masks),
on hand-worked examples and on random tensors, through the library API on plain tensors."""
from math import floor

import pytest
import torch

import mbmerge
from mbmerge.common.errors import BadParameter

# --- plain references -------------------------------------------------------------------------


def ref_trim(d, rho):
    """d on its k largest |d|: a stable sort by (-|d|, index), the first k kept."""
    n = d.numel()
    k = max(1, floor(rho * n))
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.sort(-d.abs().flatten(), stable=True).indices[:k]] = True
    return d * keep.view(d.shape)


def ref_ties(b, xs, w, rho, lam=1.0, consensus="sum", aggregate="mean"):
    e = torch.stack([wi * ref_trim(x - b, r) for x, wi, r in zip(xs, w, rho)])   # [T, ...]
    votes = e if consensus == "sum" else torch.sign(e)
    s = torch.where(votes.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(e) == s) & (e != 0)
    m = (e * agree).sum(0)
    if aggregate == "mean":
        den = (torch.tensor(w).view(-1, *[1] * b.dim()) * agree).sum(0)
        m = m / torch.where(den == 0, 1.0, den)
    return b + lam * m


def ref_task_arithmetic(b, xs, w, lam=1.0, normalize=False):
    tau = sum(wi * (x - b) for x, wi in zip(xs, w))
    return b + lam * (tau / sum(w) if normalize else tau)


def ref_linear(xs, w, normalize=True):
    out = sum(wi * x for x, wi in zip(xs, w))
    return out / sum(w) if normalize else out


# --- hand-worked examples (TIES paper, Fig. 2 style) -------------------------------------------

B5 = torch.zeros(5)
X1 = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
X2 = torch.tensor([-0.5, -1.0, 2.0, 0.25, -4.0])


def test_ties_by_hand():
    # rho = 0.6 -> k = 3: x1 keeps [1, -2, ., ., 3] (thr 1), x2 keeps [., -1, 2, ., -4] (thr 1);
    # elected signs by mass [+, -, +, +, -]; element 4: x1's +3 disagrees, x2's -4 stays alone
    out = mbmerge.methods.ties(B5, [X1, X2], density=0.6)
    assert out.tolist() == [1.0, -1.5, 2.0, 0.0, -4.0]
    out = mbmerge.methods.ties(B5, [X1, X2], density=0.6, aggregate="sum", scale=0.5)
    assert out.tolist() == [0.5, -1.5, 1.0, 0.0, -2.0]


def test_ties_count_consensus_by_hand():
    # by vote, element 4 is a tie (+1 - 1 = 0), which counts as positive: x1's +3 wins
    out = mbmerge.methods.ties(B5, [X1, X2], density=0.6, consensus="count")
    assert out.tolist() == [1.0, -1.5, 2.0, 0.0, 3.0]


def test_trim_keeps_exactly_k_ties_by_position_or_every_tie():
    d = torch.tensor([1.0, -1.0, 1.0, 0.5])
    out = mbmerge.methods.ties(torch.zeros(4), [d], density=0.25)      # k = 1, and three tie: the first
    assert out.tolist() == [1.0, 0.0, 0.0, 0.0]
    out = mbmerge.methods.ties(torch.zeros(4), [d], density=0.5)       # k = 2: the first two
    assert out.tolist() == [1.0, -1.0, 0.0, 0.0]
    out = mbmerge.methods.ties(torch.zeros(4), [d], density=0.25, keep_ties=True)     # kthvalue, then >=
    assert out.tolist() == [1.0, -1.0, 1.0, 0.0]


def test_task_arithmetic_and_linear_by_hand():
    b = torch.tensor([1.0, 2.0])
    xs = [torch.tensor([2.0, 2.0]), torch.tensor([1.0, 4.0])]
    ta = mbmerge.methods.task_arithmetic(b, xs, weights=[0.5, 0.25], scale=2.0)
    assert ta.tolist() == [2.0, 3.0]                                   # b + 2 (0.5 d1 + 0.25 d2)
    assert mbmerge.methods.linear(None, xs, weights=[3.0, 1.0]).tolist() == [1.75, 2.5]


def test_passthrough_by_hand():
    x = torch.tensor([2.0, -3.0, 0.5])
    assert mbmerge.methods.passthrough(None, [x]).tolist() == [2.0, -3.0, 0.5]
    assert mbmerge.methods.passthrough(None, [x], scale=0.5).tolist() == [1.0, -1.5, 0.25]
    with pytest.raises(mbmerge.MbmergeError, match="passthrough"):
        mbmerge.methods.passthrough(None, [x, x])


def test_dare_density_one_is_task_arithmetic():
    g = torch.Generator().manual_seed(0)
    b, xs = torch.randn(300, generator=g), [torch.randn(300, generator=g) for _ in range(3)]
    for rescale in ("inverse", "l1", "none"):
        out = mbmerge.methods.dare_linear(b, xs, density=1.0, rescale=rescale, key="t")
        torch.testing.assert_close(out, ref_task_arithmetic(b, xs, [1, 1, 1]), rtol=0, atol=1e-6)


# --- random tensors against the references -----------------------------------------------------


def _random(shape, n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g) * 0.05
    xs = [b + torch.randn(shape, generator=g) * 1e-3
          + (torch.rand(shape, generator=g) < 0.1) * torch.randn(shape, generator=g) * 2e-2 for _ in range(n)]
    return b.to(dtype), [x.to(dtype) for x in xs]


@pytest.mark.parametrize("shape", [(1,), (7,), (64, 33), (3, 5, 17)])
@pytest.mark.parametrize("consensus,aggregate", [("sum", "mean"), ("count", "sum")])
def test_ties_matches_reference(shape, consensus, aggregate):
    b, xs = _random(shape, 3)
    w, rho = [0.7, 0.2, 1.1], [0.2, 0.5, 0.9]
    out = mbmerge.methods.ties(b, xs, weights=w, density=rho, scale=0.8, consensus=consensus,
                               aggregate=aggregate)
    ref = ref_ties(b, xs, w, rho, 0.8, consensus, aggregate)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)       # float32 summation order only


def test_ties_output_keeps_bf16_dtype_and_matches_float32_reference():
    b, xs = _random((40, 24), 2, dtype=torch.bfloat16)
    out = mbmerge.methods.ties(b, xs, density=0.3)
    assert out.dtype == torch.bfloat16
    ref = ref_ties(b.float(), [x.float() for x in xs], [1, 1], [0.3, 0.3]).to(torch.bfloat16)
    assert torch.equal(out, ref)


def test_task_arithmetic_and_linear_match_reference():
    b, xs = _random((50, 20), 3)
    w = [0.5, 1.5, -0.25]
    out = mbmerge.methods.task_arithmetic(b, xs, weights=w, scale=0.3, normalize=True)
    torch.testing.assert_close(out, ref_task_arithmetic(b, xs, w, 0.3, True), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mbmerge.methods.linear(b, xs, weights=w), ref_linear(xs, w), rtol=1e-6, atol=1e-7)


def test_unknown_method_and_parameters_are_refused():
    b, xs = _random((4,), 2)
    with pytest.raises(BadParameter, match="unknown method 'tie'"):
        mbmerge.methods.merge_tensors("tie", b, xs)
    with pytest.raises(BadParameter, match="no parameter 'density'"):
        mbmerge.methods.linear(b, xs, density=0.5)
    with pytest.raises(BadParameter, match=r"density=1.5 must be in \(0, 1\]"):
        mbmerge.methods.ties(b, xs, density=1.5)
    with pytest.raises(BadParameter, match="3 values for 2 experts"):
        mbmerge.methods.ties(b, xs, weights=[1, 1, 1])
