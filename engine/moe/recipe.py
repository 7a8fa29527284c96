"""mergekit-moe's YAML (mergekit 0.1.5) read and checked, torch-free:

    base_model          the model whose attention, norms, embeddings and head the MoE keeps
    experts[i]          source_model (a folder, hub id, MergeBench domain or model+adapter), positive_prompts,
                        negative_prompts, noise_scale (Gaussian noise added to its MLP weights), residual_scale
                        (its down_proj scaled)
    shared_experts      always-on experts (Qwen2-MoE: one, gated by its prompts; DeepSeek-MoE: one, ungated)
    gate_mode           hidden (the base's hidden state of each prompt's last token, at each layer's input),
                        hidden_avg (averaged over the prompt), cheap_embed (the prompts' token embeddings,
                        every layer alike), random, uniform_random (as torch.nn.Linear initialises)
    experts_per_token   top-k routing (default 2); dtype: the output's (default the base's)
    architecture        the output's: mixtral, qwen (Qwen2-MoE), qwen3 (Qwen3-MoE), deepseek; by default the
                        first of these the models fit, Mixtral preferred, as mergekit chooses

Experts named by MergeBench domain (math, coding, ...) with no prompts route by their domain's validation
prompts (library.moe fills them in). Refused in one line naming the file and key, as mergekit refuses them: fewer experts than experts_per_token,
an expert with no positive prompts where the gate is computed from prompts, every expert with the same prompts,
every expert the same model (unless allow_all_same). Also refused here, where mergekit reads on: unknown keys
(a typo would silently take a default) and unknown gate modes.
"""
from dataclasses import dataclass, replace

import yaml

from ...common.errors import BadParameter
from ..inputs.header import dtype_name

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
PROMPTED = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")     # gates computed from the prompts
KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture"}
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}


@dataclass(frozen=True, kw_only=True)
class MoeExpert:
    source: str
    positive: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclass(frozen=True, kw_only=True)
class MoeRecipe:
    base: str | None                  # None: the built-in family's base (experts named by domain)
    experts: tuple[MoeExpert, ...]
    shared_experts: tuple[MoeExpert, ...] = ()
    gate_mode: str = "hidden"
    experts_per_token: int = 2
    dtype: str | None = None          # BF16, F16, F32, F64; None: the base's
    architecture: str | None = None   # as written; architectures.choose reads it
    text: str | None = None           # the YAML the recipe came from, written beside the output

    @property
    def gated(self) -> tuple[MoeExpert, ...]:
        """The experts that get a router row: the routed ones, then a shared one that has prompts (or any,
        under a random gate), as mergekit computes them."""
        shared = self.shared_experts if any(e.positive for e in self.shared_experts) or \
            self.gate_mode in ("random", "uniform_random") else ()
        return self.experts + shared


def read_recipe(path, last: bool = False) -> MoeRecipe:
    """A mergekit-moe YAML file as a checked MoeRecipe; BadParameter naming the file and key. `last`: the file may
    hold several documents, merges before the MoE (mbmerge moe runs them as stages), which is the last."""
    try:
        text = open(path, encoding="utf-8").read()
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        why = " ".join(str(e).split()) or type(e).__name__
        raise BadParameter(f"{path}: not a readable YAML file ({why[:200]})") from None
    if len(docs) > 1 and not last:
        raise BadParameter(f"{path}: {len(docs)} YAML documents; a MoE recipe is one")
    try:
        return recipe_of(docs[-1] if docs else None, text)
    except BadParameter as e:
        where = f"document {len(docs)} (the MoE)" if len(docs) > 1 else ""
        raise BadParameter(f"{path}: {where}{': ' if where else ''}{e}") from None


def is_staged(path) -> bool:
    """Whether a MoE recipe file holds merges (stages) before the MoE: several YAML documents."""
    try:
        return sum(d is not None for d in yaml.safe_load_all(open(path, encoding="utf-8"))) > 1
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False


def stage_folders(recipe: MoeRecipe, stages: dict) -> MoeRecipe:
    """recipe whose base and experts that name a stage ({name: its folder}) are that stage's output."""
    def folder(ref):
        return str(stages[ref]) if ref in stages else ref
    return replace(recipe, base=folder(recipe.base),
                   experts=tuple(replace(e, source=folder(e.source)) for e in recipe.experts),
                   shared_experts=tuple(replace(e, source=folder(e.source)) for e in recipe.shared_experts))


