"""`mbmerge bench` and its synthetic fixtures (eval/synthetic.py): the named models have the published
parameter counts and transformers' own tensor names and shapes, a written family loads in transformers
with experts that really differ from the base, bench writes its JSON and PNG, and refuses in one line a
fixture the disk cannot hold."""
import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mbmerge.eval.synthetic import MODELS, model_config, model_shapes, n_params, write_family

# Published config.json numbers: hidden, intermediate, layers, heads, KV heads, head_dim, vocab, tied
# embeddings, norms per layer; and the model card's headline parameter count.
PUBLISHED = {
    "gemma-2-2b": ((2304, 9216, 26, 8, 4, 256, 256000, True, 4), 2.61e9),
    "gemma-2-9b": ((3584, 14336, 42, 16, 8, 256, 256000, True, 4), 9.24e9),
    "llama-3.2-3b": ((3072, 8192, 28, 24, 8, 128, 128256, True, 2), 3.21e9),
    "llama-3.1-8b": ((4096, 14336, 32, 32, 8, 128, 128256, False, 2), 8.03e9),
}


def published_count(H, I, L, heads, kv, hd, V, tied, norms):
    attn = 2 * H * heads * hd + 2 * H * kv * hd  # q, o; k, v
    return V * H * (1 if tied else 2) + L * (attn + 3 * H * I + norms * H) + H  # embeddings, layers, final norm


@pytest.mark.parametrize("model", list(PUBLISHED))
def test_named_models_have_the_published_parameter_counts(model):
    numbers, headline = PUBLISHED[model]
    assert set(MODELS) == set(PUBLISHED)
    assert n_params(model_config(model)) == published_count(*numbers)
    assert abs(published_count(*numbers) / headline - 1) < 0.005
    few = model_config(model, 2)
    assert few["num_hidden_layers"] == 2
    assert model_shapes(few)["model.layers.1.mlp.down_proj.weight"] == (numbers[0], numbers[1])


@pytest.mark.parametrize("model", [*PUBLISHED, "custom"])
def test_shapes_are_transformers_own(model):
    """Names and shapes of the parameters transformers builds from the config (meta device: no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = model_config(model, 2)
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    assert type(net).__name__ == cfg["architectures"][0]
    assert {n: tuple(p.shape) for n, p in net.named_parameters()} == model_shapes(cfg)  # tied lm_head: not listed


TINY_GEMMA2 = dict(model_config("gemma-2-2b", 1), hidden_size=64, intermediate_size=128, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=32, vocab_size=128)


def read(folder):
    return {n: t for f in sorted(folder.glob("*.safetensors")) for n, t in load_file(f).items()}


@pytest.mark.parametrize("cfg", [model_config("custom", 2, hidden=64, vocab=128), TINY_GEMMA2],
                         ids=["llama", "gemma2"])
def test_family_loads_in_transformers_and_experts_differ(cfg, tmp_path):
    from transformers import AutoModelForCausalLM
    write_family(tmp_path, cfg, ["math", "code"], shard_bytes=20_000)
    base, math, code = (read(tmp_path / m) for m in ["base", "math", "code"])
    assert len(list((tmp_path / "base").glob("*.safetensors"))) > 1
    net = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    assert type(net).__name__ == cfg["architectures"][0]
    for name, p in net.named_parameters():
        assert torch.equal(p.detach(), base[name]), name
    w = "model.layers.0.mlp.up_proj.weight"
    d = math[w].float() - base[w].float()                                          # [I, H]
    assert 0.015 < base[w].float().std() < 0.025 and 1e-4 < d.std() < 1e-3
    assert (d != 0).float().mean() > 0.5 and not torch.equal(math[w], code[w])
    assert torch.equal(base["model.norm.weight"], torch.ones(cfg["hidden_size"], dtype=torch.bfloat16))
    again = tmp_path / "again"
    write_family(again, cfg, ["math"], shard_bytes=20_000)
    assert all(torch.equal(t, read(again / "math")[n]) for n, t in math.items())  # deterministic


def spinning() -> list[str]:
    """Processes running bench's busy loop."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"while True: pass" in cmdline.read_bytes():
                found.append(cmdline.parent.name)
        except OSError:
            pass
    return found


