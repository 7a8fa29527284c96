"""Parity with mergekit 0.1.5 on the `family` fixture: same inputs, equivalent parameters, every output tensor.

mergekit runs as a subprocess (it lives in its own environment): set MBMERGE_MERGEKIT=/path/to/mergekit-yaml
or put mergekit-yaml on PATH; otherwise these tests are skipped. mergekit computes in float32 here
(`dtype: float32`, `out_dtype: bfloat16`), as mbmerge does, so outputs agree up to:
- 1 bf16 ulp, from float32 sums taken in a different order (or fused) and then rounded to bf16;
- for ties, elements tied at a trim threshold: mergekit keeps exactly k entries by argsort, mbmerge keeps
  every entry with |d_i| >= thr_i. There, mergekit's value must be TIES with some of the tied entries dropped,
  and the differing elements can be at most the entries mbmerge keeps beyond k (summed over experts).
  On this bf16 fixture deltas are multiples of the base's ulp, so ties are common: at density 0.5 about 5%
  of elements differ (measured 1181 / 22688 with 2 experts, 1326 / 22688 with 3), all of them explained so.
"""
import itertools
import os
import shutil
import subprocess

import pytest
import torch

import mbmerge
from conftest import read_model

MERGEKIT = os.environ.get("MBMERGE_MERGEKIT") or shutil.which("mergekit-yaml")
pytestmark = pytest.mark.skipif(not MERGEKIT, reason="mergekit-yaml not found (set MBMERGE_MERGEKIT)")

# (method, experts, weights, mergekit global parameters, mbmerge parameters besides weights)
CASES = {
    "linear": ("linear", ["math", "code"], [0.7, 0.3], {"normalize": "true"}, {"normalize": True}),
    "task_arithmetic": ("task_arithmetic", ["math", "code"], [0.7, 0.3], {"normalize": "false", "lambda": 1.0},
                        {"normalize": False, "scale": 1.0}),
    "ties": ("ties", ["math", "code"], [0.7, 0.3], {"normalize": "true"},
             {"density": 0.5, "aggregate": "mean", "consensus": "sum"}),
    "ties-3": ("ties", ["math", "code", "ifeval"], [0.5, 0.3, 0.2], {"normalize": "true"},
               {"density": 0.5, "aggregate": "mean", "consensus": "sum"}),
}


