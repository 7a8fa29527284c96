"""End-to-end merges of tiny models on disk against in-memory references, chunk invariance,
the output folder's contents, and loading the result with transformers."""
import json

import pytest
import torch

import mbmerge
from conftest import read_model
from test_methods import ref_linear, ref_task_arithmetic, ref_ties

EXPERTS = ["math", "code", "ifeval"]


def _merge(family, tmp_path, method, name="out", experts=EXPERTS, **kw):
    p = family["paths"]
    return mbmerge.merge(method, base=str(p["base"]), experts=[str(p[e]) for e in experts],
                         out=tmp_path / name, progress=False, **kw)


def _reference(family, method, experts=EXPERTS, **kw):
    t = family["tensors"]
    out = {}
    for name, b in t["base"].items():
        xs = [t[e][name] for e in experts]
        if method == "ties":
            out[name] = ref_ties(b, xs, kw["weights"], kw["density"], kw.get("scale", 1.0))
        elif method == "task_arithmetic":
            out[name] = ref_task_arithmetic(b, xs, kw["weights"], kw.get("scale", 1.0))
        else:
            out[name] = ref_linear(xs, kw["weights"])
    return out


def _assert_bf16_close(got: dict, ref: dict):
    """bf16 outputs of float32 maths: equal, but for a rare 1-ulp rounding flip where the float32
    summation order differs from the reference's (bf16 ulp = 2^-7 relative)."""
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].dtype == torch.bfloat16, name
        torch.testing.assert_close(got[name].float(), ref[name].to(torch.bfloat16).float(),
                                   rtol=2**-7, atol=1e-30, msg=name)
        exact = (got[name] == ref[name].to(torch.bfloat16)).float().mean()
        assert exact > 0.99, f"{name}: only {exact:.3f} of elements exact"


@pytest.mark.parametrize("method,params", [
    ("linear", dict(weights=[0.5, 0.3, 0.2])),
    ("task_arithmetic", dict(weights=[1.0, 0.5, 0.7], scale=0.8)),
    ("ties", dict(weights=[1.0, 0.8, 1.2], density=[0.2, 0.5, 0.3], scale=0.9)),
])
def test_merge_matches_in_memory_reference(family, tmp_path, method, params):
    out = _merge(family, tmp_path, method, **params)
    _assert_bf16_close(read_model(out), _reference(family, method, **params))


def test_library_function_and_engine_agree_bit_for_bit(family, tmp_path):
    out = read_model(_merge(family, tmp_path, "dare_ties", density=0.4, seed=3, rescale="l1"))
    t = family["tensors"]
    for name, b in t["base"].items():
        lib = mbmerge.methods.dare_ties(b.to(torch.bfloat16), [t[e][name].to(torch.bfloat16) for e in EXPERTS],
                                        density=0.4, seed=3, rescale="l1", key=name)
        assert torch.equal(out[name], lib), name


