"""`mbmerge bench`: end-to-end merges timed against mergekit (when installed) and against the I/O floor.

The fixture has tools/make_models.py's Llama shapes and delta statistics (base N(0, 0.02), norms 1;
expert = base + N(0, 2e-4) + 5% sparse N(0, 2e-3); bf16; ~200 MB shards) and is built once, cached.
Each tool runs as its own process from a warm page cache; we measure wall time and that process's peak
RSS (wait4 ru_maxrss). The I/O floor, reading every input once from the page cache and writing one
output-sized file, is the time no merge can beat on this machine.
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

from .. import methods as mbmerge_methods
from ..engine.synthetic import cache_dir, llama_config, llama_shapes, write_side_files

EXPERTS = ["math", "code", "ifeval", "multilingual", "safety"]
DENSITY = 0.2
# Cases both tools run: one mergekit recipe per case, run by mergekit-yaml and by `mbmerge --config`,
# so both get mergekit's semantics: merge_method: (per-model parameters, global parameters).
RECIPES = {"linear": ({"weight": 1.0}, {}), "task_arithmetic": ({"weight": 1.0}, {}),
           "ties": ({"weight": 1.0, "density": DENSITY}, {}), "dare_ties": ({"weight": 1.0, "density": DENSITY}, {}),
           "breadcrumbs_ties": ({"weight": 1.0, "density": DENSITY, "gamma": 0.01}, {}),
           "della": ({"weight": 1.0, "density": DENSITY, "epsilon": 0.1}, {}),
           "model_stock": ({}, {}), "slerp": ({}, {"t": 0.5})}
# Cases only mbmerge runs: its own flags.
MBMERGE_ONLY = {"ties_model_scope": ["--method", "ties", "--density", str(DENSITY), "--sparsify-scope", "model"],
                "localize_stitch": ["--method", "localize_stitch"], "consensus": ["--method", "consensus"],
                "magmax": ["--method", "magmax"], "tsv": ["--method", "tsv"], "iso_c": ["--method", "iso_c"]}
CASES = [*RECIPES, *MBMERGE_ONLY]
DEFAULT_CASES = "linear,task_arithmetic,ties,dare_ties"
BLOCK = 64 << 20


def shard_names(shapes: dict, limit: int) -> list[list[str]]:
    """Names grouped as make_models.py does: a shard closes once it holds `limit` bytes (bf16)."""
    shards, size = [[]], 0
    for name, s in shapes.items():
        shards[-1].append(name)
        size += 2 * torch.Size(s).numel()
        if size >= limit:
            shards, size = shards + [[]], 0
    return [s for s in shards if s]


def family_tensors(name, shape, n_experts):
    """bf16 [base, expert_1, ...] for one tensor, seeded by its name."""
    g = torch.Generator().manual_seed(int(hashlib.sha1(name.encode()).hexdigest()[:12], 16))
    b = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g).mul_(0.02)
    out = [b.to(torch.bfloat16)]
    for _ in range(n_experts):
        d = torch.randn(shape, generator=g).mul_(2e-4).view(-1)                     # [numel]
        hit = (torch.rand(d.shape, generator=g) < 0.05).nonzero().squeeze(1)        # 5% of the entries
        d[hit] += torch.randn(hit.shape, generator=g).mul_(2e-3)
        out.append((b + d.view(shape)).to(torch.bfloat16))
    return out


def build_fixture(root: Path, H, L, V, n_experts, shard_mb=200) -> Path:
    """root/<shape>/{base, math, code, ...}, built once (in a temp folder renamed when complete)."""
    fx = root / f"llama-h{H}-l{L}-v{V}-e{n_experts}"
    if (fx / "done").exists():
        return fx
    click.echo(f"building fixture {fx} ...", err=True)
    cfg, tmp, models = llama_config(H, L, V), root / f".build-{os.getpid()}", ["base", *EXPERTS[:n_experts]]
    shapes = llama_shapes(cfg)
    shards, wmap = shard_names(shapes, shard_mb * 2**20), {}
    for k, names in enumerate(shards):
        parts = [dict(zip(names, ts)) for ts in zip(*(family_tensors(n, shapes[n], n_experts) for n in names))]
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        for m, part in zip(models, parts):
            (tmp / m).mkdir(parents=True, exist_ok=True)
            save_file(part, str(tmp / m / file), metadata={"format": "pt"})
        wmap.update(dict.fromkeys(names, file))
    for m in models:
        write_side_files(tmp / m, cfg, wmap, sum(2 * torch.Size(s).numel() for s in shapes.values()))
    (tmp / "done").touch()
    shutil.rmtree(fx, ignore_errors=True)
    tmp.rename(fx)
    return fx


def warm(files):
    """Read every file once, into the page cache."""
    buf = bytearray(BLOCK)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


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


# Runs argv[1:] and prints "wall_s maxrss_KiB exit_code". It runs in a fresh small interpreter because
# ru_maxrss counts the memory of the process that exec'd the command: a child spawned straight from this
# process would report this process's peak (measured: `python -c pass` from a parent that had held 2 GB: 2.1 GB).
LAUNCHER = ("import os, subprocess, sys, time; t = time.perf_counter(); "
            "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); _, status, ru = os.wait4(p.pid, 0); "
            "print(time.perf_counter() - t, ru.ru_maxrss, os.waitstatus_to_exitcode(status))")


def timed_run(cmd, files, out: Path) -> tuple[float, float]:
    """(wall s, peak RSS GB) of one process, started from a warm cache with no dirty pages pending."""
    shutil.rmtree(out, ignore_errors=True)
    warm(files)
    os.sync()
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True)
    wall, maxrss, code = done.stdout.split() if done.returncode == 0 else (0, 0, "?")
    if code != "0":
        raise click.ClickException(f"{cmd[0]} failed (exit {code}):\n{done.stderr[-2000:]}")
    return float(wall), int(maxrss) * 1024 / 1e9                               # ru_maxrss is in KiB on Linux


def mbmerge_cmd(case, fx, experts, out, recipe: Path | None):
    exe = Path(sys.executable).with_name("mbmerge")
    head = [str(exe)] if exe.exists() else [sys.executable, "-c", "from mbmerge.bin.cli import main; main()"]
    if recipe:
        return head + ["--config", str(recipe), "--out", str(out), "-q"]
    return head + ["--base", str(fx / "base"), "--experts", ",".join(str(fx / e) for e in experts),
                   "--out", str(out), "-q", *MBMERGE_ONLY[case]]


def write_recipe(method, fx, experts, folder: Path) -> Path:
    """The case's mergekit recipe (dtype from config.json, as tools/mergekit_baseline.sh)."""
    per_model, glob = RECIPES[method]
    dtype = json.loads((fx / "base" / "config.json").read_text())["torch_dtype"]
    flow = lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"  # noqa: E731
    lines = [f"merge_method: {method}", *([] if method == "linear" else [f"base_model: {fx / 'base'}"]), "models:",
             *[f"  - {{model: {fx / e}, parameters: {flow(per_model)}}}" for e in experts],
             f"parameters: {flow(glob)}", f"dtype: {dtype}"]
    path = folder / f"{method}.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def best_of(repeat, cmd, files, out):
    """min wall, max peak RSS, and every wall over `repeat` runs."""
    runs = [timed_run(cmd, files, out) for _ in range(repeat)]
    return min(w for w, _ in runs), max(r for _, r in runs), [round(w, 3) for w, _ in runs]


