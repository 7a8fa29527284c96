"""mergekit YAML recipes (mergekit 0.1.5, the `models:` or `slices:` form) as keyword arguments for merge().

The recipe keeps mergekit's meaning. mergekit's defaults (each method's registry row) are filled in
explicitly, because mbmerge's own defaults differ (e.g. ties density 0.2 here, 1.0 there):

  merge_method               -> method (the methods both tools have)
  base_model                 -> base. A listed base is not an expert. Exception: linear merges
                                every input, and like mergekit it adds an unlisted base as one more.
  models[i].model            -> experts, paths used as given (relative to the current folder)
  slices[s].sources[j]       -> slices: per slice its sources (model, first, end layer), the base's first;
                                the experts are the models besides the base (engine/inputs/slices.py). A source's
                                parameters win over its slice's, which win over the global ones
  weight, density, gamma,    -> weights, density, gamma, epsilon: one value per expert, taken from
  epsilon                       the model, else the global parameters, else mergekit's default
  lambda, t, filter_wise     -> scale, t, filter_wise (passthrough's per-model scale: its scale)
  normalize                  -> aggregate mean|sum (methods that elect signs), else normalize
  rescale                    -> rescale l1|none; also consensus=sum and sparsify_scope=tensor
  int8_mask                  -> ignored: a memory saving in mergekit, with the same result
  out_dtype, else dtype      -> dtype: the output dtype (mbmerge always computes in float32)
  tokenizer_source, tokenizer-> tokenizer: the output vocabulary (engine/inputs/vocabulary.py)
  chat_template              -> chat_template: 'auto', a model of the recipe, or a Jinja template
  a list of values           -> a gradient over a slice's layers (the models: form is one slice of all):
                                its layer i of L at t = i / (L - 1) (1 for one layer), tensors outside
                                the layers at t = 0 (embeddings with the first slice, the others with the
                                last), interpolated between the two nearest points (booleans: picked)
  [{filter: s, value: v}]    -> per tensor, the first condition whose filter is absent, '*' or part of
                                its name (v may be a gradient); load_recipe's "layered" carries them,
                                and tensor_overrides makes them the engine's per-tensor overrides

Each refusal names the key: modules, slices that mbmerge cannot merge as one set of inputs,
LoRA references, parameters unknown to mergekit's method, values mbmerge's method cannot honour
(checked at every point of a gradient and under every filter), and unknown keys. Knows nothing of
tensors or files besides the recipe.
"""
from dataclasses import dataclass

import yaml

from ... import methods
from ...common import roles
from ...common.errors import BadParameter
from ..inputs import vocabulary
from ..inputs.header import dtype_name
from .values import PER_MODEL, Layered, Reading, at, fail, params_of, points, tensor_overrides, to_mergekit, values

__all__ = ["load_recipe", "merge_kwargs", "tensor_overrides", "to_mergekit"]

KEYS = {"merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
        "tokenizer_source", "tokenizer", "chat_template", "calibrate"}


def load_recipe(path, text: str | None = None) -> dict:
    """Read a mergekit YAML recipe (the file at `path`, or `text`, then named `path` in messages);
    BadParameter naming the file and key for anything unsupported.

    Returns:
        {"method": str, "base": str | None, "experts": [str, ...], "dtype": str | None,
         "params": {mbmerge parameter: value, per-expert ones as lists in expert order; outside the
                    layers, where the recipe has gradients or filters},
         "layered": the recipe's gradients and filters for merge(layered=...), or None,
         "chat_template": for merge(chat_template=...), or None,
         "ignored": [(key, method name), ...] of parameters the method does not take, left out,
         "module": None, or with `modules:` the first module's name (the keys above are its merge's), and
         "modules": [{"module": name, "method", "base", "experts", "params", "layered", "slices"}, ...] the others',
         "merge": all of these as mbmerge.merge's keyword arguments}.
    Example:
        >>> r = load_recipe("ties.yml")
        >>> mbmerge.merge(out="m/", **r["merge"])
    """
    try:
        cfg = _read(path, text)
        base = _ref("base_model", cfg["base_model"]) if cfg.get("base_model") is not None else None
        ignored = []
        if cfg.get("modules") is not None:
            units = _modules(cfg, base, ignored)
        else:
            units = [{"module": None, **_unit(cfg, _Block(cfg, "", base, ignored))}]
        dtype_key = "out_dtype" if cfg.get("out_dtype") is not None else "dtype"   # mergekit's rule
        dtype = None if cfg.get(dtype_key) is None else str(cfg[dtype_key])
        try:
            dtype_name(dtype)
        except BadParameter:
            fail(dtype_key, f"= {dtype!r}: choose bfloat16, float16, float32 or float64")
        tokenizer = _tokenizer(cfg)
        calibrate, step = _calibrate(cfg.get("calibrate"))
    except BadParameter as e:
        raise BadParameter(f"{path}: {e}") from None
    out = {**units[0], "params": {**units[0]["params"], **step}, "calibrate": calibrate, "modules": units[1:],
           "dtype": dtype, "chat_template": cfg.get("chat_template"),
           "tokenizer": tokenizer, "ignored": list(dict.fromkeys(ignored))}
    return {**out, "merge": merge_kwargs(out)}