def recipe_of(cfg, text: str | None = None) -> MoeRecipe:
    """A mergekit-moe config (the YAML's mapping) as a MoeRecipe, its keys and values checked (its routing is
    checked once domain experts have their prompts: check_routing)."""
    if not isinstance(cfg, dict):
        raise BadParameter("not a mergekit-moe config (a mapping with base_model and experts)")
    _no_unknown(cfg, KEYS, "")
    if not isinstance(cfg.get("base_model"), str) or not cfg["base_model"]:
        raise BadParameter("base_model: missing (the model the MoE keeps attention, norms and embeddings of)")
    experts = _experts(cfg.get("experts"), "experts")
    shared = _experts(cfg["shared_experts"], "shared_experts") if cfg.get("shared_experts") else ()
    mode = cfg.get("gate_mode", "hidden")
    if mode not in GATE_MODES:
        raise BadParameter(f"gate_mode = {mode!r}: choose {', '.join(GATE_MODES)}")
    k = cfg.get("experts_per_token", 2)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise BadParameter(f"experts_per_token = {k!r}: a whole number of at least 1")
    try:
        dtype = dtype_name(None if cfg.get("dtype") is None else str(cfg["dtype"]).removeprefix("torch."))
    except BadParameter:
        raise BadParameter(f"dtype = {cfg['dtype']!r}: choose bfloat16, float16, float32 or float64") from None
    arch = cfg.get("architecture")
    if arch is not None and not isinstance(arch, str):
        raise BadParameter(f"architecture = {arch!r}: a name such as mixtral, qwen, qwen3 or deepseek")
    return MoeRecipe(base=cfg["base_model"], experts=experts, shared_experts=shared, gate_mode=mode,
                     experts_per_token=k, dtype=dtype, architecture=arch, text=text)


def check_routing(recipe: MoeRecipe, allow_all_same: bool = False) -> None:
    """mergekit's refusals of a MoE that could not route: fewer experts than experts_per_token, prompts missing
    or all alike, experts all alike."""
    if len(recipe.experts) < recipe.experts_per_token:
        raise BadParameter(f"experts_per_token = {recipe.experts_per_token} but {len(recipe.experts)} expert(s): "
                           f"list at least as many experts")
    if recipe.gate_mode in PROMPTED:
        for i, e in enumerate(recipe.experts):
            if not e.positive:
                raise BadParameter(f"experts[{i}] ({e.source}): no positive_prompts; gate_mode {recipe.gate_mode} "
                                   f"routes by them (or use gate_mode random)")
        prompts = {(e.positive, e.negative) for e in recipe.experts}
        if len(recipe.experts) > 1 and len(prompts) == 1:
            raise BadParameter("every expert has the same positive and negative prompts: the router could not tell "
                               "them apart; give each expert prompts of what should go to it")
    shared_prompts = [bool(e.positive) for e in recipe.shared_experts]
    if shared_prompts and len(set(shared_prompts)) > 1:
        raise BadParameter("shared_experts: give prompts to every shared expert or to none")
    if not allow_all_same and len(recipe.experts) > 1 and len({e.source for e in recipe.experts}) == 1:
        raise BadParameter(f"every expert is {recipe.experts[0].source}: the MoE would cost more and compute the "
                           f"same; pass --i-understand-this-is-not-useful-without-training to build it anyway")


def _experts(items, key: str) -> tuple[MoeExpert, ...]:
    if not isinstance(items, list) or not items:
        raise BadParameter(f"{key}: a list of experts, each with a source_model")
    return tuple(_expert(e, f"{key}[{i}]") for i, e in enumerate(items))


def _expert(item, where: str) -> MoeExpert:
    if not isinstance(item, dict) or not isinstance(item.get("source_model"), str) or not item["source_model"]:
        raise BadParameter(f"{where}: needs a source_model (a folder, hub id, or model+adapter)")
    _no_unknown(item, EXPERT_KEYS, f"{where}.")
    scales = {}
    for key in ("noise_scale", "residual_scale"):
        v = item.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise BadParameter(f"{where}.{key} = {v!r}: a number")
        scales[key] = None if v is None else float(v)
    return MoeExpert(source=item["source_model"], positive=_prompts(item, "positive_prompts", where),
                     negative=_prompts(item, "negative_prompts", where), **scales)


def _prompts(item: dict, key: str, where: str) -> tuple[str, ...]:
    v = item.get(key) or []
    if isinstance(v, str) or not isinstance(v, list) or not all(isinstance(p, str) for p in v):
        raise BadParameter(f"{where}.{key}: a list of strings")
    return tuple(v)


def _no_unknown(cfg: dict, known: set, where: str) -> None:
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise BadParameter(f"{where}{unknown[0]}: not a mergekit-moe key (known: {', '.join(sorted(known))})")


def recipe_yaml(recipe: MoeRecipe) -> str:
    """The recipe as mergekit-moe YAML: as the user wrote it, or written out (a MoE of domain names)."""
    if recipe.text is not None:
        return recipe.text

    def expert(e: MoeExpert) -> dict:
        out = {"source_model": e.source, "positive_prompts": list(e.positive)}
        out.update({k: v for k, v in [("negative_prompts", list(e.negative)), ("noise_scale", e.noise_scale),
                                      ("residual_scale", e.residual_scale)] if v})
        return out
    cfg = {"base_model": recipe.base, "gate_mode": recipe.gate_mode, "experts_per_token": recipe.experts_per_token,
           **({"dtype": recipe.dtype.lower()} if recipe.dtype else {}),
           **({"architecture": recipe.architecture} if recipe.architecture else {}),
           "experts": [expert(e) for e in recipe.experts],
           **({"shared_experts": [expert(e) for e in recipe.shared_experts]} if recipe.shared_experts else {})}
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)
