"""Merge methods as pure per-tensor functions, and the registry that describes them.

A method is `stats(chunks, ...) -> dict` (optional; whole-tensor statistics, streamed over
chunks) and `apply(b, xs, ..., **stats) -> merged chunk`, element-wise on float32 chunks.
Methods never touch files. Every registered method is also a library function on plain tensors:

    >>> mbmerge.methods.ties(base_t, [t1, t2], density=0.2)
"""
import functools
import inspect
import re
from math import floor
from dataclasses import dataclass
from typing import Callable

import torch

from .. import kernels
from ..engine.errors import BadParameter
from . import dare, fused as _fused, linear, masks, ties as _ties
from . import stock as _stock, svd as _svd
from . import breadcrumbs as _breadcrumbs, della as _della, magmax as _magmax
from . import data_aware as _data
from ._blocks import CHUNK_ALIGN, deltas  # noqa: F401  (the engine aligns chunks to CHUNK_ALIGN)


@dataclass(frozen=True)
class Param:
    name: str
    default: object
    help: str
    per_expert: bool = False      # one value per expert (a single value is broadcast)
    choices: tuple = ()
    fraction: bool = False        # must lie in (0, 1]
    aliases: tuple = ()           # more command-line spellings

    def coerce(self, value, method: str):
        """A user value (python or CLI string) as this parameter's type; lists for per-expert ones."""
        if self.per_expert:
            items = value.split(",") if isinstance(value, str) else value
            items = items if isinstance(items, (list, tuple)) else [items]
            return [self._one(v, method) for v in items]
        return self._one(value, method)

    def _one(self, value, method):
        kind = type(self.default)
        try:
            if kind is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                v = value.lower() in ("true", "1", "yes")
            else:
                v = kind(value)
        except (TypeError, ValueError):
            raise BadParameter(f"{method}: {self.name}={value!r} is not a {kind.__name__}") from None
        if self.choices and v not in self.choices:
            raise BadParameter(f"{method}: {self.name}={v!r}; choose one of {', '.join(self.choices)}")
        if self.fraction and not 0 < v <= 1:
            raise BadParameter(f"{method}: {self.name}={v} must be in (0, 1]")
        return v


WEIGHTS = Param("weights", 1.0, "per-expert weight w_i", per_expert=True)
DENSITY = Param("density", 0.2, "fraction rho_i of each delta kept", per_expert=True, fraction=True)
SCALE = Param("scale", 1.0, "lambda, the scale on the merged delta (mergekit: lambda)", aliases=("--lambda",))
CONSENSUS = Param("consensus", "sum", "sign election: sum (by mass) or count (by vote)", choices=("sum", "count"))
AGGREGATE = Param("aggregate", "mean", "agreeing deltas: mean (TIES paper, mergekit normalize) "
                  "or sum (MergeBench)", choices=("mean", "sum"))
RESCALE = Param("rescale", "inverse", "dropped deltas: inverse (1/p, paper) | l1 (mergekit) | none",
                choices=("inverse", "l1", "none"))
SEED = Param("seed", 0, "seed of the counter-based keep masks")
GAMMA = Param("gamma", 0.01, "breadcrumbs: fraction of the largest |d_i| dropped as outliers", per_expert=True)
EPSILON = Param("epsilon", 0.15, "della: keep probability spread, rho_i -+ eps_i from smallest to largest "
                "|d_i| in a row", per_expert=True)
K = Param("k", 2, "consensus: keep entries that at least k TALL masks select")
TALL_LAMBDA = Param("tall_lambda", 0.2, "consensus: TALL mask |e_i| >= lambda_i |tau - e_i|", per_expert=True)
MTL = Param("mtl", "ta", "consensus: the multi-task vector tau, task arithmetic or TIES", choices=("ta", "ties"))
SPARSITY = Param("sparsity", 0.1, "localize_stitch: fraction of each delta kept by its mask",
                 per_expert=True, fraction=True)
