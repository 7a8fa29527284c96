"""Parity with mergekit 0.1.5 on the `family` fixture: one mergekit YAML recipe per case, run by
mergekit-yaml and by mbmerge (`load_recipe` + `merge`, so the recipe reader is under test too), and
every output tensor compared.

mergekit runs as a subprocess (it lives in its own environment): set MBMERGE_MERGEKIT=/path/to/mergekit-yaml
or put mergekit-yaml on PATH; otherwise these tests are skipped. Recipes ask mergekit for float32 maths
(`dtype: float32`, `out_dtype: bfloat16`), as mbmerge does, so outputs agree up to:
- 1 bf16 ulp, from float32 sums taken in a different order (or fused) and then rounded to bf16;
- for magnitude trimming (ties, breadcrumbs*), which of the entries tied at a threshold are kept: both
  tools keep exactly k per tensor and expert (the counts are checked equal on one-expert merges), but
  mbmerge breaks ties by position and mergekit's argsort in an arbitrary order. Where outputs differ,
  mergekit's value must be the merge with another choice among the tied entries. On this bf16 fixture
  deltas are multiples of the base's ulp, so ties are common; the test prints how many elements differ.
DELLA and DARE have no parity test: mergekit draws masks with torch.bernoulli, which no counter-based
generator reproduces.
"""
import itertools
import os
import re
import shutil
import subprocess

import pytest
import torch

import mbmerge
from conftest import LLAMA, expert_tensors, llama_shapes, read_model, top_mask, write_model
from mbmerge.engine.recipe.document import load_recipe

MERGEKIT = os.environ.get("MBMERGE_MERGEKIT") or shutil.which("mergekit-yaml")
pytestmark = pytest.mark.skipif(not MERGEKIT, reason="mergekit-yaml not found (set MBMERGE_MERGEKIT)")


def w(*weights, **more):
    """Per-model parameters: one dict per expert."""
    return [{"weight": x, **more} for x in weights]


# case: (merge_method, experts, per-model parameters, global parameters)
EXACT = {
    "linear": ("linear", ["math", "code"], w(0.7, 0.3), {"normalize": True}),
    "task_arithmetic": ("task_arithmetic", ["math", "code"], w(0.7, 0.3), {"lambda": 1.0}),
    "slerp": ("slerp", ["math"], None, {"t": 0.3}),
    "model_stock": ("model_stock", ["math", "code"], None, {}),
    "model_stock-filter_wise": ("model_stock", ["math", "code"], None, {"filter_wise": True}),
    "model_stock-3": ("model_stock", ["math", "code", "ifeval"], None, {}),
    "nearswap": ("nearswap", ["math"], None, {"t": 0.004}),
    "arcee_fusion": ("arcee_fusion", ["math"], None, {}),
    "sce": ("sce", ["math", "code", "ifeval"], None, {}),
    "multislerp": ("multislerp", ["math", "code", "ifeval"], w(0.5, 0.3, 0.2), {}),
    "nuslerp": ("nuslerp", ["math", "code"], w(0.7, 0.3), {}),
    "karcher": ("karcher", ["math", "code", "ifeval"], None, {}),
    "ram": ("ram", ["math", "code", "ifeval"], None, {"epsilon": 0.003}),
    "ramplus_tl": ("ramplus_tl", ["math", "code", "ifeval"], None, {"epsilon": 0.003, "r": 0.5, "alpha": 0.9}),
}
# per-layer gradients and filters, on five layers (points between a gradient's): a t gradient for attention,
# another for the MLP, one value elsewhere; per-model weight gradients, one under a filter
GRADIENTS = {
    "slerp-gradient-filters": ("slerp", ["math"], None, {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]},
                                                             {"filter": "mlp", "value": [0.9, 0.2]},
                                                             {"value": 0.4}]}),
    "ties-density-gradient": ("ties", ["math"], [{"weight": 1.0, "density": [0.3, 0.7]}], {}),
    "task_arithmetic-weight-gradients": ("task_arithmetic", ["math", "code"],
                                         [{"weight": [1.0, 0.2, 0.7]},
                                          {"weight": [{"filter": "mlp", "value": [0.1, 0.8]}, {"value": 0.6}]}],
                                         {"lambda": [0.8, 1.1]}),
}
TRIMMED = {
    "ties": ("ties", ["math", "code"], w(0.7, 0.3, density=0.5), {}),
    "ties-3": ("ties", ["math", "code", "ifeval"], w(0.5, 0.3, 0.2, density=0.5), {}),
    "breadcrumbs": ("breadcrumbs", ["math", "code"], w(0.7, 0.3, density=0.5, gamma=0.05), {}),
    "breadcrumbs-3": ("breadcrumbs", ["math", "code", "ifeval"], w(0.5, 0.3, 0.2, density=0.3), {"normalize": True}),
    "breadcrumbs_ties": ("breadcrumbs_ties", ["math", "code", "ifeval"], w(0.5, 0.3, 0.2, density=0.5, gamma=0.02), {}),
    "breadcrumbs_ties-mean": ("breadcrumbs_ties", ["math", "code"], w(0.7, 0.3, density=0.4, gamma=0.1),
                              {"normalize": True}),
}
ONE = {"ties-1": ("ties", ["math"], w(1.0, density=0.5), {}),
       "breadcrumbs-1": ("breadcrumbs", ["math"], w(1.0, density=0.5, gamma=0.05), {})}


