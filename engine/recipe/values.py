"""A mergekit recipe's parameter settings: values, gradients over layers and {filter, value} conditions,
read as mergekit reads them, and mergekit's parameters translated into mbmerge's; per tensor, as the
engine's overrides. Knows nothing of files (recipe.py reads the documents).
"""
import re
from dataclasses import dataclass

from ... import methods
from ...common.errors import BadParameter
from ...common.roles import before_layers, layer_of, module_layer, module_of
from ...methods.contract import REQUIRED

PER_MODEL = {"weight", "density", "gamma", "epsilon", "scale"}   # scale: passthrough's
BOOLS = {"normalize", "rescale", "int8_mask", "filter_wise", "normalize_weights", "nuslerp_row_wise", "nuslerp_flatten"}


def fail(key, why):
    raise BadParameter(f"key {key!r} {why}")


@dataclass(frozen=True)
class Layered:
    """A recipe's per-layer gradients and filters (load_recipe's "layered"): given as MergeSpec.layered, the
    engine asks for its per-tensor overrides once it knows the merged tensors' names."""
    method: str
    settings: dict

    def overrides(self, names: list[str]) -> list[tuple[str, dict]]:
        return tensor_overrides(self.method, self.settings, names)


def tensor_overrides(method_name: str, layered: dict, names: list[str]) -> list[tuple[str, dict]]:
    """A recipe's per-layer gradients and filters (load_recipe's "layered") as the engine's per-tensor
    overrides: each tensor's mergekit values at its place t (layer i of L: i / (L - 1), 1 for one layer;
    outside the layers: 0, as mergekit plans embeddings and the head; unsliced, a tower's layers count within
    their module, as mergekit plans each module of a multimodal model) and under its name (a filter
    applies where it is a substring of the name), translated as load_recipe does, tensors that take the
    same values under one pattern of their exact names."""
    method = methods.REGISTRY[method_name]
    slices, groups = layered["slices"], {}
    layer = [(layer_of if slices[0]["count"] is not None else module_layer)(n) for n in names]
    totals = {}
    for name, i in zip(names, layer):
        totals[module_of(name)] = max(totals.get(module_of(name), 1), (i or 0) + 1)
    for name, i in zip(names, layer):
        if i is None:   # mergekit plans embeddings with the first slice, the other tensors with the last
            s, t = slices[0 if before_layers(name) else -1], 0.0
        else:
            s = next(s for s in slices if s["count"] is None or s["first"] <= i < s["first"] + s["count"])
            count = totals[module_of(name)] if s["count"] is None else s["count"]
            t = (i - s["first"]) / (count - 1) if count > 1 else 1.0
        models = [(f"models[{k}]", "", values) for k, values in enumerate(s["models"])]
        shared = [layered["parameters"], layered.get("module", {}), s["parameters"]]   # lowest precedence first
        params = params_of(*at(models, shared, name, t), method, method.mergekit)
        groups.setdefault(repr(sorted(params.items())), (params, []))[1].append(name)
    return [("^(?:" + "|".join(re.escape(n) for n in group) + ")$", params) for params, group in groups.values()]


def points(layered: list) -> list[tuple[str, float]]:
    """(a name, t) for every point a gradient or filter can take: each filter matched alone, at every
    gradient point (values between two points lie between theirs)."""
    names, lengths = {""}, {1}
    for v in layered:
        for c in v if all(isinstance(c, dict) for c in v) else [{"value": v}]:
            names.add(c.get("filter") or "")
            lengths.add(len(c["value"]) if isinstance(c["value"], list) else 1)
    ts = sorted({k / (n - 1) if n > 1 else 0.0 for n in lengths for k in range(n)})
    return [(name, t) for name in sorted(names) for t in ts]


def at(models: list, shared: list[dict], name: str, t: float) -> tuple[list, dict]:
    """The models' parameters, and the shared ones (global, then the slice's, which win), as each tensor
    `name` at place t takes them (absent where a filter list has no condition for it)."""
    def values(d):
        out = {k: evaluate(v, name, t) for k, v in d.items()}
        return {k: v for k, v in out.items() if v is not None}
    return [(key, ref, values(d)) for key, ref, d in models], {k: v for d in shared for k, v in values(d).items()}


