"""SCE (Wan et al. 2024, FuseChat 2.0, arXiv:2408.07990): select, calculate, erase.

    d_i    = x_i - b
    select:    v = (1/N) sum_i (d_i - mean_j d_j)^2, the experts' variance per element (float64, as
               torch.var takes it); keep the k = floor(tau nnz(v)) largest v (tau nnz in float32, as
               mergekit), tau = select_topk (>= 1: keep all): d_i <- d_i [v kept]; exactly k, ties at the
               k-th broken by position
    calculate: w_i = mean(d_i^2) / sum_j mean(d_j^2)        1/N where that sum is < 1e-6 (mergekit's rule)
    erase:     s = sign(sum_i d_i), a zero sum is +;  a_i = [sign(d_i) = s]
    out    = b + sum_i w_i a_i d_i / max(sum_i w_i a_i, 1e-6)

The variance threshold (radix select) and the mean squares (float64 sums) are whole-tensor statistics
taken by a reduce pass, so apply is element-wise. As mergekit 0.1.5 (merge_methods/sce.py), except that
its top-k keeps an arbitrary choice among tied variances and its sums are float32.
"""
import math

import torch

from ._blocks import Total, deltas, elect
from .ranking import Cut, top_set


def variance(ds: list[torch.Tensor]) -> torch.Tensor:
    """v = (1/N) sum_i (d_i - mean_j d_j)^2 per element, by Welford's update in float64 (torch.var's bits)."""
    mean = torch.zeros_like(ds[0], dtype=torch.float64)
    m2 = torch.zeros_like(mean)
    for n, d in enumerate(ds, 1):
        delta = d.double() - mean
        mean += delta / n
        m2 += delta * (d.double() - mean)
    return (m2 / len(ds)).float()


def select(ds: list[torch.Tensor], cut: Cut, offset: int) -> list[torch.Tensor]:
    """d_i [v kept]: the entries of the selected variances (Cut's pos is a flat index over the tensor)."""
    keep = Cut(cut.t, cut.pos - offset).mask(variance(ds))
    return [d * keep for d in ds]


def sce_statistics(chunks, *, select_topk: float, shape: tuple) -> dict:
    """The variance Cut (the k largest v) and the weights w_i, over the whole tensor."""
    n = math.prod(shape)
    cut = Cut(-1.0, 0)                                        # every v >= 0 is kept
    if select_topk < 1:
        nnz = sum(int(variance(deltas(b, xs)).count_nonzero()) for b, xs, _ in chunks())
        k = max(0, int(torch.tensor(nnz) * select_topk))      # a float32 product, as mergekit takes it
        cut = top_set(lambda: ((variance(deltas(b, xs)), a) for b, xs, a in chunks()), k, n)
    squares = None
    for b, xs, a in chunks():
        if squares is None:
            squares = [Total() for _ in xs]
        for total, d in zip(squares, select(deltas(b, xs), cut, a)):
            total.add(d * d)
    if squares is None:                                       # an empty tensor: apply is not called
        return {"cut": cut, "w": []}
    ms = [s.value() / n for s in squares]
    w = [1 / len(ms)] * len(ms) if abs(sum(ms)) < 1e-6 else [m / sum(ms) for m in ms]
    return {"cut": cut, "w": w}


def apply(b: torch.Tensor, xs: list[torch.Tensor], *, cut: Cut, w: list[float], offset: int) -> torch.Tensor:
    ds = select(deltas(b, xs), cut, offset)
    s = elect(ds, "sum")
    wa = [(d * s).sign_().relu_().mul_(wi) for d, wi in zip(ds, w)]     # w_i a_i; a_i = 0 where d_i = 0
    num = sum(d * c for d, c in zip(ds, wa))
    return b + num / sum(wa).clamp_(min=1e-6)
