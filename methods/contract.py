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

Each function is a Step: the function and the names of the keyword arguments it takes, stated in the
row (a test holds them to the functions' signatures). Names are the method's parameters, the outputs
of ranks (`thr`) and reduce, and the context: `offset`, `key` (the tensor's name, which seeds random
masks), `shape` (the tensor's), and `stat` (per expert, its data statistic of this chunk; of the whole
tensor for a reduce whose DataStatistic is `whole`).
"""
import math
from dataclasses import dataclass, field
from typing import Callable

from ..common.errors import BadParameter

CONTEXT = ("offset", "key", "shape", "stat", "thr")


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
    """One of a method's functions and the keyword arguments it takes, by name."""
    fn: Callable
    takes: tuple[str, ...]

    def __call__(self, *args, **available):
        return self.fn(*args, **{k: available[k] for k in self.takes})


def step(fn: Callable, takes: str = "") -> Step:
    """Step(fn, 'weights scale thr') -> fn takes weights=, scale=, thr=."""
    return Step(fn, tuple(takes.split()))


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
    fused: Callable | None = None        # takes apply.takes and out_dtype (methods/fused.py)
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
