"""`mbmerge moe`: Mixtures of Experts from dense experts, against plain references written here (the routers'
maths, the experts' tensors moved, a MoE of copies of the base computing what the base computes) and, where
mergekit 0.1.5 is installed, against mergekit-moe itself (MBMERGE_MERGEKIT: its mergekit-yaml, whose folder
holds mergekit-moe)."""
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import read_model, write_model

MERGEKIT = os.environ.get("MBMERGE_MERGEKIT") or shutil.which("mergekit-yaml")
MERGEKIT_MOE = str(Path(MERGEKIT).with_name("mergekit-moe")) if MERGEKIT else None
needs_mergekit = pytest.mark.skipif(not (MERGEKIT_MOE and Path(MERGEKIT_MOE).exists()),
                                    reason="mergekit-moe not found (set MBMERGE_MERGEKIT)")
PROMPTS = {"math": (["abc", "abd ab"], ["zz"]), "code": (["xyz", "xx yy"], []), "ifeval": (["hello", "help"], [])}
BOS = 1


def recipe(family, path: Path, gate_mode="cheap_embed", experts=("math", "code", "ifeval"), **extra) -> Path:
    cfg = {"base_model": str(family["paths"]["base"]), "gate_mode": gate_mode, **extra,
           "experts": [{"source_model": str(family["paths"][e]), "positive_prompts": PROMPTS[e][0],
                        **({"negative_prompts": PROMPTS[e][1]} if PROMPTS[e][1] else {})} for e in experts]}
    path.write_text(yaml.safe_dump(cfg))
    return path


