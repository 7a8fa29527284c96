"""Per-tensor parameter overrides (`--override REGEX 'k=v ...'`, merge(overrides=...)): the tensors a
regex matches are merged with its values, the rest with the main ones; against the library."""
import pytest
import torch

import mbmerge
from mbmerge.methods import merge_tensors
from conftest import read_model

LAYER1 = r"[.]layers[.]1[.]"


def test_overridden_tensors_are_merged_with_their_values(family, tmp_path):
    p, t = family["paths"], family["tensors"]
    out = mbmerge.merge("ties", base=str(p["base"]), experts=[str(p["math"]), str(p["code"])], out=tmp_path / "o",
                        progress=False, density=0.3, overrides=[(LAYER1, {"weights": [1.0, 0.0], "density": 0.5}),
                                                                ("norm", {"scale": 0.0})])
    got = read_model(out)
    for name, b in t["base"].items():
        if "layers.1." in name:
            params = dict(weights=[1.0, 0.0], density=0.5)
        elif "norm" in name:
            params = dict(density=0.3, scale=0.0)
        else:
            params = dict(density=0.3)
        want = merge_tensors("ties", b.bfloat16(), [t[e][name].bfloat16() for e in ("math", "code")], key=name,
                             **params)
        assert torch.equal(got[name], want), name
    assert torch.equal(got["model.norm.weight"], t["base"]["model.norm.weight"].bfloat16())  # scale 0: the base


def test_overrides_are_recorded_and_checked(family, tmp_path, run_main):
    p = family["paths"]
    code, _, err = run_main("--method", "ties", "--base", p["base"], "--experts", f"{p['math']},{p['code']}",
                            "--override", LAYER1, "scale=0", "--out", tmp_path / "o", "-q")
    assert code == 0, err
    card = (tmp_path / "o" / "mbmerge.json").read_text()
    assert '"overrides"' in card and "--override" in card
    for args, words in [((LAYER1, "scale"), "name=value"), (("(", "scale=0"), "regular expression"),
                        ((LAYER1, "densty=0.1"), "densty")]:
        code, _, err = run_main("--method", "ties", "--base", p["base"], "--experts", f"{p['math']},{p['code']}",
                                "--override", *args, "--out", tmp_path / "x")
        assert code == 2 and words in err and err.count("\n") == 1
    with pytest.raises(mbmerge.MbmergeError, match="sparsify-scope tensor"):
        mbmerge.merge("ties", base=str(p["base"]), experts=[str(p["math"])], out=tmp_path / "y", progress=False,
                      sparsify_scope="model", overrides=[(LAYER1, {"density": 0.5})])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
