"""The task-arithmetic family: task vectors trimmed by each member's rule, sign-elected or not, summed.

    d_i = x_i - b                  no base (linear): d_i = x_i, and nothing is added back
    e_i = w_i trim_i(d_i)          the member's trim: none (linear, task_arithmetic), top-k magnitudes (ties),
                                   a magnitude band (breadcrumbs), random drops (dare), ranked drops (della)
    elect none:  m = sum_i e_i                              (normalize: / sum_i w_i)
    elect sign:  s = sign(sum_i e_i)                        ('count': sign(sum_i sign(e_i))); a zero sum is +
                 m = sum_i agree_i e_i / sum_i agree_i w_i  agree_i = [sign(e_i) = s, e_i != 0]  ('sum': no division)
    out = b + lam * m

linear (model soup, Wortsman et al. 2022):  sum_i w_i x_i / sum_i w_i   (normalize=False: no division)
task_arithmetic (Ilharco et al. 2023):      b + lam * sum_i w_i d_i     (normalize=True: / sum_i w_i)
MergeBench's "Model Soup" is task_arithmetic with lam = 1/T, i.e. the mean of the experts.

mergekit's generalized task arithmetic, as one apply (the torch reference) and one fused path (kernels.
delta_merge) for all members. A member is a module holding its trim, in torch and as delta_merge's arguments
(ties_merging, model_breadcrumbs, dare_drop, della_magprune), and a row of the table naming it.
"""
from typing import Callable

import torch

from .. import kernels
from ._blocks import deltas, disjoint_merge, elect as sign, weighted_sum


def apply(b: torch.Tensor | None, xs: list[torch.Tensor], *, trim: Callable | None, elect: str, weights: list[float],
          scale: float = 1.0, normalize: bool = False, consensus: str = "sum", aggregate: str = "mean") -> torch.Tensor:
    """trim(ds) -> [trim_i(d_i)], the member's (None: e_i = w_i d_i); elect: 'none' | 'sign'."""
    ds = deltas(b, xs) if b is not None else xs
    ds = trim(ds) if trim else ds
    if elect == "sign":
        es = [d * w for d, w in zip(ds, weights)]
        m = disjoint_merge(es, weights, sign(es, consensus), aggregate)
    else:
        m = weighted_sum(ds, weights)
        if normalize:
            m /= sum(weights)
    m = m.mul_(scale)
    return m.add_(b) if b is not None else m


def fused(b, xs, *, trim: Callable | None, elect: str, weights: list[float], scale: float = 1.0,
          normalize: bool = False, consensus: str = "sum", aggregate: str = "mean", out_dtype: torch.dtype):
    """apply in one kernels.delta_merge pass over the stored inputs; trim(b, xs) -> the member's trim as
    delta_merge's arguments, or None where no kernel covers it. None where no kernel covers the chunk."""
    if elect == "sign" and len(xs) > kernels.MAX_ELECT_EXPERTS:
        return None
    drop = trim(b, xs) if trim else {}
    if drop is None:
        return None
    return kernels.delta_merge(b, xs, weights=weights, scale=scale, div=sum(weights) if normalize else 1.0, **drop,
                               elect=consensus if elect == "sign" else "none", aggregate=aggregate,
                               out_dtype=out_dtype)