def bench_case(case, fx, experts, mergekit, repeat, tmp: Path) -> dict:
    experts = experts[:mbmerge_methods.get(case if case in RECIPES else MBMERGE_ONLY[case][1]).max_experts or None]
    shards = {m: sorted((fx / m).glob("*.safetensors")) for m in ["base", *experts]}
    files = [f for m in ([] if case == "linear" else ["base"]) + experts for f in shards[m]]
    in_bytes, out_bytes = sum(f.stat().st_size for f in files), sum(f.stat().st_size for f in shards["base"])
    row = {"method": case, "input_GB": in_bytes / 1e9,
           "floor_s": min(io_floor(files, out_bytes, tmp) for _ in range(max(3, repeat)))}
    recipe = write_recipe(case, fx, experts, tmp) if case in RECIPES else None
    cmd = mbmerge_cmd(case, fx, experts, tmp / "mb", recipe)
    row["mbmerge_s"], row["mbmerge_rss_GB"], row["mbmerge_walls"] = best_of(repeat, cmd, files, tmp / "mb")
    row["mbmerge_in_GBps"] = row["input_GB"] / row["mbmerge_s"]
    row["floor_pct"] = 100 * row["floor_s"] / row["mbmerge_s"]
    if mergekit and recipe:
        cmd = [mergekit, str(recipe), str(tmp / "mk"), "--no-copy-tokenizer"]
        row["mergekit_s"], row["mergekit_rss_GB"], row["mergekit_walls"] = best_of(repeat, cmd, files, tmp / "mk")
        row["speedup"] = row["mergekit_s"] / row["mbmerge_s"]
        row["rss_ratio"] = row["mbmerge_rss_GB"] / row["mergekit_rss_GB"]
    return row


