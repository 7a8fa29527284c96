"""`--calibrate svc` (singular value calibration, arXiv:2602.05536) after any method, against a plain
float64 reference written here with explicit loops over singular directions and tasks; end to end
through the command line, a recipe, chunk invariance, transformers, and FusionBench's own SVC code
(MBMERGE_FUSIONBENCH: a python with fusion-bench 0.2.33 installed; skipped otherwise)."""
import json
import os
import re
import subprocess
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import mbmerge
from mbmerge.common.errors import BadParameter
from mbmerge.library import fingerprint
from mbmerge.methods import merge_tensors
from mbmerge.methods.calibration import svc
from conftest import read_model

FUSIONBENCH = os.environ.get("MBMERGE_FUSIONBENCH")
EXPERTS = ["math", "code", "ifeval"]

# --- the plain reference (float64) --------------------------------------------------------------


def ref_svc(b, xs, m, alpha):
    """b + U diag(gamma S) V^T, gamma_r = K / sum_i max(alpha, s_r^i), s_r^i = <u_r^T D, u_r^T d_i> / |u_r^T d_i|^2."""
    b, m = b.double(), m.double()
    ds = [x.double() - b for x in xs]
    u, s, vh = torch.linalg.svd(m - b, full_matrices=False)
    gamma = torch.empty_like(s)
    for r in range(len(s)):
        a = u[:, r] @ (m - b)
        coefs = []
        for d in ds:
            a_i = u[:, r] @ d
            c = torch.dot(a, a_i) / max(torch.dot(a_i, a_i).item(), 1e-12)
            coefs.append(max(alpha, c.item()))
        gamma[r] = len(ds) / sum(coefs)
    return b + u @ torch.diag(gamma * s) @ vh


def ref_task_arithmetic(b, xs, lam):
    return b + lam * sum(x - b for x in xs)


def _bf16_close(got, want, name):
    """Equal up to one bf16 rounding step (the engine and the reference round float64 differently)."""
    ulp = want.abs().clamp_min(1e-30) * 2 ** -7
    assert ((got.float() - want.float()).abs() <= ulp + 1e-8).all(), name


# --- the maths on small matrices ------------------------------------------------------------------

@pytest.mark.parametrize("shape,alpha", [((6, 4), 0.1), ((3, 7), 1.0), ((5, 5), 0.5)])
def test_svc_equals_the_reference(shape, alpha):
    g = torch.Generator().manual_seed(sum(shape))
    b = torch.randn(shape, generator=g, dtype=torch.float64)
    shared = torch.randn(shape, generator=g, dtype=torch.float64)       # a direction every task adds
    xs = [b + shared + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
    m = b + sum(x - b for x in xs)                                      # task arithmetic: shared counted 3 times
    got = svc(b, [x - b for x in xs], m, alpha)
    torch.testing.assert_close(got, ref_svc(b, xs, m, alpha), rtol=1e-10, atol=1e-12)
    assert torch.linalg.matrix_norm(got - b, 2) < torch.linalg.matrix_norm(m - b, 2)   # the inflated top shrinks


def test_one_task_merged_as_itself_is_unchanged():
    """K = 1, m = x: s_r = 1 on every direction, so gamma_r = 1 for alpha <= 1."""
    g = torch.Generator().manual_seed(0)
    b, x = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(svc(b, [x - b], x, 0.1), x)


def test_a_zero_merged_delta_gives_the_base():
    b = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(svc(b, [torch.randn(4, 3, dtype=torch.float64)], b.clone(), 0.1), b)


# --- end to end -------------------------------------------------------------------------------------

def test_cli_task_arithmetic_then_svc_equals_the_reference(family, tmp_path, run_main):
    p, t = family["paths"], family["tensors"]
    out = tmp_path / "m"
    code, stdout, err = run_main("merge", "-m", "task_arithmetic", "-b", p["base"], "-e",
                                 ",".join(str(p[e]) for e in EXPERTS), "--scale", "0.5", "--calibrate", "svc",
                                 "--svc-alpha", "0.2", "-o", out)
    assert code == 0, err
    assert "merged model written" in stdout
    got = read_model(out)
    for name, b in t["base"].items():
        merged = ref_task_arithmetic(b, [t[e][name] for e in EXPERTS], 0.5)
        want = ref_svc(b, [t[e][name] for e in EXPERTS], merged, 0.2) if b.dim() == 2 else merged
        _bf16_close(got[name], want, name)
    record = json.loads((out / "mbmerge.json").read_text())
    assert record["calibrate"] == "svc" and record["params"]["svc_alpha"] == 0.2
    assert "--calibrate svc" in record["command"] and "--svc-alpha 0.2" in record["command"]
    assert "then **svc**" in (out / "README.md").read_text()
    code, _, err = run_main("verify", out)
    assert code == 0, err


def test_ties_then_svc_is_svc_of_the_ties_merge_and_transformers_loads_it(family, tmp_path):
    from transformers import AutoModelForCausalLM
    p, t = family["paths"], family["tensors"]
    out = mbmerge.merge("ties", base=str(p["base"]), experts=[str(p[e]) for e in EXPERTS], out=tmp_path / "m",
                        progress=False, calibrate="svc")
    got = read_model(out)
    for name, b in t["base"].items():
        xs = [t[e][name] for e in EXPERTS]
        merged = merge_tensors("ties", b, xs)                      # float32 (tested in test_methods.py)
        want = ref_svc(b, xs, merged, 0.1) if b.dim() == 2 else merged
        _bf16_close(got[name], want, name)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 3]])).logits).all()


