"""Magnitude ranks that keep exactly what was asked.

A method's ranks name sets of each expert's largest |d_i|: Rank(k) the top k (kept), Rank(t, drop=True)
the top t (dropped, Breadcrumbs' outliers). The order is |d_i| descending, and among equal |d_i| the
order the engine visits them: flat index within a tensor, tensors in plan order (the reference
model's file order) for a model-wide rank. So the top k holds exactly k = max(1, floor(rho n))
entries whenever k entries exist, on bf16 and fp16 models too, whose deltas tie massively.
With keep_ties (TIES' and MergeBench's reference code: kthvalue, then >=) every entry tied at a
threshold stays kept: a kept set takes all of them, a dropped set none.

A set is found exactly by radix select (kernels.kth_largest_abs_ranked) as a Bound: every |d| > t,
and of the entries equal to t the first `ties` in visiting order (None: all). Chunk by chunk,
Ranking turns Bounds into Cuts: the same t and a position in the chunk before which ties belong.
Only chunks visited while a quota runs out need their ties counted.
"""
import math
from typing import Callable, NamedTuple

import torch

from .. import kernels


class Rank(NamedTuple):
    r: int                 # the set of the r largest |d_i|
    drop: bool = False     # the set is dropped rather than kept (ties at its threshold stay, with keep_ties)


class Bound(NamedTuple):
    t: float
    ties: int | None       # entries equal to t in the set, first in visiting order; None: all of them


class Cut(NamedTuple):
    t: float
    pos: int               # entries equal to t at chunk positions < pos are in the set

    def mask(self, a: torch.Tensor) -> torch.Tensor:
        """The set's entries of a chunk of |d|, as a bool tensor."""
        m = a > self.t
        if self.pos > 0:
            m |= (a == self.t) & (torch.arange(a.numel(), device=a.device) < self.pos).view(a.shape)
        return m


def bounds(ranks: list[list[Rank]], chunks: Callable, n: int, keep_ties: bool) -> list[list[Bound]]:
    """Each expert's Bounds of its ranks over n elements of |x_i - b| streamed as chunks() of (b, xs)."""
    def wanted(r: Rank) -> int:   # the set's last value is the r-th largest; a dropped set's edge, the (r+1)-th
        return min(r.r + r.drop, n)
    ks = [[wanted(r) for r in rs if wanted(r) > 0] for rs in ranks]
    out = []
    for rs, found in zip(ranks, kernels.kth_largest_abs_ranked(chunks, ks, n)):
        row, found = [], iter(found)
        for r in rs:
            if wanted(r) == 0:                      # the top 0: nothing
                row.append(Bound(math.inf, 0))
                continue
            k = next(found)
            if r.drop:                              # the top r: the (r+1)-th largest is the first left out
                row.append(Bound(k.value, 0 if keep_ties else k.rank - 1))
            else:
                row.append(Bound(k.value, None if keep_ties or k.rank == k.equal else k.rank))
        out.append(row)
    return out


def top_set(chunks: Callable, k: int, n: int) -> Cut:
    """The k largest of n values v >= 0 streamed as chunks() of (v, offset), exactly (ties at the k-th broken
    by position), as a Cut whose pos is a flat index over all n: a chunk at `offset` takes Cut(t, pos - offset).
    Example: SCE's top-k variance entries."""
    (bound,), = bounds([[Rank(k)]], lambda: ((None, [v]) for v, _ in chunks()), n, keep_ties=False)
    if bound.ties is None or bound.ties == 0:
        return Cut(bound.t, n if bound.ties is None else 0)
    seen = 0
    for v, offset in chunks():               # the position just after the ties-th entry equal to t
        at = (v == bound.t).nonzero().view(-1)
        if seen + at.numel() >= bound.ties:
            return Cut(bound.t, offset + int(at[bound.ties - seen - 1]) + 1)
        seen += at.numel()
    raise AssertionError("fewer ties than radix select counted")


class Ranking:
    """Per expert, Bounds over a tensor (or the model), handed out as each chunk's Cuts in visiting order;
    `left` counts the ties each Bound may still take (None: all)."""

    def __init__(self, bounds: list[list[Bound]]):
        self.bounds = bounds
        self.left = [[b.ties for b in row] for row in bounds]

    def cuts(self, n: int, count: Callable[[int, float], int], locate: Callable[[int, float, int], int]
             ) -> list[list[Cut]]:
        """The Cuts of the next chunk of n elements; count(i, t): expert i's entries with |d| == t in it,
        locate(i, t, k): the position just after its k-th such entry."""
        out = []
        for i, row in enumerate(self.bounds):
            cuts = []
            for j, b in enumerate(row):
                left = self.left[i][j]
                if left is None or left == 0:
                    pos = n if left is None else 0
                else:
                    c = count(i, b.t)
                    pos = n if c <= left else locate(i, b.t, left)
                    self.left[i][j] = max(0, left - c)
                cuts.append(Cut(b.t, pos))
            out.append(cuts)
        return out

    def state(self) -> list:
        return [list(row) for row in self.left]

    def restore(self, left: list) -> None:
        self.left = [list(row) for row in left]

    def to_json(self) -> list:
        return [[[b.t, b.ties] for b in row] for row in self.bounds]

    @classmethod
    def from_json(cls, data: list) -> "Ranking":
        return cls([[Bound(float(t), ties) for t, ties in row] for row in data])


def tie_counts(magnitude: Callable[[int], torch.Tensor]):
    """Ranking.cuts' count and locate, in torch, from magnitude(i): series i's |v| in the chunk, flat."""
    def count(i: int, t: float) -> int:
        return int((magnitude(i) == t).sum())

    def locate(i: int, t: float, k: int) -> int:
        return int((magnitude(i) == t).nonzero()[k - 1]) + 1
    return count, locate
