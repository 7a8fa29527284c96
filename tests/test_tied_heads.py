"""Tied against untied output heads: an expert that ties lm_head to its embedding merges that embedding
as its head (the same bytes as the expert written untied, with lm_head a copy of its embedding); where
the base ties them, the output ties them too and an untied expert's own head is left out; both noted
in the card; transformers loads the results; a missing head that is not tied is still refused."""
import json

import pytest
import torch

import mbmerge
from mbmerge.common.errors import MissingTensor
from conftest import LLAMA, base_tensors, expert_tensors, read_model, write_model

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    root, base = tmp_path_factory.mktemp("heads"), base_tensors()
    math, code = expert_tensors(base, 1), expert_tensors(base, 2)
    tied = dict(LLAMA, tie_word_embeddings=True)
    without = lambda t: {n: v for n, v in t.items() if n != HEAD}    # noqa: E731
    return {
        "base": write_model(root / "base", base),
        "math": write_model(root / "math", math),
        "code-tied": write_model(root / "code-tied", without(code), config=tied),
        "code-as-untied": write_model(root / "code-as-untied", {**code, HEAD: code[EMBED]}),   # the reference
        "code-unsaid": write_model(root / "code-unsaid", without(code), config=dict(LLAMA, tie_word_embeddings=False)),
        "base-tied": write_model(root / "base-tied", without(base), config=tied),
        "math-tied": write_model(root / "math-tied", without(math), config=tied),
    }


def merge(heads, out, base, experts, method="ties"):
    params = {"density": 0.5} if method == "ties" else {}
    return mbmerge.merge(method, base=str(heads[base]), experts=[str(heads[e]) for e in experts], out=out,
                         progress=False, **params)


def test_a_tied_expert_merges_its_embedding_as_its_head(heads, tmp_path):
    got = read_model(merge(heads, tmp_path / "tied", "base", ["math", "code-tied"]))
    want = read_model(merge(heads, tmp_path / "ref", "base", ["math", "code-as-untied"]))
    assert got.keys() == want.keys() and HEAD in got
    assert all(torch.equal(got[k], want[k]) for k in want)
    card = json.loads((tmp_path / "tied" / "mbmerge.json").read_text())
    assert len(card["tied_heads"]) == 1 and "merged as its head" in card["tied_heads"][0]
    assert "Tied and untied heads" in (tmp_path / "tied" / "README.md").read_text()


def test_a_tied_base_gives_a_tied_output_without_the_untied_experts_head(heads, tmp_path):
    from transformers import AutoModelForCausalLM
    out = merge(heads, tmp_path / "out", "base-tied", ["math", "math-tied"], method="task_arithmetic")
    got = read_model(out)
    assert HEAD not in got
    want = read_model(merge(heads, tmp_path / "ref", "base-tied", ["math-tied", "math-tied"], method="task_arithmetic"))
    plain = read_model(heads["math"])
    # the embedding merges both experts' embeddings (the same in math and math-tied): as the all-tied merge
    assert torch.equal(got[EMBED], want[EMBED]) and torch.equal(read_model(heads["math-tied"])[EMBED], plain[EMBED])
    card = json.loads((out / "mbmerge.json").read_text())
    assert len(card["tied_heads"]) == 1 and "left out" in card["tied_heads"][0]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert torch.equal(model.get_output_embeddings().weight, got[EMBED])


def test_a_missing_head_that_is_not_tied_is_still_refused(heads, tmp_path):
    with pytest.raises(MissingTensor, match="lacks 1 tensor"):
        merge(heads, tmp_path / "bad", "base", ["math", "code-unsaid"])
    assert not (tmp_path / "bad").exists()


def test_untouched_merges_say_nothing_of_heads(heads, tmp_path):
    out = merge(heads, tmp_path / "plain", "base", ["math"])
    assert json.loads((out / "mbmerge.json").read_text())["tied_heads"] == []
