"""Multimodal models and mergekit's `modules:` recipes, from the user's side: tiny Gemma 3
(Gemma3ForConditionalGeneration) and Qwen2-VL models built from transformers' classes, saved with
save_pretrained, and fine-tune copies with perturbed weights; each module merged by its own method,
checked tensor by tensor against plain torch written here, loaded back by transformers with a text-only
forward pass; against mergekit 0.1.5 where it reads the models (MBMERGE_MERGEKIT, else skipped).

The Gemma 3 fixture stores its vision tower as the hub's checkpoints do (`vision_tower.vision_model.*`,
which mergekit's gemma3vl definition expects; transformers 5 saves `vision_tower.*` and reads both), and
the Qwen2-VL fixture's config keeps num_hidden_layers at its top as the hub's Qwen2-VL configs do (mergekit's
qwen2_vl definition reads it there; transformers 5 writes it under text_config only). Also: recipe parameters
a method does not take, ignored with a warning (issue 29, part 3).
"""
import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import read_model

MERGEKIT = os.environ.get("MBMERGE_MERGEKIT")
SIDE = {"preprocessor_config.json": {"image_processor_type": "Gemma3ImageProcessor"},
        "processor_config.json": {"processor_class": "Gemma3Processor"},
        "video_preprocessor_config.json": {"do_resize": True}}
TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1)


def _perturbed(src: Path, dst: Path, seed: int) -> Path:
    """A fine-tune: src's folder with every float tensor moved by seeded noise."""
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    tensors = {n: v + 0.02 * torch.randn(v.shape, generator=g) for n, v in read_model(src).items()}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _gemma3(root: Path) -> dict:
    from transformers import Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration
    torch.manual_seed(0)
    cfg = Gemma3Config(text_config=dict(TEXT, head_dim=16, sliding_window=8),
                       vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=28, patch_size=14, vision_use_head=False),
                       mm_tokens_per_image=4)
    Gemma3ForConditionalGeneration(cfg).save_pretrained(root / "g3")
    tensors = {n.replace("vision_tower.", "vision_tower.vision_model.", 1): v   # the hub checkpoints' names
               for n, v in read_model(root / "g3").items()}
    save_file(tensors, str(root / "g3" / "model.safetensors"), metadata={"format": "pt"})
    for name, value in SIDE.items():
        (root / "g3" / name).write_text(json.dumps(value))
    (root / "g3" / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    text = root / "g3_text"         # the text-only sibling: a fine-tune of the language model, as Gemma3ForCausalLM
    Gemma3ForCausalLM(cfg.text_config).save_pretrained(text)
    g = torch.Generator().manual_seed(3)
    save_file({n.replace("language_model.model.", "model."): v + 0.02 * torch.randn(v.shape, generator=g)
               for n, v in tensors.items() if n.startswith("language_model.")},
              str(text / "model.safetensors"), metadata={"format": "pt"})
    return {"base": root / "g3", "a": _perturbed(root / "g3", root / "g3_a", 1),
            "b": _perturbed(root / "g3", root / "g3_b", 2), "text": text}


def _qwen2vl(root: Path) -> dict:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    torch.manual_seed(0)
    cfg = Qwen2VLConfig(text_config=dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
                        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2,
                                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2))
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(root / "q2")
    config = json.loads((root / "q2" / "config.json").read_text())
    config["num_hidden_layers"] = TEXT["num_hidden_layers"]       # at the top too, as the hub's configs have it
    (root / "q2" / "config.json").write_text(json.dumps(config))
    return {"base": root / "q2", "a": _perturbed(root / "q2", root / "q2_a", 1),
            "b": _perturbed(root / "q2", root / "q2_b", 2)}


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {"gemma3": _gemma3(root), "qwen2vl": _qwen2vl(root)}


def _recipe(tmp_path: Path, text: str, /, **paths) -> Path:
    path = tmp_path / "recipe.yml"
    path.write_text(textwrap.dedent(text).format(**{k: str(v) for k, v in paths.items()}))
    return path


def _ta(b, xs, ws, lam=1.0):
    return b + lam * sum(w * (x - b) for x, w in zip(xs, ws))


