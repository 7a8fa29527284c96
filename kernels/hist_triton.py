"""The radix-select histograms of kernels/select.py in Triton: counts of `_hi_keys` (the top 16
bits of |v|) or of `_lo_keys` (the low 16 bits of one top bin's members, + 1, clamped to
[0, 2^16 + 1]), added in place with atomics into an int64 histogram on v's device. Integer
counts: the thresholds are bit-identical to the torch path's (torch.bincount).
Imported only when the Triton backend is chosen.
"""
import torch
import triton
import triton.language as tl

BLOCK_SIZE = 4096
NUM_WARPS = 8
# Deltas concentrate in a few exponent bins, so every program's atomics would hit the same few
# addresses and serialise in L2: program p adds into replica p % REPLICAS instead (privatised
# histograms, summed once at the end). Not measured here (no GPU): tune on one.
REPLICAS = 8


@triton.jit
def _histogram_kernel(v_ptr,      # *f32 [n]
                      hist_ptr,   # *i64 [REPLICAS, BINS], accumulated in place
                      n,          # elements of v
                      base,       # i32 (top << 16) - 1: the low pass's key of |v| bits is bits - base
                      LOW: tl.constexpr, BINS: tl.constexpr, REPLICAS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    # bits = v.abs().view(torch.int32)
    bits = tl.load(v_ptr + offs, mask=mask).to(tl.int32, bitcast=True) & 0x7FFFFFFF
    hist = hist_ptr + (pid % REPLICAS) * BINS
    if LOW:
        # key = (bits - base).clamp(0, BINS - 1), int32 wrap-around as in torch
        key = tl.minimum(tl.maximum(bits - base, 0), BINS - 1)
        inside = mask & (key > 0) & (key < BINS - 1)
        tl.atomic_add(hist + key, 1, mask=inside)
        # most elements lie below or above the bin: one atomic per program for each end
        tl.atomic_add(hist, tl.sum((mask & (key == 0)).to(tl.int32)))
        tl.atomic_add(hist + BINS - 1, tl.sum((mask & (key == BINS - 1)).to(tl.int32)))
    else:
        # key = bits >> 16
        tl.atomic_add(hist + (bits >> 16), 1, mask=mask)


def accumulate_(hist: torch.Tensor, v: torch.Tensor, top: int | None) -> None:
    """hist += the histogram of v's keys: hi keys (top None), else the lo keys of bin `top`.

    Args:
        hist: [REPLICAS, bins] int64 on v's device, bins = 2^15 (hi) or 2^16 + 2 (lo).
        v: a contiguous float32 tensor.
    """
    if v.dtype != torch.float32 or not v.is_contiguous():
        raise ValueError(f"histograms take contiguous float32 tensors, not {v.dtype} "
                         f"(contiguous={v.is_contiguous()})")
    n = v.numel()
    if n:
        base = 0 if top is None else (top << 16) - 1
        _histogram_kernel[(triton.cdiv(n, BLOCK_SIZE),)](v, hist, n, base, LOW=top is not None, BINS=hist.shape[1],
                                                         REPLICAS=hist.shape[0], BLOCK_SIZE=BLOCK_SIZE,
                                                         num_warps=NUM_WARPS)
