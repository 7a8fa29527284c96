"""Model Breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795): drop each delta's largest
magnitudes (outliers, a fraction gamma) and its smallest, so that a fraction rho remains; then add
(breadcrumbs) or TIES-merge (breadcrumbs_ties).

    k_i  = max(1, floor(rho_i n))                  entries kept
    t_i  = min(floor(gamma_i n), n - k_i)          outliers dropped (fewer where rho_i + gamma_i > 1)
    e_i  = d_i on the entries ranked t_i + 1 .. t_i + k_i by |d_i| (ties broken by position, so
           exactly k_i are kept), 0 elsewhere; keep_ties: every entry tied at either edge is kept
    breadcrumbs:      b + lam * sum_i w_i e_i      (normalize: / sum_i w_i)
    breadcrumbs_ties: TIES sign election and disjoint merge of w_i e_i, then b + lam * m

n is the tensor's size (or the model's, sparsify_scope='model'); thresholds are exact (radix
select). rho_i = 1 keeps everything (t_i shrinks to 0); gamma_i n < 1 drops no outliers.
vs mergekit 0.1.5: it keeps floor(rho_i n) entries too, but its argsort orders ties arbitrarily, so
which tied entries are kept may differ; rho_i n < 1 keeps none there (here: one); mergekit <= 0.1.4
keeps none when gamma_i n < 1 (an empty slice). mergekit's breadcrumbs_ties defaults to normalize=false, which is
aggregate='sum' here. The sum and the election are the family's (task_vectors.py).
"""
from math import floor

import torch

from ..common.errors import BadParameter
from ._blocks import band, cut_bounds, top_k
from .ranking import Cut, Rank


def ranks(*, density: list[float], gamma: list[float], n: int) -> list[list[Rank]]:
    """Per expert, [the top t_i dropped, the top t_i + k_i kept]; [] keeps all."""
    out = []
    for rho, g in zip(density, gamma):
        if not 0 <= g < 1:
            raise BadParameter(f"breadcrumbs: gamma={g} must be in [0, 1) (the fraction of largest |d| dropped)")
        k = top_k(rho, n)
        t = max(0, min(floor(g * n), n - k))
        out.append([] if t == 0 and k >= n else [Rank(t, drop=True), Rank(t + k)])
    return out


def trim(ds: list[torch.Tensor], *, thr: list[list[Cut]]) -> list[torch.Tensor]:
    """e_i before w_i: d_i on its band, thr_i = [dropped, kept] Cuts ([]: all of d_i)."""
    return [band(d, t) for d, t in zip(ds, thr)]


def fused_trim(b, xs, *, thr: list[list[Cut]]) -> dict:
    """trim as kernels.delta_merge's band."""
    return {"trim": "band", **cut_bounds([t[0] if t else None for t in thr], "hi"),
            **cut_bounds([t[1] if t else None for t in thr], "lo")}
