"""Merge methods as pure per-tensor functions that never touch files, and the table describing them.

    contract.py   what a method is: Param, Ref, Trim, DataStatistic, Method (what the engine hands each function)
    registry.py   the table: one Method row per method, its parameters, the benchmark protocols
    dispatch.py   calling a row: parameters resolved, exact thresholds, reductions, one chunk merged
    library.py    the methods on plain tensors and state dicts, one function per method:

    >>> mbmerge.methods.ties(base_t, [t1, t2], density=0.2)

The maths lives in one module per method or family over the shared pieces in _blocks.py: the
task-arithmetic family is task_vectors.py (one apply, one fused kernel path) with each member's trim in
its own module (ties_merging, model_breadcrumbs, dare_drop, della_magprune); the others are pass_through,
max_magnitude, interpolation, svd, masks, data_aware, ...; fused.py maps the other element-wise methods
onto the fused kernels; ranking.py holds the exact magnitude ranks. The contract and the table import no
torch (the command line reads them for its options and help); the rest is imported on first use.
"""
import importlib

from .contract import (CHUNK_ALIGN, DataStatistic, Method, Param, check_experts, model_scope, resolve_params,  # noqa
                       row_length)
from .coefficients import WEIGHTS_FROM, nan_weights  # noqa: F401
from .registry import (CALIBRATIONS, PROTOCOLS, REGISTRY, calibrated, collection_params, get,  # noqa: F401
                       protocol_defaults)

_LAZY = {**dict.fromkeys(["apply_chunk", "chunk_cuts", "merge_chunk", "reductions", "thresholds"],
                         ".dispatch"),
         **dict.fromkeys(["merge_tensors", "merge_state_dicts", *REGISTRY], ".library"),
         "Ranking": ".ranking"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
