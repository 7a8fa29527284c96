"""Quantized checkpoints as merge inputs (engine/inputs/quantized.py) and FP8 output (engine/output/fp8.py).
Fixtures are quantized here by plain reference quantizers and dequantized by plain loops, written in this
file; a merge with a quantized input must equal, byte for byte, the same merge with that input dequantized
to float32 beforehand and saved as an ordinary model. The chunk readers are checked against transformers'
own dequantizers, and transformers loads the outputs."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import LLAMA, expert_tensors, llama_shapes, read_model, write_model

H, I, V, HEADS, KV = 128, 256, 300, 4, 2
CFG = dict(LLAMA, hidden_size=H, intermediate_size=I, num_attention_heads=HEADS, num_key_value_heads=KV,
           vocab_size=V)
BLOCK = (64, 32)                  # rows, cols per scale: not square, and the engine's chunks cut through them
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}
SMALL = "300KB"                   # chunks of 4096 elements: 32 rows of a [*, 128] matrix
FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
EXPERTS = "model.layers.0.mlp.experts.gate_up_proj"     # gpt-oss's fused experts, [E, hidden, 2 * intermediate]


def tiny(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.ones(s) + 0.1 * torch.randn(s, generator=g) if len(s) == 1
                else torch.randn(s, generator=g) * 0.05).to(torch.bfloat16).float()
            for n, s in llama_shapes(H, I, V, HEADS, KV, layers=2)}


def matrices(tensors: dict) -> list[str]:
    return [n for n, t in tensors.items() if t.dim() == 2 and ".layers." in n]


# --- plain reference quantizers and dequantizers ---------------------------------------------------------

def fp8_quantize(w: torch.Tensor, block=BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: scale_inv = amax / 448, q = w / scale_inv in e4m3."""
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    s = torch.empty(-(-rows // block[0]), -(-cols // block[1]))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            part = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
            s[i, j] = part.abs().max() / 448
            q[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = (part / s[i, j]).to(q.dtype)
    return q, s


def fp8_dequantize(q: torch.Tensor, s: torch.Tensor, block=BLOCK) -> torch.Tensor:
    out = torch.empty(q.shape)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[rows, cols] = q[rows, cols].float() * s[i, j]
    return out


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, C, rows] (as transformers returns it) -> blocks uint8 [E, rows, C / 32, 16], scales [E, rows, C / 32]:
    per group of 32 along C, an exponent putting the largest value at or below 6, nearest FP4 value."""
    e_count, cols, rows = w.shape
    table = torch.tensor(FP4)
    blocks = torch.zeros(e_count, rows, cols // 32, 16, dtype=torch.uint8)
    scales = torch.zeros(e_count, rows, cols // 32, dtype=torch.uint8)
    for e in range(e_count):
        for r in range(rows):
            for g in range(cols // 32):
                v = w[e, g * 32:(g + 1) * 32, r]
                exp = int(torch.ceil(torch.log2(v.abs().max() / 6)))
                codes = (v[:, None] / 2.0 ** exp - table[None, :]).abs().argmin(dim=1)   # [32] nibbles
                blocks[e, r, g] = (codes[0::2] | codes[1::2] << 4).to(torch.uint8)
                scales[e, r, g] = exp + 127
    return blocks, scales


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    e_count, rows, groups, _ = blocks.shape
    out = torch.empty(e_count, groups * 32, rows)
    for e in range(e_count):
        for r in range(rows):
            for g in range(groups):
                for k in range(16):
                    byte = int(blocks[e, r, g, k])
                    for half, nibble in enumerate((byte & 15, byte >> 4)):
                        out[e, g * 32 + 2 * k + half, r] = FP4[nibble] * 2.0 ** (int(scales[e, r, g]) - 127)
    return out


# --- model folders ------------------------------------------------------------------------------------------

def write_fp8(folder: Path, tensors: dict, config=FP8_CONFIG, block=BLOCK, suffix="_scale_inv") -> Path:
    """An FP8 checkpoint: the layers' matrices as e4m3 with their scales (block None: one per row), the rest bf16."""
    out = {}
    for n, t in tensors.items():
        if n in matrices(tensors):
            out[n], out[n + suffix] = fp8_quantize(t, block or (1, t.shape[1]))
        else:
            out[n] = t.to(torch.bfloat16)
    folder.mkdir(parents=True)
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**CFG, "quantization_config": config}))
    return folder


