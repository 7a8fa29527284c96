"""The method contract: what one row of the method table says, and what the engine hands a method.

A method is a few pure tensor functions that never touch files. The engine streams a tensor to them
in chunks (float32, flat; `offset` is the element index of a chunk's first element in its tensor):

    ranks(<params>, n)              -> per expert, the ranks k of |d_i| wanted as thresholds over n
                                       elements; the engine finds them exactly (radix select) over the
                                       tensor or the model: `thr`
    score(b, xs)                    -> the series ranks ranks in place of |d_i| (>= 0; TATR's conflict)
    reduce(chunks, <params>, <ctx>) -> {name: value}: what apply needs of the whole tensor (rescale gains,
                                       cosines, SVD projections), streamed over chunks() of (b, xs, offset)
    apply(b, xs, <params>, <reductions>, <ctx>) -> the merged float32 chunk
    fused(b, xs, <apply's arguments>, out_dtype) -> the same chunk in out_dtype from a fused kernel
                                       (inputs in their stored dtype), or None where it does not cover
                                       the parameters: then apply runs

A row points at its functions (Ref: imported on first call, so the table itself imports no torch); each
takes, by its keyword-only parameters, what it needs of what is available: the method's parameters, the
outputs of ranks (`thr`) and reduce, and the context: `offset`, `key` (the tensor's name, which seeds
random masks), `shape` (the tensor's), and `stat` (per expert, its data statistic of this chunk; of the
whole tensor for a reduce whose DataStatistic is `whole`).

The task-arithmetic family (methods/task_vectors.py) is one apply and one fused kernel path for all its
members: a member's row names its Trim (the functions of its own module) and its sign election, and no
apply of its own.
"""
import importlib
import inspect
import math
from dataclasses import KW_ONLY, dataclass, field
from functools import cached_property, partial

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
    _: KW_ONLY
    per_expert: bool = False      # one value per expert (a single value is broadcast)
    choices: tuple = ()
    fraction: bool = False        # must lie in (0, 1]
    minimum: float | None = None  # must be at least this
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
        if self.minimum is not None and v < self.minimum:
            raise BadParameter(f"{method}: {self.name}={v} must be at least {self.minimum}")
        if self.fraction and not 0 < v <= 1:
            raise BadParameter(f"{method}: {self.name}={v} must be in (0, 1]")
        return v


@dataclass(frozen=True)
class Ref:
    """A function of this package, imported on first use: Lazy("ties_merging").ranks. Called with what is
    available, it passes on the keyword-only arguments its function takes (a missing one fails the call)."""
    module: str
    name: str

    @cached_property
    def fn(self):
        return getattr(importlib.import_module(f"{__package__}.{self.module}"), self.name)

    @cached_property
    def takes(self) -> tuple[str, ...]:
        return tuple(p.name for p in inspect.signature(self.fn).parameters.values() if p.kind is p.KEYWORD_ONLY)

    def pick(self, available: dict) -> dict:
        return {k: available[k] for k in self.takes if k in available}

    def __call__(self, *args, **available):
        return self.fn(*args, **self.pick(available))

    def __repr__(self):
        return f"{self.module}.{self.name}"


class Lazy:
    """A module of this package as the method table names it, not imported: its attributes are Refs, so
    `ties_merging.ranks` in a row points at that function and the table imports no torch (the command line
    reads it for its options and help before torch loads)."""

    def __init__(self, module: str):
        self.module = module

    def __getattr__(self, name: str) -> Ref:
        if name.startswith("__"):
            raise AttributeError(name)
        ref = Ref(self.module, name)
        setattr(self, name, ref)         # one Ref per function: it resolves (and reads its signature) once
        return ref


FAMILY = Lazy("task_vectors")   # the task-arithmetic family's apply and fused path


@dataclass(frozen=True)
class Trim:
    """A task-arithmetic member's own step, from its module: e_i = trim_i(d_i) before the weights, in torch
    (`torch(ds, <its arguments>) -> [e_i]`) and as kernels.delta_merge's trim arguments (`fused(b, xs, <the
    same>) -> dict`, or None where no kernel covers them), and the statistics it needs (`ranks`, `reduce`)."""
    kind: str                     # none | magnitude | random | mask: docs/methods.md's trim column
    _: KW_ONLY
    torch: Ref | None = None      # None: no trim, e_i = d_i
    fused: Ref | None = None
    ranks: Ref | None = None
    reduce: Ref | None = None

    def __str__(self):
        return self.kind


NO_TRIM = Trim("none")


