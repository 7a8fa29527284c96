"""Magnitude bands and rank-based drops (breadcrumbs, breadcrumbs_ties, della, della_linear) and
magmax, against plain references written here (sorts, kthvalue, pairwise rank counts, explicit
masks; della's uniforms from the Philox reference `uniform_ref`), on hand-worked examples and random
tensors through the library API; then end to end: engine = library, chunking changes no byte, and
model-wide breadcrumbs thresholds are the kthvalue over all of an expert's deltas."""
import json
from math import floor

import pytest
import torch

import mbmerge
from mbmerge.common.errors import BadParameter
from mbmerge.kernels.dare import expert_seed, uniform_ref
from mbmerge.methods import merge_tensors
from mbmerge.methods.ranking import Rank
from conftest import read_model, top_mask, visit_order, write_model

# --- plain references ---------------------------------------------------------------------------


def band_sizes(n, rho, gamma):
    """(t, k): k = max(1, floor(rho n)) kept after the t = min(floor(gamma n), n - k) largest."""
    k = max(1, floor(rho * n))
    return max(0, min(floor(gamma * n), n - k)), k


def ref_band_thresholds(a, rho, gamma):
    """(hi, lo): the (t+1)-th and (t+k)-th largest of a (flat): --keep-ties keeps lo <= |d| <= hi."""
    t, k = band_sizes(a.numel(), rho, gamma)
    desc = a.flatten().sort(descending=True).values
    return desc[t], desc[t + k - 1]


def ref_band(d, hi, lo):
    return d * ((d.abs() <= hi) & (d.abs() >= lo))


def ref_band_exact(d, rho, gamma):
    """d on the entries ranked t+1 .. t+k by a stable sort on (-|d|, index)."""
    return d * top_mask(d.abs(), *reversed(band_sizes(d.numel(), rho, gamma)))


def ref_sign_step(b, es, w, lam, consensus="sum", aggregate="mean"):
    e = torch.stack(es)                                                     # [T, ...]
    votes = e if consensus == "sum" else e.sign()
    s = torch.where(votes.sum(0) >= 0, 1.0, -1.0)
    agree = (e.sign() == s) & (e != 0)
    m = (e * agree).sum(0)
    if aggregate == "mean":
        den = (torch.tensor(w).view(-1, *[1] * b.dim()) * agree).sum(0)
        m = m / torch.where(den == 0, 1.0, den)
    return b + lam * m


def ref_breadcrumbs(b, xs, w, rho, gamma, lam=1.0, normalize=False, ties=False, thr=None, keep_ties=False,
                    **ties_kw):
    """thr: per expert (hi, lo) with keep_ties, else a mask of the kept entries; default: this tensor's."""
    ds = [x - b for x in xs]
    if keep_ties:
        thr = thr or [ref_band_thresholds(d.abs(), r, g) for d, r, g in zip(ds, rho, gamma)]
        es = [wi * ref_band(d, *t) for d, wi, t in zip(ds, w, thr)]
    else:
        es = [wi * (d * m if thr else ref_band_exact(d, r, g)) for d, wi, r, g, m in zip(ds, w, rho, gamma, thr or ds)]
    if ties:
        return ref_sign_step(b, es, w, lam, **ties_kw)
    tau = sum(es)
    return b + lam * (tau / sum(w) if normalize else tau)


def ref_keep_probability(d, rho, eps):
    """p per element: rank of |d| in its row (last dim), counted as the number of entries smaller,
    or equal and earlier; r = rank / (m - 1), 1/2 for rows of one."""
    m = d.shape[-1] if d.dim() > 1 else d.numel()
    a = d.abs().reshape(-1, m)                                              # [rows, m]
    if m == 1:
        r = torch.full_like(a, 0.5)
    else:
        idx = torch.arange(m)
        before = (a[:, None, :] < a[:, :, None]) | ((a[:, None, :] == a[:, :, None]) & (idx < idx[:, None]))
        r = before.sum(-1).float() / (m - 1)                                # [rows, m]
    return ((rho - eps) + 2 * eps * r).view(d.shape)


