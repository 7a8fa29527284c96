"""Model-wide ("global") magnitude ranks, the mask methods (consensus, dataless Localize-and-Stitch)
and --protocol mergebench, against plain references written here: each expert's deltas over every
merged tensor concatenated in memory in the engine's visiting order (file order of the base), a
stable sort on the concatenation (or, with keep_ties, kthvalue), explicit masks.

Tie rule (as per tensor): exactly k entries, ties at the k-th largest broken by visiting order; with
keep_ties every entry equal to the k-th largest is kept (more than k when the value repeats, as on
bf16 models)."""
import re
from math import floor

import pytest
import torch

import mbmerge
from conftest import read_model, top_mask, visit_order
from test_methods import ref_ties

EMBEDDINGS = re.compile(r"embed_tokens|lm_head")


def kth_largest(ds, rho):
    """The k-th largest |d| over the concatenation of ds, k = max(1, floor(rho n))."""
    flat = torch.cat([d.flatten() for d in ds]).abs()
    k = max(1, floor(rho * flat.numel()))
    return flat.kthvalue(flat.numel() - k + 1).values


def global_masks(ds: list, rho: float, keep_ties: bool = False) -> list:
    """Per tensor, the entries of the k largest |d| over the concatenation of ds (in visiting order),
    k = max(1, floor(rho n)); keep_ties: every |d| >= the k-th largest."""
    a = torch.cat([d.flatten() for d in ds]).abs()
    k = max(1, floor(rho * a.numel()))
    flat = a >= kth_largest(ds, rho) if keep_ties else top_mask(a, k)
    return [m.view(d.shape) for m, d in zip(flat.split([d.numel() for d in ds]), ds)]


def inputs(family, experts, keep=None):
    """base, experts' tensors, and the merged tensors' names in the engine's visiting order."""
    t = family["tensors"]
    names = [n for n in visit_order(family["paths"]["base"]) if not (keep and keep.search(n))]
    return t["base"], [t[e] for e in experts], names


def masked_experts(base, xs, names, rho, keep_ties=False) -> list[dict]:
    """Each expert's tensors with the deltas outside its model-wide mask set to 0."""
    out = []
    for x, r in zip(xs, rho):
        masks = global_masks([x[n] - base[n] for n in names], r, keep_ties)
        out.append({n: base[n] + (x[n] - base[n]) * m for n, m in zip(names, masks)})
    return out


def ref_consensus(b, xs, w, lam_tall, k, lam=1.0):
    e = [wi * (x - b) for x, wi in zip(xs, w)]
    tau = sum(e[1:], e[0])
    votes = sum((ei.abs() >= li * (tau - ei).abs()).int() for ei, li in zip(e, lam_tall))
    return b + lam * tau * (votes >= k)


def ref_stitch(b, xs, masks):
    ds = [x - b for x in xs]
    masks = [m.float() for m in masks]
    return b + sum(m * d for m, d in zip(masks, ds)) / torch.clamp(sum(masks), min=1)


def merge(family, tmp_path, name, method, experts, **params):
    out = mbmerge.merge(method, base=str(family["paths"]["base"]), progress=False, out=tmp_path / name,
                        experts=[str(family["paths"][e]) for e in experts], **params)
    return read_model(out)


def assert_close_bf16(got, want, name):
    assert torch.equal(got, want.to(torch.bfloat16)), f"{name}: max diff {(got.float() - want).abs().max()}"


@pytest.mark.parametrize("budget", ["2GB", "100KB"])     # 100KB: 4096-element chunks
@pytest.mark.parametrize("keep_ties", [False, True])
def test_model_wide_ties_ranks_the_concatenation(family, tmp_path, budget, keep_ties):
    base, xs, names = inputs(family, ["math", "code"])
    rho = [0.3, 0.1]
    masks = [global_masks([x[n] - base[n] for n in names], r, keep_ties) for x, r in zip(xs, rho)]
    total = sum(base[n].numel() for n in names)
    kept = sum(int(m.sum()) for m in masks[0])
    assert kept > floor(0.3 * total) if keep_ties else kept == floor(0.3 * total)   # bf16 deltas tie
    got = merge(family, tmp_path, "m", "ties", ["math", "code"], density=rho, sparsify_scope="model",
                memory_budget=budget, keep_ties=keep_ties)
    masked = masked_experts(base, xs, names, rho, keep_ties)
    for n in names:
        # ref_ties trims per tensor; a per-tensor density of 1 with explicit global masks is the same thing
        assert_close_bf16(got[n], ref_ties(base[n], [x[n] for x in masked], [1.0, 1.0], [1.0, 1.0]), n)


