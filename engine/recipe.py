"""mergekit YAML recipes (mergekit 0.1.5, the `models:` form) as keyword arguments for merge().

The recipe keeps mergekit's meaning. mergekit's defaults (each method's registry row) are filled in
explicitly, because mbmerge's own defaults differ (e.g. ties density 0.2 here, 1.0 there):

  merge_method               -> method (the methods both tools have)
  base_model                 -> base. A listed base is not an expert. Exception: linear merges
                                every input, and like mergekit it adds an unlisted base as one more.
  models[i].model            -> experts, paths used as given (relative to the current folder)
  weight, density, gamma,    -> weights, density, gamma, epsilon: one value per expert, taken from
  epsilon                       the model, else the global parameters, else mergekit's default
  lambda, t, filter_wise     -> scale, t, filter_wise
  normalize                  -> aggregate mean|sum (methods that elect signs), else normalize
  rescale                    -> rescale l1|none; also consensus=sum and sparsify_scope=tensor
  int8_mask                  -> ignored: a memory saving in mergekit, with the same result
  out_dtype, else dtype      -> dtype: the output dtype (mbmerge always computes in float32)
  tokenizer_source: base     -> accepted: the base's tokenizer is copied
  chat_template              -> chat_template: 'auto', a model of the recipe, or a Jinja template
  a list of values           -> a gradient over the layers: layer i of L at t = i / (L - 1) (1 for one
                                layer), tensors outside the layers at t = 0, interpolated between the
                                two nearest points (booleans: picked), as mergekit reads it
  [{filter: s, value: v}]    -> per tensor, the first condition whose filter is absent, '*' or part of
                                its name (v may be a gradient); load_recipe's "layered" carries them,
                                and tensor_overrides makes them the engine's per-tensor overrides

Each refusal names the key: slices, modules, tokenizer, other tokenizer sources,
LoRA references, parameters unknown to mergekit's method, values mbmerge's method cannot honour
(checked at every point of a gradient and under every filter), and unknown keys. Knows nothing of
tensors or files besides the recipe.
"""
import re

import yaml

from .. import methods
from ..methods.contract import REQUIRED
from ..common.errors import BadParameter
from .plan import dtype_name

PER_MODEL = {"weight", "density", "gamma", "epsilon"}
LAYER = re.compile(r"\.layers\.(\d+)\.")   # a decoder layer's tensors, as transformers names them
BOOLS = {"normalize", "rescale", "int8_mask", "filter_wise"}
KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "chat_template"}
WHY = {"slices": "mbmerge merges whole models; list them under 'models'",
       "modules": "mbmerge merges whole models; list them under 'models'",
       "tokenizer": "mbmerge copies the base's tokenizer"}


def load_recipe(path) -> dict:
    """Read a mergekit YAML recipe; BadParameter naming the file and key for anything unsupported.

    Returns:
        {"method": str, "base": str | None, "experts": [str, ...], "dtype": str | None,
         "params": {mbmerge parameter: value, per-expert ones as lists in expert order; outside the
                    layers, where the recipe has gradients or filters},
         "layered": the recipe's gradients and filters for merge(layered=...), or None,
         "chat_template": for merge(chat_template=...), or None}.
    Example:
        >>> r = load_recipe("ties.yml")
        >>> mbmerge.merge(r["method"], base=r["base"], experts=r["experts"], dtype=r["dtype"], out="m/",
        ...               layered=r["layered"], **r["params"])
    """
    try:
        cfg = _read(path)
        name = cfg.get("merge_method")
        known = [m.name for m in methods.REGISTRY.values() if m.mergekit is not None]
        if name not in known:
            _fail("merge_method", "is missing" if name is None else
                  f"= {name!r} is not supported; mbmerge runs these mergekit methods: {', '.join(known)}")
        method = methods.REGISTRY[name]
        spec = method.mergekit
        base, models = _inputs(cfg, method, spec)
        glob = _values("parameters", cfg.get("parameters"), spec, set(spec))
        params = _params(*_at(models, glob, "", 0.0), method, spec)      # what a tensor outside the layers takes
        layered = [v for d in [glob, *[m[2] for m in models]] for v in d.values() if isinstance(v, list)]
        for part, t in _points(layered):         # mbmerge's own checks, e.g. density in (0, 1], at every point
            methods.resolve_params(method, len(models), _params(*_at(models, glob, part, t), method, spec))
        dtype_key = "out_dtype" if cfg.get("out_dtype") is not None else "dtype"   # mergekit's rule
        dtype = None if cfg.get(dtype_key) is None else str(cfg[dtype_key])
        try:
            dtype_name(dtype)
        except BadParameter:
            _fail(dtype_key, f"= {dtype!r}: choose bfloat16, float16, float32 or float64")
    except BadParameter as e:
        raise BadParameter(f"{path}: {e}") from None
    settings = {"models": [m[2] for m in models], "parameters": glob} if layered else None
    return {"method": name, "base": base, "experts": [m[1] for m in models], "dtype": dtype, "params": params,
            "layered": settings, "chat_template": cfg.get("chat_template")}


