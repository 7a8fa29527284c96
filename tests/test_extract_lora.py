"""`mbmerge extract-lora`: from a base and a fine-tune made as base + a known low-rank delta, the adapter
recovers the delta, its card reports the truncation error a plain SVD predicts, peft loads it with the
fine-tune's logits, and mbmerge merges it back as an expert."""
import json

import pytest
import torch

import mbmerge
from conftest import base_tensors, read_model, write_model

RANK = 3


def low_rank_delta(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.02 * torch.randn(shape[0], RANK, generator=g) @ torch.randn(RANK, shape[1], generator=g)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """float32 models (no rounding hides an error): every 2-D layer weight moved by a rank-3 delta, the
    norms and the embeddings by dense noise."""
    root = tmp_path_factory.mktemp("extract")
    base = base_tensors()
    tuned, deltas = {}, {}
    for k, (n, t) in enumerate(base.items()):
        if ".layers." in n and t.dim() == 2:
            deltas[n] = low_rank_delta(t.shape, k)
            tuned[n] = t + deltas[n]
        else:
            tuned[n] = t + 0.01 * torch.randn(t.shape, generator=torch.Generator().manual_seed(100 + k))
    return {"base": write_model(root / "base", base, dtype=torch.float32),
            "tuned": write_model(root / "tuned", tuned, dtype=torch.float32), "deltas": deltas,
            "tensors": {"base": base, "tuned": tuned}}


def test_the_adapter_recovers_a_low_rank_delta_and_peft_loads_it(pair, tmp_path, run_main):
    peft = pytest.importorskip("peft")
    import transformers
    out = tmp_path / "adapter"
    code, stdout, err = run_main("extract-lora", "--base", str(pair["base"]), "--model", str(pair["tuned"]),
                                 "--out", str(out), "--rank", "8", "--sv-epsilon", "1e-5")
    assert code == 0, err
    assert "LoRA adapter written to" in stdout
    tensors = read_model(out)
    for n, d in pair["deltas"].items():
        module = "base_model.model." + n.removesuffix(".weight")
        a, b = tensors[module + ".lora_A.weight"], tensors[module + ".lora_B.weight"]
        assert a.shape[0] == RANK and torch.allclose(b @ a, d, atol=1e-6), n     # the singular values past 3 dropped
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):   # saved whole
        assert torch.equal(tensors["base_model.model." + n], pair["tensors"]["tuned"][n])
    card = json.loads((out / "mbmerge.json").read_text())
    assert max(card["relative_error"].values()) < 1e-5
    base = transformers.AutoModelForCausalLM.from_pretrained(str(pair["base"]), dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, str(out)).eval()
    tuned = transformers.AutoModelForCausalLM.from_pretrained(str(pair["tuned"]), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 3, 17, 2]])
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, tuned(ids).logits, atol=1e-4)


def test_a_lower_rank_reports_the_truncation_error_an_svd_predicts(pair, tmp_path):
    from mbmerge.engine.adapters.extract_lora import Options, extract_lora
    out = extract_lora(pair["base"], pair["tuned"], tmp_path / "r1", Options(max_rank=1, progress=False))
    card = json.loads((out / "mbmerge.json").read_text())
    for n, d in pair["deltas"].items():
        s = torch.linalg.svdvals(d.double())
        assert card["relative_error"][n] == pytest.approx(float(s[1:].norm() / s.norm()), rel=1e-3), n
        assert card["ranks"][n.removesuffix(".weight")] == 1
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 1 and "q_proj" in config["target_modules"]


def test_the_extracted_adapter_merges_back_as_an_expert(pair, tmp_path):
    """task_arithmetic with weight 1 of the adapter is the fine-tune itself (to float32 tolerance)."""
    from mbmerge.engine.adapters.extract_lora import Options, extract_lora
    adapter = extract_lora(pair["base"], pair["tuned"], tmp_path / "a", Options(max_rank=8, progress=False))
    out = mbmerge.merge("task_arithmetic", base=str(pair["base"]), experts=[str(adapter)], out=tmp_path / "m",
                        progress=False)
    got = read_model(out)
    for n, want in pair["tensors"]["tuned"].items():
        assert torch.allclose(got[n], want, atol=1e-6), n


def test_refusals_are_one_line_and_write_nothing(pair, tmp_path, run_main):
    other = write_model(tmp_path / "other", {n: torch.zeros(3) for n in ["model.norm.weight"]}, dtype=torch.float32)
    code, _, err = run_main("extract-lora", "--base", str(pair["base"]), "--model", str(other), "--out",
                            str(tmp_path / "x"))
    assert code != 0 and "model.norm.weight [3] vs base [32]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    code, _, err = run_main("extract-lora", "--base", str(pair["base"]), "--model", str(pair["tuned"]), "--out",
                            str(tmp_path / "taken"))
    assert code != 0 and "already exists" in err and (tmp_path / "taken" / "notes.txt").read_text() == "mine"
