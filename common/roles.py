"""Tensor roles, written once: a model's token embeddings and output head (and whether they are tied),
its decoder layers (and which layer a tensor is in), its final norm, for the names transformers gives the
model types people merge: Llama-style dense and MoE decoders (`model.layers.N`), vision-language models
(`model.language_model.*`, or `language_model.model.*` as their checkpoints store it; their vision and
audio towers are not decoder layers), GPT-2, Falcon and
Bloom (`transformer.h.N`), GPT-NeoX (`gpt_neox.layers.N`, `embed_in` / `embed_out`), OPT
(`model.decoder.layers.N`) and Mamba (`backbone.layers.N`, `backbone.embeddings`). Whether the head is
tied is the config's to say (`tie_word_embeddings`, a VLM's `text_config`); the rest is read from names.
Also a multimodal model's modules as mergekit names them (text_decoder, vision_tower, multi_modal_projector),
each tensor's module and its layer within it, and a language model's tensor names as its text-only sibling's.
Imports nothing of mbmerge, and no torch.
"""
import re

HEAD = "lm_head.weight"
HEADS = (HEAD, "embed_out.weight", "language_model.lm_head.weight")   # GPT-NeoX: embed_out; a VLM's checkpoint
EMBEDDINGS = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
              "language_model.model.embed_tokens.weight", "transformer.wte.weight",
              "transformer.word_embeddings.weight", "gpt_neox.embed_in.weight", "model.decoder.embed_tokens.weight",
              "backbone.embeddings.weight")   # the token embeddings, by model type
VOCABULARY = (*EMBEDDINGS, *HEADS)                # indexed by token id along their first axis
POSITION_EMBEDDINGS = ("transformer.wpe.weight", "model.decoder.embed_positions.weight")   # GPT-2's, OPT's
FINAL_NORMS = ("model.norm.weight", "model.language_model.norm.weight", "language_model.model.norm.weight",
               "transformer.ln_f.weight",
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

# a multimodal model's modules, as mergekit's architecture definitions name them (each name it also
# accepts: Llama 4's vision_model, the language_model of transformers' names), and their tensors: the
# projector (Qwen2-VL's is the vision tower's merger, as mergekit splits it), the towers, else the text decoder
MODULES = {"text_decoder": "text_decoder", "language_model": "text_decoder", "vision_tower": "vision_tower",
           "vision_model": "vision_tower", "visual": "vision_tower", "multi_modal_projector": "multi_modal_projector",
           "audio_tower": "audio_tower"}
_PROJECTOR = re.compile(r"(?:^|\.)(multi_modal_projector|visual\.merger|visual\.deepstack_merger_list)\.")
_VISION = re.compile(r"(?:^|\.)(vision_tower|vision_model|visual)\.")
_TOWER_LAYER = re.compile(r"\.(layers|blocks)\.(\d+)\.")
_LANGUAGE = re.compile(r"^(model\.language_model\.|language_model\.model\.)")   # transformers' and checkpoints'


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


def module_of(name: str) -> str:
    """The module of a multimodal model a tensor belongs to (mergekit's name): 'multi_modal_projector',
    'vision_tower', 'audio_tower' or 'text_decoder' (every tensor of a text-only model)."""
    if _PROJECTOR.search(name):
        return "multi_modal_projector"
    if _VISION.search(name):
        return "vision_tower"
    return "audio_tower" if name.startswith(("audio_tower.", "model.audio_tower.")) else "text_decoder"


def module_layer(name: str) -> int | None:
    """The layer a tensor belongs to within its own module (a tower's `encoder.layers.N` or `blocks.N`, the
    text decoder's layers), or None (embeddings, head, norms, a projector's)."""
    module = module_of(name)
    if module == "text_decoder":
        return layer_of(name)
    m = _TOWER_LAYER.search(name) if module != "multi_modal_projector" else None
    return int(m.group(2)) if m else None


def text_name(name: str) -> str:
    """A language model's tensor as its text-only sibling names it (`model.language_model.layers.0.x` and
    `language_model.model.layers.0.x` -> `model.layers.0.x`, `language_model.lm_head.weight` -> `lm_head.weight`);
    other names unchanged."""
    if name.startswith("language_model.lm_head."):
        return name.removeprefix("language_model.")
    return _LANGUAGE.sub("model.", name)
