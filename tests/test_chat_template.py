"""The output's chat template (a recipe's chat_template, --chat-template): 'auto', an input's, or a
literal one, read back through transformers' AutoTokenizer; its refusals, one line each with nothing
written; and mergekit's 'auto' pick on the same inputs."""
import json
import os
import shutil
import subprocess

import pytest

import mbmerge
from mbmerge.common.errors import BadParameter
from conftest import base_tensors, expert_tensors, write_model

PLAIN = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
TAGGED = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
LITERAL = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base whose tokenizer_config has PLAIN, an expert with TAGGED in chat_template.jinja, one with
    TAGGED in its tokenizer_config, and one with none: 'auto' takes TAGGED (two of four)."""
    root, base = tmp_path_factory.mktemp("chat"), base_tensors()
    paths = {name: write_model(root / name, t) for name, t in
             [("base", base), ("a", expert_tensors(base, 1)), ("b", expert_tensors(base, 2)),
              ("none", expert_tensors(base, 3))]}
    set_config(paths["base"], PLAIN)
    (paths["a"] / "chat_template.jinja").write_text(TAGGED)
    set_config(paths["b"], TAGGED)
    return paths


def set_config(folder, template):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))


def template(folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder).chat_template


def merge(models, out, experts=("a", "b", "none"), **options):
    return mbmerge.merge("task_arithmetic", base=str(models["base"]), experts=[str(models[e]) for e in experts],
                         out=out, progress=False, **options)


def test_auto_takes_the_template_most_inputs_have(models, tmp_path):
    out = merge(models, tmp_path / "auto", chat_template="auto")
    assert template(out) == TAGGED
    card = json.loads((out / "mbmerge.json").read_text())
    assert card["chat_template"] == f"auto: the template of {models['a']}" and "--chat-template" in card["command"]


def test_a_model_of_the_merge_gives_its_template(models, tmp_path):
    assert template(merge(models, tmp_path / "b", chat_template=str(models["b"]))) == TAGGED
    assert template(merge(models, tmp_path / "base", chat_template=str(models["base"]))) == PLAIN


def test_a_literal_template_is_written_as_given(models, tmp_path):
    out = merge(models, tmp_path / "lit", chat_template=LITERAL)
    assert template(out) == LITERAL
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == LITERAL


def test_without_the_option_the_bases_template_is_copied(models, tmp_path):
    assert template(merge(models, tmp_path / "plain")) == PLAIN


def test_auto_without_any_template_keeps_what_was_copied(models, tmp_path):
    out = merge(models, tmp_path / "n", experts=("none",), chat_template="auto")
    assert template(out) == PLAIN                                    # the base's, which it has


@pytest.mark.parametrize("value,options,message", [
    ("chatml", {}, "'chatml' is not 'auto', a model of the merge, nor a Jinja template"),
    ("NONE", {}, "that model has no chat template"),
    ("auto", {"copy_tokenizer": False}, "--no-copy-tokenizer"),
])
def test_refusals_are_one_line_and_write_nothing(models, tmp_path, value, options, message):
    value = str(models["none"]) if value == "NONE" else value
    with pytest.raises(BadParameter) as e:
        merge(models, tmp_path / "bad", chat_template=value, **options)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_the_recipe_key_and_the_command_line(models, tmp_path, run_main):
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {models['base']}\nchat_template: auto\n"
                      f"models:\n  - model: {models['a']}\n    parameters: {{weight: 1.0}}\n"
                      f"  - model: {models['b']}\n    parameters: {{weight: 1.0}}\n")
    code, _, err = run_main("--config", recipe, "--out", tmp_path / "cfg")
    assert code == 0, err
    assert template(tmp_path / "cfg") == TAGGED
    code, _, err = run_main("--method", "task_arithmetic", "--base", models["base"], "--experts", models["b"],
                            "--out", tmp_path / "cli", "--chat-template", str(models["b"]))
    assert code == 0, err
    assert template(tmp_path / "cli") == TAGGED


MERGEKIT = os.environ.get("MBMERGE_MERGEKIT") or shutil.which("mergekit-yaml")


@pytest.mark.skipif(not MERGEKIT, reason="mergekit-yaml not found (set MBMERGE_MERGEKIT)")
def test_auto_picks_what_mergekit_picks(models, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {models['base']}\nchat_template: auto\n"
                      f"models:\n" + "".join(f"  - model: {models[e]}\n    parameters: {{weight: 1.0}}\n"
                                             for e in ("a", "b", "none")))
    done = subprocess.run([MERGEKIT, str(recipe), str(tmp_path / "mk")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert template(tmp_path / "mk") == template(merge(models, tmp_path / "mb", chat_template="auto")) == TAGGED