def _ties(b, xs, ws, density):
    """TIES in plain torch: each delta's top k = floor(density n) by magnitude, sign by mass, disjoint mean."""
    es = []
    for x, w in zip(xs, ws):
        d = (x - b).flatten()
        keep = torch.zeros_like(d)
        idx = d.abs().topk(max(1, int(density * d.numel()))).indices
        keep[idx] = d[idx]
        es.append(w * keep)
    e = torch.stack(es)                                          # [k, n]
    s = torch.where(e.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(e) == s) & (e != 0)
    w = torch.tensor(ws)[:, None].expand_as(e)
    m = (e * agree).sum(0) / (w * agree).sum(0).clamp_min(1e-30)
    return b + m.view(b.shape)


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts and name.startswith("language_model.") else None


GEMMA3 = """
    merge_method: task_arithmetic
    base_model: {base}
    dtype: float32
    modules:
      text_decoder:
        models:
          - model: {a}
            parameters: {{weight: [1.0, 0.5, 0.2]}}
          - model: {b}
            parameters: {{weight: 0.5}}
      vision_tower:
        merge_method: linear
        models:
          - {{model: {base}, parameters: {{weight: 0.2}}}}
          - {{model: {a}, parameters: {{weight: 0.3}}}}
          - {{model: {b}, parameters: {{weight: 0.5}}}}
    """


def test_gemma3_modules_merge_each_by_its_own_method_and_load(vlms, tmp_path, run_main):
    m = vlms["gemma3"]
    b, a, x, out = _merged(m, GEMMA3, tmp_path, run_main)
    for n, v in out.items():
        if n.startswith("language_model."):        # the text decoder's own layers carry the gradient: 1, 0.5, 0.2
            w = {None: 1.0, 0: 1.0, 1: 0.5, 2: 0.2}[_layer(n)]
            want = _ta(b[n], [a[n], x[n]], [w, 0.5])
        elif n.startswith("vision_tower."):
            want = 0.2 * b[n] + 0.3 * a[n] + 0.5 * x[n]
        else:                                       # the projector, named by no module: the base's
            assert n.startswith("multi_modal_projector.")
            want = b[n]
        torch.testing.assert_close(v, want, rtol=1e-6, atol=1e-6, msg=n)
    for name in [*SIDE, "chat_template.jinja"]:
        assert (tmp_path / "out" / name).read_bytes() == (m["base"] / name).read_bytes()
    record = json.loads((tmp_path / "out" / "mbmerge.json").read_text())
    assert [(e.get("module"), e.get("method")) for e in record["modules"]] == [
        ("text_decoder", "task_arithmetic"), ("vision_tower", "linear"), (None, None)]
    assert record["modules"][2] == {"modules": ["multi_modal_projector"], "copied_from": str(m["base"])}
    assert "- vision_tower: **linear** of" in (tmp_path / "out" / "README.md").read_text()
    _text_forward(tmp_path / "out", "Gemma3ForConditionalGeneration")


def _merged(m: dict, recipe: str, tmp_path: Path, run_main) -> tuple[dict, dict, dict, dict]:
    """The recipe run as a user runs it: (base, a, b, output) tensors; the output has the base's names."""
    code, _, err = run_main("--config", _recipe(tmp_path, recipe, **m), "--out", tmp_path / "out", "-q")
    assert code == 0, err
    b, a, x = (read_model(m[k]) for k in ("base", "a", "b"))
    out = read_model(tmp_path / "out")
    assert sorted(out) == sorted(b)
    return b, a, x, out


def _text_forward(folder: Path, cls: str) -> None:
    """transformers' image-text-to-text class loads the output, weights as written, and runs a text-only pass."""
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    assert type(model).__name__ == cls
    file = read_model(folder)
    state = model.state_dict()
    embed = next(n for n in file if n.endswith("embed_tokens.weight"))
    assert any(torch.equal(v, file[embed]) for n, v in state.items() if n.endswith("embed_tokens.weight"))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 7, 9]])).logits
    assert logits.shape == (1, 4, TEXT["vocab_size"]) and torch.isfinite(logits).all()


QWEN2VL = """
    merge_method: ties
    base_model: {base}
    dtype: float32
    modules:
      text_decoder:
        models:
          - {{model: {a}, parameters: {{weight: 1.0, density: 0.5}}}}
          - {{model: {b}, parameters: {{weight: 0.5, density: 0.5}}}}
      multi_modal_projector:
        merge_method: task_arithmetic
        models:
          - {{model: {b}, parameters: {{weight: 0.7}}}}
    """


