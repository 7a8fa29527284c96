"""Which kernels run: the caller's choice (`using(backend, compile)`, else MBMERGE_KERNELS and
MBMERGE_COMPILE, read at each call) and what it sends where: CUDA tensors to Triton, CPU tensors to the
compiled C loops (kernels/cpu.py), the rest to the torch references. The kernels package dispatches
through these, and so does kernels/select.py."""
import contextlib
import contextvars
import importlib.metadata
import importlib.util
import io
import os
from dataclasses import dataclass

import torch

from ..common.errors import BadParameter
from ..common.names import KERNEL_BACKENDS
from . import cpu

BACKENDS = KERNEL_BACKENDS


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