def run_mergekit(family, tmp_path, method, experts, weights, mk_params, density=None):
    paths = family["paths"]
    per_model = lambda w: f"{{weight: {w}" + (f", density: {density}}}" if density else "}")
    lines = [f"merge_method: {method}", *([] if method == "linear" else [f"base_model: {paths['base']}"]), "models:",
             *[f"  - {{model: {paths[e]}, parameters: {per_model(w)}}}" for e, w in zip(experts, weights)],
             "parameters: {" + ", ".join(f"{k}: {v}" for k, v in mk_params.items()) + "}",
             "dtype: float32", "out_dtype: bfloat16"]
    (tmp_path / "mk.yml").write_text("\n".join(lines) + "\n")
    done = subprocess.run([MERGEKIT, str(tmp_path / "mk.yml"), str(tmp_path / "mk"), "--no-copy-tokenizer"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return read_model(tmp_path / "mk")


def run_both(family, tmp_path, case):
    method, experts, weights, mk_params, mb_params = CASES[case]
    mk = run_mergekit(family, tmp_path, method, experts, weights, mk_params, mb_params.get("density"))
    base = None if method == "linear" else str(family["paths"]["base"])
    out = mbmerge.merge(method, base=base, experts=[str(family["paths"][e]) for e in experts], out=tmp_path / "mb",
                        progress=False, weights=weights, **mb_params)
    mb = read_model(out)
    assert sorted(mb) == sorted(mk)
    assert all(mb[n].dtype == mk[n].dtype == torch.bfloat16 and mb[n].shape == mk[n].shape for n in mb)
    return mk, mb


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in bf16 units in the last place (bit patterns mapped to a monotonic integer line)."""
    def line(t):
        i = t.contiguous().view(torch.int16).int()
        return torch.where(i < 0, -32768 - i, i)   # sign-magnitude -> two's complement order; -0 == +0
    return (line(a) - line(b)).abs()


@pytest.mark.parametrize("case", ["linear", "task_arithmetic"])
def test_linear_family(family, tmp_path, case):
    mk, mb = run_both(family, tmp_path, case)
    d = {n: ulps(mb[n], mk[n]) for n in mb}
    worst = max(int(v.max()) for v in d.values())
    off = sum(int((v > 0).sum()) for v in d.values())
    abs_diff = max(float((mb[n].float() - mk[n].float()).abs().max()) for n in mb)
    print(f"\n{case}: {off} of {sum(v.numel() for v in d.values())} elements differ, max {worst} ulp, "
          f"max abs diff {abs_diff:.3g}")
    assert worst <= 1


def ties_candidates(b, ds, tied, thr, w):
    """bf16 TIES outputs for every choice of dropping threshold-tied entries ([2^K, n]); b, ds[i], tied[i]: [n]."""
    outs = []
    for drop in itertools.product([False, True], repeat=len(ds)):
        es = [d * ((d.abs() >= t) & ~(x & tied_i)) * wi for d, t, x, tied_i, wi in zip(ds, thr, drop, tied, w)]
        s = torch.where(sum(es) >= 0, 1.0, -1.0)                                   # elected sign, 0 -> +
        agree = [(e.sign() == s) for e in es]
        den = sum(a * wi for a, wi in zip(agree, w))
        m = sum(e * a for e, a in zip(es, agree)) / torch.where(den == 0, 1.0, den)
        outs.append((b + m).to(torch.bfloat16))
    return torch.stack(outs)


@pytest.mark.parametrize("case", ["ties", "ties-3"])
def test_ties(family, tmp_path, case):
    _, experts, w, _, params = CASES[case]
    mk, mb = run_both(family, tmp_path, case)
    t = family["tensors"]
    total = mismatched = ties = extra = 0
    for n in mb:
        b = t["base"][n].flatten()                                                  # [n]
        ds = [t[e][n].flatten() - b for e in experts]                               # K x [n]
        k = max(1, int(params["density"] * b.numel()))
        thr = [d.abs().kthvalue(d.numel() - k + 1).values for d in ds]              # k-th largest |d_i|
        tied = [d.abs() == th for d, th in zip(ds, thr)]
        any_tied = torch.stack(tied).any(0)
        bad = ulps(mb[n].flatten(), mk[n].flatten()) > 1
        assert not (bad & ~any_tied).any(), f"{n}: mismatch away from a threshold tie"
        cand = ties_candidates(b[bad], [d[bad] for d in ds], [x[bad] for x in tied], thr, w)
        assert (ulps(cand, mk[n].flatten()[bad].expand_as(cand)) <= 1).any(0).all(), \
            f"{n}: mergekit value is not TIES with some tied entries dropped"
        total, mismatched, ties = total + b.numel(), mismatched + int(bad.sum()), ties + int(any_tied.sum())
        extra += sum(int((d.abs() >= th).sum()) - k for d, th in zip(ds, thr))      # kept by mbmerge beyond k
    abs_diff = max(float((mb[n].float() - mk[n].float()).abs().max()) for n in mb)
    print(f"\n{case}: {mismatched} of {total} elements differ by > 1 ulp ({mismatched / total:.2e}); "
          f"{ties} elements tied at a threshold, {extra} entries kept beyond k; max abs diff {abs_diff:.3g}")
    assert mismatched <= extra


@pytest.mark.parametrize("case", ["task_arithmetic", "ties"])
def test_recipe(family, tmp_path, monkeypatch, case):
    """One mergekit YAML (mergekit's defaults left implicit) through mergekit-yaml and through load_recipe + merge;
    the outputs are then checked exactly as in the case of the same name above."""
    from mbmerge.engine.recipe import load_recipe
    method, experts, weights, _, mb_params = CASES[case]
    paths = family["paths"]
    density = f"parameters: {{density: {mb_params['density']}}}" if "density" in mb_params else ""
    (tmp_path / "recipe.yml").write_text("\n".join([
        f"merge_method: {method}", f"base_model: {paths['base']}", "models:",
        *[f"  - {{model: {paths[e]}, parameters: {{weight: {w}}}}}" for e, w in zip(experts, weights)],
        density, "dtype: float32", "out_dtype: bfloat16"]) + "\n")
    done = subprocess.run([MERGEKIT, str(tmp_path / "recipe.yml"), str(tmp_path / "mk"), "--no-copy-tokenizer"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    r = load_recipe(tmp_path / "recipe.yml")
    mb = read_model(mbmerge.merge(r.pop("method"), **r.pop("params"), **r, out=tmp_path / "mb", progress=False))
    mk = read_model(tmp_path / "mk")
    assert sorted(mb) == sorted(mk) and all(mb[n].dtype == mk[n].dtype == torch.bfloat16 for n in mb)
    monkeypatch.setitem(globals(), "run_both", lambda *_: (mk, mb))   # the checks above, on these outputs
    {"task_arithmetic": test_linear_family, "ties": test_ties}[case](family, tmp_path, case)


# --- whole-tensor statistics: slerp and model_stock ---------------------------------------------
# mergekit's slerp lists the base among its two models; mbmerge's takes the one expert.

WHOLE_CASES = {
    "slerp": ("slerp", ["math"], {"t": 0.3}),
    "model_stock": ("model_stock", ["math", "code"], {}),
    "model_stock-filter_wise": ("model_stock", ["math", "code"], {"filter_wise": True}),
    "model_stock-3": ("model_stock", ["math", "code", "ifeval"], {}),
}


def run_mergekit_whole(family, tmp_path, method, experts, params):
    paths = family["paths"]
    models = ([paths["base"]] if method == "slerp" else []) + [paths[e] for e in experts]
    yaml_value = lambda v: str(v).lower() if isinstance(v, bool) else v  # noqa: E731
    lines = [f"merge_method: {method}", f"base_model: {paths['base']}", "models:",
             *[f"  - model: {m}" for m in models],
             "parameters: {" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in params.items()) + "}",
             "dtype: float32", "out_dtype: bfloat16"]
    (tmp_path / "mk.yml").write_text("\n".join(lines) + "\n")
    done = subprocess.run([MERGEKIT, str(tmp_path / "mk.yml"), str(tmp_path / "mk"), "--no-copy-tokenizer"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return read_model(tmp_path / "mk")


@pytest.mark.parametrize("case", list(WHOLE_CASES))
def test_whole_tensor_methods(family, tmp_path, case):
    method, experts, params = WHOLE_CASES[case]
    mk = run_mergekit_whole(family, tmp_path, method, experts, params)
    mb = read_model(mbmerge.merge(method, base=str(family["paths"]["base"]),
                                  experts=[str(family["paths"][e]) for e in experts], out=tmp_path / "mb",
                                  progress=False, keep_base="", **params))
    assert sorted(mb) == sorted(mk)
    d = {n: ulps(mb[n], mk[n]) for n in mb}
    worst = max(int(v.max()) for v in d.values())
    off = sum(int((v > 0).sum()) for v in d.values())
    abs_diff = max(float((mb[n].float() - mk[n].float()).abs().max()) for n in mb)
    base = family["tensors"]["base"]
    moved = sum(int((mb[n] != base[n].bfloat16()).sum()) for n in mb)
    print(f"\n{case}: {off} of {sum(v.numel() for v in d.values())} elements differ, max {worst} ulp, "
          f"max abs diff {abs_diff:.3g}; {moved} elements moved from the base")
    assert worst <= 1


# --- breadcrumbs: magnitude bands ---------------------------------------------------------------
# mergekit keeps exactly floor(rho n) entries in sort order between the dropped outliers and the
# dropped smallest; mbmerge keeps every entry tied at either band threshold (hi, lo). So mergekit's
# kept set is mbmerge's minus some tied entries, and each element differing by > 1 ulp must equal the
# merge with some of that element's tied entries dropped. DELLA has no parity test: mergekit draws its
# masks with torch.bernoulli, which no counter-based generator reproduces.

CASES.update({
    "breadcrumbs": ("breadcrumbs", ["math", "code"], [0.7, 0.3], {"normalize": "false", "gamma": 0.05},
                    {"density": 0.5, "gamma": 0.05, "normalize": False}),
    "breadcrumbs-3": ("breadcrumbs", ["math", "code", "ifeval"], [0.5, 0.3, 0.2], {"normalize": "true", "gamma": 0.01},
                      {"density": 0.3, "gamma": 0.01, "normalize": True}),
    "breadcrumbs_ties": ("breadcrumbs_ties", ["math", "code", "ifeval"], [0.5, 0.3, 0.2],
                         {"normalize": "false", "gamma": 0.02}, {"density": 0.5, "gamma": 0.02, "aggregate": "sum"}),
    "breadcrumbs_ties-mean": ("breadcrumbs_ties", ["math", "code"], [0.7, 0.3], {"normalize": "true", "gamma": 0.1},
                              {"density": 0.4, "gamma": 0.1, "aggregate": "mean"}),
})


def band(a: torch.Tensor, rho: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(hi, lo, k) of a flat |d|: the (t+1)-th and (t+k)-th largest, k = floor(rho n), t = min(floor(gamma n), n-k)."""
    n = a.numel()
    k = max(1, int(rho * n))
    t = max(0, min(int(gamma * n), n - k))
    desc = a.sort(descending=True).values
    return desc[t], desc[t + k - 1], k


def band_candidates(b, ds, keep, tied, w, method, params):
    """bf16 outputs for every choice of dropping the threshold-tied entries of some experts ([2^K, n])."""
    outs = []
    for drop in itertools.product([False, True], repeat=len(ds)):
        es = [d * (k & ~(x & t)) * wi for d, k, t, x, wi in zip(ds, keep, tied, drop, w)]
        if method == "breadcrumbs":
            m = sum(es) / (sum(w) if params["normalize"] else 1.0)
        else:
            s = torch.where(sum(es) >= 0, 1.0, -1.0)
            agree = [(e.sign() == s) for e in es]
            m = sum(e * a for e, a in zip(es, agree))
            if params["aggregate"] == "mean":
                den = sum(a * wi for a, wi in zip(agree, w))
                m = m / torch.where(den == 0, 1.0, den)
        outs.append((b + m).to(torch.bfloat16))
    return torch.stack(outs)


@pytest.mark.parametrize("case", ["breadcrumbs", "breadcrumbs-3", "breadcrumbs_ties", "breadcrumbs_ties-mean"])
def test_breadcrumbs(family, tmp_path, case):
    method, experts, w, _, params = CASES[case]
    mk, mb = run_both(family, tmp_path, case)
    t = family["tensors"]
    total = mismatched = ties = extra = 0
    for n in mb:
        b = t["base"][n].flatten()                                                  # [n]
        ds = [t[e][n].flatten() - b for e in experts]                               # K x [n]
        bands = [band(d.abs(), params["density"], params["gamma"]) for d in ds]
        keep = [(d.abs() <= hi) & (d.abs() >= lo) for d, (hi, lo, _) in zip(ds, bands)]
        tied = [(d.abs() == hi) | (d.abs() == lo) for d, (hi, lo, _) in zip(ds, bands)]
        any_tied = torch.stack(tied).any(0)
        bad = ulps(mb[n].flatten(), mk[n].flatten()) > 1
        assert not (bad & ~any_tied).any(), f"{n}: mismatch away from a threshold tie"
        cand = band_candidates(b[bad], [d[bad] for d in ds], [k[bad] for k in keep], [x[bad] for x in tied], w,
                               method, params)
        assert (ulps(cand, mk[n].flatten()[bad].expand_as(cand)) <= 1).any(0).all(), \
            f"{n}: mergekit value is not {method} with some tied entries dropped"
        total, mismatched, ties = total + b.numel(), mismatched + int(bad.sum()), ties + int(any_tied.sum())
        extra += sum(int(k.sum()) - kk for k, (_, _, kk) in zip(keep, bands))      # kept by mbmerge beyond k
    abs_diff = max(float((mb[n].float() - mk[n].float()).abs().max()) for n in mb)
    print(f"\n{case}: {mismatched} of {total} elements differ by > 1 ulp ({mismatched / total:.2e}); "
          f"{ties} elements tied at a threshold, {extra} entries kept beyond k; max abs diff {abs_diff:.3g}")
    assert mismatched <= extra