def test_qwen2vl_ties_language_model_projector_apart_vision_tower_kept(vlms, tmp_path, run_main):
    m = vlms["qwen2vl"]
    b, a, x, out = _merged(m, QWEN2VL, tmp_path, run_main)
    for n, v in out.items():
        if n.startswith("visual.merger."):
            want = _ta(b[n], [x[n]], [0.7])
        elif n.startswith("visual."):
            want = b[n]
        else:
            want = _ties(b[n], [a[n], x[n]], [1.0, 0.5], 0.5)
        torch.testing.assert_close(v, want, rtol=1e-6, atol=1e-6, msg=n)
    _text_forward(tmp_path / "out", "Qwen2VLForConditionalGeneration")


def test_a_vlms_language_model_merges_with_its_text_only_sibling(vlms, tmp_path, run_main):
    m = vlms["gemma3"]
    recipe = _recipe(tmp_path, """
        merge_method: task_arithmetic
        base_model: {base}
        modules:
          text_decoder:
            models: [{{model: {text}, parameters: {{weight: 0.6}}}}]
        """, **m)
    code, _, err = run_main("--config", recipe, "--out", tmp_path / "out", "-q")
    assert code == 0, err
    b, t, out = read_model(m["base"]), read_model(m["text"]), read_model(tmp_path / "out")
    assert sorted(out) == sorted(b)
    for n, v in out.items():
        sibling = n.replace("language_model.model.", "model.")
        want = _ta(b[n], [t[sibling]], [0.6]) if n.startswith("language_model.") else b[n]
        torch.testing.assert_close(v, want, rtol=1e-6, atol=1e-6, msg=n)
    record = json.loads((tmp_path / "out" / "mbmerge.json").read_text())
    assert "read under the output's names, e.g. model.embed_tokens.weight as " \
           "language_model.model.embed_tokens.weight" in record["modules"][0]["renamed"][0]
    assert "language_model.model.embed_tokens.weight" in (tmp_path / "out" / "README.md").read_text()
    _text_forward(tmp_path / "out", "Gemma3ForConditionalGeneration")


@pytest.mark.parametrize("case,text,message", [
    ("no such tensors", """
        merge_method: task_arithmetic
        base_model: {text}
        modules:
          vision_tower:
            models: [{{model: {a}, parameters: {{weight: 1}}}}]
        """, "modules.vision_tower: no tensor of the reference model {text} ({text}) belongs to this module; "
             "it has text_decoder"),
    ("slices of another length", """
        merge_method: task_arithmetic
        base_model: {base}
        modules:
          text_decoder:
            slices: [{{sources: [{{model: {base}, layer_range: [0, 1]}},
                                 {{model: {a}, layer_range: [0, 1], parameters: {{weight: 1}}}}]}}]
        """, "tensors of this module (1 layers), the reference {base} has"),
    ("unknown module", """
        merge_method: task_arithmetic
        base_model: {base}
        modules:
          vision:
            models: [{{model: {a}, parameters: {{weight: 1}}}}]
        """, "key 'modules.vision' is not a module mbmerge knows"),
    ("module base", """
        merge_method: task_arithmetic
        base_model: {base}
        modules:
          text_decoder:
            base_model: {a}
            models: [{{model: {a}, parameters: {{weight: 1}}}}]
        """, "key 'modules.text_decoder' must be a mapping"),
    ("models and modules", """
        merge_method: task_arithmetic
        base_model: {base}
        models: [{{model: {a}, parameters: {{weight: 1}}}}]
        modules:
          text_decoder:
            models: [{{model: {a}, parameters: {{weight: 1}}}}]
        """, "key 'modules' and 'models' or 'slices' are both set"),
])
def test_refusals_are_one_line_and_write_nothing(vlms, tmp_path, run_main, case, text, message):
    m = vlms["gemma3"]
    code, out, err = run_main("--config", _recipe(tmp_path, text, **m), "--out", tmp_path / "out", "-q")
    assert code != 0 and err.count("\n") == 1 and "Traceback" not in err
    assert message.format(**{k: str(v) for k, v in m.items()}) in err
    assert not (tmp_path / "out").exists()


