"""Passthrough (mergekit): one model's tensors as they are, times scale; no statistics.

    out = scale * x_1          one model: with a recipe's slices, frankenmerges
"""
import torch


def apply(b, xs: list[torch.Tensor], *, scale: float) -> torch.Tensor:
    return xs[0] * scale if scale != 1.0 else xs[0]
