"""The heavy steps of the merge methods, each with a torch reference and, where it pays, a
Triton kernel of the same semantics. The backend is decided once, on first use (no device
query at import): Triton for CUDA tensors when it is importable, the torch reference otherwise.
`MBMERGE_KERNELS=torch|triton` overrides; with `TRITON_INTERPRET=1` the Triton kernels run on
CPU tensors, which is how the tests compare the two.

The fused merges `delta_merge`, `masked_stitch` and `tall_merge` (kernels/merge_triton.py) are
Triton only: methods/fused.py calls them when `use_triton(device)`; they are loaded on first use
(importing triton costs 0.24 s of start-up).
"""
import functools
import importlib
import importlib.util
import os

import torch

from . import dare
from .select import kth_largest_abs  # noqa: F401  (histogram passes: torch's bincount or hist_triton)

_TRITON_ONLY = ("delta_merge", "masked_stitch", "tall_merge", "MAX_ELECT_EXPERTS")


@functools.cache
def backend() -> str:
    """'triton' or 'torch', from MBMERGE_KERNELS or what is installed."""
    choice = os.environ.get("MBMERGE_KERNELS", "").lower()
    if choice in ("torch", "triton"):
        if choice == "triton" and not has_triton():
            raise RuntimeError("MBMERGE_KERNELS=triton but triton is not installed")
        return choice
    return "triton" if has_triton() and torch.cuda.is_available() else "torch"


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(device) -> bool:
    """Whether tensors on `device` go to the Triton kernels: the Triton backend, and CUDA (or any
    device under TRITON_INTERPRET=1, the CPU interpreter)."""
    return backend() == "triton" and (torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def uniform(seed: int, start: int, n: int, device="cpu") -> torch.Tensor:
    """float32 uniforms of tl.rand(seed, start + arange(n)), from either backend."""
    device = torch.device(device)
    if use_triton(device):
        from .dare_triton import uniform_triton
        return uniform_triton(seed, start, n, device)
    if device.type == "cpu":
        return dare.uniform_cpu(seed, start, n)
    return dare.uniform_ref(seed, torch.arange(start, start + n, dtype=torch.int64, device=device))


def __getattr__(name: str):
    # kernels.delta_merge etc.: merge_triton (and triton) imported on first use
    if name in _TRITON_ONLY:
        return getattr(importlib.import_module(".merge_triton", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
