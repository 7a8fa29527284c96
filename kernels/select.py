"""Exact k-th largest magnitude by radix select on float32 bit patterns; no sort, no topk.

|v| as a non-negative float32 orders exactly like its bit pattern read as an int32, so the
k-th largest |v| is found digit by digit: a histogram of the top 16 bits (2^15 bins: the sign
bit is 0) picks the bin holding it, a histogram of the low 16 bits of that bin's members picks
the rest. Histograms are integer counts, so they add up exactly across chunks, tensors and
devices: the threshold never depends on how the data was split.
Tie rule: every element equal to the threshold is kept (MergeBench's kthvalue rule); mergekit's
argsort keeps exactly k, so elements tied at the threshold may differ from mergekit.
"""
from typing import Callable, Iterable

import torch

HI_BINS = 1 << 15
LO_BINS = 1 << 16


def _keys_hi(v: torch.Tensor, _) -> torch.Tensor:
    bits = v.abs().view(torch.int32).flatten()
    bits >>= 16
    return bits


def _keys_lo(v: torch.Tensor, top: int) -> torch.Tensor:
    bits = v.abs().view(torch.int32).flatten()
    return bits[(bits >> 16) == top] & 0xFFFF


def pick(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest key, rank of that key among the bin's members), k >= 1."""
    from_top = hist.flip(0).cumsum(0)                              # [bins] count of keys >= bin
    i = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype)))
    above = int(from_top[i - 1]) if i > 0 else 0
    return hist.numel() - 1 - i, k - above


def _accumulate(chunks, keys_fn, extra: list, bins: int) -> list[torch.Tensor]:
    total = [torch.zeros(bins, dtype=torch.int64) for _ in extra]
    for vs in chunks():
        for h, v, e in zip(total, vs, extra):
            h += torch.bincount(keys_fn(v, e), minlength=bins).to(h.device)
    return total


def kth_largest_abs(chunks: Callable[[], Iterable[list[torch.Tensor]]], ks: list[int]) -> list[float]:
    """Exact k-th largest |v| of each of several series, streamed in two passes over chunks.

    Args:
        chunks: called once per pass; yields, per chunk, one float32 tensor per series.
        ks: k for each series, 1 <= k <= its length.
    Returns:
        one float threshold per series; |v| >= threshold keeps at least k elements.
    Example:
        >>> kth_largest_abs(lambda: [[torch.tensor([3., -1., 2.])]], [2])
        [2.0]
    """
    hi = _accumulate(chunks, _keys_hi, ks, HI_BINS)
    picks = [pick(h, k) for h, k in zip(hi, ks)]
    lo = _accumulate(chunks, _keys_lo, [top for top, _ in picks], LO_BINS)
    bits = [(top << 16) | pick(h, rank)[0] for h, (top, rank) in zip(lo, picks)]
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32).tolist()