def ref_della(b, xs, w, rho, eps, seed, key, rescale, lam=1.0, normalize=False, ties=False, **ties_kw):
    es = []
    for i, (x, r, e) in enumerate(zip(xs, rho, eps)):
        d = x - b
        p = ref_keep_probability(d, r, e)
        keep = uniform_ref(expert_seed(seed, key, i), torch.arange(d.numel())).view(d.shape) < p
        kept = d * keep
        if rescale == "inverse":
            kept = kept / p
        elif rescale == "l1" and d.abs().double().sum() >= 1e-7 and kept.abs().double().sum() >= 1e-7:
            kept = kept * float(d.abs().double().sum() / kept.abs().double().sum())
        es.append(w[i] * kept)
    if ties:
        return ref_sign_step(b, es, w, lam, **ties_kw)
    tau = sum(es)
    return b + lam * (tau / sum(w) if normalize else tau)


def ref_magmax(b, xs, lam=1.0):
    d = torch.stack([x - b for x in xs])                                    # [T, ...]
    last = len(xs) - 1 - d.abs().flip(0).argmax(0, keepdim=True)           # the last of the largest |d_i|
    return b + lam * d.gather(0, last)[0]


def _random(shape, n, seed=0, discrete=False):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g) * 0.05
    if discrete:   # few distinct magnitudes: ties at every threshold
        return b, [b + torch.randint(-3, 4, shape, generator=g) * 0.25 for _ in range(n)]
    return b, [b + torch.randn(shape, generator=g) * 1e-3
               + (torch.rand(shape, generator=g) < 0.1) * torch.randn(shape, generator=g) * 2e-2 for _ in range(n)]


# --- breadcrumbs by hand --------------------------------------------------------------------------

D = torch.tensor([5.0, -4.0, 3.0, 3.0, -2.0, 1.0, 1.0, 0.5, 0.25, 0.125])   # n = 10
Z = torch.zeros(10)


@pytest.mark.parametrize("rho,gamma,sets,kept,kept_ties", [
    (0.2, 0.1, (1, 3), [0, -4, 3, 0, 0, 0, 0, 0, 0, 0],               # k=2, t=1; the 3s tie at the edge
     [0, -4, 3, 3, 0, 0, 0, 0, 0, 0]),
    (0.3, 0.05, (0, 3), [5, -4, 3, 0, 0, 0, 0, 0, 0, 0],              # gamma n < 1: no outlier dropped
     [5, -4, 3, 3, 0, 0, 0, 0, 0, 0]),
    (0.9, 0.2, (1, 10), [0, -4, 3, 3, -2, 1, 1, 0.5, 0.25, 0.125], None),   # t = min(2, n - k) = 1
    (0.05, 0.1, (1, 2), [0, -4, 0, 0, 0, 0, 0, 0, 0, 0], None),           # rho n < 1: k = 1
    (1.0, 0.3, None, D.tolist(), None),                                   # rho = 1: t shrinks to 0
])
def test_breadcrumbs_by_hand(rho, gamma, sets, kept, kept_ties):
    want = [[Rank(sets[0], drop=True), Rank(sets[1])]] if sets else [[]]
    assert mbmerge.methods.get("breadcrumbs").ranks.fn(density=[rho], gamma=[gamma], n=10) == want
    assert mbmerge.methods.breadcrumbs(Z, [D], density=rho, gamma=gamma).tolist() == kept
    assert mbmerge.methods.breadcrumbs(Z, [D], density=rho, gamma=gamma, keep_ties=True).tolist() == (kept_ties or kept)


def test_breadcrumbs_splits_a_tie_at_the_outlier_edge_by_position():
    d = torch.tensor([5.0, -5.0, 3.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.125])
    # k=2, t=1: the first 5 is the outlier, -5 and 3 are kept; --keep-ties keeps both 5s (hi = 5)
    assert mbmerge.methods.breadcrumbs(Z, [d], density=0.2, gamma=0.1).tolist() == [0, -5, 3] + [0] * 7
    kept_ties = mbmerge.methods.breadcrumbs(Z, [d], density=0.2, gamma=0.1, keep_ties=True)
    assert kept_ties.tolist() == [5, -5, 3] + [0] * 7


