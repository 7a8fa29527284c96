"""The MoE output architectures mergekit-moe 0.1.5 offers, as tables: which dense model types each takes, what
it does with shared experts, its config, and where each expert's MLP and each router goes. Tensor names are the
ones transformers' `save_pretrained` writes (one tensor per expert and projection, e.g. Mixtral's
`block_sparse_moe.experts.3.w1.weight`): the layout of the published releases, which llama.cpp, vLLM and
transformers 4 read, and which transformers 5 fuses into `mlp.experts.gate_up_proj` as it loads.

    architecture   inputs                  shared experts          names
    Mixtral        llama, mistral          none                    block_sparse_moe.experts.E.w1/w3/w2, .gate
    DeepSeek MoE   llama, mistral          at most one, ungated    mlp.experts.E.*_proj, mlp.shared_experts.*
    Qwen MoE       llama, mistral, qwen2   exactly one, gated      mlp.experts.E.*_proj, mlp.shared_expert.*
    Qwen3 MoE      qwen3                   none                    mlp.experts.E.*_proj

DeepSeek MoE's config names the hub's remote code (deepseek-ai/deepseek-moe-16b-base), as mergekit's does:
transformers loads it only when the user allows remote code. Torch-free; transformers' config classes build the configs.
"""
from dataclasses import dataclass, field
from typing import Callable

from ...common.errors import BadParameter
from .recipe import MoeRecipe

MLP = ("gate_proj", "up_proj", "down_proj")       # a dense (Llama-style) MLP's projections


@dataclass(frozen=True, kw_only=True)
class Architecture:
    name: str                                   # mergekit's, which `architecture:` matches by prefix
    inputs: tuple[str, ...]                     # the dense model types it takes
    shared: str                                 # "none", "one gated", "at most one ungated"
    expert: Callable[[int, int, str], str]      # (layer, expert, projection) -> tensor name
    router: Callable[[int], str]
    shared_expert: Callable[[int, str], str] | None = None
    shared_gate: Callable[[int], str] | None = None
    zero_attention_bias: bool = False           # Qwen2-MoE's attention has q/k/v biases: zeros where the base has none
    config: Callable[[dict, MoeRecipe], dict] = field(repr=False)

    def unfit(self, recipe: MoeRecipe, model_types: list[str]) -> str | None:
        """Why this architecture cannot take these models (base, experts, shared experts), or None."""
        n, prompted = len(recipe.shared_experts), any(e.positive for e in recipe.shared_experts)
        if self.shared == "none" and n:
            return "takes no shared experts"
        if self.shared == "at most one ungated" and (n > 1 or prompted):
            return "takes at most one shared expert, without prompts"
        if self.shared == "one gated" and (n != 1 or not (prompted or recipe.gate_mode.endswith("random"))):
            return "takes exactly one shared expert, with prompts for its gate"
        if len(set(model_types)) != 1:
            return f"needs every model of one type (found {', '.join(sorted(set(model_types)))})"
        if model_types[0] not in self.inputs:
            return f"takes {', '.join(self.inputs)} models, not {model_types[0]}"
        return None


def _layer(i: int) -> str:
    return f"model.layers.{i}"


def _dense_fields(base: dict) -> dict:
    """The base config's settings a MoE config takes over, with transformers' defaults for those its file leaves
    out (as mergekit reads it: through the config class), its own identity left out."""
    from transformers import AutoConfig
    full = AutoConfig.for_model(**base).to_dict()
    drop = {"model_type", "architectures", "transformers_version", "auto_map", "_name_or_path"}
    return {k: v for k, v in full.items() if k not in drop}


def _mixtral_config(base: dict, recipe: MoeRecipe) -> dict:
    from transformers import MixtralConfig
    fields = {**_dense_fields(base), "sliding_window": None}
    cfg = MixtralConfig(**fields, num_local_experts=len(recipe.experts), num_experts_per_tok=recipe.experts_per_token)
    return {**cfg.to_diff_dict(), "architectures": ["MixtralForCausalLM"]}


def _qwen2_moe_config(base: dict, recipe: MoeRecipe) -> dict:
    from transformers import Qwen2MoeConfig
    size = base["intermediate_size"]
    cfg = Qwen2MoeConfig(**_dense_fields(base), num_experts=len(recipe.experts),
                         num_experts_per_tok=recipe.experts_per_token, decoder_sparse_step=1, norm_topk_prob=True,
                         moe_intermediate_size=size, shared_expert_intermediate_size=size, qkv_bias=True)
    cfg.use_sliding_window, cfg.sliding_window = False, None      # set after: the constructor derives them
    return {**cfg.to_diff_dict(), "architectures": ["Qwen2MoeForCausalLM"]}


