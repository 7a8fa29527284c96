"""DARE (Yu et al. 2024, arXiv:2311.03099): drop each delta entry at random, rescale, then add
(dare_linear) or TIES-merge (dare_ties).

    keep_i = [u_i(j) < p_i]      u from Philox keyed by (seed, tensor name, expert i), j = element index
    e_i    = g_i * keep_i * d_i  g_i = 1/p_i ('inverse', paper, MergeBench),
                                 ||d_i||_1 / ||keep_i d_i||_1 per tensor ('l1', mergekit; 1 if a norm < 1e-7), or 1 ('none')
    dare_linear: b + lam * sum_i w_i e_i          (normalize: / sum_i w_i)
    dare_ties:   the TIES sign election and disjoint merge on w_i e_i, then b + lam * m

p_i is the density (mergekit's name); MergeBench's drop rate p is 1 - density.
"""
import torch

from .. import kernels
from ..kernels.dare import expert_seed
from ._blocks import KeepBits, deltas, disjoint_merge, elect, float_deltas, granule_sums, l1_gains, weighted_sum
from .contract import CHUNK_ALIGN


def _kept(d: torch.Tensor, i: int, p: float, seed: int, key: str, offset: int) -> torch.Tensor:
    if p >= 1:
        return d
    u = kernels.uniform(expert_seed(seed, key, i), offset, d.numel(), d.device)
    return u.neg_().add_(p).sign_().relu_().mul_(d)      # [u < p] * d, as float arithmetic


def rescale_gains(chunks, *, density: list[float], rescale: str, seed: int, key: str, shape: tuple) -> dict:
    """g_i, the per-expert rescale factor (needs a pass over the tensor only for 'l1')."""
    if rescale != "l1":
        return {"gain": [1 / p if rescale == "inverse" else 1.0 for p in density]}
    seeds, kept = [expert_seed(seed, key, i) for i in range(len(density))], KeepBits(shape, len(density), CHUNK_ALIGN)

    def sums(b, xs, offset):
        compiled = kernels.l1_sums(b, xs, offset=offset, seeds=seeds, granule=CHUNK_ALIGN, density=density,
                                   kept=kept.new(b, xs, offset))
        if compiled is not None:
            return compiled
        ds = float_deltas(b, xs)
        return [[granule_sums(d.abs()) for d in ds],
                [granule_sums(_kept(d, i, p, seed, key, offset).abs()) for i, (d, p) in enumerate(zip(ds, density))]]
    return {"gain": l1_gains(chunks, sums, len(density)), "kept": kept.chunks}


def _dropped(b, xs, density, seed, key, offset, gain) -> list[torch.Tensor]:
    return [_kept(d, i, p, seed, key, offset) * g
            for i, (d, p, g) in enumerate(zip(deltas(b, xs), density, gain))]


def apply_linear(b: torch.Tensor, xs: list[torch.Tensor], *, weights: list[float], scale: float,
                 normalize: bool, density: list[float], seed: int, key: str, offset: int,
                 gain: list[float]) -> torch.Tensor:
    tau = weighted_sum(_dropped(b, xs, density, seed, key, offset, gain), weights)
    if normalize:
        tau /= sum(weights)
    return b + scale * tau


def apply_ties(b: torch.Tensor, xs: list[torch.Tensor], *, weights: list[float], scale: float,
               consensus: str, aggregate: str, density: list[float], seed: int, key: str,
               offset: int, gain: list[float]) -> torch.Tensor:
    es = [e * w for e, w in zip(_dropped(b, xs, density, seed, key, offset, gain), weights)]
    s = elect(es, consensus)
    return b + scale * disjoint_merge(es, weights, s, aggregate)
