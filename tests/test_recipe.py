"""mergekit YAML recipes: translation with mergekit's defaults, refusals naming the key, one end-to-end merge."""
import textwrap

import pytest
import torch

import mbmerge
from conftest import read_model
from mbmerge import methods
from mbmerge.common.errors import BadParameter
from mbmerge.engine.recipe.document import load_recipe


@pytest.fixture
def recipe(family, tmp_path):
    """write(yaml_text) -> path of recipe.yml; {base}, {math}, {code}, {ifeval} become the family's folders."""
    def write(text: str):
        path = tmp_path / "recipe.yml"
        path.write_text(textwrap.dedent(text).format(**{k: str(v) for k, v in family["paths"].items()}))
        return path
    return write


def two_experts(method: str, extra: str = "") -> str:
    """A recipe merging math (weight 0.7) and code (0.3) over base; `extra`: more top-level lines."""
    extra = textwrap.indent(extra, " " * 8).lstrip()
    return f"""
        merge_method: {method}
        base_model: {{base}}
        models:
          - model: {{math}}
            parameters: {{{{weight: 0.7}}}}
          - model: {{code}}
            parameters: {{{{weight: 0.3}}}}
        {extra}
        """


W, ONES = [0.7, 0.3], [1.0, 1.0]
# mergekit's defaults, as mbmerge parameters (filtered below to those the registered method declares)
GTA = dict(weights=W, density=ONES, scale=1.0, consensus="sum", sparsify_scope="tensor")
EXPECTED = {
    "linear": (two_experts("linear").replace("base_model: {base}", ""), dict(weights=W, normalize=True)),
    "task_arithmetic": (two_experts("task_arithmetic"), dict(weights=W, scale=1.0, normalize=False)),
    "ties": (two_experts("ties"), dict(GTA, aggregate="mean")),
    "dare_linear": (two_experts("dare_linear"), dict(GTA, normalize=False, rescale="l1")),
    "dare_ties": (two_experts("dare_ties"), dict(GTA, aggregate="sum", rescale="l1")),
    "breadcrumbs": (two_experts("breadcrumbs"), dict(GTA, normalize=False, gamma=[0.01] * 2)),
    "breadcrumbs_ties": (two_experts("breadcrumbs_ties"), dict(GTA, aggregate="sum", gamma=[0.01] * 2)),
    "della": (two_experts("della", "parameters: {{density: 0.5}}"),
              dict(GTA, density=[0.5] * 2, aggregate="mean", rescale="l1", epsilon=[0.15] * 2)),
    "della_linear": (two_experts("della_linear", "parameters: {{density: 0.5}}"),
                     dict(GTA, density=[0.5] * 2, normalize=False, rescale="l1", epsilon=[0.15] * 2)),
    "model_stock": ("""
        merge_method: model_stock
        base_model: {base}
        models: [{{model: {math}}}, {{model: {code}}}]
        """, dict(filter_wise=False)),
    "slerp": ("""
        merge_method: slerp
        base_model: {base}
        models: [{{model: {base}}}, {{model: {math}}}]
        parameters: {{t: 0.3}}
        """, dict(t=0.3)),
}


@pytest.mark.parametrize("method", list(EXPECTED))
def test_each_method_gets_mergekits_defaults(family, recipe, method):
    if method not in methods.REGISTRY:
        pytest.skip(f"{method} is not registered in mbmerge yet")
    text, expected = EXPECTED[method]
    declared = {p.name for p in methods.REGISTRY[method].params}
    r = load_recipe(recipe(text))
    experts = ["math"] if method == "slerp" else ["math", "code"]
    assert r["method"] == method and r["dtype"] is None
    assert r["experts"] == [str(family["paths"][e]) for e in experts]
    assert r["base"] == (None if method == "linear" else str(family["paths"]["base"]))
    assert r["params"] == {k: v for k, v in expected.items() if k in declared}


def test_listed_base_is_not_an_expert_except_for_linear(family, recipe):
    p = family["paths"]
    text = """
        merge_method: {method}
        base_model: {{base}}
        models:
          - model: {{base}}
            parameters: {{{{weight: 0.2}}}}
          - model: {{math}}
            parameters: {{{{weight: 0.8}}}}
        """
    ties = load_recipe(recipe(text.format(method="ties")))
    assert ties["experts"] == [str(p["math"])] and ties["params"]["weights"] == [0.8]
    linear = load_recipe(recipe(text.format(method="linear")))
    assert linear["experts"] == [str(p["base"]), str(p["math"])] and linear["params"]["weights"] == [0.2, 0.8]