@dataclass(frozen=True)
class TaskArithmetic:
    """The apply of a task-arithmetic member: the family's (task_vectors.apply) with the row's trim and sign
    election; `fused`, the family's fused path (task_vectors.fused). Called as a Ref is."""
    trim: Trim
    elect: str                    # none | sign

    @property
    def fn(self):
        """The member's own function, its trim (task_vectors.apply without one): docs/methods.md files the
        row under its module."""
        return (self.trim.torch or FAMILY.apply).fn

    @property
    def takes(self) -> tuple[str, ...]:
        own = self.trim.torch.takes if self.trim.torch else ()
        return tuple(k for k in FAMILY.apply.takes if k not in ("trim", "elect")) + own

    def __call__(self, b, xs, **available):
        trim = self.trim.torch and partial(self.trim.torch.fn, **self.trim.torch.pick(available))
        return FAMILY.apply(b, xs, **dict(available, trim=trim, elect=self.elect))

    def fused(self, b, xs, **available):
        trim = self.trim.fused and partial(self.trim.fused.fn, **self.trim.fused.pick(available))
        return FAMILY.fused(b, xs, **dict(available, trim=trim, elect=self.elect))


@dataclass(frozen=True)
class Calibrated:
    """A row's apply followed by a post-step on the whole merged tensor (`step(b, xs, m, <its parameters>)`,
    e.g. calibration.apply_svc). Called as a Ref is; docs/methods.md files it under the row's own module."""
    apply: "Ref | TaskArithmetic"
    step: Ref

    @property
    def fn(self):
        return self.apply.fn

    @property
    def takes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.apply.takes + self.step.takes))

    def __call__(self, b, xs, **available):
        return self.step(b, xs, self.apply(b, xs, **available), **available)


@dataclass(frozen=True)
class DataStatistic:
    """What a data-aware method needs of each expert beyond its weights (collected by mbmerge.stats)."""
    kind: str                     # fisher | gram | mask: what `mbmerge stats --kind` collects
    _: KW_ONLY
    whole: bool                   # reduce takes the whole statistic tensor (a Gram [in, in]); otherwise
                                  # apply gets chunks aligned with the weight's
    every_tensor: bool            # every merged tensor has one (Grams: only linear weights)
    collect: tuple[str, ...]      # the parameters that belong to collecting it


@dataclass(frozen=True, kw_only=True)
class Method:
    """One row of the method table: the functions, what the engine must know to stream them, and
    the method's settings elsewhere (mergekit's defaults, tuning grid, demo and bench cases).

    A row without an apply is a member of the task-arithmetic family: its trim and elect drive the
    family's apply and fused path, and its trim's ranks and reduce are the row's."""
    name: str
    summary: str
    paper: str
    params: tuple[Param, ...]
    apply: Ref | TaskArithmetic | None = None
    reduce: Ref | None = None
    ranks: Ref | None = None
    score: Ref | None = None             # what ranks ranks in place of |d_i|: score(b, xs) -> [series] (float32, >= 0)
    fused: Ref | None = None             # called as apply is, with out_dtype and, for trim 'random', the keep
                                         # bits an L1 pass drew (`kept`): methods/fused.py, or the family's
    span: str = "element"                # what one chunk must hold whole: element | row | tensor
    needs_base: bool = True              # False: the method never reads a base (d_i = x_i in the family)
    min_experts: int = 1
    max_experts: int | None = None
    keep_base: str | None = None         # default --keep-base (tensors copied from the base)
    trim: Trim = NO_TRIM
    elect: str = "none"                  # none | sign
    data_statistic: DataStatistic | None = None
    mergekit: dict | None = None         # mergekit 0.1.5's parameters and defaults, where it has the method
    grid: dict | None = None             # `mbmerge tune`'s default grid (MergeBench's)
    demo: dict = field(default_factory=dict)   # `mbmerge demo`'s parameters (MergeBench's example settings)
    bench: dict | None = None            # `mbmerge bench`'s case (parameters); None: not a bench case

    def __post_init__(self):
        if self.apply is None:           # a task-arithmetic member
            member = TaskArithmetic(self.trim, self.elect)
            fused = member.fused if self.trim.fused or not self.trim.torch else None   # else: torch alone
            for name, value in dict(apply=member, fused=fused, ranks=self.trim.ranks,
                                    reduce=self.trim.reduce).items():
                object.__setattr__(self, name, value)


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


def model_scope(method: Method, params: dict) -> bool:
    """Whether the method's magnitude ranks are taken over the whole model."""
    return method.ranks is not None and params.get("sparsify_scope") == "model"
