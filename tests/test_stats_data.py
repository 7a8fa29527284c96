"""stats/data.py: loading (zoo domains, JSON/JSONL files, hub datasets through a stand-in `datasets`),
schema detection, templates, tokenization, batches and the data record. Expected values are written
out by hand; nothing is downloaded."""
import json
import sys
import types

import pytest
import torch

from mbmerge.common.errors import BadParameter
from mbmerge.eval import zoo
from mbmerge.common.domains import ALL
from mbmerge.stats.data import Example, batches, default_template, describe, load_examples, render, tokenize


@pytest.fixture(scope="module")
def zoo_tok(tmp_path_factory):
    """The zoo's character tokenizer, loaded the way models load it."""
    from transformers import AutoTokenizer
    folder = tmp_path_factory.mktemp("zoo-tok")
    for name, obj in zoo.tokenizer_files().items():
        (folder / name).write_text(json.dumps(obj))
    return AutoTokenizer.from_pretrained(folder)


class Chars:
    """A tokenizer that adds no special tokens (like GPT-2's): one id per character, its code point."""
    bos_token_id, eos_token_id = 0, 1

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- schemas ------------------------------------------------------------------------------------

@pytest.mark.parametrize("row, expected", [
    ({"instruction": "Add.", "input": "2 and 3", "output": "5"}, Example("Add.\n\n### Input:\n2 and 3", "5")),
    ({"instruction": "Add.", "input": "", "output": "5"}, Example("Add.", "5")),
    ({"instruction": "Write f.", "response": "def f(): pass"}, Example("Write f.", "def f(): pass")),
    ({"query": "1+1?", "response": "2"}, Example("1+1?", "2")),
    ({"prompt": "hi", "response": "hello"}, Example("hi", "hello")),
    ({"inputs": "bonjour", "targets": "hello", "language": "fr"}, Example("bonjour", "hello")),
    ({"question": "capital?", "answer": "paris"}, Example("capital?", "paris")),
])
def test_schemas_are_detected(tmp_path, row, expected):
    assert load_examples(write_jsonl(tmp_path / "d.jsonl", [row])) == [expected]


def test_explicit_mapping_overrides_detection(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "solution": "s", "answer": "a"}])
    assert load_examples(src) == [Example("q", "a")]
    assert load_examples(src, data_format="question, solution") == [Example("q", "s")]


def test_json_forms_and_splits(tmp_path):
    rows = [{"query": "q", "response": "r"}]
    other = [{"query": "x", "response": "y"}]
    cases = [(rows, "validation"), ({"data": rows}, "validation"), ({"train": rows, "meta": {}}, "validation"),
             ({"train": other, "test": rows}, "test")]
    for i, (obj, split) in enumerate(cases):
        (tmp_path / f"{i}.json").write_text(json.dumps(obj))
        assert load_examples(str(tmp_path / f"{i}.json"), split=split) == [Example("q", "r")], obj


def test_seeded_shuffle_takes_n_rows(tmp_path):
    rows = [{"query": f"q{i}", "response": f"r{i}"} for i in range(6)]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    every = {Example(f"q{i}", f"r{i}") for i in range(6)}
    three = load_examples(src, n=3, seed=0)
    assert len(set(three)) == 3 and set(three) <= every
    assert load_examples(src, n=3, seed=0) == three                          # deterministic
    assert set(load_examples(src, n=100, seed=0)) == every                    # fewer rows than n: all
    orders = {tuple(load_examples(src, n=6, seed=s)) for s in range(5)}
    assert len(orders) > 1                                                     # the seed matters


# --- zoo domains --------------------------------------------------------------------------------

def test_zoo_domain_examples_and_aliases():
    want = [Example(e["prompt"], e["answer"]) for e in ALL["coding"].examples("validation", 5, seed=3)]
    assert load_examples("coding", n=5, seed=3) == want
    assert load_examples("code", n=5, seed=3) == want
    assert default_template("code") == "zoo" and default_template("data/x.jsonl") == "alpaca"


def test_zoo_tokenization_equals_zoo_sequence(zoo_tok):
    exs = load_examples("math", split="train", n=6)
    want = [zoo.sequence({"prompt": e.prompt, "answer": e.response}, answer_only=True) for e in exs]
    assert tokenize(exs, zoo_tok, template="zoo") == want


def test_zoo_tokenization_by_hand(zoo_tok):
    # zoo ids: <s>=1, </s>=2, a printable character c -> ord(c) - 27: 'a' 70, 'b' 71, ' ' 5, '=' 34, '7' 28
    [(ids, labels)] = tokenize([Example("ab =", "7")], zoo_tok, template="zoo")
    assert ids == [1, 70, 71, 5, 34, 5, 28, 2]
    assert labels == [-100, -100, -100, -100, -100, 5, 28, 2]
    [(ids, labels)] = tokenize([Example("ab =", "7")], zoo_tok, template="zoo", max_length=6)
    assert (ids, labels) == ([1, 70, 71, 5, 34, 5], [-100] * 5 + [5])


# --- templates and tokenization -----------------------------------------------------------------

def test_render():
    ex = Example("Add 2 and 3.", "5")
    assert render(ex, "alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n", "5")
    assert render(ex, "plain") == ("Add 2 and 3.", "5")
    assert render(ex, "zoo") == ("Add 2 and 3.", " 5")
    with pytest.raises(BadParameter, match="unknown template 'chat'"):
        render(ex, "chat")


def test_tokenize_without_bos():
    [(ids, labels)] = tokenize([Example("hi", "yo")], Chars(), template="plain")
    assert ids == [104, 105, 121, 111, 1]            # h i y o </s>: no bos, as this tokenizer adds none
    assert labels == [-100, -100, 121, 111, 1]


