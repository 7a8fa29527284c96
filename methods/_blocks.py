"""Shared pieces of the task-arithmetic family (docs/methods.md notation): d_i = x_i - b, trimming,
sign election, disjoint aggregation. Pure tensor functions on float32 chunks; no files.

Masks are kept as float arithmetic (relu, sign, copysign, threshold), never as bool tensors:
on CPU a comparison plus bool->float conversion costs 5-10x a float op (2^17 elements, 2 cores:
`d * (d.abs() >= t)` 103 us, `threshold(d.abs(), t', 0).copysign_(d)` 30 us).
"""
import math
import struct
from math import floor

import torch
from torch.nn.functional import threshold

from .. import kernels
from .contract import CHUNK_ALIGN, row_length  # noqa: F401  (granule_sums' size; row-span methods' chunks)
from .ranking import Cut


def top_k(rho: float, n: int) -> int:
    """k = max(1, floor(rho n)): the entries a density rho keeps of n."""
    return max(1, floor(rho * n))


def deltas(b: torch.Tensor, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """d_i = x_i - b."""
    return [x - b for x in xs]


def float_deltas(b: torch.Tensor | None, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """d_i = x_i - b in float32, from chunks in any stored dtype (x_i itself without a base)."""
    return [x.float() - b.float() if b is not None else x.float() for x in xs]


def float_below(t: float) -> float:
    """The largest float32 below t (> 0): |d| > float_below(t) is |d| >= t."""
    (bits,) = struct.unpack("<i", struct.pack("<f", t))
    return struct.unpack("<f", struct.pack("<i", bits - 1))[0]


def trim(d: torch.Tensor, thr: list[Cut]) -> torch.Tensor:
    """Keep the entries of the set thr[0] (a Cut: |d| > t, and |d| = t before its position), dropped
    ones as 0 with d's sign; thr = [] keeps everything."""
    if not thr or thr[0].t <= 0:
        return d                                   # dropping an entry that is 0 leaves it as it is
    return _keep(d.abs(), thr[0]).copysign_(d)


def _keep(a: torch.Tensor, cut: Cut) -> torch.Tensor:
    """|d| on the set of `cut`, 0 elsewhere; one float threshold unless the cut splits its ties."""
    if cut.pos >= a.numel():
        return threshold(a, float_below(cut.t), 0.0)       # every tie: |d| >= t
    if cut.pos <= 0:
        return threshold(a, cut.t, 0.0)                    # no tie: |d| > t
    return torch.where(cut.mask(a), a, 0.0)


def cut_bounds(cuts: list[Cut | None], side: str) -> dict:
    """Per expert a Cut (None: none) as kernels.delta_merge's band bound `side`: 'lo', the kept set's edge
    (|d| above it kept), or 'hi', the dropped set's (|d| above it dropped)."""
    return {side: [c.t if c else None for c in cuts], f"{side}_pos": [c.pos if c else None for c in cuts]}


def weighted_sum(ts: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    """sum_i w_i t_i, accumulated in order."""
    acc = ts[0] * w[0]
    for t, wi in zip(ts[1:], w[1:]):
        acc += t * wi
    return acc


def elect(es: list[torch.Tensor], consensus: str) -> torch.Tensor:
    """Elected sign s in {-1, +1}: sign(sum_i e_i) ('sum') or sign(sum_i sign(e_i)) ('count').
    A zero sum counts as positive, as in mergekit (a -0.0 sum arises only where every e_i is 0,
    where no expert can agree, so copysign's -1 there changes nothing)."""
    votes = es if consensus == "sum" else [e.sign() for e in es]
    total = votes[0].clone()
    for v in votes[1:]:
        total += v
    return torch.ones_like(total).copysign_(total)


def disjoint_merge(es: list[torch.Tensor], w: list[float], s: torch.Tensor, aggregate: str) -> torch.Tensor:
    """m = sum_i agree_i e_i, agree_i = [sign(e_i) = s and e_i != 0];
    'mean' divides by sum_i agree_i w_i (0 -> 1), 'sum' does not."""
    mag, den = torch.zeros_like(s), torch.zeros_like(s)
    for e, wi in zip(es, w):
        a = (e * s).relu_()              # |e_i| where e_i agrees with s, else 0
        mag += a
        den.add_(a.sign_(), alpha=wi)    # agree_i as 1.0 / 0.0
    m = mag.mul_(s)                      # sum of same-signed values: same bits as summing e_i
    if aggregate == "sum":
        return m
    # with positive weights den is 0 or >= min(w), and m is 0 where den is 0
    return m.div_(den.clamp_(min=min(w)) if min(w) > 0 else den.add_(den == 0))


def granule_sums(v: torch.Tensor, size: int = CHUNK_ALIGN) -> torch.Tensor:
    """float64 sums of v over consecutive `size`-element granules (the last may be short).

    Chunks start at multiples of CHUNK_ALIGN (or, for row-span methods, of the row length, with
    size = row_length), so concatenating these per chunk and summing gives the same bits for any
    chunking. Each granule is summed in a fixed order, which the compiled C loops repeat bit for
    bit (torch's own sum order is its business): zero-padded to a power of two, then the upper half
    added to the lower until one value is left.
    """
    compiled = kernels.fold_sums(v, size)
    if compiled is not None:
        return compiled
    granules, width, full = -(-v.numel() // size), 1 << (size - 1).bit_length(), v.numel() // size
    if width == size and full == granules:
        folded = v.double().view(granules, width)
    else:
        folded = v.new_zeros(granules, width, dtype=torch.float64)
        folded[:full, :size] = v[:full * size].view(full, size)
        folded[full:, :v.numel() - full * size] = v[full * size:]
    while width > 1:
        width //= 2
        folded = folded[:, :width] + folded[:, width:]
    return folded[:, 0]


def product_sums(b, xs: list[torch.Tensor], pairs: list[tuple[int, int]], size: int = CHUNK_ALIGN) -> list:
    """granule_sums(d_i * d_j, size) for each pair (i, j), d_i = x_i - b in float32 (x_i itself without a
    base), from chunks in any stored dtype: the compiled C loops' bits where they take the chunks."""
    compiled = kernels.product_sums(b, xs, pairs, size)
    if compiled is not None:
        return list(compiled)
    ds = float_deltas(b, xs)
    return [granule_sums(ds[i] * ds[j], size) for i, j in pairs]


def float_above(t: float) -> float:
    """The smallest float32 above t (>= 0, finite): |d| < float_above(t) is |d| <= t."""
    (bits,) = struct.unpack("<i", struct.pack("<f", t))
    return struct.unpack("<f", struct.pack("<i", bits + 1))[0]


def band(d: torch.Tensor, thr: list[Cut]) -> torch.Tensor:
    """Keep the entries of the set `keep` and not of the set `drop`, thr = [drop, keep] (Cuts: the
    largest |d|, dropped as outliers, and the largest kept); thr = [] keeps everything."""
    if not thr:
        return d
    drop, keep = thr
    a = d.abs()
    if drop.t < math.inf and drop.pos <= 0:
        a = threshold(a.neg_(), -float_above(drop.t), 0.0).neg_()   # |d| where |d| <= t, else 0
    elif drop.t < math.inf:
        a = torch.where(drop.mask(a), 0.0, a)
    return (a if keep.t <= 0 else _keep(a, keep)).copysign_(d)


class Total:
    """A float sum over a tensor streamed in chunks, the same for any chunking: per-granule float64
    sums (granule_sums), kept as Python floats (small torch tensors kept alive while chunk-sized
    buffers churn fragment the heap: +400 MB RSS on one 32M-element tensor) and added exactly."""

    def __init__(self):
        self.parts: list[float] = []

    def add(self, v: torch.Tensor, size: int = CHUNK_ALIGN) -> None:
        self.add_sums(granule_sums(v, size))

    def add_sums(self, sums: torch.Tensor) -> None:
        """Granule sums taken elsewhere (the compiled C loops)."""
        self.parts.extend(sums.tolist())

    def value(self) -> float:
        return math.fsum(self.parts)


class KeepBits:
    """The keep bits an L1 pass draws on the compiled C loops, by chunk offset, for the merge pass to
    read instead of drawing them again (DARE's Philox; DELLA's row ranks too): a bit per element and
    expert, in one buffer for the tensor (chunk-sized buffers kept while others churn fragment the heap:
    +200 MB RSS), where it fits `limit` bytes."""

    def __init__(self, *, shape: tuple, experts: int, granule: int, limit: int = 32 << 20):
        self.chunks: dict[int, torch.Tensor] = {}
        self.size = (experts, -(-math.prod(shape) // 8))
        self.fits = experts * self.size[1] <= limit and granule % 8 == 0   # the C loops write a byte per 8
        self.bits = None

    def new(self, b, xs, offset: int) -> torch.Tensor | None:
        """This chunk's [experts, ceil(n / 8)] part of the buffer, for the C loops to fill, or None (no
        room, or the compiled loops do not take the chunk)."""
        first, size = offset // 8, -(-xs[0].numel() // 8)
        if not self.fits or first + size > self.size[1] or not kernels.compiled_for(b, *xs):
            return None
        if self.bits is None:
            self.bits = torch.empty(self.size, dtype=torch.uint8)
        self.chunks[offset] = self.bits[:, first:first + size]
        return self.chunks[offset]


def l1_gains(chunks, sums, experts: int) -> list[float]:
    """||d_i||_1 / ||kept_i d_i||_1 per expert (1 if a norm < 1e-7): mergekit's rescale of randomly
    dropped deltas, over a tensor streamed in chunks; sums(b, xs, offset) -> [2, experts, granules]:
    a chunk's granule sums of |d_i| and of |kept_i d_i|."""
    full, kept = [Total() for _ in range(experts)], [Total() for _ in range(experts)]
    for b, xs, offset in chunks():
        s = sums(b, xs, offset)
        for i in range(experts):
            full[i].add_sums(s[0][i])
            kept[i].add_sums(s[1][i])
    norms = [(f.value(), k.value()) for f, k in zip(full, kept)]
    return [f / k if f >= 1e-7 and k >= 1e-7 else 1.0 for f, k in norms]
