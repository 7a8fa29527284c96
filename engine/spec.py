"""MergeSpec: what a merge writes (its method, parameters, models, overrides, tokenizer, slices, output
layout), checked once at construction, and its RunOptions: how it runs (memory budget, device, kernels,
resume, progress, overwrite), which never change a byte it writes. Imports no torch: the command line
builds and checks a spec before torch loads, and the library builds the same one. Where an option's flag
comes from, and how the card spells it back: engine/flags.py.
"""
import importlib.util
import re
import shlex
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol

from .. import methods
from ..common import VERSION  # noqa: F401  (the recipe records it)
from ..common import roles
from ..common.errors import BadParameter
from ..common.names import KERNEL_BACKENDS, domain_names
from .flags import WHAT, spell_param, value_text
from .inputs import vocabulary
from .inputs.header import dtype_name
from .inputs.resolve import hub_repo, parts
from .plan import parse_shard_size, parse_size

CONFIG_FILE = "mbmerge_config.yml"     # a recipe merge's recipe, beside the model (mergekit: mergekit_config.yml)
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


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
class RunOptions:
    """How a merge runs, never what it writes (engine/flags.py: HOW). The device and the kernels are
    checked here by name and chosen when the merge starts (engine/device.py, kernels.using); kernels and
    compile None: the caller's kernels.using, else MBMERGE_KERNELS / MBMERGE_COMPILE."""
    memory_budget: int | str = "2GB"
    device: str = "auto"                # cpu, cuda[:N], or auto (CUDA when present)
    kernels: str | None = None          # auto | torch | triton
    compile: bool | None = None         # compiled CPU loops allowed
    progress: bool = True
    resume: bool = True                 # continue an interrupted merge of the same recipe and inputs
    overwrite: bool = False             # replace an earlier mbmerge output (only its own files)
    threads: int | None = None          # CPU cores to run on (the first N the process may use); None: all of them

    def __post_init__(self):
        object.__setattr__(self, "memory_budget", parse_size(self.memory_budget))
        if self.memory_budget <= 0:
            raise BadParameter("--memory-budget must be positive")
        if self.threads is not None and self.threads < 1:
            raise BadParameter(f"--threads {self.threads}: at least 1")
        object.__setattr__(self, "device", str(self.device).lower())
        if not DEVICE.fullmatch(self.device):
            raise BadParameter(f"--device {self.device!r}: choose cpu, cuda, cuda:N or auto")
        if self.kernels is not None and self.kernels.lower() not in KERNEL_BACKENDS:
            raise BadParameter(f"--kernels {self.kernels!r}: choose {', '.join(KERNEL_BACKENDS)}")
        if self.kernels == "triton" and importlib.util.find_spec("triton") is None:
            raise BadParameter("--kernels triton: triton is not installed")