FILTER_WISE = Param("filter_wise", False, "model_stock: one interpolation t per row (mergekit filter_wise)")
SLERP_T = Param("t", 0.5, "slerp: interpolation factor, 0 = base, 1 = expert")
COMMON_FRACTION = Param("common_fraction", 0.8, "iso_cts: fraction f of the rank given to the common subspace",
                        fraction=True)


# collected with the statistics (mbmerge stats), not used by apply
SAMPLES = Param("samples", 1000, "statistics: examples of each expert's data (MergeBench: 1000)")
FISHER_LABELS = Param("fisher", "sampled", "fisher: labels sampled from the expert (true Fisher) or the gold "
                      "ones (empirical)", choices=("sampled", "empirical"))
REDUCTION = Param("reduction", 0.5, "regmean: alpha, the factor on the Grams' off-diagonal entries "
                  "(MergeBench's RegMean 0.5, RegMean++ 0.1)")
SIGMOID_BIAS = Param("sigmoid_bias", 3.0, "localize_stitch_trained: mask logits start at +-this")
MASK_LR = Param("lr", 1e8, "localize_stitch_trained: step on the mask logits (raw gradients are tiny)")
EPOCHS = Param("epochs", 1, "localize_stitch_trained: passes over the data, one mask update each")
L1 = Param("l1", 0.0, "localize_stitch_trained: L1 pull of the masks towards 0 (MergeBench: 0)")


@dataclass(frozen=True)
class Statistic:
    """What a data-aware method needs of each expert beyond its weights (see mbmerge.stats)."""
    kind: str                     # fisher | gram | mask: what `mbmerge stats --kind` collects
    whole: bool                   # the method's stats() takes the whole statistic tensor (a Gram
                                  # [in, in]); otherwise apply gets chunks aligned with the weight's
    every_tensor: bool            # every merged tensor has one (Grams: only linear weights)
    collect: tuple[str, ...]      # the parameters that belong to collecting it


def _normalize(default: bool) -> Param:
    return Param("normalize", default, "divide by the sum of weights")


def _scope(default: str) -> Param:
    return Param("sparsify_scope", default, "magnitude ranks over each tensor (mergekit) or over the "
                 "whole model (TIES paper, MergeBench)", choices=("tensor", "model"))


SCOPE = _scope("tensor")
EMBEDDINGS = r"(^|\.)(embed_tokens|lm_head|embed_in|embed_out|wte|wpe|word_embeddings)(\.|$)"


@dataclass(frozen=True)
class Method:
    """One row of the method table: the functions, and what the engine must know to stream them."""
    name: str
    apply: Callable               # apply(b, xs, *, <params>, <stats>, thr, offset, key, shape) -> chunk
    params: tuple[Param, ...]
    paper: str
    stats: Callable | None = None  # stats(chunks, *, <params>, numel, key, shape) -> dict, over one tensor
    ranks: Callable | None = None  # ranks(*, <params>, n) -> per expert, the k-th largest |d_i| wanted as thr
    span: str = "element"         # what one chunk must hold whole: element | row | tensor
    needs_base: bool = True
    min_experts: int = 1
    max_experts: int | None = None
    keep_base: str | None = None  # default --keep-base (tensors copied from the base)
    trim: str = "none"            # none | magnitude | random | mask
    elect: str = "none"           # none | sign
    summary: str = ""
    fused: Callable | None = None  # fused(b, xs, *, <params>, <stats>, out_dtype) -> chunk | None, Triton (fused.py)
    statistic: Statistic | None = None  # data-aware: per-expert statistics streamed beside the weights


def _trim_ranks(*, density: list[float], n: int) -> list[list[int]]:
    """k_i = max(1, floor(rho_i n)); no threshold where rho_i = 1."""
    return [[] if rho >= 1 else [max(1, floor(rho * n))] for rho in density]


def _consensus_ranks(*, mtl: str, density: list[float], n: int) -> list[list[int]]:
    return _trim_ranks(density=density, n=n) if mtl == "ties" else [[] for _ in density]


def _localize_ranks(*, sparsity: list[float], n: int) -> list[list[int]]:
    return _trim_ranks(density=sparsity, n=n)


