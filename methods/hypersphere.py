"""Means on the hypersphere: multislerp, nuslerp, karcher. Each angle comes from dot products of whole
tensors (or of rows or columns), the Gram G_ij = v_i . v_j (float64 sums), so a reduce pass takes them and
apply is the sum out = b + sum_i c_i v_i (karcher: sum_i c_i x_i). v_i = d_i = x_i - b.

multislerp (Goddard 2025), N experts, weights w (normalised to sum 1 unless normalize_weights=False):
    u_i = v_i / (|v_i| + eps);  m = sum_i w_i u_i
    out = b + (sum_i w_i |v_i|) m / |m|        one expert: x_1; |m| < eps: b + w_1 v_1 + w_2 v_2 (2 experts)
    mergekit then steps along the weighted tangent vectors u_i - (u_i . m^) m^ at m^ = m / |m|, which sum
    to m - |m| m^ = 0: a step of length 0 (float32 noise in mergekit), left out here.

nuslerp (mergekit), 2 experts, t = w_2 / (w_1 + w_2) (0.5 where |w_1 + w_2| < 1e-6), per vector:
    cos = clamp(v_1 . v_2 / (max(|v_1|, 1e-7) max(|v_2|, 1e-7)), -1, 1),  theta = arccos(cos)
    out = b + sin((1-t) theta)/sin(theta) v_1 + sin(t theta)/sin(theta) v_2      1 - cos^2 <= 1e-16: linear
    vectors: the whole tensor (nuslerp_flatten, the default), else each row, or with nuslerp_row_wise
    each column (a vector along the first dimension; a 1-D tensor is one vector).

karcher (arXiv:2603.04972), all inputs x_i alike (a recipe's base is one more), alpha_i = 1/N:
    u_i = x_i / |x_i|, over inputs with |x_i| > tol (weights a_i = alpha_i renormalised over them)
    mu  = sum_i a_i u_i / |.|   (u_first where that norm < tol); then up to max_iter Riemannian steps:
    T   = sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) mu),  theta_i = arccos(mu . u_i) (>= tol)
    mu <- cos|T| mu + sin|T| T/|T|, renormalised; stop when |T| < tol
    out = (sum_i alpha_i |x_i|) mu
    mu stays a combination sum_i c_i u_i, so the iteration runs on the N x N Gram matrix in float64.

As mergekit 0.1.5 (merge_methods/multislerp.py, nuslerp.py, karcher.py), whose sums are float32.
"""
import math

import torch

from ._blocks import Total, deltas, product_sums, row_length, weighted_sum


def gram(chunks, n: int, with_base: bool = True) -> torch.Tensor:
    """G_ij = v_i . v_j over the whole tensor, [n, n] float64; v_i = x_i - b (x_i without a base)."""
    pairs = [(i, j) for i in range(n) for j in range(i, n)]
    totals = {ij: Total() for ij in pairs}
    for b, xs, _ in chunks():
        for ij, sums in zip(pairs, product_sums(b if with_base else None, xs, pairs)):
            totals[ij].add_sums(sums)
    g = torch.zeros(n, n, dtype=torch.float64)
    for (i, j), total in totals.items():
        g[i, j] = g[j, i] = total.value()
    return g


def apply_multislerp(b: torch.Tensor, xs: list[torch.Tensor], *, coef) -> torch.Tensor:
    """b + sum_i c_i d_i; coef None: one expert, x_1 as it is."""
    return xs[0] if coef is None else weighted_sum(deltas(b, xs), coef).add_(b)


def apply_karcher(b, xs: list[torch.Tensor], *, coef) -> torch.Tensor:
    """sum_i c_i x_i (the base is not used: a recipe's is one more input); coef None: one input, as it is."""
    return xs[0] if coef is None else weighted_sum(xs, coef)


def multislerp_coefficients(chunks, *, weights: list[float], normalize_weights: bool, eps: float,
                            shape: tuple) -> dict:
    if len(weights) == 1 or math.prod(shape) == 0:                  # one expert: x_1; empty: apply is not called
        return {"coef": None}
    g = gram(chunks, len(weights))
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum() if normalize_weights else w
    norm = g.diagonal().sqrt()
    a = w / (norm + eps)                                   # m = sum_i a_i v_i
    m = (a @ g @ a).clamp(min=0).sqrt()
    if m < eps:
        if len(weights) != 2:
            raise ValueError("multislerp: the weighted mean of the unit deltas is 0 (antipodal experts with "
                             "balancing weights); give the experts other weights")
        return {"coef": w.tolist()}
    return {"coef": (a * (w @ norm) / m).tolist()}


