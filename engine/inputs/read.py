"""Tensor bytes of one model through read-only memory maps, released after use.

Each shard is mapped once. A chunk is a zero-copy view of the mapped bytes; after a chunk is
done its pages are dropped from this process (MADV_DONTNEED), so resident memory stays at
the chunks in flight whatever the model size, and the next chunk is read ahead by the kernel
(MADV_WILLNEED) while this one is computed. Knows nothing of merging.
"""
import mmap
import warnings
from dataclasses import dataclass, field

import torch

from .header import TensorEntry
from .index import TensorIndex

PAGE = mmap.PAGESIZE
RELEASE_BYTES = 32 << 20  # DONTNEED is batched: each call costs ~50 us (TLB shootdown), per 512 KiB
                          # chunk that was 0.14 s of a 1.9 s task_arithmetic merge of 229M params
READ_AHEAD = 256 << 20    # bytes of the next tensor asked for ahead (WILLNEED): from a cold page cache, task
                          # arithmetic of 834M params took 6.7-7.5 s asking 32 MB ahead, 4.7-5.2 s asking 256 MB


class MappedModel:
    """Read-only views of a model's tensors."""

    def __init__(self, index: TensorIndex):
        self.index = index
        self._maps = {}
        self._pending = None  # (shard, first byte, end byte) released but not yet advised
        for shard in index.shards:     # keyed by path: a recipe's slices take tensors from several models
            with open(index.folder / shard, "rb") as f:
                # ACCESS_COPY (private, copy-on-write) gives a writable buffer for torch.frombuffer
                # without a copy; nothing is ever written, so the file is never touched.
                self._maps[index.folder / shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def chunk(self, entry: TensorEntry, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor, as a view in its stored dtype."""
        dtype = entry.torch_dtype
        if stop <= start:
            return torch.empty(0, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer warns about non-owned memory
            return torch.frombuffer(self._maps[entry.file], dtype=dtype, count=stop - start,
                                    offset=entry.offset + start * dtype.itemsize)

    def release(self, entry: TensorEntry, start: int, stop: int) -> None:
        """Drop the pages of elements [start, stop) from this process's resident set (batched:
        at most RELEASE_BYTES stay resident before the kernel is told)."""
        lo, hi = self._bytes(entry, start, stop)
        shard = entry.file
        if self._pending and self._pending[0] == shard and self._pending[2] == lo:
            lo = self._pending[1]
        elif self._pending:
            self.flush()
        self._pending = (shard, lo, hi)
        if hi - lo >= RELEASE_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            shard, lo, hi = self._pending
            first = lo // PAGE * PAGE
            if hi > first:
                self._maps[shard].madvise(mmap.MADV_DONTNEED, first, hi - first)
            self._pending = None

    def prefetch(self, entry: TensorEntry, max_bytes: int = READ_AHEAD) -> None:
        """Ask the kernel to read the start of a tensor ahead, asynchronously."""
        lo = entry.offset // PAGE * PAGE
        n = min(entry.offset + entry.nbytes, entry.offset + max_bytes) - lo
        if n > 0:
            self._maps[entry.file].madvise(mmap.MADV_WILLNEED, lo, n)

    @staticmethod
    def _bytes(entry: TensorEntry, start: int, stop: int) -> tuple[int, int]:
        itemsize = entry.torch_dtype.itemsize
        return entry.offset + start * itemsize, entry.offset + stop * itemsize

    def close(self) -> None:
        self.flush()
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a view is still alive somewhere; the GC will unmap it
                pass
        self._maps = {}


@dataclass(frozen=True, kw_only=True)
class Readers:
    """A merge's inputs, opened: the base's reader (None without a base), the experts' with their roles,
    and a data-aware method's statistics, one per expert."""
    base: MappedModel | None
    experts: list[MappedModel]
    roles: list[str]
    statistics: list[MappedModel] = field(default_factory=list)

    def close(self) -> None:
        for r in [self.base, *self.experts, *self.statistics]:
            if r is not None:
                r.close()
