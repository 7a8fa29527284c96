"""Exact k-th largest magnitude by radix select on float32 bit patterns; no sort, no topk.

|v| as a non-negative float32 orders exactly like its bit pattern read as an int32, so the
k-th largest |v| is found digit by digit: a histogram of the top 16 bits (2^15 bins: the sign
bit is 0) picks the bin holding it, a histogram of the low 16 bits of that bin's members picks
the rest. Histograms are integer counts, so they add up exactly across chunks, tensors and
devices: the threshold never depends on how the data was split.
The low histogram also says where the k-th value sits among its ties (Kth.rank of Kth.equal), which
is what a rule keeping exactly k needs (methods/ranking.py).

On the compiled CPU loops, given the series' length, one pass (and a second over the first chunk) does
instead: the first chunk's histogram says roughly which bins hold each k-th value (for its share of k),
and the pass over every chunk counts only, for a few bins around each (a Window), the elements above
them and their members by their low 16 bits: a vector compare and a popcount an element where the hi
histogram took a scattered increment, and no second pass. Where the k-th value lies outside its
window (a first chunk unlike the rest), the two passes run as before.
"""
import functools
import math
import struct
import threading
from dataclasses import dataclass, field
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


MARGIN = 0.005    # a window spans the bins of the ranks within 0.5% of the first chunk's elements around its k
                  # (10% of the ranks from the nearer end, if fewer)
WIDEST = 24       # bins a Window may span in all (each a 2^16 table of counts per thread), else the second pass


@dataclass
class Window:
    """Two runs of bins of a series (first, bins each), counted by the windows' pass (cpu.histograms): the
    elements above each run, and the members by their low 16 bits, row r of run 0 for bin first0 + r, then
    run 1's rows, in one table per thread; but those equal to the hot key, counted apart."""
    spans: list[int]                   # [first0, bins0, first1, bins1]
    low: torch.Tensor                  # int32 [threads, bins0 + bins1, 2^16]
    above: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.int64))  # above run 0,
    hot: int = -1                      # above run 1, equal to the hot key (float32 bits of |d|; -1: none)

    def _row(self, bin: int) -> int | None:
        first0, bins0, first1, bins1 = self.spans
        return bin - first0 if first0 <= bin < first0 + bins0 else \
            bins0 + bin - first1 if first1 <= bin < first1 + bins1 else None

    def heat(self) -> None:
        """The hot key: the most frequent member counted so far (the first chunk's)."""
        counts = self.low.sum(0, dtype=torch.int64).view(-1)
        at = int(counts.argmax())
        row, key = divmod(at, LO_BINS)
        first0, bins0, first1, _ = self.spans
        self.hot = ((first0 + row if row < bins0 else first1 + row - bins0) << 16) | key if counts[at] else -1

    @functools.cached_property
    def _hot_row(self) -> int | None:
        return self._row(self.hot >> 16) if self.hot >= 0 else None

    @functools.cached_property
    def _per_row(self) -> torch.Tensor:
        """Members per row (bin), the hot key's included: summed once, after the pass, for every k."""
        per_row = self.low.sum((0, 2), dtype=torch.int64)
        if self._hot_row is not None:
            per_row[self._hot_row] += self.above[2]
        return per_row

    def locate(self, k: int) -> tuple[int, int, torch.Tensor] | None:
        """(bin, rank in it, its [2^16] counts by low key) of the k-th largest key, from the counts of the run
        that holds it (the runs never overlap); None if neither does."""
        for run in (0, 1):
            first, bins = self.spans[2 * run:2 * run + 2]
            rows = slice(run * self.spans[1], run * self.spans[1] + bins)
            per_bin, seen = self._per_row[rows], int(self.above[run])
            if bins and seen < k <= seen + int(per_bin.sum()):
                top, rank = pick(per_bin, k - seen)
                row = rows.start + top
                counts = self.low[:, row].sum(0, dtype=torch.int64)
                if row == self._hot_row:
                    counts[self.hot & 0xFFFF] += self.above[2]
                return first + top, rank, counts
        return None


_SCRATCH = threading.local()


def _tables(series: int, threads: int, rows: int) -> torch.Tensor:
    """Zeroed int32 [threads, rows, 2^16] counts for the series-th Window of a call, kept from call to call on
    this thread: a fresh one each time took its pages' faults and zeroing in the loops (breadcrumbs' two runs
    on 834M params took 1.5-2.5 s longer than two passes; with kept tables, about as long)."""
    kept = getattr(_SCRATCH, "tables", None) or {}
    _SCRATCH.tables = kept
    need = threads * rows * LO_BINS
    if series not in kept or kept[series].numel() < need:
        kept[series] = torch.empty(need, dtype=torch.int32)
    return kept[series][:need].view(threads, rows, LO_BINS).zero_()


