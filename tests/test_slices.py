"""A recipe's slices: frankenmerges (passthrough), layer stacking, and slices merged with a method and per-slice
parameters, checked against plain torch references built here from the models' own tensors; the one-line
refusals; parity with mergekit 0.1.5 (skipped without it, see test_mergekit_parity)."""
import json
import re
import subprocess

import pytest
import torch

import mbmerge
from conftest import LLAMA, llama_shapes, read_model, write_model
from mbmerge.engine.recipe.document import load_recipe

LAYERS = 4


def four_layers(seed: int, near: dict | None = None) -> dict:
    """The test family's shapes in four layers; with `near`, those tensors plus a tenth of a random delta."""
    g, out = torch.Generator().manual_seed(seed), {}
    for name, shape in llama_shapes():
        m = re.match(r"model\.layers\.0\.(.*)", name)
        names = [f"model.layers.{i}.{m.group(1)}" for i in range(LAYERS)] if m else \
            ([] if ".layers." in name else [name])
        for n in names:
            t = 1 + 0.1 * torch.randn(shape, generator=g) if len(shape) == 1 else 0.05 * torch.randn(shape, generator=g)
            out[n] = t if near is None else near[n] + 0.1 * (t - near[n])
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("slices")
    base = four_layers(0)
    tensors = {"base": base, "a": four_layers(1, base), "b": four_layers(2, base)}
    paths = {k: write_model(root / k, t, config={**LLAMA, "num_hidden_layers": LAYERS}) for k, t in tensors.items()}
    return {"paths": paths, "tensors": {k: {n: v.bfloat16().float() for n, v in t.items()} for k, t in tensors.items()},
            "root": root}


def recipe_file(tmp_path, models, text: str):
    for k, p in models["paths"].items():
        text = text.replace(f"<{k}>", str(p))
    path = tmp_path / "recipe.yml"
    path.write_text(text)
    return path


def layer(name: str, i: int) -> str:
    return re.sub(r"\.layers\.\d+\.", f".layers.{i}.", name)


def stacked(models, slices: list[tuple[str, int, int]]) -> dict:
    """A frankenmerge by hand: output layer k from the slices in order, embeddings from the first slice's
    model, the final norm and the head from the last one's."""
    t, out, k = models["tensors"], {}, 0
    for model, first, end in slices:
        for i in range(first, end):
            out.update({layer(n, k): v for n, v in t[model].items() if f".layers.{i}." in n})
            k += 1
    out["model.embed_tokens.weight"] = t[slices[0][0]]["model.embed_tokens.weight"]
    for n in ("model.norm.weight", "lm_head.weight"):
        out[n] = t[slices[-1][0]][n]
    return out


FRANKEN = """
merge_method: passthrough
slices:
  - sources: [{model: <a>, layer_range: [0, 3]}]
  - sources: [{model: <b>, layer_range: [1, 4]}]
  - sources: [{model: <a>, layer_range: [2, 3]}]
"""


def test_a_frankenmerge_stacks_the_named_layers_in_order(models, tmp_path, run_main):
    out = tmp_path / "franken"
    code, stdout, err = run_main("--config", str(recipe_file(tmp_path, models, FRANKEN)), "--out", str(out))
    assert code == 0, err
    want = stacked(models, [("a", 0, 3), ("b", 1, 4), ("a", 2, 3)])
    got = read_model(out)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[n].float(), want[n]) for n in want)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 7
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert len(model.model.layers) == 7


def test_slices_merged_with_per_slice_and_per_source_parameters(models, tmp_path):
    """task_arithmetic over two slices, the base not listed first in the second, weights per source (one a
    gradient over its slice's layers), per slice and global; lambda global."""
    text = """
merge_method: task_arithmetic
base_model: <base>
slices:
  - sources: [{model: <base>, layer_range: [0, 2]}, {model: <a>, layer_range: [0, 2], parameters: {weight: [0.2, 0.9]}},
              {model: <b>, layer_range: [0, 2], parameters: {weight: 0.5}}]
  - sources: [{model: <b>, layer_range: [2, 4]}, {model: <base>, layer_range: [2, 4]}, {model: <a>, layer_range: [1, 3]}]
    parameters: {weight: 0.4}
parameters: {lambda: 0.8, weight: 1.0}
dtype: float32
out_dtype: bfloat16
"""
    r = load_recipe(recipe_file(tmp_path, models, text))
    got = read_model(mbmerge.merge(out=tmp_path / "m", progress=False, **r["merge"]))
    t = models["tensors"]
    want = {}
    for n, base in t["base"].items():
        i = int(m.group(1)) if (m := re.search(r"\.layers\.(\d+)\.", n)) else None
        if i is None or i < 2:      # the first slice (and embeddings, norm, head: mergekit's first/last slice)
            if i is None and "embed" not in n:     # the last slice: b at position 1, a at 2, weights 0.4
                xs, w = [t["b"][n], t["a"][n]], [0.4, 0.4]
            else:
                wa = 0.2 if i is None else 0.2 + 0.7 * i     # the gradient [0.2, 0.9] over the slice's two layers
                xs, w = [t["a"][n], t["b"][n]], [wa, 0.5]
            b = base
        else:
            src = layer(n, i - 1)       # slice 2 takes a's layers 1, 2 and b's 2, 3 at output layers 2, 3
            b, xs, w = t["base"][n], [t["b"][n], t["a"][src]], [0.4, 0.4]
        want[n] = (b + 0.8 * sum(wi * (x - b) for wi, x in zip(w, xs))).bfloat16().float()
    assert all(torch.allclose(got[n].float(), want[n], rtol=2 ** -7, atol=0) for n in want)


