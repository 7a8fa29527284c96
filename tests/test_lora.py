"""LoRA adapters as experts: a merge of PEFT adapter folders (given alone for the base, or as mergekit's
model+adapter) equals the same merge of the adapters folded into full models by PEFT's own
merge_and_unload; the settings mbmerge cannot fold are refused in one line."""
import json
import shutil

import pytest
import torch

import mbmerge
from conftest import base_tensors, read_model, write_model

peft = pytest.importorskip("peft")

ADAPTERS = {   # name: LoraConfig arguments: rank and alpha patterns, rsLoRA, an embedding LoRA, a head saved whole
    "a1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2},
               alpha_pattern={"v_proj": 16}),
    "a2": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["gate_proj", "up_proj", "embed_tokens"],
               modules_to_save=["lm_head"]),
}


def make_adapter(base, folder, seed: int, **config):
    """A PEFT adapter of the base with random A and B (PEFT starts B at zero), saved by PEFT."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(str(folder))
    return peft_model


def folded(peft_model, base, folder):
    """The adapter folded in by PEFT (float32, so no rounding hides a difference), as a model folder."""
    peft_model.merge_and_unload().save_pretrained(str(folder))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / f, folder / f)
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = write_model(root / "base", base_tensors())
    paths = {"base": base}
    for k, (name, config) in enumerate(ADAPTERS.items()):
        paths[name] = root / name
        paths[f"{name}-folded"] = folded(make_adapter(base, root / name, k, **config), base, root / f"{name}-folded")
    return paths


def assert_close(got: dict, want: dict):
    """Equal up to the order of float32 sums in B A (one bf16 ulp after the output's rounding)."""
    assert sorted(got) == sorted(want)
    for n, w in want.items():
        g, w = got[n].float(), w.float()
        assert torch.allclose(g, w, rtol=2 ** -7, atol=1e-6), (n, (g - w).abs().max().item())


@pytest.mark.parametrize("method, params", [("task_arithmetic", {"weights": [0.7, 0.5]}),
                                            ("ties", {"density": 0.5}), ("linear", {})])
def test_adapter_experts_merge_as_their_folded_models(zoo, tmp_path, method, params):
    base = str(zoo["base"])
    got = mbmerge.merge(method, base=base, experts=[str(zoo["a1"]), str(zoo["a2"])], out=tmp_path / "adapters",
                        progress=False, **params)
    want = mbmerge.merge(method, base=base, experts=[str(zoo["a1-folded"]), str(zoo["a2-folded"])],
                         out=tmp_path / "folded", progress=False, **params)
    assert_close(read_model(got), read_model(want))


def test_model_plus_adapter_in_a_recipe(zoo, tmp_path):
    from mbmerge.engine.recipe.document import load_recipe
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: slerp\nbase_model: {zoo['base']}\n"
                      f"models: [{{model: {zoo['base']}}}, {{model: \"{zoo['base']}+{zoo['a1']}\"}}]\n"
                      f"parameters: {{t: 0.4}}\n")
    got = mbmerge.merge(out=tmp_path / "recipe", progress=False, **load_recipe(recipe)["merge"])
    want = mbmerge.merge("slerp", base=str(zoo["base"]), experts=[str(zoo["a1-folded"])], t=0.4,
                         out=tmp_path / "folded", progress=False)
    assert_close(read_model(got), read_model(want))
    card = json.loads((got / "mbmerge.json").read_text())
    assert card["experts"][0]["ref"] == f"{zoo['base']}+{zoo['a1']}"


def test_the_command_line_takes_adapter_folders(zoo, tmp_path, run_main):
    out = tmp_path / "m"
    code, stdout, err = run_main("--method", "task_arithmetic", "--base", str(zoo["base"]), "--experts",
                                 f"{zoo['a1']},{zoo['a2']}", "--out", str(out))
    assert code == 0, err
    assert "merged model written to" in stdout and "same model" not in err
    import transformers
    assert transformers.AutoModelForCausalLM.from_pretrained(str(out)).config.vocab_size == 64


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(use_dora=True), "uses DoRA"),
    (lambda c: c.update(peft_type="IA3"), "is a IA3 adapter"),
    (lambda c: c.update(bias="all"), "trains biases"),
])
def test_adapters_mbmerge_cannot_fold_are_refused(zoo, tmp_path, run_main, change, message):
    bad = tmp_path / "bad"
    shutil.copytree(zoo["a1"], bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    change(config)
    (bad / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = run_main("--method", "task_arithmetic", "--base", str(zoo["base"]), "--experts", str(bad),
                            "--out", str(tmp_path / "m"))
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_an_adapter_alone_needs_the_base(zoo, tmp_path, run_main):
    code, _, err = run_main("--method", "linear", "--experts", f"{zoo['a1']},{zoo['a1-folded']}",
                            "--out", str(tmp_path / "m"))
    assert code != 0 and "is a LoRA adapter" in err and "MODEL+ADAPTER" in err
    assert not (tmp_path / "m").exists()


def test_chunks_cut_through_rows_give_the_same_merge(zoo, tmp_path):
    """B A is computed on each chunk's rows: a budget of a few rows per chunk (torch kernels: chunks of
    4096 elements at most) against whole tensors."""
    experts = [str(zoo["a1"]), str(zoo["a2"])]
    small = mbmerge.merge("task_arithmetic", base=str(zoo["base"]), experts=experts, out=tmp_path / "s",
                          memory_budget="60KB", kernels="torch", progress=False)
    whole = mbmerge.merge("task_arithmetic", base=str(zoo["base"]), experts=experts, out=tmp_path / "w",
                          progress=False)
    assert_close(read_model(small), read_model(whole))


def test_a_chat_adapter_that_adds_tokens_merges_with_the_union_of_tokenizers(zoo, tmp_path):
    """An adapter trained with two new special tokens (embeddings resized, saved whole, its own tokenizer)
    merges as the model PEFT folds, with --tokenizer-source union."""
    import transformers
    base = zoo["base"]
    tok = transformers.AutoTokenizer.from_pretrained(str(base))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.resize_token_embeddings(len(tok))            # 29 tokenizer ids -> 31 rows
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                                            modules_to_save=["embed_tokens", "lm_head"]))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(p + torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(str(tmp_path / "chat"))
    tok.save_pretrained(str(tmp_path / "chat"))
    peft_model.merge_and_unload().save_pretrained(str(tmp_path / "chat-folded"))
    tok.save_pretrained(str(tmp_path / "chat-folded"))
    options = dict(base=str(base), tokenizer="union", weights=[0.6, 0.4], progress=False)
    got = mbmerge.merge("task_arithmetic", experts=[str(tmp_path / "chat"), str(zoo["a1"])], out=tmp_path / "m1",
                        **options)
    want = mbmerge.merge("task_arithmetic", experts=[str(tmp_path / "chat-folded"), str(zoo["a1-folded"])],
                         out=tmp_path / "m2", **options)
    assert_close(read_model(got), read_model(want))
    assert read_model(got)["model.embed_tokens.weight"].shape == (31, 32)
    assert transformers.AutoTokenizer.from_pretrained(str(got)).convert_tokens_to_ids("<|im_end|>") == 30
