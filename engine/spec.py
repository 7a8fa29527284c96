"""MergeSpec: everything a merge needs to know, checked once at construction."""
import json
import re
import shlex
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol

import torch

from .. import kernels, methods
from .inputs import vocabulary
from .device import resolve_device
from ..common.errors import BadParameter
from .inputs.header import dtype_name
from .plan import parse_shard_size, parse_size

from ..common import VERSION  # noqa: F401  (the recipe records it)

CONFIG_FILE = "mbmerge_config.yml"     # a recipe merge's recipe, beside the model (mergekit: mergekit_config.yml)


def _regex(pattern: str, what: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise BadParameter(f"{what} {pattern!r} is not a regular expression ({e})") from None
    return pattern


class PerTensor(Protocol):
    """Parameter values that vary per tensor (a recipe's gradients and filters: engine/recipe/values.Layered)."""
    def overrides(self, names: list[str]) -> list[tuple[str, dict]]:
        """(regex of tensor names, {param: value}) for the merged tensors `names`."""


@dataclass(frozen=True, kw_only=True)
class MergeSpec:
    """A merge recipe. `params` holds the user's method parameters; after construction,
    `resolved` holds every parameter with defaults filled in and per-expert lists broadcast."""
    method: str
    experts: tuple[str, ...]
    out: Path
    base: str | None = None
    family: str | None = None           # with no base, a folder of base/ and one folder per domain that
                                        # domain names refer to (the command line passes the mini zoo's)
    params: dict = field(default_factory=dict)
    keep_base: str | None = None        # regex of tensor names copied from the base (or expert 0);
                                        # None: the method's default, "": none
    dtype: str | None = None            # output dtype of float tensors (default: as stored)
    memory_budget: int | str = "2GB"
    out_shard_size: int | str | None = None  # bytes of tensors per output shard (mergekit's --out-shard-size:
                                        # "5B" is 5e9); None: the reference model's sharding
    copy_tokenizer: bool = True         # copy the reference model's tokenizer files into the output
    tokenizer: str | dict | None = None  # the output vocabulary: union | base | a model, or mergekit's tokenizer
                                        # block as a dict (engine/inputs/vocabulary.py); None: every model has
                                        # the base's
    chat_template: str | None = None    # the output's: auto | an input's reference | a Jinja template
                                        # (engine/inputs/chat_template.py); None: the reference model's, as copied
    allow_nonfinite: bool = False
    overwrite: bool = False
    progress: bool = True
    protocol: str | None = None         # e.g. "mergebench": a benchmark's parameter choices
    resume: bool = True                 # continue an interrupted merge of the same recipe and inputs
    device: str | torch.device = "auto"  # cpu, cuda[:N], or auto (CUDA when present)
    stats_folders: tuple[str, ...] | None = None  # data-aware methods: one statistics folder per expert
    data: tuple[str, ...] | None = None   # ... or one data source per expert to collect them from (by
    data_options: dict = field(default_factory=dict)  # mbmerge.stats; the engine needs the folders)
    slices: tuple | None = None         # a recipe's slices: per slice, its sources ((ref, first, end), ...), the
                                        # base's first where the method uses it (engine/inputs/slices.py)
    layered: PerTensor | None = None    # a mergekit recipe's per-layer gradients and filters (recipe.load_recipe),
                                        # made overrides once the tensors are known (recipe.tensor_overrides)
    overrides: tuple = ()               # ((regex of tensor names, {param: value}), ...): the first match's
                                        # values replace `params` for that tensor (e.g. per layer)
    config: str | None = None           # the mergekit recipe the merge came from (YAML text), written beside
                                        # the model as CONFIG_FILE; the card's command reruns it
    kernels: str | None = None          # auto | torch | triton (default: kernels.chosen(): the caller's
    compile: bool | None = None         # kernels.using, else MBMERGE_KERNELS / MBMERGE_COMPILE)
    resolved: dict = field(default_factory=dict, init=False)
    resolved_overrides: tuple = field(default_factory=tuple, init=False)

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: derived fields are set once, here
        if not self.experts:
            raise BadParameter("no experts given (--experts A,B)")
        set_(self, "experts", tuple(self.experts))
        for name in ("stats_folders", "data"):   # folders may come as Paths
            if getattr(self, name):
                set_(self, name, tuple(str(x) for x in getattr(self, name)))
        set_(self, "out", Path(self.out))
        set_(self, "dtype", dtype_name(self.dtype))
        set_(self, "memory_budget", parse_size(self.memory_budget))
        if self.out_shard_size is not None:
            set_(self, "out_shard_size", parse_shard_size(self.out_shard_size))
        if self.tokenizer is not None:
            set_(self, "tokenizer", vocabulary.parse(self.tokenizer).as_dict())
        set_(self, "device", resolve_device(str(self.device)))
        chosen = kernels.chosen()   # what the caller runs under (kernels.using), else the environment's
        set_(self, "kernels", kernels.backend_name(self.kernels or chosen.backend))
        set_(self, "compile", chosen.compile if self.compile is None else self.compile)
        if self.family is not None:
            set_(self, "family", str(self.family))
        if self.memory_budget <= 0:
            raise BadParameter("--memory-budget must be positive")
        method = methods.get(self.method)
        if self.slices is not None:
            set_(self, "slices", tuple(tuple(tuple(src) for src in sources) for sources in self.slices))
        n = self.n_experts
        methods.check_experts(method, n)
        if self.slices and method.data_statistic:
            raise BadParameter(f"method {self.method} merges with each expert's statistics; slices mix models, "
                               f"so it cannot take them")
        chosen = methods.protocol_defaults(method, self.protocol)
        keep_default = chosen.pop("keep_base", method.keep_base)
        set_(self, "resolved", methods.resolve_params(method, n, {**chosen, **self.params}))
        set_(self, "overrides", tuple((pattern, dict(values)) for pattern, values in self.overrides))
        set_(self, "resolved_overrides", tuple(
            (_regex(pattern, "an override"), methods.resolve_params(method, n, {**chosen, **self.params, **values}))
            for pattern, values in self.overrides))
        if self.overrides and methods.model_scope(method, self.resolved):
            raise BadParameter("per-tensor overrides need --sparsify-scope tensor (model-wide ranks use one "
                               "density for the whole model)")
        if self.keep_base is None:
            set_(self, "keep_base", keep_default)
        if (self.stats_folders or self.data) and method.data_statistic is None:
            raise BadParameter(f"method {self.method} uses no data statistics; --stats/--data are for "
                               f"{', '.join(m.name for m in methods.REGISTRY.values() if m.data_statistic)}")
        if self.stats_folders and self.data:
            raise BadParameter("give --stats (collected statistics) or --data (collect them), not both")
        if self.keep_base:
            _regex(self.keep_base, "--keep-base")

    @property
    def n_experts(self) -> int:
        """The models merged into each tensor besides the base: the experts, or the positions of a slice."""
        if self.slices is None:
            return len(self.experts)
        return len(self.slices[0]) - (1 if methods.get(self.method).needs_base else 0)

    def recipe(self) -> dict:
        """What fixes the output bytes (an interrupted merge resumes only if this is unchanged)."""
        return {"mbmerge_version": VERSION, "method": self.method, "params": self.resolved, "base": self.base,
                "experts": list(self.experts), "keep_base": self.keep_base, "dtype": self.dtype,
                "allow_nonfinite": self.allow_nonfinite, "out_shard_size": self.out_shard_size,
                **({"tokenizer": self.tokenizer} if self.tokenizer else {}),
                **({"slices": [list(map(list, s)) for s in self.slices]} if self.slices else {}),
                **({"overrides": [list(o) for o in self.resolved_overrides]} if self.overrides else {})}

    def command(self) -> str:
        """The equivalent command line (for the model card): the recipe beside the model for a recipe
        merge, else the method, its models and parameters; then the run's options that change bytes."""
        if self.config is not None:
            parts = ["mbmerge", "--config", shlex.quote(str(self.out / CONFIG_FILE))]
        else:
            parts = ["mbmerge", "--method", self.method] + (["--protocol", self.protocol] if self.protocol else [])
            parts += ["--base", self.base] if self.base else []
            parts += ["--experts", ",".join(self.experts)]
            for k, v in self.params.items():
                v = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
                parts += [f"--{k}", str(v)] if not isinstance(v, bool) else [f"--{'' if v else 'no-'}{k}"]
            parts += ["--dtype", self.dtype] if self.dtype else []
            parts += ["--tokenizer-source", self.tokenizer["source"]] if self.tokenizer else []  # the rest: the card
            parts += ["--chat-template", json.dumps(self.chat_template)] if self.chat_template else []
        default_keep = methods.protocol_defaults(methods.get(self.method), self.protocol).get(
            "keep_base", methods.get(self.method).keep_base)
        if self.keep_base != default_keep and (self.keep_base or default_keep):   # '' overrides the default
            parts += ["--keep-base", shlex.quote(self.keep_base)]
        parts += ["--out-shard-size", str(self.out_shard_size)] if self.out_shard_size else []
        parts += [] if self.copy_tokenizer else ["--no-copy-tokenizer"]
        parts += ["--allow-nonfinite"] if self.allow_nonfinite else []
        for flag, values in [("--stats", self.stats_folders), ("--data", self.data)]:
            parts += [flag, ",".join(values)] if values else []
        for pattern, values in self.overrides:
            given = " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                             for k, v in values.items())
            parts += ["--override", shlex.quote(pattern), shlex.quote(given)]
        return " ".join(parts + ["--out", shlex.quote(str(self.out))])


def spec_from(method: str, experts, out, **options) -> MergeSpec:
    """A MergeSpec from keyword arguments: MergeSpec's fields by name, every other one a method
    parameter (density=0.2, weights=[0.5, 0.5], ...). Lists may stand for tuples.

    Example:
        >>> spec_from("ties", ["X1/", "X2/"], "m/", base="B/", density=0.2, overwrite=True)
    """
    known = {f.name for f in fields(MergeSpec) if f.init}
    given = {k: v for k, v in options.items() if k in known}
    params = {**given.pop("params", {}), **{k: v for k, v in options.items() if k not in known}}
    for name in ("stats_folders", "data", "overrides"):
        if given.get(name) is not None:
            given[name] = tuple(given[name])
    given["data_options"] = given.get("data_options") or {}
    return MergeSpec(method=method, experts=tuple(experts), out=Path(out), params=params, **given)
