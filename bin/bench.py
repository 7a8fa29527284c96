"""`mbmerge bench`: end-to-end merges timed against mergekit (when installed) and against the I/O floor.

The fixture (bench_shapes.py) has the tensor shapes of a published model (`--shape gemma-2-9b`; `qwen3-30b-a3b`,
an MoE; `--layers N` keeps the real shapes in fewer layers) or of a Llama of any size (`--shape custom`), and
deltas shaped like fine-tunes' (dense small noise, sparse larger entries); bf16; built once into the
cache folder. Each tool runs as its own process from a warm page cache; we measure wall time, input
GB/s, that process's peak RSS (wait4 ru_maxrss) and the peak GPU memory mbmerge records in the output's
mbmerge.json. The I/O floor, reading every input once from the page cache and writing one output-sized
file, is the time no merge can beat on this machine. Prints a table and writes JSON and a PNG of input GB/s per method (bench_plot.py).
"""
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import click
import torch

from .. import methods as mbmerge_methods
from ..common.errors import MbmergeError
from ..engine.inputs.index import INDEX_FILE
from ..engine.output import fp8
from ..engine.recipe.document import to_mergekit
from ..common.cache import cache_dir
from ..eval.synthetic import with_added_tokens
from .bench_plot import plot
from .bench_shapes import SHAPES, n_params, shape_config, write_fixture
from .bench_timing import GB, Timing, busy_processes, floor_row, mbmerge_head, time_tool
from .bench_tools import TOOL_CASES, tool_case

EXPERTS = ["math", "code", "ifeval", "multilingual", "safety"]
# case: (method, parameters): each method's bench case (its registry row), and variants. A case whose
# method and parameters mergekit has runs from one mergekit recipe, by mergekit-yaml and by
# `mbmerge --config`, so both get mergekit's semantics; the others run mbmerge's own flags.
VARIANTS = {"ties_model_scope": ("ties", {"density": 0.2, "sparsify_scope": "model"})}
CASES = {**{m.name: (m.name, m.bench) for m in mbmerge_methods.REGISTRY.values() if m.bench is not None}, **VARIANTS}
DEFAULT_CASES = "linear,task_arithmetic,ties,dare_ties"
SHARD_BYTES = {"custom": 200 << 20}  # named models: 1 GiB shards
MARGIN, MIN_MARGIN = 0.05, GB  # free space a fixture leaves: 5% of what it needs, at least 1 GB (other writers, logs)


def count(n: float) -> str:
    """2.61B, 595M, 98.6k."""
    return next((f"{n / d:.3g}{s}" for s, d in [("B", 1e9), ("M", 1e6), ("k", 1e3)] if n >= d), f"{n:.0f}")


def fixture(cache: Path, model: str, cfg: dict, n_experts: int) -> Path:
    """cache/<model>-l<layers>-e<experts>/{base, math, code, ...}, built once (in a temp folder renamed when
    complete), after checking that it and one merged output fit on the disk."""
    L = cfg["num_hidden_layers"]
    tag = f"custom-h{cfg['hidden_size']}-l{L}-v{cfg['vocab_size']}" if model == "custom" else f"{model}-l{L}"
    fx = cache / f"{tag}-e{n_experts}"
    built = (fx / "done").exists()
    check_disk(cache, tag, cfg, n_experts, built)
    if built:
        return fx
    cache.mkdir(parents=True, exist_ok=True)
    tmp, t = cache / f".build-{os.getpid()}", time.perf_counter()
    try:
        write_fixture(tmp, cfg, EXPERTS[:n_experts], SHARD_BYTES.get(model, 1 << 30))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / "done").touch()
    shutil.rmtree(fx, ignore_errors=True)
    tmp.rename(fx)
    click.echo(f"built {fx} in {time.perf_counter() - t:.0f} s", err=True)
    return fx