@dataclass(frozen=True)
class _Block:
    """A part of a recipe merged by one method: the whole recipe, or one of its modules (`where`: its keys'
    prefix, 'modules.NAME.'); `ignored` collects the parameters its method does not take."""
    cfg: dict
    where: str
    base: str | None
    ignored: list
    parameters: object = None       # a module's own parameters (between the global ones and its slices')


def _unit(cfg: dict, block: _Block) -> dict:
    """One method's merge of a block: its method, base, experts, parameters, gradients and slices."""
    at_ = block.where
    name = block.cfg.get("merge_method", cfg.get("merge_method"))
    known = [m.name for m in methods.REGISTRY.values() if m.mergekit is not None]
    if name not in known:
        fail(f"{at_}merge_method", "is missing" if name is None else
              f"= {name!r} is not supported; mbmerge runs these mergekit methods: {', '.join(known)}")
    method = methods.REGISTRY[name]
    reading = Reading(method, block.ignored)
    if block.cfg.get("slices") is not None:
        if block.cfg.get("models") is not None:
            fail(f"{at_}slices", "and 'models' are both set; mergekit takes one of them")
        slices = _slices(block, reading)
    else:       # the models: form is one slice of every layer, as mergekit reads it
        slices = [{"models": _inputs(block, reading), "parameters": {}, "sources": None, "first": 0, "count": None}]
    levels = [values("parameters", cfg.get("parameters"), reading),
              values(f"{at_}parameters", block.parameters, reading)]     # the global ones, then the module's
    layered = [v for d in [*levels, *[d for s in slices for d in [s["parameters"], *[m[2] for m in s["models"]]]]]
               for v in d.values() if isinstance(v, list)]
    for s in slices:     # mbmerge's own checks, e.g. density in (0, 1], at every point of every slice
        for part, t in points(layered):
            methods.resolve_params(method, len(s["models"]),
                                   params_of(*at(s["models"], [*levels, s["parameters"]], part, t), method,
                                             method.mergekit))
    return _merge_of(name, block.base, levels, slices, bool(layered))


def _merge_of(method: str, base: str | None, levels: list, slices: list, layered: bool) -> dict:
    """A unit's merge as load_recipe returns it (method, base, experts, params, layered, slices)."""
    sliced = slices[0]["sources"] is not None
    settings = Layered(method, {"parameters": levels[0], "module": levels[1], "slices": [
        {"first": s["first"], "count": s["count"], "parameters": s["parameters"], "models": [m[2] for m in s["models"]]}
        for s in slices]}) if layered or sliced else None
    experts = list(dict.fromkeys(m[1] for s in slices for m in s["models"] if m[1] != base or not sliced)) or [base]
    first = slices[0]
    params = params_of(*at(first["models"], [*levels, first["parameters"]], "", 0.0), methods.REGISTRY[method],
                       methods.REGISTRY[method].mergekit)
    return {"method": method, "base": base, "experts": experts, "params": params, "layered": settings,
            "slices": [s["sources"] for s in slices] if sliced else None}