COLUMNS = [("method", "method", "{}"), ("mbmerge_s", "mbmerge s", "{:.2f}"),
           ("mbmerge_rss_GB", "mbmerge RSS GB", "{:.2f}"),
           ("mergekit_s", "mergekit s", "{:.2f}"), ("mergekit_rss_GB", "mergekit RSS GB", "{:.2f}"),
           ("speedup", "speed-up", "{:.1f}x"), ("rss_ratio", "RSS ratio", "{:.2f}"),
           ("mbmerge_in_GBps", "mbmerge input GB/s", "{:.2f}"), ("floor_s", "I/O floor s", "{:.2f}"),
           ("floor_pct", "% of I/O floor", "{:.0f}%")]


def table(rows) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(f.format(r[k]) if k in r else "—" for k, _, f in COLUMNS) + " |"
                              for r in rows])


@click.command("bench")
@click.option("--methods", default=DEFAULT_CASES, show_default=True,
              help=f"Cases to time, or 'all': {', '.join(CASES)}. Those mergekit has run from one recipe in both tools.")
@click.option("--hidden", default=1024, show_default=True, help="Fixture hidden size.")
@click.option("--layers", default=16, show_default=True, help="Fixture decoder layers.")
@click.option("--vocab", default=32000, show_default=True, help="Fixture vocabulary size.")
@click.option("--experts", "n_experts", default=2, show_default=True, type=click.IntRange(1, len(EXPERTS)))
@click.option("--repeat", default=1, show_default=True, type=click.IntRange(1), help="Runs per tool; best wall kept.")
@click.option("--cache", type=click.Path(path_type=Path), help="Fixture folder [default: $MBMERGE_CACHE/bench].")
@click.option("--mergekit", envvar="MBMERGE_MERGEKIT",
              help="mergekit-yaml to compare with [default: $MBMERGE_MERGEKIT, else mergekit-yaml on PATH].")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="JSON output [default: cache folder].")
def bench(methods, hidden, layers, vocab, n_experts, repeat, cache, mergekit, json_path):
    """Time mbmerge (and mergekit) end to end on a synthetic Llama-shaped fixture."""
    methods = CASES if methods == "all" else methods.split(",")
    if unknown := [m for m in methods if m not in CASES]:
        raise click.BadParameter(f"{unknown[0]!r}; choose from {', '.join(CASES)}", param_hint="--methods")
    cache = cache or cache_dir() / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    fx = build_fixture(cache, hidden, layers, vocab, n_experts)
    mergekit = mergekit or shutil.which("mergekit-yaml")
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".run-"))
    try:
        rows = [bench_case(m, fx, EXPERTS[:n_experts], mergekit, repeat, tmp) for m in methods]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    params = sum(torch.Size(s).numel() for s in llama_shapes(llama_config(hidden, layers, vocab)).values())
    click.echo(f"fixture {fx.name}: {params / 1e6:.0f}M params bf16, {n_experts} experts; best wall of {repeat}, "
               f"max RSS; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; mergekit: {mergekit or 'not found'}\n\n"
               f"{table(rows)}")
    json_path = json_path or cache / f"{fx.name}.json"
    json_path.write_text(json.dumps({"fixture": fx.name, "params": params, "repeat": repeat, "cpus": os.cpu_count(),
                                     "torch": torch.__version__, "mergekit": mergekit, "rows": rows}, indent=2))
    click.echo(f"\nJSON: {json_path}")
