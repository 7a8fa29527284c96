"""The compiled CPU loops (kernels/cpu_merge.c through kernels/cpu.py) against plain torch: every fused
method's merge bit for bit with its torch method, on one thread and several, at odd sizes and offsets;
the radix histograms against torch.bincount, exact k-th values in one pass against a sort; tie counts
and positions, DELLA's keep rates and the Philox uniforms (in 8 lanes and in AVX-512's 16) against
references written here; the non-finite counts; the fallback when the
library is missing; cpu.py's ctypes mirrors of the C argument structs against the layout the C file
compiled. (Whole merges, compiled against torch, byte for byte: test_all_methods.py and
test_exact_density.py.)"""
import ctypes

import pytest
import torch

from mbmerge import kernels, methods
from mbmerge.kernels import cpu
from mbmerge.kernels.dare import uniform_ref
from mbmerge.kernels.select import HI_BINS, INF_BIN, LO_BINS, Kth, kth_largest_abs_ranked
from mbmerge.methods._blocks import granule_sums
from mbmerge.methods.ranking import Rank, Ranking, bounds

pytestmark = pytest.mark.skipif(cpu.library() is None, reason="the compiled CPU kernels are not built here")

FUSED = [n for n, m in methods.REGISTRY.items() if m.fused is not None and n not in ("localize_stitch", "consensus")]
BIG = 3 * cpu.PIECE + 13          # several pieces: the threads share the chunk
CASES = [  # (experts, rows, row length, input dtype, output dtype)
    (1, 1, 1, torch.float32, torch.float32),
    (2, 7, 143, torch.bfloat16, torch.bfloat16),    # 1001 elements: a vector's tail
    (3, 5, 1000, torch.float16, torch.float32),
    (3, 3, 1000, torch.float32, torch.bfloat16),
    (5, 4, 700, torch.bfloat16, torch.float16),
    (2, 1, BIG, torch.bfloat16, torch.bfloat16),
    (3, 97, 1013, torch.bfloat16, torch.float32),   # 98,261 elements in rows
]
OFFSET = 2**32 - 3000   # the chunk's place in its tensor: Philox counters cross into the second word


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request, monkeypatch):
    monkeypatch.setattr(cpu, "threads", lambda: request.param)
    return request.param


@pytest.fixture(params=[8, 16], ids=["philox-8-lanes", "philox-16-lanes"])
def lanes(request):
    """Philox draws in AVX2's 8 lanes or AVX-512F's 16 (skipped where the CPU lacks it), then as before."""
    before = cpu.philox_lanes()
    if cpu.philox_lanes(request.param) != request.param:
        cpu.philox_lanes(before)
        pytest.skip("this CPU lacks AVX-512F")
    yield request.param
    cpu.philox_lanes(before)


