"""MagMax (Marczak et al. 2024, arXiv:2407.06322): per element, the delta of largest magnitude.

    out(j) = b(j) + lam * d_k(j),   k = argmax_i |d_i(j)|   (ties: the last such expert)

The tie rule and the formula are those of the paper's code and FusionBench (`>=` fold over the
experts in order); FusionBench's default lam is 0.5 (the paper's script for independent
fine-tunes), mbmerge's is 1.0. Embeddings are merged like any tensor (FusionBench does too).
"""
import torch

from ._blocks import deltas


def apply(b: torch.Tensor, xs: list[torch.Tensor], *, scale: float) -> torch.Tensor:
    ds = deltas(b, xs)
    best = ds[0]
    for d in ds[1:]:
        best = torch.where(d.abs() >= best.abs(), d, best)   # an exact select, so no float-mask trick
    return b + scale * best