def test_breadcrumbs_ties_by_hand():
    b = torch.zeros(5)
    x1, x2 = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]), torch.tensor([-0.5, -1.0, 2.0, 0.25, -4.0])
    # k=2, t=1: x1 keeps [1, -2, ., ., .] (3 dropped), x2 keeps [., -1, 2, ., .] (-4 dropped)
    assert mbmerge.methods.breadcrumbs(b, [x1, x2], density=0.4, gamma=0.2).tolist() == [1, -3, 2, 0, 0]
    out = mbmerge.methods.breadcrumbs(b, [x1, x2], density=0.4, gamma=0.2, weights=[1, 0.5], scale=2.0)
    assert out.tolist() == [2, -5, 2, 0, 0]
    out = mbmerge.methods.breadcrumbs_ties(b, [x1, x2], density=0.4, gamma=0.2)
    assert out.tolist() == [1, -1.5, 2, 0, 0]                        # disjoint mean of the agreeing deltas
    out = mbmerge.methods.breadcrumbs_ties(b, [x1, x2], density=0.4, gamma=0.2, aggregate="sum")
    assert out.tolist() == [1, -3, 2, 0, 0]


def test_breadcrumbs_bad_gamma():
    for g in (1.0, -0.1):
        with pytest.raises(BadParameter, match="gamma"):
            mbmerge.methods.breadcrumbs(Z, [D], gamma=g)


# --- breadcrumbs on random tensors ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1,), (7,), (64, 33), (3, 5, 17)])
@pytest.mark.parametrize("discrete", [False, True])
@pytest.mark.parametrize("keep_ties", [False, True])
def test_breadcrumbs_matches_reference(shape, discrete, keep_ties):
    b, xs = _random(shape, 3, discrete=discrete)
    w, rho, gamma = [0.7, 0.2, 1.1], [0.2, 0.5, 0.9], [0.01, 0.05, 0.2]
    out = mbmerge.methods.breadcrumbs(b, xs, weights=w, density=rho, gamma=gamma, scale=0.8, normalize=True,
                                      keep_ties=keep_ties)
    ref = ref_breadcrumbs(b, xs, w, rho, gamma, 0.8, normalize=True, keep_ties=keep_ties)
    assert torch.equal(out, ref)                                      # same order of ops
    for consensus, aggregate in [("sum", "mean"), ("count", "sum")]:
        out = mbmerge.methods.breadcrumbs_ties(b, xs, weights=w, density=rho, gamma=gamma, scale=0.8,
                                               consensus=consensus, aggregate=aggregate, keep_ties=keep_ties)
        ref = ref_breadcrumbs(b, xs, w, rho, gamma, 0.8, ties=True, keep_ties=keep_ties, consensus=consensus,
                              aggregate=aggregate)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)  # float32 summation order only


# --- della ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1,), (7,), (64, 33), (3, 5, 17), (40, 1)])
@pytest.mark.parametrize("rescale", ["inverse", "l1", "none"])
def test_della_matches_reference(shape, rescale):
    b, xs = _random(shape, 3, discrete=shape == (64, 33))
    w, rho, eps = [0.7, 0.2, 1.1], [0.3, 0.5, 0.8], [0.1, 0.3, 0.2]
    kw = dict(weights=w, density=rho, epsilon=eps, seed=7, rescale=rescale, scale=0.8, key="layer.w")
    ref = ref_della(b, xs, w, rho, eps, 7, "layer.w", rescale, 0.8, normalize=True)
    torch.testing.assert_close(mbmerge.methods.della_linear(b, xs, normalize=True, **kw), ref, rtol=1e-6, atol=1e-7)
    ref = ref_della(b, xs, w, rho, eps, 7, "layer.w", rescale, 0.8, ties=True, aggregate="mean")
    torch.testing.assert_close(mbmerge.methods.della(b, xs, **kw), ref, rtol=1e-6, atol=1e-7)


