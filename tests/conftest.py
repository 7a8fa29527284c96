"""Tiny models on disk, written with the safetensors library (not mbmerge's writer), so every
test checks mbmerge against an independent path. Nothing is downloaded."""
import json
import os
from pathlib import Path

# Triton kernels decorated from here on run in Triton's CPU interpreter (the dispatch still picks
# the torch reference unless a test asks for MBMERGE_KERNELS=triton).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from safetensors.torch import save_file

H, I, L, V, HEADS, KV = 32, 64, 2, 64, 4, 2
LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=H, intermediate_size=I,
             num_hidden_layers=L, num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=V,
             max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
             tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MBMERGE_CACHE", str(tmp_path / "mbmerge-cache"))
    monkeypatch.setenv("MBMERGE_ZOO_SIZE", "micro")      # the built-in default family: the micro zoo
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


@pytest.fixture(params=["torch", "triton"])
def both_impls(request):
    """Runs a test once with the torch references and once with the Triton kernels (interpreted)."""
    import mbmerge.kernels as kernels
    if request.param == "triton" and not kernels.has_triton():
        pytest.skip("triton is not installed")
    with kernels.using(request.param):
        yield request.param


def llama_shapes(h=H, i=I, v=V, heads=HEADS, kv=KV, layers=L):
    """(name, shape) of every tensor of a Llama of these sizes (the fixtures' by default)."""
    hd = h // heads
    yield "model.embed_tokens.weight", (v, h)
    for k in range(layers):
        p = f"model.layers.{k}."
        for n, s in [("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv * hd, h)),
                     ("self_attn.v_proj", (kv * hd, h)), ("self_attn.o_proj", (h, h)),
                     ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)), ("mlp.down_proj", (h, i))]:
            yield p + n + ".weight", s
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def base_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.ones(s) + 0.1 * torch.randn(s, generator=g) if len(s) == 1
            else torch.randn(s, generator=g) * 0.05 for n, s in llama_shapes()}


def expert_tensors(base: dict, seed: int) -> dict[str, torch.Tensor]:
    """base + dense noise + sparse larger deltas: trimming and sign election have work to do."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, b in base.items():
        d = torch.randn(b.shape, generator=g) * 1e-3
        d += (torch.rand(b.shape, generator=g) < 0.1) * torch.randn(b.shape, generator=g) * 2e-2
        out[n] = b + d
    return out


def write_model(folder: Path, tensors: dict, *, dtype=torch.bfloat16, shards: int = 2, config=None) -> Path:
    """An HF model folder: sharded safetensors (+ index when shards > 1), config, tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    parts = [names[i::shards] for i in range(shards)] if shards > 1 else [names]
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)] if shards > 1 \
        else ["model.safetensors"]
    for file, part in zip(files, parts):
        save_file({n: tensors[n].to(dtype).contiguous() for n in part}, str(folder / file),
                  metadata={"format": "pt"})
    if shards > 1:
        weight_map = {n: f for f, part in zip(files, parts) for n in part}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = dict(config or LLAMA)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): c - 94 for c in range(97, 123)}}
    (folder / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"String": ""}, "behavior": "Isolated", "invert": False},
        "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return folder


