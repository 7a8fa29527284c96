"""`mbmerge bench`: end-to-end merges timed against mergekit (when installed) and against the I/O floor.

The fixture is a synthetic Llama-shaped family with tools/make_models.py's shapes and delta statistics
(base N(0, 0.02), norms 1; expert = base + N(0, 2e-4) + 5% sparse N(0, 2e-3); bf16; ~200 MB shards),
built once and cached. Each tool runs as its own process from a warm page cache; wall time and that
process's peak RSS (wait4 ru_maxrss) are measured. The I/O floor is reading every input once from the
page cache plus writing one output-sized file: no merge can be faster on this machine.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch
from safetensors.torch import save_file

from ..engine.synthetic import cache_dir

EXPERTS = ["math", "code", "ifeval", "multilingual", "safety"]
DENSITY = 0.2
# mbmerge flags with mergekit 0.1.5's semantics for each method at weight 1.0:
# ties normalize=true is aggregate=mean; dare_ties is normalize=false with L1 rescale.
MBMERGE_FLAGS = {"linear": [], "task_arithmetic": [],
                 "ties": ["--density", str(DENSITY), "--aggregate", "mean"],
                 "dare_ties": ["--density", str(DENSITY), "--rescale", "l1", "--aggregate", "sum"]}
BLOCK = 64 << 20


def llama_config(H, L, V):
    I, heads = int(H * 8 / 3 // 64 * 64), max(1, H // 64)
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=H, intermediate_size=I,
                num_hidden_layers=L, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                vocab_size=V, max_position_embeddings=2048, rms_norm_eps=1e-5, torch_dtype="bfloat16",
                tie_word_embeddings=False, rope_theta=10000.0, hidden_act="silu", bos_token_id=1, eos_token_id=2)


def llama_shapes(cfg):
    H, I, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"] * 64
    yield "model.embed_tokens.weight", (cfg["vocab_size"], H)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for n, s in [("self_attn.q_proj", (H, H)), ("self_attn.k_proj", (kv, H)), ("self_attn.v_proj", (kv, H)),
                     ("self_attn.o_proj", (H, H)), ("mlp.gate_proj", (I, H)), ("mlp.up_proj", (I, H)),
                     ("mlp.down_proj", (H, I))]:
            yield p + n + ".weight", s
        yield p + "input_layernorm.weight", (H,)
        yield p + "post_attention_layernorm.weight", (H,)
    yield "model.norm.weight", (H,)
    yield "lm_head.weight", (cfg["vocab_size"], H)


def shard_names(shapes, limit):
    """Names grouped into shards as make_models.py does: a shard closes once it reaches `limit` bytes."""
    shards, cur, size = [], [], 0
    for name, s in shapes:
        cur.append(name)
        size += 2 * torch.Size(s).numel()
        if size >= limit:
            shards, cur, size = shards + [cur], [], 0
    return shards + [cur] if cur else shards


def family_tensors(name, shape, n_experts):
    """bf16 [base, expert_1, ...] for one tensor, seeded by its name (shard order does not matter)."""
    g = torch.Generator().manual_seed(int(hashlib.sha1(name.encode()).hexdigest()[:12], 16))
    b = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g).mul_(0.02)
    out = [b.to(torch.bfloat16)]
    for _ in range(n_experts):
        d = torch.randn(shape, generator=g).mul_(2e-4).view(-1)                       # [numel]
        hit = (torch.rand(d.shape, generator=g) < 0.05).nonzero().squeeze(1)          # 5% of entries
        d[hit] += torch.randn(hit.shape, generator=g).mul_(2e-3)
        out.append((b + d.view(shape)).to(torch.bfloat16))
    return out


def write_side_files(folder, cfg):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": {"type": "Split", "pattern": {"String": ""}, "behavior": "Isolated", "invert": False},
           "post_processor": None, "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


def build_fixture(root: Path, H, L, V, n_experts, shard_mb=200) -> Path:
    """root/<shape>/{base, math, code, ...}: built once (tmp folder renamed when complete)."""
    fx = root / f"llama-h{H}-l{L}-v{V}-e{n_experts}"
    if (fx / "done").exists():
        return fx
    cfg, tmp = llama_config(H, L, V), root / f".build-{os.getpid()}"
    models = ["base", *EXPERTS[:n_experts]]
    shapes = dict(llama_shapes(cfg))
    shards = shard_names(shapes.items(), shard_mb * 2**20)
    wmaps = {m: {} for m in models}
    click.echo(f"building fixture {fx} ...", err=True)
    for k, names in enumerate(shards):
        parts = {m: {} for m in models}
        for name in names:
            for m, t in zip(models, family_tensors(name, shapes[name], n_experts)):
                parts[m][name] = t
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        for m in models:
            (tmp / m).mkdir(parents=True, exist_ok=True)
            save_file(parts[m], str(tmp / m / file), metadata={"format": "pt"})
            wmaps[m].update(dict.fromkeys(names, file))
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    for m in models:
        index = {"metadata": {"total_size": total}, "weight_map": wmaps[m]}
        (tmp / m / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        write_side_files(tmp / m, cfg)
    (tmp / "done").touch()
    shutil.rmtree(fx, ignore_errors=True)
    tmp.rename(fx)
    return fx


def weights_files(folder: Path):
    return sorted(folder.glob("*.safetensors"))


def warm(files):
    """Read every file once (into the page cache); returns the bytes read."""
    buf, total = bytearray(BLOCK), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while (n := fh.readinto(buf)):
                total += n
    return total


def io_floor(files, out_bytes, tmp: Path) -> float:
    """Seconds to read `files` from the warm page cache and write one `out_bytes` file."""
    warm(files)
    os.sync()
    block, t = bytes(BLOCK), time.perf_counter()
    warm(files)
    with open(tmp / "floor.bin", "wb", buffering=0) as fh:
        for off in range(0, out_bytes, BLOCK):
            fh.write(block[:min(BLOCK, out_bytes - off)])
    elapsed = time.perf_counter() - t
    (tmp / "floor.bin").unlink()
    return elapsed


def timed_run(cmd, files, out: Path) -> tuple[float, float]:
    """(wall s, peak RSS GB) of one process, started from a warm cache with no dirty pages pending."""
    shutil.rmtree(out, ignore_errors=True)
    warm(files)
    os.sync()
    with tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-2000:]
            raise click.ClickException(f"{cmd[0]} failed (exit {p.returncode}):\n{tail}")
    return wall, ru.ru_maxrss * 1024 / 1e9                                # ru_maxrss is in KiB on Linux


def mbmerge_cmd(method, fx, experts, out):
    exe = Path(sys.executable).with_name("mbmerge")
    head = [str(exe)] if exe.exists() else [sys.executable, "-c", "from mbmerge.bin.cli import main; main()"]
    return head + ["--method", method, "--base", str(fx / "base"), "--experts", ",".join(str(fx / e) for e in experts),
                   "--weights", ",".join(["1"] * len(experts)), "--out", str(out), "-q", *MBMERGE_FLAGS[method]]


def mergekit_cmd(exe, method, fx, experts, out):
    dtype = json.loads((fx / "base" / "config.json").read_text())["torch_dtype"]
    params = "weight: 1.0" + (f", density: {DENSITY}" if method in ("ties", "dare_ties") else "")
    lines = [f"merge_method: {method}", *([] if method == "linear" else [f"base_model: {fx / 'base'}"]), "models:",
             *[f"  - {{model: {fx / e}, parameters: {{{params}}}}}" for e in experts], f"dtype: {dtype}"]
    (out.parent / f"{method}.yml").write_text("\n".join(lines) + "\n")
    return [exe, str(out.parent / f"{method}.yml"), str(out), "--no-copy-tokenizer"]


def best(runs):
    """min wall over the repeats, max peak RSS over them."""
    return min(w for w, _ in runs), max(r for _, r in runs)


def bench_method(method, fx, experts, mergekit, repeat, tmp: Path) -> dict:
    files = [f for m in ([] if method == "linear" else ["base"]) + experts for f in weights_files(fx / m)]
    in_bytes, out_bytes = sum(f.stat().st_size for f in files), sum(f.stat().st_size for f in weights_files(fx / "base"))
    row = {"method": method, "input_GB": in_bytes / 1e9,
           "floor_s": min(io_floor(files, out_bytes, tmp) for _ in range(repeat))}
    row["mbmerge_s"], row["mbmerge_rss_GB"] = best(
        [timed_run(mbmerge_cmd(method, fx, experts, tmp / "mb"), files, tmp / "mb") for _ in range(repeat)])
    row["mbmerge_in_GBps"] = in_bytes / 1e9 / row["mbmerge_s"]
    if mergekit:
        row["mergekit_s"], row["mergekit_rss_GB"] = best(
            [timed_run(mergekit_cmd(mergekit, method, fx, experts, tmp / "mk"), files, tmp / "mk") for _ in range(repeat)])
        row["speedup"] = row["mergekit_s"] / row["mbmerge_s"]
        row["rss_ratio"] = row["mbmerge_rss_GB"] / row["mergekit_rss_GB"]
    return row


def table(rows) -> str:
    cols = [("method", "method", "{}"), ("mbmerge_s", "mbmerge s", "{:.2f}"), ("mbmerge_rss_GB", "mbmerge RSS GB", "{:.2f}"),
            ("mergekit_s", "mergekit s", "{:.2f}"), ("mergekit_rss_GB", "mergekit RSS GB", "{:.2f}"),
            ("speedup", "speed-up", "{:.1f}x"), ("rss_ratio", "RSS ratio", "{:.2f}"),
            ("mbmerge_in_GBps", "mbmerge in GB/s", "{:.2f}"), ("floor_s", "I/O floor s", "{:.2f}")]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f.format(r[k]) if k in r else "—" for k, _, f in cols) + " |")
    return "\n".join(lines)


@click.command("bench")
@click.option("--methods", default="linear,task_arithmetic,ties,dare_ties", show_default=True, help="Methods to time.")
@click.option("--hidden", default=1024, show_default=True, help="Fixture hidden size.")
@click.option("--layers", default=16, show_default=True, help="Fixture decoder layers.")
@click.option("--vocab", default=32000, show_default=True, help="Fixture vocabulary size.")
@click.option("--experts", "n_experts", default=2, show_default=True, type=click.IntRange(1, len(EXPERTS)),
              help="Number of experts merged.")
@click.option("--repeat", default=1, show_default=True, type=click.IntRange(1), help="Runs per tool; best wall kept.")
@click.option("--cache", type=click.Path(path_type=Path), help="Fixture folder [default: $MBMERGE_CACHE/bench].")
@click.option("--mergekit", envvar="MBMERGE_MERGEKIT", help="mergekit-yaml to compare with [default: $MBMERGE_MERGEKIT, "
              "else mergekit-yaml on PATH, else none].")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="JSON output [default: in the cache folder].")
def bench(methods, hidden, layers, vocab, n_experts, repeat, cache, mergekit, json_path):
    """Time mbmerge (and mergekit) end to end on a synthetic Llama-shaped fixture."""
    unknown = [m for m in methods.split(",") if m not in MBMERGE_FLAGS]
    if unknown:
        raise click.BadParameter(f"{unknown[0]!r}; choose from {', '.join(MBMERGE_FLAGS)}", param_hint="--methods")
    cache = cache or cache_dir() / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    fx = build_fixture(cache, hidden, layers, vocab, n_experts)
    mergekit = mergekit or shutil.which("mergekit-yaml")
    experts, tmp = EXPERTS[:n_experts], Path(tempfile.mkdtemp(dir=cache, prefix=".run-"))
    try:
        rows = [bench_method(m, fx, experts, mergekit, repeat, tmp) for m in methods.split(",")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    params = sum(torch.Size(s).numel() for _, s in llama_shapes(llama_config(hidden, layers, vocab)))
    click.echo(f"fixture {fx.name}: {params / 1e6:.0f}M params bf16, {n_experts} experts; "
               f"best of {repeat}; {os.cpu_count()} CPUs; mergekit: {mergekit or 'not found'}\n")
    click.echo(table(rows))
    json_path = json_path or cache / f"{fx.name}.json"
    json_path.write_text(json.dumps({"fixture": fx.name, "params": params, "repeat": repeat, "cpus": os.cpu_count(),
                                     "torch": torch.__version__, "mergekit": mergekit, "rows": rows}, indent=2))
    click.echo(f"\nJSON written to {json_path}")