def test_bench_writes_json_and_png(run_main, tmp_path):
    code, out, err = run_main("bench", "--hidden", "64", "--layers", "2", "--vocab", "128", "--methods", "ties",
                              "--cache", tmp_path, "--vs", "mergekit", "--mergekit", tmp_path / "no-mergekit",
                              "--busy", "1")
    assert code == 0, err
    assert "1 busy processes" in out and not spinning(), "the busy process outlived the bench"
    assert "NOT FOUND" in err and "NOT FOUND" in out
    report = json.loads((tmp_path / "custom-h64-l2-v128-e2.json").read_text())
    assert {"fixture", "model", "layers", "params", "experts", "device", "machine", "rows"} <= set(report)
    assert report["params"] == n_params(model_config("custom", 2, hidden=64, vocab=128))
    assert {"cpus", "gpu", "torch", "mergekit_version"} <= set(report["machine"])
    assert report["machine"]["busy_processes"] == 1
    (row,) = report["rows"]
    assert {"method", "input_GB", "mbmerge_s", "mbmerge_in_GBps", "mbmerge_rss_GB", "floor_s", "floor_in_GBps",
            "x_floor"} <= set(row) and "mergekit_s" not in row
    assert row["x_floor"] == pytest.approx(row["mbmerge_s"] / row["floor_s"])
    assert (tmp_path / "custom-h64-l2-v128-e2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| ties |" in out and "x I/O floor" in out


def test_bench_times_mergekits_other_tools(run_main, tmp_path):
    """moe and tokensurgeon cases: rows with the floor and mbmerge's figures; the transplant fixture's model is the
    base's tensors with a BPE tokenizer of its vocab_size, its donor's tokenizer another, longer one."""
    from transformers import AutoTokenizer
    code, out, err = run_main("bench", "--hidden", "64", "--layers", "2", "--vocab", "300", "--methods",
                              "moe_cheap_embed,tokensurgeon_mean", "--cache", tmp_path, "--vs", "none")
    assert code == 0, err
    rows = json.loads((tmp_path / "custom-h64-l2-v300-e2.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["moe_cheap_embed", "tokensurgeon_mean"]
    assert all(r["mbmerge_s"] > 0 and r["floor_s"] > 0 and "mergekit_s" not in r for r in rows)
    fx = tmp_path / "custom-h64-l2-v300-e2-transplant"
    model, donor = (AutoTokenizer.from_pretrained(fx / m) for m in ("model", "donor"))
    assert len(model) == 300 and len(donor) == 300 + 1002 and model.convert_ids_to_tokens(0) == "<|endoftext|>"
    assert (fx / "model" / "model-00001-of-00001.safetensors").stat().st_ino == \
        (tmp_path / "custom-h64-l2-v300-e2" / "base" / "model-00001-of-00001.safetensors").stat().st_ino     # hard-linked


def _resident_pages(path) -> int:
    """Pages of a file in the page cache: mincore(2) on a private mapping of it."""
    import ctypes
    import mmap
    size = path.stat().st_size
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    anchor = ctypes.c_char.from_buffer(m)
    vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    ok = ctypes.CDLL(None).mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) == 0
    del anchor
    m.close()
    assert ok
    return sum(v & 1 for v in vec)


def test_cold_bench_evicts_the_inputs_and_says_so(run_main, tmp_path):
    from mbmerge.bin.bench_timing import evict, warm
    f = tmp_path / "input.bin"
    f.write_bytes(os.urandom(1 << 20))
    warm([f])
    if _resident_pages(f) == 0:
        pytest.skip("this file system keeps no page cache to evict (tmpfs?)")
    evict([f])
    assert _resident_pages(f) == 0
    code, out, err = run_main("bench", "--hidden", "64", "--layers", "2", "--vocab", "128", "--methods", "linear",
                              "--cache", tmp_path, "--vs", "none", "--cold")
    assert code == 0, err
    report = json.loads((tmp_path / "custom-h64-l2-v128-e2.json").read_text())
    assert report["cold"] is True and report["rows"][0]["floor_s"] > 0 and "cold page cache" in out


def test_bench_refuses_a_fixture_the_disk_cannot_hold(run_main, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 20 * 10**9, 20 * 10**9))
    code, out, err = run_main("bench", "--model", "gemma-2-9b", "--cache", tmp_path)
    assert code != 0 and len(err.strip().splitlines()) == 1
    # per layer 198.2M params = 0.396 GB a model; 4 models (base, 2 experts, output) of embeddings 1.835 GB
    assert "pass --layers 7 or fewer" in err and "gemma-2-9b-l42" in err
    assert not list(tmp_path.iterdir())
    code, out, err = run_main("bench", "--model", "gemma-2-9b", "--layers", "7", "--hidden", "64",
                              "--cache", tmp_path)
    assert code != 0 and "--shape custom" in err


def test_device_flag_and_peak_gpu_from_the_card(tmp_path):
    import sys
    from mbmerge.bin.bench import mbmerge_cmd, table
    from mbmerge.bin.bench_timing import Timing, best_of
    recipe = tmp_path / "ties.yml"
    assert "--device" not in mbmerge_cmd("ties", tmp_path, ["math"], tmp_path / "o", recipe, "auto")
    assert mbmerge_cmd("ties", tmp_path, ["math"], tmp_path / "o", recipe, "cuda")[-2:] == ["--device", "cuda"]
    out = tmp_path / "out"
    make = (f"import json, os; os.makedirs({str(out)!r}); "
            f"json.dump({{'peak_gpu_bytes': 3e9}}, open({str(out / 'mbmerge.json')!r}, 'w'))")
    wall, rss, walls, card = best_of(Timing(), [sys.executable, "-c", make], [], out)
    assert card == {"peak_gpu_bytes": 3e9} and walls == [round(wall, 3)] and 0 < rss < 1 and not out.exists()
    row = {"method": "ties", "mbmerge_s": 2.0, "mbmerge_gpu_GB": 3.0, "floor_s": 0.5, "x_floor": 4.0}
    assert "| ties | — | 2.00 | — | 4.0x | — | 3.00 |" in table([row])


def test_added_tokens_family_and_the_bench_merging_its_union(run_main, tmp_path):
    """Each expert of the --added-tokens fixture has its 3 special tokens and 3 more embedding and head rows
    than the base, its other rows those of the plain fixture; the bench merges the union."""
    from transformers import AutoTokenizer
    code, out, err = run_main("bench", "--hidden", "64", "--layers", "2", "--vocab", "128", "--methods", "linear",
                              "--cache", tmp_path, "--vs", "none", "--added-tokens", "3")
    assert code == 0, err
    fx = tmp_path / "custom-h64-l2-v128-e2-tok3"
    base, math = read(fx / "base"), read(fx / "math")
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        assert math[n].shape == (131, 64) and base[n].shape == (128, 64)
        assert torch.equal(math[n][:128], read(tmp_path / "custom-h64-l2-v128-e2" / "math")[n])
    tok = AutoTokenizer.from_pretrained(fx / "math")
    assert len(tok) == 131 and tok.convert_tokens_to_ids("<|math_2|>") == 130
    assert json.loads((fx / "code" / "config.json").read_text())["vocab_size"] == 131
    assert "| linear |" in out


def test_bench_times_fp8_experts_beside_bf16(run_main, tmp_path):
    """--quantized fp8: a copy of the fixture with FP8 block-quantized experts (e4m3 + weight_scale_inv per 64x64
    block at this size), built once beside it; each method's row, then its row on the FP8 experts."""
    code, out, err = run_main("bench", "--hidden", "64", "--layers", "2", "--vocab", "300", "--methods", "ties",
                              "--quantized", "fp8", "--cache", tmp_path, "--vs", "none")
    assert code == 0, err
    rows = json.loads((tmp_path / "custom-h64-l2-v300-e2.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["ties", "ties[fp8 experts]"]
    assert rows[1]["mbmerge_s"] > 0 and rows[1]["input_GB"] < rows[0]["input_GB"]   # FP8 experts: fewer bytes
    math = read(tmp_path / "custom-h64-l2-v300-e2-fp8" / "math")
    plain = read(tmp_path / "custom-h64-l2-v300-e2" / "math")
    w = "model.layers.1.mlp.gate_proj.weight"                                        # [128, 64]: 2 x 1 blocks
    assert math[w].dtype == torch.float8_e4m3fn and math[w + "_scale_inv"].shape == (2, 1)
    back = math[w].float().view(2, 64, 64) * math[w + "_scale_inv"].view(2, 1, 1)
    assert torch.allclose(back.view(128, 64), plain[w].float(), rtol=0.07, atol=1e-6)    # e4m3: 3 mantissa bits
    assert torch.equal(math["model.norm.weight"], plain["model.norm.weight"])
    assert "| ties[fp8 experts] |" in out
