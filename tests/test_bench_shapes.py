"""`mbmerge bench --shape`: the shapes beyond the MergeBench bases (bin/bench_shapes.py) have the published
parameter counts and the tensors transformers builds and loads, an MoE fixture merges tensor by tensor as a dense
one does, a fixture the disk cannot hold is refused in one line with nothing written, and the bench says (and
records) how many threads the tools ran on."""
import json
import os
import shutil
from collections import namedtuple

import pytest
import torch
from safetensors.torch import load_file

from mbmerge.bin.bench_shapes import MORE, n_params, shape_config, tensor_shapes, write_fixture

# Published config.json numbers (hidden, intermediate, layers, heads, KV heads, head_dim, vocab, experts) and
# the model card's headline parameter count; both untied.
PUBLISHED = {"mistral-7b": ((4096, 14336, 32, 32, 8, 128, 32000, 0), 7.24e9),
             "qwen3-30b-a3b": ((2048, 768, 48, 32, 4, 128, 151936, 128), 30.5e9)}


def published_count(H, I, L, heads, kv, hd, V, E):
    attn = 2 * H * heads * hd + 2 * H * kv * hd                  # q, o; k, v
    mlp = E * (3 * H * I) + E * H + 2 * hd if E else 3 * H * I    # MoE: experts, router, q/k norms
    return 2 * V * H + L * (attn + mlp + 2 * H) + H              # embeddings and head, layers, final norm


@pytest.mark.parametrize("shape", list(PUBLISHED))
def test_shapes_have_the_published_parameter_counts(shape):
    numbers, headline = PUBLISHED[shape]
    assert set(MORE) == set(PUBLISHED)
    assert n_params(shape_config(shape)) == published_count(*numbers)
    assert abs(published_count(*numbers) / headline - 1) < 0.005
    assert shape_config(shape, 2)["num_hidden_layers"] == 2


def hf_config(cfg):
    from transformers import AutoConfig
    return AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})


@pytest.mark.parametrize("shape", list(PUBLISHED))
def test_real_shapes_are_transformers_own(shape):
    """transformers' parameters built from the config at the real sizes (meta device: no memory); it holds an
    MoE layer's experts fused (gate_up_proj [E, 2I, H], down_proj [E, H, I]) where checkpoints store each one."""
    from transformers import AutoModelForCausalLM
    cfg = shape_config(shape, 1)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(hf_config(cfg))
    assert type(net).__name__ == cfg["architectures"][0]
    ours, E = tensor_shapes(cfg), cfg.get("num_experts", 0)
    fused = {}
    for n, s in ours.items():
        if ".experts." in n:                                     # model.layers.0.mlp.experts.{e}.{proj}.weight
            head, e, proj, _ = n.rsplit(".", 3)
            key = f"{head}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
            rows = s[0] * (1 if proj == "down_proj" else 2)
            fused[key] = (E, rows, s[1])
            assert int(e) < E
        else:
            fused[n] = s
    assert {n: tuple(p.shape) for n, p in net.named_parameters()} == fused


TINY = {"mistral-7b": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, vocab_size=128),
        "qwen3-30b-a3b": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, vocab_size=128, num_experts=4,
                              num_experts_per_tok=2)}


def tiny(shape, layers=2):
    return {**shape_config(shape, layers), **TINY[shape]}


def read(folder):
    return {n: t for f in sorted(folder.glob("*.safetensors")) for n, t in load_file(f).items()}


@pytest.mark.parametrize("shape", list(PUBLISHED))
def test_written_fixture_is_what_transformers_saves_and_loads(shape, tmp_path):
    """The fixture's files hold the names and shapes transformers' save_pretrained writes for the same config,
    and from_pretrained loads them with nothing missing or left over, every value in place."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    cfg = tiny(shape)
    AutoModelForCausalLM.from_config(hf_config(cfg)).save_pretrained(tmp_path / "hf")
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert saved == tensor_shapes(cfg)
    write_fixture(tmp_path / "fx", cfg, ["math"], shard_bytes=20_000)
    net, info = AutoModelForCausalLM.from_pretrained(tmp_path / "fx" / "base", dtype=torch.bfloat16,
                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    base = read(tmp_path / "fx" / "base")
    assert set(base) == set(saved) and len(list((tmp_path / "fx" / "base").glob("*.safetensors"))) > 1
    state = net.state_dict()
    for n, t in base.items():
        if ".experts." not in n:
            assert torch.equal(state[n], t), n
    if shape == "qwen3-30b-a3b":                                 # transformers fuses [gate; up] per expert
        p = "model.layers.1.mlp.experts."
        gate_up = torch.stack([torch.cat([base[f"{p}{e}.gate_proj.weight"], base[f"{p}{e}.up_proj.weight"]])
                               for e in range(4)])
        assert torch.equal(state[p + "gate_up_proj"], gate_up)
        assert torch.equal(state[p + "down_proj"], torch.stack([base[f"{p}{e}.down_proj.weight"] for e in range(4)]))


def test_moe_fixture_merges_tensor_by_tensor(run_main, tmp_path):
    """Task arithmetic over the MoE fixture: router and every expert's projections are ordinary tensors,
    each the base plus the scaled sum of the experts' deltas (float reference, one bf16 rounding)."""
    cfg = tiny("qwen3-30b-a3b")
    write_fixture(tmp_path, cfg, ["math", "code"], shard_bytes=20_000)
    code, out, err = run_main("--base", tmp_path / "base", "--experts", f"{tmp_path / 'math'},{tmp_path / 'code'}",
                              "--method", "task_arithmetic", "--scale", "0.5", "--out", tmp_path / "out", "-q")
    assert code == 0, err
    b, x1, x2, merged = (read(tmp_path / m) for m in ["base", "math", "code", "out"])
    assert set(merged) == set(tensor_shapes(cfg))
    for n, t in merged.items():
        want = b[n].float() + 0.5 * ((x1[n].float() - b[n].float()) + (x2[n].float() - b[n].float()))
        assert t.dtype == torch.bfloat16 and torch.equal(t, want.bfloat16()), n
    w = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert not torch.equal(merged[w], b[w]) and not torch.equal(merged["model.layers.0.mlp.gate.weight"],
                                                                b["model.layers.0.mlp.gate.weight"])