@dataclass(frozen=True, kw_only=True)
class MergeSpec:
    """What a merge writes, and (`run`) how it runs. `params` holds the user's method parameters; after
    construction, `resolved` holds every parameter with defaults filled in and per-expert lists broadcast."""
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
    out_quant: str | None = None        # "fp8": merged matrices written FP8 with block scales (engine/output/fp8.py)
    out_shard_size: int | str | None = None  # bytes of tensors per output shard (mergekit's --out-shard-size:
                                        # "5B" is 5e9); None: the reference model's sharding
    copy_tokenizer: bool = True         # copy the reference model's tokenizer files into the output
    tokenizer: str | dict | None = None  # the output vocabulary: union | base | a model, or mergekit's tokenizer
                                        # block as a dict (engine/inputs/vocabulary.py); None: every model has
                                        # the base's
    chat_template: str | None = None    # the output's: auto | an input's reference | a Jinja template
                                        # (engine/inputs/chat_template.py); None: the reference model's, as copied
    allow_nonfinite: bool = False
    protocol: str | None = None         # e.g. "mergebench": a benchmark's parameter choices
    calibrate: str | None = None        # a post-step on each merged tensor (methods.CALIBRATIONS: svc)
    weights_from: str | None = None     # "nan": the weights from the experts' parameter norms (methods/coefficients.py)
    expert_norms: tuple = ()            # with weights_from, the norms the engine's pre-pass found (engine/norms.py)
    stats_folders: tuple[str, ...] | None = None  # data-aware methods: one statistics folder per expert
    slices: tuple | None = None         # a recipe's slices: per slice, its sources ((ref, first, end), ...), the
                                        # base's first where the method uses it (engine/inputs/slices.py)
    layered: PerTensor | None = None    # a mergekit recipe's per-layer gradients and filters (recipe.load_recipe),
                                        # made overrides once the tensors are known (recipe.tensor_overrides)
    overrides: tuple = ()               # ((regex of tensor names, {param: value}), ...): the first match's
                                        # values replace `params` for that tensor (e.g. per layer)
    ignored: tuple = ()                 # a recipe's parameters its method does not take ((key, method), ...): left
                                        # out, as mergekit leaves them, with a warning; the card lists them
    module: str | None = None           # the module of the models it merges (common/roles.py MODULES: a recipe's
                                        # `modules:`); None: every tensor
    modules: tuple = ()                 # with `module`, the other modules of the output, each a MergeSpec (given as
                                        # merge()'s keyword arguments) of its own method and models (engine/modules.py)
    config: str | None = None           # the mergekit recipe the merge came from (YAML text), written beside
                                        # the model as CONFIG_FILE; the card's command reruns it
    run: RunOptions = field(default_factory=RunOptions)   # how it runs: never part of what it writes
    resolved: dict = field(default_factory=dict, init=False)
    resolved_overrides: tuple = field(default_factory=tuple, init=False)

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: derived fields are set once, here
        if not self.experts:
            raise BadParameter("no experts given (--experts A,B)")
        set_(self, "experts", tuple(self.experts))
        if self.stats_folders:   # folders may come as Paths
            set_(self, "stats_folders", tuple(str(x) for x in self.stats_folders))
        set_(self, "out", Path(self.out))
        set_(self, "dtype", dtype_name(self.dtype))
        if self.out_quant not in (None, *WHAT["out_quant"].choices):
            raise BadParameter(f"--out-quant {self.out_quant!r}: choose {', '.join(WHAT['out_quant'].choices)}")
        if self.out_shard_size is not None:
            set_(self, "out_shard_size", parse_shard_size(self.out_shard_size))
        if self.tokenizer is not None:
            set_(self, "tokenizer", vocabulary.parse(self.tokenizer).as_dict())
        if self.family is not None:
            set_(self, "family", str(self.family))
        method = self.row()
        if self.slices is not None:
            set_(self, "slices", tuple(tuple(tuple(src) for src in sources) for sources in self.slices))
        n = self.n_experts
        methods.check_experts(method, n)
        if self.base is None and method.needs_base and self.family is None and domain_names(self.experts) is None:
            raise BadParameter(f"method {self.method} needs a base model (--base)")
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
        if self.weights_from is not None:
            _weights_from(self, method)
        if self.keep_base is None:
            set_(self, "keep_base", keep_default)
        if self.stats_folders and method.data_statistic is None:
            raise BadParameter(f"method {self.method} uses no data statistics; --stats/--data are for "
                               f"{', '.join(m.name for m in methods.REGISTRY.values() if m.data_statistic)}")
        if self.keep_base:
            _regex(self.keep_base, "--keep-base")
        set_(self, "ignored", tuple(tuple(k) for k in self.ignored))
        set_(self, "modules", tuple(m if isinstance(m, MergeSpec) else _part(self, m) for m in self.modules))
        _check_modules(self)

    def row(self) -> methods.Method:
        """The method's row as this merge runs it: with the calibration step after its apply, if any."""
        return methods.calibrated(methods.get(self.method), self.calibrate)

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
                **({"out_quant": self.out_quant} if self.out_quant else {}),
                **({"calibrate": self.calibrate} if self.calibrate else {}),
                **({"weights_from": self.weights_from} if self.weights_from else {}),
                **({"tokenizer": self.tokenizer} if self.tokenizer else {}),
                **({"slices": [list(map(list, s)) for s in self.slices]} if self.slices else {}),
                **({"overrides": [list(o) for o in self.resolved_overrides]} if self.overrides else {}),
                **({"module": self.module} if self.module else {}),
                **({"modules": [m.recipe() for m in self.modules]} if self.modules else {})}

    def check_references(self, made: set[str] = frozenset()) -> None:
        """That each model reference names something (a folder, a hub id, a domain with a base; `made`: the
        folders of stages not merged yet), in one line and without downloading: the command line checks
        them before torch loads; resolving them (engine/models.py) checks them again."""
        if self.base is None and domain_names(self.experts) is not None:
            return                  # the built-in family's
        refs = [(self.base, "base")] * (self.base is not None) + [(e, f"expert {e}") for e in self.experts]
        for ref, role in refs:
            for part in ([] if ref in made else parts(ref)):   # a model, or mergekit's model+adapter
                hub_repo(part, role, self.base)
        for m in self.modules:
            m.check_references(made)

    def default_keep_base(self) -> str | None:
        """The regex of tensors kept at the base that the method (under the protocol) keeps by default."""
        method = methods.get(self.method)
        return methods.protocol_defaults(method, self.protocol).get("keep_base", method.keep_base)

    def command(self) -> str:
        """The equivalent command line (for the model card), spelled from engine/flags.py as the command
        line reads it: the recipe beside the model for a recipe merge, else the method, its models and
        parameters; then the options that change what it writes."""
        words = ["mbmerge"]
        if self.config is not None:
            words += ["--config", shlex.quote(str(self.out / CONFIG_FILE))]
        else:
            words += WHAT["method"].spell(self.method)
            words += [w for name in ("protocol", "calibrate", "weights_from", "base") if getattr(self, name)
                      for w in WHAT[name].spell(getattr(self, name))]
            words += WHAT["experts"].spell(self.experts)
            words += [shlex.quote(w) for k, v in self.params.items() for w in spell_param(k, v)]
            words += [w for name in ("dtype", "chat_template") if getattr(self, name)
                      for w in WHAT[name].spell(getattr(self, name))]
            words += WHAT["tokenizer"].spell(self.tokenizer["source"]) if self.tokenizer else []  # the rest: the card
        default = self.default_keep_base()
        if self.keep_base != default and (self.keep_base or default):   # '' overrides the method's default
            words += WHAT["keep_base"].spell(self.keep_base)
        for name in ("out_quant", "out_shard_size", "copy_tokenizer", "allow_nonfinite", "stats_folders"):
            if getattr(self, name) not in (None, WHAT[name].default):
                words += WHAT[name].spell(getattr(self, name))
        for pattern, values in self.overrides:
            given = " ".join(f"{k}={value_text(v)}" for k, v in values.items())
            words += [WHAT["overrides"].flag, shlex.quote(pattern), shlex.quote(given)]
        return " ".join(words + ["--out", shlex.quote(str(self.out))])


