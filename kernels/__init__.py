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
import importlib

import torch

from . import cpu, dare
from .choice import (BACKENDS, Choice, backend_name, chosen, compiled, compiled_for, describe, fused,  # noqa: F401
                     has_triton, merge_backend, use_triton, using)
from .select import kth_largest_abs, kth_largest_abs_ranked  # noqa: F401  (histograms: bincount, Triton or C)

MAX_ELECT_EXPERTS = 32   # the fused kernels keep each expert's keep flag in a bit of one int32


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

