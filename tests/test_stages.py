"""Multi-document mergekit recipes (mergekit-multi's stages): values against plain torch, dependency
order, lazy skips, resume after an interruption, and refusals in one line before anything is written."""
import textwrap

import pytest
import torch

from mbmerge.common.errors import BadParameter
from mbmerge.engine.recipe.stages import is_multi_stage, load_stages, run_stages
from conftest import read_model

# The final merge comes first in the file: it uses stage `mc`, so `mc` runs first all the same.
TWO_STAGES = """
    merge_method: task_arithmetic
    base_model: {base}
    models:
      - {{model: mc, parameters: {{weight: 0.3}}}}
      - {{model: {ifeval}, parameters: {{weight: 0.7}}}}
    ---
    name: mc
    merge_method: linear
    models:
      - {{model: {math}, parameters: {{weight: 0.5}}}}
      - {{model: {code}, parameters: {{weight: 0.5}}}}
    """


@pytest.fixture
def recipe(family, tmp_path):
    """recipe(text) -> the path of a YAML file, {base}, {math}, {code}, {ifeval} replaced by the family's."""
    def write(text: str, name: str = "multi.yml"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).format(**{k: str(v) for k, v in family["paths"].items()}))
        return path
    return write


def expected(family) -> tuple[dict, dict]:
    """Stage mc (linear, 0.5/0.5) and the final merge (task arithmetic on mc as written, in bf16), in plain torch."""
    t = family["tensors"]
    mc = {n: (0.5 * t["math"][n] + 0.5 * t["code"][n]).bfloat16().float() for n in t["base"]}
    final = {n: (b + 0.3 * (mc[n] - b) + 0.7 * (t["ifeval"][n] - b)).bfloat16().float() for n, b in t["base"].items()}
    return mc, final


def assert_within_one_ulp(folder, want: dict) -> None:
    got = read_model(folder)
    assert set(got) == set(want)
    for n, w in want.items():
        assert got[n].dtype == torch.bfloat16, n
        assert ((got[n].float() - w).abs() <= w.abs() * 2 ** -7 + 1e-6).all(), n   # 1 bf16 ulp


def mtimes(folder) -> dict:
    return {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}


def test_the_command_merges_the_stages_in_dependency_order(family, recipe, tmp_path, run_main):
    out = tmp_path / "merged"
    code, stdout, stderr = run_main("--config", recipe(TWO_STAGES), "--out", out)
    assert code == 0, stderr
    assert stderr.index("stage mc (1/2): merging into") < stderr.index("final merge (2/2): merging into")
    assert "stages merged; output in" in stdout
    mc, final = expected(family)
    assert_within_one_ulp(tmp_path / "merged.stages" / "mc", mc)     # the default intermediate folder
    assert_within_one_ulp(out, final)


def test_a_stage_already_merged_is_skipped_and_left_untouched(family, recipe, tmp_path, run_main):
    out, stage = tmp_path / "merged", tmp_path / "steps" / "mc"
    path = recipe(TWO_STAGES)
    run_stages(path, out, intermediate_dir=tmp_path / "steps", progress=False)
    before = mtimes(stage)
    out.rename(tmp_path / "first")
    code, _, stderr = run_main("--config", path, "--out", out, "--intermediate-dir", tmp_path / "steps")
    assert code == 0, stderr
    assert "stage mc (1/2): already merged, unchanged, skipped" in stderr
    assert mtimes(stage) == before
    assert_within_one_ulp(out, expected(family)[1])


def test_overwrite_redoes_every_stage(recipe, tmp_path, run_main):
    path, out = recipe(TWO_STAGES), tmp_path / "merged"
    assert run_main("--config", path, "--out", out, "-q")[0] == 0
    before = mtimes(tmp_path / "merged.stages" / "mc")
    code, _, stderr = run_main("--config", path, "--out", out, "-q")
    assert code == 0 and stderr == ""                   # lazy: both done already
    assert run_main("--config", path, "--out", out, "-q", "--overwrite")[0] == 0
    assert mtimes(tmp_path / "merged.stages" / "mc") != before


def test_an_interrupted_stage_resumes_and_the_stages_before_it_are_not_redone(family, recipe, tmp_path, run_main,
                                                                             monkeypatch):
    import mbmerge.engine.output.write as w
    out, path = tmp_path / "merged", recipe(TWO_STAGES)
    write, calls = w.ShardWriter.write, []

    def interrupted_write(self, t, start, values):      # Ctrl-C at the final merge's third chunk
        if self.folder.name == ".merged.mbmerge-partial":
            calls.append(t.name)
            if len(calls) == 3:
                raise KeyboardInterrupt
        write(self, t, start, values)
    monkeypatch.setattr(w.ShardWriter, "write", interrupted_write)
    code, _, stderr = run_main("--config", path, "--out", out, "--memory-budget", "100KB")
    assert code == 130 and "run the same command again to resume" in stderr
    assert (tmp_path / ".merged.mbmerge-partial").is_dir() and not out.exists()
    before = mtimes(tmp_path / "merged.stages" / "mc")

    monkeypatch.setattr(w.ShardWriter, "write", write)
    code, _, stderr = run_main("--config", path, "--out", out, "--memory-budget", "100KB")
    assert code == 0, stderr
    assert "stage mc (1/2): already merged, unchanged, skipped" in stderr
    assert "resuming the interrupted merge" in stderr
    assert mtimes(tmp_path / "merged.stages" / "mc") == before
    assert_within_one_ulp(out, expected(family)[1])