def tokens_fixture(fx: Path, experts: list[str], n: int) -> Path:
    """The fixture with each expert adding n tokens (eval/synthetic.py), built once beside it."""
    out = fx.with_name(f"{fx.name}-tok{n}")
    if not (out / "done").exists():
        shutil.rmtree(out, ignore_errors=True)
        tmp = fx.with_name(f".build-{os.getpid()}")
        with_added_tokens(fx, tmp, experts, n)
        (tmp / "done").touch()
        tmp.rename(out)
    return out


def fp8_fixture(fx: Path, experts: list[str], cfg: dict) -> Path:
    """The fixture with its experts FP8 block-quantized as the releases store them (engine/output/fp8.py: tensor by
    tensor, a band of rows at a time; 128x128 blocks, 64x64 where the shapes are too small), built once beside it;
    its base is the fixture's (a link)."""
    out = fx.with_name(f"{fx.name}-fp8")
    if not (out / "done").exists():
        shutil.rmtree(out, ignore_errors=True)
        tmp = fx.with_name(f".build-{os.getpid()}")
        tmp.mkdir()
        (tmp / "base").symlink_to((fx / "base").resolve())
        block = 128 if cfg["hidden_size"] % 128 == 0 and cfg["intermediate_size"] % 128 == 0 else 64
        for e in experts:
            shutil.copytree(fx / e, tmp / e)
            shards = sorted(p.name for p in (tmp / e).glob("*.safetensors"))
            config = fp8.quantize_folder(tmp / e, shards, (tmp / e / INDEX_FILE).exists(), block)
            fp8.set_quantization(tmp / e, config)
        (tmp / "done").touch()
        tmp.rename(out)
    return out


def timed_rows(methods, fx, fq, experts, mergekit, timing, device, tmp, union) -> list[dict]:
    """Each case's row, and beside it (with `fq`, the FP8 fixture) its merge of the FP8 experts, mbmerge only."""
    rows = []
    for m in methods:
        rows.append(bench_case(m, fx, experts, mergekit, timing, device, tmp, union))
        if fq is not None and m in CASES:
            rows.append({**bench_case(m, fq, experts, None, timing, device, tmp, union), "method": f"{m}[fp8 experts]"})
    return rows


def check_disk(cache: Path, tag: str, cfg: dict, n_experts: int, built: bool) -> None:
    """Prints the size estimate; refuses in one line, before writing anything, when the fixture (unless built)
    and one output do not fit with a margin."""
    def need(layers, built=built):  # bytes: base + experts (unless built), plus one merged output, plus the margin
        size = 2 * n_params({**cfg, "num_hidden_layers": layers}) * (1 if built else 2 + n_experts)
        return size + max(MIN_MARGIN, MARGIN * size)
    on = next(p for p in [cache, *cache.parents] if p.exists())     # the cache's file system, before it exists
    L, free = cfg["num_hidden_layers"], shutil.disk_usage(on).free
    what = "one merged output" if built else f"base + {n_experts} experts + one merged output"
    if need(L) > free:
        fits = [n for n in range(L - 1, 0, -1) if need(n, False) <= free]  # another fixture, to be built
        hint = f"pass --layers {fits[0]} or fewer" if fits else "free some space or pass --cache on a larger disk"
        raise click.ClickException(f"fixture {tag} ({count(n_params(cfg))} params) needs {need(L) / GB:.3g} GB "
                                   f"({what}, bf16, and a margin) but {on} has {free / GB:.3g} GB free: {hint}")
    if not built:
        click.echo(f"building fixture {tag}: {count(n_params(cfg))} params, needs {need(L) / GB:.3g} GB "
                   f"({what}, bf16, and a margin); {free / GB:.3g} GB free", err=True)


def recipe_params(case: str) -> tuple[dict, dict] | None:
    """The case's mergekit (per-model, global) parameters; None where mergekit cannot run it."""
    method, params = CASES[case]
    if mbmerge_methods.get(method).mergekit is None:
        return None
    try:
        return to_mergekit(method, params)
    except MbmergeError:
        return None