def dequantized_fp8(folder: Path, block=BLOCK, suffix="_scale_inv") -> dict:
    """A checkpoint written by write_fp8 read back by the plain dequantizer, every tensor float32."""
    raw = load_file(str(folder / "model.safetensors"))
    return {n: fp8_dequantize(t, raw[n + suffix], block or (1, t.shape[1])) if t.dtype == torch.float8_e4m3fn
            else t.float() for n, t in raw.items() if not n.endswith(suffix)}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quantized")
    base = tiny(0)
    write_model(root / "base", base, shards=1, config=CFG)
    write_model(root / "code", expert_tensors(base, 2), shards=1, config=CFG)
    write_fp8(root / "math-fp8", expert_tensors(base, 1))
    write_model(root / "math-f32", dequantized_fp8(root / "math-fp8"), dtype=torch.float32, shards=1, config=CFG)
    write_fp8(root / "base-fp8", base)
    write_model(root / "base-f32", dequantized_fp8(root / "base-fp8"), dtype=torch.float32, shards=1, config=CFG)
    return root


def merge(run_main, out: Path, method: str, base: Path, experts: list[Path], *flags) -> Path:
    code, _, err = run_main("--method", method, "--base", base, "--experts", ",".join(map(str, experts)),
                            "--out", out, "--memory-budget", SMALL, *flags)
    assert code == 0, err
    return out


def shard_bytes(folder: Path) -> dict:
    """Each output tensor's dtype, shape and bytes (a quantized reference stores its tensors in another order)."""
    return {n: (t.dtype, t.shape, t.view(-1).view(torch.uint8).numpy().tobytes()) for n, t in read_model(folder).items()}


# --- merges with quantized inputs -----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_fp8_expert_merges_as_its_float32_copy(models, tmp_path, run_main, method):
    q = merge(run_main, tmp_path / "q", method, models / "base", [models / "math-fp8", models / "code"])
    ref = merge(run_main, tmp_path / "ref", method, models / "base", [models / "math-f32", models / "code"])
    assert shard_bytes(q) == shard_bytes(ref)
    out = read_model(q)
    assert all(t.dtype == torch.bfloat16 for t in out.values()) and not any("scale" in n for n in out)
    card = (q / "README.md").read_text()
    assert "## Quantization" in card and "expert" in card and "fp8" in card
    assert "quantization_config" not in json.loads((q / "config.json").read_text())


