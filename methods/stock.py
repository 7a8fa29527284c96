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

from ._blocks import CHUNK_ALIGN, deltas, granule_sums, row_length


def _products(ds: list[torch.Tensor], size: int) -> dict:
    """{(i, j): float64 sums of d_i d_j per `size`-element granule}, i <= j."""
    n = len(ds)
    return {(i, j): granule_sums(ds[i] * ds[j], size) for i in range(n) for j in range(i, n)}


def _total(parts: list[torch.Tensor]) -> torch.Tensor:
    """The float64 sum of per-chunk granule sums (0 for a tensor without chunks)."""
    return torch.cat(parts).sum() if parts else torch.zeros((), dtype=torch.float64)


def _mean_cos(g: dict, n: int) -> torch.Tensor:
    """c = mean_{i<j} clamp(g_ij / max(|d_i||d_j|, 1e-6), -1, 1), from g = _products (per row or totals)."""
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cos = [(g[i, j] / (g[i, i].sqrt() * g[j, j].sqrt()).clamp(min=1e-6)).clamp(-1, 1) for i, j in pairs]
    return sum(cos) / len(pairs)


def stats_model_stock(chunks, *, filter_wise: bool, shape: tuple) -> dict:
    """c over the whole tensor; with filter_wise, apply takes c per row of its chunk instead."""
    if filter_wise:
        return {"cos": None}
    parts = {}
    for b, xs, _ in chunks():
        for ij, s in _products(deltas(b, xs), row_length(shape)).items():
            parts.setdefault(ij, []).append(s)
    if not parts:                     # an empty tensor: apply is not called
        return {"cos": None}
    n = max(j for _, j in parts) + 1
    return {"cos": _mean_cos({ij: _total(p) for ij, p in parts.items()}, n)}


def apply_model_stock(b: torch.Tensor, xs: list[torch.Tensor], *, filter_wise: bool, cos, shape: tuple):
    n, row = len(xs), row_length(shape)
    if filter_wise:
        cos = _mean_cos(_products(deltas(b, xs), row), n)                 # [rows]
    den = 1 + (n - 1) * cos
    t = torch.where(den.abs() < 1e-6, 0.0, n * cos / den).float().view(-1, 1)  # [rows or 1, 1]
    mean = sum(xs) / n
    return (t * mean.view(-1, row) + (1 - t) * b.view(-1, row)).view(-1)   # [rows, row] -> flat


def stats_slerp(chunks, *, t: float) -> dict:
    """The coefficients (c_b, c_x) of out = c_b b + c_x x, from |b|^2, |x|^2 and b . x."""
    bb, xx, bx = [], [], []
    for b, (x,), _ in chunks():
        bb.append(granule_sums(b * b, CHUNK_ALIGN))
        xx.append(granule_sums(x * x, CHUNK_ALIGN))
        bx.append(granule_sums(b * x, CHUNK_ALIGN))
    nb, nx = (math.sqrt(float(_total(p))) for p in (bb, xx))
    c = float(_total(bx)) / ((nb if nb > 1e-8 else 1.0) * (nx if nx > 1e-8 else 1.0))
    c = min(1.0, max(-1.0, c))
    if abs(c) > 0.9995:
        return {"coef": (1 - t, t)}
    theta = math.acos(c)
    return {"coef": (math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta))}


def apply_slerp(b: torch.Tensor, xs: list[torch.Tensor], *, coef: tuple) -> torch.Tensor:
    return coef[0] * b + coef[1] * xs[0]