def mbmerge_cmd(case, fx, experts, out, recipe: Path | None, device: str, union: bool = False, threads=None):
    head = mbmerge_head()
    tail = ["--out", str(out), "-q", *(["--device", device] if device != "auto" else []),
            *(["--threads", str(threads)] if threads else [])]
    if recipe:
        return head + ["--config", str(recipe), *tail]
    tail += ["--tokenizer-source", "union"] if union else []
    method, params = CASES[case]
    flags = [x for k, v in params.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    return head + ["--base", str(fx / "base"), "--experts", ",".join(str(fx / e) for e in experts),
                   *tail, "--method", method, *flags]


def write_recipe(case, fx, experts, folder: Path, union: bool = False) -> Path:
    """The case's mergekit recipe (dtype from the base's config.json; `union`: the tokenizers' union)."""
    method, _ = CASES[case]
    per_model, glob = recipe_params(case)
    dtype = json.loads((fx / "base" / "config.json").read_text())["torch_dtype"]
    flow = lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"  # noqa: E731
    lines = [f"merge_method: {method}", *([] if method == "linear" else [f"base_model: {fx / 'base'}"]), "models:",
             *[f"  - {{model: {fx / e}, parameters: {flow(per_model)}}}" for e in experts],
             f"parameters: {flow(glob)}", f"dtype: {dtype}", *["tokenizer_source: union"] * union]
    path = folder / f"{case}.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def bench_case(case, fx, experts, mergekit, timing: Timing, device, tmp: Path, union: bool = False) -> dict:
    if case in TOOL_CASES:
        return tool_case(case, fx, experts, mergekit, timing, device, tmp)
    method = CASES[case][0]
    experts = experts[:mbmerge_methods.get(method).max_experts or None]
    shards = {m: sorted((fx / m).glob("*.safetensors")) for m in ["base", *experts]}
    files = [f for m in ([] if method == "linear" else ["base"]) + experts for f in shards[m]]
    row = floor_row(case, files, sum(f.stat().st_size for f in shards["base"]), timing, tmp)
    recipe = write_recipe(case, fx, experts, tmp, union) if recipe_params(case) else None
    cmd = mbmerge_cmd(case, fx, experts, tmp / "mb", recipe, device, union, timing.threads)
    card = time_tool(row, "mbmerge", timing, cmd, files, tmp / "mb")
    row["mbmerge_device"], row["mbmerge_threads"] = card.get("device"), card.get("kernels", {}).get("threads")
    if "peak_gpu_bytes" in card:                                  # recorded by CUDA runs
        row["mbmerge_gpu_GB"] = card["peak_gpu_bytes"] / GB
    if mergekit and recipe:
        cuda = ["--cuda"] if device == "cuda" or device == "auto" and torch.cuda.is_available() else []
        cmd = [mergekit, str(recipe), str(tmp / "mk"), "--no-copy-tokenizer", *cuda]
        time_tool(row, "mergekit", timing, cmd, files, tmp / "mk")
    return row


def mergekit_version(exe: str) -> str | None:
    """Asked of the interpreter on mergekit-yaml's #! line (mergekit often lives in its own venv)."""
    try:
        with open(exe, "rb") as fh:
            line = fh.readline().decode(errors="replace")
        if not line.startswith("#!"):
            return None
        code = "from importlib.metadata import version; print(version('mergekit'))"
        done = subprocess.run([*shlex.split(line[2:]), "-c", code], capture_output=True, text=True, timeout=120)
        return (done.stdout.strip() or None) if done.returncode == 0 else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def machine(mergekit: str | None) -> dict:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpus": os.cpu_count(), "ram_GB": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB,
            "gpu": gpu, "torch": torch.__version__, "mergekit_version": mergekit and mergekit_version(mergekit),
            "load_avg_1m": os.getloadavg()[0]}