def slerp_pair(g00, g11, g01, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_1, c_2) of c_1 v_1 + c_2 v_2, the slerp at t, from the vectors' dot products (any shape)."""
    cos = (g01 / (g00.sqrt().clamp(min=1e-7) * g11.sqrt().clamp(min=1e-7))).clamp(-1, 1)
    linear = 1 - cos.square() <= 1e-16
    theta = torch.where(linear, 0.0, cos).acos()
    c1, c2 = torch.sin((1 - t) * theta) / theta.sin(), torch.sin(t * theta) / theta.sin()
    return torch.where(linear, 1 - t, c1), torch.where(linear, t, c2)


def nuslerp_t(weights: list[float]) -> float:
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def nuslerp_coefficients(chunks, *, weights: list[float], nuslerp_flatten: bool, nuslerp_row_wise: bool,
                         shape: tuple) -> dict:
    """The whole tensor's (c_1, c_2) (flatten), each column's as [2, columns] (row_wise), else None: apply
    takes each row's."""
    t = nuslerp_t(weights)
    if nuslerp_flatten or (nuslerp_row_wise and len(shape) < 2):
        g = gram(chunks, 2)
        return {"coef": [float(c) for c in slerp_pair(g[0, 0], g[1, 1], g[0, 1], t)]}
    if not nuslerp_row_wise:
        return {"coef": None}
    g = column_sums(chunks, math.prod(shape[1:]))
    return {"coef": torch.stack(slerp_pair(g[0], g[1], g[2], t)).float()}


def column_sums(chunks, p: int) -> torch.Tensor:
    """(v_1 . v_1, v_2 . v_2, v_1 . v_2) of each vector along the first dimension (flat index mod p), [3, p]
    float64, each summed in order of that dimension, so any chunking gives the same bits."""
    acc = torch.zeros(3, p, dtype=torch.float64)
    for b, xs, a in chunks():
        d1, d2 = (d.double() for d in deltas(b, xs))
        prods = torch.stack([d1 * d1, d2 * d2, d1 * d2])            # [3, n]
        j = 0
        while j < prods.shape[1]:                                   # one step per index of the first dimension
            col = (a + j) % p
            take = min(p - col, prods.shape[1] - j)
            acc[:, col:col + take] += prods[:, j:j + take]
            j += take
    return acc


def apply_nuslerp(b: torch.Tensor, xs: list[torch.Tensor], *, weights: list[float], coef, offset: int,
                  shape: tuple) -> torch.Tensor:
    d1, d2 = deltas(b, xs)
    if isinstance(coef, list):                                      # the whole tensor's
        return (coef[0] * d1 + coef[1] * d2).add_(b)
    if coef is not None:                                            # each column's: [2, p]
        col = (offset + torch.arange(b.numel(), device=b.device)) % coef.shape[1]
        c1, c2 = coef.to(b.device)[:, col]
        return (c1 * d1 + c2 * d2).add_(b)
    row = row_length(shape)
    g = product_sums(b, xs, [(0, 0), (1, 1), (0, 1)], row)          # per row of the chunk
    c1, c2 = (c.float().view(-1, 1) for c in slerp_pair(*g, nuslerp_t(weights)))
    return (c1 * d1.view(-1, row) + c2 * d2.view(-1, row)).view(-1).add_(b)   # [rows, row] -> flat


def karcher_coefficients(chunks, *, max_iter: int, tol: float) -> dict:
    n = None
    for _, xs, _ in chunks():
        n = len(xs)
        break
    if n is None or n == 1:
        return {"coef": None}
    g = gram(chunks, n, with_base=False)
    norm = g.diagonal().sqrt()
    valid = (norm > tol).nonzero().view(-1)
    coef = torch.zeros(n, dtype=torch.float64)
    if valid.numel():
        u = g[valid][:, valid] / torch.outer(norm[valid], norm[valid])     # u_i . u_j
        mu = karcher_mean(u, max_iter, tol)                             # mu = sum_i mu_i u_i
        coef[valid] = norm.mean() * mu / norm[valid]
    return {"coef": coef.tolist()}


def karcher_mean(u: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """The weighted Karcher mean's coefficients over units with dot products u [k, k], a_i = 1/k."""
    k = u.shape[0]
    a = torch.full((k,), 1.0 / k, dtype=torch.float64)
    size = lambda c: float((c @ u @ c).clamp(min=0).sqrt())             # noqa: E731  |sum_i c_i u_i|
    mu = torch.eye(k, dtype=torch.float64)[0] if size(a) < tol else a / size(a)
    for _ in range(max_iter):
        cos = (u @ mu).clamp(-1, 1)                                     # mu . u_i
        theta = cos.acos()
        step = torch.where(theta < tol, 0.0, a * theta / theta.sin())
        tangent = step - (step * cos).sum() * mu                       # sum_i step_i (u_i - cos_i mu)
        tn = size(tangent)
        if tn < tol:
            break
        mu = math.cos(tn) * mu + math.sin(tn) * tangent / tn
        if size(mu) > tol:
            mu = mu / size(mu)
    return mu
