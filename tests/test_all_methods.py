"""Properties every registered method must have, checked over the whole registry: it merges the
shared fixture into a folder transformers loads with finite logits; the streamed merge equals the
in-memory library function tensor by tensor; chunking does not change a byte; the command line
and docs/methods.md describe it. (Each method's maths is checked against its own reference in
test_methods*.py and test_model_scope.py.)"""
import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mbmerge
from mbmerge.bin.cli import cli
from mbmerge.bin.method_docs import markdown
from conftest import read_model

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
NAMES = list(mbmerge.methods.REGISTRY)
SCOPED = [m.name for m in mbmerge.methods.REGISTRY.values() if "sparsify_scope" in {p.name for p in m.params}]


def _experts(method):
    m = mbmerge.methods.get(method)
    return ["math", "code", "ifeval"][:m.max_experts or 3]


def _stats(family, method, experts):
    """Data-aware methods: the fixture's statistics folders and tensors for these experts."""
    st = mbmerge.methods.get(method).data_statistic
    if st is None:
        return None, None
    pairs = [family["stats"][st.kind][e] for e in experts]
    return [str(folder) for folder, _ in pairs], [tensors for _, tensors in pairs]


def _merge(family, tmp_path, method, name="out", experts=None, **kw):
    p, experts = family["paths"], experts or _experts(method)
    return mbmerge.merge(method, base=str(p["base"]), experts=[str(p[e]) for e in experts],
                         out=tmp_path / name, progress=False, stats_folders=_stats(family, method, experts)[0], **kw)


@pytest.mark.parametrize("method", NAMES)
def test_engine_equals_the_library_function_and_transformers_loads_it(family, tmp_path, method):
    from transformers import AutoModelForCausalLM
    scope = {"sparsify_scope": "tensor"} if method in SCOPED else {}   # the library sees one tensor
    out = _merge(family, tmp_path, method, **scope)
    got, t = read_model(out), family["tensors"]
    keep = mbmerge.methods.get(method).keep_base
    stats = _stats(family, method, _experts(method))[1]
    for name, b in t["base"].items():
        if keep and re.search(keep, name):
            want = b.to(torch.bfloat16)
        else:
            want = mbmerge.methods.merge_tensors(method, b.to(torch.bfloat16),
                                                 [t[e][name].to(torch.bfloat16) for e in _experts(method)], key=name,
                                                 stat=[s.get(name) for s in stats] if stats else None)
        assert torch.equal(got[name], want), name
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 3, 7, 2]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method", [n for n in NAMES if mbmerge.methods.get(n).span != "tensor"])
def test_output_bytes_do_not_depend_on_chunking(wide_family, tmp_path, method):
    params = {"rescale": "l1"} if "rescale" in {p.name for p in mbmerge.methods.get(method).params} else {}
    experts = [f"e{i}" for i in range(mbmerge.methods.get(method).max_experts or 3)]
    runs = {}
    for budget in ("2GB", "100KB"):                                  # 100KB: 4096-element chunks
        out = _merge(wide_family, tmp_path, method, budget, experts, memory_budget=budget, **params)
        runs[budget] = {f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))}
    assert json.loads((tmp_path / "100KB" / "mbmerge.json").read_text())["chunk_elements"] == 4096
    assert runs["2GB"] == runs["100KB"]


FUSED = [(n, {}) for n in NAMES if mbmerge.methods.get(n).fused is not None] + [("ties", {"sparsify_scope": "model"})]


@pytest.mark.parametrize("method,params", FUSED)
def test_the_engine_on_fused_kernels_writes_the_torch_methods_bytes(wide_family, tmp_path, monkeypatch, method, params):
    """The whole streamed merge (4096-element chunks, so DARE's offsets and per-tensor thresholds
    are exercised) through the fused Triton kernels, interpreted, and through the compiled CPU loops
    (backend auto on the CPU), against the torch methods. Methods that read a tensor once
    (task_arithmetic, linear, model-wide ranks) hand the Triton kernels bf16 chunks; the compiled loops
    always read the stored bytes."""
    p = wide_family["paths"]
    runs, experts = {}, min(3, mbmerge.methods.get(method).max_experts or 3)      # slerp takes one
    for impl in ("torch", "triton", "auto"):
        out = mbmerge.merge(method, base=str(p["base"]), experts=[str(p[f"e{i}"]) for i in range(experts)],
                            out=tmp_path / impl, progress=False, memory_budget="100KB", device="cpu", kernels=impl,
                            **params)
        runs[impl] = {f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))}
    assert runs["torch"] == runs["triton"] == runs["auto"]


def test_every_parameter_has_a_command_line_option():
    options = {o for p in cli.commands["merge"].params for o in p.opts + p.secondary_opts}
    for m in mbmerge.methods.REGISTRY.values():
        for p in m.params:
            assert "--" + p.name.replace("_", "-") in options, (m.name, p.name)


def test_docs_are_generated_from_the_registry():
    assert DOCS.read_text() == markdown(), "docs/methods.md is stale: run `mbmerge methods --markdown > docs/methods.md`"
    result = CliRunner().invoke(cli, ["methods"])
    assert result.exit_code == 0 and all(name in result.output for name in NAMES)


@pytest.mark.parametrize("method,params,dtype", [("task_arithmetic", {}, torch.bfloat16),
                                                 ("ties", {"sparsify_scope": "model"}, torch.bfloat16),
                                                 ("ties", {}, torch.float32)])   # read twice: float32 kept
def test_fused_kernels_read_chunks_in_their_stored_dtype_when_read_once(wide_family, tmp_path, monkeypatch,
                                                                        method, params, dtype):
    from mbmerge.kernels import merge_triton
    seen, real = set(), merge_triton.delta_merge
    monkeypatch.setattr(merge_triton, "delta_merge", lambda b, xs, **kw: seen.add(xs[0].dtype) or real(b, xs, **kw))
    p = wide_family["paths"]
    mbmerge.merge(method, base=str(p["base"]), experts=[str(p["e0"]), str(p["e1"])], out=tmp_path / "out",
                  progress=False, memory_budget="100KB", device="cpu", kernels="triton", **params)
    assert seen == {dtype}