def _window(h1: torch.Tensor, n1: int, n: int, ks: list[int], series: int) -> Window | None:
    """A Window on a series' ks (at most two) from its first chunk's hi histogram h1 (n1 of its n elements):
    per k, the bins of the ranks k1 = k * n1 / n +- (MARGIN's share + 4 standard deviations + 16), just k's bin
    if n1 is n; None for more ks, or runs wider than WIDEST bins in all."""
    if len(ks) > 2:
        return None
    spans = []
    for k in ks:
        k1 = k * n1 / n
        spread = 4 * math.sqrt(k1 * (1 - k1 / n1)) + 16      # 4 standard deviations of a sampled rank
        margin = 0 if n1 == n else min(MARGIN * n1, 0.1 * min(k1, n1 - k1)) + spread
        first = pick(h1, min(n1, math.ceil(k1 + margin)))[0]
        last = min(pick(h1, max(1, math.floor(k1 - margin)))[0], INF_BIN - 1)
        spans += [first, max(0, last - first + 1)]
    spans += [0, 0] * (2 - len(ks))
    first0, bins0, first1, bins1 = spans
    if bins0 and bins1 and first1 <= first0 + bins0 and first0 <= first1 + bins1:   # runs that meet are one:
        spans = [min(first0, first1), max(first0 + bins0, first1 + bins1) - min(first0, first1), 0, 0]  # counted once
    if spans[1] + spans[3] > WIDEST:
        return None
    return Window(spans, _tables(series, cpu.threads(), spans[1] + spans[3]))


def _windowed(chunks, wanted: list[int], ks: list[list[int]], n: int) -> dict | None:
    """{(i, k): (bin, rank, its [2^16] counts by low key)} for every wanted k, from one hi histogram of the
    first chunk (for the windows) and one windows' pass over every chunk with the compiled loops; None where
    that cannot say (the first chunk not theirs to take, a k outside its window)."""
    windows = None
    for b, xs in chunks():
        xs = [xs[i] for i in wanted]
        if windows is None:
            if not compiled_for(b, *xs):
                return None
            h1 = [torch.zeros(1, HI_BINS, dtype=torch.int64) for _ in wanted]
            cpu.histograms(h1, b, xs, [None] * len(wanted))
            windows = [_window(h[0], xs[0].numel(), n, ks[i], s) for s, (h, i) in enumerate(zip(h1, wanted))]
            if not all(windows):
                return None
            cpu.histograms([None] * len(wanted), b, xs, [cpu.WINDOWS] * len(wanted), windows)
            for w in windows:
                w.heat()
            continue
        cpu.histograms([None] * len(wanted), b, xs, [cpu.WINDOWS] * len(wanted), windows)
    if windows is None:
        return None
    found = {(i, k): w.locate(k) for i, w in zip(wanted, windows) for k in ks[i]}
    return None if None in found.values() else found


def _two_passes(chunks, wanted: list[int], ks: list[list[int]]) -> dict:
    """{(i, k): (bin, rank, its [2^16] counts by low key, or None for a k-th largest that is Inf/NaN)}: the hi
    pass, then the lo pass of each (series, bin) picked."""
    hi = _histograms(lambda: ((b, [xs[i] for i in wanted]) for b, xs in chunks()), [None] * len(wanted))
    picks = {(i, k): pick(h, k) for i, h in zip(wanted, hi) for k in ks[i]}
    # one lo histogram per (series, top bin); a k-th largest that is Inf/NaN (inputs only get here with
    # --allow-nonfinite) gives +inf
    bins = sorted({(i, top) for (i, _), (top, _) in picks.items() if top < INF_BIN})
    lo = _histograms(lambda: ((b, [xs[i] for i, _ in bins]) for b, xs in chunks()),
                     [top for _, top in bins]) if bins else []
    lo = dict(zip(bins, lo))
    return {(i, k): (top, rank, lo[i, top][1:-1] if (i, top) in lo else None) for (i, k), (top, rank) in picks.items()}


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


def kth_largest_abs_ranked(chunks: Callable[[], Iterable[tuple]], ks: list[list[int]],
                           n: int | None = None) -> list[list[Kth]]:
    """kth_largest_abs of series |xs[i] - b| (float32) over chunks() of (b, xs), in any stored dtype (b
    None: |xs[i]|), with each value's place among its ties (Kth), for rules that keep exactly k. Given the
    series' length n, the compiled CPU loops skip the second pass where they can (the module's docstring).

    Example:
        >>> kth_largest_abs_ranked(lambda: [(None, [torch.tensor([3., -2., 2., 2.])])], [[2]])
        [[Kth(value=2.0, rank=1, equal=3)]]
    """
    wanted = [i for i, k in enumerate(ks) if k]
    if not wanted:                       # nothing to rank: no pass over the data
        return [[] for _ in ks]
    found = (_windowed(chunks, wanted, ks, n) if n else None) or _two_passes(chunks, wanted, ks)
    out = {}
    for (i, k), (top, rank, lo) in found.items():
        if top >= INF_BIN:
            out[i, k] = Kth(math.inf, 0, 0)
            continue
        key, within = pick(lo, rank)
        out[i, k] = Kth(_f32((top << 16) | key), within, int(lo[key]))
    return [[out[i, k] for k in series] for i, series in enumerate(ks)]
