"""`mbmerge bench --shape`: the MergeBench bases of eval/synthetic.py and two more shapes from published configs,
Mistral-7B (a Llama's tensors) and Qwen3-30B-A3B (an MoE: per layer q/k norms, a router and 128 experts' MLPs),
with their tensor names and shapes as the checkpoints on the hub store them (what transformers' save_pretrained
writes and from_pretrained reads), and the writer of a fixture of any of them.
"""
from math import prod
from pathlib import Path

from ..eval.synthetic import COMMON, MODELS, model_config, model_shapes, write_family

# config.json of mistralai/Mistral-7B-v0.1 and Qwen/Qwen3-30B-A3B on the hub.
MORE = {
    "mistral-7b": dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, vocab_size=32000, tie_word_embeddings=False, hidden_act="silu",
                       rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, max_position_embeddings=32768),
    "qwen3-30b-a3b": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048,
                          intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                          mlp_only_layers=[], tie_word_embeddings=False, attention_bias=False, hidden_act="silu",
                          rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                          use_sliding_window=False, router_aux_loss_coef=0.001),
}
SHAPES = [*MODELS, *MORE]


def shape_config(shape: str, layers: int | None = None, *, hidden: int = 1024, vocab: int = 32000) -> dict:
    """config.json of a named shape (or 'custom': a Llama of hidden x vocab) with `layers` decoder layers
    (None: the real count)."""
    if shape not in MORE:
        return model_config(shape, layers, hidden=hidden, vocab=vocab)
    return {**MORE[shape], **COMMON, **({"num_hidden_layers": layers} if layers else {})}


def tensor_shapes(cfg: dict) -> dict:
    """{tensor name: shape} in the checkpoints' order: eval/synthetic.py's for dense models; for Qwen3-MoE each
    layer's attention with its per-head q/k norms, the router [E, H], E experts' gate/up [I, H] and down [H, I]."""
    if cfg["model_type"] != "qwen3_moe":
        return model_shapes(cfg)
    H, I, hd, V, E = (cfg[k] for k in ("hidden_size", "moe_intermediate_size", "head_dim", "vocab_size",
                                        "num_experts"))
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (V, H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
                       p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
                       p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                       p + "mlp.gate.weight": (E, H)})
        for e in range(E):
            x = f"{p}mlp.experts.{e}."
            shapes.update({x + "gate_proj.weight": (I, H), x + "up_proj.weight": (I, H),
                           x + "down_proj.weight": (H, I)})
        shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)})
    shapes["model.norm.weight"] = (H,)
    return shapes if cfg["tie_word_embeddings"] else {**shapes, "lm_head.weight": (V, H)}


def n_params(cfg: dict) -> int:
    return sum(prod(s) for s in tensor_shapes(cfg).values())


def write_fixture(folder: Path, cfg: dict, experts: list[str], shard_bytes: int) -> None:
    """folder/base and folder/<expert> of any shape (eval/synthetic.py's values, side files and writer)."""
    write_family(folder, cfg, experts, shard_bytes, shapes=tensor_shapes(cfg))
