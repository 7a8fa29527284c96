"""common/roles.py against the names transformers itself gives each model type people merge: models built
from transformers' own classes (on the meta device: names, no weights), their roles checked by hand."""
import re

import pytest
import torch
import transformers as T

from mbmerge.common import roles

TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=300, head_dim=8)
MODELS = {   # name: (class, config, its token embedding, its final norm, tied by its config)
    "llama": (T.LlamaForCausalLM, lambda: T.LlamaConfig(**TEXT, tie_word_embeddings=False),
              "model.embed_tokens.weight", "model.norm.weight", False),
    "qwen2-moe": (T.Qwen2MoeForCausalLM, lambda: T.Qwen2MoeConfig(
        **TEXT, moe_intermediate_size=8, shared_expert_intermediate_size=8, num_experts=4, num_experts_per_tok=2),
        "model.embed_tokens.weight", "model.norm.weight", False),
    "gpt2": (T.GPT2LMHeadModel, lambda: T.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=300, n_positions=32),
             "transformer.wte.weight", "transformer.ln_f.weight", True),
    "falcon": (T.FalconForCausalLM, lambda: T.FalconConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                          vocab_size=300),
               "transformer.word_embeddings.weight", "transformer.ln_f.weight", True),
    "gpt-neox": (T.GPTNeoXForCausalLM, lambda: T.GPTNeoXConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=300),
                 "gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm.weight", False),
    "opt": (T.OPTForCausalLM, lambda: T.OPTConfig(
        hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=300, word_embed_proj_dim=16),
            "model.decoder.embed_tokens.weight", "model.decoder.final_layer_norm.weight", True),
    "mamba": (T.MambaForCausalLM,
              lambda: T.MambaConfig(hidden_size=16, num_hidden_layers=2, vocab_size=300, state_size=4),
              "backbone.embeddings.weight", "backbone.norm_f.weight", True),
    "gemma3-vlm": (T.Gemma3ForConditionalGeneration, lambda: T.Gemma3Config(
        text_config=dict(TEXT, model_type="gemma3_text"), mm_tokens_per_image=4,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                           image_size=32, patch_size=8)),
        "model.language_model.embed_tokens.weight", "model.language_model.norm.weight", True),
    "qwen2.5-vl": (T.Qwen2_5_VLForConditionalGeneration, lambda: T.Qwen2_5_VLConfig(
        text_config=dict(TEXT, model_type="qwen2_5_vl_text",
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=3, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                           fullatt_block_indexes=[1])),
        "model.language_model.embed_tokens.weight", "model.language_model.norm.weight", False),
}


def tensor_names(cls, config) -> list[str]:
    with torch.device("meta"):
        return list(cls(config).state_dict())


@pytest.mark.parametrize("kind", MODELS)
def test_every_tensor_of_a_model_type_gets_its_role(kind):
    cls, config, embedding, norm, tied = MODELS[kind]
    cfg = config()
    names = tensor_names(cls, cfg)
    by_role = {}
    for n in names:
        by_role.setdefault(roles.role(n), []).append(n)
    assert by_role["embedding"] == [embedding]
    assert by_role["head"] == ["lm_head.weight"]
    assert norm in by_role["final_norm"]
    # the decoder's layers, by hand: the text model's `layers.N` / `h.N`, none of a vision tower's
    decoder = [n for n in names if re.search(r"\.(layers|h)\.\d+\.", n) and "vision" not in n and "visual" not in n]
    assert sorted(by_role["layer"]) == sorted(decoder) and decoder
    assert roles.layer_count(names) == 2
    assert {roles.layer_of(n) for n in decoder} == {0, 1}
    assert all(roles.layer_of(n) is None for n in names if "vision" in n or "visual" in n)
    assert roles.ties_head(cfg.to_dict()) is tied
    assert roles.before_layers(embedding)
    assert not roles.before_layers(norm) and not roles.before_layers("lm_head.weight")


def test_a_layer_pattern_and_a_renumbered_name_keep_the_model_types_naming():
    p = roles.layer_pattern(3)
    hits = {"model.layers.3.mlp.up_proj.weight": True, "model.layers.13.mlp.up_proj.weight": False,
            "transformer.h.3.attn.c_attn.weight": True, "model.language_model.layers.3.self_attn.q_proj.weight": True,
            "model.vision_tower.encoder.layers.3.mlp.fc1.weight": False, "backbone.layers.3.mixer.in_proj.weight": True,
            "model.visual.blocks.3.attn.qkv.weight": False}
    assert {n: bool(re.search(p, n)) for n in hits} == hits
    assert roles.renumbered("transformer.h.3.attn.c_attn.weight", 11) == "transformer.h.11.attn.c_attn.weight"
    assert roles.renumbered("model.layers.10.mlp.up_proj.weight", 2) == "model.layers.2.mlp.up_proj.weight"


def test_the_head_is_tied_as_the_config_says():
    assert roles.ties_head({}) is True                                      # transformers' default
    assert roles.ties_head({"tie_word_embeddings": False}) is False
    assert roles.ties_head({"text_config": {"tie_word_embeddings": False}}) is False
    assert roles.ties_head({"tie_word_embeddings": True, "text_config": {"tie_word_embeddings": False}}) is True