def bf16_deltas(n: int, T: int, dtype, seed: int = 0):
    """b and T experts: deltas of a few rounding steps (|d| ties massively) plus sparse larger ones."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, generator=g) * 0.05
    xs = []
    for _ in range(T):
        d = torch.randint(-3, 4, (n,), generator=g) * b.abs() * 2 ** -7
        d += (torch.rand(n, generator=g) < 0.05) * torch.randn(n, generator=g) * 2e-2
        xs.append(b + d)
    return b.to(dtype), [x.to(dtype) for x in xs]


def params_for(name: str, T: int, case: int) -> dict:
    """A zero weight in even cases, both elections and aggregations, every rescale, rho = 1 for one expert,
    model_stock per row in odd cases."""
    w = [1.0, 0.0, 0.5, 2.0, 0.7][:T] if case % 2 == 0 else [0.6 + 0.1 * i for i in range(T)]
    given = dict(weights=w, scale=[1.0, 0.7, 1.3][case % 3], consensus=["sum", "count"][case % 2],
                 aggregate=["mean", "sum"][case // 2 % 2], normalize=case % 2 == 0,
                 rescale=["inverse", "l1", "none"][case % 3], seed=case, gamma=0.05, epsilon=0.1,
                 density=[0.3, 1.0, 0.5, 0.9, 0.2][:T], filter_wise=case % 2 == 1)
    names = {p.name for p in methods.get(name).params}
    return {k: v for k, v in given.items() if k in names}


def merged(name, b, xs, params, shape, out_dtype, impl):
    """One chunk through dispatch (reductions, then merge_chunk) with the kernel choice impl: the
    compiled loops on the stored dtypes, or the torch method on float32 copies, cast to out_dtype."""
    method = methods.get(name)
    p = methods.resolve_params(method, len(xs), params)
    bf, xf = b.float(), [x.float() for x in xs]
    with kernels.using(impl):
        reduced = methods.reductions(method, p, lambda: [(bf, xf, OFFSET)], "layer.w", shape)
        if impl == "torch":
            b, xs = bf, xf
        out, bad = methods.merge_chunk(method, p, reduced, b, xs, OFFSET, "layer.w", shape, out_dtype)
    return out.to(out_dtype), bad


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("name", FUSED)
def test_compiled_merge_is_the_torch_methods_bit_for_bit(threads, name, case):
    T, rows, m, dtype, out_dtype = CASES[case]
    method = methods.get(name)
    T = min(max(T, method.min_experts), method.max_experts or T + method.min_experts)   # slerp takes 1 expert
    b, xs = bf16_deltas(rows * m, T, dtype, seed=case)
    params, shape = params_for(name, T, case), (rows, m)
    got, bad = merged(name, b, xs, params, shape, out_dtype, "auto")
    want, _ = merged(name, b, xs, params, shape, out_dtype, "torch")
    assert bad == [0] * (T + 2), "the compiled loops did not run, or counted finite values"
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("case", [1, 5, 6])
@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_draws_in_either_lane_width_are_the_torch_methods(threads, lanes, name, case):
    test_compiled_merge_is_the_torch_methods_bit_for_bit(threads, name, case)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_the_l1_pass_hands_its_keep_bits_to_the_merge(threads, lanes, name):
    """Under the L1 rescale the merge reads the bits the norm pass drew: the same bytes as the torch
    method, which draws them again, over a tensor of three chunks (the last one short)."""
    rows, m = 9, 1000
    b, xs = bf16_deltas(rows * m, 2, torch.bfloat16, seed=5)
    method, shape = methods.get(name), (rows, m)
    p = methods.resolve_params(method, 2, {**params_for(name, 2, 1), "rescale": "l1"})
    cuts = [(0, 4000), (4000, 8000), (8000, 9000)]
    out = {}
    for impl in ("auto", "torch"):
        with kernels.using(impl):
            pick = (lambda t: t) if impl == "auto" else (lambda t: t.float())
            chunks = lambda: [(pick(b[a:z]), [pick(x[a:z]) for x in xs], a) for a, z in cuts]  # noqa: E731
            reduced = methods.reductions(method, p, chunks, "layer.w", shape)
            assert (sorted(reduced["kept"]) == [0, 4000, 8000]) == (impl == "auto")
            out[impl] = torch.cat([methods.merge_chunk(method, p, reduced, cb, cxs, a, "layer.w", shape,
                                                       torch.bfloat16)[0].to(torch.bfloat16)
                                   for cb, cxs, a in chunks()])
    assert torch.equal(out["auto"].view(torch.int16), out["torch"].view(torch.int16))
    reduced = methods.reductions(method, p, lambda: [(b, xs, 0)], "layer.w", shape)   # one chunk, then all kept:
    reduced["kept"][0].fill_(255)
    everything = methods.merge_chunk(method, p, reduced, b, xs, 0, "layer.w", shape, torch.bfloat16)[0]
    assert not torch.equal(everything, out["auto"])        # the merge read the bits, not its own draws


def test_a_chunk_split_across_threads_gives_the_same_bytes():
    b, xs = bf16_deltas(BIG, 3, torch.bfloat16, seed=9)
    runs = []
    for n in (1, 2, 5):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cpu, "threads", lambda n=n: n)
            runs.append(merged("dare_ties", b, xs, params_for("dare_ties", 3, 1), (BIG,), torch.bfloat16, "auto")[0])
    assert all(torch.equal(r.view(torch.int16), runs[0].view(torch.int16)) for r in runs[1:])


def special_values(n: int, seed: int) -> torch.Tensor:
    """Deltas plus zeros of both signs, subnormals, Inf and NaN."""
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 1e-3
    specials = torch.tensor([0.0, -0.0, 1e-40, -3e-41, float("inf"), -float("inf"), float("nan"), -float("nan")])
    v[:min(n, 8)] = specials[:min(n, 8)]
    return v


def keys(v: torch.Tensor, top: int | None) -> torch.Tensor:
    """The radix keys, plainly: the top 16 bits of |v|'s float32 bits, or the low 16 bits of the members
    of bin `top`, shifted by one (select.py's [below, 65536 keys, above] layout)."""
    bits = v.float().abs().view(torch.int32).to(torch.int64)
    if top is None:
        return bits >> 16
    hi = bits >> 16
    return torch.where(hi < top, 0, torch.where(hi > top, LO_BINS + 1, (bits & 0xFFFF) + 1))


@pytest.mark.parametrize("n", [1, 7, 4095, BIG])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16), (None, torch.bfloat16)])
def test_histograms_equal_bincount(threads, n, dtypes):
    bd, xd = dtypes
    x = special_values(n, n).to(xd)
    b = (torch.randn(n, generator=torch.Generator().manual_seed(1)) * 1e-3).to(bd) if bd else None
    v = x.float() - b.float() if b is not None else x.float()
    top_bins = [None, 0, int(keys(v, None)[v.isfinite()][-1]), 0x7F7F]    # the engine ranks finite bins alone
    hists = [torch.zeros(1, HI_BINS if t is None else LO_BINS + 2, dtype=torch.int64) for t in top_bins]
    cpu.histograms(hists, b, [x] * len(top_bins), top_bins)
    cpu.histograms(hists, b, [x] * len(top_bins), top_bins)             # adds to what is there
    nan = INF_BIN + 1         # NaNs rank above Inf whatever their payload (torch and F16C widen fp16 NaNs apart)
    for h, top in zip(hists, top_bins):
        want = torch.bincount(keys(v, top), minlength=h.shape[1])
        if top is not None:
            want[0] = want[-1] = 0                       # only the bin's members are counted
        else:
            want[nan], got = want[nan:].sum(), h[0].clone()
            want[nan + 1:], got[nan], got[nan + 1:] = 0, got[nan:].sum(), 0
            h = got[None]
        assert torch.equal(h[0], 2 * want), top


