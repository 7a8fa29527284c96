"""Methods that merge through per-task binary masks.

consensus (TALL masks + Consensus Merging, Wang et al. 2024, arXiv:2405.07813; MergeBench's "Consensus TA"):
    e_i   = w_i d_i
    tau   = sum_i e_i                      (mtl='ties': the TIES merge of w_i trim(d_i, rho_i))
    m_i   = [|e_i| >= lambda_i |tau - e_i|]   the TALL mask: where task i dominates the others
    keep  = [sum_i m_i >= k]               entries that at least k tasks claim
    out   = b + lam * keep * tau
  Defaults k = 2, lambda_i = 0.2 and lam = 1: what MergeBench's code runs (its --lamda flag is
  ignored there). MergeBench's mask is strict (>); we keep the spec's >=, which differs only where
  |e_i| equals lambda_i |tau - e_i| exactly.

localize_stitch, dataless (He et al. 2024, arXiv:2408.13656):
    m_i   = [d_i among the top k_i |d_i|]  k_i = max(1, floor(sparsity_i n)), n: the whole model's entries;
                                           exactly k_i, ties broken by position (keep_ties: every tie)
    out   = b + sum_i m_i d_i / max(1, sum_j m_j)
  Overlapping entries are averaged, as the paper intends; MergeBench's stitcher mostly sums them
  (a misplaced line), which we do not copy. Embeddings stay at the base (MergeBench); ranking is
  model-wide by default. The trained variant only replaces the masks m_i (see `stitch`).
"""
import torch

from ._blocks import deltas, disjoint_merge, elect, trim
from .ranking import Cut, Rank
from .ties_merging import ranks as trim_ranks


def consensus_ranks(*, mtl: str, density: list[float], n: int) -> list[list[Rank]]:
    """mtl='ties' trims each e_i as TIES does; 'ta' ranks nothing."""
    return trim_ranks(density=density, n=n) if mtl == "ties" else [[] for _ in density]


def localize_ranks(*, sparsity: list[float], n: int) -> list[list[Rank]]:
    """The top k_i of each |d_i|, k_i from the sparsity as TIES's from its density."""
    return trim_ranks(density=sparsity, n=n)


def consensus(b: torch.Tensor, xs: list[torch.Tensor], *, weights: list[float], scale: float, k: int,
              tall_lambda: list[float], mtl: str, consensus: str, aggregate: str,
              thr: list[list[Cut]]) -> torch.Tensor:
    ds = deltas(b, xs)
    if mtl == "ties":   # trimmed as the ranks were taken, on d_i, then weighted
        trimmed = [trim(d, t) * w for d, t, w in zip(ds, thr, weights)]
        tau = disjoint_merge(trimmed, weights, elect(trimmed, consensus), aggregate)
    es = [d.mul_(w) for d, w in zip(ds, weights)]
    if mtl != "ties":
        tau = sum(es[1:], es[0].clone())
    votes = sum((e.abs() >= lam * (tau - e).abs()).to(torch.int8) for e, lam in zip(es, tall_lambda))
    return tau.mul_(votes >= k).mul_(scale).add_(b)


def stitch(b: torch.Tensor, ds: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """b + sum_i m_i d_i / max(1, sum_j m_j), for 0/1 masks m_i of any origin (top-k or trained)."""
    total, count = torch.zeros_like(b), torch.zeros_like(b)
    for d, m in zip(ds, masks):
        total.addcmul_(d, m)
        count += m
    return total.div_(count.clamp_(min=1)).add_(b)


def localize_stitch(b: torch.Tensor, xs: list[torch.Tensor], *, thr: list[list[Cut]]) -> torch.Tensor:
    ds = deltas(b, xs)
    masks = [t[0].mask(d.abs()).float() if t else torch.ones_like(d) for d, t in zip(ds, thr)]
    return stitch(b, ds, masks)