def test_bench_refuses_a_shape_the_disk_cannot_hold_and_writes_nothing(run_main, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 20 * 10**9, 20 * 10**9))
    cache = tmp_path / "cache"
    code, out, err = run_main("bench", "--shape", "qwen3-30b-a3b", "--cache", cache)
    assert code != 0 and len(err.strip().splitlines()) == 1
    need = 4 * 2 * published_count(*PUBLISHED["qwen3-30b-a3b"][0]) * 1.05   # base, 2 experts, output; 5% margin
    assert "qwen3-30b-a3b-l48" in err and f"needs {need / 1e9:.3g} GB" in err and "has 20 GB free" in err
    # 0.622B embedding and head + 0.623B a layer, 8.4 bytes each: 2 layers fit in 20 GB, 3 do not
    assert "pass --layers 2 or fewer" in err
    assert not cache.exists() and list(tmp_path.iterdir()) == []


def test_bench_runs_on_the_threads_it_says(run_main, tmp_path):
    code, out, err = run_main("bench", "--hidden", "64", "--layers", "2", "--vocab", "128", "--methods", "linear",
                              "--cache", tmp_path, "--vs", "none", "--threads", "1")
    assert code == 0, err
    report = json.loads((tmp_path / "custom-h64-l2-v128-e2.json").read_text())
    (row,) = report["rows"]
    assert "1 thread," in out and report["machine"]["threads"] == row["threads"] == 1
    assert row["mbmerge_threads"] == 1                           # what mbmerge's card says it merged on
    code, out, err = run_main("bench", "--hidden", "64", "--layers", "2", "--vocab", "128", "--methods", "linear",
                              "--cache", tmp_path, "--vs", "none")
    n = len(os.sched_getaffinity(0))
    (row,) = json.loads((tmp_path / "custom-h64-l2-v128-e2.json").read_text())["rows"]
    assert code == 0 and f"{n} thread" in out and row["threads"] == row["mbmerge_threads"] == n


def test_tools_are_held_to_the_first_threads_cores(tmp_path):
    """A tool's process (mergekit has no thread option) runs on the first N cores the bench may use."""
    import sys
    from mbmerge.bin.bench import mbmerge_cmd
    from mbmerge.bin.bench_timing import Timing, best_of
    assert mbmerge_cmd("ties", tmp_path, ["math"], tmp_path / "o", tmp_path / "r.yml", "auto", threads=3)[-2:] == \
        ["--threads", "3"]
    out = tmp_path / "out"
    tell = (f"import json, os; os.makedirs({str(out)!r}); "
            f"json.dump({{'cores': sorted(os.sched_getaffinity(0))}}, open({str(out / 'mbmerge.json')!r}, 'w'))")
    _, _, _, card = best_of(Timing(threads=1), [sys.executable, "-c", tell], [], out)
    assert card == {"cores": sorted(os.sched_getaffinity(0))[:1]}
    _, _, _, card = best_of(Timing(), [sys.executable, "-c", tell], [], out)
    assert card == {"cores": sorted(os.sched_getaffinity(0))}


@pytest.mark.parametrize("cold", [False, True])
def test_floor_waits_for_its_writeback_before_deleting(tmp_path, monkeypatch, cold):
    """The floor's output is fsync'd (outside the timed part when warm) while it still exists, then deleted."""
    from mbmerge.bin import bench_timing
    f = tmp_path / "input.bin"
    f.write_bytes(os.urandom(1 << 20))
    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append((os.fstat(fd).st_size, os.fstat(fd).st_nlink)),
                                                 fsync(fd)))
    assert bench_timing.io_floor([f], 3 << 20, tmp_path, cold) > 0
    assert synced == [(3 << 20, 1)] * (1 + cold) and list(tmp_path.iterdir()) == [f]       # then deleted
