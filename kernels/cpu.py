"""The fused CPU merges of cpu_merge.c: compiled when the package is installed (setup.py builds it as
an optional extension, for AVX2 and F16C), loaded with ctypes, and run by a few threads that share
each call's elements.

Why plain C through ctypes (measured on this project's 2-core machines; the closing note of issue 17
has the figures): a new process loads the library in 0.2 ms and no process ever compiles, against
2.5-3.9 s per kernel for torch.compile with a warm cache, 2.4 s for an AOTInductor package (importing
inductor, then loading), 58 s for a first torch.utils.cpp_extension build (torch's headers). The C
file mirrors the Triton kernels operation by operation, so the bytes are the torch methods'.

Threads: each call hands its elements out PIECE at a time from an atomic cursor to `threads()` pool
threads that block (never spin) between calls; a thread on a busy core takes fewer pieces, so a busy
machine slows a merge by the share of the cores it takes, not by an idle-spinning team. A chunk too
small to split runs on the calling thread alone.
"""
import ctypes
import functools
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import torch

PIECE = 1 << 15          # elements a thread takes at a time: 64 KiB of bf16 per input
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
TRIMS, ELECTS = {"none": 0, "band": 1, "random": 2}, {"none": 0, "sum": 1, "count": 2}
ALL_TIES = 1 << 62
i64p, f32p, f64p = ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_double)


# cpu_merge.c's argument structs, field for field (tests/test_kernels_cpu.py holds each to the layout the C file
# compiled: names, order, offsets, sizes and kinds)
class MergeArgs(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int64), ("offset", ctypes.c_int64), ("piece", ctypes.c_int64),
                ("T", ctypes.c_int32), ("trim", ctypes.c_int32), ("elect", ctypes.c_int32), ("mean", ctypes.c_int32),
                ("b", ctypes.c_void_p), ("b_dt", ctypes.c_int32), ("xs", ctypes.POINTER(ctypes.c_void_p)),
                ("x_dt", ctypes.POINTER(ctypes.c_int32)), ("w", f32p), ("lo", f32p), ("hi", f32p), ("p", f32p),
                ("g", f32p), ("pj", ctypes.POINTER(ctypes.c_void_p)), ("inverse", ctypes.c_int32),
                ("lo_pos", i64p), ("hi_pos", i64p), ("seeds", ctypes.POINTER(ctypes.c_uint64)),
                ("div", ctypes.c_float), ("scale", ctypes.c_float), ("den0", ctypes.c_float),
                ("out", ctypes.c_void_p), ("out_dt", ctypes.c_int32), ("bad", i64p),
                ("granule", ctypes.c_int64), ("sums", f64p), ("keep_out", ctypes.POINTER(ctypes.c_void_p)),
                ("keep_in", ctypes.POINTER(ctypes.c_void_p)), ("ranks", f32p)]


class UniformArgs(ctypes.Structure):
    _fields_ = [("seed", ctypes.c_uint64), ("start", ctypes.c_int64), ("n", ctypes.c_int64), ("piece", ctypes.c_int64),
                ("out", f32p)]


class WidenArgs(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int64), ("piece", ctypes.c_int64), ("cols", ctypes.c_int64), ("group", ctypes.c_int64),
                ("scols", ctypes.c_int64), ("q", ctypes.c_void_p), ("table", f32p), ("scales", f32p), ("out", f32p)]


class RateArgs(ctypes.Structure):
    _fields_ = [("rows", ctypes.c_int64), ("m", ctypes.c_int64), ("piece", ctypes.c_int64), ("b", ctypes.c_void_p),
                ("b_dt", ctypes.c_int32), ("x", ctypes.c_void_p), ("x_dt", ctypes.c_int32), ("lo", ctypes.c_float),
                ("step", ctypes.c_float), ("out", f32p)]


class FoldArgs(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int64), ("granule", ctypes.c_int64), ("piece", ctypes.c_int64), ("v", f32p),
                ("out", f64p)]


class ProductArgs(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int64), ("granule", ctypes.c_int64), ("piece", ctypes.c_int64), ("T", ctypes.c_int32),
                ("b", ctypes.c_void_p), ("b_dt", ctypes.c_int32), ("xs", ctypes.POINTER(ctypes.c_void_p)),
                ("x_dt", ctypes.POINTER(ctypes.c_int32)), ("P", ctypes.c_int32),
                ("pi", ctypes.POINTER(ctypes.c_int32)), ("pj", ctypes.POINTER(ctypes.c_int32)), ("sums", f64p)]