COLUMNS = [("method", "method", "{}"), ("input_GB", "input GB", "{:.2f}"), ("mbmerge_s", "mbmerge s", "{:.2f}"),
           ("mbmerge_in_GBps", "mbmerge GB/s", "{:.2f}"), ("x_floor", "x I/O floor", "{:.1f}x"),
           ("mbmerge_rss_GB", "mbmerge RSS GB", "{:.2f}"), ("mbmerge_gpu_GB", "mbmerge GPU GB", "{:.2f}"),
           ("mergekit_s", "mergekit s", "{:.2f}"), ("mergekit_in_GBps", "mergekit GB/s", "{:.2f}"),
           ("mergekit_rss_GB", "mergekit RSS GB", "{:.2f}"), ("speedup", "speed-up", "{:.1f}x"),
           ("rss_ratio", "RSS ratio", "{:.2f}"), ("floor_s", "I/O floor s", "{:.2f}"),
           ("floor_in_GBps", "I/O floor GB/s", "{:.2f}")]


def table(rows) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(f.format(r[k]) if k in r else "—" for k, _, f in COLUMNS) + " |"
                              for r in rows])


def find_mergekit(vs, mergekit) -> tuple[str | None, str]:
    """(mergekit-yaml to run or None, what the header says about it)."""
    if vs == "none":
        return None, "not compared (--vs none)"
    found = shutil.which(mergekit or "mergekit-yaml")
    if found:
        return found, found
    where = f"{mergekit} is not an executable" if mergekit else "mergekit-yaml is not on PATH"
    note = f"NOT FOUND ({where}; pass --mergekit PATH or set MBMERGE_MERGEKIT): mbmerge figures only"
    if vs == "mergekit":
        click.echo(f"mbmerge bench: --vs mergekit: {note}", err=True)
    return None, note


@click.command("bench")
@click.option("--methods", default=DEFAULT_CASES, show_default=True,
              help=f"Cases to time, or 'all': {', '.join([*CASES, *TOOL_CASES])}. Those mergekit has run from one "
              f"recipe in both tools; moe and tokensurgeon run mbmerge's and mergekit's commands.")
@click.option("--shape", "--model", "model", default="custom", show_default=True,
              type=click.Choice([*SHAPES, "custom"]),
              help="Tensor shapes of a published model (qwen3-30b-a3b: an MoE), or 'custom': a Llama sized by "
                   "--hidden/--layers/--vocab. --model is the same option.")
@click.option("--layers", type=click.IntRange(1), help="Decoder layers [default: the shape's real count; custom: 16].")
@click.option("--hidden", type=click.IntRange(1), help="Hidden size of --shape custom [default: 1024].")
@click.option("--vocab", type=click.IntRange(1), help="Vocabulary size of --shape custom [default: 32000].")
@click.option("--experts", "n_experts", default=2, show_default=True, type=click.IntRange(1, len(EXPERTS)),
              help="Experts merged (math, code, ...).")
@click.option("--added-tokens", default=0, show_default=True, type=click.IntRange(0),
              help="Each expert adds this many special tokens (more embedding and head rows; full vocabularies); "
                   "both tools merge the tokenizers' union.")
@click.option("--quantized", type=click.Choice(["fp8"]), help="Also time each method with the experts FP8 "
              "block-quantized (a copy of the fixture built once beside it): rows 'METHOD[fp8 experts]'.")
@click.option("--repeat", default=1, show_default=True, type=click.IntRange(1), help="Runs per tool; best wall kept.")
@click.option("--cold", is_flag=True, help="Evict the inputs from the page cache before every timed run of either "
              "tool (posix_fadvise DONTNEED, no privileges needed); the floor then reads them from the disk and "
              "writes the output with fsync.")
@click.option("--threads", type=click.IntRange(1), help="CPU cores both tools run on: the first N the bench may use "
              "(mbmerge gets --threads N; mergekit, which has no such option, is held to them) [default: all].")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Passed to mbmerge when not auto; cuda (or auto where CUDA is available) runs mergekit with --cuda.")
