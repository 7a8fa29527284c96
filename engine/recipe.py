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

Each refusal names the key: slices, modules, tokenizer, chat_template, other tokenizer sources,
LoRA references, per-layer gradients and filters, parameters unknown to mergekit's method,
values mbmerge's method cannot honour, and unknown keys. Knows nothing of tensors or files
besides the recipe.
"""
import yaml

from .. import methods
from ..methods.contract import REQUIRED
from ..common.errors import BadParameter
from .plan import dtype_name

PER_MODEL = {"weight", "density", "gamma", "epsilon"}
BOOLS = {"normalize", "rescale", "int8_mask", "filter_wise"}
KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
WHY = {"slices": "mbmerge merges whole models; list them under 'models'",
       "modules": "mbmerge merges whole models; list them under 'models'",
       "tokenizer": "mbmerge copies the base's tokenizer", "chat_template": "mbmerge copies the base's files"}


def load_recipe(path) -> dict:
    """Read a mergekit YAML recipe; BadParameter naming the file and key for anything unsupported.

    Returns:
        {"method": str, "base": str | None, "experts": [str, ...], "dtype": str | None,
         "params": {mbmerge parameter: value, per-expert ones as lists in expert order}}.
    Example:
        >>> r = load_recipe("ties.yml")
        >>> mbmerge.merge(r["method"], base=r["base"], experts=r["experts"], dtype=r["dtype"], out="m/", **r["params"])
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
        params = _params(models, _values("parameters", cfg.get("parameters"), spec, set(spec)), method, spec)
        methods.resolve_params(method, len(models), params)     # mbmerge's own checks, e.g. density in (0, 1]
        dtype_key = "out_dtype" if cfg.get("out_dtype") is not None else "dtype"   # mergekit's rule
        dtype = None if cfg.get(dtype_key) is None else str(cfg[dtype_key])
        try:
            dtype_name(dtype)
        except BadParameter:
            _fail(dtype_key, f"= {dtype!r}: choose bfloat16, float16, float32 or float64")
    except BadParameter as e:
        raise BadParameter(f"{path}: {e}") from None
    return {"method": name, "base": base, "experts": [m[1] for m in models], "dtype": dtype, "params": params}


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
        if isinstance(v, (list, dict)):
            _fail(where, "is a gradient or filter: per-layer gradients and filters are not supported yet")
        if name in BOOLS and str(v).lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            out[name] = str(v).lower() in ("true", "1", "yes", "on")
            continue
        try:
            if name in BOOLS or isinstance(v, bool):
                raise ValueError
            out[name] = float(v)                   # numbers and numeric strings such as "1e-3"
        except (TypeError, ValueError):
            _fail(where, f"= {v!r} is not a {'boolean' if name in BOOLS else 'number'}")
    return out


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
