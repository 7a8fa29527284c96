"""The fused Triton merges (kernels/merge_triton.py, run by Triton's CPU interpreter) against the
torch methods they replace, and the Triton histograms (kernels/hist_triton.py) against
torch.bincount. Merged values must lie within 1 ulp of the output dtype of the torch method's
float32 result cast to that dtype; masks and thresholds must be bit-identical."""

import pytest
import torch

from mbmerge import kernels, methods
from mbmerge.kernels import hist_triton, merge_triton
from mbmerge.kernels.dare import expert_seed, uniform_ref
from mbmerge.kernels.select import HI_BINS, LO_BINS, _hi_keys, _lo_keys, kth_largest_abs
from mbmerge.methods import ties_merging as TIES   # the module (mbmerge.methods.ties is the function)
from mbmerge.methods.ranking import Cut

FUSED = ["linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties",
         "localize_stitch", "consensus"]
CASES = [  # (experts T, elements n, input dtype, output dtype); n = 1000, 5000: not multiples of the block
    (1, 1, torch.float32, torch.float32),
    (2, 1000, torch.bfloat16, torch.bfloat16),
    (3, 5000, torch.float16, torch.float32),
    (8, 1000, torch.bfloat16, torch.float32),
    (3, 1000, torch.float32, torch.bfloat16),
    (12, 700, torch.bfloat16, torch.bfloat16),      # more than 8 experts: a smaller block
]
OFFSET = 2**32 + 7      # the chunk's first element index: DARE's Philox counters use both 32-bit words


@pytest.fixture
def triton_backend():
    with kernels.using("triton"):
        yield


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of each fused kernel wrapper (kernels.delta_merge, ...)."""
    counts = {}
    for name in ("delta_merge", "masked_stitch", "tall_merge"):
        def counted(*args, _run=getattr(kernels, name), _name=name, **kw):
            counts[_name] = counts.get(_name, 0) + 1
            return _run(*args, **kw)
        monkeypatch.setattr(kernels, name, counted)
    return counts


def ulp_distance(got: torch.Tensor, want: torch.Tensor) -> int:
    """The largest number of representable values of the dtype between got and want (+0 = -0);
    NaNs must be at the same places."""
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = got.isnan()
    assert torch.equal(nan, want.isnan())
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[got.dtype]
    magnitude = (1 << (8 * got.element_size() - 1)) - 1

    def ordered(t):  # the bits as integers that order like the floats: -x maps to -(bits of x)
        i = t.view(ints).to(torch.int64)
        return torch.where(i < 0, -(i & magnitude), i)
    diff = (ordered(got) - ordered(want))[~nan].abs()
    return int(diff.max()) if diff.numel() else 0


def inputs(n: int, T: int, dtype: torch.dtype, seed: int = 0):
    """b and T experts: dense small deltas plus sparse larger ones, in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, generator=g) * 0.05
    xs = []
    for _ in range(T):
        d = torch.randn(n, generator=g) * 1e-3
        d += (torch.rand(n, generator=g) < 0.1) * torch.randn(n, generator=g) * 2e-2
        xs.append(b + d)
    return b.to(dtype), [x.to(dtype) for x in xs]


