"""The heavy steps of the merge methods, each with a torch reference and, where it pays, a fused
kernel of the same semantics: Triton on the GPU, a compiled C loop on the CPU (kernels/cpu.py).

Which runs is a choice made by the caller, not found in the environment at import: a merge runs
inside `using(backend, compile)` (engine: MergeSpec.kernels and .compile, the command line's
--kernels and --compile). backend 'auto' sends CUDA tensors to Triton when it is importable and CPU
tensors to the compiled C loops (when compiling is allowed and a C compiler works), the rest to the
torch references; 'torch' and 'triton' force one (with TRITON_INTERPRET=1 the Triton kernels run on
CPU tensors, which is how the tests compare them). Outside `using`, the defaults are MBMERGE_KERNELS
(else auto) and MBMERGE_COMPILE (else on), read at each call.

The fused merges return (the chunk, its non-finite counts or None), or None where no kernel covers
the tensors (then the torch method runs). Triton is imported on first use (0.24 s of start-up);
nothing here queries a device at import.
"""
import contextlib
import contextvars
import importlib
import importlib.metadata
import importlib.util
import io
import os
from dataclasses import dataclass

import torch

from ..common.errors import BadParameter
from ..common.names import KERNEL_BACKENDS
from . import cpu, dare
from .select import kth_largest_abs, kth_largest_abs_ranked  # noqa: F401  (histograms: bincount, Triton or C)

BACKENDS = KERNEL_BACKENDS
MAX_ELECT_EXPERTS = 32   # the fused kernels keep each expert's keep flag in a bit of one int32


@dataclass(frozen=True)
class Choice:
    backend: str          # auto | torch | triton
    compile: bool         # compiled CPU loops allowed


_chosen: contextvars.ContextVar[Choice | None] = contextvars.ContextVar("mbmerge_kernels", default=None)


def backend_name(name: str | None) -> str:
    """A --kernels value checked: auto (also for None or ''), torch or triton."""
    name = (name or "auto").lower()
    if name not in BACKENDS:
        raise BadParameter(f"--kernels {name!r}: choose {', '.join(BACKENDS)}")
    if name == "triton" and not has_triton():
        raise BadParameter("--kernels triton: triton is not installed")
    return name


@contextlib.contextmanager
def using(backend: str = "auto", compile: bool = True):
    """Run the block with this kernel choice (see the module docstring)."""
    token = _chosen.set(Choice(backend_name(backend), compile))
    try:
        yield
    finally:
        _chosen.reset(token)


def chosen() -> Choice:
    """The choice in force: set by `using`, else from the environment."""
    c = _chosen.get()
    return c if c is not None else Choice(backend_name(os.environ.get("MBMERGE_KERNELS")),
                                          os.environ.get("MBMERGE_COMPILE") != "0")


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(device) -> bool:
    """Whether tensors on `device` go to the Triton kernels: CUDA with triton installed (auto), or
    the triton backend on CUDA or, under TRITON_INTERPRET=1, any device (the CPU interpreter)."""
    device, backend = torch.device(device), chosen().backend
    if backend == "auto":
        return device.type == "cuda" and has_triton()
    return backend == "triton" and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def compiled(device) -> bool:
    """Whether tensors on `device` go to the compiled C loops: the CPU, backend auto, compiling allowed,
    and a C compiler that works (kernels/cpu.py)."""
    c = chosen()
    return torch.device(device).type == "cpu" and c.backend == "auto" and c.compile and cpu.library() is not None


def merge_backend(device, *, fused: bool = True, span: str = "element") -> tuple[str, int | None]:
    """What merges a method's chunks on `device` under the choice in force (call it inside `using`):
    ('triton' | 'compiled C loops' | 'torch', CPU threads), as the engine dispatches.

    Args:
        device: the merge's device.
        fused: whether the method has a fused kernel (its registry row's `fused`); others run torch.
        span: the method's chunk span; an element-wise torch method merges cpu.threads() chunks at a
            time on one intra-op thread each, a row or whole-tensor one on torch's intra-op threads.
    Returns:
        (backend, threads): threads None on a GPU, where the CPU's threads do not bound the merge.
    Example:
        >>> with using("auto", compile=True):
        ...     merge_backend("cpu")
        ('compiled C loops', 2)
    """
    device = torch.device(device)
    if fused and use_triton(device):
        return "triton", None
    if device.type != "cpu":
        return "torch", None
    if fused and compiled(device):
        return "compiled C loops", cpu.threads()
    return "torch", cpu.threads() if span == "element" else torch.get_num_threads()


