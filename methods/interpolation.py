"""Model Stock and SLERP: interpolations set by whole-tensor (or per-row) angles.

model_stock (Jang et al. 2024, arXiv:2403.19522), N >= 2 experts:
    d_i = x_i - b
    c   = mean_{i<j} clamp(d_i . d_j / max(|d_i| |d_j|, 1e-6), -1, 1)   whole tensor, or per row (filter_wise)
    t   = N c / (1 + (N-1) c)                 t = 0 (keep b) where |1 + (N-1) c| < 1e-6
    out = t * mean_i x_i + (1 - t) * b

slerp (Shoemake 1985), the base b and one expert x as whole-tensor vectors:
    c   = clamp(b . x / (|b| |x|), -1, 1)      a norm <= 1e-8 counts as 1
    out = (1 - t) b + t x                      where |c| > 0.9995
          sin((1-t) theta)/sin(theta) b + sin(t theta)/sin(theta) x,  theta = arccos(c), otherwise
    t = 0 gives b, t = 1 gives x.

Both as mergekit 0.1.5 (merge_methods/model_stock.py, slerp.py), except that dot products and
norms are float64 sums per row or granule (mergekit: float32), so outputs may differ by 1 bf16 ulp.
"""
import math

import torch

from ._blocks import Total, product_sums, row_length


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i, n)]


def _mean_cos(g: dict, n: int) -> torch.Tensor:
    """c = mean_{i<j} clamp(g_ij / max(|d_i||d_j|, 1e-6), -1, 1), from g = {(i, j): sums of d_i d_j}
    (per row, or whole-tensor totals)."""
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cos = [(g[i, j] / (g[i, i].sqrt() * g[j, j].sqrt()).clamp(min=1e-6)).clamp(-1, 1) for i, j in pairs]
    return sum(cos) / len(pairs)


def model_stock_cosine(chunks, *, filter_wise: bool, shape: tuple) -> dict:
    """c over the whole tensor; with filter_wise, apply takes c per row of its chunk instead."""
    if filter_wise:
        return {"cos": None}
    totals, n = {}, 0
    for b, xs, _ in chunks():
        n, pairs = len(xs), _pairs(len(xs))
        for ij, sums in zip(pairs, product_sums(b, xs, pairs, row_length(shape))):
            totals.setdefault(ij, Total()).add_sums(sums)
    if not totals:                    # an empty tensor: apply is not called
        return {"cos": None}
    return {"cos": _mean_cos({ij: torch.tensor(t.value(), dtype=torch.float64) for ij, t in totals.items()}, n)}


def model_stock_t(b, xs: list[torch.Tensor], *, filter_wise: bool, cos, shape: tuple) -> torch.Tensor:
    """t = N c / (1 + (N-1) c) in float32: one per row of the chunk (filter_wise), else [1]."""
    n, pairs = len(xs), _pairs(len(xs))
    if filter_wise:
        cos = _mean_cos(dict(zip(pairs, product_sums(b, xs, pairs, row_length(shape)))), n)   # [rows]
    den = 1 + (n - 1) * cos
    return torch.where(den.abs() < 1e-6, 0.0, n * cos / den).float().view(-1)


def apply_model_stock(b: torch.Tensor, xs: list[torch.Tensor], *, filter_wise: bool, cos, shape: tuple):
    n, row = len(xs), row_length(shape)
    t = model_stock_t(b, xs, filter_wise=filter_wise, cos=cos, shape=shape).view(-1, 1)   # [rows or 1, 1]
    mean = sum(xs) / n
    return (t * mean.view(-1, row) + (1 - t) * b.view(-1, row)).view(-1)   # [rows, row] -> flat


def slerp_coefficients(chunks, *, t: float) -> dict:
    """The coefficients (c_b, c_x) of out = c_b b + c_x x, from |b|^2, |x|^2 and b . x."""
    bb, xx, bx = Total(), Total(), Total()
    for b, (x,), _ in chunks():
        for total, sums in zip((bb, xx, bx), product_sums(None, [b, x], [(0, 0), (1, 1), (0, 1)])):
            total.add_sums(sums)
    nb, nx = math.sqrt(bb.value()), math.sqrt(xx.value())
    c = bx.value() / ((nb if nb > 1e-8 else 1.0) * (nx if nx > 1e-8 else 1.0))
    c = min(1.0, max(-1.0, c))
    if abs(c) > 0.9995:
        return {"coef": (1 - t, t)}
    theta = math.acos(c)
    return {"coef": (math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta))}


def apply_slerp(b: torch.Tensor, xs: list[torch.Tensor], *, coef: tuple) -> torch.Tensor:
    return coef[0] * b + coef[1] * xs[0]