def read_model(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, loaded with the safetensors library."""
    from safetensors.torch import load_file
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """A tiny Llama family on disk: base + experts math, code, ifeval (bf16, 2 shards).

    Returns a dict: folder paths under 'paths', the bf16-rounded float32 tensors under 'tensors', and
    synthetic data statistics under 'stats' ({kind: {expert: (folder, tensors)}}).
    """
    root = tmp_path_factory.mktemp("family")
    base = base_tensors()
    models = {"base": base, **{name: expert_tensors(base, seed)
                               for name, seed in [("math", 1), ("code", 2), ("ifeval", 3)]}}
    paths = {name: write_model(root / name, t) for name, t in models.items()}
    rounded = {name: {n: v.to(torch.bfloat16).float() for n, v in t.items()} for name, t in models.items()}
    return {"paths": paths, "tensors": rounded, "root": root, "stats": _stats_of(root, models)}


def synthetic_stats(kind: str, tensors: dict, seed: int) -> dict[str, torch.Tensor]:
    """Statistics of the right shapes for a data-aware method, made up (the maths is tested on them,
    not their origin): Fisher diagonals >= 0 with some zeros (the 1e-10 floor), Grams X^T X / n of
    random X for every 2-D tensor (none for the others, as for norms), random 0/1 masks."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, t in tensors.items():
        if kind == "fisher":
            out[n] = torch.randn(t.shape, generator=g).square() * (torch.rand(t.shape, generator=g) > 0.1)
        elif kind == "mask":
            out[n] = (torch.rand(t.shape, generator=g) < 0.3).to(torch.uint8)
        elif t.dim() == 2:
            x = torch.randn(3 * t.shape[1], t.shape[1], generator=g) * torch.rand(t.shape[1], generator=g)
            out[n] = x.T @ x / x.shape[0]
    return out


def write_stats(folder: Path, kind: str, stats: dict) -> Path:
    """A statistics folder as `mbmerge stats` writes one (safetensors and card), by the safetensors library."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: v.contiguous() for n, v in stats.items()}, str(folder / "model.safetensors"))
    (folder / "mbmerge-stats.json").write_text(json.dumps({"kind": kind}))
    return folder


def _stats_of(root: Path, models: dict) -> dict:
    """{kind: {expert: (folder, tensors)}} for every kind and every expert of a fixture family."""
    out = {}
    for kind in ("fisher", "gram", "gram_plusplus", "mask"):
        out[kind] = {}
        for i, (name, t) in enumerate((k, v) for k, v in models.items() if k != "base"):
            stats = synthetic_stats(kind, t, 100 + i)
            out[kind][name] = (write_stats(root / "stats" / kind / name, kind, stats), stats)
    return out


@pytest.fixture(scope="session")
def wide_family(tmp_path_factory):
    """Tensors larger than one 4096-element chunk, for chunk invariance (every `family` tensor fits
    in one): [96, 200] (row-span chunks of 20 rows), 1-D [5000] (one row), [3, 5, 700], [7, 700]
    (5 rows a chunk) and a small [40, 33]. Base + experts e0, e1, e2 (bf16, 2 shards), each expert
    with a shared direction (so model_stock's cosines are not ~0) and sparse larger deltas.
    Returns {'paths', 'tensors', 'stats'}, like `family`."""
    root = tmp_path_factory.mktemp("wide")
    g = torch.Generator().manual_seed(11)
    base = {"a.weight": torch.randn(96, 200, generator=g) * 0.05, "b.weight": 1 + 0.1 * torch.randn(5000, generator=g),
            "c.weight": torch.randn(3, 5, 700, generator=g) * 0.05, "u.weight": torch.randn(7, 700, generator=g) * 0.05,
            "d.weight": torch.randn(40, 33, generator=g)}
    models = {"base": base}
    for i in range(3):
        common = 0.02 * torch.randn(1, generator=g)
        models[f"e{i}"] = {n: v + common * base[n] for n, v in expert_tensors(base, 20 + i).items()}
    paths = {name: write_model(root / name, t) for name, t in models.items()}
    return {"paths": paths, "tensors": {k: {n: v.bfloat16().float() for n, v in t.items()} for k, t in models.items()},
            "stats": _stats_of(root, models)}


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory):
    """The micro mini zoo (Llama), built once per session: base/, one folder per domain, multitask/."""
    from mbmerge.eval.zoo import build_zoo
    return build_zoo("llama", "micro", cache=tmp_path_factory.mktemp("zoo-a"), progress=False)


@pytest.fixture
def run_main(monkeypatch, capsys):
    """Run `mbmerge ARGS...` in-process through main() (its error handling is under test too);
    returns (exit code, stdout, stderr)."""
    return lambda *args: run_cli(monkeypatch, capsys, *args)


def run_cli(monkeypatch, capture, *args):
    """`mbmerge ARGS...` through main(), output read from a capture fixture (capsys, or capfd for
    subprocesses' output too): (exit code, stdout, stderr)."""
    import sys
    from mbmerge.bin.cli import main
    monkeypatch.setattr(sys, "argv", ["mbmerge", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capture.readouterr()
    return code, captured.out, captured.err


# --- independent references for exact magnitude ranks ------------------------------------------

def top_mask(a: torch.Tensor, k: int, skip: int = 0) -> torch.Tensor:
    """The entries ranked skip+1 .. skip+k of a flat |d| by a stable sort on (-|d|, index): bool, a's shape."""
    keep = torch.zeros(a.numel(), dtype=torch.bool)
    keep[torch.sort(-a.flatten(), stable=True).indices[skip:skip + k]] = True
    return keep.view(a.shape)


def visit_order(folder: Path) -> list[str]:
    """Tensor names as the engine visits a model folder: shard files in name order, then by data
    offset; read from the raw safetensors headers (8-byte length, JSON), not with mbmerge."""
    names = []
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        header.pop("__metadata__", None)
        names += sorted(header, key=lambda n: header[n]["data_offsets"][0])
    return names