def test_linear_merges_an_unlisted_base_as_one_more_input(family, recipe):
    r = load_recipe(recipe(two_experts("linear", "parameters: {{weight: 1.0}}")))    # as mergekit 0.1.5 does
    assert r["experts"][-1] == str(family["paths"]["base"]) and r["params"]["weights"] == [0.7, 0.3, 1.0]


def test_model_parameters_override_global_ones(recipe):
    r = load_recipe(recipe("""
        merge_method: ties
        base_model: {base}
        models:
          - model: {math}
            parameters: {{weight: 0.7, density: "2e-1"}}
          - model: {code}
        parameters: {{weight: 0.5, density: 0.5, normalize: "false", lambda: 1.5, int8_mask: true}}
        """))
    assert r["params"] == dict(weights=[0.7, 0.5], density=[0.2, 0.5], scale=1.5, aggregate="sum",
                               consensus="sum", sparsify_scope="tensor")


@pytest.mark.parametrize("lines, dtype", [("dtype: float32\nout_dtype: bfloat16", "bfloat16"),
                                          ("dtype: float16", "float16"), ("out_dtype: float32", "float32"), ("", None)])
def test_output_dtype_is_out_dtype_else_dtype(recipe, lines, dtype):
    assert load_recipe(recipe(two_experts("task_arithmetic", lines)))["dtype"] == dtype


@pytest.mark.parametrize("lines, tokenizer", [
    ("tokenizer_source: base", {"source": "base", "tokens": {}, "pad_to_multiple_of": None}),
    ("tokenizer: {{source: union, pad_to_multiple_of: 64, tokens: {{'<|im_end|>': {{source: {{kind: zero}}}}}}}}",
     {"source": "union", "tokens": {"<|im_end|>": {"source": {"kind": "zero"}, "force": False}},
      "pad_to_multiple_of": 64}),
])
def test_tokenizer_source_and_the_tokenizer_block(recipe, lines, tokenizer):
    r = load_recipe(recipe(two_experts("ties", lines)))
    assert r["tokenizer"] == tokenizer and r["merge"]["tokenizer"] == tokenizer


