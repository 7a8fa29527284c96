"""`mbmerge tokensurgeon`: a Llama with a character-level tokenizer given a byte-level BPE donor's tokenizer
(trained here on a few sentences). Every output row is checked by token against plain references written
here: shared tokens keep the model's row, new ones get a plain OMP (float64 least squares on the greedy
picks), a plain subword mean, the mean row, zero; byte and prefix matches take the row of their twin. The
output loads in transformers, verifies, and merges with models that already had the donor's tokenizer.
Parity with mergekit-tokensurgeon itself is in test_tokensurgeon_parity.py."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import read_model

TEXT = ["the quick brown fox jumps over the lazy dog", "hello world, merging models is fun",
        "a tokenizer transplant gives a model another vocabulary", "zebras graze in the zoo"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
CHARS = ["<unk>", "<s>", "</s>", *map(chr, range(97, 122)), "<0x7A>"]   # a..y, and z as a byte token
ROWS = 32                                                               # 3 rows past the model's 29 tokens
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def llama(hidden: int, rows: int, tied: bool) -> dict:
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=rows,
                max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
                tie_word_embeddings=tied, torch_dtype="float32")


def weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random float32 weights of a 2-layer Llama (no lm_head where the config ties it)."""
    g = torch.Generator().manual_seed(seed)
    h, hd, rows = config["hidden_size"], config["hidden_size"] // 4, config["vocab_size"]
    t = {"model.embed_tokens.weight": torch.randn(rows, h, generator=g)}
    for i in range(2):
        for name, shape in [("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (2 * hd, h)),
                            ("self_attn.v_proj", (2 * hd, h)), ("self_attn.o_proj", (h, h)),
                            ("mlp.gate_proj", (64, h)), ("mlp.up_proj", (64, h)), ("mlp.down_proj", (h, 64))]:
            t[f"model.layers.{i}.{name}.weight"] = torch.randn(shape, generator=g) * 0.05
        t[f"model.layers.{i}.input_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
        t[f"model.layers.{i}.post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    t["model.norm.weight"] = torch.ones(h)
    if not config["tie_word_embeddings"]:
        t["lm_head.weight"] = torch.randn(rows, h, generator=g)
    return t


def write(folder, tensors: dict, config: dict):
    folder.mkdir(parents=True)
    save_file({n: v.contiguous() for n, v in tensors.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def char_tokenizer(folder):
    """The model's tokenizer: one token per character (WordLevel), bos <s>, eos </s>, unk <unk>."""
    (folder / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"String": ""}, "behavior": "Isolated", "invert": False},
        "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(CHARS)}, "unk_token": "<unk>"}}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))


def bpe_tokenizer(folder, extra: tuple[str, ...] = ()):
    """The donor's tokenizer: byte-level BPE of 300 tokens trained on TEXT, a chat template, and `extra` added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(TEXT * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=SPECIALS[0], eos_token=SPECIALS[2],
                                  pad_token=SPECIALS[0], additional_special_tokens=[SPECIALS[1]])
    tok.chat_template = TEMPLATE
    tok.add_tokens(list(extra))
    tok.save_pretrained(str(folder))
    return tok


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """model (untied, 32 rows), tied (the same, its head tied), donor (hidden 48, tied, 300 rows, bos 0, eos 2,
    pad 0), donor_untied (its own head), and a tokenizer-only donor."""
    root = tmp_path_factory.mktemp("surgery")
    m_cfg, d_cfg = llama(64, ROWS, False), {**llama(48, 300, True), "bos_token_id": 0, "eos_token_id": 2,
                                                "pad_token_id": 0}
    paths, tensors = {}, {}
    for name, cfg, seed in [("model", m_cfg, 1), ("tied", {**m_cfg, "tie_word_embeddings": True}, 1),
                            ("donor", d_cfg, 2), ("donor_untied", {**d_cfg, "tie_word_embeddings": False}, 2)]:
        tensors[name] = weights(cfg, seed)
        paths[name] = write(root / name, tensors[name], cfg)
        (char_tokenizer if name in ("model", "tied") else bpe_tokenizer)(paths[name])
    paths["tokenizer_only"] = root / "tokenizer_only"
    paths["tokenizer_only"].mkdir()
    tokens = bpe_tokenizer(paths["tokenizer_only"]).get_vocab()
    return {"paths": paths, "tensors": tensors, "donor_tokens": tokens, "root": root}


def transplant(pair, out, model="model", donor="donor", **options):
    from mbmerge.engine.transplant.options import Options
    from mbmerge.engine.transplant.surgery import tokensurgeon
    return tokensurgeon(str(pair["paths"][model]), str(pair["paths"][donor]), out, Options(progress=False, **options))


def by_token(folder) -> dict[str, int]:
    """The output's vocabulary from its own tokenizer.json: token -> id."""
    tj = json.loads((folder / "tokenizer.json").read_text())
    return {**tj["model"]["vocab"], **{t["content"]: t["id"] for t in tj["added_tokens"]}}


def model_row_of(token: str) -> int | None:
    """The model's row of a donor token by the rules written plainly: a special token by its role (bos, eos),
    a single character a..y as itself; anything else (word starts, z, longer tokens) the model lacks."""
    role = {SPECIALS[0]: "<s>", SPECIALS[2]: "</s>"}.get(token, token)
    return CHARS.index(role) if role in CHARS[1:-1] else None


def plain_omp(t: torch.Tensor, P: torch.Tensor, k: int) -> tuple[list[int], torch.Tensor]:
    """Greedy picks by largest |<r, P_j>|, weights by float64 least squares on the picks."""
    picked, r, w = [], t.double(), None
    for _ in range(k):
        c = (P.double() @ r).abs()
        c[picked] = -1
        picked.append(int(c.argmax()))
        w = torch.linalg.lstsq(P[picked].double().T, t.double().unsqueeze(1)).solution.squeeze(1)
        r = t.double() - w @ P[picked].double()
    return picked, w


def test_omp_rows_by_token_transformers_loads_it_and_it_verifies(pair, tmp_path):
    import transformers
    from mbmerge.engine.output.verify import verify
    out = transplant(pair, tmp_path / "out", k=8)
    got, vocab = read_model(out), by_token(out)
    assert vocab == pair["donor_tokens"] and len(vocab) == 300
    model, donor = pair["tensors"]["model"], pair["tensors"]["donor"]
    shared = sorted((vocab[t], model_row_of(t)) for t in vocab if model_row_of(t) is not None)
    assert len(shared) == 27                                     # a..y, bos and eos
    for name, source in [("model.embed_tokens.weight", "model.embed_tokens.weight"),
                         ("lm_head.weight", "model.embed_tokens.weight")]:       # the donor ties its head
        assert got[name].shape == (300, 64)
        P, M = donor[source][[d for d, _ in shared]], model[name][[m for _, m in shared]]
        for token, i in vocab.items():
            m = model_row_of(token)
            if m is not None:
                assert torch.equal(got[name][i], model[name][m]), (name, token)
                continue
            picked, w = plain_omp(donor[source][i], P, 8)
            assert torch.allclose(got[name][i], (w @ M[picked].double()).float(), atol=2e-4), (name, token)
    config = json.loads((out / "config.json").read_text())
    assert (config["vocab_size"], config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (300, 0, 2, 0)
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 0, "eos_token_id": 2}
    assert verify(out) == []
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>user")
    lm = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = tok("the zebra", return_tensors="pt").input_ids
    with torch.no_grad():
        assert lm(ids).logits.shape == (1, ids.shape[1], 300)
    assert torch.equal(lm.get_input_embeddings().weight.data, got["model.embed_tokens.weight"])


def test_the_command_line_from_a_temporary_folder_with_subword(pair, tmp_path, run_main, monkeypatch):
    """Relative paths from the current folder, no -q; subword: the mean (or weighted mean) of the model's rows of
    the pieces its own tokenizer cuts a new token into (a word start is a space: <unk> here)."""
    import transformers
    monkeypatch.chdir(pair["root"])
    code, stdout, err = run_main("tokensurgeon", "model", "donor", "--out", str(tmp_path / "sub"), "-a", "subword",
                                 "--subword-method", "weighted_mean")
    assert code == 0, err
    assert "27 shared" in stdout and "approximated (subword)" in stdout and "README.md" in stdout
    out = tmp_path / "sub"
    got, vocab, model = read_model(out), by_token(out), pair["tensors"]["model"]
    chars = transformers.AutoTokenizer.from_pretrained("model")
    for token, i in vocab.items():
        if model_row_of(token) is not None:
            continue
        text = " " + token[1:] if token.startswith("Ġ") else token
        pieces = chars(text, add_special_tokens=False).input_ids
        for name, head in [("model.embed_tokens.weight", False), ("lm_head.weight", True)]:
            n = len(pieces)
            w = torch.arange(n, 0, -1.0) if head else torch.arange(1, n + 1.0)    # towards the first / last piece
            want = (w / w.sum()) @ model[name][pieces]
            assert torch.allclose(got[name][i], want, atol=1e-6), (token, name)
    card = (out / "README.md").read_text()
    assert "**subword**" in card and "| approximated | 273 | 273 |" in card
    record = json.loads((out / "mbmerge.json").read_text())
    assert record["options"]["subword_method"] == "weighted_mean"
    assert record["vocabulary"]["tensors"]["lm_head.weight"] == {"exact": 27, "byte": 0, "prefix": 0,
                                                                "approximated": 273, "empty": 0}


def test_byte_and_prefix_matches_where_asked_and_a_tied_head_stays_tied(pair, tmp_path):
    """-bm lm_head -pm embed: the head's `z` is the model's <0x7A> row and the embedding's is approximated; the
    embedding's plain `the` is the model's row of `t` (its longest prefix the model has), the head's is
    approximated. A tied model gets one rebuilt embedding, its config still tied; -a mean is the mean row."""
    out = transplant(pair, tmp_path / "split", method="zero", byte_match="lm_head", prefix_match="embed")
    got, vocab, model = read_model(out), by_token(out), pair["tensors"]["model"]
    embed, head = got["model.embed_tokens.weight"], got["lm_head.weight"]
    z = vocab["z"]
    assert torch.equal(head[z], model["lm_head.weight"][CHARS.index("<0x7A>")]) and not embed[z].any()
    prefixed = [t for t in vocab if len(t) > 1 and t.isalpha() and t[0] < "z" and model_row_of(t) is None]
    assert prefixed, "the donor has plain multi-character tokens"
    for t in prefixed:
        assert torch.equal(embed[vocab[t]], model["model.embed_tokens.weight"][CHARS.index(t[0])]), t
        assert not head[vocab[t]].any(), t
    counts = json.loads((out / "mbmerge.json").read_text())["vocabulary"]["tensors"]
    assert counts["model.embed_tokens.weight"]["prefix"] == len(prefixed) + 0 * counts["lm_head.weight"]["byte"]
    assert counts["lm_head.weight"]["byte"] == 1 and counts["model.embed_tokens.weight"]["byte"] == 0

    tied = transplant(pair, tmp_path / "tied", model="tied", method="mean", byte_match="yes")
    got, table = read_model(tied), pair["tensors"]["tied"]["model.embed_tokens.weight"]
    assert set(got) == set(pair["tensors"]["tied"]) and json.loads((tied / "config.json").read_text())[
        "tie_word_embeddings"] is True
    assert torch.equal(got["model.embed_tokens.weight"][z], table[CHARS.index("<0x7A>")])
    assert torch.allclose(got["model.embed_tokens.weight"][vocab["Ġthe"]], table.double().mean(0).float())


def test_noise_scale_and_dtype_are_seeded_and_rows_do_not_depend_on_the_chunking(pair, tmp_path, monkeypatch):
    from mbmerge.engine.transplant import rows
    options = dict(method="randn", new_vocab_noise=0.5, new_vocab_scale=2.0, seed=3, dtype="bfloat16")
    a = read_model(transplant(pair, tmp_path / "a", **options))
    new = [i for t, i in by_token(tmp_path / "a").items() if model_row_of(t) is None]
    x = a["model.embed_tokens.weight"][new].float() / 2                   # N(0, 1) + N(0, 0.25): std sqrt(1.25)
    assert a["model.embed_tokens.weight"].dtype == torch.bfloat16 and 1.0 < float(x.std()) < 1.25
    assert a["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    monkeypatch.setattr(rows, "ROW_BYTES", 5 * 64 * 4)                  # 5 rows a chunk
    b = read_model(transplant(pair, tmp_path / "b", **options))
    assert all(torch.equal(a[n], b[n]) for n in a)
    c = read_model(transplant(pair, tmp_path / "c", **{**options, "seed": 4}))
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    whole = read_model(transplant(pair, tmp_path / "omp5", k=8, batch_size=3))
    monkeypatch.undo()
    chunked = read_model(transplant(pair, tmp_path / "omp", k=8))
    assert all(torch.allclose(whole[n], chunked[n], atol=1e-6) for n in VOCAB)


def test_a_tokenizer_alone_is_donor_enough_for_methods_that_read_no_donor_rows(pair, tmp_path):
    out = transplant(pair, tmp_path / "sub", donor="tokenizer_only", method="subword")
    assert by_token(out) == pair["donor_tokens"]
    assert json.loads((out / "mbmerge.json").read_text())["vocabulary"]["tensors"]["lm_head.weight"]["exact"] == 27


def listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("args, message", [
    (["model", "bare", "-k", "8"], "has no tokenizer"),
    (["model", "donor", "-a", "foo"], "approximation method 'foo' is not one of omp, common_interpolation"),
    (["model", "donor", "-a", "stb"], "stb is mergekit's but not implemented in mbmerge tokensurgeon (supported: omp"),
    (["model", "donor"], "-k 64 is more than the 27 tokens the vocabularies share"),
    (["model", "tokenizer_only", "-k", "8"], "has no weights (no *.safetensors): -a omp approximates"),
    (["model", "donor", "-k", "8", "--subword-method", "median"], "Invalid value for '--subword-method'"),
    (["model", "./missing", "-k", "8"], "donor ./missing: no such folder"),
])
def test_refusals_are_one_line_and_write_nothing(pair, tmp_path, run_main, monkeypatch, args, message):
    root = pair["root"]
    if not (root / "bare").exists():                   # a donor with weights and config, and no tokenizer
        write(root / "bare", pair["tensors"]["donor"], llama(48, 300, True))
    monkeypatch.chdir(root)
    before = listing(root)
    code, _, err = run_main("tokensurgeon", *args, "--out", str(tmp_path / "out"))
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert listing(root) == before and not (tmp_path / "out").exists()


def test_an_output_is_refused_inside_an_input_or_over_a_users_files_and_overwritten_when_ours(pair, tmp_path,
                                                                                             run_main):
    model, donor = pair["paths"]["model"], pair["paths"]["donor"]
    code, _, err = run_main("tokensurgeon", model, donor, "-k", "8", "--out", donor / "inside")
    assert code != 0 and "is inside donor" in err and not (donor / "inside").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    code, _, err = run_main("tokensurgeon", model, donor, "-k", "8", "--out", tmp_path / "taken", "--overwrite")
    assert code != 0 and "holds files mbmerge did not write" in err
    assert listing(tmp_path / "taken") == ["notes.txt"]
    out = transplant(pair, tmp_path / "ours", method="zero")
    code, _, err = run_main("tokensurgeon", model, donor, "-k", "8", "--out", out, "--overwrite", "-q")
    assert code == 0, err
    assert json.loads((out / "mbmerge.json").read_text())["approximation"] == "omp"


def test_then_it_merges_with_models_that_had_the_donors_tokenizer(pair, tmp_path, run_main):
    """task_arithmetic of the transplanted model (base) and two models of its architecture that already had the
    donor's tokenizer: x1 with 4 padding rows, x2 with one more added token. Their vocabulary tensors differ in
    rows, so the recipe names the transplant as tokenizer_source; every row is checked by token against the
    plain formula b + 0.6 (x1 - b) + 0.4 (x2 - b)."""
    base = transplant(pair, tmp_path / "transplanted", k=8)
    models = {"base": read_model(base)}
    for name, rows, extra, seed in [("x1", 304, (), 5), ("x2", 301, ("<tool>",), 6)]:
        config = llama(64, rows, False)
        models[name] = weights(config, seed)
        bpe_tokenizer(write(tmp_path / name, models[name], config), extra)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                      f"  - model: {tmp_path / 'x1'}\n    parameters: {{weight: 0.6}}\n"
                      f"  - model: {tmp_path / 'x2'}\n    parameters: {{weight: 0.4}}\n"
                      f"tokenizer_source: {base}\n")
    code, _, err = run_main("--config", recipe, "--out", tmp_path / "merged", "-q")
    assert code == 0, err
    got = read_model(tmp_path / "merged")
    assert by_token(tmp_path / "merged") == pair["donor_tokens"]
    for n, b in models["base"].items():
        cut = [x[n][:300] if n in VOCAB else x[n] for x in (models["x1"], models["x2"])]   # ids 0..299: the donor's
        want = b + 0.6 * (cut[0] - b) + 0.4 * (cut[1] - b)
        assert torch.allclose(got[n], want, atol=1e-6), n
