"""mergekit 0.1.5's further methods (nearswap, sce, ...): each against a plain-torch reference written here
from the formula, on small tensors through the library and on the `family` fixture through the engine;
chunking; a recipe of each; parity with mergekit where test_mergekit_parity's cases do not cover it
(set MBMERGE_MERGEKIT; those are skipped otherwise). The registry-wide properties (engine equals library,
chunking, docs) are test_all_methods.py's."""
import json
import os
import shutil

import pytest
import torch

import mbmerge
from conftest import read_model
from mbmerge.engine.recipe.document import load_recipe

MERGEKIT = os.environ.get("MBMERGE_MERGEKIT") or shutil.which("mergekit-yaml")
needs_mergekit = pytest.mark.skipif(not MERGEKIT, reason="mergekit-yaml not found (set MBMERGE_MERGEKIT)")


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between a and b in bf16 units in the last place (after rounding both to bf16)."""
    from test_mergekit_parity import ulps as each
    return int(each(a.to(torch.bfloat16), b.to(torch.bfloat16)).max()) if a.numel() else 0


def engine_merge(family, tmp_path, method, experts, name="out", **params) -> dict:
    p = family["paths"]
    return read_model(mbmerge.merge(method, base=str(p["base"]), experts=[str(p[e]) for e in experts],
                                    out=tmp_path / name, progress=False, **params))


def random_family(n=3, shape=(40, 24), seed=0):
    """b and n experts x_i = b + small deltas, a tenth of them larger (bf16-rounded, as stored weights are)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g) * 0.05
    xs = [b + torch.randn(shape, generator=g) * 1e-3 + (torch.rand(shape, generator=g) < 0.1)
          * torch.randn(shape, generator=g) * 2e-2 for _ in range(n)]
    return b.bfloat16().float(), [x.bfloat16().float() for x in xs]


def write_recipe(tmp_path, text: str):
    path = tmp_path / "recipe.yml"
    path.write_text(text)
    return load_recipe(path)


# -- nearswap

def nearswap_ref(b, x, t):
    """Per element: x where |x - b| <= t, else b moved by t toward x (|d| < 1e-6 aside: w = min(1, t / 1e-6))."""
    out = torch.empty_like(b).view(-1)
    for j, (bj, xj) in enumerate(zip(b.view(-1).tolist(), x.view(-1).tolist())):
        d = xj - bj
        w = min(1.0, max(0.0, t / max(abs(d), 1e-6)))
        out[j] = bj + w * d
    return out.view(b.shape)


@pytest.mark.parametrize("t", [0.0, 5e-4, 4e-3, 1.0])
def test_nearswap_takes_the_expert_where_it_is_near_and_moves_t_toward_it_elsewhere(t):
    b, (x,) = random_family(1)
    got = mbmerge.methods.nearswap(b, [x], t=t)
    assert torch.allclose(got, nearswap_ref(b, x, t), rtol=0, atol=1e-7)
    d = x - b
    near = d.abs() <= t
    assert torch.equal(got[near], x[near])
    assert torch.allclose((got - b)[~near], t * d[~near].sign(), rtol=1e-5, atol=1e-8)


def test_nearswap_engine_merge_matches_the_reference(family, tmp_path):
    t = family["tensors"]
    got = engine_merge(family, tmp_path, "nearswap", ["math"], t=4e-3)
    for name, b in t["base"].items():
        assert ulps(got[name], nearswap_ref(b, t["math"][name], 4e-3)) <= 1, name


def test_nearswap_recipe_loads_and_requires_t(tmp_path, family):
    p = family["paths"]
    text = f"merge_method: nearswap\nbase_model: {p['base']}\nmodels:\n  - model: {p['math']}\n"
    r = write_recipe(tmp_path, text + "parameters: {t: 0.001}\n")
    assert (r["method"], r["experts"], r["params"]) == ("nearswap", [str(p["math"])], {"t": 0.001})
    with pytest.raises(mbmerge.MbmergeError, match="parameters.t"):
        write_recipe(tmp_path, text)


