"""Dequantization of a flat element range of one quantized tensor, in float32, from its stored values and
scales as read (zero-copy views of the mapped file). Each function mirrors transformers' own reading, cited
beside it, so a merge sees the values transformers would load. Knows nothing of files or configs.
"""
import functools
from dataclasses import dataclass

import torch

from ...kernels import cpu

# transformers/integrations/mxfp4.py FP4_VALUES: e2m1 nibble -> value (bit 3 the sign)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_BIAS = 127         # an e8m0 byte u is the scale 2 ** (u - 127) (mxfp4.py, finegrained_fp8.py)
MXFP4_GROUP = 32        # values per scale: 16 bytes of two nibbles


@dataclass(frozen=True)
class Blocks:
    """A block-scaled tensor [*lead, rows, cols]: value = q * scale of its block, a scale per
    block[0] x block[1] block (the last ones may be partial: a dimension below the block size)."""
    shape: tuple[int, ...]
    block: tuple[int, int]

    @property
    def grid(self) -> tuple[int, ...]:
        """The scale tensor's shape: [*lead, ceil(rows / b0), ceil(cols / b1)]."""
        *lead, rows, cols = self.shape
        return (*lead, -(-rows // self.block[0]), -(-cols // self.block[1]))


def scale_values(s: torch.Tensor) -> torch.Tensor:
    """Scales as float32: uint8 ones are e8m0 exponents (finegrained_fp8.py Fp8Dequantize._dequantize_one)."""
    return (s.to(torch.float32) - E8M0_BIAS).exp2() if s.dtype == torch.uint8 else s.to(torch.float32)


@functools.cache
def fp8_values(dtype: torch.dtype) -> torch.Tensor:
    """Every byte of an FP8 dtype as float32 (torch's own conversion, NaNs included): a table to gather from."""
    return torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float32)


def fp8_float(q: torch.Tensor, step: int = 1 << 16) -> torch.Tensor:
    """q.float() of flat FP8 values, gathered from fp8_values: twice torch's conversion (2^21 elements, 1 core),
    by pieces whose int64 indexes stay in the cache (one int64 index tensor per chunk: TA of 834M params with two
    FP8 experts spent 2.0 s of 12 s widening them)."""
    u, table = q.view(torch.uint8), fp8_values(q.dtype)
    x, idx = torch.empty(q.numel(), dtype=torch.float32), torch.empty(min(step, q.numel()), dtype=torch.long)
    for a in range(0, q.numel(), step):
        m = min(step, q.numel() - a)
        idx[:m].copy_(u[a:a + m])
        torch.take(table, idx[:m], out=x[a:a + m])
    return x


def block_rows(q: torch.Tensor, s: torch.Tensor, layout: Blocks, first: int) -> torch.Tensor:
    """Whole rows [first, first + n) (over [*lead * rows]) of a block-scaled tensor, float32 [n * cols]: q
    (those rows as stored, flat) times the scale of each one's block; s is the whole scale tensor as stored.
    The product is the float32 one transformers takes (finegrained_fp8.py Fp8Dequantize: q.float() *
    s.float()), taken in place over the rows' blocks: no per-element scale tensor (2.6x faster, 2^21 elements)."""
    *_, rows, cols = layout.shape
    *_, srows, scols = layout.grid
    n = q.numel() // cols
    r = torch.arange(first, first + n)
    srow = r // rows * srows + r % rows // layout.block[0]                  # each row's scale row
    scales = scale_values(s.reshape(-1, scols)[srow])                        # [n, scols] each row's scales
    if cpu.library() is not None:       # the same products, gathered and multiplied in C on the threads (5x)
        return cpu.widen_fp8(q.contiguous().view(torch.uint8), fp8_values(q.dtype), scales.contiguous(), cols)
    x = fp8_float(q)
    x.view(n, scols, cols // scols).mul_(scales[:, :, None])                 # [n, scols, b1]
    return x


def mxfp4_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The dequantized shape of gpt-oss blocks [E, rows, G, 16]: [E, G * 32, rows] (mxfp4.py
    _convert_moe_packed_tensors ends with out.transpose(1, 2))."""
    e, rows, groups, _ = blocks_shape
    return (e, groups * MXFP4_GROUP, rows)


def mxfp4_range(blocks: torch.Tensor, scales: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of the dequantized [E, C, rows] tensor, float32, from the whole blocks
    [E, rows, G, 16] and scales [E, rows, G] as stored (views: only the groups of the rows asked are read)."""
    e_count, rows, _, _ = blocks.shape
    cols_per_e = mxfp4_shape(tuple(blocks.shape))[1]
    first, end = start // rows, -(-stop // rows)                           # output rows over [E * C]
    pieces = []
    for e in range(first // cols_per_e, -(-end // cols_per_e)):
        c0, c1 = max(first - e * cols_per_e, 0), min(end - e * cols_per_e, cols_per_e)
        pieces.append(_mxfp4_columns(blocks[e], scales[e], c0, c1))          # [c1 - c0, rows]
    out = torch.cat(pieces).reshape(-1) if len(pieces) > 1 else pieces[0].reshape(-1)
    return out[start - first * rows: stop - first * rows]


def _mxfp4_columns(blk: torch.Tensor, exp: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
    """Dequantized columns [c0, c1) of one expert, transposed: [c1 - c0, rows]. As mxfp4.py: the low
    nibble is the even value, the high the odd one; each value ldexp'd by its group's exponent - 127."""
    g0, g1 = c0 // MXFP4_GROUP, -(-c1 // MXFP4_GROUP)
    b = blk[:, g0:g1, :]                                                   # [rows, ng, 16] uint8
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    values = torch.empty(*b.shape[:2], 2 * b.shape[2], dtype=torch.float32)   # [rows, ng, 32]
    values[..., 0::2] = torch.take(lut, (b & 0x0F).long())
    values[..., 1::2] = torch.take(lut, (b >> 4).long())
    e = exp[:, g0:g1].to(torch.int32) - E8M0_BIAS                           # [rows, ng]
    values = torch.ldexp(values, e[..., None]).reshape(b.shape[0], -1)     # [rows, ng * 32]
    return values.T[c0 - g0 * MXFP4_GROUP: c1 - g0 * MXFP4_GROUP].contiguous()
