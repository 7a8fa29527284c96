"""TIES-merging (Yadav et al. 2023, arXiv:2306.01708): trim, elect sign, disjoint merge.

    d_i = x_i - b
    e_i = w_i * trim(d_i, rho_i)           keep |d_i| >= thr_i, thr_i the k-th largest |d_i|, k = max(1, floor(rho_i n))
    s   = sign(sum_i e_i)                  ('count': sign(sum_i sign(e_i))); a zero sum is +
    m   = sum_i agree_i e_i / sum_i agree_i w_i        agree_i = [sign(e_i) = s, e_i != 0]  ('sum': no division)
    out = b + lam * m

Thresholds are per tensor here (mergekit's scope), computed exactly by radix select.
"""
from math import floor

import torch

from .. import kernels
from ._blocks import deltas, disjoint_merge, elect, trim


def stats(chunks, *, density: list[float], numel: int) -> dict:
    """thr_i: the k_i-th largest |d_i| over the whole tensor (chunks() yields (b, xs, offset))."""
    if numel == 0 or all(rho >= 1 for rho in density):
        return {"thr": [0.0] * len(density)}
    ks = [max(1, floor(rho * numel)) for rho in density]
    thr = kernels.kth_largest_abs(lambda: (deltas(b, xs) for b, xs, _ in chunks()), ks)
    return {"thr": [0.0 if rho >= 1 else t for rho, t in zip(density, thr)]}


def apply(b: torch.Tensor, xs: list[torch.Tensor], *, weights: list[float], scale: float,
          consensus: str, aggregate: str, thr: list[float]) -> torch.Tensor:
    es = [trim(d, t).mul_(w) for d, t, w in zip(deltas(b, xs), thr, weights)]
    s = elect(es, consensus)
    m = disjoint_merge(es, weights, s, aggregate)
    return m.mul_(scale).add_(b)
