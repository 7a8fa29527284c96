"""Singular Value Calibration (SVC, Li et al. 2026, arXiv:2602.05536), a post-step after any merge

It shrinks the singular values of the merged delta that several tasks inflated by adding the same
directions (`--calibrate svc`): on each merged 2-D tensor, after the method's apply, given the base
and the experts' tensors.

    d_i = x_i - b (K experts), D = m - b for the merged tensor m, svd(D) = U S V^T (thin, r = min(m, n))
    a_r = u_r^T D,  a_r^i = u_r^T d_i                       responses along the left singular vector u_r
    s_r^i = <a_r, a_r^i> / ||a_r^i||^2                     how much the merge scales task i's response
    gamma_r = K / sum_i max(alpha, s_r^i)                  one calibration factor per singular direction
    out = b + U diag(gamma S) V^T
    tensors that are not 2-D (norms, biases): out = m

As FusionBench 0.2.33 (singular_value_calibration, its vectorised form): in float64, ||a_r^i||^2
floored at 1e-12, a NaN or -inf s_r^i read as alpha, every 2-D tensor the method merges (embeddings
and lm_head too, unless --keep-base copies them). alpha defaults to 0.1, FusionBench's setting for
SVC on task arithmetic, TIES, DARE, averaging and Iso-C (its TSV and WUDI recipes use 1.0).
"""
import torch

from ..common.threads import threads_for, torch_threads
from .svd import _svd


def svc(b: torch.Tensor, ds: list[torch.Tensor], m: torch.Tensor, alpha: float) -> torch.Tensor:
    """The calibrated merge of one matrix: b [m, n], the deltas d_i [m, n] and the merge m [m, n], float64."""
    u, s, vh = _svd(m - b)                                     # U [m, r], S [r], V^T [r, n]
    a = u.T @ (m - b)                                          # [r, n]
    a_i = torch.stack([u.T @ d for d in ds])                   # [K, r, n]
    s_i = (a * a_i).sum(-1) / (a_i * a_i).sum(-1).clamp_min(1e-12)   # [K, r]
    s_i = torch.nan_to_num(s_i, nan=alpha, neginf=alpha)
    gamma = len(ds) / s_i.clamp_min(alpha).sum(0)              # [r]
    return b + (u * (gamma * s)) @ vh


def apply_svc(b: torch.Tensor, xs: list[torch.Tensor], m: torch.Tensor, *, svc_alpha: float,
              shape: tuple) -> torch.Tensor:
    """m, the method's merged tensor (flat float32), calibrated; unchanged unless the tensor is 2-D."""
    if len(shape) != 2:
        return m
    b64 = b.view(shape).double()                              # [m, n]
    with torch_threads(threads_for(b.numel() * len(xs))):     # one thread fixes the bytes (methods/svd.py)
        out = svc(b64, [x.view(shape).double() - b64 for x in xs], m.view(shape).double(), svc_alpha)
    return out.float().view(-1)
