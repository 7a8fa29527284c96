"""Calling a row of the method table: its parameters checked and filled in, its magnitude ranks
found (exact thresholds), its reductions over a tensor, and one chunk merged by the fused kernel
or the torch method. The engine streams tensors through these; the library (library.py) calls
them on whole tensors.
"""
import math
from typing import Callable

import torch

from .. import kernels
from ..common.errors import BadParameter
from ._blocks import deltas
from .contract import Method, Param
from .ranking import Ranking, bounds, tie_counts
from .registry import PROTOCOLS, REGISTRY


def protocol_defaults(method: Method, protocol: str | None) -> dict:
    """The protocol's parameter choices that apply to `method` (and its keep_base, if any)."""
    if protocol is None:
        return {}
    if protocol not in PROTOCOLS:
        raise BadParameter(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    names = {p.name for p in method.params} | {"keep_base"}
    return {k: v for k, v in PROTOCOLS[protocol].items() if k in names}


def collection_params(kind: str) -> dict[str, Param]:
    """The parameters of collecting data statistics of KIND (fisher, gram, mask), by name."""
    return {p.name: p for m in REGISTRY.values() if m.data_statistic and m.data_statistic.kind == kind
            for p in m.params if p.name in m.data_statistic.collect}


def check_experts(method: Method, n: int) -> None:
    """BadParameter unless the method merges n experts."""
    lo, hi = method.min_experts, method.max_experts
    if n < lo or (hi and n > hi):
        want = f"{lo}" if lo == hi else f"at least {lo}" if not hi else f"{lo} to {hi}"
        raise BadParameter(f"method {method.name} merges {want} expert(s) (with the base); {n} given")


def resolve_params(method: Method, n_experts: int, given: dict) -> dict:
    """Defaults filled in, values coerced and checked, per-expert values broadcast to n_experts."""
    known = {p.name: p for p in method.params}
    unknown = [k for k in given if k not in known]
    if unknown:
        raise BadParameter(f"method {method.name} has no parameter {unknown[0]!r} "
                           f"(it takes: {', '.join(known)})")
    params = {}
    for p in method.params:
        v = p.coerce(given[p.name], method.name) if p.name in given else p.coerce(p.default, method.name)
        if p.per_expert:
            if len(v) == 1:
                v = v * n_experts
            if len(v) != n_experts:
                raise BadParameter(f"{method.name}: {p.name} has {len(v)} values for {n_experts} experts")
        params[p.name] = v
    if params.get("normalize") and sum(params["weights"]) == 0:
        raise BadParameter(f"{method.name}: weights {','.join(map(str, params['weights']))} sum to 0 and normalize "
                           f"divides by their sum (pass other --weights, or --no-normalize)")
    return params


def model_scope(method: Method, params: dict) -> bool:
    """Whether the method's magnitude ranks are taken over the whole model."""
    return method.ranks is not None and params.get("sparsify_scope") == "model"


def thresholds(method: Method, params: dict, chunks: Callable, n: int) -> Ranking:
    """The sets of largest |d_i| method.ranks asks for, found exactly over n elements streamed as
    chunks() of (b, xs, offset): one tensor's (scope 'tensor') or the whole model's ('model')."""
    found = bounds(method.ranks(n=n, **params), lambda: (deltas(b, xs) for b, xs, _ in chunks()), n,
                   params.get("keep_ties", False))
    return Ranking(found)


def reductions(method: Method, params: dict, chunks: Callable, key: str, shape: tuple,
               thr: list | None = None, stat: list | None = None) -> dict:
    """What apply needs of one tensor: thresholds (given, when model-wide, or found here) and the
    method's reductions; chunks() yields (b, xs, offset) float32 chunks; stat: per expert, its whole
    data statistic of this tensor (None where it has none), for a DataStatistic that is `whole`."""
    out = {}
    if method.ranks is not None:
        out["thr"] = thr if thr is not None else thresholds(method, params, chunks, math.prod(shape))
    if method.reduce is not None:
        out.update(method.reduce(chunks, key=key, shape=shape, stat=stat, **params))
    return out


def apply_chunk(method: Method, params: dict, reduced: dict, b, xs, offset: int, key: str,
                shape: tuple, out_dtype: torch.dtype = torch.float32, stat: list | None = None) -> torch.Tensor:
    """The merged chunk for inputs (any float dtype) starting at element `offset` of tensor `key`:
    out_dtype from the method's fused Triton kernel where kernels.use_triton, else float32 from the
    torch method on float32 inputs; the caller casts to out_dtype either way (a no-op after a kernel).
    stat: per expert, the same chunk of its data statistic (a DataStatistic that is not `whole`)."""
    available = dict(params, **reduced, offset=offset, key=key, shape=shape)
    if isinstance(available.get("thr"), Ranking):   # this chunk's Cuts, in visiting order
        magnitude = (lambda i: (xs[i].float() - b.float()).abs_()) if b is not None else (lambda i: xs[i].float().abs())
        available["thr"] = available["thr"].cuts(xs[0].numel(), *tie_counts(magnitude))   # |d_i| as ranked
    if method.fused is not None and kernels.use_triton(xs[0].device):
        out = method.fused(b, xs, out_dtype=out_dtype, **{k: available[k] for k in method.apply.takes})
        if out is not None:
            return out.view(xs[0].shape)
    b, xs = (b.float() if b is not None else None), [x.float() for x in xs]     # no copy when float32
    stat = [s.float() for s in stat] if stat is not None else None
    return method.apply(b, xs, stat=stat, **available)