# -- sce

def sce_top_k(ds: torch.Tensor, select_topk: float) -> tuple[torch.Tensor, int, float]:
    """(keep, k, the k-th largest variance) of deltas [N, n]: a stable sort picks the top k, ties by position."""
    v = torch.var(ds, dim=0, unbiased=False)
    k = int(torch.tensor(int((v != 0).sum())) * select_topk)
    order = sorted(range(v.numel()), key=lambda j: (-float(v[j]), j))
    keep = torch.zeros(v.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep, k, float(v[order[k - 1]]) if k else float("inf")


def sce_ref(b, xs, select_topk=1.0, keep=None):
    """SCE from its three steps on whole tensors; keep: the selected entries (default sce_top_k's)."""
    ds = torch.stack([x - b for x in xs]).view(len(xs), -1)             # [N, n]
    if keep is not None or select_topk < 1:
        ds = ds * (keep if keep is not None else sce_top_k(ds, select_topk)[0])
    ms = [float(d.double().square().mean()) for d in ds]
    w = [1 / len(ms)] * len(ms) if abs(sum(ms)) < 1e-6 else [m / sum(ms) for m in ms]
    out = b.clone().view(-1)
    for j in range(ds.shape[1]):
        col = ds[:, j].tolist()
        s = 1.0 if sum(col) >= 0 else -1.0
        agree = [wi if d != 0 and (d > 0) == (s > 0) else 0.0 for d, wi in zip(col, w)]
        out[j] += sum(a * d for a, d in zip(agree, col)) / max(sum(agree), 1e-6)
    return out.view(b.shape)


@pytest.mark.parametrize("n,select_topk", [(1, 1.0), (2, 1.0), (3, 1.0), (3, 0.3), (4, 0.05), (3, 0.0)])
def test_sce_selects_calculates_and_erases_as_the_formula(n, select_topk):
    b, xs = random_family(n, seed=n)
    got = mbmerge.methods.sce(b, xs, select_topk=select_topk)
    assert torch.allclose(got, sce_ref(b, xs, select_topk), rtol=1e-5, atol=1e-8)


def test_sce_keeps_exactly_k_of_tied_variances_by_position():
    b = torch.zeros(10)
    x1 = torch.tensor([1., 2., 2., 2., 0., 2., 1., 3., 0., 2.])        # two experts: variance (d1 - d2)^2 / 4
    x2 = torch.zeros(10)
    got = mbmerge.methods.sce(b, [x1, x2], select_topk=0.5)              # nnz 8 -> k 4: the 3 and the first 2s
    assert got.ne(0).nonzero().view(-1).tolist() == [1, 2, 3, 7]


def test_sce_weights_fall_back_to_uniform_below_1e_6():
    b = torch.zeros(4)
    xs = [torch.tensor([1e-4, 0, 0, 0]), torch.tensor([3e-4, 3e-4, 0, 0])]   # mean squares sum to ~5e-8
    assert torch.allclose(mbmerge.methods.sce(b, xs), torch.tensor([2e-4, 3e-4, 0, 0]))


@pytest.mark.parametrize("select_topk", [1.0, 0.4])
def test_sce_engine_merge_matches_the_reference(family, tmp_path, select_topk):
    t, experts = family["tensors"], ["math", "code", "ifeval"]
    got = engine_merge(family, tmp_path, "sce", experts, select_topk=select_topk)
    for name, b in t["base"].items():
        assert ulps(got[name], sce_ref(b, [t[e][name] for e in experts], select_topk)) <= 1, name


def test_sce_top_k_does_not_depend_on_chunking(wide_family, tmp_path):
    runs = {}
    for budget in ("2GB", "100KB"):                                  # 100KB: 4096-element chunks
        out = engine_merge(wide_family, tmp_path, "sce", ["e0", "e1", "e2"], budget, memory_budget=budget,
                           select_topk=0.3)
        runs[budget] = {n: v.view(torch.int16) for n, v in out.items()}
    assert json.loads((tmp_path / "100KB" / "mbmerge.json").read_text())["chunk_elements"] == 4096
    assert runs["2GB"].keys() == runs["100KB"].keys()
    assert all(torch.equal(runs["2GB"][n], runs["100KB"][n]) for n in runs["2GB"])


def test_sce_recipe_loads_with_mergekits_defaults(tmp_path, family):
    p = family["paths"]
    r = write_recipe(tmp_path, f"merge_method: sce\nbase_model: {p['base']}\nmodels:\n  - model: {p['math']}\n"
                               f"  - model: {p['code']}\nparameters: {{int8_mask: true}}\n")
    assert (r["method"], r["params"]) == ("sce", {"select_topk": 1.0})


@needs_mergekit
def test_sce_top_k_matches_mergekit_but_for_tied_variances(family, tmp_path):
    """mergekit's torch.topk keeps an arbitrary choice among the variances tied at the k-th. Its output must be
    SCE with exactly k entries selected, another choice among those ties (read off its output: a selected
    entry moves off the base), within 1 ulp everywhere; mbmerge's differs only where the choices do, and by
    the mean squares they change."""
    from test_mergekit_parity import run_both
    experts = ["math", "code"]
    mk, mb, _ = run_both(family, tmp_path, ("sce", experts, None, {"select_topk": 0.3}))
    t, other, tied = family["tensors"], 0, 0
    for name, b in t["base"].items():
        xs = [t[e][name] for e in experts]
        ds = torch.stack([x - b for x in xs]).view(len(experts), -1)
        keep, k, kth = sce_top_k(ds, 0.3)
        v = torch.var(ds, dim=0, unbiased=False)
        moved = mk[name].view(-1) != b.view(-1).bfloat16()
        theirs = (v > kth) | ((v == kth) & moved)
        assert int(theirs.sum()) == k, name
        assert ulps(mk[name], sce_ref(b, xs, keep=theirs.view(b.shape).view(-1))) <= 1, name
        assert ulps(mb[name], sce_ref(b, xs, keep=keep)) <= 1, name
        other, tied = other + int((theirs != keep).sum()), tied + int((v == kth).sum())
    print(f"\nsce select_topk 0.3: mergekit chose otherwise at {other} of the {tied} tied variances")


def mergekit_merge(family, tmp_path, method, models: list[tuple[str, dict]], glob: dict, base=True) -> dict:
    """mergekit-yaml's bf16 output of a recipe of the family's models (name, per-model parameters)."""
    import subprocess
    p = family["paths"]
    flow = lambda d: "{" + ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}"  # noqa: E731
                                     for k, v in d.items()) + "}"
    lines = [f"merge_method: {method}", *([f"base_model: {p['base']}"] if base else []), "models:",
             *[f"  - {{model: {p[m]}, parameters: {flow(q)}}}" for m, q in models],
             f"parameters: {flow(glob)}", "dtype: float32", "out_dtype: bfloat16"]
    (tmp_path / "mk.yml").write_text("\n".join(lines) + "\n")
    done = subprocess.run([MERGEKIT, str(tmp_path / "mk.yml"), str(tmp_path / "mk"), "--no-copy-tokenizer"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return read_model(tmp_path / "mk")


# -- multislerp, nuslerp, karcher (methods/hypersphere.py)

def multislerp_ref(b, xs, w, normalize=True, eps=1e-8):
    """The blog's recipe on flat float64 vectors: units, their weighted mean m^, the weighted tangent vectors at
    m^ and the exponential map along their sum, scaled to the weighted mean norm."""
    if len(xs) == 1:
        return xs[0]
    v = torch.stack([(x - b).double().view(-1) for x in xs])           # [N, n]
    w = torch.tensor(w, dtype=torch.float64)
    w = w / w.sum() if normalize else w
    norms = v.norm(dim=1, keepdim=True)
    u = v / (norms + eps)
    m = (w[:, None] * u).sum(0)
    m = m / m.norm()
    tangent = (w[:, None] * (u - (u @ m)[:, None] * m)).sum(0)
    tn = tangent.norm() + eps
    out = (m * torch.cos(tn) + tangent * torch.sin(tn) / tn) * (w * norms[:, 0]).sum()
    return (b.double() + out.view(b.shape)).float()


@pytest.mark.parametrize("n,w,normalize", [(1, [1.0], True), (2, [0.7, 0.3], True), (3, [0.5, 0.3, 0.2], True),
                                           (3, [1.0, 0.6, 0.4], False)])
def test_multislerp_is_the_tangent_space_barycentre(n, w, normalize):
    b, xs = random_family(n, seed=10 + n)
    got = mbmerge.methods.multislerp(b, xs, weights=w, normalize_weights=normalize)
    assert torch.allclose(got, multislerp_ref(b, xs, w, normalize), rtol=1e-5, atol=1e-7)


def test_multislerp_of_antipodal_experts():
    """|m| = 0: two experts fall back to b + w_1 d_1 + w_2 d_2, more fail naming the weights."""
    b, d = torch.zeros(6), torch.arange(6.0)
    assert torch.allclose(mbmerge.methods.multislerp(b, [d, -d], weights=[0.5, 0.5]), torch.zeros(6))
    with pytest.raises(ValueError, match="other weights"):
        mbmerge.methods.multislerp(b, [d, -d, d, -d], weights=[1.0])


def slerp_ref(v1, v2, t):
    """Textbook slerp of two float64 vectors (linear where they are parallel)."""
    cos = float(v1 @ v2 / (max(float(v1.norm()), 1e-7) * max(float(v2.norm()), 1e-7)))
    cos = max(-1.0, min(1.0, cos))
    if 1 - cos * cos <= 1e-16:
        return (1 - t) * v1 + t * v2
    th = torch.tensor(cos, dtype=torch.float64).acos()
    return (torch.sin((1 - t) * th) * v1 + torch.sin(t * th) * v2) / torch.sin(th)


def nuslerp_ref(b, xs, w, flatten=True, row_wise=False):
    t = w[1] / sum(w)
    d1, d2 = ((x - b).double() for x in xs)
    if flatten or b.dim() == 1:
        out = slerp_ref(d1.view(-1), d2.view(-1), t).view(b.shape)
    elif row_wise:                                                   # columns
        out = torch.stack([slerp_ref(d1[:, j], d2[:, j], t) for j in range(b.shape[1])], dim=1)
    else:
        out = torch.stack([slerp_ref(d1[i], d2[i], t) for i in range(b.shape[0])])
    return (b.double() + out).float()


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("shape", [(40, 24), (24,)])
def test_nuslerp_slerps_whole_tensors_rows_or_columns(flatten, row_wise, shape):
    b, xs = random_family(2, shape, seed=7)
    got = mbmerge.methods.nuslerp(b, xs, weights=[0.7, 0.3], nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    assert torch.allclose(got, nuslerp_ref(b, xs, [0.7, 0.3], flatten, row_wise), rtol=1e-5, atol=1e-7)


def karcher_ref(xs, max_iter=10, tol=1e-5):
    """Gradient descent for the Karcher mean of the directions on the sphere, in float64 on whole vectors."""
    if len(xs) == 1:
        return xs[0]
    v = [x.double().view(-1) for x in xs]
    norms = [float(x.norm()) for x in v]
    units = [x / nx for x, nx in zip(v, norms) if nx > tol]
    mu = sum(units) / len(units)
    mu = mu / mu.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mu)
        for u in units:
            th = torch.clamp(mu @ u, -1, 1).acos()
            if th >= tol:
                tangent += th / th.sin() * (u - torch.cos(th) * mu) / len(units)
        tn = tangent.norm()
        if tn < tol:
            break
        mu = torch.cos(tn) * mu + torch.sin(tn) * tangent / tn
        mu = mu / mu.norm()
    return (sum(norms) / len(xs) * mu).view(xs[0].shape).float()


@pytest.mark.parametrize("n,max_iter", [(1, 10), (2, 10), (3, 10), (4, 1), (4, 50)])
def test_karcher_is_the_riemannian_mean_of_the_directions(n, max_iter):
    _, xs = random_family(n, seed=20 + n)
    got = mbmerge.methods.karcher(None, xs, max_iter=max_iter)
    assert torch.allclose(got, karcher_ref(xs, max_iter), rtol=1e-5, atol=1e-7)


def test_karcher_leaves_out_inputs_of_tiny_norm():
    xs = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1e-7, 0.0])]
    s = (1 + 1 + 1e-7) / 3                                           # the mean norm counts every input
    assert torch.allclose(mbmerge.methods.karcher(None, xs), torch.tensor([s, s]) / 2 ** 0.5)


