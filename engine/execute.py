"""The merge loop: for each planned tensor, in file order, read each chunk of every input,
convert to float32, hand it to the method, cast, and write it in place. Statistics passes, if
the method has any, re-read the chunks first. Knows nothing of the methods' maths or of file
formats: inputs are MappedModels, the output a ShardWriter.
"""
import collections
import contextlib
import contextvars
import functools
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from tqdm import tqdm

from .. import kernels, methods
from ..methods.dispatch import chunk_cuts, merge_chunk, model_scope, reductions, thresholds
from ..methods.ranking import Ranking
from ..common.errors import MbmergeError, MethodFailed, NonFinite
from ..common.threads import torch_threads
from .inputs.header import DTYPES
from .journal import Journal
from .plan import Plan, TensorPlan
from .device import Output, Uploader
from .inputs.read import MappedModel, Readers
from .output.write import ShardWriter

CACHE_BYTES = 64 << 20  # float32 inputs of a tensor up to this size are read once for all passes


def _sums_finite(b, xs) -> torch.Tensor:
    """Per input, whether its chunk's sum is finite (a NaN, an Inf or an overflow makes it not)."""
    return torch.isfinite(torch.stack([x.sum() for x in ([b] if b is not None else []) + xs]))


@functools.cache
def _chunk_pool() -> ThreadPoolExecutor:
    """Threads that each merge whole chunks with the torch methods, one intra-op thread each."""
    return ThreadPoolExecutor(kernels.cpu.threads(), thread_name_prefix="mbmerge-chunk",
                              initializer=torch.set_num_threads, initargs=(1,))


def _nonfinite(m: MappedModel, entry, chunks) -> bool:
    """Whether the tensor holds a NaN or Inf: the exact test, rereading it from the file."""
    return any(not torch.isfinite(m.chunk(entry, a, z).float()).all() for a, z in chunks)


