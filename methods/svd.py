"""TSV-Merge (Gargiulo et al. 2025, arXiv:2412.00081) and Iso-C / Iso-CTS (Marczak et al. 2025,
arXiv:2502.04959): merges of 2-D deltas through their singular vectors, one whole tensor at a time.

    d_i = x_i - b, T experts, r = min(m, n), svd(A) = U S V^T (thin), polar(A) = U V^T
    tsv:     top k = max(1, floor(r/T)) triplets of each d_i, concatenated: U = [U_1 .. U_T], S, V;
             tau = polar(U) diag(S) polar(V)^T
    iso_c:   tau = mean(S) U V^T, for U S V^T = svd(sum_i d_i)
    iso_cts: common part: the top k_c triplets of svd(sum_i d_i), k_c = r - T s,
             s = min(round((r - floor(f r)) / T), floor(r/T)) per task;
             task parts: the top s triplets of each d_i - U_c U_c^T d_i;
             concatenated as in tsv, tau = mean(S) polar(U) polar(V)^T
    tensors that are not 2-D (norms, biases): tau = mean_i d_i
    out = b + lam * tau

As FusionBench (task_singular_vector/utils/TSVM_utils.py, isotropic_merging/iso_utils.py), in
float32, except where it breaks: tsv keeps at least one triplet per task when T > r (FusionBench:
none) and iso_cts caps s at floor(r/T) (FusionBench's rounding can make k_c negative).
Embeddings and lm_head are copied from the base unless --keep-base '' : their SVD costs minutes
at 9B, and the papers merge the transformer layers.
"""
import math

import torch

from ..common.threads import threads_for, torch_threads
from ._blocks import deltas


def _svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD, U [m, r], S [r], V^T [r, n], that survives rank-deficient and ill-conditioned input:
    LAPACK's divide and conquer (gesdd) can fail to converge there in float32 (seen on a 64 x 576
    fp16 k_proj residual); then float64, then the eigendecomposition of the smaller Gram matrix."""
    for attempt in (a, a.double()):
        try:
            return tuple(t.to(a.dtype) for t in torch.linalg.svd(attempt, full_matrices=False))
        except torch.linalg.LinAlgError:
            continue
    return tuple(t.to(a.dtype) for t in gram_svd(a.double()))


def gram_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD from eigh of A A^T (A [m, n], m <= n; else of A^T): S = sqrt(eigenvalues), V^T = S^-1 U^T A
    where S > 0, completed to orthonormal rows where S = 0 (those rows are arbitrary, as in LAPACK)."""
    if a.shape[0] > a.shape[1]:
        u, s, vh = gram_svd(a.T)
        return vh.T, s, u.T
    w, u = torch.linalg.eigh(a @ a.T)                         # ascending
    w, u = w.flip(0).clamp(min=0), u.flip(1)
    live = w > w.max() * a.shape[1] * torch.finfo(a.dtype).eps   # eigenvalues above the Gram's rounding
    s = torch.where(live, w.sqrt(), 0)                         # [m]
    vh = (u.T @ a)[live] / s[live, None]                       # [k, n]
    basis, _ = torch.linalg.qr(torch.cat([vh.T, torch.eye(a.shape[1], dtype=a.dtype)], 1))   # [n, k + n]
    rest = basis[:, vh.shape[0]:a.shape[0]].T                  # [m - k, n], orthogonal to vh's rows
    return u, s, torch.cat([vh, rest])


def _polar(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor U V^T of a = U S V^T: the nearest matrix with orthonormal columns (rows)."""
    u, _, vh = _svd(a)
    return u @ vh


def _rebuild(parts: list[tuple], flat: bool) -> torch.Tensor:
    """polar(U) diag(S) polar(V)^T of the concatenated triplets (U_i, S_i, V_i^T); flat: S -> mean(S)."""
    u = torch.cat([p[0] for p in parts], 1)              # [m, K]
    s = torch.cat([p[1] for p in parts])                 # [K]
    vh = torch.cat([p[2] for p in parts], 0)             # [K, n]
    if flat:
        s = s.mean().expand_as(s)
    return (_polar(u) * s) @ _polar(vh)


def _top(a: torch.Tensor, k: int) -> tuple:
    u, s, vh = _svd(a)
    return u[:, :k], s[:k], vh[:k]


def tsv(ds: list[torch.Tensor]) -> torch.Tensor:
    k = max(1, min(ds[0].shape) // len(ds))
    return _rebuild([_top(d, k) for d in ds], flat=False)


def iso_c(ds: list[torch.Tensor]) -> torch.Tensor:
    u, s, vh = _svd(sum(ds))
    return (u * s.mean()) @ vh


def iso_cts(ds: list[torch.Tensor], f: float) -> torch.Tensor:
    r, n_tasks = min(ds[0].shape), len(ds)
    s_task = min(round((r - math.floor(f * r)) / n_tasks), r // n_tasks)
    common = _top(sum(ds), r - n_tasks * s_task)         # U_c [m, k_c], S_c, V_c^T
    uc = common[0]
    tasks = [_top(d - uc @ (uc.T @ d), s_task) for d in ds] if s_task else []
    return _rebuild([common, *tasks], flat=True)


def _merge(b: torch.Tensor, xs: list[torch.Tensor], shape: tuple, lam: float, fn) -> torch.Tensor:
    """b + lam * tau: tau = fn(deltas as [m, n] matrices) for 2-D tensors, the mean delta otherwise.
    The SVDs of a small tensor run on one thread (common/threads.py): split over both cores, LAPACK's
    many small calls wait for each other, and for a busy core (iso_cts of the 25k-parameter micro
    zoo's five experts beside one busy process: 0.07-8.0 s on two threads, 0.04-0.05 s on one). Its
    last bits depend on the thread count (the 16 x 32 k_proj), so one thread also fixes the bytes."""
    ds = deltas(b, xs)
    if len(shape) != 2:
        return b + lam * (sum(ds) / len(ds))
    with torch_threads(threads_for(b.numel() * len(xs))):
        tau = fn([d.view(shape) for d in ds]).view(-1)
    return b + lam * tau


def apply_tsv(b: torch.Tensor, xs: list[torch.Tensor], *, scale: float, shape: tuple) -> torch.Tensor:
    return _merge(b, xs, shape, scale, tsv)


def apply_iso_c(b: torch.Tensor, xs: list[torch.Tensor], *, scale: float, shape: tuple) -> torch.Tensor:
    return _merge(b, xs, shape, scale, iso_c)


def apply_iso_cts(b: torch.Tensor, xs: list[torch.Tensor], *, scale: float, common_fraction: float,
                  shape: tuple) -> torch.Tensor:
    return _merge(b, xs, shape, scale, lambda ds: iso_cts(ds, common_fraction))