def tensor_overrides(method_name: str, layered: dict, names: list[str]) -> list[tuple[str, dict]]:
    """A recipe's per-layer gradients and filters (load_recipe's "layered") as the engine's per-tensor
    overrides: each tensor's mergekit values at its place t (layer i of L: i / (L - 1), 1 for one layer;
    outside the layers: 0, as mergekit plans embeddings and the head) and under its name (a filter
    applies where it is a substring of the name), translated as load_recipe does, tensors that take the
    same values under one pattern of their exact names."""
    method = methods.REGISTRY[method_name]
    layer = [int(m.group(1)) if (m := LAYER.search(n)) else None for n in names]
    count = max([i for i in layer if i is not None], default=0) + 1
    models, groups = [(f"models[{k}]", "", values) for k, values in enumerate(layered["models"])], {}
    for name, i in zip(names, layer):
        t = 0.0 if i is None else (i / (count - 1) if count > 1 else 1.0)
        params = _params(*_at(models, layered["parameters"], name, t), method, method.mergekit)
        groups.setdefault(repr(sorted(params.items())), (params, []))[1].append(name)
    return [("^(?:" + "|".join(re.escape(n) for n in group) + ")$", params) for params, group in groups.values()]


def _points(layered: list) -> list[tuple[str, float]]:
    """(a name, t) for every point a gradient or filter can take: each filter matched alone, at every
    gradient point (values between two points lie between theirs)."""
    names, lengths = {""}, {1}
    for v in layered:
        for c in v if all(isinstance(c, dict) for c in v) else [{"value": v}]:
            names.add(c.get("filter") or "")
            lengths.add(len(c["value"]) if isinstance(c["value"], list) else 1)
    ts = sorted({k / (n - 1) if n > 1 else 0.0 for n in lengths for k in range(n)})
    return [(name, t) for name in sorted(names) for t in ts]


def _at(models: list, glob: dict, name: str, t: float) -> tuple[list, dict]:
    """The models' and the global parameters as each tensor `name` at place t takes them (absent where a
    filter list has no condition for it)."""
    def values(d):
        out = {k: _evaluate(v, name, t) for k, v in d.items()}
        return {k: v for k, v in out.items() if v is not None}
    return [(key, ref, values(d)) for key, ref, d in models], values(glob)


def _evaluate(setting, name: str, t: float):
    """mergekit's reading of a setting: a value; a list of values, interpolated at t between neighbours
    (numbers) or picked at int(t (n - 1)) (booleans); a list of {filter, value}: the first whose filter
    is absent, '*' or in the name."""
    if not isinstance(setting, list):
        return setting
    if setting and all(isinstance(c, dict) for c in setting):
        for c in setting:
            if c.get("filter") in (None, "*") or c["filter"] in name:
                return _evaluate(c["value"], name, t)
        return None
    if any(isinstance(v, bool) for v in setting):
        return setting[int(t * (len(setting) - 1))]
    at = t * (len(setting) - 1)
    i = int(at)
    j = min(len(setting) - 1, i + 1)
    return (1 - (at - i)) * setting[i] + (at - i) * setting[j]


