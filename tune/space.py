"""What a study searches: a grid of values (MergeBench's grids, `--sampler grid`), or ranges for
TPE, CMA-ES and NSGA-II, where a per-expert parameter is one independent value per expert (as mergekit-evolve
searches weights and densities).

Grid text: 'scale=0.2,0.4 density=0.1,0.2'; a range: 'scale=0.2:1.0'. A search sampler reads a list
of numbers as the range between its smallest and largest value. With `groups` G > 1 (--per-layer G), every
numeric range is searched once per group of layers (and per expert where per_expert says): a value is then a
list over the groups (of lists over the experts), which tune.layers writes as a mergekit recipe's slices.
"""
import itertools
import json
from dataclasses import dataclass, field

import optuna

from .. import methods
from ..common.errors import BadParameter

SAMPLERS = ("grid", "tpe", "cmaes", "nsga2")


def parse_grid(text: str) -> dict[str, list[str] | tuple[str, str]]:
    """'scale=0.2,0.4 density=0.1:0.3' -> {"scale": ["0.2", "0.4"], "density": ("0.1", "0.3")} (values
    are checked and converted by the method's parameters)."""
    grid = {}
    for item in text.split():
        name, sep, values = item.partition("=")
        if not sep or not name or not values:
            raise BadParameter(f"--grid item {item!r}: write name=v1,v2,... or name=low:high (e.g. scale=0.2,0.4)")
        lo, colon, hi = values.partition(":")
        grid[name.replace("-", "_")] = (lo, hi) if colon else values.split(",")
    if not grid:
        raise BadParameter("--grid is empty")
    return grid


def default_grid(method: str) -> dict[str, list]:
    """MergeBench's grid of the method (its registry row)."""
    grid = methods.get(method).grid
    if grid is None:
        known = [m.name for m in methods.REGISTRY.values() if m.grid]
        raise BadParameter(f"no default grid for {method}; give one with --grid 'name=v1,v2 ...' "
                           f"(default grids: {', '.join(known)})")
    return grid


def _one(value):
    """A per-expert parameter's single value (grids broadcast one value to every expert)."""
    return value[0] if isinstance(value, list) else value


@dataclass(kw_only=True)
class Space:
    """grid: {name: values}; or ranges: {name: (low, high) or [choices]} with per_expert names."""
    method: str
    sampler: str = "grid"
    grid: dict = field(default_factory=dict)
    ranges: dict = field(default_factory=dict)
    per_expert: tuple[str, ...] = ()
    n_experts: int = 1
    groups: int = 1

    @classmethod
    def build(cls, method: str, grid: dict | None, sampler: str = "grid", per_expert=(), n_experts: int = 1,
              groups: int = 1):
        """The space of METHOD from grid text values (default: its MergeBench grid), typed and checked."""
        if sampler not in SAMPLERS:
            raise BadParameter(f"--sampler {sampler!r}: choose from {', '.join(SAMPLERS)}")
        grid = grid or default_grid(method)
        known = {p.name: p for p in methods.get(method).params}
        unknown = [k for k in [*grid, *per_expert] if k not in known]
        if unknown:
            raise BadParameter(f"method {method} has no parameter {unknown[0]!r} to tune "
                               f"(it takes: {', '.join(known)})")
        coerce = lambda k, x: _one(known[k].coerce(x, method))   # noqa: E731
        if sampler == "grid":
            ranged = [k for k, v in grid.items() if isinstance(v, tuple)]
            if ranged or per_expert or groups > 1:
                what = "ranges" if ranged else "--per-expert" if per_expert else "--per-layer"
                raise BadParameter(f"--sampler grid takes lists of values, not {what}"
                                   f" ({(ranged or list(per_expert) or [groups])[0]}): use --sampler tpe or cmaes")
            return cls(method=method, sampler=sampler, grid={k: [coerce(k, x) for x in v] for k, v in grid.items()})
        bad = [k for k in per_expert if k not in grid]
        if bad:
            raise BadParameter(f"--per-expert {bad[0]}: give its range in --grid ({bad[0]}=low:high)")
        ranges = {}
        for k, v in grid.items():
            values = [coerce(k, x) for x in v]
            if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values):
                ranges[k] = (float(min(values)), float(max(values)))
            elif sampler == "cmaes" or k in per_expert:
                raise BadParameter(f"{k}: {sampler} searches numbers, not {values}")
            else:
                ranges[k] = values
        if groups < 1:
            raise BadParameter(f"--per-layer {groups}: at least 1 group of layers")
        if groups > 1 and all(isinstance(r, list) for r in ranges.values()):
            raise BadParameter(f"--per-layer {groups} searches numbers per group of layers; --grid has no range")
        return cls(method=method, sampler=sampler, ranges=ranges, per_expert=tuple(per_expert), n_experts=n_experts,
                   groups=groups)

    def points(self) -> list[dict]:
        """A grid's every combination, the last parameter varying fastest."""
        names = list(self.grid)
        return [dict(zip(names, values)) for values in itertools.product(*self.grid.values())]

    def suggest(self, trial: optuna.Trial) -> dict:
        """The method's parameters of a trial (a grid trial's are fixed when it was enqueued)."""
        if self.sampler == "grid":
            return {k: trial.suggest_categorical(k, v) for k, v in self.grid.items()}
        out = {}
        for k, r in self.ranges.items():
            if isinstance(r, list):
                out[k] = trial.suggest_categorical(k, r)
            elif self.groups > 1:      # one value a group (names as before for one group: studies resume)
                out[k] = [self._numbers(trial, f"{k}@{g}", r, k in self.per_expert) for g in range(self.groups)]
            else:
                out[k] = self._numbers(trial, k, r, k in self.per_expert)
        return out

    def _numbers(self, trial: optuna.Trial, name: str, r: tuple, per_expert: bool):
        if per_expert:
            return [trial.suggest_float(f"{name}[{i}]", *r) for i in range(self.n_experts)]
        return trial.suggest_float(name, *r)

    def layered(self) -> list[str]:
        """The parameters searched per group of layers."""
        return [k for k, r in self.ranges.items() if not isinstance(r, list)] if self.groups > 1 else []

    def describe(self) -> dict:
        return {"sampler": self.sampler, **({"grid": self.grid} if self.sampler == "grid" else
                                            {"ranges": self.ranges, "per_expert": list(self.per_expert),
                                             **({"per_layer": self.groups} if self.groups > 1 else {})})}

    def sampler_object(self, seed: int | None = None) -> optuna.samplers.BaseSampler:
        """The Optuna sampler (a grid's trials are all enqueued with fixed values; none is sampled). No
        fixed seed by default: a resumed study, or a second process on it, would draw the same points."""
        if self.sampler == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True)
        if self.sampler == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed)
        if self.sampler == "nsga2":     # a genetic search for several objectives (one works too)
            return optuna.samplers.NSGAIISampler(seed=seed)
        return optuna.samplers.RandomSampler(seed=seed)


def point_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)
