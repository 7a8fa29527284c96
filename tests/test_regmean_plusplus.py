"""RegMean++ on the micro zoo against a brute-force reference written here: whole transformers models,
layers below l set to the reference's own merged layers and layer l to expert t's, hooks on layer l's
linears capturing X on task t's data, and the closed form solved in float64."""
import json
import re

import pytest
import torch

import mbmerge
from conftest import read_model


@pytest.fixture
def zoo(micro_zoo, monkeypatch):
    monkeypatch.setenv("MBMERGE_CACHE", str(micro_zoo.parents[1]))
    return micro_zoo


def _grams(model, batches, layer: int) -> dict[str, torch.Tensor]:
    """X^T X / tokens at each linear of decoder layer `layer`, over the real tokens of the batches."""
    sums, counts, hooks, now = {}, {}, [], {}
    for name, mod in model.model.layers[layer].named_modules():
        if isinstance(mod, torch.nn.Linear):
            key = f"model.layers.{layer}.{name}.weight"

            def hook(m, args, out, key=key):
                x = args[0].reshape(-1, args[0].shape[-1])[now["real"]].double()
                sums[key] = sums.get(key, 0) + x.T @ x
                counts[key] = counts.get(key, 0) + x.shape[0]
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for batch in batches():
            now["real"] = batch["attention_mask"].reshape(-1).bool()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    for h in hooks:
        h.remove()
    return {k: sums[k] / counts[k] for k in sums}


def _regmean(ws: list[torch.Tensor], grams: list[torch.Tensor], alpha: float) -> torch.Tensor:
    shrunk = [g * alpha + torch.diag(g.diagonal()) * (1 - alpha) for g in grams]
    rhs = sum(g @ w.double().T for g, w in zip(shrunk, ws))
    return torch.linalg.solve(sum(shrunk), rhs).T


def test_regmean_plusplus_equals_a_brute_force_layer_by_layer_merge(zoo, tmp_path):
    from transformers import AutoModelForCausalLM
    from mbmerge.stats.collect import _data
    experts, domains, alpha = [zoo / "math", zoo / "coding"], ["math", "coding"], 0.1
    out = mbmerge.merge("regmean_plusplus", experts=domains, out=tmp_path / "m", samples=4, progress=False)
    got = read_model(out)
    batches = [_data(e, d, 4, split="validation", data_format=None, seed=0, max_length=2048, batch_size=8)[0]
               for e, d in zip(experts, domains)]
    weights = [{n: t.float() for n, t in read_model(e).items()} for e in experts]
    merged = {}
    layers = AutoModelForCausalLM.from_pretrained(zoo / "base").config.num_hidden_layers
    for layer in range(layers):
        grams = []
        for t, expert in enumerate(weights):
            model = AutoModelForCausalLM.from_pretrained(zoo / "base", dtype=torch.float32).eval()
            state = {**merged, **{n: v for n, v in expert.items() if f".layers.{layer}." in n}}
            model.load_state_dict(state, strict=False)
            grams.append(_grams(model, batches[t], layer))
        for n in [n for n in weights[0] if f".layers.{layer}." in n]:
            ws = [w[n] for w in weights]
            merged[n] = (_regmean(ws, [g[n] for g in grams], alpha) if n in grams[0]
                         else torch.stack(ws).mean(0)).float()
    for n, want in merged.items():
        assert torch.allclose(got[n].float(), want, rtol=1e-5, atol=1e-6), (n, (got[n].float() - want).abs().max())
    base = read_model(zoo / "base")
    for n in ("model.embed_tokens.weight", "lm_head.weight"):             # kept at the base, as MergeBench does
        assert torch.equal(got[n], base[n])
    card = json.loads((out / "mbmerge.json").read_text())
    assert all(s["kind"] == "gram_plusplus" for s in card["statistics"])
    regmean = read_model(mbmerge.merge("regmean", experts=domains, out=tmp_path / "r", samples=4, reduction=alpha,
                                       progress=False))
    # RegMean's Grams come from each expert's own model, RegMean++'s from the merged model (the base's embeddings)
    assert any(not torch.equal(got[n], regmean[n]) for n in merged if re.search(r"proj", n))


def test_regmean_plusplus_needs_the_base(zoo, tmp_path):
    with pytest.raises(mbmerge.MbmergeError, match="pass --base"):
        mbmerge.merge("regmean_plusplus", experts=[str(zoo / "math"), str(zoo / "coding")], data=["math", "coding"],
                      out=tmp_path / "m", samples=4, progress=False)
    assert not (tmp_path / "m").exists()