def test_model_wide_scope_excludes_kept_tensors_from_the_ranking(family, tmp_path):
    base, xs, names = inputs(family, ["math", "code"], keep=EMBEDDINGS)
    masked = masked_experts(base, xs, names, [0.2, 0.2])
    got = merge(family, tmp_path, "m", "ties", ["math", "code"], density=0.2, sparsify_scope="model",
                keep_base="embed_tokens|lm_head")
    for n in base:
        if EMBEDDINGS.search(n):
            assert torch.equal(got[n].float(), base[n])
        else:
            assert_close_bf16(got[n], ref_ties(base[n], [x[n] for x in masked], [1.0, 1.0], [1.0, 1.0]), n)


def test_thresholds_stream_exactly_for_any_chunking():
    g = torch.Generator().manual_seed(0)
    b = [torch.randn(n, generator=g) for n in (5000, 123, 40_000)]
    xs = [[t + torch.randn(t.shape, generator=g).round(decimals=2) for t in b] for _ in range(2)]  # many ties
    method, params = mbmerge.methods.get("ties"), {"density": [0.17, 0.17]}
    want = []
    for xe in xs:                                  # the k-th largest and how many of its ties are kept
        ds = [x - bt for x, bt in zip(xe, b)]
        t, a = kth_largest(ds, 0.17), torch.cat([d.flatten() for d in ds]).abs()
        want.append([(float(t), floor(0.17 * a.numel()) - int((a > t).sum()))])
    for step in (4096, 997, 1 << 20):
        def chunks():
            for j, bt in enumerate(b):
                for a in range(0, bt.numel(), step):
                    yield bt[a:a + step], [xe[j][a:a + step] for xe in xs], a
        got = mbmerge.methods.thresholds(method, params, chunks, sum(t.numel() for t in b))
        assert [[tuple(bound) for bound in row] for row in got.bounds] == want


def test_consensus_by_hand():
    b = torch.zeros(4)
    xs = [torch.tensor([1.0, 1.0, 0.0, 0.1]), torch.tensor([1.0, -1.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0, 0.0])]
    # tau = [3, 0, 1, 0.1]; TALL masks |e_i| >= 0.2 |tau - e_i|:
    # x1: [1>=.4, 1>=.2, 0>=.2 no, .1>=0 yes]; x2: [yes, 1>=.2, 1>=0, 0>=.02 no]; x3: [yes, 0>=0 yes, no, no]
    out = mbmerge.methods.consensus(b, xs)
    assert torch.equal(out, torch.tensor([3.0, 0.0, 0.0, 0.0]))          # votes [3, 3, 1, 1], k = 2
    assert torch.equal(mbmerge.methods.consensus(b, xs, k=1), torch.tensor([3.0, 0.0, 1.0, 0.1]))


@pytest.mark.parametrize("k,lam_tall,w", [(2, [0.2] * 3, [1.0] * 3), (1, [0.5, 0.2, 0.9], [0.5, 1.0, 2.0]),
                                          (3, [0.1] * 3, [1.0] * 3)])
def test_consensus_matches_reference(k, lam_tall, w):
    g = torch.Generator().manual_seed(k)
    b = torch.randn(3000, generator=g)
    xs = [b + torch.randn(3000, generator=g) * 0.01 for _ in range(3)]
    got = mbmerge.methods.consensus(b, xs, k=k, tall_lambda=lam_tall, weights=w, scale=0.7)
    torch.testing.assert_close(got, ref_consensus(b, xs, w, lam_tall, k, lam=0.7), rtol=0, atol=1e-6)


def test_consensus_on_a_ties_vector():
    g = torch.Generator().manual_seed(5)
    b = torch.randn(2000, generator=g)
    xs = [b + torch.randn(2000, generator=g) * 0.01 for _ in range(3)]
    tau = ref_ties(b, xs, [1.0] * 3, [0.3] * 3) - b
    e = [x - b for x in xs]
    keep = sum((ei.abs() >= 0.2 * (tau - ei).abs()).int() for ei in e) >= 2
    got = mbmerge.methods.consensus(b, xs, mtl="ties", density=0.3)
    torch.testing.assert_close(got, b + tau * keep, rtol=0, atol=1e-6)