def _modules(cfg: dict, base: str | None, ignored: list) -> list[dict]:
    """mergekit's `modules:` ({name: {models | slices, parameters}}), each read as its own merge; a module may
    name its own merge_method (mbmerge's: mergekit 0.1.5 merges every module with the recipe's)."""
    given = cfg["modules"]
    if cfg.get("models") is not None or cfg.get("slices") is not None:
        fail("modules", "and 'models' or 'slices' are both set; mergekit takes one of them")
    if not isinstance(given, dict) or not given:
        fail("modules", "must be a mapping {MODULE: {models: [...]} or {slices: [...]}} (e.g. text_decoder, "
                        "vision_tower, multi_modal_projector)")
    units = []
    for name, block in given.items():
        where = f"modules.{name}"
        canonical = roles.MODULES.get(str(name))
        if canonical is None:
            fail(where, f"is not a module mbmerge knows; choose {', '.join(roles.MODULES)}")
        if canonical in [u["module"] for u in units]:
            fail(where, f"names module {canonical} again")
        if not isinstance(block, dict) or set(block) - {"models", "slices", "parameters", "merge_method"}:
            fail(where, "must be a mapping {models: [...] or slices: [...], parameters: {...}, merge_method: ...}"
                        " (base_model is the recipe's)")
        if block.get("slices") is not None and canonical != "text_decoder":
            fail(f"{where}.slices", "are not supported: mbmerge slices the text decoder's layers only")
        units.append({"module": canonical, **_unit(cfg, _Block(block, f"{where}.", base, ignored,
                                                                block.get("parameters")))})
    return units


def _calibrate(given) -> tuple[str | None, dict]:
    """mbmerge's own key `calibrate: svc` (or `{method: svc, alpha: 0.2}`): a post-step after the merge method
    (methods.CALIBRATIONS), and its parameters as the merge's (svc_alpha)."""
    if given is None:
        return None, {}
    values = {"method": given} if isinstance(given, str) else dict(given) if isinstance(given, dict) else {}
    name = values.pop("method", None)
    if name not in methods.CALIBRATIONS:
        fail("calibrate", f"= {given!r}: choose {', '.join(methods.CALIBRATIONS)} (or {{method: svc, alpha: 0.1}})")
    known = {p.name.removeprefix(f"{name}_"): p for p in methods.CALIBRATIONS[name][1]}
    for key in values:
        if key not in known:
            fail(f"calibrate.{key}", f"is not a parameter of {name}; it takes {', '.join(known)}")
    return name, {known[k].name: known[k].coerce(v, name) for k, v in values.items()}


def merge_kwargs(recipe: dict) -> dict:
    """load_recipe's reading as the keyword arguments of mbmerge.merge (all but `out`)."""
    more = {"module": recipe["module"], "modules": [
        {"module": m["module"], "method": m["method"], "experts": m["experts"], "base": m["base"],
         "layered": m["layered"], "slices": m["slices"], **m["params"]} for m in recipe["modules"]]} \
        if recipe.get("module") else {}
    return {"method": recipe["method"], "experts": recipe["experts"], "base": recipe["base"], "dtype": recipe["dtype"],
            "layered": recipe["layered"], "slices": recipe["slices"], "chat_template": recipe["chat_template"],
            "tokenizer": recipe["tokenizer"], **({"ignored": recipe["ignored"]} if recipe.get("ignored") else {}),
            **({"calibrate": recipe["calibrate"]} if recipe.get("calibrate") else {}),
            **more, **recipe["params"]}


