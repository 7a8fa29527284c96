"""Tensor roles, written once: a model's token embeddings and output head (and whether they are tied),
its decoder layers (and which layer a tensor is in), its final norm, for the names transformers gives the
model types people merge: Llama-style dense and MoE decoders (`model.layers.N`), vision-language models
(`model.language_model.*`; their vision and audio towers are not decoder layers), GPT-2, Falcon and
Bloom (`transformer.h.N`), GPT-NeoX (`gpt_neox.layers.N`, `embed_in` / `embed_out`), OPT
(`model.decoder.layers.N`) and Mamba (`backbone.layers.N`, `backbone.embeddings`). Whether the head is
tied is the config's to say (`tie_word_embeddings`, a VLM's `text_config`); the rest is read from names.
Imports nothing of mbmerge, and no torch.
"""
import re

HEAD = "lm_head.weight"
HEADS = (HEAD, "embed_out.weight")               # GPT-NeoX calls its head embed_out
EMBEDDINGS = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight", "transformer.wte.weight",
              "transformer.word_embeddings.weight", "gpt_neox.embed_in.weight", "model.decoder.embed_tokens.weight",
              "backbone.embeddings.weight")   # the token embeddings, by model type
VOCABULARY = (*EMBEDDINGS, *HEADS)                # indexed by token id along their first axis
POSITION_EMBEDDINGS = ("transformer.wpe.weight", "model.decoder.embed_positions.weight")   # GPT-2's, OPT's
FINAL_NORMS = ("model.norm.weight", "model.language_model.norm.weight", "transformer.ln_f.weight",
               "transformer.ln_f.bias", "gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias",
               "model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias",
               "backbone.norm_f.weight")
# the embeddings and heads as one regex (what data-free methods keep at the base, as MergeBench does)
EMBEDDINGS_AND_HEAD = (r"(^|\.)(embed_tokens|lm_head|embed_in|embed_out|wte|wpe|word_embeddings)(\.|$)"
                       r"|^backbone\.embeddings\.")

_LAYER = re.compile(r"(?:^|\.)(layers|h)\.(\d+)\.")
_TOWER = re.compile(r"(?:^|\.)(vision_tower|vision_model|visual|audio_tower|multi_modal_projector)\.")
_DENSE_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
# mergekit's weights before the layers: the token (and GPT-2's position) embeddings
_BEFORE_LAYERS = re.compile(r"(^|\.)(embed_tokens|embed_in|wte|wpe|word_embeddings)\.|^backbone\.embeddings\.")


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor belongs to, or None (embeddings, head, final norm, a vision tower's)."""
    if _TOWER.search(name):
        return None
    m = _LAYER.search(name)
    return int(m.group(2)) if m else None


def dense_mlp(name: str) -> tuple[int, str] | None:
    """(layer, projection) of a Llama-style decoder's dense MLP weight (`model.layers.3.mlp.up_proj.weight`:
    Llama, Mistral, Qwen2, Qwen3, what a MoE takes its experts from), else None."""
    m = _DENSE_MLP.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def layer_count(names) -> int:
    """Decoder layers among tensor names: the largest layer index + 1 (0 without layers)."""
    return max((i for n in names if (i := layer_of(n)) is not None), default=-1) + 1


def renumbered(name: str, layer: int) -> str:
    """A decoder layer's tensor name moved to another layer (`model.layers.3.x` -> `model.layers.7.x`)."""
    m = _LAYER.search(name)
    return f"{name[:m.start(2)]}{layer}{name[m.end(2):]}"


def layer_pattern(layer: int) -> str:
    """A regex (for re.search) of the tensor names of one decoder layer, whatever the model type calls its
    layers, a vision or audio tower's layers left out."""
    return rf"^(?!.*{_TOWER.pattern})(?:.*\.)?(?:layers|h)\.{layer}\."


def before_layers(name: str) -> bool:
    """Whether mergekit plans a tensor before the layers (the embeddings), not after (norm, head)."""
    return layer_of(name) is None and bool(_BEFORE_LAYERS.search(name))


def role(name: str) -> str:
    """'embedding', 'position_embedding', 'head', 'layer', 'final_norm' or 'other' (a vision tower's, a
    projector's, ...)."""
    if name in EMBEDDINGS:
        return "embedding"
    if name in POSITION_EMBEDDINGS:
        return "position_embedding"
    if name in HEADS:
        return "head"
    if layer_of(name) is not None:
        return "layer"
    return "final_norm" if name in FINAL_NORMS else "other"


def ties_head(config: dict) -> bool:
    """Whether a model's config ties its head to its token embeddings: its own `tie_word_embeddings`,
    else its text model's (a vision-language model's `text_config`), else transformers' default, True."""
    for c in (config, config.get("text_config")):
        if isinstance(c, dict) and "tie_word_embeddings" in c:
            return c["tie_word_embeddings"] is not False
    return True