REGISTRY = {m.name: m for m in [
    Method("linear", linear.apply_linear, (WEIGHTS, _normalize(True)),
           "https://arxiv.org/abs/2203.05482", needs_base=False, fused=_fused.linear,
           summary="weighted average of the experts (model soup)"),
    Method("task_arithmetic", linear.apply_task_arithmetic, (WEIGHTS, SCALE, _normalize(False)),
           "https://arxiv.org/abs/2212.04089", fused=_fused.task_arithmetic,
           summary="b + lam * sum_i w_i d_i"),
    Method("ties", _ties.apply, (WEIGHTS, DENSITY, SCALE, CONSENSUS, AGGREGATE, SCOPE),
           "https://arxiv.org/abs/2306.01708", ranks=_trim_ranks, trim="magnitude", elect="sign", fused=_fused.ties,
           summary="trim to top-rho magnitudes, elect sign, disjoint merge"),
    Method("dare_linear", dare.apply_linear, (WEIGHTS, DENSITY, SCALE, _normalize(False), RESCALE, SEED),
           "https://arxiv.org/abs/2311.03099", stats=dare.stats, trim="random", fused=_fused.dare_linear,
           summary="random drop with rescale, then task arithmetic"),
    Method("dare_ties", dare.apply_ties, (WEIGHTS, DENSITY, SCALE, CONSENSUS, AGGREGATE, RESCALE, SEED),
           "https://arxiv.org/abs/2311.03099", stats=dare.stats, trim="random", elect="sign", fused=_fused.dare_ties,
           summary="random drop with rescale, then TIES sign election"),
    # -- magnitude bands and rank-based drops: breadcrumbs, breadcrumbs_ties, della, della_linear, magmax
    Method("breadcrumbs", _breadcrumbs.apply_linear, (WEIGHTS, DENSITY, GAMMA, SCALE, _normalize(False), SCOPE),
           "https://arxiv.org/abs/2312.06795", ranks=_breadcrumbs.ranks, trim="magnitude", fused=_fused.breadcrumbs,
           summary="drop the top-gamma outliers and the smallest |d|, keep rho; then task arithmetic"),
    Method("breadcrumbs_ties", _breadcrumbs.apply_ties,
           (WEIGHTS, DENSITY, GAMMA, SCALE, CONSENSUS, AGGREGATE, SCOPE), "https://arxiv.org/abs/2312.06795",
           ranks=_breadcrumbs.ranks, trim="magnitude", elect="sign", fused=_fused.breadcrumbs_ties,
           summary="drop the top-gamma outliers and the smallest |d|, keep rho; then TIES sign election"),
    Method("della", _della.apply_ties,
           (WEIGHTS, DENSITY, EPSILON, SCALE, CONSENSUS, AGGREGATE, RESCALE, SEED), "https://arxiv.org/abs/2406.11617",
           stats=_della.stats, span="row", trim="random", elect="sign",
           summary="random drop, keep probability rising with |d| rank in the row; then TIES sign election"),
    Method("della_linear", _della.apply_linear,
           (WEIGHTS, DENSITY, EPSILON, SCALE, _normalize(False), RESCALE, SEED), "https://arxiv.org/abs/2406.11617",
           stats=_della.stats, span="row", trim="random",
           summary="random drop, keep probability rising with |d| rank in the row; then task arithmetic"),
    Method("magmax", _magmax.apply, (SCALE,), "https://arxiv.org/abs/2407.06322",
           summary="per element the delta of largest magnitude: b + lam * d_argmax"),
    # -- whole-tensor statistics: model_stock, slerp, tsv, iso_c, iso_cts
    Method("model_stock", _stock.apply_model_stock, (FILTER_WISE,), "https://arxiv.org/abs/2403.19522",
           stats=_stock.stats_model_stock, span="row", min_experts=2,
           summary="t * mean_i x_i + (1 - t) b, t from the mean pairwise cosine of the deltas"),
    Method("slerp", _stock.apply_slerp, (SLERP_T,), "https://dl.acm.org/doi/10.1145/325165.325242",
           stats=_stock.stats_slerp, min_experts=1, max_experts=1,
           summary="spherical interpolation from the base (t=0) to one expert (t=1), whole tensors"),
    Method("tsv", _svd.apply_tsv, (SCALE,), "https://arxiv.org/abs/2412.00081", span="tensor",
           keep_base=EMBEDDINGS, summary="task singular vectors: top r/T triplets per task, orthogonalised"),
    Method("iso_c", _svd.apply_iso_c, (SCALE,), "https://arxiv.org/abs/2502.04959", span="tensor",
           keep_base=EMBEDDINGS, summary="SVD of the summed deltas with a flat (isotropic) spectrum"),
    Method("iso_cts", _svd.apply_iso_cts, (SCALE, COMMON_FRACTION), "https://arxiv.org/abs/2502.04959",
           span="tensor", keep_base=EMBEDDINGS,
           summary="Iso-C on a common subspace plus per-task orthogonal subspaces"),
    # -- masks
    Method("consensus", masks.consensus, (WEIGHTS, SCALE, K, TALL_LAMBDA, MTL, DENSITY, CONSENSUS, AGGREGATE, SCOPE),
           "https://arxiv.org/abs/2405.07813", ranks=_consensus_ranks, trim="mask", fused=_fused.consensus,
           summary="TALL masks; keep what at least k tasks claim of the multi-task vector"),
    Method("localize_stitch", masks.localize_stitch, (SPARSITY, _scope("model")),
           "https://arxiv.org/abs/2408.13656", ranks=_localize_ranks, trim="magnitude", keep_base=EMBEDDINGS,
           fused=_fused.localize_stitch,
           summary="dataless Localize-and-Stitch: top-k masks per expert, overlaps averaged"),
    # -- data-aware: statistics of each expert on its own data (mbmerge stats)
    Method("fisher", _data.fisher, (WEIGHTS, SAMPLES, FISHER_LABELS), "https://arxiv.org/abs/2111.09832",
           needs_base=False, keep_base=EMBEDDINGS, statistic=Statistic("fisher", False, True, ("samples", "fisher")),
           summary="sum_i w_i F_i x_i / sum_i w_i F_i, F_i the diagonal Fisher of expert i on its data"),
    Method("regmean", _data.regmean, (REDUCTION, SAMPLES), "https://arxiv.org/abs/2212.09849",
           stats=_data.regmean_stats, span="row", needs_base=False, keep_base=EMBEDDINGS,
           statistic=Statistic("gram", True, False, ("samples",)),
           summary="per linear layer the weights minimising the experts' output gaps on their data (Grams)"),
    Method("localize_stitch_trained", _data.localize_stitch_trained,
           (SPARSITY, SIGMOID_BIAS, MASK_LR, EPOCHS, L1, SAMPLES), "https://arxiv.org/abs/2408.13656",
           keep_base=EMBEDDINGS,
           statistic=Statistic("mask", False, True, ("sparsity", "sigmoid_bias", "lr", "epochs", "l1", "samples")),
           summary="Localize-and-Stitch with masks trained on each expert's data, overlaps averaged"),
]}


