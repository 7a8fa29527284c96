"""mergekit YAML recipes (mergekit 0.1.5, the `models:` form) as keyword arguments for merge().

The recipe keeps mergekit's meaning. mergekit's defaults are filled in explicitly, because
mbmerge's own defaults differ (e.g. ties density 0.2 here, 1.0 there):

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
from .errors import BadParameter
from .plan import dtype_name

REQUIRED = object()
_GTA = {"weight": REQUIRED, "density": 1.0, "lambda": 1.0, "int8_mask": False}
# mergekit's parameters and their defaults per method (merge_methods/registry.py)
MERGEKIT = {
    "linear": {"weight": REQUIRED, "normalize": True},
    "task_arithmetic": {**_GTA, "normalize": False, "rescale": False},
    "ties": {**_GTA, "normalize": True, "rescale": False},
    "dare_linear": {**_GTA, "normalize": False, "rescale": True},
    "dare_ties": {**_GTA, "normalize": False, "rescale": True},
    "breadcrumbs": {**_GTA, "gamma": 0.01, "normalize": False, "rescale": False},
    "breadcrumbs_ties": {**_GTA, "gamma": 0.01, "normalize": False, "rescale": False},
    "della": {**_GTA, "epsilon": 0.15, "normalize": True, "rescale": True},
    "della_linear": {**_GTA, "epsilon": 0.15, "normalize": False, "rescale": True},
    "model_stock": {"filter_wise": False},
    "slerp": {"t": REQUIRED},
}
PER_MODEL = {"weight", "density", "gamma", "epsilon"}
BOOLS = {"normalize", "rescale", "int8_mask", "filter_wise"}
EXPERTS = {"slerp": (1, 1), "model_stock": (2, None)}  # models besides the base (mergekit's contracts)
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
    def fail(key, why):
        raise BadParameter(f"{path}: key {key!r} {why}")

    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except OSError as e:
        raise BadParameter(f"{path}: cannot read the recipe ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise BadParameter(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(cfg, dict):
        raise BadParameter(f"{path}: not a mergekit recipe (expected a mapping with merge_method and models)")
    for key in cfg:
        if key not in KEYS:
            fail(key, f"is not supported ({WHY.get(key, 'not a mergekit key mbmerge knows')})")
    if cfg.get("tokenizer_source") not in (None, "base"):
        fail("tokenizer_source", f"= {cfg['tokenizer_source']!r} is not supported (only 'base': mbmerge copies "
                                 "the base's tokenizer)")
    name = cfg.get("merge_method")
    known = [m for m in MERGEKIT if m in methods.REGISTRY]
    if name not in known:
        fail("merge_method", f"= {name!r} is not supported; mbmerge runs these mergekit methods: {', '.join(known)}"
             if name is not None else "is missing")
    method, spec = methods.REGISTRY[name], MERGEKIT[name]

    base = _ref(fail, "base_model", cfg["base_model"]) if cfg.get("base_model") is not None else None
    entries = cfg.get("models")
    if not isinstance(entries, list) or not entries:
        fail("models", "must be a list of {model: PATH, parameters: {...}}")
    models = []                                    # (key, reference, per-model parameters)
    for i, e in enumerate(entries):
        key = f"models[{i}]"
        if not isinstance(e, dict) or "model" not in e or set(e) - {"model", "parameters"}:
            fail(key, "must be a mapping {model: PATH, parameters: {...}}")
        ref = _ref(fail, f"{key}.model", e["model"])
        if ref in [m[1] for m in models]:
            fail(f"{key}.model", f"lists {ref!r} twice")
        models.append((key, ref, _params(fail, f"{key}.parameters", e.get("parameters"), spec, PER_MODEL)))
    glob = _params(fail, "parameters", cfg.get("parameters"), spec, set(spec))
    if method.needs_base:
        if base is None:
            fail("base_model", f"is missing ({name} needs a base model)")
        models = [m for m in models if m[1] != base]
    elif base is not None and base not in [m[1] for m in models]:
        models.append(("base_model", base, {}))    # mergekit merges an unlisted base as one more input
    lo, hi = EXPERTS.get(name, (1, None))
    if not lo <= len(models) <= (hi or len(models)):
        fail("models", f"has {len(models)} models besides the base; {name} takes "
                       + (f"exactly {lo}" if lo == hi else f"at least {lo}"))

    params = {}
    for mk, default in spec.items():
        if mk in PER_MODEL:
            value = [m[2].get(mk, glob.get(mk, default)) for m in models]
            if REQUIRED in value:
                key, ref, _ = models[value.index(REQUIRED)]
                fail(mk, f"is missing for model {ref!r} ({key}); mergekit's {name} requires it: set it on "
                         "the model or in the global parameters")
        else:
            value = glob.get(mk, default)
            if value is REQUIRED:
                fail(f"parameters.{mk}", f"is missing (mergekit's {name} requires it)")
        _translate(fail, method, mk, value, default, params)
    for extra, value in [("consensus", "sum"), ("sparsify_scope", "tensor")]:
        if extra in {p.name for p in method.params}:
            params[extra] = value
    try:
        methods.resolve_params(method, len(models), params)
    except BadParameter as e:
        raise BadParameter(f"{path}: {e}") from None

    dtype_key = "out_dtype" if cfg.get("out_dtype") is not None else "dtype"
    dtype = cfg.get(dtype_key)
    if dtype is not None:
        try:
            dtype_name(str(dtype))
        except BadParameter:
            fail(dtype_key, f"= {dtype!r}: choose bfloat16, float16, float32 or float64")
        dtype = str(dtype)
    return {"method": name, "base": base, "experts": [m[1] for m in models], "dtype": dtype, "params": params}


def _ref(fail, key, value) -> str:
    if not isinstance(value, str) or not value:
        fail(key, "must be a model path or hub id")
    if "+" in value:
        fail(key, f"= {value!r}: LoRA references (model+lora) are not supported; merge the LoRA first")
    return value


def _params(fail, key, given, spec, allowed) -> dict:
    """Parameter values checked and typed; `allowed` are those that may appear at this level."""
    if given is None:
        return {}
    if not isinstance(given, dict):
        fail(key, "must be a mapping of parameter: value")
    out = {}
    for name, v in given.items():
        where = f"{key}.{name}"
        if name not in spec:
            fail(where, f"is not a parameter of this mergekit method (it takes: {', '.join(spec)})")
        if name not in allowed:
            fail(where, "is a global parameter in mergekit (which ignores it here); move it to 'parameters'")
        if isinstance(v, (list, dict)):
            fail(where, "is a gradient or filter: per-layer gradients and filters are not supported yet")
        if name in BOOLS and str(v).lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            out[name] = str(v).lower() in ("true", "1", "yes", "on")
        elif name not in BOOLS and not isinstance(v, bool):
            try:
                out[name] = float(v)
            except (TypeError, ValueError):
                fail(where, f"= {v!r} is not a number")
        else:
            fail(where, f"= {v!r} is not a {'boolean' if name in BOOLS else 'number'}")
    return out


def _translate(fail, method, mk: str, value, default, params: dict) -> None:
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
        fail(mk, f"= {value}: mbmerge's {method.name} has no such option (only mergekit's default, "
                 f"{default}, is possible)")