class MixArgs(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int64), ("row", ctypes.c_int64), ("piece", ctypes.c_int64), ("T", ctypes.c_int32),
                ("b", ctypes.c_void_p), ("b_dt", ctypes.c_int32), ("xs", ctypes.POINTER(ctypes.c_void_p)),
                ("x_dt", ctypes.POINTER(ctypes.c_int32)), ("t", f32p), ("u", f32p), ("out", ctypes.c_void_p),
                ("out_dt", ctypes.c_int32), ("bad", i64p)]


class HistArgs(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int64), ("piece", ctypes.c_int64), ("T", ctypes.c_int32), ("b", ctypes.c_void_p),
                ("b_dt", ctypes.c_int32), ("xs", ctypes.POINTER(ctypes.c_void_p)),
                ("x_dt", ctypes.POINTER(ctypes.c_int32)), ("top", ctypes.POINTER(ctypes.c_int32)),
                ("hist", ctypes.POINTER(ctypes.c_void_p)), ("win", ctypes.POINTER(ctypes.c_int32)),
                ("low", ctypes.POINTER(ctypes.c_void_p)), ("above", i64p)]


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels; None, with one notice line, where they were not built (no C compiler at
    install) or the CPU lacks AVX2 or F16C."""
    built = [p for suffix in EXTENSION_SUFFIXES for p in Path(__file__).parent.glob(f"_cpu_merge{suffix}")]
    if not built:
        return _unavailable("the compiled CPU kernels were not built when mbmerge was installed (no C compiler?)")
    if not {"avx2", "f16c"} <= _cpu_flags():
        return _unavailable("this CPU lacks AVX2 or F16C for the compiled CPU kernels")
    try:
        lib = ctypes.CDLL(str(built[0]))
    except OSError as e:
        return _unavailable(f"the compiled CPU kernels did not load ({' '.join(str(e).split())[:200]})")
    lib.delta_merge.argtypes = [ctypes.POINTER(MergeArgs), i64p]
    lib.delta_merge.restype = None
    lib.histogram.argtypes = [ctypes.POINTER(HistArgs), i64p]
    lib.histogram.restype = None
    lib.ties.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32, ctypes.c_float,
                         ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    lib.ties.restype = ctypes.c_int64
    lib.uniforms.argtypes = [ctypes.POINTER(UniformArgs), i64p]
    lib.uniforms.restype = None
    lib.widen_fp8.argtypes = [ctypes.POINTER(WidenArgs), i64p]
    lib.widen_fp8.restype = None
    lib.keep_rates.argtypes = [ctypes.POINTER(RateArgs), i64p]
    lib.keep_rates.restype = ctypes.c_int64
    lib.l1_sums.argtypes = [ctypes.POINTER(MergeArgs), i64p]
    lib.l1_sums.restype = ctypes.c_int64
    lib.fold_sums.argtypes = [ctypes.POINTER(FoldArgs), i64p]
    lib.fold_sums.restype = ctypes.c_int64
    lib.product_sums.argtypes = [ctypes.POINTER(ProductArgs), i64p]
    lib.product_sums.restype = ctypes.c_int64
    lib.mix.argtypes = [ctypes.POINTER(MixArgs), i64p]
    lib.mix.restype = None
    lib.philox_lanes.argtypes = [ctypes.c_int32]
    lib.philox_lanes.restype = ctypes.c_int32
    return lib


def _cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux), so an instruction the CPU lacks is never run."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.partition(":")[2].split())


def _unavailable(why: str) -> None:
    print(f"mbmerge: {why}; merging with the slower torch path", file=sys.stderr)
    return None


def threads() -> int:
    """Worker threads: the cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads(), thread_name_prefix="mbmerge-cpu")


