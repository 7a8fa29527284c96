"""TIES-merging (Yadav et al. 2023, arXiv:2306.01708): trim, elect sign, disjoint merge.

    d_i = x_i - b
    e_i = w_i * trim(d_i, rho_i)           keep the k_i largest |d_i|, k_i = max(1, floor(rho_i n)), exactly:
                                           ties at the k-th broken by position (keep_ties: every tie kept)
    s   = sign(sum_i e_i)                  ('count': sign(sum_i sign(e_i))); a zero sum is +
    m   = sum_i agree_i e_i / sum_i agree_i w_i        agree_i = [sign(e_i) = s, e_i != 0]  ('sum': no division)
    out = b + lam * m

The top k_i is found exactly by radix select (methods/ranking.py), over the tensor (mergekit's scope,
the default) or over the whole model (sparsify_scope='model', the TIES paper and MergeBench); thr
holds it as each chunk's Cut. The election and the merge are the family's (task_vectors.py).
"""
import torch

from . import _blocks, task_vectors
from .ranking import Cut, Rank


def ranks(*, density: list[float], n: int) -> list[list[Rank]]:
    """Per expert, the set kept: the top k_i; [] (keep everything) where rho_i = 1."""
    return [[] if rho >= 1 else [Rank(_blocks.top_k(rho, n))] for rho in density]


def trim(ds: list[torch.Tensor], *, thr: list[list[Cut]]) -> list[torch.Tensor]:
    """trim(d_i, rho_i): d_i on its top k_i, thr_i's Cut (thr_i = []: all of d_i)."""
    return [_blocks.trim(d, t) for d, t in zip(ds, thr)]


def fused_trim(b, xs, *, thr: list[list[Cut]]) -> dict:
    """trim as kernels.delta_merge's band with no upper bound."""
    return {"trim": "band", **_blocks.cut_bounds([t[0] if t else None for t in thr], "lo")}


def apply(b: torch.Tensor, xs: list[torch.Tensor], *, weights: list[float], scale: float, consensus: str,
          aggregate: str, thr: list[list[Cut]]) -> torch.Tensor:
    """TIES on one chunk, outside the table (the row `ties` runs the same): tests/test_kernels_fused.py."""
    return task_vectors.apply(b, xs, trim=lambda ds: trim(ds, thr=thr), elect="sign", weights=weights, scale=scale,
                              consensus=consensus, aggregate=aggregate)