def evaluate(setting, name: str, t: float):
    """mergekit's reading of a setting: a value; a list of values, interpolated at t between neighbours
    (numbers) or picked at int(t (n - 1)) (booleans); a list of {filter, value}: the first whose filter
    is absent, '*' or in the name."""
    if not isinstance(setting, list):
        return setting
    if setting and all(isinstance(c, dict) for c in setting):
        for c in setting:
            if c.get("filter") in (None, "*") or c["filter"] in name:
                return evaluate(c["value"], name, t)
        return None
    if any(isinstance(v, bool) for v in setting):
        return setting[int(t * (len(setting) - 1))]
    at = t * (len(setting) - 1)
    i = int(at)
    j = min(len(setting) - 1, i + 1)
    return (1 - (at - i)) * setting[i] + (at - i) * setting[j]


@dataclass(frozen=True)
class Reading:
    """The method a block of a recipe is read for, and the keys found so far of parameters it does not take
    (mergekit ignores them; so does mbmerge, with a warning: [(key, method name), ...])."""
    method: methods.Method
    ignored: list

    @property
    def spec(self) -> dict:
        return self.method.mergekit


def values(key, given, reading: Reading, allowed: set | None = None) -> dict:
    """Parameter values checked and typed; `allowed` are those that may appear at this level (None: all of
    the method's). A parameter the method does not take is left out and noted in reading.ignored."""
    spec = reading.spec
    if given is None:
        return {}
    if not isinstance(given, dict):
        fail(key, "must be a mapping of parameter: value")
    out = {}
    for name, v in given.items():
        where = f"{key}.{name}"
        if name not in spec:
            reading.ignored.append((where, reading.method.name))
            continue
        if allowed is not None and name not in allowed:
            fail(where, "is a global parameter in mergekit (which ignores it here); move it to 'parameters'")
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
                fail(f"{where}[{k}]", "must be {filter: NAME PART, value: VALUE or [gradient]} (filter optional)")
        return [{**c, "value": _setting(f"{where}[{k}].value", name, c["value"], False)} for k, c in enumerate(v)]
    if isinstance(v, list):
        if not v or any(isinstance(e, (list, dict)) for e in v):
            fail(where, "must be a value, a gradient (a list of values) or a list of {filter, value}")
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
        fail(where, f"= {v!r} is not a {'boolean' if name in BOOLS else 'number'}")


def params_of(models: list, glob: dict, method, spec: dict) -> dict:
    """mbmerge's parameters: each of mergekit's from the model, else global, else its default."""
    params = {}
    for mk, default in spec.items():
        if mk in PER_MODEL:
            value = [m[2].get(mk, glob.get(mk, default)) for m in models]
            if REQUIRED in value:
                key, ref, _ = models[value.index(REQUIRED)]
                fail(mk, f"is missing for model {ref!r} ({key}); mergekit's {method.name} requires it: "
                          "set it on the model or in the global parameters")
        else:
            value = glob.get(mk, default)
            if value is REQUIRED:
                fail(f"parameters.{mk}", f"is missing (mergekit's {method.name} requires it)")
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
    if isinstance(value, list) and mb in have and not next(p for p in method.params if p.name == mb).per_expert:
        value = value[0]      # a per-model value of a method of one model (passthrough's scale)
    if mb in have:
        params[mb] = ("l1" if value else "none") if mk == "rescale" else value
        return
    # task_arithmetic declares density and rescale in mergekit but never sparsifies
    no_effect = mk == "int8_mask" or (method.name == "task_arithmetic" and mk in ("density", "rescale"))
    if not no_effect and any(v != default for v in (value if isinstance(value, list) else [value])):
        fail(mk, f"= {value}: mbmerge's {method.name} has no such option (only mergekit's default, "
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
