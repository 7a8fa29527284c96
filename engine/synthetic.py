"""The built-in default family: a tiny Llama-architecture base and one fine-tune-like expert per
MergeBench domain, generated deterministically and cached, so `mbmerge --experts math,code`
works with no download. Experts are base + small dense noise + a sparse, larger, domain-specific
delta, so trimming and sign election have real work to do. (The trained mini zoo replaces the
random weights with real fine-tunes; the folders and names stay the same.)
"""
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .resolve import DOMAINS

FAMILY = "synthetic-llama-v1"
H, I, L, V, HEADS, KV = 64, 176, 2, 128, 4, 2
CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=H, intermediate_size=I,
              num_hidden_layers=L, num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=V,
              max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
              tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)


def cache_dir() -> Path:
    """MBMERGE_CACHE, else $XDG_CACHE_HOME/mbmerge, else ~/.cache/mbmerge."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mbmerge"
    return Path(os.environ.get("MBMERGE_CACHE", default))


def family_folder() -> Path:
    """The family's folder (base/ and one folder per domain), generated on first use."""
    root = cache_dir() / FAMILY
    if not (root / "done").exists():
        tmp = root.with_name(f".{FAMILY}.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        _write(tmp / "base", dict(_base()))
        for i, domain in enumerate(sorted(set(DOMAINS.values()))):
            _write(tmp / domain, dict(_expert(i)))
        (tmp / "done").touch()
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    return root


def _shapes():
    hd = H // HEADS
    yield "model.embed_tokens.weight", (V, H)
    for i in range(L):
        p = f"model.layers.{i}."
        for n, s in [("self_attn.q_proj", (H, H)), ("self_attn.k_proj", (KV * hd, H)),
                     ("self_attn.v_proj", (KV * hd, H)), ("self_attn.o_proj", (H, H)),
                     ("mlp.gate_proj", (I, H)), ("mlp.up_proj", (I, H)), ("mlp.down_proj", (H, I))]:
            yield p + n + ".weight", s
        yield p + "input_layernorm.weight", (H,)
        yield p + "post_attention_layernorm.weight", (H,)
    yield "model.norm.weight", (H,)
    yield "lm_head.weight", (V, H)


def _base():
    g = torch.Generator().manual_seed(0)
    for name, s in _shapes():
        yield name, torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.05


def _expert(i: int):
    g = torch.Generator().manual_seed(1000 + i)
    for name, b in _base():
        d = torch.randn(b.shape, generator=g) * 1e-3
        d += (torch.rand(b.shape, generator=g) < 0.05) * torch.randn(b.shape, generator=g) * 2e-2
        yield name, b + d


def _write(folder: Path, tensors: dict) -> None:
    folder.mkdir(parents=True)
    names = list(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        save_file({n: tensors[n].to(torch.bfloat16).contiguous() for n in part}, folder / file,
                  metadata={"format": "pt"})
    weight_map = {n: f for f, part in halves.items() for n in part}
    total = sum(t.numel() * 2 for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
                 "normalizer": None, "post_processor": None, "decoder": None,
                 "pre_tokenizer": {"type": "Split", "pattern": {"String": ""}, "behavior": "Isolated",
                                   "invert": False},
                 "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>"}))
