"""Arcee Fusion (mergekit; arcee.ai): the base b and one expert x, the expert's changes kept where they
matter most, by an outlier threshold on their importance.

    d    = x - b
    KL_r = sum_j p_rj log(p_rj / q_rj),   p = softmax(x_r) + 1e-8,  q = softmax(b_r) + 1e-8   per row r
    I    = |d| KL_r                                               (the row's divergence times each |d|)
    thr  = Q2(I) + 1.5 (Q3(I) - Q1(I))                            Q: quartiles over the whole tensor
    out  = b + d [I >= thr]

Quartiles as mergekit takes them, the element of the ascending order at floor(q (n - 1)) (q (n - 1) in
float32), exact at any size: radix select on |I| of the negatives and of the rest (rounding can leave
KL slightly below 0). mergekit estimates them from a random sample of 1M elements in larger tensors,
so parity holds up to that size. Rows are whole in every chunk (a row's softmax needs all of it).
"""
import math

import torch
import torch.nn.functional as F

from .. import kernels

QUARTILES = (0.25, 0.5, 0.75)


def importance(b: torch.Tensor, x: torch.Tensor, shape: tuple) -> torch.Tensor:
    """I per element of a chunk of whole rows (flat), in mergekit's order of operations."""
    width = shape[-1] if shape else 1
    xr, br = x.view(-1, width), b.view(-1, width)
    p, q = F.softmax(xr, dim=-1) + 1e-8, F.softmax(br, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return ((xr - br).abs() * kl).view(-1)


def threshold(chunks, *, shape: tuple) -> dict:
    """thr = Q2 + 1.5 (Q3 - Q1) of I over the whole tensor (float32 arithmetic, as mergekit)."""
    n = math.prod(shape)
    if n == 0:
        return {"thr": 0.0}
    imp = lambda: ((importance(b, xs[0], shape), a) for b, xs, a in chunks())   # noqa: E731
    negative = sum(int((v < 0).sum()) for v, _ in imp())
    ranks = [int(torch.tensor(q, dtype=torch.float32) * (n - 1)) for q in QUARTILES]   # ascending, from 0
    below = [negative - k for k in ranks if k < negative]           # the r-th largest |I| of the negatives
    above = [n - k for k in ranks if k >= negative]                 # the r-th largest of the rest
    found = kernels.kth_largest_abs_ranked(
        lambda: ((None, [v.clamp(max=0), v.clamp(min=0)]) for v, _ in imp()), [below, above])
    values = iter([-k.value for k in found[0]] + [k.value for k in found[1]])
    q1, q2, q3 = (torch.tensor(next(values), dtype=torch.float32) for _ in QUARTILES)
    return {"thr": float(q2 + 1.5 * (q3 - q1))}


def apply(b: torch.Tensor, xs: list[torch.Tensor], *, thr: float, shape: tuple) -> torch.Tensor:
    (x,) = xs
    keep = (importance(b, x, shape) >= thr).float()
    return b + (x - b) * keep
