"""DOGE-TA (Wei et al. 2025, arXiv:2501.01230): task arithmetic plus a shared correction found by
projected Adam steps

Modeling merging as adaptive projective gradient descent, data-free: per 2-D tensor, a correction
delta that keeps each task's row-wise response to its own delta, moved only outside the subspace
the tasks share, then task arithmetic on top-density-trimmed corrected deltas:

    d_i = x_i - b [m, n];  lam_i = `norm_scale` / ||d_i||_F;  Lam = sum_i lam_i;  tau = sum_i lam_i d_i
    L(delta) = sum_j sum_rows ( sum_cols d_j * (d_j - tau - Lam delta) )^2
    U_k: the top k = floor(r / `subspace`) left singular vectors of [U_1 .. U_T], U_i the top
         floor(r / T) of d_i's (r = min(m, n));  P = U_k U_k^T
    delta: `steps` Adam steps (lr `lr`) from 0 on (I - P) grad L,
         grad L = -2 Lam sum_j rowsum(d_j * (d_j - tau - Lam delta)) d_j
    mask_i = |d_i| among the top `density` of expert i's |d| over the whole model (ties kept)
    out = b + sum_i lam_i (d_i + delta) mask_i;   other tensors: b

As FusionBench 0.2.33's DOGE_TA_Algorithm (its config: subspace 6, K 30 -> density 0.3, lamda 0.07;
Adam lr 1e-4, 400 steps a tensor): the tensors it merges are the 2-D weights (its filter: encoder
weights without layer norms), here every tensor but embeddings, lm_head, norms and biases (kept at
the base by default). The gradient is taken in closed form and projected as U_k (U_k^T g), O(m k n)
a step rather than FusionBench's [m, m] P. An expert whose delta is 0 gets lam_i = 0 (FusionBench:
1/0). The masks' threshold comes from the same radix select as TIES' (one extra pass over the model).
"""
import math

import torch

from ..common.threads import threads_for, torch_threads
from ._blocks import deltas
from .ranking import Cut, Rank
from .svd import _svd


def ranks(*, density: list[float], n: int) -> list[list[Rank]]:
    """Each expert's top floor(rho n) + 1 |d_i| (FusionBench: kthvalue of the (n - floor(rho n))-th smallest)."""
    return [[Rank(min(math.floor(rho * n) + 1, n))] for rho in density]


def shared_subspace(ds: list[torch.Tensor], subspace: int) -> torch.Tensor:
    """U_k [m, k]: the top floor(r / subspace) left singular vectors of the tasks' top left singular vectors."""
    r = min(ds[0].shape)
    u = torch.cat([_svd(d)[0][:, :r // len(ds)] for d in ds], 1)         # [m, T floor(r/T)]
    return _svd(u)[0][:, :r // subspace]


def correction(ds: list[torch.Tensor], lam: list[torch.Tensor], uk: torch.Tensor, *, steps: int,
               lr: float) -> torch.Tensor:
    """delta [m, n] after `steps` Adam steps on (I - U_k U_k^T) grad L from 0."""
    tau, total = sum(l * d for l, d in zip(lam, ds)), sum(lam)
    delta = torch.zeros_like(ds[0])
    adam = torch.optim.Adam([delta], lr=lr)
    for _ in range(steps):
        rest = tau + total * delta                                        # [m, n]
        g = sum((d * (d - rest)).sum(1, keepdim=True) * d for d in ds) * (-2 * total)
        delta.grad = g - uk @ (uk.T @ g)
        adam.step()
    return delta


def apply(b: torch.Tensor, xs: list[torch.Tensor], *, norm_scale: float, subspace: int, steps: int, lr: float,
          thr: list[list[Cut]], shape: tuple) -> torch.Tensor:
    if len(shape) != 2:
        return b.clone()
    ds = [d.view(shape) for d in deltas(b, xs)]                           # [m, n] each
    norms = [d.norm() for d in ds]
    lam = [norm_scale / n if n > 0 else n for n in norms]
    with torch_threads(threads_for(b.numel() * len(xs))):
        delta = correction(ds, lam, shared_subspace(ds, subspace), steps=steps, lr=lr)
    masks = [t[0].mask(d.abs()) for d, t in zip(ds, thr)]
    return b + sum(((d + delta) * m * l).view(-1) for d, m, l in zip(ds, masks, lam))
