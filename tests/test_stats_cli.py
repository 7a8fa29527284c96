"""`mbmerge stats` and `mbmerge --data` on the micro zoo: the whole path from a domain's examples to a
statistics folder to a merge, checked against a brute-force Fisher computed here, and the cache."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mbmerge
from mbmerge.common.domains import DOMAINS
from mbmerge.eval.zoo import sequence
from conftest import read_model


@pytest.fixture
def zoo(micro_zoo, monkeypatch):
    """The micro zoo as the built-in family (domain names resolve to it), in its own cache."""
    monkeypatch.setenv("MBMERGE_CACHE", str(micro_zoo.parents[1]))
    return micro_zoo


def _stats(folder):
    out = {}
    for f in sorted(folder.glob("stats-*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _brute_force_empirical_fisher(model_dir, examples):
    """mean over examples of (d/dtheta sum_t log p(y_t | prefix))^2, one example at a time."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for ex in examples:
        ids, labels = sequence(ex, answer_only=True)
        model.zero_grad()
        logp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        target = torch.tensor(labels[1:])
        keep = target != -100
        logp[keep].gather(1, target[keep, None]).sum().backward()
        for n, p in model.named_parameters():
            total[n] += p.grad.square()
    return {n: t / len(examples) for n, t in total.items()}


def test_stats_command_writes_the_empirical_fisher_of_the_expert_on_its_domain(micro_zoo, tmp_path, run_main):
    out = tmp_path / "fisher-math"
    code, _, err = run_main("stats", "--kind", "fisher", "--model", micro_zoo / "math", "--data", "math",
                            "--fisher", "empirical", "--samples", "6", "--out", out, "--quiet")
    assert code == 0, err
    card = json.loads((out / "mbmerge-stats.json").read_text())
    assert card["kind"] == "fisher" and card["data"]["examples"] == 6 and card["info"]["examples"] == 6
    assert card["peak_rss_bytes"] > 0 and card["model_bytes"] > 0
    want = _brute_force_empirical_fisher(micro_zoo / "math", DOMAINS["math"].examples("validation", 6))
    got = _stats(out)
    assert "model.embed_tokens.weight" not in got and "lm_head.weight" not in got   # kept at the base
    for name, f in got.items():
        torch.testing.assert_close(f, want[name], rtol=1e-4, atol=1e-12, msg=name)


def test_stats_command_grams_are_one_per_linear_weight_of_its_input_width(zoo, tmp_path, run_main):
    out = tmp_path / "gram"
    code, _, err = run_main("stats", "--kind", "gram", "--model", "math", "--samples", "8", "--out", out, "-q")
    assert code == 0, err
    got = _stats(out)
    weights = load_file(str(zoo / "math" / "model.safetensors"))
    linear = {n for n in weights if n.endswith("proj.weight")}
    assert set(got) == linear
    for n, g in got.items():
        assert g.shape == (weights[n].shape[1],) * 2 and torch.allclose(g, g.T, atol=1e-6)
        assert (torch.linalg.eigvalsh(g.double()) > -1e-6).all()                        # a Gram is PSD


def test_stats_command_refuses_an_existing_folder_in_one_line(zoo, tmp_path, run_main):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    code, _, err = run_main("stats", "--kind", "gram", "--model", "math", "--samples", "2",
                            "--out", tmp_path / "full", "-q")
    assert code == 2 and err.count("\n") == 1 and "exists" in err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["x"]


def test_merge_with_data_collects_once_and_equals_the_merge_with_those_stats(zoo, tmp_path, monkeypatch):
    """--data for domain experts defaults to each one's own domain; the statistics are cached, so a
    second merge runs no model; --stats with the cached folders writes the same bytes."""
    kw = dict(experts=["math", "coding"], progress=False, samples=4)
    first = mbmerge.merge("localize_stitch_trained", out=tmp_path / "a", **kw)
    card = json.loads((first / "mbmerge.json").read_text())
    folders = [s["path"] for s in card["statistics"]]
    assert [s["data"]["source"] for s in card["statistics"]] == ["math", "coding"]
    import mbmerge.stats.collect as collect
    monkeypatch.setattr(collect, "collect", lambda *a, **k: pytest.fail("statistics collected twice"))
    again = mbmerge.merge("localize_stitch_trained", out=tmp_path / "b", **kw)
    given = mbmerge.merge("localize_stitch_trained", out=tmp_path / "c", stats_folders=folders, **kw)
    assert read_model(first).keys() == read_model(again).keys()
    for k, v in read_model(first).items():
        assert torch.equal(v, read_model(again)[k]) and torch.equal(v, read_model(given)[k]), k


def test_merge_with_data_stitches_the_trained_masks(zoo, tmp_path):
    out = mbmerge.merge("localize_stitch_trained", experts=["math", "coding"], out=tmp_path / "m",
                        progress=False, samples=4, lr=1e6)
    card = json.loads((out / "mbmerge.json").read_text())
    masks = [_stats(Path(s["path"])) for s in card["statistics"]]
    b = load_file(str(zoo / "base" / "model.safetensors"))
    xs = [load_file(str(zoo / d / "model.safetensors")) for d in ("math", "coding")]
    got = read_model(out)
    for name, m0 in masks[0].items():
        d = [x[name].float() - b[name].float() for x in xs]
        m = [m0.float(), masks[1][name].float()]
        want = b[name].float() + (d[0] * m[0] + d[1] * m[1]) / (m[0] + m[1]).clamp(min=1)
        torch.testing.assert_close(got[name].float(), want, msg=name)
    assert torch.equal(got["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_stats_command_refuses_options_of_another_kind_and_a_mask_without_base(micro_zoo, tmp_path, run_main):
    code, _, err = run_main("stats", "--kind", "gram", "--model", micro_zoo / "math", "--data", "math",
                            "--lr", "1", "--out", tmp_path / "a", "-q")
    assert code == 2 and "--lr does not apply to --kind gram" in err and err.count("\n") == 1
    code, _, err = run_main("stats", "--kind", "mask", "--model", micro_zoo / "math", "--data", "math",
                            "--out", tmp_path / "b", "-q")
    assert code == 2 and "--base" in err and err.count("\n") == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_stats_command_names_a_corrupt_model_file_in_one_line(micro_zoo, tmp_path, run_main):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(micro_zoo / "math", bad)
    (bad / "model.safetensors").write_bytes(b"\xff" * 8 + b"{not json")
    code, _, err = run_main("stats", "--kind", "gram", "--model", bad, "--data", "math", "--out", tmp_path / "o", "-q")
    assert code == 2 and "model.safetensors" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()
