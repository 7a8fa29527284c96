"""WUDI-Merging (Cheng et al. 2025, arXiv:2503.08099): least-interfering merged deltas, found by Adam

Per linear layer, the merged delta that the task vectors themselves say interferes least with each
task's inputs (a task vector's rows span its layer's inputs), by a few hundred optimiser steps on the
deltas alone (no data):

    d_i = x_i - b, a 2-D tensor [m, n] (out, in); s_i = ||d_i||_F^2
    tau* = argmin_tau  L(tau) = sum_i ||(tau - d_i) d_i^T||_F^2 / s_i
    from tau_0 = sum_i d_i, `steps` Adam steps (lr `lr`, betas (0.9, 0.999), eps 1e-8) on
    grad L = 2 (tau A - C),  A = sum_i d_i^T d_i / s_i [n, n],  C = sum_i d_i d_i^T d_i / s_i [m, n]
    tensors that are not 2-D (norms, biases): tau = mean_i d_i
    out = b + lam * tau

As FusionBench's wudi_merging (0.2.33: Adam lr 1e-5, its config's 400 steps, the same start), except
that the gradient is taken in closed form: A and C once, then one [m, n] x [n, n] product a step
(2 m n^2 flops), where autograd on the loss takes 2 T products of [m, n] x [n, m] size (4 T m^2 n):
11x fewer flops at T = 2 on a [5632, 2048] layer, 1.5x on [2048, 5632]. An expert whose delta is 0 on
a tensor drops out of L (FusionBench: 0 / 0 = NaN). Nothing is random (a fixed start, full-batch
steps): the output is a function of the inputs alone, so there is no seed. Embeddings and lm_head are
kept at the base unless --keep-base '' (FusionBench optimises every 2-D tensor; a 150k-row embedding
costs 27x a [5632, 2048] matrix a step).
"""
import torch

from ..common.threads import threads_for, torch_threads
from ._blocks import deltas


def wudi(ds: list[torch.Tensor], *, steps: int, lr: float) -> torch.Tensor:
    """tau after `steps` Adam steps on L from sum_i d_i, for deltas ds [m, n] each."""
    n = ds[0].shape[1]
    a, c = ds[0].new_zeros(n, n), torch.zeros_like(ds[0])          # A [n, n], C [m, n]
    for d in ds:
        s = d.square().sum()
        if s > 0:
            g = d.T @ d                                               # d_i^T d_i [n, n]
            a += g / s
            c += d @ g / s
    tau = sum(ds).clone()                                            # [m, n]
    adam = torch.optim.Adam([tau], lr=lr)
    for _ in range(steps):
        tau.grad = 2 * (tau @ a - c)
        adam.step()
    return tau


def apply(b: torch.Tensor, xs: list[torch.Tensor], *, scale: float, steps: int, lr: float,
          shape: tuple) -> torch.Tensor:
    """b + lam * tau: tau from wudi() for 2-D tensors, the mean delta otherwise (one thread for a small
    tensor, as methods/svd.py, so the bytes do not depend on the caller's thread count)."""
    ds = deltas(b, xs)
    if len(shape) != 2:
        return b + scale * (sum(ds) / len(ds))
    with torch_threads(threads_for(b.numel() * len(xs))):
        tau = wudi([d.view(shape) for d in ds], steps=steps, lr=lr).view(-1)
    return b + scale * tau