# mergekit 0.1.5 merges every module with the recipe's merge_method (it ignores a module's own) and writes only
# the modules a recipe names: these recipes name them all, with one method; and a whole-model merge, whose
# gradient mergekit also runs over each module's own layers
MERGEKIT_RECIPES = {"gemma3-whole": """
    merge_method: task_arithmetic
    base_model: {base}
    dtype: float32
    models:
      - {{model: {a}, parameters: {{weight: [0.2, 0.9]}}}}
      - {{model: {b}, parameters: {{weight: 0.5}}}}
    """, "gemma3-slices": """
    merge_method: task_arithmetic
    base_model: {base}
    dtype: float32
    modules:
      text_decoder:
        slices:
          - sources: [{{model: {base}, layer_range: [0, 2]}},
                      {{model: {a}, layer_range: [0, 2], parameters: {{weight: [0.3, 0.6]}}}}]
          - sources: [{{model: {base}, layer_range: [2, 3]}},
                      {{model: {b}, layer_range: [2, 3], parameters: {{weight: 0.8}}}}]
      vision_tower:
        models: [{{model: {b}, parameters: {{weight: 1.0}}}}]
      multi_modal_projector:
        models: [{{model: {b}, parameters: {{weight: 1.0}}}}]
    """, "gemma3": """
    merge_method: task_arithmetic
    base_model: {base}
    dtype: float32
    modules:
      text_decoder:
        models:
          - {{model: {a}, parameters: {{weight: [1.0, 0.5, 0.2]}}}}
          - {{model: {b}, parameters: {{weight: 0.5}}}}
      vision_tower:
        parameters: {{lambda: 0.8}}
        models: [{{model: {a}, parameters: {{weight: [0.3, 0.9]}}}}, {{model: {b}, parameters: {{weight: 0.5}}}}]
      multi_modal_projector:
        models: [{{model: {a}, parameters: {{weight: 0.4}}}}]
    """, "qwen2vl": """
    merge_method: ties
    base_model: {base}
    dtype: float32
    modules:
      text_decoder:
        models:
          - {{model: {a}, parameters: {{weight: 1.0, density: 0.5}}}}
          - {{model: {b}, parameters: {{weight: 0.5, density: 0.5}}}}
      multi_modal_projector:
        models: [{{model: {b}, parameters: {{weight: 0.7, density: 0.6}}}}]
      vision_tower:
        models: [{{model: {a}, parameters: {{weight: 0.3, density: 0.4}}}}]
    """}


@pytest.mark.skipif(not MERGEKIT, reason="mergekit-yaml not found (set MBMERGE_MERGEKIT)")
@pytest.mark.parametrize("arch", list(MERGEKIT_RECIPES))
def test_parity_with_mergekit(vlms, tmp_path, arch):
    import mbmerge
    from mbmerge.engine.recipe.document import load_recipe
    recipe = _recipe(tmp_path, MERGEKIT_RECIPES[arch], **vlms[arch.split("-")[0]])
    done = subprocess.run([MERGEKIT, str(recipe), str(tmp_path / "mk"), "--no-copy-tokenizer"], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    mbmerge.merge(out=tmp_path / "mb", progress=False, **load_recipe(recipe)["merge"])
    ours, theirs = read_model(tmp_path / "mb"), read_model(tmp_path / "mk")
    assert sorted(ours) == sorted(theirs)
    for n in ours:
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-6, atol=1e-6, msg=n)


