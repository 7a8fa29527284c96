"""Weighted averages of whole weights or of task vectors; no statistics.

linear (model soup, Wortsman et al. 2022):  sum_i w_i x_i / sum_i w_i   (normalize=False: no division)
task_arithmetic (Ilharco et al. 2023):      b + lam * sum_i w_i d_i     (normalize=True: / sum_i w_i)
passthrough (mergekit):                     scale * x_1, one model: with a recipe's slices, frankenmerges
MergeBench's "Model Soup" is task_arithmetic with lam = 1/T, i.e. the mean of the experts.
"""
import torch

from ._blocks import deltas, weighted_sum


def apply_linear(b, xs: list[torch.Tensor], *, weights: list[float], normalize: bool) -> torch.Tensor:
    out = weighted_sum(xs, weights)
    return out / sum(weights) if normalize else out


def apply_passthrough(b, xs: list[torch.Tensor], *, scale: float) -> torch.Tensor:
    return xs[0] * scale if scale != 1.0 else xs[0]


def apply_task_arithmetic(b: torch.Tensor, xs: list[torch.Tensor], *, weights: list[float],
                          scale: float, normalize: bool) -> torch.Tensor:
    tau = weighted_sum(deltas(b, xs), weights)
    if normalize:
        tau /= sum(weights)
    return b + scale * tau
