"""Synthetic Llama-shaped model folders for benchmarks (bin/bench.py): the config, tensor shapes
and side files of a Llama of any size, and the user cache folder. (The built-in default family is
the trained mini zoo, eval/zoo.py.)
"""
import json
import os
from pathlib import Path





def llama_config(H: int, L: int, V: int) -> dict:
    """A LlamaForCausalLM config: hidden H, L layers, vocabulary V, head size 64, 4 query heads per KV head."""
    I, heads = int(H * 8 / 3 // 64 * 64), max(1, H // 64)
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=H, intermediate_size=I,
                num_hidden_layers=L, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                vocab_size=V, max_position_embeddings=2048, rms_norm_eps=1e-5, torch_dtype="bfloat16",
                tie_word_embeddings=False, rope_theta=10000.0, hidden_act="silu", bos_token_id=1, eos_token_id=2)


def llama_shapes(cfg: dict) -> dict:
    """{tensor name: shape} of a Llama config, in file order."""
    H, I, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"] * 64
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (kv, H),
                       p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, H),
                       p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                       p + "mlp.down_proj.weight": (H, I), p + "input_layernorm.weight": (H,),
                       p + "post_attention_layernorm.weight": (H,)})
    return {**shapes, "model.norm.weight": (H,), "lm_head.weight": (cfg["vocab_size"], H)}


def write_side_files(folder: Path, cfg: dict, wmap: dict, total: int) -> None:
    """config, generation config, a character-level tokenizer and the shard index of a model folder."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    tok = {"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
           "pre_tokenizer": {"type": "Split", "pattern": {"String": ""}, "behavior": "Isolated", "invert": False},
           **dict.fromkeys(["truncation", "padding", "normalizer", "post_processor", "decoder"]), "added_tokens": []}
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
               "unk_token": "<unk>"}
    index = {"metadata": {"total_size": total}, "weight_map": wmap}
    generation = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
    for name, obj in [("config", cfg), ("tokenizer", tok), ("tokenizer_config", tok_cfg),
                      ("generation_config", generation), ("model.safetensors.index", index)]:
        (folder / f"{name}.json").write_text(json.dumps(obj, indent=2))


def cache_dir() -> Path:
    """MBMERGE_CACHE, else $XDG_CACHE_HOME/mbmerge, else ~/.cache/mbmerge."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mbmerge"
    return Path(os.environ.get("MBMERGE_CACHE", default))