@pytest.mark.parametrize("with_base", [True, False])
def test_tie_counts_and_positions(with_base):
    g = torch.Generator().manual_seed(2)
    for n in (0, 1, 9, 100, 1001):
        b = (torch.randint(-3, 4, (n,), generator=g) * 0.5).bfloat16() if with_base else None
        x = (torch.randint(-3, 4, (n,), generator=g) * 0.5).half()
        mag = (x.float() - b.float()).abs() if with_base else x.float().abs()
        count, locate = cpu.tie_counts(b, [x])
        for t in (0.0, 1.0, 2.5):
            where = [j for j in range(n) if float(mag[j]) == t]
            assert count(0, t) == len(where)
            assert [locate(0, t, k) for k in range(1, len(where) + 2)] == [j + 1 for j in where] + [-1]


def test_ranks_cut_tied_entries_in_visiting_order_on_the_compiled_path():
    """A Ranking fed by the compiled counts keeps exactly k, the first ties by flat index."""
    b, xs = bf16_deltas(BIG, 1, torch.bfloat16, seed=4)
    mag = (xs[0].float() - b.float()).abs()
    k = BIG // 5
    chunks = lambda: iter([(b[a:a + 10_000], [xs[0][a:a + 10_000]]) for a in range(0, BIG, 10_000)])  # noqa: E731
    ranking = Ranking(bounds([[Rank(k)]], chunks, BIG, keep_ties=False))
    kept = []
    for cb, cx in chunks():
        cut = ranking.cuts(cx[0].numel(), *cpu.tie_counts(cb, cx))[0][0]
        kept.append(cut.mask((cx[0].float() - cb.float()).abs()))
    order = sorted(range(BIG), key=lambda j: (-float(mag[j]), j))[:k]     # a stable sort by (-|d|, index)
    want = torch.zeros(BIG, dtype=torch.bool)
    want[order] = True
    assert torch.equal(torch.cat(kept), want)