class Merger:
    """Runs one method over a plan. Tensors not merged are copied from the base (if given) or
    the first expert; the base is read for merging only when the method needs it."""

    def __init__(self, *, plan: Plan, method: methods.Method, readers: Readers, writer: ShardWriter, params: dict,
                 overrides: tuple = (), device: torch.device = torch.device("cpu"), allow_nonfinite: bool = False):
        self.plan, self.method, self.params = plan, method, params
        self.overrides = [(re.compile(pattern), p) for pattern, p in overrides]  # (regex, params): first match wins
        self.stat_inputs = readers.statistics   # per expert, its statistics folder (a data-aware method)
        base, experts, roles = readers.base, readers.experts, readers.roles
        self.experts, self.roles, self.writer = experts, roles, writer
        self.ref = base if base is not None else experts[0]
        self.base = base if method.needs_base else None
        self.inputs = ([self.base] if self.base is not None else []) + experts       # read for merging
        self.input_roles = (["base"] if self.base is not None else []) + roles
        self.device, self.uploader = device, Uploader(device, len(self.inputs))
        # a tensor read more than once is kept (on a GPU up to a quarter of the budget; on the CPU 64 MB)
        self.cache_bytes = plan.budget // 4 if device.type == "cuda" else min(CACHE_BYTES, plan.budget // 4)
        self.allow_nonfinite = allow_nonfinite
        self.checked: set[str] = set(t.name for t in plan.tensors) if allow_nonfinite else set()

    def input_bytes(self, tensors=None) -> int:
        """Bytes read (once) for these tensors (default: all): every input for a merged one."""
        tensors = self.plan.tensors if tensors is None else tensors
        return sum(t.ref.nbytes * (len(self.inputs) if t.merge else 1) for t in tensors)

    def run(self, progress: bool = True, journal: Journal | None = None, done: set[str] = frozenset(),
            model_thr: list | None = None, ties: dict | None = None) -> None:
        """Merge every planned tensor not in `done` (already written by an interrupted run), and
        journal each one completed; model-wide thresholds are computed unless given (as JSON, with the
        ties each may still keep after each done tensor: `ties`)."""
        if model_thr is not None:
            model_thr = Ranking.from_json(model_thr)
        elif model_scope(self.method, self.params):
            model_thr = self._model_thresholds(progress)
            if journal:
                journal.thresholds(model_thr.to_json())
        on_done = (lambda t, left: None) if journal is None else \
            (lambda t, left: self.writer.when_written(t, lambda digest: journal.tensor_done(t.name, digest, left)))
        # a writer thread writes and hashes while the next chunks merge: on a GPU the CPU would wait on the
        # device; on the CPU it hashes while the appender's own thread waits on the disk (834M params, 2 cores:
        # linear 6.4-8.4 s to 4.9-5.2 s, ties 9.5-11.9 s to 8.2-8.8 s, with buffered writes)
        self.output = Output(self.writer.write, on_done, threaded=True, device=self.device)
        with self._threads(), tqdm(total=self.input_bytes(), unit="B", unit_scale=True, disable=not progress,
                  desc=f"mbmerge {self.method.name}") as bar:
            try:
                self._run(bar, model_thr, done, ties or {})
            except BaseException:
                bar.leave = False  # the error line alone, no half-full bar above it
                self.output.close()
                raise
            self.output.close()

    def _run(self, bar, model_thr, done, ties: dict) -> None:
        tensors = [t for t in self.plan.tensors if t.name not in done]
        previous = dict(zip([t.name for t in self.plan.tensors], [None, *self.plan.tensors]))
        bar.update(self.input_bytes() - self.input_bytes(tensors))
        for t, after in zip(tensors, tensors[1:] + [None]):
            before = previous[t.name]
            if model_thr is not None and before is not None and before.name in done:
                model_thr.restore(ties[before.name])   # ties are taken in plan order: as the last run left them
            if after is not None:  # the kernel reads the next tensor while this one is merged
                for m in self.inputs if after.merge else [self.ref]:
                    m.prefetch(m.index.tensors[after.name])
            if t.merge:
                self._merge(t, bar.update, model_thr)
            else:
                self._copy(t, bar.update)
            self.output.tensor_done(t, model_thr.state() if model_thr is not None else None)

    def _model_thresholds(self, progress: bool) -> Ranking:
        """Each expert's |d_i| thresholds ranked over every merged tensor: streaming passes (radix select's:
        one on the compiled CPU loops where the first chunk's windows hold, else two), so the whole model is
        never held."""
        merged = [t for t in self.plan.tensors if t.merge]
        with self._threads(), tqdm(total=self.input_bytes(merged), unit="B", unit_scale=True, leave=False,
                                   disable=not progress, desc="model-wide thresholds") as bar:
            compiled = self.method.fused is not None and kernels.compiled(self.device)

            def chunks():   # the compiled CPU loops read the mapped bytes; they check the values when merging
                bar.reset()                                              # each pass from 0
                for t in merged:
                    for b, xs, a in self._read(t, stored=compiled, check=not compiled):
                        yield b, xs, a
                        bar.update(t.ref.torch_dtype.itemsize * len(self.inputs) * xs[0].numel())
            return thresholds(self.method, self.params, chunks, sum(t.ref.numel for t in merged))

    def _copy(self, t: TensorPlan, done: Callable[[int], None]) -> None:
        out_dtype = DTYPES[t.out_dtype].torch
        for a, z in t.chunks:
            x = self.ref.chunk(t.ref, a, z)
            self.output.write(t, a, x.to(out_dtype, copy=True))
            self.ref.release(t.ref, a, z)
            done((z - a) * t.ref.torch_dtype.itemsize)
        self.ref.flush()

    def _read(self, t: TensorPlan, stored: bool = False, check: bool = True, release: bool = True):
        """(b, xs, offset) chunks of tensor t on the device, float32 (or, with `stored`, in the
        dtype they are stored in, for a fused kernel to read as they are: on the CPU the mapped bytes
        themselves). Unless a kernel checks them (not `check`), the first full read checks the values
        once it holds the last chunk, before yielding it (one device sync per tensor): before anything
        is journaled, before a reduction pass ends, and before a whole-tensor method (one chunk) sees
        them. Each chunk's pages are released once the consumer asks for the next (unless not `release`:
        a later pass reads them again)."""
        check = check and t.name not in self.checked
        if check:  # per input, so far: one flag updated in place (a list of per-chunk sums fragments the heap)
            finite = torch.ones(len(self.inputs), dtype=torch.bool, device=self.device)
        for i, (a, z) in enumerate(t.chunks):
            b = self._chunk(self.base, t, a, z, stored) if self.base is not None else None
            xs = [self._chunk(m, t, a, z, stored) for m in self.experts]
            if check:
                finite &= _sums_finite(b, xs)
                if i == len(t.chunks) - 1:
                    self._check_finite(t, finite.tolist())
            yield b, xs, a
            for m in self.inputs if release else ():
                m.release(m.index.tensors[t.name], a, z)
        if check:
            self.checked.add(t.name)

    def _chunk(self, m: MappedModel, t: TensorPlan, a: int, z: int, stored: bool) -> torch.Tensor:
        """Elements [a, z) of tensor t on the device (_read releases the mapped pages)."""
        return self.uploader.load(m.chunk(m.index.tensors[t.name], a, z), float32=not stored)

    def _check_finite(self, t: TensorPlan, finite_sums: list[bool]) -> None:
        """A sum that is not finite (NaN, Inf, or an overflow) sends its input to the exact test."""
        for m, role, ok in zip(self.inputs, self.input_roles, finite_sums):
            if not ok and _nonfinite(m, m.index.tensors[t.name], t.chunks):
                raise NonFinite(f"{role}: tensor {t.name} holds NaN or Inf values, in {m.index.tensors[t.name].file} "
                                f"(pass --allow-nonfinite to merge it anyway)")

    def _merge(self, t: TensorPlan, done: Callable[[int], None], model_thr) -> None:
        name, shape, out_dtype = t.name, t.ref.shape, DTYPES[t.out_dtype].torch
        # the compiled CPU loops read the mapped bytes as they are, for every pass, and count non-finite
        # values while merging; a GPU kernel reads a tensor read once in its stored dtype (half the bytes)
        compiled = self.method.fused is not None and kernels.compiled(self.device)
        parallel = self._chunks_in_parallel()    # the methods widen the stored chunks in the threads
        stored = compiled or parallel or (self.method.fused is not None and kernels.use_triton(self.device)
                                          and not self._has_stats(model_thr))
        chunks = final = lambda: self._read(t, stored, check=not compiled)  # noqa: E731
        if self._has_stats(model_thr) and t.ref.numel * 4 * len(self.inputs) <= self.cache_bytes:
            cached = list(chunks())  # small tensor: the reduction passes and apply share one read
            chunks = final = lambda: iter(cached)  # noqa: E731
        elif compiled and t.ref.nbytes * len(self.inputs) <= self.cache_bytes:
            # small tensor on the mapped bytes: its pages stay mapped until the last pass (a page
            # fault costs as much as the pass's arithmetic)
            chunks = lambda: self._read(t, stored, check=False, release=False)  # noqa: E731
        whole = self.method.data_statistic is not None and self.method.data_statistic.whole
        params = next((p for pattern, p in self.overrides if pattern.search(name)), self.params)
        whole_stat = [self._stat(m, t, whole=True) for m in self.stat_inputs] if whole else None
        with self._method_errors(t):
            reduced = reductions(self.method, params, chunks, name, shape, model_thr, stat=whole_stat)
        per_elem = t.ref.torch_dtype.itemsize * len(self.inputs)
        finite = torch.ones((), dtype=torch.bool, device=self.device)    # one flag: one device sync per tensor
        inputs_finite = torch.ones(len(self.inputs), dtype=torch.bool)   # what the kernel counted, or torch

        def merged(b, xs, a, stat, reduced):
            with self._method_errors(t):
                out, bad = merge_chunk(self.method, params, reduced, b, xs, a, name, shape, out_dtype, stat)
                out = out.to(out_dtype)                                  # a no-op after a fused kernel
            # the checks of what no kernel counted, here: in the worker threads when they merge
            ok = (bad[0] == 0) if bad is not None else torch.isfinite(out).all() if compiled or \
                not self.allow_nonfinite else True
            return out, bad, ok

        with self._eager_workers(parallel) as submit:
            for (b, xs, a), (out, bad, ok) in submit(merged, ((b, xs, a, self._stats_chunk(t, a, xs, whole),
                                                                chunk_cuts(self.method, reduced, b, xs))
                                                               for b, xs, a in final())):
                finite &= ok
                if bad is not None:
                    inputs_finite &= torch.tensor([n == 0 for n in (bad[1:] if b is not None else bad[2:])])
                elif compiled:                    # the kernel declined the chunk: torch checks the inputs
                    inputs_finite &= _sums_finite(b, xs)
                self.output.write(t, a, out)
                done(per_elem * out.numel())
        for m in self.inputs:
            m.flush()    # a tensor's last pages go with it: held over, they were up to 32 MB per input more
        if compiled and not self.allow_nonfinite:
            self._check_finite(t, inputs_finite.tolist())
        if not finite and not self.allow_nonfinite:   # before the tensor is journaled: nothing of it counts
            raise NonFinite(f"method {self.method.name}: merged tensor {name} holds NaN or Inf values (from the "
                            f"parameters, or an overflow of {t.out_dtype}); nothing was written (pass "
                            f"--allow-nonfinite to write it anyway)")

    def _stats_chunk(self, t: TensorPlan, a: int, xs, whole: bool) -> list | None:
        """Each expert's statistic of a chunk (a DataStatistic that is not `whole`), else None."""
        if not self.stat_inputs or whole:
            return None
        return [self._stat(m, t, a, a + xs[0].numel()) for m in self.stat_inputs]

    def _chunks_in_parallel(self) -> bool:
        """Whether the torch methods merge a tensor's chunks several at a time, on one intra-op thread
        each (_eager_workers): on the CPU, without fused kernels, an element-wise method (a row-span
        method may multiply matrices, and BLAS may sum in another order on another number of threads:
        its bytes would depend on the chunking). A tensor of one chunk too, for the same reason."""
        fused = self.method.fused is not None and kernels.fused(self.device)
        return not fused and self.device.type == "cpu" and self.method.span == "element"

    @contextlib.contextmanager
    def _eager_workers(self, parallel: bool):
        """submit(fn, items): ((b, xs, a), fn(*item)) for items in order. With `parallel`, the torch
        methods on the CPU run each chunk on one intra-op thread, `cpu.threads()` chunks at a time: an
        eager op on a chunk split over an OpenMP team waits for its slowest thread, so one busy core
        made every op wait for it (magmax on 240M params: 4.9 s idle, 27.9 s beside one busy process);
        whole chunks handed to whichever thread is free slow down by the share of the cores taken.
        Otherwise in turn, on the caller's thread."""
        def in_turn(fn, items):
            for item in items:
                yield item[:3], fn(*item)

        if not parallel:
            yield in_turn
            return

        def ahead(fn, items):
            pending = collections.deque()
            for item in items:
                # the caller's context: kernels.using() holds for the workers too
                pending.append((item[:3], _chunk_pool().submit(contextvars.copy_context().run, fn, *item)))
                if len(pending) > kernels.cpu.threads():
                    key, future = pending.popleft()
                    yield key, future.result()
            while pending:
                key, future = pending.popleft()
                yield key, future.result()

        yield ahead

    def _threads(self):
        """torch's intra-op threads while merging: one where the compiled loops' pool or the chunk pool does the
        parallel work, so this thread's small eager ops (histogram picks, reading checks, cuts) start no OpenMP
        team to spin on the cores those pools need (ties of 834M params on 2 cores: libgomp's spinning took 15%
        of the CPU; 9.9-10.1 s, then 8.7-9.2 s); else as they are (a whole-tensor method's BLAS)."""
        compiled = self.method.fused is not None and kernels.compiled(self.device)
        return torch_threads(1 if compiled or self._chunks_in_parallel() else torch.get_num_threads())

    @contextlib.contextmanager
    def _method_errors(self, t: TensorPlan):
        """An error inside a method becomes one line naming the method and the tensor."""
        try:
            yield
        except (MbmergeError, OSError):
            raise
        except Exception as e:
            why = " ".join(str(e).split()) or "no message"
            raise MethodFailed(f"method {self.method.name} failed on tensor {t.name} {list(t.ref.shape)}: "
                               f"{type(e).__name__.lstrip('_')}: {why[:300]}") from e

    def _stat(self, m: MappedModel, t: TensorPlan, a: int = 0, z: int | None = None, whole: bool = False):
        """Elements [a, z) of an expert's statistic of tensor t on the device (all of it, in its own
        shape, when whole); None when it has none (e.g. no Gram for a norm)."""
        entry = m.index.tensors.get(t.name)
        if entry is None:
            return None
        if whole:
            return self._chunk(m, t, 0, entry.numel, stored=False).view(entry.shape)
        return self._chunk(m, t, a, z, stored=False)

    def _has_stats(self, model_thr) -> bool:
        """Whether a tensor is read more than once (ranks or reductions before apply)."""
        return self.method.reduce is not None or (self.method.ranks is not None and model_thr is None)