def _run(fn, args: list, n: int) -> list:
    """fn(args[r], cursor) on as many threads r as share n elements in pieces; each thread's result."""
    cursor = ctypes.c_int64(0)
    k = min(len(args), -(-n // PIECE))
    if k <= 1:
        return [fn(ctypes.byref(args[0]), ctypes.byref(cursor))]
    futures = [_pool().submit(fn, ctypes.byref(a), ctypes.byref(cursor)) for a in args[:k]]
    return [f.result() for f in futures]


def covers(*tensors) -> bool:
    """Whether the kernels take these tensors: CPU, contiguous, float32/bf16/fp16, and a compiler."""
    return all(t is None or (t.device.type == "cpu" and t.dtype in DTYPES and t.is_contiguous())
               for t in tensors) and library() is not None


def _array(ctype, values):
    return (ctype * len(values))(*values)


def _base(b) -> dict:
    """The base chunk (or None) as the C functions take it: its address and dtype code."""
    return dict(b=b.data_ptr() if b is not None else None, b_dt=DTYPES[b.dtype] if b is not None else 0)


def _sources(b, xs) -> dict:
    """The base and the experts' chunks as the C structs take them (the tensors must outlive the call)."""
    return dict(**_base(b), xs=_array(ctypes.c_void_p, [x.data_ptr() for x in xs]),
                x_dt=_array(ctypes.c_int32, [DTYPES[x.dtype] for x in xs]))


def _rates(rates, T):
    return _array(ctypes.c_void_p, [r.data_ptr() if r is not None else None for r in rates or [None] * T])


def delta_merge(b, xs, *, weights, scale, div=1.0, trim="none", lo=None, hi=None, lo_pos=None, hi_pos=None,
                density=None, seeds=None, gain=None, offset=0, elect="none", aggregate="mean", rates=None,
                inverse=False, kept=None, out_dtype=torch.float32) -> tuple[torch.Tensor, list[int]]:
    """merge_triton.delta_merge on CPU tensors: (the flat merged chunk in out_dtype, how many values
    are not finite in [the output, the base, each expert]). With trim 'random', rates: per expert, the
    keep rate of each element from keep_rates (or None: `density`), each kept e_i divided by its rate if
    `inverse` (DELLA); kept: the keep bits l1_sums drew for this chunk, read instead of drawing again
    (the rates then serve only `inverse`)."""
    T, n = len(xs), xs[0].numel()
    out = torch.empty(n, dtype=out_dtype)
    if n == 0:
        return out, [0] * (T + 2)
    w = [float(v) for v in weights]
    held = [x.contiguous() for x in xs]           # alive until the call returns
    args = MergeArgs(
        n=n, offset=offset, piece=PIECE, T=T, trim=TRIMS[trim], elect=ELECTS[elect], mean=int(aggregate == "mean"),
        **_sources(b, held), w=_array(ctypes.c_float, w), lo=_array(ctypes.c_float, _or(lo, 0.0, T)),
        hi=_array(ctypes.c_float, _or(hi, float("inf"), T)), p=_array(ctypes.c_float, _or(density, 1.0, T)),
        g=_array(ctypes.c_float, _or(gain, 1.0, T)), lo_pos=_array(ctypes.c_int64, _or(lo_pos, ALL_TIES, T, int)),
        hi_pos=_array(ctypes.c_int64, _or(hi_pos, 0, T, int)), inverse=int(inverse),
        pj=_rates(rates, T), seeds=_array(ctypes.c_uint64, list(seeds or [0] * T)),
        div=float(div), scale=float(scale), den0=min(w) if min(w) > 0 else 1.0,
        out=out.data_ptr(), out_dt=DTYPES[out_dtype], keep_in=_keep_bits(kept, n))
    return out, _counted(library().delta_merge, args, n, T)


def _counted(fn, args, n: int, T: int) -> list[int]:
    """_run(fn) over n elements with args.bad a row of its own per thread (no shared counter): how many
    blocks held non-finite values in [the output, the base, each expert]."""
    bad = torch.zeros(threads(), T + 2, dtype=torch.int64)
    per_thread = []
    for row in bad:
        a = type(args).from_buffer_copy(args)
        a.bad = ctypes.cast(row.data_ptr(), i64p)
        per_thread.append(a)
    _run(fn, per_thread, n)
    return bad.sum(0).tolist()


def mix(b, xs, *, t: torch.Tensor, u: torch.Tensor, row: int,
        out_dtype=torch.float32) -> tuple[torch.Tensor, list[int]]:
    """interpolation.apply_model_stock's out = t * (sum_i x_i / T) + u * b, bit for bit, with float32 (t, u)
    per `row` elements of the chunk: (the flat chunk in out_dtype, non-finite counts as delta_merge's)."""
    T, n = len(xs), xs[0].numel()
    out = torch.empty(n, dtype=out_dtype)
    if n == 0:
        return out, [0] * (T + 2)
    t, u = t.float().contiguous(), u.float().contiguous()     # alive until the call returns
    args = MixArgs(n=n, row=row, piece=PIECE, T=T, **_sources(b, xs), t=ctypes.cast(t.data_ptr(), f32p),
                   u=ctypes.cast(u.data_ptr(), f32p), out=out.data_ptr(), out_dt=DTYPES[out_dtype])
    return out, _counted(library().mix, args, n, T)


def product_sums(b, xs, pairs: list[tuple[int, int]], granule: int) -> torch.Tensor:
    """[pairs, granules] float64: _blocks.granule_sums(d_i * d_j, granule) bit for bit for each pair (i, j),
    d_i = x_i - b in float32 (x_i itself where b is None)."""
    n = xs[0].numel()
    granules = -(-n // granule)
    sums = torch.zeros(len(pairs), granules, dtype=torch.float64)
    args = ProductArgs(n=n, granule=granule, piece=max(1, PIECE // granule), T=len(xs), **_sources(b, xs),
                       P=len(pairs), pi=_array(ctypes.c_int32, [i for i, _ in pairs]),
                       pj=_array(ctypes.c_int32, [j for _, j in pairs]), sums=ctypes.cast(sums.data_ptr(), f64p))
    _run_groups(library().product_sums, args, granules, granule, "products over granules")
    return sums


WINDOWS = -2   # a top of `histograms`: the windows' pass


def histograms(hists: list[torch.Tensor | None], b, xs, tops: list[int | None], windows=None) -> None:
    """Add each series' keys of |x_i - b| (float32) to hists[i] (one row, shared by the threads): [1, 2^15]
    for top None (the top 16 bits), [1, 2^16 + 2] for the low 16 bits of bin `top`'s members (select.py's
    layout: the first and last bins, below and above the top bin, stay 0). For top WINDOWS, none: instead
    windows[i] (a select.Window) counts its runs' members by their low 16 bits (in its tables, one per thread)
    but its hot key, the elements above each run and those equal to its hot key (in `above`)."""
    T, n = len(xs), xs[0].numel()
    row = [h.data_ptr() + 8 * (top is not None) if h is not None else None for h, top in zip(hists, tops)]
    args = HistArgs(n=n, piece=PIECE, T=T, **_sources(b, xs),
                    top=_array(ctypes.c_int32, [-1 if t is None else t for t in tops]),
                    hist=_array(ctypes.c_void_p, row))
    per_thread = [args] * threads()
    if windows:
        args.win = _array(ctypes.c_int32, [v for w in windows for v in w.spans + [w.hot]])
        per_thread = []
        for r in range(threads()):
            a = HistArgs.from_buffer_copy(args)
            a.low = _array(ctypes.c_void_p, [w.low[r].data_ptr() for w in windows])
            above = torch.zeros(T, 3, dtype=torch.int64)
            a.above = ctypes.cast(above.data_ptr(), i64p)
            per_thread.append((a, above))
        _run(library().histogram, [a for a, _ in per_thread], n)
        for w, above in zip(windows, sum(above for _, above in per_thread)):
            w.above += above
        return
    _run(library().histogram, per_thread, n)


def _keep_bits(kept: torch.Tensor | None, n: int):
    """[T, ceil(n / 8)] uint8 keep bits (each row contiguous) as the C structs take them: a pointer per
    expert, or NULL."""
    if kept is None:
        return None
    assert kept.dtype == torch.uint8 and kept.stride(1) == 1 and kept.shape[1] == -(-n // 8), \
        "keep bits of another chunk"
    return _array(ctypes.c_void_p, [row.data_ptr() for row in kept])


def l1_sums(b, xs, *, offset: int, seeds: list[int], granule: int, density: list[float] | None = None,
            ranks: list[tuple[float, float]] | None = None, kept: torch.Tensor | None = None) -> torch.Tensor:
    """[2, T, granules] float64: per granule of the chunk, the sums of |d_i| and of |keep_i d_i| (DARE's
    mask at `density`; given `ranks`, each expert's (lo, step) of keep_rates, DELLA's at each element's
    rate, its row ranked in the pass, a row a granule, for the experts drawn: those of density < 1), as
    _blocks.granule_sums sums; and, given `kept` ([T, ceil(n / 8)] uint8, granule a multiple of 8), the
    keep bits drawn (bit k of byte j: element 8j + k) for delta_merge to read instead of drawing them
    again."""
    assert kept is None or granule % 8 == 0, "keep bits are written a byte per 8 elements"
    T, n = len(xs), xs[0].numel()
    assert ranks is None or n % granule == 0, "rows are ranked whole"
    granules = -(-n // granule)
    sums = torch.zeros(2, T, granules, dtype=torch.float64)
    held = [x.contiguous() for x in xs]
    args = MergeArgs(n=n, offset=offset, piece=max(1, PIECE // granule), T=T, trim=TRIMS["random"],
                     **_sources(b, held), p=_array(ctypes.c_float, _or(density, 1.0, T)), pj=_rates(None, T),
                     seeds=_array(ctypes.c_uint64, list(seeds)), granule=granule,
                     sums=ctypes.cast(sums.data_ptr(), f64p), keep_out=_keep_bits(kept, n),
                     ranks=_array(ctypes.c_float, [v for r in ranks for v in r]) if ranks else None)
    _run_groups(library().l1_sums, args, granules, granule, "sums over granules")
    return sums


def _run_groups(fn, args, groups: int, size: int, what: str) -> None:
    """fn over `groups` groups of `size` elements (args.piece groups at a time); MemoryError unless the
    threads report every group done (a thread whose scratch could not be allocated takes none)."""
    if groups and sum(_run(fn, [args] * threads(), groups * size)) != groups:
        raise MemoryError(f"no memory for {what} of {size} elements")


def fold_sums(v: torch.Tensor, granule: int) -> torch.Tensor:
    """_blocks.granule_sums of a contiguous float32 tensor, bit for bit."""
    n = v.numel()
    granules = -(-n // granule)
    out = torch.zeros(granules, dtype=torch.float64)
    args = FoldArgs(n=n, granule=granule, piece=max(1, PIECE // granule), v=ctypes.cast(v.data_ptr(), f32p),
                    out=ctypes.cast(out.data_ptr(), f64p))
    _run_groups(library().fold_sums, args, granules, granule, "sums over granules")
    return out


def widen_fp8(q: torch.Tensor, table: torch.Tensor, scales: torch.Tensor, cols: int) -> torch.Tensor:
    """table[q] * scales[row, column // (cols / scales' columns)] in float32 over the flat whole rows of q (bytes),
    bit for bit dequantize.block_rows' torch product: a gather and a multiply in AVX2 on the threads."""
    n, (rows, scols) = q.numel(), scales.shape
    out = torch.empty(n, dtype=torch.float32)
    assert q.dtype == torch.uint8 and q.is_contiguous() and scales.is_contiguous() and rows * cols == n
    args = WidenArgs(n=n, piece=PIECE, cols=cols, group=cols // scols, scols=scols, q=q.data_ptr(),
                     table=ctypes.cast(table.data_ptr(), f32p), scales=ctypes.cast(scales.data_ptr(), f32p),
                     out=ctypes.cast(out.data_ptr(), f32p))
    if n:
        _run(library().widen_fp8, [args] * threads(), n)
    return out


def uniforms(seed: int, start: int, n: int) -> torch.Tensor:
    """dare.uniform_ref(seed, arange(start, start + n)), bit for bit: Philox in AVX2 on the threads."""
    out = torch.empty(n, dtype=torch.float32)
    args = UniformArgs(seed=seed, start=start, n=n, piece=PIECE, out=ctypes.cast(out.data_ptr(), f32p))
    if n:
        _run(library().uniforms, [args] * threads(), n)
    return out


def philox_lanes(want: int = 0) -> int:
    """The lanes DARE's and DELLA's Philox draws run in: 16 (AVX-512F) where the CPU has them, else 8, the same
    bits either way; `want` 8 or 16 chooses (16 only where available), 0 asks."""
    return library().philox_lanes(want)


def keep_rates(b, x, m: int, lo: float, step: float) -> torch.Tensor:
    """della_magprune's p(j) = lo + step * r(j) over rows of m, r the stable ascending rank of |x - b| in
    its row / (m - 1), as float32, bit for bit; 8 rates of 1 lie past the end (delta_merge reads whole
    vectors, and merges a chunk's last few elements as a vector padded with zeros)."""
    n = x.numel()
    out = torch.empty(n + 8, dtype=torch.float32)
    out[n:] = 1.0
    args = RateArgs(rows=n // m, m=m, piece=max(1, PIECE // m), **_base(b), x=x.data_ptr(), x_dt=DTYPES[x.dtype],
                    lo=lo, step=step, out=ctypes.cast(out.data_ptr(), f32p))
    _run_groups(library().keep_rates, args, n // m, m, "the ranks of rows")
    return out[:n]


def tie_counts(b, xs):
    """Ranking.cuts' count and locate on a chunk's stored inputs: |x_i - b| in float32, as ranked."""
    def call(i: int, t: float, k: int) -> int:
        return library().ties(*_base(b).values(), xs[i].data_ptr(), DTYPES[xs[i].dtype], t, 0, xs[i].numel(), k)
    return (lambda i, t: call(i, t, 0)), call


def _or(values, default, T, kind=float):
    return [default if v is None else kind(v) for v in (values if values is not None else [None] * T)]