def test_without_an_unnamed_document_the_stages_go_under_out(family, recipe, tmp_path, run_main):
    path = recipe(TWO_STAGES.replace("merge_method: task_arithmetic", "name: final\n    merge_method: task_arithmetic"))
    out = tmp_path / "merged"
    assert is_multi_stage(path)
    assert run_main("--config", path, "--out", out, "-q")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["final", "mc"]
    assert_within_one_ulp(out / "final", expected(family)[1])
    code, _, stderr = run_main("--config", path, "--out", tmp_path / "o2", "--intermediate-dir", tmp_path / "i2")
    assert code == 2 and "no document is unnamed" in stderr and not (tmp_path / "i2").exists()


def linear(name, *models, extra=""):
    """One document: a linear merge of `models` (placeholders or stage names), weight 1 each."""
    listed = ", ".join(f"{{{{model: {m}, parameters: {{{{weight: 1}}}}}}}}" for m in models)
    return (f"name: {name}\n" if name else "") + f"merge_method: linear\nmodels: [{listed}]\n{extra}"


REFUSED = {
    "cycle": ("---\n".join([linear("a", "b", "{math}"), linear("b", "a", "{code}"), linear(None, "a", "{code}")]),
              "stages a -> b -> a use each other in a cycle"),
    "bad later stage": (linear("a", "{math}", "{code}") + "---\n" + linear(None, "a", "{code}", extra="t: 0.5\n"),
                        "document 2 (the final merge): key 't' is not supported"),
    "bad parameter": (linear("a", "{math}", "{code}") + "---\n"
                      + linear(None, "a", "{code}", extra="parameters: {{normalize: maybe}}\n"),
                      "document 2 (the final merge): key 'parameters.normalize' = 'maybe' is not a boolean"),
    "duplicate names": (linear("a", "{math}", "{code}") + "---\n" + linear("a", "{math}", "{ifeval}"),
                        "document 2: name 'a' is already document 1's"),
    "two unnamed": (linear(None, "{math}", "{code}") + "---\n" + linear(None, "{math}", "{ifeval}"),
                    "document 2: document 1 is unnamed too; only the final merge may be unnamed"),
    "path as a name": (linear("../up", "{math}", "{code}") + "---\n" + linear(None, "{math}", "{ifeval}"),
                       "document 1: 'name' = '../up' must be a folder name"),
    "missing model in a later stage": (linear("a", "{math}", "{code}") + "---\n" + linear(None, "a", "./nowhere"),
                                       "final merge: expert ./nowhere: no such folder"),
    "not a mapping": (linear("a", "{math}", "{code}") + "---\n- linear\n",
                      "document 2 is not a mergekit recipe"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_are_one_line_and_nothing_is_written(recipe, tmp_path, run_main, case):
    text, message = REFUSED[case]
    out = tmp_path / "merged"
    code, _, stderr = run_main("--config", recipe(text), "--out", out)
    assert code != 0
    assert len(stderr.strip().splitlines()) == 1 and message in stderr, stderr
    assert not out.exists() and not (tmp_path / "merged.stages").exists()
    assert not list(tmp_path.glob(".merged*"))


def test_only_stage_names_are_replaced_and_dependencies_order_the_stages(family, recipe, tmp_path):
    path = recipe("---\n".join([linear(None, "late", "early", extra="chat_template: late\n"),
                                 linear("late", "early", "{code}"), linear("early", "{math}", "{code}")]))
    stages = load_stages(path, tmp_path / "out")
    assert [s.name for s in stages] == ["early", "late", None]
    steps = tmp_path / "out.stages"
    assert stages[1].merge["experts"] == [str(steps / "early"), str(family["paths"]["code"])]
    assert stages[2].merge["chat_template"] == str(steps / "late")
    assert stages[2].needs == ("early", "late") and stages[2].out == tmp_path / "out"


def test_intermediate_dir_needs_a_multi_document_config(family, recipe, tmp_path, run_main):
    p = family["paths"]
    single = recipe(TWO_STAGES.split("---")[0].replace("model: mc", f"model: {p['math']}"), "one.yml")
    assert not is_multi_stage(single)
    for args in (["--config", single], ["--method", "linear", "--experts", f"{p['math']},{p['code']}"]):
        code, _, stderr = run_main(*args, "--out", tmp_path / "o", "--intermediate-dir", tmp_path / "i")
        assert code == 2 and "--intermediate-dir goes with a --config of several YAML documents" in stderr


def test_run_options_the_recipe_sets_are_refused(recipe, tmp_path):
    with pytest.raises(BadParameter, match="dtype is set by each document's recipe"):
        run_stages(recipe(TWO_STAGES), tmp_path / "out", dtype="float32")


# --- issue 26: a changed recipe is never skipped --------------------------------------------------

def weights_of(mc: tuple, final: tuple) -> str:
    """TWO_STAGES with other weights: mc's (math, code) and the final merge's (mc, ifeval)."""
    text = TWO_STAGES.replace("weight: 0.3", f"weight: {final[0]}").replace("weight: 0.7", f"weight: {final[1]}")
    return text.replace("weight: 0.5", f"weight: {mc[0]}", 1).replace("weight: 0.5", f"weight: {mc[1]}", 1)


def expected_with(family, mc_w: tuple, final_w: tuple) -> tuple[dict, dict]:
    """expected() for other weights, in plain torch."""
    t = family["tensors"]
    mc = {n: (mc_w[0] * t["math"][n] + mc_w[1] * t["code"][n]).bfloat16().float() for n in t["base"]}
    final = {n: (b + final_w[0] * (mc[n] - b) + final_w[1] * (t["ifeval"][n] - b)).bfloat16().float()
             for n, b in t["base"].items()}
    return mc, final


def tree(folder) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_weights_of_edits_both_documents():
    text = weights_of((0.2, 0.8), (0.4, 0.6))
    assert "weight: 0.2" in text and "weight: 0.8" in text and "weight: 0.4" in text and "weight: 0.6" in text
    assert "0.5" not in text and "0.3" not in text and "0.7" not in text


def test_a_changed_final_document_is_refused_without_overwrite_and_nothing_is_touched(family, recipe, tmp_path,
                                                                                       run_main):
    out = tmp_path / "merged"
    path = recipe(TWO_STAGES)
    assert run_main("--config", path, "--out", out)[0] == 0
    before = {"mc": tree(tmp_path / "merged.stages"), "out": tree(out)}
    recipe(weights_of((0.2, 0.8), (0.4, 0.6)))                      # both documents edited, same file

    code, stdout, stderr = run_main("--config", path, "--out", out)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and "holds an earlier merge of this recipe's final document, which would " \
        "change (its document changed): pass --overwrite" in stderr
    assert {"mc": tree(tmp_path / "merged.stages"), "out": tree(out)} == before

    code, _, stderr = run_main("--config", path, "--out", out, "--overwrite")
    assert code == 0, stderr
    mc, final = expected_with(family, (0.2, 0.8), (0.4, 0.6))
    assert_within_one_ulp(tmp_path / "merged.stages" / "mc", mc)
    assert_within_one_ulp(out, final)

    after = {"mc": tree(tmp_path / "merged.stages"), "out": tree(out)}
    code, _, stderr = run_main("--config", path, "--out", out)    # unchanged now: both skipped
    assert code == 0, stderr
    assert stderr.count("already merged, unchanged, skipped") == 2
    assert {"mc": tree(tmp_path / "merged.stages"), "out": tree(out)} == after


def test_a_changed_intermediate_stage_is_merged_again_with_the_stages_that_use_it(family, recipe, tmp_path,
                                                                                 run_main):
    out = tmp_path / "merged"
    path = recipe(TWO_STAGES)
    assert run_main("--config", path, "--out", out)[0] == 0
    recipe(weights_of((0.2, 0.8), (0.3, 0.7)))                      # only stage mc's document edited
    code, _, stderr = run_main("--config", path, "--out", out)
    assert code == 0, stderr
    assert "stage mc (1/2): merging into" in stderr and "(its document changed)" in stderr
    assert "final merge (2/2): merging into" in stderr and "(stage mc it uses is merged again)" in stderr
    mc, final = expected_with(family, (0.2, 0.8), (0.3, 0.7))
    assert_within_one_ulp(tmp_path / "merged.stages" / "mc", mc)
    assert_within_one_ulp(out, final)


def test_a_changed_input_model_is_merged_again(family, recipe, tmp_path, run_main):
    """The document is the same; a model it names was rewritten (other values): its fingerprint changed."""
    import shutil
    from conftest import write_model
    math = tmp_path / "math-copy"
    shutil.copytree(family["paths"]["math"], math)
    path = recipe(TWO_STAGES.replace("{math}", str(math)))
    out = tmp_path / "merged"
    assert run_main("--config", path, "--out", out, "-q")[0] == 0
    t = family["tensors"]
    write_model(math, {n: v * 2 for n, v in t["math"].items()})
    code, _, stderr = run_main("--config", path, "--out", out)
    assert code == 0, stderr
    assert "stage mc (1/2): merging into" in stderr and "(its inputs changed)" in stderr
    mc = {n: (0.5 * (2 * t["math"][n]).bfloat16().float() + 0.5 * t["code"][n]).bfloat16().float() for n in t["base"]}
    assert_within_one_ulp(tmp_path / "merged.stages" / "mc", mc)