@click.option("--vs", type=click.Choice(["mergekit", "none"]),
              help="Compare with mergekit, or not [default: compare when mergekit is found].")
@click.option("--mergekit", envvar="MBMERGE_MERGEKIT",
              help="mergekit-yaml to compare with [default: $MBMERGE_MERGEKIT, else mergekit-yaml on PATH].")
@click.option("--busy", default=0, show_default=True, type=click.IntRange(0),
              help="Processes busy-looping on the CPU through every run: a merge timed beside other work.")
@click.option("--cache", type=click.Path(path_type=Path), help="Fixture folder [default: $MBMERGE_CACHE/bench].")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="JSON output [default: cache folder].")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path),
              help="PNG of input GB/s per method [default: beside the JSON].")
def bench(methods, model, layers, hidden, vocab, n_experts, added_tokens, quantized, repeat, cold, threads, device, vs,
          mergekit, busy, cache, json_path, plot_path):
    """Time mbmerge (and mergekit) end to end on a synthetic fixture shaped like a MergeBench base."""
    methods = list(CASES) if methods == "all" else methods.split(",")
    if unknown := [m for m in methods if m not in CASES and m not in TOOL_CASES]:
        raise click.BadParameter(f"{unknown[0]!r}; choose from {', '.join([*CASES, *TOOL_CASES])}",
                                 param_hint="--methods")
    if model != "custom" and (hidden or vocab):
        raise click.UsageError(f"--hidden and --vocab size --shape custom; {model} has its own")
    cfg = shape_config(model, layers, hidden=hidden or 1024, vocab=vocab or 32000)
    cache = cache or cache_dir() / "bench"
    fx = fixture(cache, model, cfg, n_experts)
    if added_tokens:
        fx = tokens_fixture(fx, EXPERTS[:n_experts], added_tokens)
    fq = fp8_fixture(fx, EXPERTS[:n_experts], cfg) if quantized else None
    mergekit, mk_note = find_mergekit(vs, mergekit)
    host = machine(mergekit)
    tmp, timing = Path(tempfile.mkdtemp(dir=cache, prefix=".run-")), Timing(repeat, cold, threads)
    try:
        with busy_processes(busy):
            rows = timed_rows(methods, fx, fq, EXPERTS[:n_experts], mergekit, timing, device, tmp, added_tokens > 0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    host["load_avg_1m_end"], host["busy_processes"] = os.getloadavg()[0], busy
    host["threads"] = n = len(timing.cores())
    params, where = n_params(cfg), f"{host['cpus']} CPUs" + (f", {host['gpu']}" if host["gpu"] else "")
    mk_note += f" ({host['mergekit_version']})" if host["mergekit_version"] else ""
    load = f"load {host['load_avg_1m']:.1f}" + (f", {busy} busy processes" if busy else "")
    click.echo(f"fixture {fx.name}: {count(params)} params bf16, {n_experts} experts; best wall of {repeat}, "
               f"max RSS, {'cold' if cold else 'warm'} page cache; {where}, {n} thread{'s' * (n != 1)}, {load}; "
               f"device {device}; mergekit: {mk_note}\n\n"
               f"{table(rows)}")
    json_path = json_path or cache / f"{fx.name}.json"
    plot_path = plot_path or json_path.with_suffix(".png")
    json_path.write_text(json.dumps({"fixture": fx.name, "shape": model, "model": model,
                                     "layers": cfg["num_hidden_layers"], "params": params, "experts": n_experts,
                                     "repeat": repeat, "cold": cold, "device": device, "machine": host,
                                     "mergekit": mergekit, "rows": rows}, indent=2))
    plot(rows, plot_path, f"{fx.name}: {count(params)} params, {n_experts} experts; {where}; device {device}")
    click.echo(f"\nJSON: {json_path}\nPNG: {plot_path}")
