"""Fused element-wise merges in Triton: each kernel reads the base and the T experts once, in
their stored dtype (converted to float32 in registers), and writes the merged chunk once, in the
output dtype. Imported only when the Triton backend is chosen (see kernels/__init__.py).

    d_i  = x_i - b                                  (no base: d_i = x_i, nothing added back)
    k_i  = band: in(lo_i) and not in(hi_i), in(t, pos) = [|d_i| > t or (|d_i| = t and j < pos)], j the
           chunk position (methods/ranking.py's Cuts)    random: [u_i < p_i], u_i = tl.rand(seed_i, offset + j)
    e_i  = w_i * kept_i      kept_i = band: k_i d_i (a dropped entry is 0 with d_i's sign);  random: g_i (k_i d_i)
    m    = elect none: sum_i e_i / div
           elect sum|count: s = sign(sum_i e_i) | sign(sum_i sign(e_i)) (0 -> +),
           m = sum_i agree_i e_i  (/ sum_i agree_i w_i for mean),  agree_i = [e_i s > 0]
    out  = b + scale * m, cast to out_dtype (round to nearest even)

The torch methods (methods/linear.py, ties.py, dare.py, breadcrumbs.py, masks.py) are the
references: every float operation here is theirs, in their order, so float32 results are
bit-identical on the interpreter. For a GPU, FMA contraction is off (enable_fp_fusion=False),
divisions round to nearest (div_rn) and nothing flushes subnormals, so the same should hold there
(compiled for sm_90 and its PTX read; not run on a GPU). Where a formula needs two passes over the
experts (election, TALL votes) the second repeats the first's loads, which the compiler reuses
(one vector load per input and thread in the PTX): each input is read once.
"""
import torch
import triton
import triton.language as tl

NUM_WARPS = 8
MAX_ELECT_EXPERTS = 32  # keep_i are packed in the bits of one int32 between the two passes

# the per-expert parameter table [len(ROWS), T]: weight, band bounds, keep rate, gain, TALL lambda
ROWS = ("w", "lo", "hi", "p", "g", "lam")
W = tl.constexpr(0)
LO = tl.constexpr(1)
HI = tl.constexpr(2)
P = tl.constexpr(3)
G = tl.constexpr(4)
LAM = tl.constexpr(5)
INF = tl.constexpr(float("inf"))
BAND = tl.constexpr(1)      # TRIM modes (0: none)
RANDOM = tl.constexpr(2)
COUNT = tl.constexpr(2)     # ELECT modes (0: none, 1: sum)
TRIMS = {"none": 0, "band": BAND.value, "random": RANDOM.value}
ELECTS = {"none": 0, "sum": 1, "count": COUNT.value}