def _read(path, text: str | None) -> dict:
    try:
        if text is None:
            with open(path) as f:
                text = f.read()
        cfg = yaml.safe_load(text)
    except OSError as e:
        raise BadParameter(f"cannot read the recipe ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise BadParameter(f"not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(cfg, dict):
        raise BadParameter("not a mergekit recipe (expected a mapping with merge_method and models)")
    for key in cfg:
        if key not in KEYS:
            fail(key, "is not supported (not a mergekit key mbmerge knows)")
    if cfg.get("chat_template") is not None and not isinstance(cfg["chat_template"], str):
        fail("chat_template", "must be 'auto', a model of the recipe or a Jinja template")
    return cfg


def _tokenizer(cfg: dict) -> dict | None:
    """tokenizer_source or the tokenizer block (not both, as mergekit says), as merge(tokenizer=...) takes it."""
    if cfg.get("tokenizer_source") is not None and cfg.get("tokenizer") is not None:
        fail("tokenizer", "and 'tokenizer_source' are both set; mergekit takes one of them")
    key = "tokenizer" if cfg.get("tokenizer") is not None else "tokenizer_source"
    if cfg.get(key) is None:
        return None
    value = cfg[key] if key == "tokenizer" else str(cfg[key])
    if key == "tokenizer" and isinstance(value, str):
        fail(key, "must be a mapping {source: ..., tokens: {...}, pad_to_multiple_of: N}; a source alone is "
                   "tokenizer_source")
    return vocabulary.parse(value, key).as_dict()


def _inputs(block: _Block, reading: Reading) -> list:
    """The experts as (key, reference, per-model parameters), with mergekit's base rules."""
    entries, method, base = block.cfg.get("models"), reading.method, block.base
    if not isinstance(entries, list) or not entries:
        fail(f"{block.where}models", "must be a list of {model: PATH, parameters: {...}}")
    models = []
    for i, e in enumerate(entries):
        key = f"{block.where}models[{i}]"
        if not isinstance(e, dict) or "model" not in e or set(e) - {"model", "parameters"}:
            fail(key, "must be a mapping {model: PATH, parameters: {...}}")
        ref = _ref(f"{key}.model", e["model"])
        if ref in [m[1] for m in models]:
            fail(f"{key}.model", f"lists {ref!r} twice")
        models.append((key, ref, values(f"{key}.parameters", e.get("parameters"), reading, PER_MODEL)))
    if method.needs_base:
        if base is None:
            fail("base_model", f"is missing ({method.name} needs a base model)")
        models = [m for m in models if m[1] != base]
    elif base is not None and base not in [m[1] for m in models]:
        models.append(("base_model", base, {}))    # mergekit merges an unlisted base as one more input
    _count(f"{block.where}models", models, method)
    return models


def _count(key: str, models: list, method) -> None:
    lo, hi = method.min_experts, method.max_experts     # as mergekit's input contracts
    if not lo <= len(models) <= (hi or len(models)):
        fail(key, f"has {len(models)} models besides the base; {method.name} takes "
                   + (f"exactly {lo}" if lo == hi else f"at least {lo}"))


def _slices(block: _Block, reading: Reading) -> list[dict]:
    """Each slice: its sources [(reference, first layer, end layer)], the base's first where the method
    uses it, its experts (key, reference, per-model parameters), its parameters and output layers."""
    entries, method, base = block.cfg["slices"], reading.method, block.base
    if not isinstance(entries, list) or not entries:
        fail(f"{block.where}slices", "must be a list of {sources: [{model: PATH, layer_range: [FIRST, END]}, ...]}")
    if method.needs_base and base is None:
        fail("base_model", f"is missing ({method.name} needs a base model in every slice)")
    out, first = [], 0
    for s, e in enumerate(entries):
        key = f"{block.where}slices[{s}]"
        if not isinstance(e, dict) or not isinstance(e.get("sources"), list) or not e["sources"] \
                or set(e) - {"sources", "parameters"}:
            fail(key, "must be a mapping {sources: [{model: PATH, layer_range: [FIRST, END]}, ...], parameters: ...}")
        sources = []
        for j, src in enumerate(e["sources"]):
            where = f"{key}.sources[{j}]"
            if not isinstance(src, dict) or {"model", "layer_range"} - set(src) or \
                    set(src) - {"model", "layer_range", "parameters"}:
                fail(where, "must be a mapping {model: PATH, layer_range: [FIRST, END], parameters: {...}}")
            lo_hi = src["layer_range"]
            if not (isinstance(lo_hi, list) and len(lo_hi) == 2 and all(type(x) is int for x in lo_hi)
                    and 0 <= lo_hi[0] < lo_hi[1]):
                fail(f"{where}.layer_range", f"= {lo_hi!r} must be [FIRST, END]: layers FIRST to END - 1, "
                                              f"0 <= FIRST < END")
            ref = _ref(f"{where}.model", src["model"])
            sources.append((where, ref, *lo_hi, values(f"{where}.parameters", src.get("parameters"), reading, PER_MODEL)))
        counts = {b - a for _, _, a, b, _ in sources}
        if len(counts) > 1:
            fail(key, f"has sources of {' and '.join(map(str, sorted(counts)))} layers; every source of a slice "
                       f"must give as many (mergekit's rule)")
        if method.needs_base and base not in [src[1] for src in sources]:
            fail(key, f"has no source from base_model {base!r}; {method.name} merges against the base in every slice")
        ordered = sorted(sources, key=lambda src: not (method.needs_base and src[1] == base))  # the base first
        models = [(w, ref, p) for w, ref, _, _, p in ordered if not (method.needs_base and ref == base)]
        _count(f"{key}.sources", models, method)
        if out and len(models) != len(out[0]["models"]):
            fail(key, f"has {len(models)} models besides the base and slices[0] {len(out[0]['models'])}; mbmerge "
                       f"merges the same number of models in every slice")
        out.append({"models": models, "parameters": values(f"{key}.parameters", e.get("parameters"), reading),
                    "sources": [(ref, a, b) for _, ref, a, b, _ in ordered], "first": first, "count": counts.pop()})
        first += out[-1]["count"]
    return out


def _ref(key, value) -> str:
    if not isinstance(value, str) or not value:
        fail(key, "must be a model path or hub id")
    return value