def sorted_kth(b, x, k: int) -> Kth:
    """The k-th largest |x - b| (float32) by a full sort of the bit patterns, with its rank among its ties."""
    bits = torch.sort((x.float() - b.float()).abs().view(torch.int32), descending=True).values
    v = int(bits[k - 1])
    return Kth(float(torch.tensor(v, dtype=torch.int32).view(torch.float32)), k - int((bits > v).sum()),
               int((bits == v).sum()))


def streamed(b, xs, chunk: int, reads: list):
    """chunks() of (b, xs) `chunk` elements at a time; each call (a pass over the data) noted in `reads`."""
    def chunks():
        reads.append(1)
        return ((b[a:a + chunk], [x[a:a + chunk] for x in xs]) for a in range(0, b.numel(), chunk))
    return chunks


N_KTH = 1_000_003


def kth_inputs(dtype, seed=0):
    """A base and two experts whose deltas are one bf16 ulp of the base for a sixth of the elements (the
    crowding onto single values of real bf16 fine-tunes), else spread."""
    g = torch.Generator().manual_seed(seed)
    b = (0.02 * torch.randn(N_KTH, generator=g)).to(dtype)
    xs = []
    for _ in range(2):
        d = 0.002 * torch.randn(N_KTH, generator=g)
        ulp = (b.float().abs().view(torch.int32) & 0x7F800000).view(torch.float32) / 128
        one_ulp = torch.rand(N_KTH, generator=g) < 1 / 6
        xs.append(torch.where(one_ulp, b.float() + ulp, b.float() + d).to(dtype))
    return b, xs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ks", [[[N_KTH // 5], [N_KTH // 3]], [[N_KTH // 10, N_KTH // 4], [N_KTH // 2]],
                                [[N_KTH // 5, N_KTH // 5 + 1000], [N_KTH // 3]]], ids=["one-k", "two-ks", "near-ks"])
@pytest.mark.parametrize("chunk", [1 << 18, N_KTH], ids=["chunks", "one-chunk"])
def test_kth_in_one_pass_equals_a_sort(threads, dtype, ks, chunk):
    b, xs = kth_inputs(dtype)
    reads = []
    got = kth_largest_abs_ranked(streamed(b, xs, chunk, reads), ks, N_KTH)
    assert got == [[sorted_kth(b, x, k) for k in series] for x, series in zip(xs, ks)]
    assert len(reads) == 1                              # the windows held every k: no second pass


@pytest.mark.parametrize("case", ["first chunk unlike the rest", "three ks", "the top few", "NaN at the top"])
def test_kth_where_one_pass_cannot_say_equals_a_sort(threads, case):
    b, xs = kth_inputs(torch.bfloat16, seed=1)
    ks = [[N_KTH // 5], [N_KTH // 5]]
    if case == "first chunk unlike the rest":
        xs[0][:1 << 18] = b[:1 << 18]                    # no change at all in the first chunk
    elif case == "three ks":
        ks = [[10, N_KTH // 5, N_KTH // 2], [N_KTH // 5]]
    elif case == "the top few":
        ks = [[3], [1, 2]]
    else:
        xs[1][5 * N_KTH // 6:] = float("nan")           # past the first chunk: it looks finite
        ks = [[N_KTH // 5], [N_KTH // 10]]
    got = kth_largest_abs_ranked(streamed(b, xs, 1 << 18, []), ks, N_KTH)
    want = [[sorted_kth(b, x, k) for k in series] for x, series in zip(xs, ks)]
    if case == "NaN at the top":                        # the k-th largest is NaN: radix select says +inf
        want[1] = [Kth(float("inf"), 0, 0)]
    assert got == want


@pytest.mark.parametrize("m", [1, 2, 7, 300])
def test_keep_rates_rank_each_row_stably(threads, m):
    rows, lo, step = 40, 0.05, 0.3
    g = torch.Generator().manual_seed(m)
    b = torch.randn(rows * m, generator=g).bfloat16()
    x = (b.float() + torch.randint(-2, 3, (rows * m,), generator=g) * 0.01).bfloat16()
    x[3] = float("nan")
    assert_ranked_stably(b, x, m, lo, step)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_keep_rates_of_deltas_varying_in_every_bit(threads, dtype):
    """Keys varying in 8 to 31 bits: one to three radix passes of up to 11-bit digits."""
    rows, m = 12, 1001
    g = torch.Generator().manual_seed(5)
    decades = torch.linspace(0, 5 if dtype == torch.float16 else 60, rows).repeat_interleave(m)   # per row
    x = (torch.randn(rows * m, generator=g) * 10 ** (3 - decades * torch.rand(rows * m, generator=g))).to(dtype)
    x[:m] = 0.5                                         # a row of equal keys: ranks by position
    assert_ranked_stably(None, x, m, 0.1, 0.5)          # no base: x is the delta


def assert_ranked_stably(b, x, m: int, lo: float, step: float):
    got = cpu.keep_rates(b, x, m, lo, step)
    assert torch.equal(got.view(torch.int32), ref_rates(b, x, m, lo, step).view(torch.int32))


def ref_rates(b, x, m: int, lo: float, step: float) -> torch.Tensor:
    """DELLA's keep rates by a plain sort of each row."""
    rows = x.numel() // m
    a = (x.float() - (b.float() if b is not None else 0)).abs().view(rows, m).tolist()
    ranks = []
    for row in a:   # ascending |d|, ties by position, NaN last
        order = sorted(range(m), key=lambda j: (row[j] != row[j], row[j] if row[j] == row[j] else 0.0, j))
        rank = [0] * m
        for r, j in enumerate(order):
            rank[j] = r
        ranks += rank
    r = torch.full((rows * m,), 0.5) if m == 1 else torch.tensor(ranks, dtype=torch.float32) / (m - 1)
    return r * step + lo


def folded(v: list[float]) -> float:
    """A granule's sum as _blocks.granule_sums defines it, plainly: zero-padded to a power of two, then
    the upper half added to the lower, in float64 (Python floats)."""
    width = 1 << (len(v) - 1).bit_length()
    v = v + [0.0] * (width - len(v))
    while len(v) > 1:
        v = [a + b for a, b in zip(v[:len(v) // 2], v[len(v) // 2:])]
    return v[0]


@pytest.mark.parametrize("granule,n", [(4096, 2 * 4096 + 77), (300, 900), (5, 23), (1, 3)])
def test_l1_sums_are_folded_sums_of_the_deltas_and_the_kept_deltas(threads, granule, n):
    b, xs = bf16_deltas(n, 2, torch.bfloat16, seed=n)
    got = cpu.l1_sums(b, xs, offset=OFFSET, seeds=[11, 12], granule=granule, density=[0.3, 0.8])
    for i, x in enumerate(xs):
        d = x.float() - b.float()
        u = uniform_ref([11, 12][i], torch.arange(OFFSET, OFFSET + n))
        kept = torch.where(u < [0.3, 0.8][i], d, 0.0)
        for g in range(-(-n // granule)):
            part = slice(g * granule, (g + 1) * granule)
            assert got[0, i, g].item() == folded(d[part].abs().double().tolist())
            assert got[1, i, g].item() == folded(kept[part].abs().double().tolist())
    assert torch.equal(got[0, 0], granule_sums((xs[0].float() - b.float()).abs(), granule))


@pytest.mark.parametrize("m,rows", [(1000, 5), (37, 30), (8, 3), (1, 12)])
def test_l1_sums_rank_della_rows_in_the_pass(threads, m, rows):
    """Given each expert's (lo, step), the drawn experts' rows are ranked as the pass goes: the sums and
    the keep bits of DELLA's rates from a plain sort (expert 1 of density 1 is not drawn)."""
    n = m * rows
    b, xs = bf16_deltas(n, 2, torch.bfloat16, seed=m)
    kept = torch.zeros(2, -(-n // 8), dtype=torch.uint8) if m % 8 == 0 else None
    got = cpu.l1_sums(b, xs, offset=OFFSET, seeds=[11, 12], granule=m, density=[0.4, 1.0],
                      ranks=[(0.2, 0.4), (0.9, 0.2)], kept=kept)
    for i, x in enumerate(xs):
        d = x.float() - b.float()
        u = uniform_ref([11, 12][i], torch.arange(OFFSET, OFFSET + n))
        keep = u < ref_rates(b, x, m, 0.2, 0.4) if i == 0 else torch.ones(n, dtype=torch.bool)
        for g in range(rows):
            part = slice(g * m, (g + 1) * m)
            assert got[0, i, g].item() == folded(d[part].abs().double().tolist())
            assert got[1, i, g].item() == folded(torch.where(keep, d, 0.0)[part].abs().double().tolist())
        if kept is not None:
            bits = torch.tensor([sum(int(keep[8 * j + k]) << k for k in range(8)) for j in range(n // 8)],
                                dtype=torch.uint8)
            assert torch.equal(kept[i], bits)


@pytest.mark.parametrize("granule,n", [(4096, 2 * 4096 + 77), (1013, 3 * 1013), (5, 23)])
@pytest.mark.parametrize("with_base", [True, False])
def test_product_sums_are_folded_sums_of_the_products(threads, granule, n, with_base):
    b, xs = bf16_deltas(n, 3, torch.bfloat16, seed=n)
    b = b if with_base else None
    pairs = [(0, 0), (0, 2), (1, 2), (2, 2)]
    got = cpu.product_sums(b, xs, pairs, granule)
    ds = [x.float() - b.float() if b is not None else x.float() for x in xs]
    for k, (i, j) in enumerate(pairs):
        for g in range(-(-n // granule)):
            part = slice(g * granule, (g + 1) * granule)
            assert got[k, g].item() == folded((ds[i][part] * ds[j][part]).double().tolist())


@pytest.mark.parametrize("granule,n", [(4096, 3 * 4096 + 5), (1000, 2000), (3, 7)])
def test_granule_sums_compiled_and_in_torch_are_the_plain_fold(threads, granule, n):
    v = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 10.0 ** torch.randint(-8, 3, (n,))
    want = torch.tensor([folded(v[g:g + granule].double().tolist()) for g in range(0, n, granule)], dtype=torch.float64)
    assert torch.equal(cpu.fold_sums(v, granule), want)
    with kernels.using("torch"):
        assert torch.equal(granule_sums(v, granule), want)


def test_uniforms_are_philox_bit_for_bit(threads, lanes):
    for seed, start, n in [(12345, 2**32 - 70_000, BIG), (2**62 + 1, 5, 13), (7, 0, 0)]:
        got = cpu.uniforms(seed, start, n)
        assert torch.equal(got.view(torch.int32), uniform_ref(seed, torch.arange(start, start + n)).view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_widening_is_the_torch_product_bit_for_bit(threads, dtype):
    """Every byte (NaNs included) times its row's scale of its group of columns, as q.float() * scale."""
    for rows, cols, group in [(3, 1000, 200), (1, 7, 7), (BIG // 256, 256, 128)]:
        q = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(cols))
        scales = torch.rand(rows, cols // group) * 2.0 ** torch.randint(-20, 20, (rows, cols // group))
        want = (q.view(dtype).float().view(rows, -1, group) * scales[:, :, None]).view(-1)
        table = torch.arange(256, dtype=torch.uint8).view(dtype).float()
        got = cpu.widen_fp8(q.view(-1), table, scales, cols)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_non_finite_values_are_counted_where_they_are():
    n = 5000
    b, xs = bf16_deltas(n, 3, torch.bfloat16)
    b[17] = float("nan")
    xs[2][4000] = float("inf")
    out, bad = cpu.delta_merge(b, xs, weights=[1.0] * 3, scale=1.0)
    assert bad[1] > 0 and bad[2] == bad[3] == 0 and bad[4] > 0 and bad[0] > 0     # [out, base, e0, e1, e2]
    assert out[17].isnan() and out[4000].isinf() and out[:16].isfinite().all()
    out, bad = cpu.mix(b, xs, t=torch.tensor([0.4]), u=torch.tensor([0.6]), row=n)     # model_stock
    assert bad[1] > 0 and bad[2] == bad[3] == 0 and bad[4] > 0 and bad[0] > 0
    assert out[17].isnan() and out[4000].isinf() and out[:16].isfinite().all()
    big = torch.full((100,), 3e38)                        # finite float32, Inf once cast to bf16 or summed
    _, bad = cpu.delta_merge(None, [big, big], weights=[1.0, 1.0], scale=1.0, out_dtype=torch.bfloat16)
    assert bad[0] > 0 and bad[1:] == [0, 0, 0]


def compiled_layout() -> dict[str, tuple[int, list[tuple[str, int, int, str]]]]:
    """cpu_merge.c's argument structs as compiled (its arg_layout): name -> (size, [(field, offset, size,
    kind)] in declaration order), kind i or u (a signed or unsigned integer), f (a float) or p (a pointer)."""
    out = ctypes.POINTER
    row = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_int32, out(ctypes.c_char_p), out(ctypes.c_char_p),
                           out(ctypes.c_int64), out(ctypes.c_int64), out(ctypes.c_char))(("arg_layout", cpu.library()))
    struct, field, offset, size, kind = (ctypes.c_char_p(), ctypes.c_char_p(), ctypes.c_int64(), ctypes.c_int64(),
                                         ctypes.c_char())
    layout, k = {}, 0
    while row(k, *map(ctypes.byref, (struct, field, offset, size, kind))):
        name = struct.value.decode()
        if kind.value == b"s":
            layout[name] = (size.value, [])
        else:
            layout[name][1].append((field.value.decode(), offset.value, size.value, kind.value.decode()))
        k += 1
    return layout


def kind_of(ctype) -> str:
    """A ctypes field type as arg_layout's kinds name C's."""
    if ctype is ctypes.c_void_p or issubclass(ctype, ctypes._Pointer):
        return "p"
    return {ctypes.c_int32: "i", ctypes.c_int64: "i", ctypes.c_uint64: "u", ctypes.c_float: "f",
            ctypes.c_double: "f"}.get(ctype, "?")


def test_the_ctypes_structs_mirror_the_c_structs_field_by_field():
    compiled = compiled_layout()
    mirrors = {"".join(w.title() for w in name.split("_")): name for name in compiled}    # merge_args: MergeArgs
    ours = {k for k, v in vars(cpu).items()
            if isinstance(v, type) and issubclass(v, ctypes.Structure) and v.__module__ == cpu.__name__}
    assert ours == set(mirrors), "every argument struct of cpu_merge.c has one ctypes mirror in cpu.py, and no other"
    for cls_name, c_name in mirrors.items():
        mirror, (size, fields) = getattr(cpu, cls_name), compiled[c_name]
        got = [(f, getattr(mirror, f).offset, getattr(mirror, f).size, kind_of(t)) for f, t in mirror._fields_]
        assert got == fields, f"cpu.{cls_name} is not cpu_merge.c's {c_name}"
        assert ctypes.sizeof(mirror) == size, cls_name


def test_without_the_library_mbmerge_says_so_once_and_merges_with_torch(monkeypatch, capsys):
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: {"sse2"})
    assert cpu.library.__wrapped__() is None
    assert "lacks AVX2 or F16C" in capsys.readouterr().err
    monkeypatch.setattr(cpu, "library", lambda: None)
    b, xs = bf16_deltas(1000, 2, torch.bfloat16)
    assert not kernels.compiled("cpu") and kernels.delta_merge(b, xs, weights=[1.0, 1.0], scale=1.0) is None
    got, bad = merged("ties", b, xs, params_for("ties", 2, 0), (1000,), torch.bfloat16, "auto")
    want, _ = merged("ties", b, xs, params_for("ties", 2, 0), (1000,), torch.bfloat16, "torch")
    assert bad is None and torch.equal(got.view(torch.int16), want.view(torch.int16))