# A benchmark's choices at once; user parameters win. keep_base: the default --keep-base.
PROTOCOLS = {
    "mergebench": {"sparsify_scope": "model", "aggregate": "sum", "rescale": "inverse", "keep_base": EMBEDDINGS},
}


def protocol_defaults(method: Method, protocol: str | None) -> dict:
    """The protocol's parameter choices that apply to `method` (and its keep_base, if any)."""
    if protocol is None:
        return {}
    if protocol not in PROTOCOLS:
        raise BadParameter(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    names = {p.name for p in method.params} | {"keep_base"}
    return {k: v for k, v in PROTOCOLS[protocol].items() if k in names}


def get(name: str) -> Method:
    """The registry row for `name`; BadParameter naming the known methods otherwise."""
    if name not in REGISTRY:
        raise BadParameter(f"unknown method {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def collection_params(kind: str) -> dict[str, Param]:
    """The parameters of collecting statistics of KIND (fisher, gram, mask), by name."""
    return {p.name: p for m in REGISTRY.values() if m.statistic and m.statistic.kind == kind
            for p in m.params if p.name in m.statistic.collect}


def check_experts(method: Method, n: int) -> None:
    """BadParameter unless the method merges n experts."""
    lo, hi = method.min_experts, method.max_experts
    if n < lo or (hi and n > hi):
        want = f"{lo}" if lo == hi else f"at least {lo}" if not hi else f"{lo} to {hi}"
        raise BadParameter(f"method {method.name} merges {want} expert(s) (with the base); {n} given")


def resolve_params(method: Method, n_experts: int, given: dict) -> dict:
    """Defaults filled in, values coerced and checked, per-expert values broadcast to n_experts."""
    known = {p.name: p for p in method.params}
    unknown = [k for k in given if k not in known]
    if unknown:
        raise BadParameter(f"method {method.name} has no parameter {unknown[0]!r} "
                           f"(it takes: {', '.join(known)})")
    params = {}
    for p in method.params:
        v = p.coerce(given[p.name], method.name) if p.name in given else p.coerce(p.default, method.name)
        if p.per_expert:
            if len(v) == 1:
                v = v * n_experts
            if len(v) != n_experts:
                raise BadParameter(f"{method.name}: {p.name} has {len(v)} values for {n_experts} experts")
        params[p.name] = v
    return params


@functools.cache
def _keywords(fn: Callable) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


def _call(fn: Callable, *args, **available):
    """Call fn with the keyword arguments it declares, taken from `available`."""
    names = _keywords(fn)
    return fn(*args, **{k: v for k, v in available.items() if k in names})


def thresholds(method: Method, params: dict, chunks: Callable, n: int) -> list[list[float]]:
    """Per expert, the |d_i| thresholds method.ranks asks for, exact, over n elements streamed as
    chunks() of (b, xs, offset): one tensor's (scope 'tensor') or the whole model's ('model')."""
    ks = [[min(k, n) for k in ranks] if n else [] for ranks in _call(method.ranks, n=n, **params)]
    return kernels.kth_largest_abs(lambda: (deltas(b, xs) for b, xs, _ in chunks()), ks)


def model_scope(method: Method, params: dict) -> bool:
    """Whether the method's magnitude ranks are taken over the whole model."""
    return method.ranks is not None and params.get("sparsify_scope") == "model"


def statistics(method: Method, params: dict, chunks: Callable, numel: int, key: str, shape: tuple,
               thr: list | None = None, aux: list | None = None) -> dict:
    """What apply needs of one tensor: thresholds (given, when model-wide, or computed here) and
    the method's own statistics; chunks() yields (b, xs, offset) float32 chunks; aux: per expert,
    its whole data statistic of this tensor (None where it has none), for a Statistic.whole method."""
    out = {}
    if method.ranks is not None:
        out["thr"] = thr if thr is not None else thresholds(method, params, chunks, numel)
    if method.stats is not None:
        out.update(_call(method.stats, chunks, numel=numel, key=key, shape=shape, aux=aux, **params))
    return out


def apply_chunk(method: Method, params: dict, stats: dict, b, xs, offset: int, key: str,
                shape: tuple, out_dtype: torch.dtype = torch.float32, aux: list | None = None) -> torch.Tensor:
    """The merged chunk for inputs (any float dtype) starting at element `offset` of tensor `key`:
    out_dtype from the method's fused Triton kernel where kernels.use_triton, else float32 from the
    torch method on float32 inputs; the caller casts to out_dtype either way (a no-op after a kernel).
    aux: per expert, the same chunk of its data statistic (a method with a Statistic not `whole`)."""
    if method.fused is not None and kernels.use_triton(xs[0].device):
        out = _call(method.fused, b, xs, offset=offset, key=key, shape=shape, out_dtype=out_dtype, **params, **stats)
        if out is not None:
            return out.view(xs[0].shape)
    b, xs = (b.float() if b is not None else None), [x.float() for x in xs]     # no copy when float32
    aux = [a.float() for a in aux] if aux is not None else None
    return _call(method.apply, b, xs, offset=offset, key=key, shape=shape, aux=aux, **params, **stats)


def merge_tensors(name: str, b: torch.Tensor | None, xs: list[torch.Tensor], *, key: str = "",
                  thr: list | None = None, stats: list | None = None, **params) -> torch.Tensor:
    """Merge whole tensors in memory with a registered method; returns b's (or x_0's) dtype.

    Args:
        name: a registry name, e.g. "ties".
        b: the base tensor (None for methods that do not need it, e.g. linear).
        xs: the experts' tensors, same shape as b.
        key: the tensor's name; seeds DARE's keep masks, so the engine's output is reproduced.
        thr: magnitude thresholds ranked elsewhere (see merge_state_dicts); default: this tensor's.
        stats: data-aware methods: per expert, its statistic of this tensor (a Fisher diagonal, a
            Gram [in, in] or None, a 0/1 mask), as mbmerge.stats collects them.
        params: method parameters, e.g. density=0.2, weights=[0.3, 0.7].
    Example:
        >>> merge_tensors("ties", b, [x1, x2], density=0.2)
        >>> merge_tensors("fisher", None, [x1, x2], stats=[f1, f2])
    """
    method = get(name)
    if method.needs_base and b is None:
        raise BadParameter(f"method {name} needs a base tensor")
    check_experts(method, len(xs))
    if method.statistic is not None and (stats is None or len(stats) != len(xs)):
        raise BadParameter(f"method {name} needs one statistic per expert (stats=[...])")
    p = resolve_params(method, len(xs), params)
    like = b if b is not None else xs[0]
    bf = b.float().flatten() if b is not None else None
    xf = [x.float().flatten() for x in xs]
    whole = method.statistic is not None and method.statistic.whole
    s = statistics(method, p, lambda: [(bf, xf, 0)], like.numel(), key, tuple(like.shape), thr,
                   aux=stats if whole else None)
    aux = [a.flatten() for a in stats] if stats is not None and not whole else None
    return apply_chunk(method, p, s, bf, xf, 0, key, tuple(like.shape), aux=aux).view(like.shape).to(like.dtype)


def merge_state_dicts(name: str, base: dict | None, experts: list[dict], *, keep_base: str | None = None,
                      stats: list[dict] | None = None, **params) -> dict:
    """Merge in-memory state dicts ({name: tensor}) as the engine merges model folders: floating
    tensors merged (those matching keep_base, default the method's, copied from the base), others
    copied, and sparsify_scope="model" ranking over every merged tensor. stats: data-aware methods,
    per expert a state dict of its statistics (tensors without one, e.g. norms for RegMean, absent).

    Example:
        >>> merge_state_dicts("ties", base_sd, [sd1, sd2], density=0.2, sparsify_scope="model")
    """
    method = get(name)
    ref = base if base is not None else experts[0]
    keep = keep_base if keep_base is not None else method.keep_base
    merged = [k for k, v in ref.items() if v.is_floating_point() and not (keep and re.search(keep, k))]
    thr, p = None, resolve_params(method, len(experts), params)
    if model_scope(method, p):
        def chunks():
            for k in merged:
                yield base[k].float().flatten(), [x[k].float().flatten() for x in experts], 0
        thr = thresholds(method, p, chunks, sum(ref[k].numel() for k in merged))
    out = {k: v.clone() for k, v in ref.items()}
    for k in merged:
        aux = [sd.get(k) for sd in stats] if stats is not None else None
        out[k] = merge_tensors(name, base[k] if base is not None else None, [x[k] for x in experts], key=k,
                               thr=thr, stats=aux, **params)
    return out


for _name in REGISTRY:
    globals()[_name] = functools.partial(merge_tensors, _name)
    globals()[_name].__doc__ = f"{_name}: {REGISTRY[_name].summary}. See merge_tensors."
