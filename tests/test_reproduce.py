"""Issue 26: the card's "Reproduce with" line reproduces the merge. A recipe merge writes its recipe beside
the model (mbmerge_config.yml, as mergekit writes mergekit_config.yml) and its card shows it and says
`mbmerge --config <that file>`. Each test runs the card's line into another folder and compares bytes."""
import re
import shlex
import textwrap

import pytest
from test_stages import TWO_STAGES


def reproduce_line(folder) -> list[str]:
    """The command in the card's "Reproduce with" block, as arguments after `mbmerge`."""
    card = (folder / "README.md").read_text()
    command = re.search(r"Reproduce with:\n\n```\n(.+)\n```", card).group(1)
    args = shlex.split(command)
    assert args[0] == "mbmerge"
    return args[1:]


def rerun_elsewhere(run_main, folder, again):
    """Run the card's line with --out replaced by `again`; the two folders' weight files compared byte for byte."""
    args = reproduce_line(folder)
    args[args.index("--out") + 1] = str(again)
    code, _, err = run_main(*args)
    assert code == 0, err
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    assert weights and weights == sorted(p.name for p in again.glob("*.safetensors"))
    for name in weights + ["config.json"]:
        assert (folder / name).read_bytes() == (again / name).read_bytes(), name


def write(tmp_path, family, text: str):
    path = tmp_path / "recipe.yml"
    path.write_text(textwrap.dedent(text).format(**{k: str(v) for k, v in family["paths"].items()}))
    return path


def test_a_plain_merge_reproduces_from_its_card(family, tmp_path, run_main):
    p, out = family["paths"], tmp_path / "plain"
    code, _, err = run_main("--method", "ties", "--base", p["base"], "--experts", f"{p['math']},{p['code']}",
                            "--density", "0.4", "--weights", "0.7,0.3", "--keep-base", "lm_head", "--out", out)
    assert code == 0, err
    assert not (out / "mbmerge_config.yml").exists()
    rerun_elsewhere(run_main, out, tmp_path / "again")


def test_a_gradient_recipe_is_written_beside_the_model_and_shown_in_the_card(family, tmp_path, run_main):
    recipe = write(tmp_path, family, """
        merge_method: slerp
        base_model: {base}
        models:
          - model: {base}
          - model: {math}
        parameters:
          t: [0, 0.5, 1]
        dtype: bfloat16
        """)
    out = tmp_path / "slerp"
    code, _, err = run_main("--config", recipe, "--out", out)
    assert code == 0, err
    assert (out / "mbmerge_config.yml").read_text() == recipe.read_text()
    card = (out / "README.md").read_text()
    assert "t: [0, 0.5, 1]" in card and "`t`: 0.0" not in card and "--override" not in card
    assert reproduce_line(out) == ["--config", str(out / "mbmerge_config.yml"), "--out", str(out)]
    rerun_elsewhere(run_main, out, tmp_path / "again")


def test_a_slices_frankenmerge_reproduces_from_its_card(family, tmp_path, run_main):
    recipe = write(tmp_path, family, """
        merge_method: passthrough
        slices:
          - sources: [{{model: {math}, layer_range: [0, 2]}}]
          - sources: [{{model: {code}, layer_range: [1, 2]}}]
        dtype: bfloat16
        """)
    out = tmp_path / "franken"
    code, _, err = run_main("--config", recipe, "--out", out)
    assert code == 0, err
    rerun_elsewhere(run_main, out, tmp_path / "again")


@pytest.mark.parametrize("where", ["final", "stage"])
def test_a_multi_stage_merge_reproduces_from_its_card(family, tmp_path, run_main, where):
    """The final merge's recipe is the whole file (its line reruns every stage); a stage's is its own
    document, with the stages it uses as their folders."""
    recipe = write(tmp_path, family, TWO_STAGES)
    out = tmp_path / "merged"
    code, _, err = run_main("--config", recipe, "--out", out)
    assert code == 0, err
    folder = out if where == "final" else tmp_path / "merged.stages" / "mc"
    if where == "final":
        assert (folder / "mbmerge_config.yml").read_text() == recipe.read_text()
    else:
        assert "name:" not in (folder / "mbmerge_config.yml").read_text()
    rerun_elsewhere(run_main, folder, tmp_path / "again")
