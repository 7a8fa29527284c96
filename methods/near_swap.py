"""NearSwap (mergekit; first used for alchemonaut/QuartetAnemoi-70B-t0.0001): the base b and one expert x,
the expert's value taken where it lies near the base.

    d   = x - b
    w   = clamp(t / max(|d|, 1e-6), 0, 1)      1 where |d| <= t: near entries are swapped in whole
    out = w x + (1 - w) b                      = b + sign(d) min(|d|, t) wherever |d| >= 1e-6

Element-wise, operation for operation as mergekit 0.1.5 computes it (so t <= 0 gives b).
"""
import torch


def apply(b: torch.Tensor, xs: list[torch.Tensor], *, t: float) -> torch.Tensor:
    (x,) = xs
    w = (t / (x - b).abs().clamp_(min=1e-6)).clamp_(0, 1)
    return w * x + (1 - w) * b
