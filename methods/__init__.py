"""Merge methods as pure per-tensor functions that never touch files, and the table describing them.

    contract.py   what a method is: Param, Step, DataStatistic, Method (what the engine hands each function)
    registry.py   the table: one Method row per method, its parameters, the benchmark protocols
    dispatch.py   calling a row: parameters resolved, exact thresholds, reductions, one chunk merged
    library.py    the methods on plain tensors and state dicts, one function per method:

    >>> mbmerge.methods.ties(base_t, [t1, t2], density=0.2)

The maths lives in one module per family (averages, ties_merging, model_breadcrumbs, dare_drop,
della_magprune, max_magnitude, interpolation, svd, masks, data_aware) over the shared pieces in
_blocks.py; fused.py maps the element-wise ones onto the fused kernels.
"""
from ._blocks import CHUNK_ALIGN, row_length  # noqa: F401  (how the engine cuts chunks)
from .contract import DataStatistic, Method, Param  # noqa: F401
from .dispatch import (apply_chunk, check_experts, collection_params, model_scope, protocol_defaults,  # noqa: F401
                       reductions, resolve_params, thresholds)
from .library import (breadcrumbs, breadcrumbs_ties, consensus, dare_linear, dare_ties, della,  # noqa: F401
                      della_linear, fisher, iso_c, iso_cts, linear, localize_stitch, localize_stitch_trained,
                      magmax, merge_state_dicts, merge_tensors, model_stock, regmean, slerp, task_arithmetic,
                      ties, tsv)
from .ranking import Ranking  # noqa: F401
from .registry import EMBEDDINGS, PROTOCOLS, REGISTRY, get  # noqa: F401
