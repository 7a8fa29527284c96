"""Merges weighted by statistics the experts gathered on their own data (mbmerge.stats collects
them; the engine streams them beside the weights as `stat`, one tensor per expert).

fisher (Matena & Raffel 2022), with F_i expert i's diagonal Fisher, floored at 1e-10:
    out = sum_i w_i F_i x_i / sum_i w_i F_i
regmean (Jin et al. 2023), per linear weight W_i (out x in) with Gram G_i = X_i^T X_i / tokens of its
input on expert i's own data; off-diagonals shrunk by alpha (`reduction`):
    G~_i = alpha G_i + (1 - alpha) diag(G_i)
    W^T  = (sum_i G~_i)^-1 sum_i G~_i W_i^T,   i.e. per row block  W = sum_i W_i P_i,  P_i = G~_i A^-1
  A^-1 comes from A's eigendecomposition in float64: the exact inverse, or, when A is ill-conditioned
  (cond > 1e8, MergeBench's test), the pseudo-inverse. Tensors without Grams (norms) are averaged.
regmean_plusplus (MergeBench's RegMean++): regmean's closed form with each expert's Grams taken on the merged
  model's activations, layer by layer (stats/regmean_plusplus.py collects them).
localize_stitch_trained (He et al. 2024): the dataless stitch (masks.stitch) with masks trained on data.
"""
import torch

from .masks import stitch

FISHER_FLOOR = 1e-10
ILL_CONDITIONED = 1e8


def fisher(b, xs: list[torch.Tensor], *, weights: list[float], stat: list[torch.Tensor]) -> torch.Tensor:
    num, den = torch.zeros_like(xs[0]), torch.zeros_like(xs[0])
    for x, f, w in zip(xs, stat, weights):
        wf = f.clamp(min=FISHER_FLOOR).mul_(w)
        num.addcmul_(wf, x)
        den += wf
    return num.div_(den)


def shrink(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha G + (1 - alpha) diag(G): off-diagonal entries times alpha."""
    return g * alpha + torch.diag_embed(g.diagonal() * (1 - alpha))


def inverse(a: torch.Tensor) -> torch.Tensor:
    """A^-1 of a symmetric PSD matrix via eigh; eigenvalues at or below eps * n * max are dropped
    (the pseudo-inverse) when cond(A) exceeds 1e8 or A is singular."""
    w, q = torch.linalg.eigh(a)
    top = w.abs().max()
    if top == 0:
        return torch.zeros_like(a)
    ill = w.min() <= 0 or top / w.min() > ILL_CONDITIONED
    keep = w.abs() > top * a.shape[0] * torch.finfo(a.dtype).eps if ill else torch.ones_like(w, dtype=torch.bool)
    inv_w = torch.where(keep, 1 / w, torch.zeros_like(w))
    return (q * inv_w) @ q.T


def regmean_projections(chunks, *, stat: list[torch.Tensor | None], reduction: float) -> dict:
    """The per-expert projections P_i = G~_i A^-1 (float32), or None for a tensor with no Grams;
    the weights themselves (chunks) are not needed."""
    if all(g is None for g in stat):
        return {"proj": None}
    grams = [shrink(g.double(), reduction) for g in stat]
    a_inv = inverse(sum(grams))
    return {"proj": [(g @ a_inv).float() for g in grams]}


def regmean(b, xs: list[torch.Tensor], *, proj: list[torch.Tensor] | None) -> torch.Tensor:
    if proj is None:
        return sum(xs[1:], xs[0].clone()).div_(len(xs))
    n_in = proj[0].shape[0]
    out = sum(x.view(-1, n_in) @ p for x, p in zip(xs, proj))   # whole rows: chunks hold rows (span "row")
    return out.view(-1)


def localize_stitch_trained(b: torch.Tensor, xs: list[torch.Tensor], *, stat: list[torch.Tensor]) -> torch.Tensor:
    return stitch(b, [x - b for x in xs], [m.float() for m in stat])