def padded(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """mergekit's prompt batch for the fixtures' character tokenizer: BOS + the characters' ids (a..z are
    3..28), padded on the left with BOS."""
    rows = [[BOS] + [0 if c == " " else ord(c) - 94 for c in p] for p in prompts]      # a space is <unk>, 0
    n = max(map(len, rows))
    ids = torch.tensor([[BOS] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def close_in_bf16(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal up to bfloat16's rounding (8 significant bits)."""
    return torch.allclose(out.float(), ref.float(), rtol=2 ** -7, atol=1e-6)


def test_cheap_embed_mixtral_moves_each_expert_mlp_and_routes_by_the_prompts_embeddings(family, tmp_path, run_main):
    code, out, err = run_main("moe", recipe(family, tmp_path / "moe.yml"), "--out", tmp_path / "m")
    assert code == 0, err
    assert "MoE written to" in out
    moe, t = read_model(tmp_path / "m"), family["tensors"]
    for e, name in enumerate(("math", "code", "ifeval")):
        for proj, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
            got = moe[f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight"]
            assert torch.equal(got.float(), t[name][f"model.layers.1.mlp.{proj}.weight"])
    for n, v in t["base"].items():                       # attention, norms, embeddings, head: the base's
        if ".mlp." not in n:
            assert torch.equal(moe[n].float(), v), n
    assert not any(".mlp." in n for n in moe)
    embed = t["base"]["model.embed_tokens.weight"]

    def v(prompts):
        ids, mask = padded(prompts)
        return unit((embed[ids] * mask[..., None]).sum(dim=(0, 1)))
    ref = torch.stack([unit(v(p) - v(n)) if n else v(p) for p, n in PROMPTS.values()])
    for layer in range(2):
        assert close_in_bf16(moe[f"model.layers.{layer}.block_sparse_moe.gate.weight"], ref)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 3
    assert config["num_experts_per_tok"] == 2 and config["dtype"] == "bfloat16"
    assert (tmp_path / "m" / "mbmerge_moe_config.yml").read_text() == (tmp_path / "moe.yml").read_text()
    assert run_main("verify", tmp_path / "m")[0] == 0


def test_hidden_routes_by_the_last_tokens_hidden_state_at_each_layers_input(family, tmp_path, run_main):
    from transformers import AutoModelForCausalLM
    assert run_main("moe", recipe(family, tmp_path / "moe.yml", "hidden"), "--out", tmp_path / "m", "-q")[0] == 0
    base = AutoModelForCausalLM.from_pretrained(family["paths"]["base"], dtype=torch.bfloat16)

    def v(prompts):          # the whole model at once (in bfloat16, as mergekit runs it): hidden_states[l] = layer l's input
        ids, mask = padded(prompts)
        with torch.no_grad():
            hs = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        return torch.stack([h[:, -1].float().mean(0) for h in hs[:2]])
    ref = torch.stack([unit(v(p) - v(n)) if n else unit(v(p)) for p, n in PROMPTS.values()], dim=1)
    moe = read_model(tmp_path / "m")
    for layer in range(2):
        assert close_in_bf16(moe[f"model.layers.{layer}.block_sparse_moe.gate.weight"], ref[layer])


def test_a_moe_of_copies_of_the_base_computes_what_the_base_computes(family, tmp_path, run_main):
    """Top-k weights sum to 1, so experts equal to the base give the base's logits: transformers reads every
    expert's projections where they belong (w1 = gate, w3 = up, w2 = down)."""
    from transformers import AutoModelForCausalLM
    cfg = {"base_model": str(family["paths"]["base"]), "gate_mode": "random", "dtype": "float32",
           "experts": [{"source_model": str(family["paths"]["base"])}] * 3}
    (tmp_path / "same.yml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_main("moe", tmp_path / "same.yml", "--out", tmp_path / "refused")
    assert code == 2 and "--i-understand-this-is-not-useful-without-training" in err
    assert not (tmp_path / "refused").exists()
    assert run_main("moe", tmp_path / "same.yml", "--out", tmp_path / "m", "-q",
                    "--i-understand-this-is-not-useful-without-training")[0] == 0
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    base = AutoModelForCausalLM.from_pretrained(family["paths"]["base"], dtype=torch.float32)
    assert type(moe).__name__ == "MixtralForCausalLM"
    ids = torch.tensor([[1, 5, 9, 3, 7, 22]])
    with torch.no_grad():
        assert torch.allclose(moe(ids).logits, base(ids).logits, atol=1e-5)


def test_random_gates_and_noise_are_seeded(family, tmp_path, run_main):
    yml = recipe(family, tmp_path / "r.yml", "uniform_random", experts=("math", "code"))
    cfg = yaml.safe_load(yml.read_text())
    cfg["experts"][0]["noise_scale"] = 0.01
    yml.write_text(yaml.safe_dump(cfg))
    for out, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert run_main("moe", yml, "--out", tmp_path / out, "--seed", seed, "-q")[0] == 0
    a, b, c = (read_model(tmp_path / o) for o in "abc")
    gate, w1 = "model.layers.0.block_sparse_moe.gate.weight", "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a[gate], c[gate]) and not torch.equal(a[w1], c[w1])
    assert a[gate].float().abs().max() <= 32 ** -0.5      # U(-1/sqrt(H), 1/sqrt(H)), H = 32
    noise = a[w1].float() - family["tensors"]["math"]["model.layers.0.mlp.gate_proj.weight"]
    assert 0.005 < noise.std() < 0.02                     # N(0, 0.01^2), then bf16 rounding
    assert torch.equal(a["model.layers.0.block_sparse_moe.experts.1.w1.weight"].float(),
                       family["tensors"]["code"]["model.layers.0.mlp.gate_proj.weight"])   # no noise asked
    record = json.loads((tmp_path / "a" / "mbmerge.json").read_text())
    assert record["seed"] == 3 and "--seed 3" in record["command"]
    words = shlex.split(record["command"])                # the card's line, run as given, into another folder
    assert words[:2] == ["mbmerge", "moe"] and words[words.index("--out") + 1] == str(tmp_path / "a")
    words[words.index("--out") + 1] = str(tmp_path / "again")
    assert run_main(*words[1:], "-q")[0] == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()


def test_qwen_moe_from_a_llama_base_gates_its_shared_expert_and_gets_zero_attention_biases(family, tmp_path, run_main):
    from transformers import AutoModelForCausalLM
    yml = recipe(family, tmp_path / "q.yml", architecture="qwen", experts=("math", "code"))
    cfg = yaml.safe_load(yml.read_text())
    cfg["shared_experts"] = [{"source_model": str(family["paths"]["ifeval"]), "positive_prompts": ["hello"],
                              "residual_scale": 0.5}]
    yml.write_text(yaml.safe_dump(cfg))
    assert run_main("moe", yml, "--out", tmp_path / "m", "-q")[0] == 0
    moe, t = read_model(tmp_path / "m"), family["tensors"]
    down = moe["model.layers.0.mlp.shared_expert.down_proj.weight"].float()
    assert torch.equal(down, (t["ifeval"]["model.layers.0.mlp.down_proj.weight"] * 0.5).bfloat16().float())
    assert torch.equal(moe["model.layers.1.mlp.experts.1.up_proj.weight"].float(),
                       t["code"]["model.layers.1.mlp.up_proj.weight"])
    assert moe["model.layers.0.self_attn.k_proj.bias"].shape == (16,)
    assert not moe["model.layers.0.self_attn.q_proj.bias"].any()
    embed = t["base"]["model.embed_tokens.weight"]
    ids, mask = padded(["hello"])
    ref = unit((embed[ids] * mask[..., None]).sum(dim=(0, 1)))
    assert close_in_bf16(moe["model.layers.1.mlp.shared_expert_gate.weight"][0], ref)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()


def test_an_interrupted_moe_resumes_to_the_same_bytes(family, tmp_path, monkeypatch):
    from mbmerge.engine.moe import assemble
    from mbmerge.engine.moe.recipe import read_recipe
    from mbmerge.library import moe
    yml = recipe(family, tmp_path / "moe.yml")
    quiet = assemble.MoeRun(run=assemble.RunOptions(progress=False))
    moe(read_recipe(yml), tmp_path / "clean", quiet)
    tensor_done, calls = assemble.Journal.tensor_done, []

    def interrupted(journal, *args):          # Ctrl-C as the 20th tensor is written
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        tensor_done(journal, *args)
    monkeypatch.setattr(assemble.Journal, "tensor_done", interrupted)
    with pytest.raises(KeyboardInterrupt):
        moe(read_recipe(yml), tmp_path / "m", quiet)
    monkeypatch.setattr(assemble.Journal, "tensor_done", tensor_done)
    assert not (tmp_path / "m").exists()
    moe(read_recipe(yml), tmp_path / "m", quiet)
    record = json.loads((tmp_path / "m" / "mbmerge.json").read_text())
    assert record["resumed_tensors"] == 19
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == (tmp_path / "clean" / "model.safetensors").read_bytes()


def _other_hidden(family, tmp_path) -> Path:
    t = {n: torch.zeros(v.shape[0], 8) if n.endswith("gate_proj.weight") else v
         for n, v in family["tensors"]["code"].items()}
    return write_model(tmp_path / "narrow", t, shards=1)


def _untokenized(family, tmp_path) -> Path:
    """The base's weights and config, no tokenizer files."""
    folder = write_model(tmp_path / "bare", family["tensors"]["base"], shards=1)
    for f in folder.glob("tokenizer*"):
        f.unlink()
    return folder


@pytest.mark.parametrize("change, message", [
    (lambda c, f, p: c.update(gate_mode="hiddn"), "gate_mode = 'hiddn': choose hidden"),
    (lambda c, f, p: c["experts"][1].pop("positive_prompts"), "experts[1] (")
    , (lambda c, f, p: c.update(architecture="qwen3"), "no MoE architecture fits these models: Qwen3 MoE takes qwen3"),
    (lambda c, f, p: c.update(gate_moed="hidden"), "gate_moed: not a mergekit-moe key"),
    (lambda c, f, p: c.update(experts_per_token=4), "experts_per_token = 4 but 3 expert(s)"),
    (lambda c, f, p: c["experts"][2].update(source_model=str(_other_hidden(f, p))),
     "model.layers.0.mlp.gate_proj.weight [64, 8] vs base [64, 32]"),
    (lambda c, f, p: c.update(base_model=str(_untokenized(f, p))), "has no tokenizer (no tokenizer.json"),
])
def test_bad_recipes_are_refused_in_one_line_and_write_nothing(family, tmp_path, run_main, change, message):
    yml = recipe(family, tmp_path / "moe.yml", "hidden")
    cfg = yaml.safe_load(yml.read_text())
    change(cfg, family, tmp_path)
    yml.write_text(yaml.safe_dump(cfg))
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run_main("moe", yml, "--out", tmp_path / "m")
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_domain_experts_route_by_their_validation_prompts(micro_zoo, tmp_path, run_main, monkeypatch):
    import mbmerge.library
    from mbmerge.common.domains import ALL
    monkeypatch.setattr(mbmerge.library, "default_family", lambda *a, **k: micro_zoo)
    code, out, err = run_main("moe", "--experts", "math,coding", "--prompts", "4", "--out", tmp_path / "m")
    assert code == 0, err
    written = yaml.safe_load((tmp_path / "m" / "mbmerge_moe_config.yml").read_text())
    assert written["base_model"] == str(micro_zoo / "base")
    assert [e["source_model"] for e in written["experts"]] == [str(micro_zoo / "math"), str(micro_zoo / "coding")]
    assert written["experts"][0]["positive_prompts"] == [x["prompt"] for x in ALL["math"].examples("validation", 4, 0)]
    readme = (tmp_path / "m" / "README.md").read_text()
    assert "mbmerge moe" in readme and "mbmerge_moe_config.yml" in readme


@needs_mergekit
@pytest.mark.parametrize("gate_mode, architecture", [("cheap_embed", None), ("hidden", None), ("cheap_embed", "qwen")])
def test_parity_with_mergekit_moe(family, tmp_path, run_main, gate_mode, architecture):
    """The experts, attention and embeddings byte for byte, the routers within bfloat16 rounding (mergekit runs
    the base in bfloat16, mbmerge in float32), the next-token logits close."""
    extra = {"architecture": architecture} if architecture else {}
    yml = recipe(family, tmp_path / "moe.yml", gate_mode, experts=("math", "code") if architecture else
                 ("math", "code", "ifeval"), **extra)
    if architecture:
        cfg = yaml.safe_load(yml.read_text())
        cfg["shared_experts"] = [{"source_model": cfg["base_model"], "positive_prompts": ["hello"]}]
        yml.write_text(yaml.safe_dump(cfg))
    like_mergekit(yml, tmp_path, run_main, hidden=gate_mode == "hidden")


def like_mergekit(yml: Path, tmp_path: Path, run_main, hidden: bool = False, loads: bool = True) -> None:
    """mbmerge moe and mergekit-moe on one recipe: the same config and tensors (as transformers loads them where it
    loads the architecture: mergekit writes the experts fused, mbmerge as save_pretrained does; else as stored),
    every tensor but the routers byte for byte, the routers within bfloat16 rounding (a few of its units where
    mergekit's bfloat16 forward makes them), the next-token logits close."""
    from transformers import AutoModelForCausalLM
    assert run_main("moe", yml, "--out", tmp_path / "ours", "-q")[0] == 0
    done = subprocess.run([MERGEKIT_MOE, str(yml), str(tmp_path / "theirs")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    models = [AutoModelForCausalLM.from_pretrained(tmp_path / m) for m in ("ours", "theirs")] if loads else None
    a, b = (m.state_dict() for m in models) if loads else (read_model(tmp_path / m) for m in ("ours", "theirs"))
    assert a.keys() == b.keys()
    for n in a:
        if n.endswith(("mlp.gate.weight", "moe.gate.weight", "shared_expert_gate.weight")):
            if hidden:          # mergekit's bfloat16 forward: a few units of its last place (2^-8 at 0.5)
                assert (a[n].float() - b[n].float()).abs().max() <= 4e-3, n
                assert torch.nn.functional.cosine_similarity(a[n].float(), b[n].float()).min() > 0.9999, n
            else:
                assert close_in_bf16(a[n], b[n]), n
        else:
            assert torch.equal(a[n], b[n]), n
    ours, theirs = (json.loads((tmp_path / m / "config.json").read_text()) for m in ("ours", "theirs"))
    for bookkeeping in ("_name_or_path", "transformers_version"):    # which writer wrote it, not the model
        ours.pop(bookkeeping, None), theirs.pop(bookkeeping, None)
    assert ours == theirs
    if loads:
        ids = torch.tensor([[1, 5, 9, 3, 7, 22]])
        with torch.no_grad():
            ours, theirs = (m(ids).logits.float() for m in models)
        assert torch.allclose(ours, theirs, atol=2e-2)


def dense_family(root: Path, model_type: str) -> dict[str, Path]:
    """A tiny dense family built from transformers' own class (Qwen2: q/k/v biases; Qwen3: q/k norms): a base,
    and experts math and code whose MLPs differ from the base's."""
    import transformers
    kind = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[model_type]
    cfg = dict(conftest_llama(), architectures=[f"{kind}ForCausalLM"], model_type=model_type, head_dim=8)
    torch.manual_seed(0)
    model = getattr(transformers, f"{kind}ForCausalLM")(getattr(transformers, f"{kind}Config")(**cfg))
    base = {n: v.detach().clone() + 0.02 * torch.randn(v.shape) for n, v in model.state_dict().items()}
    paths = {"base": write_model(root / "base", base, config=cfg)}
    for seed, name in enumerate(("math", "code"), start=1):
        g = torch.Generator().manual_seed(seed)
        expert = {n: v + (0.05 * torch.randn(v.shape, generator=g) if ".mlp." in n else 0) for n, v in base.items()}
        paths[name] = write_model(root / name, expert, config=cfg)
    return paths


def conftest_llama() -> dict:
    from conftest import LLAMA
    return dict(LLAMA)


@needs_mergekit
@pytest.mark.parametrize("model_type, architecture", [("qwen2", "qwen"), ("qwen3", "qwen3"), ("llama", "deepseek")])
def test_parity_with_mergekit_moe_from_other_bases(tmp_path, run_main, model_type, architecture):
    """Qwen MoE from a Qwen2 base with a gated shared expert (its q/k/v biases carried over), Qwen3 MoE from a
    Qwen3 base (q/k norms), DeepSeek MoE with an ungated shared expert (transformers loads it only with the
    hub's remote code, so its tensors and config are compared, not its logits)."""
    paths = dense_family(tmp_path / "family", model_type)
    cfg = {"base_model": str(paths["base"]), "gate_mode": "cheap_embed", "architecture": architecture,
           "experts": [{"source_model": str(paths[e]), "positive_prompts": PROMPTS[e][0]} for e in ("math", "code")]}
    if architecture != "qwen3":
        cfg["shared_experts"] = [{"source_model": str(paths["base"]),
                                  **({"positive_prompts": ["hello"]} if architecture == "qwen" else {})}]
    (tmp_path / "moe.yml").write_text(yaml.safe_dump(cfg))
    like_mergekit(tmp_path / "moe.yml", tmp_path, run_main, loads=architecture != "deepseek")
    if model_type == "qwen2":
        ours, base = read_model(tmp_path / "ours"), read_model(paths["base"])
        assert torch.equal(ours["model.layers.1.self_attn.k_proj.bias"], base["model.layers.1.self_attn.k_proj.bias"])


def test_an_adapter_expert_brings_its_folded_mlp(family, tmp_path, run_main):
    """An expert given as BASE+ADAPTER (or an adapter folder alone) is the adapter folded into its model, as PEFT
    folds it."""
    pytest.importorskip("peft")
    from test_lora import folded, make_adapter
    base = family["paths"]["base"]
    peft_model = make_adapter(base, tmp_path / "adapter", 0, r=4, lora_alpha=8, target_modules=["up_proj", "down_proj"])
    whole = folded(peft_model, base, tmp_path / "folded")
    outs = {}
    for label, source in (("adapter", f"{base}+{tmp_path / 'adapter'}"), ("alone", str(tmp_path / "adapter")),
                          ("folded", str(whole))):
        cfg = {"base_model": str(base), "gate_mode": "cheap_embed", "dtype": "float32",
               "experts": [{"source_model": source, "positive_prompts": ["abc"]},
                           {"source_model": str(family["paths"]["math"]), "positive_prompts": ["xyz"]}]}
        (tmp_path / f"{label}.yml").write_text(yaml.safe_dump(cfg))
        code, _, err = run_main("moe", tmp_path / f"{label}.yml", "--out", tmp_path / f"moe-{label}", "-q")
        assert code == 0, err
        outs[label] = read_model(tmp_path / f"moe-{label}")
    name = "model.layers.1.block_sparse_moe.experts.0.w2.weight"
    assert not torch.equal(outs["folded"][name], family["tensors"]["base"]["model.layers.1.mlp.down_proj.weight"])
    for label in ("adapter", "alone"):
        for n, v in outs["folded"].items():
            assert torch.allclose(outs[label][n], v, atol=1e-6), (label, n)


def test_an_expert_may_be_an_earlier_stage_of_the_recipe(family, tmp_path, run_main):
    """A recipe of several documents: named merges first (mergekit-multi's stages), the MoE last, naming them."""
    p = family["paths"]
    stage = {"name": "mathcode", "merge_method": "linear", "dtype": "bfloat16",
             "models": [{"model": str(p["math"]), "parameters": {"weight": 0.5}},
                        {"model": str(p["code"]), "parameters": {"weight": 0.5}}]}
    moe = {"base_model": str(p["base"]), "gate_mode": "cheap_embed",
           "experts": [{"source_model": "mathcode", "positive_prompts": ["abc"]},
                       {"source_model": str(p["ifeval"]), "positive_prompts": ["xyz"]}]}
    (tmp_path / "staged.yml").write_text(yaml.safe_dump_all([stage, moe]))
    code, out, err = run_main("moe", tmp_path / "staged.yml", "--out", tmp_path / "m")
    assert code == 0, err
    assert "stage mathcode (1/1): merging into" in err
    merged = read_model(tmp_path / "m.stages" / "mathcode")
    t = family["tensors"]
    want = ((t["math"]["model.layers.0.mlp.up_proj.weight"] + t["code"]["model.layers.0.mlp.up_proj.weight"]) / 2)
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"].float(), want.bfloat16().float())
    result = read_model(tmp_path / "m")
    assert torch.equal(result["model.layers.0.block_sparse_moe.experts.0.w3.weight"],
                       merged["model.layers.0.mlp.up_proj.weight"])
    assert (tmp_path / "m" / "mbmerge_moe_config.yml").read_text() == (tmp_path / "staged.yml").read_text()
