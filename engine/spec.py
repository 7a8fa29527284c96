"""MergeSpec: everything a merge needs to know, checked once at construction."""
import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import methods
import torch

from .device import resolve_device
from .errors import BadParameter
from .plan import dtype_name, parse_size

VERSION = "0.1.0"


def _regex(pattern: str, what: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise BadParameter(f"{what} {pattern!r} is not a regular expression ({e})") from None
    return pattern


@dataclass(frozen=True)
class MergeSpec:
    """A merge recipe. `params` holds the user's method parameters; after construction,
    `resolved` holds every parameter with defaults filled in and per-expert lists broadcast."""
    method: str
    experts: tuple[str, ...]
    out: Path
    base: str | None = None
    params: dict = field(default_factory=dict)
    keep_base: str | None = None        # regex of tensor names copied from the base (or expert 0);
                                        # None: the method's default, "": none
    dtype: str | None = None            # output dtype of float tensors (default: as stored)
    memory_budget: int | str = "2GB"
    allow_nonfinite: bool = False
    overwrite: bool = False
    progress: bool = True
    protocol: str | None = None         # e.g. "mergebench": a benchmark's parameter choices
    resume: bool = True                 # continue an interrupted merge of the same recipe and inputs
    device: str | torch.device = "auto"  # cpu, cuda[:N], or auto (CUDA when present)
    stats: tuple[str, ...] | None = None  # data-aware methods: one statistics folder per expert
    data: tuple[str, ...] | None = None   # ... or one data source per expert to collect them from
    data_options: dict = field(default_factory=dict)  # split, data_format, max_length, batch_size, ...
    overrides: tuple = ()               # ((regex of tensor names, {param: value}), ...): the first match's
                                        # values replace `params` for that tensor (e.g. per layer)
    resolved: dict = field(default_factory=dict, init=False)
    resolved_overrides: tuple = field(default_factory=tuple, init=False)

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: derived fields are set once, here
        if not self.experts:
            raise BadParameter("no experts given (--experts A,B)")
        set_(self, "experts", tuple(self.experts))
        for name in ("stats", "data"):   # folders may come as Paths
            if getattr(self, name):
                set_(self, name, tuple(str(x) for x in getattr(self, name)))
        set_(self, "out", Path(self.out))
        set_(self, "dtype", dtype_name(self.dtype))
        set_(self, "memory_budget", parse_size(self.memory_budget))
        set_(self, "device", resolve_device(str(self.device)))
        if self.memory_budget <= 0:
            raise BadParameter("--memory-budget must be positive")
        method = methods.get(self.method)
        n = len(self.experts)
        methods.check_experts(method, n)
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
        if (self.stats or self.data) and method.statistic is None:
            raise BadParameter(f"method {self.method} uses no data statistics; --stats/--data are for "
                               f"{', '.join(m.name for m in methods.REGISTRY.values() if m.statistic)}")
        if self.stats and self.data:
            raise BadParameter("give --stats (collected statistics) or --data (collect them), not both")
        if self.keep_base:
            _regex(self.keep_base, "--keep-base")

    def recipe(self) -> dict:
        """What fixes the output bytes (an interrupted merge resumes only if this is unchanged)."""
        return {"mbmerge_version": VERSION, "method": self.method, "params": self.resolved, "base": self.base,
                "experts": list(self.experts), "keep_base": self.keep_base, "dtype": self.dtype,
                "allow_nonfinite": self.allow_nonfinite,
                **({"overrides": [list(o) for o in self.resolved_overrides]} if self.overrides else {})}

    def command(self) -> str:
        """The equivalent command line (for the model card)."""
        parts = ["mbmerge", "--method", self.method] + (["--protocol", self.protocol] if self.protocol else [])
        if self.base:
            parts += ["--base", self.base]
        parts += ["--experts", ",".join(self.experts)]
        for k, v in self.params.items():
            v = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
            parts += [f"--{k}", str(v)] if not isinstance(v, bool) else [f"--{'' if v else 'no-'}{k}"]
        if self.keep_base or methods.get(self.method).keep_base:  # '' overrides the method's default
            parts += ["--keep-base", f"'{self.keep_base}'"]
        if self.dtype:
            parts += ["--dtype", self.dtype]
        for flag, values in [("--stats", self.stats), ("--data", self.data)]:
            parts += [flag, ",".join(values)] if values else []
        for pattern, values in self.overrides:
            given = " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                             for k, v in values.items())
            parts += ["--override", f"'{pattern}'", f"'{given}'"]
        return " ".join(parts + ["--out", str(self.out)])