def describe() -> str:
    """Which fast paths this installation has, for `mbmerge --version`: the compiled CPU loops (or why
    not) and the Triton version (or absent)."""
    # cpu.library's check run afresh (not its cached answer), its notice line kept as the reason
    with contextlib.redirect_stderr(io.StringIO()) as notice:
        loops = "available" if cpu.library.__wrapped__() is not None else \
            "unavailable: " + notice.getvalue().strip().removeprefix("mbmerge: ").split("; merging with")[0]
    try:
        triton = importlib.metadata.version("triton") + " (CUDA devices)"
    except importlib.metadata.PackageNotFoundError:
        triton = "absent"
    return f"compiled CPU loops: {loops}; triton: {triton}"


def compiled_for(b, *xs) -> bool:
    """Whether the compiled C loops take these chunks (the base b may be None): compiled(device) and
    cpu.covers."""
    return compiled(xs[0].device) and cpu.covers(b, *xs)


def fused(device) -> bool:
    """Whether a fused kernel (Triton or compiled C) merges tensors on `device`."""
    return use_triton(device) or compiled(device)


def delta_merge(b, xs, **kw):
    """The task-arithmetic family in one pass (merge_triton.delta_merge): (flat chunk, non-finite
    counts [output, base, experts] or None), or None where no kernel covers the tensors."""
    if use_triton(xs[0].device):
        return _triton().delta_merge(b, xs, **kw), None
    return cpu.delta_merge(b, xs, **kw) if cpu.covers(b, *xs) and len(xs) <= MAX_ELECT_EXPERTS else None


def masked_stitch(b, xs, **kw):
    """merge_triton.masked_stitch: (flat chunk, None); None off the Triton backend."""
    return (_triton().masked_stitch(b, xs, **kw), None) if use_triton(xs[0].device) else None


def tall_merge(b, xs, **kw):
    """merge_triton.tall_merge: (flat chunk, None); None off the Triton backend."""
    return (_triton().tall_merge(b, xs, **kw), None) if use_triton(xs[0].device) else None


def keep_rates(b, x, m: int, lo: float, step: float):
    """DELLA's keep rates lo + step * (ascending rank of |x - b| in its row of m) / (m - 1) by the compiled
    C loops (cpu.keep_rates), else None."""
    return cpu.keep_rates(b, x, m, lo, step) if compiled_for(b, x) else None


def l1_sums(b, xs, **kw):
    """mergekit's L1 rescale sums of a chunk by the compiled C loops (cpu.l1_sums), else None."""
    return cpu.l1_sums(b, xs, **kw) if compiled_for(b, *xs) else None


def fold_sums(v, granule: int):
    """_blocks.granule_sums of a float32 tensor by the compiled C loops (cpu.fold_sums), else None."""
    return cpu.fold_sums(v, granule) if v.dtype == torch.float32 and compiled_for(None, v) else None


def product_sums(b, xs, pairs, granule: int):
    """The granule sums of d_i * d_j for each pair (cpu.product_sums) by the compiled C loops, else None."""
    return cpu.product_sums(b, xs, pairs, granule) if compiled_for(b, *xs) else None


def mix(b, xs, **kw):
    """model_stock's interpolation (cpu.mix) by the compiled C loops: (flat chunk, non-finite counts), else None."""
    return cpu.mix(b, xs, **kw) if compiled_for(b, *xs) else None


def tie_counts(b, xs):
    """Ranking.cuts' count and locate on a chunk whose inputs the compiled C loops read, else None."""
    return cpu.tie_counts(b, xs) if compiled_for(b, *xs) else None


def _triton():
    return importlib.import_module(".merge_triton", __name__)


def uniform(seed: int, start: int, n: int, device="cpu") -> torch.Tensor:
    """float32 uniforms of tl.rand(seed, start + arange(n)), from either backend."""
    device = torch.device(device)
    if use_triton(device):
        from .dare_triton import uniform_triton
        return uniform_triton(seed, start, n, device)
    if compiled(device):
        return cpu.uniforms(seed, start, n)
    return dare.uniform_ref(seed, torch.arange(start, start + n, dtype=torch.int64, device=device))