def test_recipe_calibrate_key_equals_the_command_line(family, tmp_path):
    p = family["paths"]
    recipe = tmp_path / "r.yml"
    recipe.write_text(textwrap.dedent(f"""\
        merge_method: task_arithmetic
        base_model: {p['base']}
        models:
          - model: {p['math']}
            parameters: {{weight: 1.0}}
          - model: {p['code']}
            parameters: {{weight: 1.0}}
        calibrate: {{method: svc, alpha: 0.3}}
        """))
    from mbmerge.engine.recipe.document import load_recipe
    a = mbmerge.merge(out=tmp_path / "a", progress=False, **load_recipe(recipe)["merge"])
    b = mbmerge.merge("task_arithmetic", base=str(p["base"]), experts=[str(p["math"]), str(p["code"])],
                      out=tmp_path / "b", progress=False, calibrate="svc", svc_alpha=0.3)
    assert read_model(a).keys() == read_model(b).keys()
    assert all(torch.equal(read_model(a)[n], read_model(b)[n]) for n in read_model(a))


def test_output_bytes_do_not_depend_on_the_memory_budget(wide_family, tmp_path):
    p = wide_family["paths"]
    runs = {}
    for budget in ("2GB", "4MB"):
        out = mbmerge.merge("dare_ties", base=str(p["base"]), experts=[str(p[e]) for e in ("e0", "e1", "e2")],
                            out=tmp_path / budget, progress=False, calibrate="svc", memory_budget=budget)
        runs[budget] = {f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))}
    assert runs["2GB"] == runs["4MB"]


def test_the_fingerprint_tells_calibrated_merges_apart(family, tmp_path):
    """An interrupted merge resumes only into the same recipe: calibration and its alpha are part of it."""
    p = family["paths"]
    kw = dict(base=str(p["base"]), experts=[str(p["math"]), str(p["code"])], out=tmp_path / "m", progress=False)
    prints = {fingerprint("ties", **kw), fingerprint("ties", calibrate="svc", **kw),
              fingerprint("ties", calibrate="svc", svc_alpha=0.5, **kw)}
    assert len(prints) == 3


@pytest.mark.parametrize("args,message", [
    (["-m", "linear", "--calibrate", "svc"], "method linear reads no base"),
    (["-m", "ties", "--svc-alpha", "0.2"], "no parameter 'svc_alpha'"),
    (["-m", "ties", "--calibrate", "svd"], "'svd' is not 'svc'"),
])
def test_bad_calibration_is_one_line_and_writes_nothing(family, tmp_path, run_main, args, message):
    p = family["paths"]
    code, _, err = run_main("merge", *args, "-b", p["base"], "-e", f"{p['math']},{p['code']}", "-o", tmp_path / "m")
    assert code != 0 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m").exists()


def test_recipe_refuses_an_unknown_calibration(family, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: ties\nbase_model: {family['paths']['base']}\nmodels:\n"
                      f"  - model: {family['paths']['math']}\n    parameters: {{weight: 1.0}}\ncalibrate: svd\n")
    from mbmerge.engine.recipe.document import load_recipe
    with pytest.raises(BadParameter, match=re.escape("key 'calibrate' = 'svd': choose svc")):
        load_recipe(recipe)


# --- FusionBench's own code -----------------------------------------------------------------------

@pytest.mark.skipif(not FUSIONBENCH, reason="FusionBench not found (set MBMERGE_FUSIONBENCH to its python)")
def test_svc_equals_fusionbench(tmp_path):
    """FusionBench 0.2.33's SVC (both its loop and its vectorised form) on float32 matrices: the engine's
    apply_svc (float32 in and out, float64 inside) within float32 rounding."""
    g = torch.Generator().manual_seed(7)
    cases = {}
    for k, shape in enumerate([(12, 8), (8, 20), (16, 16)]):
        b = torch.randn(shape, generator=g)
        xs = [b + 0.5 * torch.randn(shape, generator=g) + 0.3 * b for _ in range(3)]
        cases |= {f"{k}.b": b, f"{k}.m": b + 0.7 * sum(x - b for x in xs), **{f"{k}.x{i}": x for i, x in enumerate(xs)}}
    save_file(cases, str(tmp_path / "in.safetensors"))
    script = textwrap.dedent("""\
        import sys
        from safetensors.torch import load_file, save_file
        from fusion_bench.method.singular_value_calibration import utils
        t, out = load_file(sys.argv[1]), {}
        for k in range(3):
            for alpha in (0.1, 1.0):
                args = dict(base_weight=t[f"{k}.b"], task_weights=[t[f"{k}.x{i}"] for i in range(3)],
                            merged_weight=t[f"{k}.m"], alpha=alpha, accelerator="cpu")
                out[f"{k}.{alpha}.fast"] = utils.subspace_consistency_spectral_calibration_accelerated(**args)
                out[f"{k}.{alpha}.loop"] = utils.subspace_consistency_spectral_calibration(**args).contiguous()
        save_file(out, sys.argv[2])
        """)
    from mbmerge.methods.calibration import apply_svc
    subprocess.run([FUSIONBENCH, "-c", script, str(tmp_path / "in.safetensors"), str(tmp_path / "fb.safetensors")],
                   check=True, capture_output=True, timeout=300)
    fb = load_file(str(tmp_path / "fb.safetensors"))
    for alpha in (0.1, 1.0):
        for k in range(3):
            b, m = cases[f"{k}.b"], cases[f"{k}.m"]
            got = apply_svc(b.flatten(), [cases[f"{k}.x{i}"].flatten() for i in range(3)], m.flatten(),
                            svc_alpha=alpha, shape=tuple(b.shape)).view(b.shape)
            torch.testing.assert_close(got, fb[f"{k}.{alpha}.fast"], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got, fb[f"{k}.{alpha}.loop"], rtol=1e-4, atol=1e-5)   # its loop runs in float32