# --- batches ------------------------------------------------------------------------------------

def test_batches_right_padded_and_repeatable():
    seqs = [([5, 6, 7], [-100, 6, 7]), ([8], [8]), ([3, 4], [-100, 4])]
    make = batches(seqs, 2, pad_id=9)
    first, second = list(make()), list(make())
    assert len(first) == 2
    assert first[0]["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert first[0]["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert first[0]["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert first[1]["input_ids"].tolist() == [[3, 4]]
    assert first[1]["labels"].tolist() == [[-100, 4]]
    for a, b in zip(first, second):                  # each call starts a fresh pass, same batches
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "attention_mask", "labels"))


# --- the record ---------------------------------------------------------------------------------

def test_describe(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"query": "q", "response": "r"}])
    args = dict(split="validation", n=10, seed=0, data_format=None, template="alpaca", max_length=64)

    def describe_file(src, **args):   # the examples read afresh each time, as collect reads them
        return describe(src, load_examples(src, split=args["split"], n=args["n"], seed=args["seed"],
                                           data_format=args["data_format"]), **args)
    rec = describe_file(src, **args)
    assert json.loads(json.dumps(rec)) == rec
    assert {k: rec[k] for k in ("source", "examples", "template", "max_length")} == \
        {"source": src, "examples": 1, "template": "alpaca", "max_length": 64}
    assert len(rec["sha256"]) == 64 and describe_file(src, **args) == rec
    assert describe_file(src, **{**args, "template": "plain"})["sha256"] != rec["sha256"]
    write_jsonl(tmp_path / "d.jsonl", [{"query": "q", "response": "R"}])
    assert describe_file(src, **args)["sha256"] != rec["sha256"]


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, text, data_format, expected", [
    ("d.jsonl", '{"query": "q", "response": "r"}\n{"query": \n', None, r"d\.jsonl line 2: invalid JSON"),
    ("d.json", '[{"query": "q",\n "response": }]', None, r"d\.json: invalid JSON .*line 2"),
    ("d.jsonl", '{"text": "q"}\n', None, r"d\.jsonl line 1: unknown schema \(keys: text\)"),
    ("d.jsonl", '{"query": "q", "response": "r"}\n\n{"query": "q2"}\n', None,
     r"d\.jsonl line 3: missing field 'response'"),
    ("d.json", '[{"query": "q", "response": 7}]', None, r"d\.json row 1: field 'response' is a int, not text"),
    ("d.json", '[["q", "r"]]', None, r"d\.json row 1: expected a JSON object"),
    ("d.json", '{"train": [], "test": []}', None, r"d\.json has no split 'validation'; it has: train, test"),
    ("d.jsonl", "\n", None, r"d\.jsonl: no examples"),
    ("d.json", '{"data": []}', None, r"d\.json: no examples"),
    ("d.json", '"just text"', None, r"d\.json: expected a list of objects"),
    ("d.jsonl", '{"q": "x", "a": "y"}\n', "q", r"data format must be 'PROMPT_FIELD,RESPONSE_FIELD'"),
    ("d.jsonl", '{"q": "x"}\n', "q,a", r"d\.jsonl line 1: missing field 'a'"),
    ("d.txt", "hello", None, r"d\.txt: expected a \.json or \.jsonl file"),
])
def test_bad_files_name_file_and_row(tmp_path, name, text, data_format, expected):
    (tmp_path / name).write_text(text)
    with pytest.raises(BadParameter, match=expected) as e:
        load_examples(str(tmp_path / name), data_format=data_format)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("source, kwargs, expected", [
    ("missing/nothere.jsonl", {}, r"data file missing/nothere\.jsonl not found"),
    ("not a source", {}, r"is not a zoo domain .*, a \.json/\.jsonl file or a hub dataset"),
    ("math", {"split": "dev"}, r"zoo domain math: split must be one of"),
    ("math", {"data_format": "a,b"}, r"not zoo domain 'math'"),
    ("math", {"n": 0}, r"at least 1"),
])
def test_bad_sources(source, kwargs, expected):
    with pytest.raises(BadParameter, match=expected):
        load_examples(source, **kwargs)


# --- hub datasets (a stand-in `datasets` module: nothing is downloaded) -------------------------

def test_hub_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)              # `import datasets` fails
    with pytest.raises(BadParameter, match="pip install datasets"):
        load_examples("MergeBench/math_val")


def test_hub_offline_and_not_cached(monkeypatch):
    def load_dataset(repo, revision=None):                          # what datasets raises offline
        raise ConnectionError(f"Couldn't reach '{repo}' on the Hub (OfflineModeIsEnabled)")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BadParameter, match=r"'MergeBench/math_val' \(HF_HUB_OFFLINE is set.*OfflineModeIsEnabled"):
        load_examples("MergeBench/math_val")


def test_hub_rows_split_fallback_and_revision(monkeypatch):
    calls, good, bad = [], {"query": "1+1?", "response": "2"}, {"query": "2+2?"}

    def load_dataset(repo, revision=None):                          # MergeBench *_val: one "train" split
        calls.append((repo, revision))
        return {"train": [good, good] if revision is None else [good, bad]}
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_examples("MergeBench/math_val") == [Example("1+1?", "2")] * 2
    with pytest.raises(BadParameter, match=r"MergeBench/math_val@v1 row 2: missing field 'response'"):
        load_examples("MergeBench/math_val@v1")
    assert calls == [("MergeBench/math_val", None), ("MergeBench/math_val", "v1")]