def _fail(key, why):
    raise BadParameter(f"key {key!r} {why}")


def _read(path) -> dict:
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except OSError as e:
        raise BadParameter(f"cannot read the recipe ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise BadParameter(f"not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(cfg, dict):
        raise BadParameter("not a mergekit recipe (expected a mapping with merge_method and models)")
    for key in cfg:
        if key not in KEYS:
            _fail(key, f"is not supported ({WHY.get(key, 'not a mergekit key mbmerge knows')})")
    if cfg.get("chat_template") is not None and not isinstance(cfg["chat_template"], str):
        _fail("chat_template", "must be 'auto', a model of the recipe or a Jinja template")
    if cfg.get("tokenizer_source") not in (None, "base"):
        _fail("tokenizer_source", f"= {cfg['tokenizer_source']!r} is not supported (only 'base': mbmerge "
                                  "copies the base's tokenizer)")
    return cfg


def _inputs(cfg: dict, method, spec: dict) -> tuple[str | None, list]:
    """The base and the experts as (key, reference, per-model parameters), with mergekit's base rules."""
    base = _ref("base_model", cfg["base_model"]) if cfg.get("base_model") is not None else None
    entries = cfg.get("models")
    if not isinstance(entries, list) or not entries:
        _fail("models", "must be a list of {model: PATH, parameters: {...}}")
    models = []
    for i, e in enumerate(entries):
        key = f"models[{i}]"
        if not isinstance(e, dict) or "model" not in e or set(e) - {"model", "parameters"}:
            _fail(key, "must be a mapping {model: PATH, parameters: {...}}")
        ref = _ref(f"{key}.model", e["model"])
        if ref in [m[1] for m in models]:
            _fail(f"{key}.model", f"lists {ref!r} twice")
        models.append((key, ref, _values(f"{key}.parameters", e.get("parameters"), spec, PER_MODEL)))
    if method.needs_base:
        if base is None:
            _fail("base_model", f"is missing ({method.name} needs a base model)")
        models = [m for m in models if m[1] != base]
    elif base is not None and base not in [m[1] for m in models]:
        models.append(("base_model", base, {}))    # mergekit merges an unlisted base as one more input
    lo, hi = method.min_experts, method.max_experts     # as mergekit's input contracts
    if not lo <= len(models) <= (hi or len(models)):
        _fail("models", f"has {len(models)} models besides the base; {method.name} takes "
                        + (f"exactly {lo}" if lo == hi else f"at least {lo}"))
    return base, models


def _ref(key, value) -> str:
    if not isinstance(value, str) or not value:
        _fail(key, "must be a model path or hub id")
    if "+" in value:
        _fail(key, f"= {value!r}: LoRA references (model+lora) are not supported; merge the LoRA first")
    return value


def _values(key, given, spec: dict, allowed: set) -> dict:
    """Parameter values checked and typed; `allowed` are those that may appear at this level."""
    if given is None:
        return {}
    if not isinstance(given, dict):
        _fail(key, "must be a mapping of parameter: value")
    out = {}
    for name, v in given.items():
        where = f"{key}.{name}"
        if name not in spec:
            _fail(where, f"is not a parameter of this mergekit method (it takes: {', '.join(spec)})")
        if name not in allowed:
            _fail(where, "is a global parameter in mergekit (which ignores it here); move it to 'parameters'")
        out[name] = _setting(where, name, v)
    return out


def _setting(where: str, name: str, v, conditions: bool = True):
    """A value, a gradient (a list of values) or a list of {filter, value} conditions (a single one as a
    mapping), typed; BadParameter naming the key for anything else."""
    if isinstance(v, dict):
        v = [v]
    if isinstance(v, list) and v and all(isinstance(c, dict) for c in v) and conditions:
        for k, c in enumerate(v):
            if set(c) - {"filter", "value"} or "value" not in c or not isinstance(c.get("filter"), (str, type(None))):
                _fail(f"{where}[{k}]", "must be {filter: NAME PART, value: VALUE or [gradient]} (filter optional)")
        return [{**c, "value": _setting(f"{where}[{k}].value", name, c["value"], False)} for k, c in enumerate(v)]
    if isinstance(v, list):
        if not v or any(isinstance(e, (list, dict)) for e in v):
            _fail(where, "must be a value, a gradient (a list of values) or a list of {filter, value}")
        return [_scalar(f"{where}[{k}]", name, e) for k, e in enumerate(v)]
    return _scalar(where, name, v)


def _scalar(where: str, name: str, v):
    if name in BOOLS and str(v).lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        return str(v).lower() in ("true", "1", "yes", "on")
    try:
        if name in BOOLS or isinstance(v, bool):
            raise ValueError
        return float(v)                            # numbers and numeric strings such as "1e-3"
    except (TypeError, ValueError):
        _fail(where, f"= {v!r} is not a {'boolean' if name in BOOLS else 'number'}")


def _params(models: list, glob: dict, method, spec: dict) -> dict:
    """mbmerge's parameters: each of mergekit's from the model, else global, else its default."""
    params = {}
    for mk, default in spec.items():
        if mk in PER_MODEL:
            value = [m[2].get(mk, glob.get(mk, default)) for m in models]
            if REQUIRED in value:
                key, ref, _ = models[value.index(REQUIRED)]
                _fail(mk, f"is missing for model {ref!r} ({key}); mergekit's {method.name} requires it: "
                          "set it on the model or in the global parameters")
        else:
            value = glob.get(mk, default)
            if value is REQUIRED:
                _fail(f"parameters.{mk}", f"is missing (mergekit's {method.name} requires it)")
        _translate(method, mk, value, default, params)
    for extra, value in [("consensus", "sum"), ("sparsify_scope", "tensor")]:
        if extra in {p.name for p in method.params}:
            params[extra] = value
    return params


def _translate(method, mk: str, value, default, params: dict) -> None:
    """Set mbmerge's parameter for mergekit's `mk`, or check that leaving it out changes nothing."""
    have = {p.name for p in method.params}
    if mk == "normalize" and "aggregate" in have:
        params["aggregate"] = "mean" if value else "sum"
        return
    mb = {"weight": "weights", "lambda": "scale"}.get(mk, mk)
    if mb in have:
        params[mb] = ("l1" if value else "none") if mk == "rescale" else value
        return
    # task_arithmetic declares density and rescale in mergekit but never sparsifies
    no_effect = mk == "int8_mask" or (method.name == "task_arithmetic" and mk in ("density", "rescale"))
    if not no_effect and any(v != default for v in (value if isinstance(value, list) else [value])):
        _fail(mk, f"= {value}: mbmerge's {method.name} has no such option (only mergekit's default, "
                  f"{default}, is possible)")


def to_mergekit(method: str, params: dict) -> tuple[dict, dict]:
    """mbmerge parameters (one value each) as a mergekit recipe's (per-model, global) parameters,
    for a method both tools have.

    Example:
        >>> to_mergekit("ties", {"weights": 1.0, "density": 0.2})
        ({'weight': 1.0, 'density': 0.2}, {})
    """
    spec = methods.get(method).mergekit
    names = {"weights": "weight", "scale": "lambda"}
    per_model, glob = {}, {}
    for k, v in params.items():
        mk = names.get(k, k)
        if mk not in spec:
            raise BadParameter(f"mergekit's {method} has no parameter for mbmerge's {k!r}")
        (per_model if mk in PER_MODEL else glob)[mk] = v
    return per_model, glob