def _qwen3_moe_config(base: dict, recipe: MoeRecipe) -> dict:
    from transformers import Qwen3MoeConfig
    cfg = Qwen3MoeConfig(**_dense_fields(base), num_experts=len(recipe.experts),
                         num_experts_per_tok=recipe.experts_per_token, decoder_sparse_step=1, norm_topk_prob=True,
                         moe_intermediate_size=base["intermediate_size"])
    return {**cfg.to_diff_dict(), "architectures": ["Qwen3MoeForCausalLM"]}


def _deepseek_config(base: dict, recipe: MoeRecipe) -> dict:
    """DeepSeek-MoE's config (remote code): the base's settings and the MoE's, every layer sparse."""
    remote = "deepseek-ai/deepseek-moe-16b-base--"
    shared = len(recipe.shared_experts)
    return {**_dense_fields(base), "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek",
            "n_routed_experts": len(recipe.experts), "n_shared_experts": shared or None,
            "num_experts_per_tok": recipe.experts_per_token, "first_k_dense_replace": 0, "moe_layer_freq": 1,
            "scoring_func": "softmax", "norm_topk_prob": True, "moe_intermediate_size": base["intermediate_size"],
            "auto_map": {"AutoConfig": remote + "configuration_deepseek.DeepseekConfig",
                         "AutoModel": remote + "modeling_deepseek.DeepseekModel",
                         "AutoModelForCausalLM": remote + "modeling_deepseek.DeepseekForCausalLM"}}


_MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}

ARCHITECTURES = (
    Architecture(name="Mixtral", inputs=("llama", "mistral"), shared="none", config=_mixtral_config,
                 expert=lambda i, e, p: f"{_layer(i)}.block_sparse_moe.experts.{e}.{_MIXTRAL_NAMES[p]}.weight",
                 router=lambda i: f"{_layer(i)}.block_sparse_moe.gate.weight"),
    Architecture(name="DeepSeek MoE", inputs=("llama", "mistral"), shared="at most one ungated",
                 config=_deepseek_config, expert=lambda i, e, p: f"{_layer(i)}.mlp.experts.{e}.{p}.weight",
                 router=lambda i: f"{_layer(i)}.mlp.gate.weight",
                 shared_expert=lambda i, p: f"{_layer(i)}.mlp.shared_experts.{p}.weight"),
    Architecture(name="Qwen MoE", inputs=("llama", "mistral", "qwen2"), shared="one gated", config=_qwen2_moe_config,
                 expert=lambda i, e, p: f"{_layer(i)}.mlp.experts.{e}.{p}.weight",
                 router=lambda i: f"{_layer(i)}.mlp.gate.weight",
                 shared_expert=lambda i, p: f"{_layer(i)}.mlp.shared_expert.{p}.weight",
                 shared_gate=lambda i: f"{_layer(i)}.mlp.shared_expert_gate.weight", zero_attention_bias=True),
    Architecture(name="Qwen3 MoE", inputs=("qwen3",), shared="none", config=_qwen3_moe_config,
                 expert=lambda i, e, p: f"{_layer(i)}.mlp.experts.{e}.{p}.weight",
                 router=lambda i: f"{_layer(i)}.mlp.gate.weight"),
)


def choose(recipe: MoeRecipe, model_types: list[str]) -> Architecture:
    """The output architecture, as mergekit picks it: those whose name starts with `architecture:` (any, without
    one) that take these models; Mixtral where it does, else the first. One line saying why none fits."""
    wanted = (recipe.architecture or "").lower()
    named = [a for a in ARCHITECTURES if a.name.lower().startswith(wanted)]
    if not named:
        raise BadParameter(f"architecture = {recipe.architecture!r}: choose "
                           f"{', '.join(a.name for a in ARCHITECTURES)} (a prefix is enough)")
    why = {a.name: a.unfit(recipe, model_types) for a in named}
    fit = [a for a in named if why[a.name] is None]
    if not fit:
        raise BadParameter("no MoE architecture fits these models: " + "; ".join(f"{n} {w}" for n, w in why.items()))
    return next((a for a in fit if a.name == "Mixtral"), fit[0])
