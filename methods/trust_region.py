"""TATR, task arithmetic in a trust region (Sun et al., ICLR 2025): no changes where the experts collide

Zero-shot form: each |d_i| stands in for expert i's gradient, so an entry's knowledge conflict is

    d_i = x_i - b;  Omega = sum_{i != j} |d_i| |d_j|       (element-wise)
    t = the m-th largest Omega over the whole model, m = n - min(floor(q n), n - 1)  (q `--quantile`)
    out = b + lam * sum_i d_i [Omega < t]                 (the top 1 - q of Omega, ties at t too, dropped)

As FusionBench 0.2.33 (TaskArithmeticWithTrustRegionForCLIP, zero_shot; its config's q 0.99, lam 0.3):
t = Omega sorted ascending at index floor(q n), over every merged tensor (embeddings, norms and biases
too), Omega summed over ordered pairs in expert order. The engine finds t by radix select in one
streaming pass over the model (no sort of n values); `--sparsify-scope tensor` takes t per tensor
instead. The data form (|d_i| replaced by mean |gradients| of the task loss) needs data and a backward
pass per example, and is not offered.
"""
import math

import torch

from ._blocks import float_deltas
from .ranking import Cut, Rank


def conflict(b: torch.Tensor, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """[Omega] = [sum_{i != j} |d_i| |d_j|], float32 (the one series the ranks rank)."""
    a = [d.abs() for d in float_deltas(b, xs)]
    return [sum(a[i] * a[j] for i in range(len(a)) for j in range(len(a)) if i != j)]


def ranks(*, quantile: float, n: int) -> list[list[Rank]]:
    """The set dropped: Omega >= t, the m-th largest (keep_ties puts every entry equal to t in it)."""
    return [[Rank(n - min(math.floor(quantile * n), n - 1))]]


def apply(b: torch.Tensor, xs: list[torch.Tensor], *, scale: float, thr: list[list[Cut]]) -> torch.Tensor:
    dropped = thr[0][0].mask(conflict(b, xs)[0])
    return b + scale * sum(float_deltas(b, xs)) * ~dropped
