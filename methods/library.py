"""The methods as a library on plain tensors and state dicts, with no files and no engine:

    >>> mbmerge.methods.ties(base_t, [t1, t2], density=0.2)
    >>> mbmerge.methods.merge_state_dicts("ties", base_sd, [sd1, sd2], density=0.2, sparsify_scope="model")

Every registered method has a function of its name here (see the end of the module).
"""
import re
from typing import Callable

import torch

from ..common.errors import BadParameter
from .contract import check_experts, resolve_params
from .dispatch import apply_chunk, model_scope, reductions, thresholds
from .registry import REGISTRY, get


def merge_tensors(name: str, b: torch.Tensor | None, xs: list[torch.Tensor], *, key: str = "",
                  thr: list | None = None, stat: list | None = None, **params) -> torch.Tensor:
    """Merge whole tensors in memory with a registered method; returns b's (or x_0's) dtype.

    Args:
        name: a registry name, e.g. "ties".
        b: the base tensor (None for methods that do not need it, e.g. linear).
        xs: the experts' tensors, same shape as b.
        key: the tensor's name; seeds DARE's keep masks, so the engine's output is reproduced.
        thr: magnitude thresholds ranked elsewhere (see merge_state_dicts); default: this tensor's.
        stat: data-aware methods: per expert, its statistic of this tensor (a Fisher diagonal, a
            Gram [in, in] or None, a 0/1 mask), as mbmerge.stats collects them.
        params: method parameters, e.g. density=0.2, weights=[0.3, 0.7].
    Example:
        >>> merge_tensors("ties", b, [x1, x2], density=0.2)
        >>> merge_tensors("fisher", None, [x1, x2], stat=[f1, f2])
    """
    method = get(name)
    if method.needs_base and b is None:
        raise BadParameter(f"method {name} needs a base tensor")
    check_experts(method, len(xs))
    if method.data_statistic is not None and (stat is None or len(stat) != len(xs)):
        raise BadParameter(f"method {name} needs one statistic per expert (stat=[...])")
    p = resolve_params(method, len(xs), params)
    like = b if b is not None else xs[0]
    bf = b.float().flatten() if b is not None else None
    xf = [x.float().flatten() for x in xs]
    whole = method.data_statistic is not None and method.data_statistic.whole
    reduced = reductions(method, p, lambda: [(bf, xf, 0)], key, tuple(like.shape), thr,
                         stat=stat if whole else None)
    chunk_stat = [s.flatten() for s in stat] if stat is not None and not whole else None
    out = apply_chunk(method, p, reduced, bf, xf, 0, key, tuple(like.shape), stat=chunk_stat)
    return out.view(like.shape).to(like.dtype)


def merge_state_dicts(name: str, base: dict | None, experts: list[dict], *, keep_base: str | None = None,
                      stat: list[dict] | None = None, **params) -> dict:
    """Merge in-memory state dicts ({name: tensor}) as the engine merges model folders: floating
    tensors merged (those matching keep_base, default the method's, copied from the base), others
    copied, and sparsify_scope="model" ranking over every merged tensor. stat: data-aware methods,
    per expert a state dict of its statistics (tensors without one, e.g. norms for RegMean, absent).

    Example:
        >>> merge_state_dicts("ties", base_sd, [sd1, sd2], density=0.2, sparsify_scope="model")
    """
    method = get(name)
    ref = base if base is not None else experts[0]
    keep = keep_base if keep_base is not None else method.keep_base
    merged = [k for k, v in ref.items() if v.is_floating_point() and not (keep and re.search(keep, k))]
    thr, p = None, resolve_params(method, len(experts), params)
    if model_scope(method, p):
        def chunks():
            for k in merged:
                yield base[k].float().flatten(), [x[k].float().flatten() for x in experts], 0
        thr = thresholds(method, p, chunks, sum(ref[k].numel() for k in merged))
    out = {k: v.clone() for k, v in ref.items()}
    for k in merged:
        out[k] = merge_tensors(name, base[k] if base is not None else None, [x[k] for x in experts], key=k,
                               thr=thr, stat=[sd.get(k) for sd in stat] if stat is not None else None, **params)
    return out


def _function(name: str) -> Callable:
    """The library function of one method: merge_tensors(name, ...)."""
    def merge(b: torch.Tensor | None, xs: list[torch.Tensor], **params) -> torch.Tensor:
        return merge_tensors(name, b, xs, **params)
    merge.__name__ = merge.__qualname__ = name
    merge.__doc__ = f"{name}: {REGISTRY[name].summary}. merge_tensors({name!r}, b, xs, **params)."
    return merge


linear = _function("linear")
task_arithmetic = _function("task_arithmetic")
arcee_fusion = _function("arcee_fusion")
passthrough = _function("passthrough")
ties = _function("ties")
dare_linear = _function("dare_linear")
dare_ties = _function("dare_ties")
breadcrumbs = _function("breadcrumbs")
breadcrumbs_ties = _function("breadcrumbs_ties")
della = _function("della")
della_linear = _function("della_linear")
magmax = _function("magmax")
model_stock = _function("model_stock")
slerp = _function("slerp")
tsv = _function("tsv")
iso_c = _function("iso_c")
iso_cts = _function("iso_cts")
wudi = _function("wudi")
doge_ta = _function("doge_ta")
consensus = _function("consensus")
localize_stitch = _function("localize_stitch")
tatr = _function("tatr")
fisher = _function("fisher")
regmean = _function("regmean")
regmean_plusplus = _function("regmean_plusplus")
localize_stitch_trained = _function("localize_stitch_trained")
nearswap = _function("nearswap")
sce = _function("sce")
multislerp = _function("multislerp")
nuslerp = _function("nuslerp")
karcher = _function("karcher")
ram = _function("ram")
ramplus_tl = _function("ramplus_tl")
