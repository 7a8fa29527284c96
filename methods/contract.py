"""The method contract: what one row of the method table says, and what the engine hands a method.

A method is a few pure tensor functions that never touch files. The engine streams a tensor to them
in chunks (float32, flat; `offset` is the element index of a chunk's first element in its tensor):

    ranks(<params>, n)              -> per expert, the ranks k of |d_i| wanted as thresholds over n
                                       elements; the engine finds them exactly (radix select) over the
                                       tensor or the model: `thr`
    reduce(chunks, <params>, <ctx>) -> {name: value}: what apply needs of the whole tensor (rescale gains,
                                       cosines, SVD projections), streamed over chunks() of (b, xs, offset)
    apply(b, xs, <params>, <reductions>, <ctx>) -> the merged float32 chunk
    fused(b, xs, <apply's arguments>, out_dtype) -> the same chunk in out_dtype from a fused kernel
                                       (inputs in their stored dtype), or None where it does not cover
                                       the parameters: then apply runs

Each function is a Step: where the function lives ("module:function" in this package, imported on
first call, so the table itself imports no torch) and the names of the keyword arguments it takes,
stated in the row (a test holds them to the functions' signatures). Names are the method's parameters, the outputs
of ranks (`thr`) and reduce, and the context: `offset`, `key` (the tensor's name, which seeds random
masks), `shape` (the tensor's), and `stat` (per expert, its data statistic of this chunk; of the whole
tensor for a reduce whose DataStatistic is `whole`).
"""
import importlib
import math
from dataclasses import dataclass, field

from ..common.errors import BadParameter

CONTEXT = ("offset", "key", "shape", "stat", "thr")
CHUNK_ALIGN = 4096  # chunks start at multiples of it (or of a row): float sums are taken per granule of it


def row_length(shape: tuple) -> int:
    """Elements per row: the last dimension; a 1-D (or 0-D) tensor is one row."""
    return max(1, shape[-1] if len(shape) > 1 else math.prod(shape))


class _Required:
    def __repr__(self):
        return "REQUIRED"


REQUIRED = _Required()   # a mergekit parameter without a default


@dataclass(frozen=True)
class Param:
    """A method parameter: its name (the command line's --name), default, help, and checks."""
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
        if isinstance(v, float) and not math.isfinite(v):
            raise BadParameter(f"{method}: {self.name}={value!r} must be a finite number")
        if self.choices and v not in self.choices:
            raise BadParameter(f"{method}: {self.name}={v!r}; choose one of {', '.join(self.choices)}")
        if self.fraction and not 0 < v <= 1:
            raise BadParameter(f"{method}: {self.name}={v} must be in (0, 1]")
        return v


@dataclass(frozen=True)
class Step:
    """One of a method's functions ("module:function" of this package) and the keyword arguments it
    takes, by name."""
    target: str
    takes: tuple[str, ...]

    @property
    def fn(self):
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)

    def __call__(self, *args, **available):
        return self.fn(*args, **{k: available[k] for k in self.takes})


def step(target: str, takes: str = "") -> Step:
    """step("ties_merging:apply", "weights scale thr"): apply takes weights=, scale=, thr=."""
    return Step(target, tuple(takes.split()))


@dataclass(frozen=True)
class DataStatistic:
    """What a data-aware method needs of each expert beyond its weights (collected by mbmerge.stats)."""
    kind: str                     # fisher | gram | mask: what `mbmerge stats --kind` collects
    whole: bool                   # reduce takes the whole statistic tensor (a Gram [in, in]); otherwise
                                  # apply gets chunks aligned with the weight's
    every_tensor: bool            # every merged tensor has one (Grams: only linear weights)
    collect: tuple[str, ...]      # the parameters that belong to collecting it


@dataclass(frozen=True, kw_only=True)
class Method:
    """One row of the method table: the functions, what the engine must know to stream them, and
    the method's settings elsewhere (mergekit's defaults, tuning grid, demo and bench cases)."""
    name: str
    summary: str
    paper: str
    params: tuple[Param, ...]
    apply: Step
    reduce: Step | None = None
    ranks: Step | None = None
    fused: str | None = None             # "fused:<adapter>": takes apply.takes and out_dtype (methods/fused.py),
                                         # and for trim 'random' the keep bits an L1 pass drew (`kept`)
    span: str = "element"                # what one chunk must hold whole: element | row | tensor
    needs_base: bool = True
    min_experts: int = 1
    max_experts: int | None = None
    keep_base: str | None = None         # default --keep-base (tensors copied from the base)
    trim: str = "none"                   # none | magnitude | random | mask
    elect: str = "none"                  # none | sign
    data_statistic: DataStatistic | None = None
    mergekit: dict | None = None         # mergekit 0.1.5's parameters and defaults, where it has the method
    grid: dict | None = None             # `mbmerge tune`'s default grid (MergeBench's)
    demo: dict = field(default_factory=dict)   # `mbmerge demo`'s parameters (MergeBench's example settings)
    bench: dict | None = None            # `mbmerge bench`'s case (parameters); None: not a bench case


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
    if params.get("normalize") and sum(params["weights"]) == 0:
        raise BadParameter(f"{method.name}: weights {','.join(map(str, params['weights']))} sum to 0 and normalize "
                           f"divides by their sum (pass other --weights, or --no-normalize)")
    return params