def test_parameters_a_method_does_not_take_are_ignored_with_a_warning(family, tmp_path, run_main):
    p = family["paths"]
    outs = {}
    for case, extra, weight in [("with", ", densty: 0.3", ", parameters: {weight: 0.5}"), ("without", "", "")]:
        recipe = tmp_path / f"{case}.yml"
        recipe.write_text(f"merge_method: sce\nbase_model: {p['base']}\nparameters: {{select_topk: 0.5{extra}}}\n"
                          f"models:\n  - {{model: {p['math']}{weight}}}\n  - {{model: {p['code']}{weight}}}\n")
        code, _, err = run_main("--config", recipe, "--out", tmp_path / case)
        assert code == 0, err
        outs[case] = err
    assert "mbmerge: warning: recipe key 'models[0].parameters.weight' is not a parameter of sce; ignored, as " \
           "mergekit ignores it" in outs["with"]
    assert "recipe key 'models[1].parameters.weight' is not a parameter of sce" in outs["with"]
    assert "recipe key 'parameters.densty' is not a parameter of sce" in outs["with"]
    assert "warning: recipe key" not in outs["without"]
    shards = sorted(f.name for f in (tmp_path / "without").glob("*.safetensors"))
    assert shards and shards == sorted(f.name for f in (tmp_path / "with").glob("*.safetensors"))
    assert all((tmp_path / "with" / f).read_bytes() == (tmp_path / "without" / f).read_bytes() for f in shards)
    record = json.loads((tmp_path / "with" / "mbmerge.json").read_text())
    assert record["ignored_parameters"] == [{"key": "models[0].parameters.weight", "method": "sce"},
                                            {"key": "models[1].parameters.weight", "method": "sce"},
                                            {"key": "parameters.densty", "method": "sce"}]
    assert "- `parameters.densty`: not a parameter of sce" in (tmp_path / "with" / "README.md").read_text()
    assert "ignored_parameters" not in json.loads((tmp_path / "without" / "mbmerge.json").read_text())


def test_an_interrupted_modules_merge_resumes_to_the_same_bytes_and_verifies(vlms, tmp_path, monkeypatch):
    import mbmerge
    import mbmerge.engine.output.write as w
    from mbmerge.engine.output.verify import verify
    from mbmerge.engine.recipe.document import load_recipe
    kw = load_recipe(_recipe(tmp_path, GEMMA3, **vlms["gemma3"]))["merge"]
    mbmerge.merge(out=tmp_path / "fresh", progress=False, **kw)
    calls, write = [0], w.ShardWriter.write

    def interrupted(self, t, start, values):
        calls[0] += 1
        if calls[0] == 60:                      # in the vision tower's part, the text decoder's written
            raise KeyboardInterrupt
        write(self, t, start, values)
    monkeypatch.setattr(w.ShardWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mbmerge.merge(out=tmp_path / "out", progress=False, **kw)
    monkeypatch.setattr(w.ShardWriter, "write", write)
    mbmerge.merge(out=tmp_path / "out", progress=False, **kw)
    assert json.loads((tmp_path / "out" / "mbmerge.json").read_text())["resumed_tensors"] >= 40
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "fresh" / "model.safetensors").read_bytes()
    assert verify(tmp_path / "out", inputs=True) == []


@pytest.mark.parametrize("name,module,layer,text", [
    ("model.language_model.layers.2.mlp.up_proj.weight", "text_decoder", 2, "model.layers.2.mlp.up_proj.weight"),
    ("language_model.model.layers.2.mlp.up_proj.weight", "text_decoder", 2, "model.layers.2.mlp.up_proj.weight"),
    ("language_model.lm_head.weight", "text_decoder", None, "lm_head.weight"),
    ("lm_head.weight", "text_decoder", None, "lm_head.weight"),
    ("model.layers.1.self_attn.q_proj.bias", "text_decoder", 1, "model.layers.1.self_attn.q_proj.bias"),
    ("model.vision_tower.vision_model.encoder.layers.4.mlp.fc1.weight", "vision_tower", 4, None),
    ("vision_tower.vision_model.post_layernorm.weight", "vision_tower", None, None),
    ("model.visual.blocks.7.attn.qkv.weight", "vision_tower", 7, None),
    ("visual.patch_embed.proj.weight", "vision_tower", None, None),
    ("visual.merger.mlp.0.weight", "multi_modal_projector", None, None),
    ("model.visual.deepstack_merger_list.1.norm.weight", "multi_modal_projector", None, None),
    ("model.multi_modal_projector.mm_input_projection_weight", "multi_modal_projector", None, None),
    ("multi_modal_projector.linear_1.weight", "multi_modal_projector", None, None),
])
def test_each_tensor_has_its_module_and_its_layer_within_it(name, module, layer, text):
    from mbmerge.common import roles
    assert (roles.module_of(name), roles.module_layer(name)) == (module, layer)
    assert roles.text_name(name) == (text or name)
