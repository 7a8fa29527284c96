"""Models whose vocabularies differ (--tokenizer-source, a recipe's tokenizer_source / tokenizer block): the
output vocabulary, and embedding rows permuted into it, checked against a plain torch reference written
here from mergekit's rules; the one-line refusals. Parity with mergekit itself is in test_mergekit_parity."""
import json

import pytest
import torch

import mbmerge
from conftest import LLAMA, base_tensors, expert_tensors, read_model, write_model

VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
BASE_TOKENS = ["<unk>", "<s>", "</s>", *map(chr, range(97, 123))]     # conftest's tokenizer: ids 0..28


def add_tokens(folder, tokens: list[str], first: int = 29, special: bool = True):
    """Append added tokens to a model's tokenizer.json (as a chat fine-tune does)."""
    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["added_tokens"] = [{"id": first + k, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                           "normalized": False, "special": special} for k, t in enumerate(tokens)]
    (folder / "tokenizer.json").write_text(json.dumps(tj))


def with_rows(tensors: dict, rows: int, seed: int) -> dict:
    """The vocabulary tensors cut or extended (new rows random) to `rows`."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, t in tensors.items():
        if n in VOCAB:
            extra = torch.randn(max(0, rows - t.shape[0]), t.shape[1], generator=g) * 0.05
            t = torch.cat([t[:rows], extra])
        out[n] = t
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """base: 64 rows, 29 tokens (rows past them unused); x1 adds <a> <b> (31 rows); x2 adds <c> and ties its
    head to its embedding (30 rows, no lm_head)."""
    root = tmp_path_factory.mktemp("vocab")
    base = base_tensors()
    x1 = with_rows(expert_tensors(base, 1), 31, 7)
    x2 = with_rows(expert_tensors(base, 2), 30, 8)
    x2.pop("lm_head.weight")
    paths = {"base": write_model(root / "base", base),
             "x1": write_model(root / "x1", x1, config={**LLAMA, "vocab_size": 31}),
             "x2": write_model(root / "x2", x2, config={**LLAMA, "vocab_size": 30, "tie_word_embeddings": True})}
    add_tokens(paths["x1"], ["<a>", "<b>"])
    add_tokens(paths["x2"], ["<c>"])
    x2["lm_head.weight"] = x2["model.embed_tokens.weight"]
    tensors = {k: {n: v.bfloat16().float() for n, v in t.items()} for k, t in [("base", base), ("x1", x1), ("x2", x2)]}
    vocabs = {"base": BASE_TOKENS, "x1": BASE_TOKENS + ["<a>", "<b>"], "x2": BASE_TOKENS + ["<c>"]}
    return {"paths": paths, "tensors": tensors, "vocabs": vocabs}


def reference_rows(zoo, out_tokens: list[str], inputs: list[str], tokens: dict | None = None, rows: int | None = None):
    """Per model, its vocabulary tensors in the output's token order, by mergekit's rules written plainly:
    its own row where it has the token (unless forced), else one made row per token: the `tokens` entry's
    source; else the one input that has it; the base if it has it; the mean of those that have it; zero."""
    tokens = tokens or {}
    out = {}
    for name in VOCAB:
        def row(model, tok):
            return zoo["tensors"][model][name][zoo["vocabs"][model].index(tok)]

        def made(tok):
            setting = tokens.get(tok)
            if setting is not None:
                if setting == "zero":
                    return torch.zeros(32)
                model, src = setting[0], setting[1] if len(setting) > 1 else tok
                return row(model, src)
            have = [m for m in inputs if tok in zoo["vocabs"][m]]
            if len(have) == 1:
                return row(have[0], tok)
            if "base" in have:
                return row("base", tok)
            return torch.stack([row(m, tok) for m in have]).mean(0) if have else torch.zeros(32)

        for model in zoo["tensors"]:
            forced = {t for t, s in tokens.items() if s != "zero" and len(s) > 2}
            table = torch.stack([row(model, t) if t in zoo["vocabs"][model] and t not in forced
                                 else made(t).bfloat16().float() for t in out_tokens])
            if rows and rows > len(out_tokens):
                table = torch.cat([table, table.mean(0).bfloat16().float().expand(rows - len(out_tokens), -1)])
            out.setdefault(model, {})[name] = table
    return out


def task_arithmetic(zoo, permuted: dict, experts: list[str], weights: list[float]) -> dict:
    """base + sum_i w_i (x_i - base), every tensor (the vocabulary ones permuted), rounded to bf16."""
    out = {}
    for n, b in zoo["tensors"]["base"].items():
        b = permuted["base"][n] if n in VOCAB else b
        xs = [permuted[e][n] if n in VOCAB else zoo["tensors"][e][n] for e in experts]
        out[n] = (b + sum(w * (x - b) for w, x in zip(weights, xs))).bfloat16().float()
    return out


def assert_within_ulp(got: dict, want: dict):
    for n, w in want.items():
        g = got[n].float()
        assert g.shape == w.shape, n
        ulp = torch.finfo(torch.bfloat16).eps * w.abs().clamp(min=2 ** -126)
        assert ((g - w).abs() <= ulp).all(), (n, (g - w).abs().max().item())


def merge(zoo, out, experts=("x1", "x2"), **options):
    paths = zoo["paths"]
    return mbmerge.merge("task_arithmetic", base=str(paths["base"]), experts=[str(paths[e]) for e in experts],
                         out=out, weights=[0.6, 0.4][:len(experts)], progress=False, **options)


def output_vocab(folder) -> list[str]:
    tj = json.loads((folder / "tokenizer.json").read_text())
    vocab = {**tj["model"]["vocab"], **{t["content"]: t["id"] for t in tj["added_tokens"]}}
    return [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]


def test_union_adds_every_experts_tokens_and_permutes_their_rows(zoo, tmp_path):
    out = merge(zoo, tmp_path / "m", tokenizer="union")
    tokens = BASE_TOKENS + ["<a>", "<b>", "<c>"]
    assert output_vocab(out) == tokens
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 32 and config["tie_word_embeddings"] is False
    permuted = reference_rows(zoo, tokens, ["base", "x1", "x2"])
    assert_within_ulp(read_model(out), task_arithmetic(zoo, permuted, ["x1", "x2"], [0.6, 0.4]))
    card = json.loads((out / "mbmerge.json").read_text())
    assert card["tokenizer"]["source"] == "union" and "32 tokens" in card["vocabulary"][0]


def test_the_tokenizer_block_forces_zeroes_and_pads(zoo, tmp_path):
    paths = zoo["paths"]
    block = {"source": "union", "pad_to_multiple_of": 8, "tokens": {
        "<a>": {"source": str(paths["x1"]), "force": True},           # x1's row for every model
        "<c>": {"source": {"kind": "zero"}},                          # zero where a model lacks it
        "b": {"source": {"kind": "model_token", "model": str(paths["x2"]), "token": "<c>"}, "force": True},
        "<new>": {"source": {"kind": "model_token", "model": str(paths["base"]), "token_id": 3}}}}
    out = merge(zoo, tmp_path / "m", tokenizer=block)
    tokens = BASE_TOKENS + ["<a>", "<b>", "<c>", "<new>"]
    assert output_vocab(out) == tokens and json.loads((out / "config.json").read_text())["vocab_size"] == 40
    permuted = reference_rows(zoo, tokens, ["base", "x1", "x2"], rows=40, tokens={
        "<a>": ("x1", "<a>", "force"), "<c>": "zero", "b": ("x2", "<c>", "force"), "<new>": ("base", "a")})
    assert_within_ulp(read_model(out), task_arithmetic(zoo, permuted, ["x1", "x2"], [0.6, 0.4]))


@pytest.mark.parametrize("source, tokens", [("base", BASE_TOKENS), ("x1", BASE_TOKENS + ["<a>", "<b>"])])
def test_the_base_or_one_models_tokenizer(zoo, tmp_path, source, tokens):
    source = "base" if source == "base" else str(zoo["paths"][source])
    out = merge(zoo, tmp_path / "m", tokenizer=source)
    assert output_vocab(out) == tokens
    permuted = reference_rows(zoo, tokens, ["base", "x1", "x2"])
    assert_within_ulp(read_model(out), task_arithmetic(zoo, permuted, ["x1", "x2"], [0.6, 0.4]))


def test_rows_are_gathered_chunk_by_chunk(zoo, tmp_path):
    """A budget of a few rows per chunk (chunks cut through rows) gives the same bytes as one chunk."""
    small = merge(zoo, tmp_path / "small", tokenizer="union", memory_budget="60KB", kernels="torch")
    whole = merge(zoo, tmp_path / "whole", tokenizer="union", kernels="torch")
    a, b = read_model(small), read_model(whole)
    assert all(torch.equal(a[n], b[n]) for n in b)


def test_a_vocabulary_mismatch_names_both_sizes_and_the_option(zoo, tmp_path, run_main):
    paths = zoo["paths"]
    code, _, err = run_main("--method", "task_arithmetic", "--base", str(paths["base"]), "--experts",
                            f"{paths['x1']}", "--out", str(tmp_path / "m"))
    assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "[31, 32] vs BF16[64, 32]" in err and "--tokenizer-source" in err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("block, message", [
    ({"tokens": {"<a>": {"source": "elsewhere/model"}}}, "not a model of the merge"),
    ({"tokens": {"<a>": {"source": {"kind": "model_token", "model": "X", "token_id": "one"}}}}, "token_id"),
    ({"pad_to_multiple_of": 0}, "pad_to_multiple_of"),
    ({"source": "union", "colour": 1}, "tokenizer.colour"),
])
def test_bad_tokenizer_settings_are_one_line_and_write_nothing(zoo, tmp_path, block, message):
    with pytest.raises(mbmerge.MbmergeError, match=message) as e:
        merge(zoo, tmp_path / "m", tokenizer=block)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "m").exists()


def test_the_command_line_option_and_transformers_loads_the_output(zoo, tmp_path, run_main):
    import transformers
    paths = zoo["paths"]
    out = tmp_path / "m"
    code, stdout, err = run_main("--method", "task_arithmetic", "--base", str(paths["base"]), "--experts",
                                 f"{paths['x1']},{paths['x2']}", "--tokenizer-source", "union", "--out", str(out))
    assert code == 0, err
    assert "merged model written to" in stdout
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids(["<a>", "<c>"]) == [29, 31]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert model.get_input_embeddings().weight.shape == (32, 32)


# --- parity with mergekit 0.1.5 (skipped without it, see test_mergekit_parity) ---------------------------------


def mergekit_and_mbmerge(zoo, tmp_path, tokenizer_lines: list[str]):
    """Both tools' outputs of one task_arithmetic recipe over the zoo, the vocabulary tensors of each
    in mergekit's token order (new tokens' ids follow mergekit's set of models, in hash order)."""
    import subprocess
    from test_mergekit_parity import MERGEKIT
    from mbmerge.engine.recipe.document import load_recipe
    if not MERGEKIT:
        pytest.skip("mergekit-yaml not found (set MBMERGE_MERGEKIT)")
    p = zoo["paths"]
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("\n".join([
        "merge_method: task_arithmetic", f"base_model: {p['base']}", "models:",
        f"  - {{model: {p['x1']}, parameters: {{weight: 0.6}}}}", f"  - {{model: {p['x2']}, parameters: {{weight: 0.4}}}}",
        "dtype: float32", "out_dtype: bfloat16", *tokenizer_lines]) + "\n")
    done = subprocess.run([MERGEKIT, str(recipe), str(tmp_path / "mk")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    mb = mbmerge.merge(out=tmp_path / "mb", progress=False, **load_recipe(recipe)["merge"])
    mk_tokens, mb_tokens = output_vocab(tmp_path / "mk"), output_vocab(mb)
    assert sorted(mk_tokens) == sorted(mb_tokens)
    for folder in (mb, tmp_path / "mk"):
        assert json.loads((folder / "config.json").read_text())["vocab_size"] == read_model(folder)[VOCAB[0]].shape[0]
    got, want = read_model(mb), read_model(tmp_path / "mk")
    order = torch.tensor([mb_tokens.index(t) for t in mk_tokens])
    for n in VOCAB:
        got[n] = torch.cat([got[n][order], got[n][len(order):]])
    return got, want


@pytest.mark.parametrize("lines", [
    ["tokenizer_source: union"],
    ["tokenizer:", "  source: union", "  tokens:", "    <a>: {source: X1, force: true}", "    <c>: {source: {kind: zero}}",
     "    b: {source: {kind: model_token, model: X2, token: <c>}, force: true}",
     "    <new>: {source: {kind: model_token, model: BASE, token_id: 3}}"],
    ["tokenizer_source: base"],
])
def test_parity_with_mergekit(zoo, tmp_path, lines):
    from test_mergekit_parity import ulps
    p = zoo["paths"]
    lines = [x.replace("X1", str(p["x1"])).replace("X2", str(p["x2"])).replace("BASE", str(p["base"])) for x in lines]
    got, want = mergekit_and_mbmerge(zoo, tmp_path, lines)
    assert sorted(got) == sorted(want)
    assert all(int(ulps(got[n], want[n]).max()) == 0 for n in want)     # the same sums, in the same order


def test_padding_rows_are_within_one_ulp_of_mergekit(zoo, tmp_path):
    """Padding rows are each model's mean row: mergekit keeps it in float32 (the recipe's dtype), mbmerge in
    the model's stored bf16, so a merged padding row may differ by 1 ulp; every other row is equal."""
    from test_mergekit_parity import ulps
    got, want = mergekit_and_mbmerge(zoo, tmp_path, ["tokenizer: {source: union, pad_to_multiple_of: 8}"])
    for n in want:
        d = ulps(got[n], want[n])
        assert int(d.max()) <= 1 and (n in VOCAB or int(d.max()) == 0)
        assert n not in VOCAB or int(d[:32].max()) == 0