def run_both(family, tmp_path, case):
    """(mergekit's output, mbmerge's output, mbmerge's resolved recipe) of one case's recipe (a name here, or a
    case tuple)."""
    named = {**EXACT, **TRIMMED, **ONE, **GRADIENTS}
    method, experts, per_model, glob = case if isinstance(case, tuple) else named[case]
    paths = family["paths"]
    flow = lambda d: "{" + ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}"  # noqa: E731
                                     for k, v in d.items()) + "}"
    models = ([paths["base"]] if method == "slerp" else []) + [paths[e] for e in experts]   # slerp lists the base
    params = [{}] * (method == "slerp") + (per_model or [{}] * len(experts))
    lines = [f"merge_method: {method}", *([] if method == "linear" else [f"base_model: {paths['base']}"]),
             "models:", *[f"  - {{model: {m}, parameters: {flow(p)}}}" for m, p in zip(models, params)],
             f"parameters: {flow(glob)}", "dtype: float32", "out_dtype: bfloat16"]
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("\n".join(lines) + "\n")
    done = subprocess.run([MERGEKIT, str(recipe), str(tmp_path / "mk"), "--no-copy-tokenizer"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    r = load_recipe(recipe)
    mb = read_model(mbmerge.merge(r["method"], base=r["base"], experts=r["experts"], dtype=r["dtype"],
                                  out=tmp_path / "mb", progress=False, layered=r["layered"], **r["params"]))
    mk = read_model(tmp_path / "mk")
    assert sorted(mb) == sorted(mk)
    assert all(mb[n].dtype == mk[n].dtype == torch.bfloat16 and mb[n].shape == mk[n].shape for n in mb)
    return mk, mb, r


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in bf16 units in the last place (bit patterns mapped to a monotonic integer line)."""
    def line(t):
        i = t.contiguous().view(torch.int16).int()
        return torch.where(i < 0, -32768 - i, i)   # sign-magnitude -> two's complement order; -0 == +0
    return (line(a) - line(b)).abs()


def max_abs_diff(mk, mb) -> float:
    return max(float((mb[n].float() - mk[n].float()).abs().max()) for n in mb)


@pytest.mark.parametrize("case", list(EXACT))
def test_exact_methods(family, tmp_path, case):
    mk, mb, _ = run_both(family, tmp_path, case)
    moved = sum(int((mb[n] != family["tensors"]["base"][n].bfloat16()).sum()) for n in mb)
    assert within_one_ulp(case, mk, mb, f", max abs diff {max_abs_diff(mk, mb):.3g}; {moved} elements differ "
                                        f"from the base")


def within_one_ulp(case: str, mk, mb, more: str = "") -> bool:
    """Whether every element of mbmerge's merge is within 1 bf16 ulp of mergekit's; prints how many differ."""
    d = {n: ulps(mb[n], mk[n]) for n in mb}
    worst = max(int(v.max()) for v in d.values())
    off = sum(int((v > 0).sum()) for v in d.values())
    print(f"\n{case}: {off} of {sum(v.numel() for v in d.values())} elements differ, max {worst} ulp{more}")
    return worst <= 1


@pytest.fixture(scope="module")
def deep_family(tmp_path_factory):
    """The test family's shapes in five layers, so that gradients take values between their points."""
    root, g = tmp_path_factory.mktemp("deep"), torch.Generator().manual_seed(5)
    shapes = {}
    for name, shape in llama_shapes():
        layer = re.match(r"model\.layers\.0\.(.*)", name)
        if layer:
            shapes.update({f"model.layers.{i}.{layer.group(1)}": shape for i in range(5)})
        elif not name.startswith("model.layers."):
            shapes[name] = shape
    base = {n: torch.randn(s, generator=g) * 0.05 for n, s in shapes.items()}
    models = {"base": base, "math": expert_tensors(base, 1), "code": expert_tensors(base, 2)}
    return {"paths": {k: write_model(root / k, v, config=dict(LLAMA, num_hidden_layers=5)) for k, v in models.items()}}


def test_a_per_layer_density_keeps_as_many_entries_as_mergekit(deep_family, tmp_path):
    """ties, one expert of weight 1, density 0.3 in layer 0 rising to 0.7 in layer 4 (0.3 outside the
    layers): in every tensor both tools change exactly k = floor(rho n) entries, rho at the tensor's layer."""
    mk, mb, _ = run_both(deep_family, tmp_path, "ties-density-gradient")
    base, expert = read_model(deep_family["paths"]["base"]), read_model(deep_family["paths"]["math"])
    for n in mb:
        layer = re.search(r"\.layers\.(\d+)\.", n)
        t = int(layer.group(1)) / 4 if layer else 0.0
        rho = (1 - t) * 0.3 + t * 0.7                                  # the gradient at the tensor's place
        k = max(1, int(rho * base[n].numel()))
        nonzero = int((expert[n] != base[n]).sum())
        assert int((mk[n] != base[n]).sum()) == int((mb[n] != base[n]).sum()) == min(k, nonzero), n


@pytest.mark.parametrize("case", [c for c in GRADIENTS if not c.startswith("ties")])
def test_gradients_and_filters(deep_family, tmp_path, case):
    mk, mb, r = run_both(deep_family, tmp_path, case)
    assert r["layered"] is not None
    assert within_one_ulp(case, mk, mb)


def band(a: torch.Tensor, rho: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, tied) of a flat |d|: the entries ranked t+1 .. t+k by a stable sort on (-|d|, index), and
    those equal to the (t+1)-th or (t+k)-th largest (the edges), k = floor(rho n), t = min(floor(gamma n),
    n - k). TIES is the band with gamma = 0."""
    n = a.numel()
    k = max(1, int(rho * n))
    t = max(0, min(int(gamma * n), n - k))
    desc = a.sort(descending=True).values
    return top_mask(a, k, t), (a == desc[t]) | (a == desc[t + k - 1])


def candidates(b, ds, keep, tied, w, p):
    """bf16 outputs for every choice of keeping or dropping each expert's threshold-tied entry ([2^K, n])."""
    outs = []
    for take in itertools.product([False, True], repeat=len(ds)):
        es = [d * ((k & ~t) | (t & x)) * wi for d, k, t, x, wi in zip(ds, keep, tied, take, w)]
        if "aggregate" not in p:                                                    # breadcrumbs: a plain sum
            m = sum(es) / (sum(w) if p["normalize"] else 1.0)
        else:
            s = torch.where(sum(es) >= 0, 1.0, -1.0)                                # elected sign, 0 -> +
            agree = [(e.sign() == s) for e in es]
            m = sum(e * a for e, a in zip(es, agree))
            if p["aggregate"] == "mean":
                den = sum(a * wi for a, wi in zip(agree, w))
                m = m / torch.where(den == 0, 1.0, den)
        outs.append((b + m).to(torch.bfloat16))
    return torch.stack(outs)


@pytest.mark.parametrize("case", list(TRIMMED))
def test_trimmed_methods_differ_only_at_threshold_ties(family, tmp_path, case):
    mk, mb, r = run_both(family, tmp_path, case)
    p, t = r["params"], family["tensors"]
    experts = TRIMMED[case][1]
    gammas = p.get("gamma", [0.0] * len(experts))
    total = mismatched = ties = extra = 0
    for n in mb:
        b = t["base"][n].flatten()                                                  # [n]
        ds = [t[e][n].flatten() - b for e in experts]                               # K x [n]
        keep, tied = zip(*(band(d.abs(), rho, g) for d, rho, g in zip(ds, p["density"], gammas)))
        any_tied = torch.stack(tied).any(0)
        bad = ulps(mb[n].flatten(), mk[n].flatten()) > 1
        assert not (bad & ~any_tied).any(), f"{n}: mismatch away from a threshold tie"
        cand = candidates(b[bad], [d[bad] for d in ds], [k[bad] for k in keep], [x[bad] for x in tied],
                          p["weights"], p)
        assert (ulps(cand, mk[n].flatten()[bad].expand_as(cand)) <= 1).any(0).all(), \
            f"{n}: mergekit's value is not the merge with another choice among the tied entries"
        total, mismatched, ties = total + b.numel(), mismatched + int(bad.sum()), ties + int(any_tied.sum())
    print(f"\n{case}: {mismatched} of {total} elements differ by > 1 ulp ({mismatched / total:.2e}), all at "
          f"entries tied at a threshold ({ties}); max abs diff {max_abs_diff(mk, mb):.3g}")


@pytest.mark.parametrize("case", ["ties-1", "breadcrumbs-1"])
def test_one_expert_keeps_as_many_entries_as_mergekit(family, tmp_path, case):
    """With one expert and weight 1 the output is the base where an entry was dropped: the counts of
    changed entries are the kept counts, and both tools keep exactly k per tensor."""
    mk, mb, r = run_both(family, tmp_path, case)
    t, same, gamma = family["tensors"], 0, r["params"].get("gamma", [0.0])[0]
    for n in mb:
        b = t["base"][n].bfloat16()
        nonzero = int((t["math"][n].bfloat16() != b).sum())
        k = max(1, int(0.5 * b.numel()))
        outliers = max(0, min(int(gamma * b.numel()), b.numel() - k))      # dropped before the k kept
        kept_mk, kept_mb = int((mk[n] != b).sum()), int((mb[n] != b).sum())
        assert kept_mk == kept_mb == min(k, max(0, nonzero - outliers)), n
        same += int((mk[n] == mb[n]).sum())
    total = sum(v.numel() for v in mb.values())
    print(f"\n{case}: kept counts equal in every tensor; {total - same} of {total} elements differ "
          f"(tied entries mergekit's argsort chose otherwise)")
