"""Calling a row of the method table: its parameters checked and filled in, its magnitude ranks
found (exact thresholds), its reductions over a tensor, and one chunk merged by the fused kernel
or the torch method. The engine streams tensors through these; the library (library.py) calls
them on whole tensors.
"""
import math
from typing import Callable

import torch

from .. import kernels
from .contract import Method, model_scope  # noqa: F401  (dispatch's callers read it here too)
from .ranking import Ranking, bounds, tie_counts


def thresholds(method: Method, params: dict, chunks: Callable, n: int) -> Ranking:
    """The sets of largest |d_i| (or of method.score's series: TATR's conflict) method.ranks asks for, found
    exactly over n elements streamed as chunks() of (b, xs, offset): one tensor's (scope 'tensor') or the
    whole model's ('model')."""
    pairs = (lambda: ((None, method.score(b, xs)) for b, xs, _ in chunks())) if method.score else \
        (lambda: ((b, xs) for b, xs, _ in chunks()))
    found = bounds(method.ranks(n=n, **params), pairs, n, params.get("keep_ties", False))
    return Ranking(found)


def reductions(method: Method, params: dict, chunks: Callable, key: str, shape: tuple,
               thr: list | None = None, stat: list | None = None) -> dict:
    """What apply needs of one tensor: thresholds (given, when model-wide, or found here) and the
    method's reductions; chunks() yields (b, xs, offset) chunks (float32, or as stored for the
    compiled loops); stat: per expert, its whole data statistic of this tensor (None where it has
    none), for a DataStatistic that is `whole`."""
    out = {}
    if method.ranks is not None:
        out["thr"] = thr if thr is not None else thresholds(method, params, chunks, math.prod(shape))
    if method.reduce is not None:
        # a fused method's reductions (DARE's and DELLA's L1 sums) read the chunks as the kernels do, in
        # their stored dtype, and widen them themselves for torch; the others get float32 chunks
        given = chunks if method.fused is not None else \
            lambda: ((_float(b), [x.float() for x in xs], a) for b, xs, a in chunks())  # noqa: E731
        out.update(method.reduce(given, key=key, shape=shape, stat=stat, **params))
    return out


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.float() if t is not None else None


def _magnitude(b, x) -> torch.Tensor:
    """|d| in float32, as the ranks took it."""
    return (x.float() - b.float()).abs_() if b is not None else x.float().abs()


def apply_chunk(method: Method, params: dict, reduced: dict, b, xs, offset: int, key: str,
                shape: tuple, out_dtype: torch.dtype = torch.float32, stat: list | None = None) -> torch.Tensor:
    """The merged chunk for inputs (any float dtype) starting at element `offset` of tensor `key`:
    out_dtype from the method's fused kernel where kernels.fused(device), else float32 from the torch
    method on float32 inputs; the caller casts to out_dtype either way (a no-op after a kernel).
    stat: per expert, the same chunk of its data statistic (a DataStatistic that is not `whole`)."""
    return merge_chunk(method, params, reduced, b, xs, offset, key, shape, out_dtype, stat)[0]


def chunk_cuts(method: Method, reduced: dict, b, xs) -> dict:
    """reduced with a Ranking replaced by this chunk's Cuts: called for the chunks in visiting order (by
    merge_chunk, or by a caller that merges chunks out of order after)."""
    if not isinstance(reduced.get("thr"), Ranking):
        return reduced
    fused = method.fused is not None and kernels.fused(xs[0].device)
    series = method.score(b, xs) if method.score else None
    counts = (kernels.tie_counts(b, xs) if fused else None) or \
        tie_counts((lambda i: series[i]) if series else (lambda i: _magnitude(b, xs[i])))
    return dict(reduced, thr=reduced["thr"].cuts(xs[0].numel(), *counts))


def merge_chunk(method: Method, params: dict, reduced: dict, b, xs, offset: int, key: str, shape: tuple,
                out_dtype: torch.dtype = torch.float32, stat: list | None = None):
    """apply_chunk, and the fused kernel's counts of non-finite values [output, base, experts] when it
    counted them while merging (the compiled CPU loops do), else None."""
    b = b if method.needs_base else None          # a method without a base never reads one (linear: d_i = x_i)
    available = dict(params, **chunk_cuts(method, reduced, b, xs), offset=offset, key=key, shape=shape)
    if method.fused is not None and kernels.fused(xs[0].device):
        # the keep bits an L1 pass drew for this chunk (DARE, DELLA), for the fused path alone: the torch
        # methods draw their own
        kept = reduced["kept"].get(offset) if reduced.get("kept") else None
        done = method.fused(b, xs, **dict(available, kept=kept, out_dtype=out_dtype))
        if done is not None:
            return done[0].view(xs[0].shape), done[1]
    b, xs = _float(b), [x.float() for x in xs]     # no copy when float32
    stat = [s.float() for s in stat] if stat is not None else None
    return method.apply(b, xs, stat=stat, **available), None
