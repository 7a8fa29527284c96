"""Synthetic model folders for benchmarks (bin/bench.py): configs and tensor shapes of the MergeBench
bases (Gemma-2 2B/9B, Llama-3.2 3B, Llama-3.1 8B) or of a Llama of any size, a fast deterministic
writer of base + expert folders. A workload, like the zoo: the engine never imports it; it knows nothing
of merging or timing.
(The built-in default family is the trained mini zoo, eval/zoo.py.)

Values: base N(0, 0.02), norms 1; expert = base + N(0, 2e-4) + on 5% of entries N(0, 2e-3); bf16.
They are slices of two fixed random pools at offsets hashed from (tensor, chunk, model), so writing
costs a copy and one bf16 add per element and the disk, not the random generator, sets the pace.
"""
import functools
import hashlib
import json
import os
from contextlib import ExitStack
from math import prod
from pathlib import Path

import torch

from ..engine.inputs.header import encode_header

# Published config.json numbers (hub: google/gemma-2-2b, google/gemma-2-9b, meta-llama/Llama-3.2-3B,
# meta-llama/Llama-3.1-8B). Token ids are those of the character tokenizer written below.
GEMMA2 = dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", head_dim=256, tie_word_embeddings=True,
              hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
              rope_theta=10000.0, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
              query_pre_attn_scalar=256, sliding_window=4096, max_position_embeddings=8192)
LLAMA3 = dict(architectures=["LlamaForCausalLM"], model_type="llama", head_dim=128, hidden_act="silu",
              rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072, vocab_size=128256,
              attention_bias=False, mlp_bias=False)
LLAMA3_ROPE = dict(rope_type="llama3", high_freq_factor=4.0, low_freq_factor=1.0,
                   original_max_position_embeddings=8192)