def params_for(name: str, T: int, case: int) -> dict:
    """Parameters that vary with the case: a zero weight in even cases, both elections and
    aggregations, all rescales, p = 1 for one expert."""
    w = ([1.0, 0.0, 0.5, 2.0, 0.7, 1.3, 0.2, 0.9] * 2)[:T] if case % 2 == 0 else [0.6 + 0.1 * i for i in range(T)]
    given = dict(weights=w, scale=[1.0, 0.7, 1.3][case % 3], consensus=["sum", "count"][case % 2],
                 aggregate=["mean", "sum"][case // 2 % 2], normalize=case % 2 == 0,
                 rescale=["inverse", "l1", "none"][case % 3], seed=case, gamma=0.05, k=min(2, T),
                 density=([0.3, 1.0, 0.5, 0.9, 0.2, 0.6, 0.8, 0.4] * 2)[:T], sparsity=0.2, tall_lambda=0.2)
    names = {p.name for p in methods.get(name).params}
    return {k: v for k, v in given.items() if k in names}


def merged_both_ways(name: str, b, xs, params: dict, out_dtype, offset: int = OFFSET):
    """(fused kernel's chunk through apply_chunk, the torch method's float32 chunk cast to out_dtype);
    the statistics come from float32 inputs, as the engine's."""
    method = methods.get(name)
    p = methods.resolve_params(method, len(xs), params)
    bf, xf = b.float(), [x.float() for x in xs]
    n = xf[0].numel()

    def merged(b, xs, out_dtype):   # reductions afresh: a Ranking hands out each chunk's Cuts once
        reduced = methods.reductions(method, p, lambda: [(bf, xf, offset)], "layer.w", (n,))
        return methods.apply_chunk(method, p, reduced, b, xs, offset, "layer.w", (n,), out_dtype=out_dtype)
    got = merged(b, xs, out_dtype)
    with kernels.using("torch"):
        want = merged(bf, xf, torch.float32)
    return got, want.to(out_dtype)


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("name", FUSED)
def test_fused_method_matches_torch_method(triton_backend, calls, name, case):
    T, n, dtype, out_dtype = CASES[case]
    b, xs = inputs(n, T, dtype, seed=case)
    got, want = merged_both_ways(name, b, xs, params_for(name, T, case), out_dtype)
    assert sum(calls.values()) == 1                  # apply_chunk took the fused path
    assert got.dtype == out_dtype
    assert ulp_distance(got, want) <= 1              # 0 in the interpreter: same operations, same order


@pytest.mark.parametrize("name", FUSED)
def test_fused_all_zero_deltas_give_the_base(triton_backend, calls, name):
    b, _ = inputs(1000, 1, torch.bfloat16)
    b[:3] = torch.tensor([0.0, -0.0, 1.0])
    got, want = merged_both_ways(name, b, [b.clone() for _ in range(3)], params_for(name, 3, 0), torch.bfloat16)
    assert sum(calls.values()) == 1 and ulp_distance(got, want) == 0
    if name != "linear":                             # linear has no base: a weighted mean of the experts
        assert torch.equal(got, b)


@pytest.mark.parametrize("impl,mtl", [("torch", "ta"), ("triton", "ties")])
def test_torch_backend_and_uncovered_parameters_use_the_torch_method(calls, impl, mtl):
    b, xs = inputs(100, 3, torch.bfloat16)           # the torch method gets them as float32
    with kernels.using(impl):
        got, want = merged_both_ways("consensus", b, xs, {"mtl": mtl}, torch.float32)
    assert not calls and torch.equal(got, want)


def test_sign_election_beyond_the_kernels_expert_limit_uses_the_torch_method(triton_backend, calls):
    T = kernels.MAX_ELECT_EXPERTS + 1
    b, xs = inputs(50, T, torch.float32)
    got, want = merged_both_ways("ties", b, xs, {"density": 1.0}, torch.float32)
    assert not calls and torch.equal(got, want)
    with pytest.raises(ValueError, match="at most"):
        merge_triton.delta_merge(b, xs, weights=[1.0] * T, scale=1.0, elect="sum")


def test_band_keeps_every_entry_tied_at_a_threshold(triton_backend):
    # deltas on a coarse grid: many |d| equal each threshold; every one of them is kept
    g = torch.Generator().manual_seed(4)
    b = torch.zeros(3001)
    xs = [torch.randint(-8, 9, (3001,), generator=g) / 8 for _ in range(2)]
    thr = kth_largest_abs(lambda: [xs], [[100, 2000], [500, 2500]])       # [hi, lo] per expert
    for d, (hi, lo) in zip(xs, thr):
        assert int(((d.abs() == hi) | (d.abs() == lo)).sum()) > 100
    w = [1.0, 0.5]
    got = merge_triton.delta_merge(b, xs, weights=w, scale=1.0, trim="band", hi=[t[0] for t in thr], lo=[t[1] for t in thr])
    kept = [d * ((d.abs() >= lo) & (d.abs() <= hi)) for d, (hi, lo) in zip(xs, thr)]
    assert torch.equal(got, kept[0] * w[0] + kept[1] * w[1])
    ties = TIES.apply(b, xs, weights=w, scale=1.0, consensus="sum", aggregate="mean",
                      thr=[[Cut(t[1], 3001)] for t in thr])
    assert torch.equal(merge_triton.delta_merge(b, xs, weights=w, scale=1.0, trim="band", lo=[t[1] for t in thr],
                                           elect="sum"), ties)


@pytest.mark.parametrize("offset", [0, 1000, 2**31 - 100, 2**32 + 7])
@pytest.mark.parametrize("p", [0.3, 1.0])
def test_dare_masks_are_the_references_bit_for_bit(triton_backend, offset, p):
    # no base, x_i = 1, g_i = 1, w = [1, 2]: the output is keep_0 + 2 keep_1
    n, seeds, density = 2500, [expert_seed(3, "layer.w", i) for i in range(2)], [p, 0.5]
    got = merge_triton.delta_merge(None, [torch.ones(n)] * 2, weights=[1.0, 2.0], scale=1.0, trim="random",
                              density=density, seeds=seeds, offset=offset)
    keep = [(uniform_ref(s, torch.arange(offset, offset + n)) < q).float() for s, q in zip(seeds, density)]
    assert torch.equal(got, keep[0] + 2 * keep[1]) and (p < 1 or bool(keep[0].all()))


def test_mixed_expert_dtypes_are_widened(triton_backend):
    b, xs = inputs(1000, 3, torch.float32)
    mixed = [xs[0], xs[1].bfloat16(), xs[2].half()]
    got = merge_triton.delta_merge(b, mixed, weights=[1.0] * 3, scale=1.0, elect="count", aggregate="sum")
    want = TIES.apply(b, [x.float() for x in mixed], weights=[1.0] * 3, scale=1.0, consensus="count",
                      aggregate="sum", thr=[[], [], []])
    assert torch.equal(got, want)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")   # the interpreter's numpy, to fp16 inf
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_output_cast_rounds_to_nearest_even_bit_for_bit(triton_backend, out_dtype):
    # no base, w = scale = 1: the float32 result is x itself, so the output is the cast alone
    halfway = torch.tensor([0x3F808000, 0x3F818000, 0x3F80A000, -0x40BF6000, 0x7F7FFFFF], dtype=torch.int32)
    x = torch.cat([torch.randn(3000) * 100, halfway.view(torch.float32), special_values(8, 0), torch.tensor([1e-4])])
    got = merge_triton.delta_merge(None, [x], weights=[1.0], scale=1.0, out_dtype=out_dtype)
    want = x.to(out_dtype)
    nan = want.isnan()                                  # NaN payloads are not compared
    assert torch.equal(got.isnan(), nan) and torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


def test_launchers_check_their_inputs(triton_backend):
    b, xs = inputs(100, 2, torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        merge_triton.masked_stitch(b, [xs[0], torch.randn(200)[::2]], lo=[0.0, 0.0])
    with pytest.raises(ValueError, match="100 elements"):
        merge_triton.tall_merge(b[:50], xs, weights=[1.0, 1.0], tall_lambda=[0.2, 0.2], k=1, scale=1.0)
    assert merge_triton.delta_merge(b[:0], [x[:0] for x in xs], weights=[1.0, 1.0], scale=1.0).shape == (0,)


def special_values(n: int, seed: int) -> torch.Tensor:
    """Deltas-like values plus zeros of both signs, subnormals, Inf and NaN."""
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 1e-3
    specials = torch.tensor([0.0, -0.0, 1e-40, -3e-41, float("inf"), -float("inf"), float("nan"), -float("nan")])
    v[:8] = specials[:n]
    return v


@pytest.mark.parametrize("n", [1, 4095, 10_001])
def test_histograms_equal_bincount(triton_backend, n):
    v = special_values(n, n)
    h = torch.zeros(hist_triton.REPLICAS, HI_BINS, dtype=torch.int64)
    hist_triton.accumulate_(h, v, None)
    assert torch.equal(h.sum(0), torch.bincount(_hi_keys(v), minlength=HI_BINS))
    for top in {0, int(_hi_keys(v)[-1]), 0x7F7F}:
        h = torch.zeros(hist_triton.REPLICAS, LO_BINS + 2, dtype=torch.int64)
        hist_triton.accumulate_(h, v, top)
        hist_triton.accumulate_(h, v, top)       # accumulates in place
        assert torch.equal(h.sum(0), 2 * torch.bincount(_lo_keys(v, top), minlength=LO_BINS + 2))


def test_thresholds_are_identical_between_backends(both_impls):
    v, w = special_values(30_000, 1)[8:], special_values(30_000, 2)[:-8]     # w with zeros, subnormals, Inf, NaN
    ks = [[1, 17, 29_992], [3, 5, 15_000]]
    whole = kth_largest_abs(lambda: [[v, w]], ks)
    pieces = lambda: ([v[i:i + 4096], w[i:i + 4096]] for i in range(0, v.numel(), 4096))  # noqa: E731
    assert kth_largest_abs(pieces, ks) == whole
    kth = lambda t, k: float(t.abs().kthvalue(t.numel() - k + 1).values)  # noqa: E731
    finite = w[w.isfinite()]                         # 2 NaNs and 2 Infs rank above it: k = 3 is Inf
    assert whole == [[kth(v, 1), kth(v, 17), kth(v, 29_992)], [float("inf"), kth(finite, 1), kth(w, 15_000)]]


def test_thresholds_beyond_two_to_the_24_match_kthvalue(triton_backend, monkeypatch):
    monkeypatch.setattr(hist_triton, "BLOCK_SIZE", 1 << 20)      # few programs: the interpreter is quick
    v = torch.randn(2**24 + 3, generator=torch.Generator().manual_seed(3))
    ks = [1, 2**22 + 1, 2**24 + 3]
    want = [float(v.abs().kthvalue(v.numel() - k + 1).values) for k in ks]
    assert kth_largest_abs(lambda: [[v]], [ks]) == [want]
