"""Per-layer candidates (`mbmerge tune --per-layer G`): the layers cut into G contiguous groups, each searched
parameter one value a group (and a model, where it is per expert), written as an ordinary mergekit recipe
of G slices, as mergekit-evolve writes its genomes at a layer granularity: slice g takes every model's layers
of group g, each source with its own weight and density, the slice's own lambda.

The recipe is the candidate: it is merged through the recipe reader (so a trial merges exactly what its
recipe says), written beside the best merge (mbmerge_config.yml), and the card's command reruns it. What
the recipe cannot say stays on the command line: a protocol's tensors kept at the base (--keep-base).
Other protocol choices a mergekit recipe has no key for (model-wide ranks, tied keeps) do not apply:
a per-layer candidate has mergekit's semantics (per-tensor ranks), its sum or mean of the elected
deltas taken from the protocol (normalize).
"""
from dataclasses import replace

import yaml

from .. import methods
from ..common import roles
from ..common.errors import BadParameter
from ..engine.inputs.index import TensorIndex
from ..engine.recipe.values import PER_MODEL, to_mergekit
from .score import Candidate

MBMERGE = {"weight": "weights", "lambda": "scale"}      # mergekit's names that differ from mbmerge's


def layer_groups(n_layers: int, groups: int) -> list[tuple[int, int]]:
    """(first, end) of each of `groups` contiguous groups of layers, as even as they can be.

    Example: layer_groups(10, 3) == [(0, 3), (3, 7), (7, 10)]"""
    if groups > n_layers:
        raise BadParameter(f"--per-layer {groups}: the models have {n_layers} layer(s); choose at most {n_layers}")
    cuts = [round(g * n_layers / groups) for g in range(groups + 1)]
    return list(zip(cuts, cuts[1:]))


def trial_candidate(template: Candidate, params: dict, groups: int, layered: list[str]) -> Candidate:
    """The candidate a trial merges: the template with `params` (its fixed and searched values), or, with
    groups > 1, the mergekit recipe of its per-group values (`layered`: the parameters given per group)."""
    if groups == 1:
        return replace(template, params=params)
    return replace(template, params={}, recipe=recipe_text(template, params, groups, layered))


def recipe_text(template: Candidate, params: dict, groups: int, layered: list[str]) -> str:
    """A mergekit recipe (YAML) of G slices: the layered parameters' value of each group on its slice (per
    model on its sources), the others global; the protocol's aggregation as mergekit's normalize."""
    method = methods.get(template.method)
    if method.mergekit is None:
        raise BadParameter(f"--per-layer writes mergekit recipes; mergekit has no {template.method} (per-layer "
                           f"methods: {', '.join(m.name for m in methods.REGISTRY.values() if m.mergekit)})")
    base, experts = template.sources()
    refs = [(s.ref if template.base is not None else str(s.path)) for s in experts]
    base_ref = None if base is None else (template.base if template.base is not None else str(base.path))
    n_layers = roles.layer_count(TensorIndex.from_folder((base or experts[0]).path).tensors)
    known = {p.name: p for p in methods.calibrated(method, template.calibrate).params}
    given = {k: known[k].coerce(v, method.name) if k in known else v for k, v in params.items() if k not in layered}
    fixed = {**_defaults(method, template.protocol), **given}
    step = _calibration(template.calibrate, fixed)
    slices = []
    for g, (first, end) in enumerate(layer_groups(n_layers, groups)):
        per_model, shared = _mergekit(template.method, {k: params[k][g] for k in layered})
        sources = [{"model": base_ref, "layer_range": [first, end]}] if base_ref is not None else []
        for i, ref in enumerate(refs):
            own = {k: _of(v, i) for k, v in per_model.items()}
            sources.append({"model": ref, "layer_range": [first, end], **({"parameters": own} if own else {})})
        slices.append({"sources": sources, **({"parameters": shared} if shared else {})})
    per_model, shared = _mergekit(template.method, fixed)
    if per_model:   # fixed per-model values: on every source of every slice, under the group's own
        for s in slices:
            for i, src in enumerate(s["sources"][base_ref is not None:]):
                src["parameters"] = {**{k: _of(v, i) for k, v in per_model.items()},
                                     **src.get("parameters", {})}
    recipe = {"merge_method": template.method, **({"base_model": base_ref} if base_ref is not None else {}),
              **({"parameters": shared} if shared else {}), "slices": slices, **step}
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None, width=120)


def _defaults(method: methods.Method, protocol: str | None) -> dict:
    """mbmerge's values (the protocol's, else the method's defaults) of the parameters a mergekit recipe
    can say, so that the recipe means what the same merge without --per-layer means, not mergekit's defaults."""
    said = {MBMERGE.get(k, k) for k in method.mergekit} | ({"aggregate"} if "normalize" in method.mergekit else set())
    values = {**{p.name: p.default for p in method.params}, **methods.protocol_defaults(method, protocol)}
    return {k: v for k, v in values.items() if k in said and k != "rescale"}   # 'inverse' has no mergekit spelling


def _of(value, i: int):
    """Expert i's value of a per-model parameter: a list's i-th (a list of one: for every expert), or the value."""
    return (value[i] if len(value) > 1 else value[0]) if isinstance(value, list) else value


def _calibration(name: str | None, fixed: dict) -> dict:
    """The recipe's `calibrate:` (mbmerge's own key) of a post-step, its parameters taken out of `fixed`."""
    if name is None:
        return {}
    values = {p.name.removeprefix(f"{name}_"): fixed.pop(p.name) for p in methods.CALIBRATIONS[name][1]
              if p.name in fixed}
    return {"calibrate": {"method": name, **values} if values else name}


def _mergekit(method: str, params: dict) -> tuple[dict, dict]:
    """(per-model, global) mergekit parameters of mbmerge's `params`; aggregate becomes normalize."""
    params = dict(params)
    normalize = {"normalize": params.pop("aggregate") == "mean"} if "aggregate" in params else {}
    try:
        per_model, shared = to_mergekit(method, params)
    except BadParameter as e:
        raise BadParameter(f"--per-layer writes mergekit recipes: {e}") from None
    assert set(per_model) <= PER_MODEL
    return per_model, {**shared, **normalize}
