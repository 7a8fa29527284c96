"""RAM, Reinforced Agent Merging (arXiv:2601.13572): deltas that only one expert made are kept whole, shared
ones averaged over the experts that made them.

    m_i = [|d_i| > eps],  c = sum_i m_i                 how many experts changed the entry
    ram:        out = b + sum_i m_i d_i ([c = 1] + [c > 1] / c)
    ramplus_tl: out = b + sum_i m_i d_i ([c = 1] lam_i + [c > 1] / c),   lam_i = 1 + r clamp(rho_i, 0, alpha),
                rho_i = #(m_i, c > 1) / max(#(m_i, c = 1), eps)   expert i's shared over unique entries, counted
                over the whole tensor (tensor-local: the paper counts over the model)

Element-wise (ramplus_tl's counts come from a reduce pass), as mergekit 0.1.5 (merge_methods/ram.py).
"""
import torch

from ._blocks import deltas


def _masked(b: torch.Tensor, xs: list[torch.Tensor], eps: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(m_i d_i, c)."""
    ds = deltas(b, xs)
    ms = [(d.abs() > eps).float() for d in ds]
    return [d * m for d, m in zip(ds, ms)], sum(ms)


def apply_ram(b: torch.Tensor, xs: list[torch.Tensor], *, epsilon: float) -> torch.Tensor:
    return apply_ramplus(b, xs, epsilon=epsilon, gain=[1.0] * len(xs))


def apply_ramplus(b: torch.Tensor, xs: list[torch.Tensor], *, epsilon: float, gain: list[float]) -> torch.Tensor:
    mds, c = _masked(b, xs, epsilon)
    unique, shared, count = (c == 1).float(), (c > 1).float(), c.clamp(min=1)
    return b + sum(md * unique * lam + md * shared / count for md, lam in zip(mds, gain))


def ramplus_gains(chunks, *, r: float, alpha: float, epsilon: float) -> dict:
    """lam_i = 1 + r clamp(rho_i, 0, alpha) from expert i's shared and unique counts over the tensor."""
    shared = unique = 0
    for b, xs, _ in chunks():
        ds = deltas(b, xs)
        ms = torch.stack([d.abs() > epsilon for d in ds])           # [N, n]
        c = ms.sum(0)
        shared = shared + (ms & (c > 1)).sum(1)
        unique = unique + (ms & (c == 1)).sum(1)
    if isinstance(shared, int):                                     # an empty tensor: apply is not called
        return {"gain": []}
    rho = [s / max(u, epsilon) for s, u in zip(shared.tolist(), unique.tolist())]
    return {"gain": [1 + r * min(max(x, 0.0), alpha) for x in rho]}
