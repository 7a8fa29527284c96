"""DARE (Yu et al. 2024, arXiv:2311.03099): drop each delta entry at random, rescale, then add
(dare_linear) or TIES-merge (dare_ties).

    keep_i = [u_i(j) < p_i]      u from Philox keyed by (seed, tensor name, expert i), j = element index
    e_i    = g_i * keep_i * d_i  g_i = 1/p_i ('inverse', paper, MergeBench),
                                 ||d_i||_1 / ||keep_i d_i||_1 per tensor ('l1', mergekit; 1 if a norm < 1e-7), or 1 ('none')
    dare_linear: b + lam * sum_i w_i e_i          (normalize: / sum_i w_i)
    dare_ties:   the TIES sign election and disjoint merge on w_i e_i, then b + lam * m

p_i is the density (mergekit's name); MergeBench's drop rate p is 1 - density. The sum and the election
are the family's (task_vectors.py).
"""
import torch

from .. import kernels
from ..kernels.dare import expert_seed
from ._blocks import KeepBits, float_deltas, granule_sums, l1_gains
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
    seeds = [expert_seed(seed, key, i) for i in range(len(density))]
    kept = KeepBits(shape=shape, experts=len(density), granule=CHUNK_ALIGN)

    def sums(b, xs, offset):
        compiled = kernels.l1_sums(b, xs, offset=offset, seeds=seeds, granule=CHUNK_ALIGN, density=density,
                                   kept=kept.new(b, xs, offset))
        if compiled is not None:
            return compiled
        ds = float_deltas(b, xs)
        return [[granule_sums(d.abs()) for d in ds],
                [granule_sums(_kept(d, i, p, seed, key, offset).abs()) for i, (d, p) in enumerate(zip(ds, density))]]
    return {"gain": l1_gains(chunks, sums, len(density)), "kept": kept.chunks}


def trim(ds: list[torch.Tensor], *, density: list[float], seed: int, key: str, offset: int,
         gain: list[float]) -> list[torch.Tensor]:
    """e_i before w_i: g_i * keep_i * d_i."""
    return [_kept(d, i, p, seed, key, offset) * g for i, (d, p, g) in enumerate(zip(ds, density, gain))]


def fused_trim(b, xs, *, density: list[float], seed: int, key: str, offset: int, gain: list[float],
               kept: torch.Tensor | None = None) -> dict:
    """trim as kernels.delta_merge's random drop: Philox seeds per expert, as _kept, or the bits the L1
    pass drew (`kept`, the compiled loops' alone)."""
    drawn = {"kept": kept} if kept is not None else {}
    return {"trim": "random", "density": density, "gain": gain, "offset": offset, **drawn,
            "seeds": [expert_seed(seed, key, i) for i in range(len(xs))]}