@pytest.mark.parametrize("text, message", [
    ("""
merge_method: passthrough
slices: [{sources: [{model: <a>, layer_range: [2, 6]}]}]
""", "slices[0].sources[0] (<a>): layer_range [2, 6] goes past its 4 layers (0 to 3)"),
    ("""
merge_method: slerp
base_model: <base>
slices: [{sources: [{model: <base>, layer_range: [0, 2]}, {model: <a>, layer_range: [0, 3]}]}]
parameters: {t: 0.5}
""", "key 'slices[0]' has sources of 2 and 3 layers"),
    ("""
merge_method: ties
base_model: <base>
slices: [{sources: [{model: <a>, layer_range: [0, 2]}, {model: <b>, layer_range: [0, 2]}]}]
parameters: {weight: 1, density: 0.5}
""", "key 'slices[0]' has no source from base_model"),
    ("""
merge_method: linear
slices:
  - sources: [{model: <a>, layer_range: [0, 2]}, {model: <b>, layer_range: [0, 2]}]
  - sources: [{model: <a>, layer_range: [2, 4]}]
parameters: {weight: 1}
""", "key 'slices[1]' has 1 models besides the base and slices[0] 2"),
    ("""
merge_method: passthrough
slices: [{sources: [{model: <a>, layer_range: [3, 1]}]}]
""", "key 'slices[0].sources[0].layer_range' = [3, 1] must be [FIRST, END]"),
    ("""
merge_method: passthrough
slices: [{sources: [{model: <a>, layer_range: [0, 2]}, {model: <b>, layer_range: [0, 2]}]}]
""", "key 'slices[0].sources' has 2 models besides the base; passthrough takes exactly 1"),
    ("""
merge_method: passthrough
models: [{model: <a>}]
slices: [{sources: [{model: <a>, layer_range: [0, 2]}]}]
""", "key 'slices' and 'models' are both set"),
])
def test_bad_slices_are_one_line_and_write_nothing(models, tmp_path, run_main, text, message):
    out = tmp_path / "m"
    code, _, err = run_main("--config", str(recipe_file(tmp_path, models, text)), "--out", str(out))
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    for k, p in models["paths"].items():
        message = message.replace(f"<{k}>", str(p))
    assert message in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["recipe.yml"]


MERGEKIT_CASES = {
    "frankenmerge": FRANKEN + "dtype: bfloat16\n",
    "passthrough-scale": """
merge_method: passthrough
slices:
  - sources: [{model: <a>, layer_range: [0, 2]}]
  - sources: [{model: <b>, layer_range: [1, 4], parameters: {scale: 0.5}}]
dtype: float32
out_dtype: bfloat16
""",
    "slerp-slices-gradient-filter": """
merge_method: slerp
base_model: <base>
slices:
  - sources: [{model: <base>, layer_range: [0, 2]}, {model: <a>, layer_range: [0, 2]}]
    parameters: {t: [{filter: self_attn, value: [0, 1]}, {value: 0.7}]}
  - sources: [{model: <base>, layer_range: [2, 4]}, {model: <b>, layer_range: [1, 3]}]
    parameters: {t: 0.3}
parameters: {t: 0.5}
dtype: float32
out_dtype: bfloat16
""",
}


@pytest.mark.parametrize("case", list(MERGEKIT_CASES))
def test_parity_with_mergekit(models, tmp_path, case):
    from test_mergekit_parity import MERGEKIT, ulps
    if not MERGEKIT:
        pytest.skip("mergekit-yaml not found (set MBMERGE_MERGEKIT)")
    path = recipe_file(tmp_path, models, MERGEKIT_CASES[case])
    done = subprocess.run([MERGEKIT, str(path), str(tmp_path / "mk")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    mb = mbmerge.merge(out=tmp_path / "mb", progress=False, **load_recipe(path)["merge"])
    got, want = read_model(mb), read_model(tmp_path / "mk")
    assert sorted(got) == sorted(want)
    assert all(int(ulps(got[n], want[n]).max()) <= 1 for n in want)
    assert json.loads((mb / "config.json").read_text())["num_hidden_layers"] == \
        json.loads((tmp_path / "mk" / "config.json").read_text())["num_hidden_layers"]
