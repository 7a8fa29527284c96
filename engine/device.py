"""Where the merge computes: the CPU, or one CUDA device fed through pinned host buffers.

CUDA: each input chunk is copied from the mapped file into a pinned buffer (the CPU memcpy that
reads the file) and sent to the device on a side stream; the compute stream waits for that copy
only. The CPU thread returns at once to read the next chunk while the device still merges this
one, so reading, transfers and compute overlap. Merged chunks come back into pinned buffers and
a writer thread (Output) writes them. Memory is fixed: pinned buffers of SLOT_BYTES, two per
input (a chunk is read while the previous one's copies run) and SLOTS for the output, and the
device tensors of the chunks in flight (bounded by --memory-budget).
CPU: chunks are float32 copies of the mapped bytes; nothing is staged.
"""
import queue
import threading
from typing import Callable

import torch

from ..common.errors import BadParameter

SLOT_BYTES = 16 << 20   # one pinned buffer; a larger chunk travels in pieces
SLOTS = 4               # output buffers: the device fills one while the writer empties the others


def resolve_device(name: str | None) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when present) as a torch.device, checked."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BadParameter(f"--device {name!r}: choose cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise BadParameter(f"--device {name!r}: choose cpu, cuda, cuda:N or auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BadParameter(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if (device.index or 0) >= torch.cuda.device_count():
            raise BadParameter(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _pieces(n: int, itemsize: int) -> list[tuple[int, int]]:
    """[a, z) ranges of n elements, at most SLOT_BYTES each."""
    step = SLOT_BYTES // itemsize
    return [(a, min(a + step, n)) for a in range(0, n, step)]


class Uploader:
    """Copies of mapped input chunks on the compute device."""

    def __init__(self, device: torch.device, n_inputs: int):
        self.device = device
        if device.type == "cuda":
            self.stream = torch.cuda.Stream(device)
            self.slots = [torch.empty(SLOT_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2 * n_inputs)]
            self.copied = [None] * len(self.slots)   # the event of each slot's last copy to the device
            self.next = 0

    def load(self, view: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """`view` (a mapped CPU tensor) on the device, as float32 or in its stored dtype: a copy, but
        for the stored dtype on the CPU, which is the view itself (its pages stay mapped)."""
        if self.device.type == "cpu":
            return view.to(torch.float32, copy=True) if float32 else view
        with torch.cuda.stream(self.stream):
            stored = torch.empty(view.shape, dtype=view.dtype, device=self.device)
        raw, dst = view.view(torch.uint8), stored.view(torch.uint8)
        for a, z in _pieces(raw.numel(), 1):
            i, self.next = self.next, (self.next + 1) % len(self.slots)
            if self.copied[i] is not None:
                self.copied[i].synchronize()           # the slot's previous copy has left it
            slot = self.slots[i][:z - a]
            slot.copy_(raw[a:z])                       # reads the file's pages
            with torch.cuda.stream(self.stream):
                dst[a:z].copy_(slot, non_blocking=True)
                self.copied[i] = torch.cuda.Event()
                self.copied[i].record(self.stream)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.stream)
        stored.record_stream(compute)                  # freed only after the compute stream used it
        return stored.float() if float32 else stored


class Output:
    """Writes merged chunks and journals finished tensors, in order. `write(t, a, values)` takes
    values on any device; with `threaded`, a writer thread does the file writes (and hashing) while
    the caller computes; device values come back through pinned buffers first. Without `threaded`
    the caller writes (tests use it to compare the two)."""

    def __init__(self, write: Callable, tensor_done: Callable, *, threaded: bool, device: torch.device):
        self._write, self._tensor_done = write, tensor_done
        self.threaded, self.error, self.raised = threaded, None, False
        if device.type == "cuda":
            self.free = queue.Queue()
            for _ in range(SLOTS):
                self.free.put(torch.empty(SLOT_BYTES, dtype=torch.uint8, pin_memory=True))
        if threaded:
            # bounds the host memory of queued CPU chunks: on the CPU one written while the next waits
            self.jobs = queue.Queue(maxsize=2 * SLOTS if device.type == "cuda" else 2)
            self.thread = threading.Thread(target=self._drain, name="mbmerge-writer", daemon=True)
            self.thread.start()

    def write(self, t, start: int, values: torch.Tensor) -> None:
        """Write `values` (t's output dtype) as elements [start, ...) of tensor t."""
        if values.device.type == "cpu":
            return self._submit(("write", t, start, values, None, None))
        values = values.flatten()
        for a, z in _pieces(values.numel(), values.element_size()):
            slot = self._take_slot()
            host = slot[:(z - a) * values.element_size()].view(values.dtype)
            host.copy_(values[a:z], non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(values.device))
            self._submit(("write", t, start + a, host, ready, slot))

    def tensor_done(self, t, info=None) -> None:
        """Journal t (with `info`, as it is now) once every write submitted for it is on disk."""
        self._submit(("done", t, info, None, None, None))

    def close(self) -> None:
        """Wait for every submitted write; raise the writer's error, if not raised yet."""
        if self.threaded and self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()
        self._raise()

    def _submit(self, job) -> None:
        self._raise()
        if self.threaded:
            self.jobs.put(job)
        else:
            self._run(*job)

    def _take_slot(self) -> torch.Tensor:
        while True:
            self._raise()
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                if self.threaded and not self.thread.is_alive():
                    raise RuntimeError("mbmerge writer thread stopped")

    def _run(self, kind, t, start, values, ready, slot) -> None:
        if kind == "done":
            return self._tensor_done(t, start)   # a done job carries the tensor's info where writes have `start`
        if ready is not None:
            ready.synchronize()                         # the copy back to the host is complete
        self._write(t, start, values)
        if slot is not None:
            self.free.put(slot)

    def _drain(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is None:
                try:
                    self._run(*job)
                except BaseException as e:  # handed to the main thread at its next call
                    self.error = e
            if job[5] is not None and self.error is not None:
                self.free.put(job[5])

    def _raise(self) -> None:
        if self.error is not None and not self.raised:
            self.raised = True                         # once; the writer keeps skipping jobs
            raise self.error