REFUSED = {
    "modules": ("""
        merge_method: slerp
        base_model: {base}
        modules: {{text: {{slices: [{{sources: [{{model: {base}, layer_range: [0, 2]}}]}}]}}}}
        """, "'modules.text' is not a module mbmerge knows; choose text_decoder"),
    "tokenizer twice": (two_experts("ties", "tokenizer: {{source: union}}\ntokenizer_source: base"),
                        "'tokenizer' and 'tokenizer_source' are both set"),
    "tokenizer block as a word": (two_experts("ties", "tokenizer: union"), "'tokenizer' must be a mapping"),
    "tokenizer padding": (two_experts("ties", "tokenizer: {{pad_to_multiple_of: -8}}"),
                          "tokenizer.pad_to_multiple_of = -8 must be a positive whole number"),
    "token source": (two_experts("ties", "tokenizer: {{tokens: {{x: {{source: {{kind: one}}}}}}}}"),
                     "tokenizer.tokens.x.source must be a model, {{kind: zero}}"),
    "chat_template": (two_experts("ties", "chat_template: [chatml]"), "'chat_template' must be 'auto'"),
    "unknown key": (two_experts("ties", "foo: 1"), "'foo' is not supported"),
    "gradient out of range": (two_experts("ties", "parameters: {{density: [1, 0.7, 1.5]}}"),
                              "density=1.5 must be in (0, 1]"),
    "filtered value out of range": (two_experts("ties", "parameters: {{density: [{{filter: mlp, value: [0.5, 0]}}, "
                                                        "{{value: 0.3}}]}}"), "density=0.0 must be in (0, 1]"),
    "condition without a value": ("""
        merge_method: ties
        base_model: {base}
        models:
          - model: {math}
            parameters: {{weight: [{{filter: mlp}}, {{value: 0}}]}}
        """, "'models[0].parameters.weight[0]' must be {{filter: NAME PART, value: VALUE or [gradient]}}"),
    "empty gradient": (two_experts("ties", "parameters: {{density: []}}"),
                       "'parameters.density' must be a value, a gradient"),
    "nested gradient": (two_experts("ties", "parameters: {{density: [[0.1, 0.2]]}}"),
                        "'parameters.density' must be a value, a gradient"),
    "gradient of words": (two_experts("ties", "parameters: {{density: [0.1, high]}}"),
                          "'parameters.density[1]' = 'high' is not a number"),
    "missing weight": ("""
        merge_method: task_arithmetic
        base_model: {base}
        models: [{{model: {math}, parameters: {{weight: 1}}}}, {{model: {code}}}]
        """, "'weight' is missing for model '{code}' (models[1])"),
    "bad yaml": ("merge_method: ties\nmodels: [", "not valid YAML"),
    "not a mapping": ("- ties\n", "not a mergekit recipe"),
    "no method": ("models: [{{model: {math}}}]\n", "'merge_method' is missing"),
    "unknown method": (two_experts("frankenmerge"), "'merge_method' = 'frankenmerge' is not supported"),
    "no base": ("merge_method: ties\nmodels: [{{model: {math}, parameters: {{weight: 1}}}}]\n",
                "'base_model' is missing (ties needs a base model)"),
    "no models": ("merge_method: ties\nbase_model: {base}\n", "'models' must be a list"),
    "global at model level": ("""
        merge_method: ties
        base_model: {base}
        models: [{{model: {math}, parameters: {{weight: 1, normalize: false}}}}]
        """, "'models[0].parameters.normalize' is a global parameter in mergekit"),
    "not a number": (two_experts("ties", "parameters: {{density: half}}"),
                     "'parameters.density' = 'half' is not a number"),
    "no such option": (two_experts("ties", "parameters: {{rescale: true}}"), "'rescale' = True: mbmerge's ties has no"),
    "bad dtype": (two_experts("ties", "out_dtype: int8"), "'out_dtype' = 'int8'"),
    "out of range": (two_experts("ties", "parameters: {{density: 1.5}}"), "density=1.5 must be in (0, 1]"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_name_the_file_and_key(family, recipe, case):
    text, message = REFUSED[case]
    path = recipe(text)
    with pytest.raises(BadParameter) as e:
        load_recipe(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    assert message.format(**{k: str(v) for k, v in family["paths"].items()}) in msg


def test_slerp_takes_t_and_exactly_one_model_besides_the_base(recipe):
    if "slerp" not in methods.REGISTRY:
        pytest.skip("slerp is not registered in mbmerge yet")
    text = """
        merge_method: slerp
        base_model: {base}
        models: [{{model: %s}}]
        %s
        """
    with pytest.raises(BadParameter, match="'models' has 2 models besides the base; slerp takes exactly 1"):
        load_recipe(recipe(text % ("{math}}}, {{model: {code}", "parameters: {{t: 0.5}}")))
    with pytest.raises(BadParameter, match="'parameters.t' is missing"):           # mbmerge's default 0.5 is not used
        load_recipe(recipe(text % ("{math}", "")))


def test_ties_recipe_merges_like_explicit_parameters(family, recipe, tmp_path):
    r = load_recipe(recipe(two_experts("ties", "parameters: {{density: 0.5}}\ndtype: float32\nout_dtype: bfloat16")))
    got = read_model(mbmerge.merge(**r["merge"], out=tmp_path / "recipe", progress=False))
    p = family["paths"]
    want = read_model(mbmerge.merge("ties", base=str(p["base"]), experts=[str(p["math"]), str(p["code"])],
                                    out=tmp_path / "explicit", progress=False, dtype="bfloat16",
                                    weights=[0.7, 0.3], density=0.5, aggregate="mean", consensus="sum"))
    assert sorted(got) == sorted(want)
    assert all(got[n].dtype == torch.bfloat16 and torch.equal(got[n], want[n]) for n in got)


# --- per-layer gradients and filters -----------------------------------------------------------


def test_gradients_interpolate_between_their_points_and_filters_take_the_first_match():
    from mbmerge.engine.recipe.values import evaluate as _evaluate
    assert _evaluate(0.3, "any", 0.7) == 0.3
    assert _evaluate([0.0, 0.5, 1.0], "x", 0.25) == pytest.approx(0.25)          # half way to the second point
    assert _evaluate([0.0, 0.5, 1.0], "x", 0.75) == pytest.approx(0.75)
    assert _evaluate([1.0, 0.0], "x", 0.5) == pytest.approx(0.5)
    assert _evaluate([2.0, 4.0], "x", 1.0) == 4.0 and _evaluate([2.0, 4.0], "x", 0.0) == 2.0
    assert _evaluate([True, False, True], "x", 0.6) is False                      # picked at int(t (n - 1))
    conditions = [{"filter": "mlp", "value": [0.1, 0.9]}, {"filter": "*", "value": 0.4}, {"value": 0.0}]
    assert _evaluate(conditions, "model.layers.3.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert _evaluate(conditions, "model.layers.3.self_attn.q_proj.weight", 0.5) == 0.4
    assert _evaluate([{"filter": "mlp", "value": 1.0}], "lm_head.weight", 0.0) is None   # no condition: not given


def test_each_tensor_takes_its_layers_place_and_its_names_filters():
    from mbmerge.engine.recipe.document import tensor_overrides
    layered = {"slices": [{"first": 0, "count": None, "parameters": {},
                           "models": [{"weight": [0.0, 1.0]}, {"weight": 1.0}]}],
               "parameters": {"lambda": [{"filter": "mlp", "value": 2.0}, {"value": 1.0}]}}
    names = ["model.embed_tokens.weight", *[f"model.layers.{i}.{part}.weight" for i in range(5)
                                            for part in ("self_attn.q_proj", "mlp.up_proj")], "lm_head.weight"]
    rules = tensor_overrides("task_arithmetic", layered, names)
    import re
    taken = {n: next(p for pattern, p in rules if re.search(pattern, n)) for n in names}
    assert taken["model.embed_tokens.weight"]["weights"] == [0.0, 1.0]           # outside the layers: t = 0
    assert taken["lm_head.weight"]["weights"] == [0.0, 1.0] and taken["lm_head.weight"]["scale"] == 1.0
    for i in range(5):
        assert taken[f"model.layers.{i}.self_attn.q_proj.weight"]["weights"] == [pytest.approx(i / 4), 1.0]
        assert taken[f"model.layers.{i}.mlp.up_proj.weight"]["scale"] == 2.0
        assert taken[f"model.layers.{i}.self_attn.q_proj.weight"]["scale"] == 1.0
    assert all(len([1 for pattern, _ in rules if re.search(pattern, n)]) == 1 for n in names)   # one rule each


def test_a_per_layer_density_merges_as_explicit_overrides_do(family, recipe, tmp_path):
    """ties with density 0.2 outside the layers and in layer 0, 0.8 in layer 1 (the family has two): the
    same bytes as the plain merge with an --override for layer 1."""
    import mbmerge
    from conftest import read_model
    r = load_recipe(recipe(two_experts("ties", "parameters: {{density: [0.2, 0.8]}}")))
    layered = read_model(mbmerge.merge(r["method"], base=r["base"], experts=r["experts"], out=tmp_path / "recipe",
                                       progress=False, layered=r["layered"], **r["params"]))
    explicit = read_model(mbmerge.merge("ties", base=r["base"], experts=r["experts"], out=tmp_path / "explicit",
                                        progress=False, **r["params"], overrides=[(r"\.layers\.1\.", {"density": 0.8})]))
    flat = read_model(mbmerge.merge(r["method"], base=r["base"], experts=r["experts"], out=tmp_path / "flat",
                                    progress=False, **r["params"]))
    assert all(torch.equal(layered[k], explicit[k]) for k in explicit)
    assert any(not torch.equal(layered[k], flat[k]) for k in flat if ".layers.1." in k)


def test_the_command_line_merges_a_recipe_with_gradients_and_filters(family, recipe, tmp_path, run_main):
    path = recipe(two_experts("task_arithmetic", "parameters: {{lambda: [{{filter: mlp, value: [0.5, 1.5]}}, "
                                                 "{{value: 1.0}}]}}"))
    code, out, err = run_main("--config", path, "--out", tmp_path / "m")
    assert code == 0, err
    card = (tmp_path / "m" / "mbmerge.json").read_text()
    assert "mlp" in card and "overrides" in card            # the per-tensor values it ran with, on record


def test_a_model_plus_adapter_reference_is_an_expert(family, recipe):
    """mergekit's MODEL+ADAPTER (test_lora merges one)."""
    r = load_recipe(recipe("""
        merge_method: ties
        base_model: {base}
        models: [{{model: "{math}+some/lora", parameters: {{weight: 1}}}}]
        """))
    assert r["experts"] == [f"{family['paths']['math']}+some/lora"]


def test_the_hypersphere_methods_boolean_options_are_read(family, recipe):
    r = load_recipe(recipe("""
        merge_method: nuslerp
        base_model: {base}
        models: [{{model: {math}, parameters: {{weight: 0.7}}}}, {{model: {code}, parameters: {{weight: 0.3}}}}]
        parameters: {{nuslerp_row_wise: true, nuslerp_flatten: "false"}}
        """))
    assert r["params"]["nuslerp_row_wise"] is True and r["params"]["nuslerp_flatten"] is False