def test_della_keep_fraction_follows_the_rank():
    # equal magnitudes: ranks by position, p = 0.2, 0.4, 0.6, 0.8 in the four columns
    out = mbmerge.methods.della_linear(torch.zeros(20000, 4), [torch.ones(20000, 4)], density=0.5, epsilon=0.3,
                                       rescale="none", key="t")
    torch.testing.assert_close(out.mean(0), torch.tensor([0.2, 0.4, 0.6, 0.8]), rtol=0, atol=0.015)
    inv = mbmerge.methods.della_linear(torch.zeros(20000, 4), [torch.ones(20000, 4)], density=0.5, epsilon=0.3,
                                       key="t")
    p = ref_keep_probability(torch.ones(1, 4), 0.5, 0.3)[0]              # float32, as the library computes it
    assert [sorted(set(c.tolist()) - {0.0}) for c in inv.T] == [[(1 / pc).item()] for pc in p]
    # random magnitudes, rows of 50: the keep fraction in each fifth of the ranks
    b, (x,) = torch.zeros(4000, 50), [torch.randn(4000, 50, generator=torch.Generator().manual_seed(1))]
    kept = mbmerge.methods.della_linear(b, [x], density=0.4, epsilon=0.3, rescale="none", key="r") != 0
    r = x.abs().argsort(1).argsort(1)                                 # rank in the row, 0..49
    for q in range(5):
        bucket = (r >= 10 * q) & (r < 10 * q + 10)
        want = float(ref_keep_probability(x, 0.4, 0.3)[bucket].mean())   # 0.1 + 0.6 (10q + 4.5) / 49
        assert abs(float(kept[bucket].float().mean()) - want) < 0.015, q
    # rows of one element: r = 1/2, p = rho
    one = mbmerge.methods.della_linear(torch.zeros(40000, 1), [torch.ones(40000, 1)], density=0.3, epsilon=0.2,
                                       rescale="none", key="o")
    assert abs(float(one.mean()) - 0.3) < 0.01


def test_della_reuses_dare_uniforms_and_density_one_keeps_all():
    b, xs = _random((30, 20), 2)
    kw = dict(density=0.4, seed=3, key="k", rescale="none")
    assert torch.equal(mbmerge.methods.della_linear(b, xs, epsilon=0.0, **kw), mbmerge.methods.dare_linear(b, xs, **kw))
    assert torch.equal(mbmerge.methods.della_linear(b, xs, density=1.0, epsilon=0.15),
                       mbmerge.methods.task_arithmetic(b, xs))


@pytest.mark.parametrize("rho,eps", [(0.2, 0.3), (0.5, 0.5), (0.9, 0.15), (0.5, -0.1)])
def test_della_refuses_probabilities_outside_0_1(rho, eps):
    b, xs = _random((4, 4), 2)
    with pytest.raises(BadParameter, match="epsilon"):
        mbmerge.methods.della(b, xs, density=rho, epsilon=eps)


def test_della_accepts_probability_one():
    b, xs = _random((4, 4), 2)
    assert torch.isfinite(mbmerge.methods.della(b, xs, density=0.75, epsilon=0.25)).all()


# --- magmax ---------------------------------------------------------------------------------------


def test_magmax_by_hand():
    b = torch.ones(5)
    xs = [b + torch.tensor(v) for v in ([1.0, -3.0, 2.0, 0.0, -1.0], [-2.0, 3.0, 1.0, 0.0, 0.5],
                                        [0.5, 1.0, -2.0, 0.0, 1.0])]
    # ties |3| = |-3| and |2| = |-2| and |-1| = |1|: the last expert wins (the paper's code, FusionBench)
    assert mbmerge.methods.magmax(b, xs).tolist() == [-1.0, 4.0, -1.0, 1.0, 2.0]
    assert mbmerge.methods.magmax(b, xs, scale=0.5).tolist() == [0.0, 2.5, 0.0, 1.0, 1.5]


