"""Exact k-th largest magnitude by radix select on float32 bit patterns; no sort, no topk.

|v| as a non-negative float32 orders exactly like its bit pattern read as an int32, so the
k-th largest |v| is found digit by digit: a histogram of the top 16 bits (2^15 bins: the sign
bit is 0) picks the bin holding it, a histogram of the low 16 bits of that bin's members picks
the rest. Histograms are integer counts, so they add up exactly across chunks, tensors and
devices: the threshold never depends on how the data was split.
The low histogram also says where the k-th value sits among its ties (Kth.rank of Kth.equal), which
is what a rule keeping exactly k needs (methods/ranking.py).
"""
import math
import struct
from typing import Callable, Iterable, NamedTuple

import torch

from . import cpu
from .choice import compiled_for, use_triton

HI_BINS = 1 << 15
LO_BINS = 1 << 16
INF_BIN = 0x7F80  # top 16 bits of +inf; NaNs sort above it


def _f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _hi_keys(v: torch.Tensor) -> torch.Tensor:
    bits = v.abs().view(torch.int32).flatten()
    bits >>= 16
    return bits


def _lo_keys(v: torch.Tensor, top: int) -> torch.Tensor:
    """Low 16 bits of the members of bin `top`, plus 1; a clamp sends the other elements to
    key 0 (below the bin) or 65537 (above it, NaN included), which the caller drops. No
    boolean gather."""
    bits = v.abs().view(torch.int32).flatten()
    bits -= (top << 16) - 1
    return bits.clamp_(0, LO_BINS + 1)


def pick(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest key, rank of that key among the bin's members), k >= 1."""
    from_top = hist.flip(0).cumsum(0)                              # [bins] count of keys >= bin
    i = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype, device=from_top.device)))
    above = int(from_top[i - 1]) if i > 0 else 0
    return hist.numel() - 1 - i, k - above


def _histograms(chunks, tops: list[int | None]) -> list[torch.Tensor]:
    """Per series, the int64 histogram, on the data's device, of its hi keys (top None) or of its lo
    keys in bin `top`, over every chunk of (b, xs), series i being |xs[i] - b| in float32 (b None:
    |xs[i]|): the compiled CPU loop, Triton's atomics, or torch.bincount, each into [rows, bins]
    partial histograms summed at the end."""
    bins = [HI_BINS if top is None else LO_BINS + 2 for top in tops]
    total, add = [], None
    for b, xs in chunks():
        if add is None:
            add, rows = _backend(b, xs)
            total = [torch.zeros(rows, n, dtype=torch.int64, device=xs[0].device) for n in bins]
        add(total, b, xs, tops)
    if not total:
        return [torch.zeros(n, dtype=torch.int64) for n in bins]
    return [h.sum(0) if h.shape[0] > 1 else h[0] for h in total]


def _backend(b, xs):
    """(add(hists, b, xs, tops), rows per histogram) for the kernel choice and these tensors."""
    if compiled_for(b, *xs):
        return cpu.histograms, 1
    if use_triton(xs[0].device):
        from .hist_triton import REPLICAS, accumulate_
        return _per_series(accumulate_), REPLICAS
    return _per_series(_bincount_), 1


def _per_series(accumulate_):
    def add(hists, b, xs, tops):
        for h, x, top in zip(hists, xs, tops):
            accumulate_(h, (x.float() - b.float() if b is not None else x.float()).contiguous(), top)
    return add


def _bincount_(hist: torch.Tensor, v: torch.Tensor, top: int | None) -> None:
    hist[0] += torch.bincount(_hi_keys(v) if top is None else _lo_keys(v, top), minlength=hist.shape[1])


class Kth(NamedTuple):
    """The k-th largest |v| of a series and where it sits among its ties."""
    value: float
    rank: int      # k - #(|v| > value): the k-th is the rank-th of the entries equal to value (1..equal)
    equal: int     # #(|v| == value)


def kth_largest_abs(chunks: Callable[[], Iterable[list[torch.Tensor]]],
                    ks: list[list[int]]) -> list[list[float]]:
    """Exact k-th largest |v| of several series, for several k each, streamed in two passes.

    Args:
        chunks: called once per pass; yields, per chunk, one float32 tensor per series.
        ks: for each series, the ranks wanted (1 <= k <= its length); [] skips the series.
    Returns:
        per series, one threshold per k; |v| >= threshold keeps at least k elements.
    Example:
        >>> kth_largest_abs(lambda: [[torch.tensor([3., -1., 2.])]], [[1, 2]])
        [[3.0, 2.0]]
    """
    ranked = kth_largest_abs_ranked(lambda: ((None, vs) for vs in chunks()), ks)
    return [[kth.value for kth in series] for series in ranked]


def kth_largest_abs_ranked(chunks: Callable[[], Iterable[tuple]], ks: list[list[int]]) -> list[list[Kth]]:
    """kth_largest_abs of series |xs[i] - b| (float32) over chunks() of (b, xs), in any stored dtype (b
    None: |xs[i]|), with each value's place among its ties (Kth), for rules that keep exactly k.

    Example:
        >>> kth_largest_abs_ranked(lambda: [(None, [torch.tensor([3., -2., 2., 2.])])], [[2]])
        [[Kth(value=2.0, rank=1, equal=3)]]
    """
    wanted = [i for i, k in enumerate(ks) if k]
    if not wanted:                       # nothing to rank: no pass over the data
        return [[] for _ in ks]
    hi = _histograms(lambda: ((b, [xs[i] for i in wanted]) for b, xs in chunks()), [None] * len(wanted))
    picks = {(i, k): pick(h, k) for i, h in zip(wanted, hi) for k in ks[i]}
    # the low pass needs one histogram per (series, top bin); a k-th largest that is Inf/NaN
    # (inputs only get here with --allow-nonfinite) gives +inf
    bins = sorted({(i, top) for (i, _), (top, _) in picks.items() if top < INF_BIN})
    lo = _histograms(lambda: ((b, [xs[i] for i, _ in bins]) for b, xs in chunks()),
                     [top for _, top in bins]) if bins else []
    lo = dict(zip(bins, lo))
    out = {}
    for (i, k), (top, rank) in picks.items():
        if top >= INF_BIN:
            out[i, k] = Kth(math.inf, 0, 0)
            continue
        counts = lo[i, top][1:-1]                                    # [65536] the bin's members by low key
        key, within = pick(counts, rank)
        out[i, k] = Kth(_f32((top << 16) | key), within, int(counts[key]))
    return [[out[i, k] for k in series] for i, series in enumerate(ks)]
