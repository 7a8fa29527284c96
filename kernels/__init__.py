"""The heavy steps of the merge methods, each with a torch reference and, where it pays, a
Triton kernel of the same semantics.

Which runs is a choice made by the caller, not found in the environment at import: a merge runs
inside `using(backend, compile)` (engine: MergeSpec.kernels and .compile, the command line's
--kernels). backend 'auto' sends CUDA tensors to Triton when it is importable and everything else
to the torch references; 'torch' and 'triton' force one (with TRITON_INTERPRET=1 the Triton
kernels run on CPU tensors, which is how the tests compare the two). Outside `using`, the
defaults are MBMERGE_KERNELS (else auto) and MBMERGE_COMPILE (else on), read at each call.

The fused merges `delta_merge`, `masked_stitch` and `tall_merge` (kernels/merge_triton.py) are
Triton only: methods/fused.py calls them when `use_triton(device)`; they are loaded on first use
(importing triton costs 0.24 s of start-up). Nothing here queries a device at import.
"""
import contextlib
import contextvars
import importlib
import importlib.util
import os
from dataclasses import dataclass

import torch

from ..common.errors import BadParameter
from . import dare
from .select import kth_largest_abs, kth_largest_abs_ranked  # noqa: F401  (histograms: bincount or Triton)

BACKENDS = ("auto", "torch", "triton")
_TRITON_ONLY = ("delta_merge", "masked_stitch", "tall_merge", "MAX_ELECT_EXPERTS")


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


def uniform(seed: int, start: int, n: int, device="cpu") -> torch.Tensor:
    """float32 uniforms of tl.rand(seed, start + arange(n)), from either backend."""
    device = torch.device(device)
    if use_triton(device):
        from .dare_triton import uniform_triton
        return uniform_triton(seed, start, n, device)
    if device.type == "cpu":
        return dare.uniform_cpu(seed, start, n, compile=chosen().compile)
    return dare.uniform_ref(seed, torch.arange(start, start + n, dtype=torch.int64, device=device))


def __getattr__(name: str):
    # kernels.delta_merge etc.: merge_triton (and triton) imported on first use
    if name in _TRITON_ONLY:
        return getattr(importlib.import_module(".merge_triton", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