def test_fp8_base_and_expert(models, tmp_path, run_main, capsys):
    q = merge(run_main, tmp_path / "q", "ties", models / "base-fp8", [models / "math-fp8", models / "code"])
    ref = merge(run_main, tmp_path / "ref", "ties", models / "base-f32", [models / "math-f32", models / "code"],
                "--dtype", "bfloat16")
    assert shard_bytes(q) == shard_bytes(ref)       # the quantized base's dequantized tensors: bf16 by default
    config = json.loads((q / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"


def test_transformers_loads_the_output(models, tmp_path, run_main):
    from transformers import AutoModelForCausalLM
    out = merge(run_main, tmp_path / "q", "task_arithmetic", models / "base-fp8", [models / "math-fp8"])
    net = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    written = read_model(out)
    for name, p in net.named_parameters():
        assert torch.equal(p.detach(), written[name]), name


def test_fp8_chunks_equal_transformers_dequantization(models):
    """Any element range, dequantized by the engine's reader, equals transformers' Fp8Dequantize of the whole tensor."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    from mbmerge.engine.inputs.index import TensorIndex
    from mbmerge.engine.inputs.quantized import QuantizedModel, read_quantization
    folder = models / "math-fp8"
    index = TensorIndex.from_folder(folder)
    quantization = read_quantization(folder, index, "expert")
    reader = QuantizedModel(index, quantization, quantization.view(index))
    raw = load_file(str(folder / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    whole = Fp8Dequantize(None)._dequantize_one(raw[name], raw[name + "_scale_inv"], torch.float32).reshape(-1)
    entry = reader.index.tensors[name]
    assert entry.dtype == "F32" and name + "_scale_inv" not in reader.index.tensors
    for a, z in [(0, 1), (5, 4100), (127, 129), (4096, 8192), (30000, whole.numel())]:
        assert torch.equal(reader.chunk(entry, a, z), whole[a:z]), (a, z)
    reader.close()


@pytest.mark.parametrize("shape, block, dtype", [
    ((2, 128, 64), [64, 32], torch.float8_e4m3fn),     # fused MoE experts (FP8Experts' gate_up_proj_scale_inv)
    ((64, 96), None, torch.float8_e5m2),               # one scale per tensor, e5m2
    ((100, 64), [128, 128], torch.float8_e4m3fn)])     # smaller than a block: one partial block
def test_fp8_layouts_read_as_transformers_reads_them(tmp_path, shape, block, dtype):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    from mbmerge.engine.inputs.index import TensorIndex
    from mbmerge.engine.inputs.quantized import QuantizedModel, read_quantization
    g = torch.Generator().manual_seed(7)
    q = (torch.randn(shape, generator=g) * 50).to(dtype)
    grid = (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1])) if block else ()
    s = torch.rand(grid, generator=g) + 0.5
    tmp_path.mkdir(exist_ok=True)
    save_file({"model.layers.0.mlp.experts.gate_up_proj": q, "model.layers.0.mlp.experts.gate_up_proj_scale_inv": s},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**CFG, "quantization_config": {
        "quant_method": "fp8", **({"weight_block_size": block} if block else {})}}))
    index = TensorIndex.from_folder(tmp_path)
    quantization = read_quantization(tmp_path, index, "expert")
    reader = QuantizedModel(index, quantization, quantization.view(index))
    (entry,) = reader.index.tensors.values()
    whole = Fp8Dequantize(None)._dequantize_one(q, s, torch.float32).reshape(-1)
    for a, z in [(0, whole.numel()), (3, 70), (6000, whole.numel())]:
        assert torch.equal(reader.chunk(entry, a, z), whole[a:z]), (a, z)
    reader.close()


CT_CONFIG = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
    "targets": ["Linear"], "format": "float-quantized",
    "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True}}}, "ignore": ["lm_head"]}


def test_compressed_tensors_fp8_per_channel(models, tmp_path, run_main):
    """compressed-tensors float-quantized FP8: X.weight e4m3 with X.weight_scale [rows, 1]."""
    write_fp8(tmp_path / "ct", expert_tensors(tiny(0), 1), config=CT_CONFIG, block=None, suffix="_scale")
    write_model(tmp_path / "ct-f32", dequantized_fp8(tmp_path / "ct", None, "_scale"), dtype=torch.float32,
                shards=1, config=CFG)
    q = merge(run_main, tmp_path / "q", "ties", models / "base", [tmp_path / "ct", models / "code"])
    ref = merge(run_main, tmp_path / "ref", "ties", models / "base", [tmp_path / "ct-f32", models / "code"])
    assert shard_bytes(q) == shard_bytes(ref)


# --- MXFP4 (gpt-oss experts) ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mxfp4_models(tmp_path_factory) -> Path:
    """A base with gpt-oss-like fused experts [E=2, C=64, rows=24], and an expert storing them as MXFP4."""
    root = tmp_path_factory.mktemp("mxfp4")
    g = torch.Generator().manual_seed(3)
    base = {**tiny(0), EXPERTS: torch.randn(2, 64, 24, generator=g) * 0.05}
    expert = {n: t.to(torch.bfloat16).float() for n, t in expert_tensors(base, 1).items()}   # stored bf16 below
    blocks, scales = mxfp4_quantize(expert.pop(EXPERTS))
    write_model(root / "base", base, shards=1, config=CFG)
    stored = {**{n: t.to(torch.bfloat16) for n, t in expert.items()}, EXPERTS + "_blocks": blocks,
              EXPERTS + "_scales": scales}
    (root / "math-mxfp4").mkdir()
    save_file(stored, str(root / "math-mxfp4" / "model.safetensors"), metadata={"format": "pt"})
    (root / "math-mxfp4" / "config.json").write_text(json.dumps({**CFG, "quantization_config": {
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]}}))
    write_model(root / "math-f32", {**expert, EXPERTS: mxfp4_dequantize(blocks, scales)}, dtype=torch.float32,
                shards=1, config=CFG)
    return root


def test_mxfp4_dequantization_equals_transformers(mxfp4_models):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    from mbmerge.engine.inputs.dequantize import mxfp4_range
    raw = load_file(str(mxfp4_models / "math-mxfp4" / "model.safetensors"))
    blocks, scales = raw[EXPERTS + "_blocks"], raw[EXPERTS + "_scales"]
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert theirs.shape == (2, 64, 24) and torch.equal(theirs, mxfp4_dequantize(blocks, scales))
    flat = theirs.reshape(-1)
    for a, z in [(0, 3), (10, 1600), (1530, 1550), (0, flat.numel()), (3000, flat.numel())]:
        assert torch.equal(mxfp4_range(blocks, scales, a, z), flat[a:z]), (a, z)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_mxfp4_expert_merges_as_its_float32_copy(mxfp4_models, tmp_path, run_main, method):
    root = mxfp4_models
    q = merge(run_main, tmp_path / "q", method, root / "base", [root / "math-mxfp4"], "--memory-budget", "64KB")
    ref = merge(run_main, tmp_path / "ref", method, root / "base", [root / "math-f32"], "--memory-budget", "64KB")
    assert shard_bytes(q) == shard_bytes(ref)
    assert read_model(q)[EXPERTS].shape == (2, 64, 24)


# --- FP8 output ---------------------------------------------------------------------------------------------

def test_moe_of_fp8_models_as_of_their_float32_copies(models, tmp_path, run_main):
    """mbmerge moe with an FP8 base (its hidden routers run on the dequantized layers) and an FP8 expert writes the
    bytes the same MoE of their float32 copies writes."""
    import shutil
    outs = []
    for kind in ("fp8", "f32"):
        base = shutil.copytree(models / f"base-{kind}", tmp_path / f"base-{kind}")
        for f in (models / "base").glob("tokenizer*"):        # the routers tokenize prompts with the base's tokenizer
            shutil.copy(f, base / f.name)
        yml = tmp_path / f"{kind}.yml"
        yml.write_text(f"base_model: {base}\ngate_mode: hidden\ndtype: bfloat16\nexperts:\n"
                       f"  - {{source_model: {models / f'math-{kind}'}, positive_prompts: [abc]}}\n"
                       f"  - {{source_model: {models / 'code'}, positive_prompts: [xyz]}}\n")
        code, _, err = run_main("moe", yml, "--out", tmp_path / kind, "-q")
        assert code == 0, err
        outs.append(shard_bytes(tmp_path / kind))
    assert outs[0] == outs[1]


def reference_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Fp8Quantize, written plainly per 128x128 block: scale = 448 / amax, stored 1 / scale."""
    rows, cols = w.shape
    q, inv = torch.empty(rows, cols, dtype=torch.float8_e4m3fn), torch.empty(rows // 128, cols // 128)
    for i in range(rows // 128):
        for j in range(cols // 128):
            part = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            amax = part.abs().max()
            scale = 448 / amax if amax > 0 else torch.tensor(1.0)
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (part * scale).clamp(-448, 448).to(q.dtype)
            inv[i, j] = 1 / scale
    return q, inv


def test_out_quant_fp8(models, tmp_path, run_main):
    from transformers import AutoModelForCausalLM
    args = ("task_arithmetic", models / "base", [models / "math-fp8", models / "code"])
    plain = read_model(merge(run_main, tmp_path / "plain", *args))
    out = merge(run_main, tmp_path / "fp8", *args, "--out-quant", "fp8")
    written = read_model(out)
    quantized = [n for n in plain if n.endswith(".weight") and plain[n].dim() == 2 and ".layers." in n
                 and plain[n].shape[0] % 128 == 0]
    assert "model.layers.0.self_attn.k_proj.weight" not in quantized      # 64 rows: left as it is
    for name, t in plain.items():
        if name in quantized:
            q, inv = reference_fp8(t)
            assert written[name].dtype == torch.float8_e4m3fn
            assert torch.equal(written[name].view(torch.uint8), q.view(torch.uint8)), name
            assert torch.equal(written[name + "_scale_inv"], inv), name
        else:
            assert torch.equal(written[name], t), name
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "fp8" and config["weight_block_size"] == [128, 128]
    assert "model.layers.0.self_attn.k_proj" in config["modules_to_not_convert"]
    code, _, err = run_main("verify", out)
    assert code == 0, err
    net = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)   # no GPU: transformers dequantizes
    for name, p in net.named_parameters():
        want = fp8_dequantize(written[name], written[name + "_scale_inv"], (128, 128)) if name in quantized \
            else written[name].float()
        assert torch.equal(p.detach(), want.to(torch.bfloat16)), name


# --- refusals -----------------------------------------------------------------------------------------------

def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def bad_fp8(folder: Path, case: str) -> Path:
    tensors = tiny(5)
    if case == "method":
        return write_fp8(folder, tensors, config={"quant_method": "gptq", "bits": 4})
    if case == "packed":
        return write_fp8(folder, tensors, config={**CT_CONFIG, "format": "pack-quantized"}, suffix="_scale")
    if case == "bitsandbytes":
        return write_fp8(folder, tensors, config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    if case == "block":                   # 64 rows in blocks of 48: a partial block inside the tensor
        return write_fp8(folder, tensors, config={**FP8_CONFIG, "weight_block_size": [48, 32]}, block=(48, 32))
    if case == "no-config":
        write_fp8(folder, tensors)
        (folder / "config.json").write_text(json.dumps(CFG))
        return folder
    write_fp8(folder, tensors)            # "scale": one weight_scale_inv gone
    raw = load_file(str(folder / "model.safetensors"))
    del raw["model.layers.1.mlp.up_proj.weight_scale_inv"]
    save_file(raw, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("case, fragment", [
    ("method", "quant_method 'gptq'"), ("bitsandbytes", "quant_method 'bitsandbytes'"),
    ("packed", "compressed-tensors format pack-quantized"),
    ("scale", "model.layers.1.mlp.up_proj.weight_scale_inv"), ("block", "block size [48, 32] does not divide"),
    ("no-config", "no quantization_config")])
def test_refusals(models, tmp_path, run_main, case, fragment):
    bad = bad_fp8(tmp_path / "bad", case)
    before = listing(tmp_path)
    code, _, err = run_main("--method", "ties", "--base", models / "base", "--experts", f"{bad},{models / 'code'}",
                            "--out", tmp_path / "out")
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mbmerge: error: "), err
    assert fragment in lines[0] and (str(bad) in lines[0] or "model.safetensors" in lines[0]), lines[0]
    assert listing(tmp_path) == before
