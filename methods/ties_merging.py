"""TIES-merging (Yadav et al. 2023, arXiv:2306.01708): trim, elect sign, disjoint merge.

    d_i = x_i - b
    e_i = w_i * trim(d_i, rho_i)           keep the k_i largest |d_i|, k_i = max(1, floor(rho_i n)), exactly:
                                           ties at the k-th broken by position (keep_ties: every tie kept)
    s   = sign(sum_i e_i)                  ('count': sign(sum_i sign(e_i))); a zero sum is +
    m   = sum_i agree_i e_i / sum_i agree_i w_i        agree_i = [sign(e_i) = s, e_i != 0]  ('sum': no division)
    out = b + lam * m

The top k_i is found exactly by radix select (methods/ranking.py), over the tensor (mergekit's scope,
the default) or over the whole model (sparsify_scope='model', the TIES paper and MergeBench); thr
holds it as each chunk's Cut.
"""
import torch

from ._blocks import deltas, disjoint_merge, elect, top_k, trim
from .ranking import Cut, Rank


def ranks(*, density: list[float], n: int) -> list[list[Rank]]:
    """Per expert, the set kept: the top k_i; [] (keep everything) where rho_i = 1."""
    return [[] if rho >= 1 else [Rank(top_k(rho, n))] for rho in density]


def apply(b: torch.Tensor, xs: list[torch.Tensor], *, weights: list[float], scale: float,
          consensus: str, aggregate: str, thr: list[list[Cut]]) -> torch.Tensor:
    es = [trim(d, t).mul_(w) for d, t, w in zip(deltas(b, xs), thr, weights)]
    s = elect(es, consensus)
    m = disjoint_merge(es, weights, s, aggregate)
    return m.mul_(scale).add_(b)