def _weights_from(spec: MergeSpec, method: methods.Method) -> None:
    """--weights-from checked; with the pre-pass's norms (expert_norms), the weights it gives, resolved."""
    if spec.weights_from not in methods.WEIGHTS_FROM:
        raise BadParameter(f"--weights-from {spec.weights_from!r}: choose {', '.join(methods.WEIGHTS_FROM)}")
    if "weights" not in {p.name for p in method.params}:
        raise BadParameter(f"--weights-from {spec.weights_from}: method {spec.method} takes no per-expert weights")
    if "weights" in spec.params or any("weights" in values for _, values in spec.overrides):
        raise BadParameter(f"--weights-from {spec.weights_from} sets the weights; do not also pass --weights")
    if spec.slices or spec.module or spec.config is not None:
        raise BadParameter(f"--weights-from {spec.weights_from} merges whole models given on the command line; "
                           f"a recipe, slices or modules are not supported")
    if spec.expert_norms:
        weights = methods.nan_weights(list(spec.expert_norms))
        for params in [spec.resolved, *(p for _, p in spec.resolved_overrides)]:
            params["weights"] = weights


def _part(spec: MergeSpec, kw: dict) -> MergeSpec:
    """Another module's MergeSpec, from merge()'s keyword arguments: the output's place and dtype are spec's."""
    kw = dict(kw)
    return spec_from(kw.pop("method"), kw.pop("experts"), spec.out, dtype=spec.dtype, **kw)


def _check_modules(spec: MergeSpec) -> None:
    """A spec of modules names each once (common/roles.py MODULES), and has no statistics, tokenizer or model scope."""
    names = [spec.module, *[m.module for m in spec.modules]]
    if spec.module is None:
        if spec.modules:
            raise BadParameter("modules given without the first one's module name (module=...)")
        return
    for name in names:
        if roles.MODULES.get(name) != name:
            raise BadParameter(f"module {name!r}: choose {', '.join(sorted(set(roles.MODULES.values())))}")
    if len(set(names)) < len(names):
        raise BadParameter(f"module {max(names, key=names.count)!r} is given twice")
    for part in (spec, *spec.modules):
        if part.stats_folders or methods.get(part.method).data_statistic or part.tokenizer or \
                methods.model_scope(methods.get(part.method), part.resolved):
            raise BadParameter(f"module {part.module}: merging modules with data statistics, a tokenizer source "
                               f"or model-wide ranks is not supported; merge the whole model")


def spec_from(method: str, experts, out, **options) -> MergeSpec:
    """A MergeSpec from keyword arguments: MergeSpec's fields and RunOptions' by name, every other one a
    method parameter (density=0.2, weights=[0.5, 0.5], ...). Lists may stand for tuples.

    Example:
        >>> spec_from("ties", ["X1/", "X2/"], "m/", base="B/", density=0.2, overwrite=True)
    """
    what = {f.name for f in fields(MergeSpec) if f.init}
    how = {f.name for f in fields(RunOptions)}
    given = {k: v for k, v in options.items() if k in what}
    run = {k: v for k, v in options.items() if k in how}
    params = {**given.pop("params", {}), **{k: v for k, v in options.items() if k not in what | how}}
    for name in ("stats_folders", "overrides"):
        if given.get(name) is not None:
            given[name] = tuple(given[name])
    if run:
        given["run"] = RunOptions(**{**_fields(given.get("run")), **run})
    return MergeSpec(method=method, experts=tuple(experts), out=Path(out), params=params, **given)


def _fields(run: RunOptions | None) -> dict:
    return {f.name: getattr(run, f.name) for f in fields(RunOptions)} if run else {}