@pytest.mark.parametrize("method,experts,params,ref", [
    ("multislerp", ["math", "code", "ifeval"], {"weights": [0.5, 0.3, 0.2]},
     lambda b, xs: multislerp_ref(b, xs, [0.5, 0.3, 0.2])),
    ("nuslerp", ["math", "code"], {"weights": [0.7, 0.3]}, lambda b, xs: nuslerp_ref(b, xs, [0.7, 0.3])),
    ("nuslerp", ["math", "code"], {"weights": [0.7, 0.3], "nuslerp_flatten": False},
     lambda b, xs: nuslerp_ref(b, xs, [0.7, 0.3], False)),
    ("nuslerp", ["math", "code"], {"weights": [0.7, 0.3], "nuslerp_flatten": False, "nuslerp_row_wise": True},
     lambda b, xs: nuslerp_ref(b, xs, [0.7, 0.3], False, True)),
    ("karcher", ["math", "code", "ifeval"], {}, lambda b, xs: karcher_ref(xs)),
])
def test_hypersphere_engine_merges_match_the_references(family, tmp_path, method, experts, params, ref):
    t = family["tensors"]
    got = engine_merge(family, tmp_path, method, experts, **params)
    for name, b in t["base"].items():
        assert ulps(got[name], ref(b, [t[e][name] for e in experts])) <= 1, name