def test_localize_stitch_averages_overlaps():
    b = torch.zeros(5)
    xs = [torch.tensor([4.0, 3.0, 0.1, 0.0, 0.0]), torch.tensor([2.0, 0.0, 0.0, 5.0, 0.2])]
    # sparsity 0.4 -> k = 2: x1 keeps [4, 3], x2 keeps [2, 5]; entry 0 is kept by both -> (4 + 2) / 2
    out = mbmerge.methods.localize_stitch(b, xs, sparsity=0.4)
    assert torch.equal(out, torch.tensor([3.0, 3.0, 0.0, 5.0, 0.0]))


def test_dataless_localize_stitch_is_model_wide_and_keeps_embeddings(family, tmp_path):
    experts = ["math", "code", "ifeval"]
    base, xs, names = inputs(family, experts, keep=EMBEDDINGS)
    masks = [dict(zip(names, global_masks([x[n] - base[n] for n in names], 0.1))) for x in xs]
    got = merge(family, tmp_path, "m", "localize_stitch", experts, memory_budget="100KB")
    for n in base:
        want = base[n] if EMBEDDINGS.search(n) else ref_stitch(base[n], [x[n] for x in xs], [m[n] for m in masks])
        assert_close_bf16(got[n], want, n)


def test_consensus_engine_matches_reference(family, tmp_path):
    experts = ["math", "code", "ifeval"]
    base, xs, names = inputs(family, experts)
    got = merge(family, tmp_path, "m", "consensus", experts, scale=0.8)
    for n in names:
        assert_close_bf16(got[n], ref_consensus(base[n], [x[n] for x in xs], [1.0] * 3, [0.2] * 3, 2, 0.8), n)


def test_protocol_mergebench(family, tmp_path):
    experts = ["math", "code"]
    base, xs, names = inputs(family, experts, keep=EMBEDDINGS)
    masked = masked_experts(base, xs, names, [0.2, 0.2], keep_ties=True)    # MergeBench: kthvalue, then >=
    got = merge(family, tmp_path, "m", "ties", experts, density=0.2, scale=0.6, protocol="mergebench")
    for n in base:
        if EMBEDDINGS.search(n):
            assert torch.equal(got[n].float(), base[n])
            continue
        want = ref_ties(base[n], [x[n] for x in masked], [1.0, 1.0], [1.0, 1.0], lam=0.6, aggregate="sum")
        assert_close_bf16(got[n], want, n)
    card = (tmp_path / "m" / "mbmerge.json").read_text()
    assert '"sparsify_scope": "model"' in card and '"aggregate": "sum"' in card and "--protocol mergebench" in card
    assert '"keep_ties": true' in card


def test_protocol_lets_explicit_parameters_win(family, tmp_path):
    spec = mbmerge.engine.spec.MergeSpec(method="ties", experts=("a", "b"), base="B", out=tmp_path / "o",
                                         protocol="mergebench", params={"aggregate": "mean"})
    assert spec.resolved["aggregate"] == "mean" and spec.resolved["sparsify_scope"] == "model"
    plain = mbmerge.engine.spec.MergeSpec(method="ties", experts=("a",), base="B", out=tmp_path / "o")
    assert spec.keep_base and plain.keep_base is None


@pytest.mark.parametrize("method,params", [("ties", dict(density=0.3, sparsify_scope="model")),
                                           ("localize_stitch", {}), ("breadcrumbs", dict(density=0.4))])
def test_state_dicts_merge_in_memory_like_the_engine(family, tmp_path, method, params):
    t = family["tensors"]
    experts = ["math", "code", "ifeval"]
    order = visit_order(family["paths"]["base"])     # model-wide ties are broken in the state dict's order
    bf16 = lambda sd: {n: sd[n].to(torch.bfloat16) for n in order}  # noqa: E731
    got = mbmerge.methods.merge_state_dicts(method, bf16(t["base"]), [bf16(t[e]) for e in experts], **params)
    want = merge(family, tmp_path, "m", method, experts, **params)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