@triton.jit
def _load_f32(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _delta(b, xs_ptr, i, offs, mask, DT: tl.constexpr, ALIGNED: tl.constexpr, HAS_BASE: tl.constexpr):
    # d_i = x_i - b, x_i read through the pointer table in its stored dtype
    x_ptr = tl.load(xs_ptr + i).to(tl.pointer_type(DT))
    if ALIGNED:
        x_ptr = tl.multiple_of(x_ptr, 16)   # a loaded pointer has unknown alignment: without this, no vector loads
    d = _load_f32(x_ptr, offs, mask)
    if HAS_BASE:
        d = d - b
    return d


@triton.jit
def _copysign(mag, x):
    # torch.copysign bit for bit (the sign of -0.0 and NaN included)
    mag_bits = mag.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    return (mag_bits | (x.to(tl.uint32, bitcast=True) & 0x80000000)).to(tl.float32, bitcast=True)


@triton.jit
def _keep(d, i, j, idx, seeds_ptr, pos_ptr, par_ptr, T: tl.constexpr, TRIM: tl.constexpr):
    keep = idx >= 0
    if TRIM == BAND:
        # _blocks.trim / band: in the kept set (lo_i) and not in the dropped one (hi_i); lo_i <= 0 or
        # hi_i = inf leaves that side open (NaN kept)
        lo = tl.load(par_ptr + LO * T + i)
        hi = tl.load(par_ptr + HI * T + i)
        a = tl.abs(d)
        # tl.where, not `(lo <= 0) | (...)`: the interpreter cannot `|` a scalar bool with a block
        kept = (a > lo) | ((a == lo) & (j < tl.load(pos_ptr + i)))
        dropped = (a > hi) | ((a == hi) & (j < tl.load(pos_ptr + T + i)))
        keep = tl.where(lo <= 0, True, kept) & tl.where(hi == INF, True, dropped == 0)
    elif TRIM == RANDOM:
        # methods.dare._kept: u < p, u = tl.rand(seed_i, offset + j); p >= 1 keeps all without Philox
        p = tl.load(par_ptr + P * T + i)
        if p < 1:
            keep = tl.rand(tl.load(seeds_ptr + i), idx) < p
    return keep


@triton.jit
def _term(d, keep, i, par_ptr, T: tl.constexpr, TRIM: tl.constexpr):
    # e_i = w_i * kept_i
    kept = d
    if TRIM == BAND:
        kept = _copysign(tl.where(keep, tl.abs(d), 0.0), d)          # threshold(|d|, ...).copysign_(d)
    elif TRIM == RANDOM:
        kept = d * keep.to(tl.float32) * tl.load(par_ptr + G * T + i)  # ([u < p] * d) * g
    return kept * tl.load(par_ptr + W * T + i)


@triton.jit
def _store(out_ptr, offs, y, mask):
    if out_ptr.dtype.element_ty == tl.bfloat16:
        # round to nearest even by hand: the interpreter's fp32 -> bf16 truncates (triton 3.9); NaN -> torch's 0x7FC0
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(y != y, 0x7FC0, bits)
        tl.store(out_ptr + offs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _disjoint(b, s, keeps, xs_ptr, par_ptr, offs, mask, den0, T: tl.constexpr, DT: tl.constexpr,
              ALIGNED: tl.constexpr, HAS_BASE: tl.constexpr, TRIM: tl.constexpr, MEAN: tl.constexpr):
    # _blocks.disjoint_merge: m = sum_i agree_i e_i (mean: / sum_i agree_i w_i, 0 -> den0)
    mag = tl.zeros(offs.shape, tl.float32)
    den = tl.zeros(offs.shape, tl.float32)
    for i in tl.static_range(T):
        d = _delta(b, xs_ptr, i, offs, mask, DT, ALIGNED, HAS_BASE)          # pass 1's loads, reused
        e = _term(d, ((keeps >> i) & 1) != 0, i, par_ptr, T, TRIM)
        a = e * s
        a = tl.where(a < 0, 0.0, a)                                          # relu(e * s)
        mag += a
        den += tl.where(a > 0, tl.load(par_ptr + W * T + i), 0.0)             # += w_i * sign(a)
    m = mag * s
    if MEAN:
        m = tl.div_rn(m, tl.where(den == 0, den0, den))
    return m


@triton.jit
def _delta_merge_kernel(out_ptr,      # *out_dtype [n]  the merged chunk
                        b_ptr,        # *float [n]      the base chunk (unused without HAS_BASE)
                        xs_ptr,       # *i64 [T]        data pointers of the experts' chunks, dtype DT
                        seeds_ptr,    # *i64 [T]        Philox seed per expert (TRIM random)
                        pos_ptr,      # *i64 [2, T]     band: tie positions of the lo and hi Cuts
                        par_ptr,      # *f32 [6, T]     w, lo, hi, p, g, lambda per expert (ROWS)
                        n,            # elements in the chunk
                        offset,       # element index of the chunk's first element in its tensor
                        div,          # f32: m = sum_i e_i / div (ELECT none)
                        scale,        # f32 lambda
                        den0,         # f32: the mean's divisor where no expert agrees
                        T: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr, HAS_BASE: tl.constexpr,
                        TRIM: tl.constexpr, ELECT: tl.constexpr, MEAN: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    b = 0.0
    if HAS_BASE:
        b = _load_f32(b_ptr, offs, mask)
    # total = sum_i e_i ('count': sum_i sign(e_i)); -0.0 is the exact additive identity, so this is
    # the reference's e_0 + e_1 + ... bit for bit, signed zeros included
    total = tl.full([BLOCK_SIZE], -0.0, tl.float32)
    keeps = tl.zeros([BLOCK_SIZE], tl.int32)       # keep_i in bit i: pass 2 does not redo Philox
    for i in tl.static_range(T):
        d = _delta(b, xs_ptr, i, offs, mask, DT, ALIGNED, HAS_BASE)
        keep = _keep(d, i, offs, offset + offs, seeds_ptr, pos_ptr, par_ptr, T, TRIM)
        e = _term(d, keep, i, par_ptr, T, TRIM)
        if ELECT == COUNT:
            e = (e > 0).to(tl.float32) - (e < 0).to(tl.float32)           # torch.sign: 0 for 0 and NaN
        total += e
        keeps |= keep.to(tl.int32) << i
    if ELECT == 0:
        m = tl.div_rn(total, div)
    else:
        s = _copysign(tl.full([BLOCK_SIZE], 1.0, tl.float32), total)       # _blocks.elect
        m = _disjoint(b, s, keeps, xs_ptr, par_ptr, offs, mask, den0, T, DT, ALIGNED, HAS_BASE, TRIM, MEAN)
    y = m * scale
    if HAS_BASE:
        y = b + y
    _store(out_ptr, offs, y, mask)


@triton.jit
def _stitch_kernel(out_ptr,   # *out_dtype [n]
                   b_ptr,     # *float [n]
                   xs_ptr,    # *i64 [T] data pointers, dtype DT
                   pos_ptr,   # *i64 [T] tie positions of the Cuts
                   par_ptr,   # *f32 [6, T] (row LO: t_i)
                   n, T: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    b = _load_f32(b_ptr, offs, mask)
    total = tl.zeros([BLOCK_SIZE], tl.float32)
    count = tl.zeros([BLOCK_SIZE], tl.float32)
    for i in tl.static_range(T):
        d = _delta(b, xs_ptr, i, offs, mask, DT, ALIGNED, True)
        t, a = tl.load(par_ptr + LO * T + i), tl.abs(d)
        m = ((a > t) | ((a == t) & (offs < tl.load(pos_ptr + i)))).to(tl.float32)   # m_i: d_i in the Cut
        total += d * m
        count += m
    # out = b + sum_i m_i d_i / max(1, sum_i m_i)
    _store(out_ptr, offs, tl.div_rn(total, tl.maximum(count, 1.0)) + b, mask)


@triton.jit
def _tall_kernel(out_ptr,   # *out_dtype [n]
                 b_ptr,     # *float [n]
                 xs_ptr,    # *i64 [T] data pointers, dtype DT
                 par_ptr,   # *f32 [6, T] (rows W, LAM)
                 n, k, scale, T: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    b = _load_f32(b_ptr, offs, mask)
    tau = tl.full([BLOCK_SIZE], -0.0, tl.float32)                          # tau = sum_i w_i d_i
    for i in tl.static_range(T):
        tau += _delta(b, xs_ptr, i, offs, mask, DT, ALIGNED, True) * tl.load(par_ptr + W * T + i)
    votes = tl.zeros([BLOCK_SIZE], tl.int32)
    for i in tl.static_range(T):
        e = _delta(b, xs_ptr, i, offs, mask, DT, ALIGNED, True) * tl.load(par_ptr + W * T + i)   # loads reused
        votes += (tl.abs(e) >= tl.load(par_ptr + LAM * T + i) * tl.abs(tau - e)).to(tl.int32)
    # out = b + scale * tau * [votes >= k]
    _store(out_ptr, offs, tau * (votes >= k).to(tl.float32) * scale + b, mask)


def _flat(t: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if not t.is_floating_point():
        raise ValueError(f"{what} has dtype {t.dtype}; the fused merges take floating tensors")
    if not t.is_contiguous() or t.numel() != n:
        raise ValueError(f"{what} must be contiguous with {n} elements (it has {t.numel()}, "
                         f"contiguous={t.is_contiguous()})")
    return t.view(-1)


def _inputs(b, xs: list[torch.Tensor]):
    """(b flat, xs flat in one dtype, the experts' triton dtype, whether all are 16-byte aligned)."""
    n, device = xs[0].numel(), xs[0].device
    if any(x.device != device for x in xs) or (b is not None and b.device != device):
        raise ValueError("the base and the experts must be on one device")
    xs = [_flat(x, n, f"expert {i}") for i, x in enumerate(xs)]
    if len({x.dtype for x in xs}) > 1:      # one pointer type for the table: the odd ones widened
        xs = [x.float() for x in xs]
    b = _flat(b, n, "base") if b is not None else None
    dt = getattr(tl, str(xs[0].dtype).removeprefix("torch."))
    return b, xs, dt, all(x.data_ptr() % 16 == 0 for x in xs)


def _tables(xs, device, seeds=None, positions=(), **rows):
    """The int64 table (data pointers, seeds, then the position rows given) and the [6, T] float32
    parameter table (ROWS), each moved to the device in one copy; a row not given is 0."""
    T = len(xs)
    ptrs = torch.tensor([x.data_ptr() for x in xs] + list(seeds or [0] * T) + [p for row in positions for p in row],
                        dtype=torch.int64)
    par = torch.tensor([list(rows.get(r, [0.0] * T)) for r in ROWS], dtype=torch.float32)
    if device.type == "cuda":   # from pinned memory, asynchronously: a pageable copy would wait for the device
        return ptrs.pin_memory().to(device, non_blocking=True), par.pin_memory().to(device, non_blocking=True)
    return ptrs, par


def block_size(T: int) -> int:
    """Elements per program: 4 per thread (one 128-bit load of fp32) up to 8 experts, fewer beyond.
    Registers, from ptxas for sm_90 (not run on a GPU): DARE-TIES with 8 fp32 experts uses 127 at 4
    elements per thread, 234 at 8 (one block of 8 warps per SM); 16 experts spill at 4."""
    return NUM_WARPS * 32 * (4 if T <= 8 else 2 if T <= 16 else 1)


def _launch(kernel, n, T, *args, **constexprs):
    block = block_size(T)
    kernel[(triton.cdiv(n, block),)](*args, T=T, BLOCK_SIZE=block, num_warps=NUM_WARPS, enable_fp_fusion=False,
                                     **constexprs)


def _ints(values, default, T):
    return [default if v is None else int(v) for v in (values if values is not None else [None] * T)]


def _or(values, default, T):
    """A per-expert list with None (a missing list or entry) replaced by default."""
    return [default if v is None else float(v) for v in (values if values is not None else [None] * T)]


ALL_TIES = 1 << 62   # a position past any chunk: every tie in the set


def delta_merge(b, xs, *, weights, scale, div=1.0, trim="none", lo=None, hi=None, lo_pos=None, hi_pos=None,
                density=None, seeds=None, gain=None, offset=0, elect="none", aggregate="mean",
                out_dtype=torch.float32) -> torch.Tensor:
    """The task-arithmetic family in one pass: out = b + scale * m (module docstring for m).

    Args:
        b: the base chunk (any float dtype), or None: d_i = x_i and nothing is added back.
        xs: the experts' chunks, each with b's number of elements (one dtype, else widened to float32).
        weights: w_i.  scale: lambda.  div: m's divisor without election (sum of w_i to normalize).
        trim: 'none', 'band' (in the Cut (lo_i, lo_pos_i) and not in (hi_i, hi_pos_i); a None list or
            entry: 0 / inf, every tie / none) or 'random' (keep u_i < density_i, u_i = tl.rand(seeds[i],
            offset + j), times gain_i, default 1).
        elect: 'none', 'sum' (sign by mass) or 'count' (by vote); aggregate: 'mean' or 'sum'.
        out_dtype: the dtype written, rounded to nearest even.
    Returns:
        a flat tensor of out_dtype on the experts' device.
    Example:
        >>> delta_merge(b, [x1, x2], weights=[1., 1.], scale=1., trim="band", lo=[t1, t2], elect="sum")
    """
    if trim not in TRIMS or elect not in ELECTS or aggregate not in ("mean", "sum"):
        raise ValueError(f"delta_merge: trim={trim!r}, elect={elect!r}, aggregate={aggregate!r} not understood")
    T = len(xs)
    if elect != "none" and T > MAX_ELECT_EXPERTS:
        raise ValueError(f"delta_merge elects signs of at most {MAX_ELECT_EXPERTS} experts; {T} given")
    b, xs, dt, aligned = _inputs(b, xs)
    n, device = xs[0].numel(), xs[0].device
    out = torch.empty(n, dtype=out_dtype, device=device)
    if n == 0:
        return out
    w = [float(v) for v in weights]
    positions = [_ints(lo_pos, ALL_TIES, T), _ints(hi_pos, 0, T)]
    ptrs, par = _tables(xs, device, seeds, positions, w=w, lo=_or(lo, 0.0, T), hi=_or(hi, float("inf"), T),
                        p=_or(density, 1.0, T), g=_or(gain, 1.0, T))
    den0 = min(w) if min(w) > 0 else 1.0    # _blocks.disjoint_merge: clamp(min=min w), or 0 -> 1
    _launch(_delta_merge_kernel, n, T, out, b, ptrs[:T], ptrs[T:2 * T], ptrs[2 * T:], par, n, offset, float(div),
            float(scale), den0,
            DT=dt, ALIGNED=aligned, HAS_BASE=b is not None, TRIM=TRIMS[trim], ELECT=ELECTS[elect],
            MEAN=aggregate == "mean")
    return out


def masked_stitch(b, xs, *, lo, lo_pos=None, out_dtype=torch.float32) -> torch.Tensor:
    """Dataless Localize-and-Stitch: out = b + sum_i m_i d_i / max(1, sum_i m_i), m_i = d_i in the Cut
    (lo_i, lo_pos_i) (lo_i None or 0: every entry). Flat out_dtype result.

    Example:
        >>> masked_stitch(b, [x1, x2], lo=[t1, None], out_dtype=torch.bfloat16)
    """
    b, xs, dt, aligned = _inputs(b, xs)
    n, device = xs[0].numel(), xs[0].device
    out = torch.empty(n, dtype=out_dtype, device=device)
    if n:
        T = len(xs)
        ptrs, par = _tables(xs, device, None, [_ints(lo_pos, ALL_TIES, T)], lo=_or(lo, 0.0, T))
        _launch(_stitch_kernel, n, T, out, b, ptrs[:T], ptrs[2 * T:], par, n, DT=dt, ALIGNED=aligned)
    return out


def tall_merge(b, xs, *, weights, tall_lambda, k, scale, out_dtype=torch.float32) -> torch.Tensor:
    """Consensus merging with TALL masks over task arithmetic: e_i = w_i d_i, tau = sum_i e_i,
    votes = sum_i [|e_i| >= lambda_i |tau - e_i|], out = b + scale * tau * [votes >= k].

    Example:
        >>> tall_merge(b, [x1, x2, x3], weights=[1.] * 3, tall_lambda=[0.2] * 3, k=2, scale=1.)
    """
    b, xs, dt, aligned = _inputs(b, xs)
    n, device = xs[0].numel(), xs[0].device
    out = torch.empty(n, dtype=out_dtype, device=device)
    if n:
        ptrs, par = _tables(xs, device, w=[float(v) for v in weights], lam=[float(v) for v in tall_lambda])
        _launch(_tall_kernel, n, len(xs), out, b, ptrs[:len(xs)], par, n, int(k), float(scale), DT=dt, ALIGNED=aligned)
    return out