def test_output_folder_contents(family, tmp_path):
    out = _merge(family, tmp_path, "ties", experts=["math", "code"], density=0.3)
    base = family["paths"]["base"]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["README.md", "config.json", "generation_config.json", "mbmerge.json",
                            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                            "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in family["tensors"]["base"].values())
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        assert (out / f).read_text() == (base / f).read_text()
    record = json.loads((out / "mbmerge.json").read_text())
    assert record["method"] == "ties" and record["params"]["density"] == [0.3, 0.3]
    assert [e["ref"] for e in record["experts"]] == [str(family["paths"][e]) for e in ["math", "code"]]
    assert record["tensors_merged"] == len(family["tensors"]["base"]) and record["wall_seconds"] > 0
    card = (out / "README.md").read_text()
    assert "**ties**" in card and "`density`: [0.3, 0.3]" in card and "mbmerge --method ties" in card
    assert not list(tmp_path.glob(".*mbmerge*"))                      # no temporary folder left


def test_dtype_and_keep_base(family, tmp_path):
    out = _merge(family, tmp_path, "task_arithmetic", dtype="float32", keep_base="embed_tokens|lm_head")
    got, t = read_model(out), family["tensors"]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    for name, b in t["base"].items():
        assert got[name].dtype == torch.float32
        if "embed_tokens" in name or "lm_head" in name:
            assert torch.equal(got[name], b)
        else:
            torch.testing.assert_close(got[name], ref_task_arithmetic(b, [t[e][name] for e in EXPERTS], [1, 1, 1]),
                                       rtol=1e-6, atol=1e-7)


def test_linear_needs_no_base(family, tmp_path):
    p = family["paths"]
    out = mbmerge.merge("linear", experts=[str(p["math"]), str(p["code"])], out=tmp_path / "soup", progress=False)
    _assert_bf16_close(read_model(out), _reference(family, "linear", ["math", "code"], weights=[1, 1]))
    assert (out / "tokenizer.json").read_text() == (p["math"] / "tokenizer.json").read_text()


def test_non_float_tensors_are_copied_from_the_base(tmp_path):
    from conftest import write_model
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(8, 4, generator=g), "ids": torch.arange(6)}
    experts = [{"w": base["w"] + torch.randn(8, 4, generator=g) * 0.1, "ids": torch.arange(6) * 2}]
    write_model(tmp_path / "b", {"w": base["w"]}, shards=1)
    from safetensors.torch import save_file
    save_file({"w": base["w"].bfloat16(), "ids": base["ids"]}, str(tmp_path / "b" / "model.safetensors"))
    write_model(tmp_path / "e", {"w": experts[0]["w"]}, shards=1)
    save_file({"w": experts[0]["w"].bfloat16(), "ids": experts[0]["ids"]}, str(tmp_path / "e" / "model.safetensors"))
    out = read_model(mbmerge.merge("task_arithmetic", base=str(tmp_path / "b"), experts=[str(tmp_path / "e")],
                                   out=tmp_path / "o", progress=False))
    assert torch.equal(out["ids"], base["ids"])
    assert torch.equal(out["w"], experts[0]["w"].bfloat16())


def test_an_input_folder_is_never_overwritten_even_when_it_looks_like_an_output(family, tmp_path):
    import shutil
    src = tmp_path / "math-copy"
    shutil.copytree(family["paths"]["math"], src)
    files = [f.name for f in src.iterdir()] + ["mbmerge.json"]              # passes as ours, every file listed
    (src / "mbmerge.json").write_text(json.dumps({"mbmerge_version": "0.1.0", "method": "ties", "files": files}))
    before = {f: f.read_bytes() for f in src.iterdir()}
    p = family["paths"]
    with pytest.raises(mbmerge.MbmergeError, match=f"output {src} is expert {src}: the merge would overwrite"):
        mbmerge.merge("ties", base=str(p["base"]), experts=[str(src), str(p["code"])], out=src, overwrite=True,
                      progress=False)
    assert {f: f.read_bytes() for f in src.iterdir()} == before


def test_transformers_loads_the_merge_and_its_logits_match_the_reference(family, tmp_path):
    from transformers import AutoModelForCausalLM
    params = dict(weights=[1.0, 1.0, 1.0], density=[0.3, 0.3, 0.3])
    out = _merge(family, tmp_path, "ties", **params)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    ref_model = AutoModelForCausalLM.from_pretrained(family["paths"]["base"], dtype=torch.bfloat16)
    ref_model.load_state_dict({k: v.to(torch.bfloat16) for k, v in _reference(family, "ties", **params).items()})
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        got, want = merged(ids).logits, ref_model(ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(family["paths"]["base"], dtype=torch.bfloat16)(ids).logits
    assert torch.equal(got, want)          # equal weights and order of sums: the same bf16 weights
    assert not torch.equal(got, base_logits)


def test_default_family_runs_with_domain_names(tmp_path):
    out = mbmerge.merge("ties", experts=["math", "code"], out=tmp_path / "m", progress=False)
    record = json.loads((out / "mbmerge.json").read_text())
    assert [e["ref"] for e in record["experts"]] == ["math", "code"]
    assert "/zoo/llama-micro-" in record["base"]["path"] and record["base"]["path"].endswith("/base")


def test_dare_output_is_the_same_with_either_kernel_backend(family, tmp_path):
    outputs = []
    for impl in ("torch", "triton"):
        out = _merge(family, tmp_path, "dare_ties", impl, experts=["math", "code"], density=0.3, seed=11, kernels=impl)
        outputs.append({f.name: f.read_bytes() for f in out.glob("*.safetensors")})
    assert outputs[0] == outputs[1]