@pytest.mark.parametrize("discrete", [False, True])
def test_magmax_matches_reference(discrete):
    b, xs = _random((64, 33), 3, discrete=discrete)
    assert torch.equal(mbmerge.methods.magmax(b, xs, scale=0.7), ref_magmax(b, xs, 0.7))


# --- end to end -----------------------------------------------------------------------------------

EXPERTS = ["math", "code", "ifeval"]
CASES = [
    ("breadcrumbs", dict(weights=[1.0, 0.5, 0.8], density=0.3, gamma=0.05, scale=0.9, normalize=True)),
    ("breadcrumbs_ties", dict(density=[0.2, 0.4, 0.3], gamma=[0.01, 0.02, 0.0], aggregate="sum")),
    ("della", dict(density=0.4, epsilon=0.1, rescale="l1", seed=5)),
    ("della_linear", dict(weights=[0.5, 0.3, 0.2], density=0.3, epsilon=0.2, normalize=True)),
    ("magmax", dict(scale=0.7)),
]


def _library(tensors, names, method, experts, params):
    return {n: merge_tensors(method, tensors["base"][n].bfloat16(), [tensors[e][n].bfloat16() for e in experts],
                             key=n, **params) for n in names}


@pytest.mark.parametrize("method,params", CASES)
def test_engine_equals_library_on_the_family(family, tmp_path, method, params):
    p, t = family["paths"], family["tensors"]
    got = read_model(mbmerge.merge(method, base=str(p["base"]), experts=[str(p[e]) for e in EXPERTS],
                                   out=tmp_path / "o", progress=False, **params))
    want = _library(t, list(t["base"]), method, EXPERTS, params)     # embeddings and norms included
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.parametrize("method,params", CASES)
def test_chunked_merge_equals_whole_merge_and_library(wide_family, tmp_path, method, params):
    p, t, experts = wide_family["paths"], wide_family["tensors"], ["e0", "e1", "e2"]
    runs = {}
    for budget in ("2GB", "100KB"):                                   # 100KB: 4096-element chunks
        out = mbmerge.merge(method, base=str(p["base"]), experts=[str(p[e]) for e in experts],
                            out=tmp_path / budget, progress=False, memory_budget=budget, **params)
        runs[budget] = {f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))}
    assert json.loads((tmp_path / "100KB" / "mbmerge.json").read_text())["chunk_elements"] == 4096
    assert runs["2GB"] == runs["100KB"]
    got = read_model(tmp_path / "100KB")
    want = _library(t, list(t["base"]), method, experts, params)
    assert all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.parametrize("keep_ties", [False, True])
def test_breadcrumbs_model_scope_ranks_every_delta_of_an_expert(family, tmp_path, keep_ties):
    """Exact: one stable sort of all an expert's |d| in the engine's visiting order; --keep-ties: the
    kthvalues over them, every tie kept."""
    p, t = family["paths"], family["tensors"]
    rho, gamma = [0.3, 0.2, 0.5], [0.01, 0.05, 0.0]
    got = read_model(mbmerge.merge("breadcrumbs", base=str(p["base"]), experts=[str(p[e]) for e in EXPERTS],
                                   out=tmp_path / "o", progress=False, density=rho, gamma=gamma,
                                   sparsify_scope="model", keep_ties=keep_ties))
    names = visit_order(p["base"])
    want = {n: [] for n in names}
    for e, r, g in zip(EXPERTS, rho, gamma):
        ds = [(t[e][n] - t["base"][n]).flatten() for n in names]
        a = torch.cat(ds).abs()                                        # the expert's whole model
        if keep_ties:
            hi, lo = ref_band_thresholds(a, r, g)
            parts = ((a <= hi) & (a >= lo)).split([d.numel() for d in ds])
        else:
            parts = top_mask(a, *reversed(band_sizes(a.numel(), r, g))).split([d.numel() for d in ds])
        for n, m in zip(names, parts):
            want[n].append(m.view(t["base"][n].shape))
    for n in names:
        ref = ref_breadcrumbs(t["base"][n], [t[e][n] for e in EXPERTS], [1.0] * 3, rho, gamma, thr=want[n])
        assert torch.equal(got[n], ref.bfloat16()), n
