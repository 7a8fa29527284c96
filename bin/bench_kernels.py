"""`mbmerge bench-kernels`: the merge step alone, in memory, as effective bandwidth.

Each case merges T experts of n elements (stored dtype, default bf16) into one output: the bytes
it must move are (T + 1) reads and one write of n elements, so bytes / time is the effective
bandwidth, shown against what a plain device copy reaches (its reads + writes per second) and,
on a known GPU, its HBM peak. On CUDA with the Triton backend this times the fused kernels
(methods.apply_chunk's fused path) and the threshold histograms; on the CPU, the torch methods
over the engine's float32 chunks.
"""
import json
import time
from pathlib import Path

import click
import torch

from .. import kernels, methods
from ..engine.plan import CPU_CHUNK

# HBM peak, bytes/s, from the vendors' data sheets
HBM_PEAK = {"H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}
CASES = {"task_arithmetic": {}, "ties": {"density": 0.2}, "breadcrumbs_ties": {"density": 0.2, "gamma": 0.01},
         "dare_ties": {"density": 0.2}, "localize_stitch": {"sparsity": 0.1}, "consensus": {}}


WARMUP = 3           # untimed calls before timing: compiling kernels, faulting pages in, warming caches
COPY_REPEAT = 10     # timed copies at least: every figure is a share of the copy's, so one slow copy skews all


def _timed(fn, device: torch.device, repeat: int) -> float:
    """Best seconds of `repeat` timed calls of fn(), after WARMUP untimed ones: a first call pays
    for compiling and for memory touched for the first time, and the best run is the one least
    disturbed by the rest of the machine."""
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return min(times)


def copy_bandwidth(n_bytes: int, device: torch.device, repeat: int) -> float:
    """Bytes/s a plain copy moves (read + write) on the device, timed as the merges are."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * n_bytes / _timed(lambda: dst.copy_(src), device, max(repeat, COPY_REPEAT))


def _inputs(n: int, T: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator(device=device).manual_seed(0)
    b = (torch.randn(n, generator=g, device=device) * 0.02).to(dtype)
    xs = [(b.float() + torch.randn(n, generator=g, device=device) * 1e-3).to(dtype) for _ in range(T)]
    return b, xs


def _merge_step(name: str, b, xs, out_dtype, device: torch.device):
    """A closure that merges once: the fused kernel on the whole input (Triton), or the torch method
    chunk by chunk on float32 copies, as the engine's CPU path does."""
    method = methods.get(name)
    params = methods.resolve_params(method, len(xs), CASES[name])
    n, key, shape = b.numel(), "bench.weight", (b.numel(),)
    bf, xf = b.float(), [x.float() for x in xs]
    reduced = methods.reductions(method, params, lambda: [(bf, xf, 0)], key, shape)
    if kernels.use_triton(device):
        del bf, xf
        return lambda: methods.apply_chunk(method, params, reduced, b, xs, 0, key, shape, out_dtype=out_dtype)

    def chunked():
        for a in range(0, n, CPU_CHUNK):
            z = min(a + CPU_CHUNK, n)
            bc, xc = b[a:z].float(), [x[a:z].float() for x in xs]
            methods.apply_chunk(method, params, reduced, bc, xc, a, key, shape).to(out_dtype)
    return chunked


def _threshold_step(b, xs):
    """The exact k-th largest |d_i| of every expert over the tensor (two histogram passes)."""
    d = [x.float() - b.float() for x in xs]
    ks = [[max(1, len(x) // 5)] for x in xs]
    return lambda: kernels.kth_largest_abs(lambda: [d], ks)


@click.command("bench-kernels")
@click.option("--elements", "n", default=None, type=int, help="Elements per input [default: 2^28 on CUDA, 2^24 on CPU].")
@click.option("--experts", "T", default=3, show_default=True, type=click.IntRange(1, 32))
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(["bfloat16", "float16", "float32"]))
@click.option("--device", default="auto", show_default=True, help="cpu, cuda[:N] or auto.")
@click.option("--repeat", default=5, show_default=True, type=click.IntRange(1),
              help="Timed runs of each case, after untimed warm-up runs; the best is reported.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the figures here.")
def bench_kernels(n, T, dtype, device, repeat, json_path):
    """Effective bandwidth of the merge step alone (fused Triton kernels on a GPU)."""
    from ..engine.device import resolve_device
    device = resolve_device(device)
    dtype = getattr(torch, dtype)
    n = n or (1 << 28 if device.type == "cuda" else 1 << 24)
    b, xs = _inputs(n, T, dtype, device)
    copy = copy_bandwidth(n * 4, device, repeat)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in HBM_PEAK.items() if k in name), None)
    path = "triton (fused)" if kernels.use_triton(device) else "torch"
    moved = (T + 2) * n * dtype.itemsize                        # T experts and the base read, one output written
    rows = []
    for case in CASES:
        seconds = _timed(_merge_step(case, b, xs, dtype, device), device, repeat)
        rows.append({"case": case, "seconds": seconds, "GBps": moved / seconds / 1e9})
    seconds = _timed(_threshold_step(b, xs), device, repeat)
    rows.append({"case": "thresholds (radix select)", "seconds": seconds,
                 "GBps": 2 * T * n * 4 / seconds / 1e9})     # two passes over T float32 deltas
    click.echo(f"{name}, {path}: {T} experts x {n:,} elements {dtype}; best of {repeat} timed runs (the copy: "
               f"{max(repeat, COPY_REPEAT)}), each after {WARMUP} untimed; "
               f"plain copy {copy / 1e9:.3g} GB/s" + (f", HBM peak {peak / 1e9:.0f} GB/s" if peak else "") + "\n")
    click.echo("| case | ms | GB/s | % of copy |" + (" % of HBM peak |" if peak else "") + "\n|---|---|---|---|"
               + ("---|" if peak else ""))
    for r in rows:
        pct = f" {100 * r['GBps'] * 1e9 / peak:.0f}% |" if peak else ""
        click.echo(f"| {r['case']} | {1e3 * r['seconds']:.2f} | {r['GBps']:.3g} | {100 * r['GBps'] * 1e9 / copy:.0f}% |"
                   + pct)
    if json_path:
        json_path.write_text(json.dumps({"device": name, "path": path, "experts": T, "elements": n, "dtype": str(dtype),
                                         "copy_GBps": copy / 1e9, "hbm_peak_GBps": peak and peak / 1e9,
                                         "rows": rows}, indent=2))
