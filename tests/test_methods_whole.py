"""Whole-tensor methods (model_stock, slerp, tsv, iso_c, iso_cts) against plain float64 references
written here (textbook slerp, F.cosine_similarity, explicit SVD steps with polar factors taken
through eigh rather than SVD), their edge cases, and end to end: engine = library, and the output
bytes do not depend on how tensors are chunked."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import mbmerge
from mbmerge.common.errors import BadParameter
from mbmerge.methods import merge_tensors
from conftest import read_model, write_model

# --- plain references (float64) ----------------------------------------------------------------


def ref_slerp(b, x, t):
    p0, p1 = b.double().flatten(), x.double().flatten()
    cos = torch.dot(p0 / p0.norm(), p1 / p1.norm()).clamp(-1, 1)
    if cos.abs() > 0.9995:
        return ((1 - t) * p0 + t * p1).view(b.shape)
    om = torch.arccos(cos)
    return (torch.sin((1 - t) * om) / torch.sin(om) * p0 + torch.sin(t * om) / torch.sin(om) * p1).view(b.shape)


def ref_model_stock(b, xs, filter_wise=False):
    b64, x64 = b.double(), [x.double() for x in xs]
    flat = (lambda v: v.reshape(-1, v.shape[-1])) if filter_wise else (lambda v: v.reshape(1, -1))   # [rows, cols]
    ds = [flat(x - b64) for x in x64]
    n = len(xs)
    cos = torch.stack([F.cosine_similarity(ds[i], ds[j], dim=-1)
                       for i in range(n) for j in range(i + 1, n)]).mean(0)                        # [rows]
    t = n * cos / (1 + (n - 1) * cos)
    t = torch.where((1 + (n - 1) * cos).abs() < 1e-6, 0.0, t).unsqueeze(-1)                          # [rows, 1]
    return (t * flat(sum(x64) / n) + (1 - t) * flat(b64)).view(b.shape)


def polar_cols(a):
    """a (a^T a)^(-1/2): the orthogonal polar factor of a [m, k], k <= m, through eigh."""
    w, q = torch.linalg.eigh(a.T @ a)
    return a @ q @ torch.diag(w.rsqrt()) @ q.T


def ref_tsv(ds):
    r, n = min(ds[0].shape), len(ds)
    k = max(1, r // n)
    us, ss, vs = zip(*[torch.linalg.svd(d, full_matrices=False) for d in ds])
    u = torch.cat([x[:, :k] for x in us], 1)
    s = torch.cat([x[:k] for x in ss])
    v = torch.cat([x[:k].T for x in vs], 1)            # V [n, K]
    return polar_cols(u) @ torch.diag(s) @ polar_cols(v).T


def ref_iso_c(ds):
    u, s, vh = torch.linalg.svd(sum(ds), full_matrices=False)
    return s.mean() * u @ vh


def ref_iso_cts(ds, f=0.8):
    r, n = min(ds[0].shape), len(ds)
    kc = int(r * f)
    kc = r - round((r - kc) / n) * n                     # FusionBench's rounding (in range for these shapes)
    per = (r - kc) // n
    u, s, vh = torch.linalg.svd(sum(ds), full_matrices=False)
    uc, parts_u, parts_s, parts_v = u[:, :kc], [u[:, :kc]], [s[:kc]], [vh[:kc].T]
    for d in ds:
        ut, st, vt = torch.linalg.svd(d - uc @ uc.T @ d, full_matrices=False)
        parts_u.append(ut[:, :per]), parts_s.append(st[:per]), parts_v.append(vt[:per].T)
    s_flat = torch.cat(parts_s).mean()
    return s_flat * polar_cols(torch.cat(parts_u, 1)) @ polar_cols(torch.cat(parts_v, 1)).T


SVD_REFS = {"tsv": ref_tsv, "iso_c": ref_iso_c, "iso_cts": ref_iso_cts}


def _random(shape, n, seed=0, spread=0.1):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g)
    return b, [b + spread * torch.randn(shape, generator=g) for _ in range(n)]


# --- slerp --------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.3, 0.5, 0.9, -0.2, 1.5])
@pytest.mark.parametrize("shape", [(5,), (64, 33), (3, 5, 17)])
def test_slerp_matches_textbook(shape, t):
    b, (x,) = _random(shape, 1, spread=1.0)            # about 45 degrees apart: the spherical branch
    torch.testing.assert_close(merge_tensors("slerp", b, [x], t=t), ref_slerp(b, x, t).float(), rtol=2e-6, atol=1e-6)


def test_slerp_ends_and_collinear_fallback():
    b, (x,) = _random((40, 9), 1, spread=1.0)
    assert torch.equal(merge_tensors("slerp", b, [x], t=0.0), b)
    assert torch.equal(merge_tensors("slerp", b, [x], t=1.0), x)
    for y in (2.5 * b, -0.5 * b, b + 1e-3 * x):        # |cos| > 0.9995: linear interpolation
        assert torch.equal(merge_tensors("slerp", b, [y], t=0.3), 0.7 * b + 0.3 * y)
    z = torch.zeros_like(b)                            # zero norm counts as 1: cos 0, 90 degrees
    torch.testing.assert_close(merge_tensors("slerp", z, [x], t=0.25), math.sin(0.25 * math.pi / 2) * x)


def test_slerp_default_t_is_a_half_and_needs_one_expert():
    b, xs = _random((6, 4), 2, spread=1.0)
    torch.testing.assert_close(merge_tensors("slerp", b, xs[:1]), ref_slerp(b, xs[0], 0.5).float())
    assert mbmerge.methods.get("slerp").min_experts == mbmerge.methods.get("slerp").max_experts == 1


# --- model_stock --------------------------------------------------------------------------------


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape,n", [((64, 33), 2), ((64, 33), 3), ((3, 5, 17), 4), ((50,), 3)])
def test_model_stock_matches_pairwise_cosines(shape, n, filter_wise):
    b, xs = _random(shape, n, seed=n)
    common = 0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(9))
    xs = [x + common for x in xs]                      # correlated deltas: 0 < t < 1
    got = merge_tensors("model_stock", b, xs, filter_wise=filter_wise)
    torch.testing.assert_close(got, ref_model_stock(b, xs, filter_wise).float(), rtol=1e-6, atol=1e-6)


def test_model_stock_edge_cases():
    b, (x,) = _random((8, 6), 1)
    mean = (x + x) / 2
    assert torch.equal(merge_tensors("model_stock", b, [x, x]), mean)            # cos 1 -> t 1
    d1, d2 = torch.zeros(8, 6), torch.zeros(8, 6)
    d1[:4], d2[4:] = 0.3, -0.2                                                   # orthogonal: t 0
    assert torch.equal(merge_tensors("model_stock", b, [b + d1, b + d2]), b)
    assert torch.equal(merge_tensors("model_stock", b, [b, x]), b)               # a zero delta: cos 0
    # filter_wise: rows where the deltas agree take the mean, orthogonal rows keep the base
    got = merge_tensors("model_stock", b, [x, b + d1 * (x - b)], filter_wise=True)
    assert torch.equal(got[4:], b[4:])
    torch.testing.assert_close(got[:4], ref_model_stock(b, [x, b + d1 * (x - b)], True)[:4].float())
    # three deltas at 120 degrees: mean cos -1/2, denominator 1 + 2c ~ 0 -> keep the base
    a = torch.tensor([[1.0, 0.0], [-0.5, math.sqrt(3) / 2], [-0.5, -math.sqrt(3) / 2]])
    b2 = torch.tensor([0.5, -1.0])
    assert torch.equal(merge_tensors("model_stock", b2, [b2 + a[i] for i in range(3)]), b2)


# --- tsv, iso_c, iso_cts ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
@pytest.mark.parametrize("shape,n", [((16, 12), 3), ((16, 13), 3), ((12, 20), 2), ((24, 24), 5)])
def test_svd_methods_match_explicit_steps(method, shape, n):
    b, xs = _random(shape, n, seed=sum(shape) + n)
    got = merge_tensors(method, b, xs, scale=0.7)
    want = b.double() + 0.7 * SVD_REFS[method]([x.double() - b.double() for x in xs])
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
@pytest.mark.parametrize("shape", [(7,), (2, 3, 4)])
def test_svd_methods_average_tensors_that_are_not_matrices(method, shape):
    b, xs = _random(shape, 3)
    want = b + 0.5 * (sum(x - b for x in xs) / 3)
    torch.testing.assert_close(merge_tensors(method, b, xs, scale=0.5), want, rtol=0, atol=1e-6)


def test_iso_c_spectrum_is_flat_and_iso_cts_with_f_1_is_iso_c():
    b, xs = _random((20, 14), 3)
    tau = merge_tensors("iso_c", b, xs) - b
    s = torch.linalg.svdvals(tau.double())
    s_sum = torch.linalg.svdvals(sum(x - b for x in xs).double())
    torch.testing.assert_close(s, s_sum.mean().expand_as(s), rtol=1e-5, atol=0)
    torch.testing.assert_close(merge_tensors("iso_cts", b, xs, common_fraction=1.0), merge_tensors("iso_c", b, xs),
                               rtol=1e-5, atol=1e-5)
    s_cts = torch.linalg.svdvals((merge_tensors("iso_cts", b, xs) - b).double())
    assert float(s_cts.max() / s_cts.min()) < 1 + 1e-4


@pytest.mark.parametrize("shape,n", [((10, 5), 3), ((12, 9), 3), ((9, 16), 4)])
def test_tsv_recovers_the_sum_of_deltas_in_orthogonal_subspaces(shape, n):
    """Deltas of rank floor(r/T) (rank 1 for (10, 5), 3 tasks) in mutually orthogonal subspaces:
    TSV keeps each one whole and the concatenated singular vectors are already orthonormal."""
    g = torch.Generator().manual_seed(1)
    m, k = shape[0], min(shape) // n
    u = torch.linalg.qr(torch.randn(m, n * k, generator=g)).Q                     # [m, T k]
    v = torch.linalg.qr(torch.randn(shape[1], n * k, generator=g)).Q              # [n, T k]
    ds = [u[:, i * k:(i + 1) * k] @ torch.diag(torch.rand(k, generator=g) + 0.5) @ v[:, i * k:(i + 1) * k].T
          for i in range(n)]
    b = torch.randn(shape, generator=g)
    torch.testing.assert_close(merge_tensors("tsv", b, [b + d for d in ds]), b + sum(ds), rtol=0, atol=2e-6)


def test_iso_cts_common_rank_stays_in_range():
    # r = 7, f = 0.1, T = 2: FusionBench's round(7 / 2) * 2 = 8 > r; here 3 per task, common rank 1
    b, xs = _random((7, 9), 2)
    out = merge_tensors("iso_cts", b, xs, common_fraction=0.1)
    s = torch.linalg.svdvals((out - b).double())
    assert torch.isfinite(out).all() and float(s.max() / s.min()) < 1 + 1e-4


# --- end to end ---------------------------------------------------------------------------------

def test_svd_methods_merge_embeddings_with_empty_keep_base(family, tmp_path):
    p, t = family["paths"], family["tensors"]
    out = read_model(mbmerge.merge("iso_c", base=str(p["base"]), experts=[str(p["math"]), str(p["code"])],
                                   out=tmp_path / "m", progress=False, keep_base=""))
    name = "model.embed_tokens.weight"
    lib = merge_tensors("iso_c", t["base"][name].bfloat16(), [t[e][name].bfloat16() for e in ["math", "code"]])
    assert torch.equal(out[name], lib)


def test_tensor_span_refuses_a_tensor_over_the_budget(family, tmp_path):
    p = family["paths"]
    with pytest.raises(BadParameter, match=r"tensor model\.layers\.\d+\.mlp\.\w+\.weight \[\d+, \d+\] must be "
                                           r"merged whole.*--memory-budget"):
        mbmerge.merge("tsv", base=str(p["base"]), experts=[str(p[e]) for e in ["math", "code", "ifeval"]],
                      out=tmp_path / "m", progress=False, memory_budget="100KB")