@pytest.mark.parametrize("params", [{"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}])
def test_nuslerp_rows_and_columns_do_not_depend_on_chunking(wide_family, tmp_path, params):
    runs = {}
    for budget in ("2GB", "100KB"):
        out = engine_merge(wide_family, tmp_path, "nuslerp", ["e0", "e1"], budget, memory_budget=budget,
                           weights=[0.6, 0.4], **params)
        runs[budget] = {n: v.view(torch.int16) for n, v in out.items()}
    assert all(torch.equal(runs["2GB"][n], runs["100KB"][n]) for n in runs["2GB"])


def test_hypersphere_recipes_load_with_mergekits_defaults(tmp_path, family):
    p = family["paths"]
    models = f"models:\n  - {{model: {p['math']}, parameters: {{weight: 0.7}}}}\n" \
             f"  - {{model: {p['code']}, parameters: {{weight: 0.3}}}}\n"
    for method, want in [("multislerp", {"weights": [0.7, 0.3], "normalize_weights": True, "eps": 1e-8}),
                         ("nuslerp", {"weights": [0.7, 0.3], "nuslerp_row_wise": False, "nuslerp_flatten": True})]:
        r = write_recipe(tmp_path, f"merge_method: {method}\nbase_model: {p['base']}\n{models}")
        assert (r["experts"], r["params"]) == ([str(p["math"]), str(p["code"])], want), method
    r = write_recipe(tmp_path, f"merge_method: karcher\nbase_model: {p['base']}\n{models.replace('weight', 'tol')}"
                     .replace("tol: 0.7", "").replace("tol: 0.3", "") + "parameters: {max_iter: 5}\n")
    assert r["experts"] == [str(p["math"]), str(p["code"]), str(p["base"])]      # mergekit: the base is an input
    assert r["params"] == {"max_iter": 5, "tol": 1e-5}


@needs_mergekit
@pytest.mark.parametrize("method,glob,params", [
    ("multislerp", {"normalize_weights": False}, {"normalize_weights": False}),
    ("nuslerp", {"nuslerp_flatten": False}, {"nuslerp_flatten": False}),
    ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True},
     {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("karcher", {"max_iter": 3, "tol": 1e-4}, {"max_iter": 3, "tol": 1e-4}),
])
def test_hypersphere_options_match_mergekit(family, tmp_path, method, glob, params):
    """The methods' options, set on mbmerge.merge directly (test_recipe reads them from a recipe); mergekit
    runs the recipe."""
    weighted = method != "karcher"
    experts = ["math", "code"]
    mk = mergekit_merge(family, tmp_path, method, [(e, {"weight": w} if weighted else {})
                                                   for e, w in zip(experts, [0.9, 0.6])], glob)
    if method == "karcher":
        experts = experts + ["base"]                                   # mergekit merges the base as an input
    mb = engine_merge(family, tmp_path, method, experts, **({"weights": [0.9, 0.6]} if weighted else {}), **params)
    worst = max(ulps(mb[n], mk[n]) for n in mb)
    print(f"\n{method} {glob}: max {worst} ulp")
    assert worst <= 1


# -- ram, ramplus_tl

def ram_ref(b, xs, eps=1e-5, r=None, alpha=None):
    """Per entry: the experts that changed it by more than eps; one: its delta (times lam_i with r), several:
    their mean delta. lam_i = 1 + r min(alpha, shared_i / unique_i) from counts over the tensor."""
    ds = [(x - b).view(-1).tolist() for x in xs]
    changed = [[abs(v) > eps for v in d] for d in ds]
    count = [sum(col) for col in zip(*changed)]
    lam = [1.0] * len(xs)
    if r is not None:
        for i, m in enumerate(changed):
            shared = sum(1 for j, c in enumerate(m) if c and count[j] > 1)
            unique = sum(1 for j, c in enumerate(m) if c and count[j] == 1)
            lam[i] = 1 + r * min(alpha, max(0.0, shared / max(unique, eps)))
    out = b.clone().view(-1)
    for j, c in enumerate(count):
        if c == 1:
            out[j] += sum(lam[i] * ds[i][j] for i in range(len(xs)) if changed[i][j])
        elif c > 1:
            out[j] += sum(ds[i][j] for i in range(len(xs)) if changed[i][j]) / c
    return out.view(b.shape)


@pytest.mark.parametrize("n,eps", [(1, 1e-5), (2, 1e-3), (3, 3e-3), (4, 1e-2)])
def test_ram_keeps_unique_deltas_and_averages_shared_ones(n, eps):
    b, xs = random_family(n, seed=30 + n)
    assert torch.allclose(mbmerge.methods.ram(b, xs, epsilon=eps), ram_ref(b, xs, eps), rtol=1e-5, atol=1e-8)
    got = mbmerge.methods.ramplus_tl(b, xs, epsilon=eps, r=0.5, alpha=0.8)
    assert torch.allclose(got, ram_ref(b, xs, eps, 0.5, 0.8), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method,params", [("ram", {"epsilon": 3e-3}), ("ramplus_tl", {"epsilon": 3e-3, "r": 0.5})])
def test_ram_engine_merges_match_the_reference(family, tmp_path, method, params):
    t, experts = family["tensors"], ["math", "code", "ifeval"]
    got = engine_merge(family, tmp_path, method, experts, **params)
    extra = {"r": 0.5, "alpha": 0.2} if method == "ramplus_tl" else {}
    for name, b in t["base"].items():
        assert ulps(got[name], ram_ref(b, [t[e][name] for e in experts], 3e-3, **extra)) <= 1, name


def test_ramplus_tl_gains_do_not_depend_on_chunking(wide_family, tmp_path):
    runs = {}
    for budget in ("2GB", "100KB"):
        out = engine_merge(wide_family, tmp_path, "ramplus_tl", ["e0", "e1", "e2"], budget, memory_budget=budget,
                           epsilon=1e-3, r=0.5, alpha=0.9)
        runs[budget] = {n: v.view(torch.int16) for n, v in out.items()}
    assert all(torch.equal(runs["2GB"][n], runs["100KB"][n]) for n in runs["2GB"])


def test_ram_recipes_load_with_mergekits_defaults(tmp_path, family):
    p = family["paths"]
    text = f"base_model: {p['base']}\nmodels:\n  - model: {p['math']}\n  - model: {p['code']}\n"
    assert write_recipe(tmp_path, "merge_method: ram\n" + text)["params"] == {"epsilon": 1e-5}
    r = write_recipe(tmp_path, "merge_method: ramplus_tl\n" + text + "parameters: {r: 0.3}\n")
    assert r["params"] == {"r": 0.3, "alpha": 0.2, "epsilon": 1e-5}


# -- arcee_fusion (methods/fusion_threshold.py)

def arcee_fusion_ref(b, x):
    """Per row r, KL_r = KL(softmax(x_r) + 1e-8 || softmax(b_r) + 1e-8); I = |x - b| KL_r; the quartiles of I
    taken from the ascending sort at floor(q (n - 1)); keep the entries with I >= Q2 + 1.5 (Q3 - Q1)."""
    rows_x, rows_b = x.reshape(-1, x.shape[-1]), b.reshape(-1, b.shape[-1])
    p = torch.softmax(rows_x, -1) + 1e-8
    q = torch.softmax(rows_b, -1) + 1e-8
    imp = ((rows_x - rows_b).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)).reshape(-1)
    ordered = imp.sort().values
    q1, q2, q3 = (ordered[int(torch.tensor(f) * (imp.numel() - 1))] for f in (0.25, 0.5, 0.75))
    keep = (imp >= q2 + 1.5 * (q3 - q1)).reshape(b.shape)
    return torch.where(keep, x, b)


@pytest.mark.parametrize("shape", [(40, 24), (300,), (3, 5, 16)])
def test_arcee_fusion_keeps_the_outlier_importances(shape):
    g = torch.Generator().manual_seed(4)
    b = torch.randn(shape, generator=g)
    x = b + 0.3 * torch.randn(shape, generator=g) * torch.rand(shape, generator=g) ** 4     # heavy-tailed changes
    got = mbmerge.methods.arcee_fusion(b, [x])
    assert torch.allclose(got, arcee_fusion_ref(b, x), atol=1e-6)
    assert 0 < int((got != b).sum()) < int((x != b).sum())          # some changes kept, not all


def test_arcee_fusion_engine_merge_matches_the_reference(family, tmp_path):
    got = engine_merge(family, tmp_path, "arcee_fusion", ["math"])
    t = family["tensors"]
    for n, b in t["base"].items():
        want = arcee_fusion_ref(b, t["math"][n]).bfloat16()
        assert ulps(got[n], want) <= 1, n


def test_arcee_fusion_does_not_depend_on_chunking(wide_family, tmp_path):
    p = wide_family["paths"]
    outs = [read_model(mbmerge.merge("arcee_fusion", base=str(p["base"]), experts=[str(p["e0"])], out=tmp_path / k,
                                     progress=False, kernels="torch", **kw))
            for k, kw in [("small", {"memory_budget": "100KB"}), ("whole", {})]]
    assert all(torch.equal(outs[0][n], outs[1][n]) for n in outs[1])