MODELS = {
    "gemma-2-2b": dict(GEMMA2, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, vocab_size=256000),
    "gemma-2-9b": dict(GEMMA2, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                       num_attention_heads=16, num_key_value_heads=8, vocab_size=256000),
    "llama-3.2-3b": dict(LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True,
                         rope_scaling=dict(LLAMA3_ROPE, factor=32.0)),
    "llama-3.1-8b": dict(LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                         rope_scaling=dict(LLAMA3_ROPE, factor=8.0)),
}
COMMON = dict(torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
POOL = 1 << 24   # values in each random pool: 32 MB of bf16
CHUNK = 1 << 22  # elements written per step (8 MB a model)


def llama_config(H: int, L: int, V: int) -> dict:
    """A LlamaForCausalLM config: hidden H, L layers, vocabulary V, head size 64, 4 query heads per KV head."""
    I, heads = int(H * 8 / 3 // 64 * 64), max(1, H // 64)
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=H, intermediate_size=I,
                num_hidden_layers=L, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                head_dim=H // heads, vocab_size=V, max_position_embeddings=2048, rms_norm_eps=1e-5,
                tie_word_embeddings=False, rope_theta=10000.0, hidden_act="silu", **COMMON)


def model_config(model: str, layers: int | None = None, *, hidden: int = 1024, vocab: int = 32000) -> dict:
    """The config.json of a named MergeBench base (or 'custom': llama_config), with `layers` decoder layers.

    Args: model: a key of MODELS or 'custom'; layers: None keeps the real count (16 for custom);
    hidden, vocab: custom only. Example: model_config("gemma-2-9b", 2) has gemma-2-9b's tensor shapes.
    """
    if model == "custom":
        return llama_config(hidden, layers or 16, vocab)
    return {**MODELS[model], **COMMON, **({"num_hidden_layers": layers} if layers else {})}


def model_shapes(cfg: dict) -> dict:
    """{tensor name: shape} of a Llama or Gemma-2 config, in transformers' order (no lm_head when tied)."""
    H, I, hd, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    norms = ["input_layernorm", "post_attention_layernorm"]
    if cfg["model_type"] == "gemma2":
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    shapes = {"model.embed_tokens.weight": (V, H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
                       p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
                       p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                       p + "mlp.down_proj.weight": (H, I), **{p + n + ".weight": (H,) for n in norms}})
    shapes["model.norm.weight"] = (H,)
    return shapes if cfg["tie_word_embeddings"] else {**shapes, "lm_head.weight": (V, H)}


def n_params(cfg: dict) -> int:
    return sum(prod(s) for s in model_shapes(cfg).values())


def shard_names(shapes: dict, limit: int) -> list[list[str]]:
    """Names grouped into shards in order: a shard closes once it holds `limit` bytes (bf16)."""
    shards, size = [[]], 0
    for name, s in shapes.items():
        shards[-1].append(name)
        size += 2 * prod(s)
        if size >= limit:
            shards, size = shards + [[]], 0
    return [s for s in shards if s]


@functools.cache
def _pools() -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [POOL] base values N(0, 0.02) and expert deltas N(0, 2e-4) + 5% N(0, 2e-3)."""
    g = torch.Generator().manual_seed(0)
    b = torch.randn(POOL, generator=g).mul_(0.02)
    d = torch.randn(POOL, generator=g).mul_(2e-4)
    hit = torch.rand(POOL, generator=g) < 0.05
    d[hit] += torch.randn(int(hit.sum()), generator=g).mul_(2e-3)
    return b.bfloat16(), d.bfloat16()


def _slice(pool: torch.Tensor, n: int, *key) -> torch.Tensor:
    start = int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little")
    start %= POOL - n + 1
    return pool[start:start + n]


def family_chunks(name: str, shape: tuple, n_experts: int):
    """Yields bf16 flat chunks [base, expert_1, ...] of one tensor, in order; a pure function of its arguments."""
    pb, pd = _pools()
    numel = prod(shape)
    for j, start in enumerate(range(0, numel, CHUNK)):
        n = min(CHUNK, numel - start)
        b = torch.ones(n, dtype=torch.bfloat16) if len(shape) == 1 else _slice(pb, n, name, j)
        yield [b, *(b + _slice(pd, n, name, j, e) for e in range(n_experts))]


def write_family(folder: Path, cfg: dict, experts: list[str], shard_bytes: int, shapes: dict | None = None) -> None:
    """folder/base and folder/<expert> model folders, written tensor by tensor (bounded memory, any size);
    shapes: {tensor name: shape} (default: model_shapes(cfg), a Llama's or a Gemma-2's)."""
    shapes, models, wmap = shapes or model_shapes(cfg), ["base", *experts], {}
    shards = shard_names(shapes, shard_bytes)
    for m in models:
        (folder / m).mkdir(parents=True, exist_ok=True)
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        prefix, _ = encode_header([(n, "BF16", shapes[n]) for n in names], {"format": "pt"})
        with ExitStack() as stack:
            handles = [stack.enter_context(open(folder / m / file, "wb")) for m in models]
            for fh in handles:
                fh.write(prefix)
            for name in names:
                for parts in family_chunks(name, shapes[name], len(experts)):
                    for fh, t in zip(handles, parts):
                        fh.write(t.view(torch.uint8).numpy())
        wmap.update(dict.fromkeys(names, file))
    for m in models:
        write_side_files(folder / m, cfg, wmap, 2 * sum(prod(x) for x in shapes.values()))


def write_side_files(folder: Path, cfg: dict, wmap: dict, total: int, full_vocab: bool = False,
                     added: list[str] = ()) -> None:
    """config, generation config, a character-level tokenizer (with filler tokens up to the vocab_size if
    `full_vocab`, then `added` special tokens) and the shard index of a model folder."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    size = cfg["vocab_size"] - len(added)
    vocab.update({f"<filler_{i}>": i for i in range(len(vocab), size if full_vocab else 0)})
    tok = {"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
           "pre_tokenizer": {"type": "Split", "pattern": {"String": ""}, "behavior": "Isolated", "invert": False},
           **dict.fromkeys(["truncation", "padding", "normalizer", "post_processor", "decoder"]),
           "added_tokens": [{"id": size + k, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for k, t in enumerate(added)]}
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
               "unk_token": "<unk>"}
    index = {"metadata": {"total_size": total}, "weight_map": wmap}
    generation = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
    for name, obj in [("config", cfg), ("tokenizer", tok), ("tokenizer_config", tok_cfg),
                      ("generation_config", generation), ("model.safetensors.index", index)]:
        (folder / f"{name}.json").write_text(json.dumps(obj, indent=2))



def with_added_tokens(family: Path, out: Path, experts: list[str], n: int) -> None:
    """A copy of a family whose experts each add n special tokens of their own, as chat fine-tunes do:
    their embedding and head get n more rows (the mean row plus a small offset per token), their
    tokenizers the tokens; every tokenizer has the full vocabulary. Shards without a vocabulary tensor
    are hard links; the others are rewritten tensor by tensor."""
    cfg = json.loads((family / "base" / "config.json").read_text())
    index = json.loads((family / "base" / "model.safetensors.index.json").read_text())
    vocab_names = {"model.embed_tokens.weight", "lm_head.weight"}
    for m in ["base", *experts]:
        (out / m).mkdir(parents=True, exist_ok=True)
        added = [f"<|{m}_{k}|>" for k in range(n)] if m != "base" else []
        total = 0
        for file in sorted(set(index["weight_map"].values())):
            src, dst = family / m / file, out / m / file
            names = [k for k, f in index["weight_map"].items() if f == file]
            if not added or not vocab_names & set(names):
                os.link(src, dst)
            else:
                _rewrite_with_rows(src, dst, vocab_names, n)
            total += dst.stat().st_size
        write_side_files(out / m, {**cfg, "vocab_size": cfg["vocab_size"] + len(added)}, index["weight_map"], total,
                         full_vocab=True, added=added)


def _rewrite_with_rows(src: Path, dst: Path, names: set, n: int) -> None:
    """A shard copied with n rows appended to each of `names` (bounded memory: one tensor at a time)."""
    from safetensors import safe_open
    with safe_open(str(src), "pt") as f:
        shapes = {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
        out = [(k, dt, (s[0] + n, *s[1:]) if k in names else tuple(s)) for k, (s, dt) in shapes.items()]
        prefix, _ = encode_header(out, {"format": "pt"})
        with open(dst, "wb") as fh:
            fh.write(prefix)
            for k, _, _ in out:
                t = f.get_tensor(k)
                if k in names:
                    offsets = 0.001 * torch.arange(1, n + 1, dtype=torch.float32)[:, None]
                    t = torch.cat([t, (t.float().mean(0) + offsets).to(t.dtype)])
                fh.write(t.contiguous().view(torch.uint8).numpy())
