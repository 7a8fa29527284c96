"""The data statistics are collected on: examples from a mini-zoo domain, a local JSON/JSONL file or
a hub dataset; rendered with a prompt template; tokenized with labels on the response only; cut into
right-padded batches; described by a JSON-able record (with a hash of the rendered text) for model
cards and cache keys.

Files and hub datasets are read in MergeBench's *_val schemas, auto-detected from the first row
(alpaca instruction [+ input] -> output, instruction -> response, query -> response,
prompt -> response, inputs -> targets, question -> answer), or by an explicit
"PROMPT_FIELD,RESPONSE_FIELD" mapping. Every bad input is one BadParameter line naming the file and
row. Knows nothing of models or statistics.
"""
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ..common.domains import ALL
from ..common.errors import BadParameter
from ..common.names import DOMAIN_ALIASES as ALIASES, HUB_ID

# (prompt field, response field), tried in order on the first row: the MergeBench *_val sets' schemas
SCHEMAS = (("instruction", "output"),    # instruction_val (alpaca keys)
           ("instruction", "response"),  # coding_val
           ("query", "response"),        # math_val
           ("prompt", "response"),       # safety_val
           ("inputs", "targets"),        # multilingual_val (Aya)
           ("question", "answer"))
TEMPLATES = ("zoo", "alpaca", "plain")
# MergeBench's taskloader indents its template and always says "paired with an input"; this is the
# standard alpaca wording without those artefacts.
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n")


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str


def load_examples(source: str, *, split: str = "validation", n: int = 1000, seed: int = 0,
                  data_format: str | None = None) -> list[Example]:
    """Up to n examples of SOURCE: a zoo domain name (or an engine alias such as "code"), a .json /
    .jsonl file, or a hub dataset "owner/name". Files and hub datasets give their first n rows after
    a shuffle seeded by SEED; SPLIT picks a JSON object's key or a hub split, and the only one there
    is when that split is absent (MergeBench's *_val sets have only "train")."""
    if n < 1:
        raise BadParameter(f"the number of examples must be at least 1, not {n}")
    fields = _mapping(data_format)
    domain = _zoo_domain(source)
    if domain:
        if fields:
            raise BadParameter(f"a data format applies to files and hub datasets, not zoo domain {source!r}")
        try:
            return [Example(ex["prompt"], ex["answer"]) for ex in ALL[domain].examples(split, n, seed)]
        except ValueError as e:  # an unknown split
            raise BadParameter(f"zoo domain {domain}: {e}") from e
    path = Path(source)
    if path.suffix.lower() in (".json", ".jsonl") or path.is_file():
        rows, where = _read_file(path, split)
    elif HUB_ID.match(source):
        rows, where = _read_hub(source, split)
    else:
        raise BadParameter(f"data {source!r} is not a zoo domain ({', '.join(ALL)}), a .json/.jsonl file "
                           f"or a hub dataset (owner/name)")
    if len(rows) == 0:
        raise BadParameter(f"{source}: no examples")
    fields = fields or _detect(rows[0], f"{source} {where(0)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [_example(rows[i], fields, f"{source} {where(i)}") for i in order[:n]]


def default_template(source: str) -> str:
    """The zoo's own format for zoo domains (their models were trained on it), else "alpaca"."""
    return "zoo" if _zoo_domain(source) else "alpaca"


def render(ex: Example, template: str) -> tuple[str, str]:
    """(prompt text, response text) of EX in TEMPLATE."""
    if template == "zoo":
        return ex.prompt, " " + ex.response  # as the zoo's training (eval/zoo.py sequence) joins them
    if template == "alpaca":
        return ALPACA.format(prompt=ex.prompt), ex.response
    if template == "plain":
        return ex.prompt, ex.response
    raise BadParameter(f"unknown template {template!r}: use one of {', '.join(TEMPLATES)}")


def tokenize(examples: list[Example], tokenizer, *, template: str,
             max_length: int = 2048) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per example: [bos] + prompt + response + [eos], labels -100 on bos and
    prompt, cut to the first MAX_LENGTH tokens. Prompt and response are tokenized apart so the
    boundary between them is exact (no token straddles it)."""
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    out = []
    for ex in examples:
        prompt, response = render(ex, template)
        p = bos + tokenizer.encode(prompt, add_special_tokens=False)
        r = tokenizer.encode(response, add_special_tokens=False) + eos
        out.append(((p + r)[:max_length], ([-100] * len(p) + r)[:max_length]))
    return out


def batches(seqs: list[tuple[list[int], list[int]]], batch_size: int,
            pad_id: int) -> Callable[[], Iterator[dict]]:
    """A zero-argument callable giving a fresh iterator of right-padded batches of SEQS, in order:
    input_ids (PAD_ID after each sequence), attention_mask, labels (-100 after each sequence)."""
    def run() -> Iterator[dict]:
        for start in range(0, len(seqs), batch_size):
            yield _padded(seqs[start:start + batch_size], pad_id)
    return run


def describe(source: str, examples: list[Example], *, split: str, n: int, seed: int, data_format: str | None,
             template: str, max_length: int) -> dict:
    """What the statistics were computed on: the arguments that loaded EXAMPLES from SOURCE, their
    number and the sha256 of their rendered (prompt, response) pairs, so a changed file changes
    the record."""
    rendered = [render(ex, template) for ex in examples]
    digest = hashlib.sha256(json.dumps(rendered, ensure_ascii=False).encode()).hexdigest()
    return {"source": source, "split": split, "n": n, "seed": seed, "data_format": data_format,
            "template": template, "max_length": max_length, "examples": len(rendered), "sha256": digest}


# --- helpers ---------------------------------------------------------------------------------


def _padded(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    T = max(len(x) for x, _ in seqs)
    ids = torch.full((len(seqs), T), pad_id)                        # [batch, T]
    labels = torch.full((len(seqs), T), -100)                       # [batch, T]
    mask = torch.zeros((len(seqs), T), dtype=torch.long)            # [batch, T]
    for r, (x, y) in enumerate(seqs):
        ids[r, :len(x)], labels[r, :len(y)], mask[r, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _zoo_domain(source: str) -> str | None:
    name = ALIASES.get(source.lower(), source.lower())
    return name if name in ALL else None


def _mapping(data_format: str | None) -> tuple[str, str] | None:
    if data_format is None:
        return None
    fields = tuple(f.strip() for f in data_format.split(","))
    if len(fields) != 2 or not all(fields):
        raise BadParameter(f"data format must be 'PROMPT_FIELD,RESPONSE_FIELD', not {data_format!r}")
    return fields


def _read_file(path: Path, split: str) -> tuple[Sequence, Callable[[int], str]]:
    """The rows of a .jsonl file (one object a line, blank lines skipped) or a .json file (a list, or
    an object whose list-valued keys are splits), and how to name row i in messages."""
    if not path.is_file():
        raise BadParameter(f"data file {path} not found")
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise BadParameter(f"data file {path}: expected a .json or .jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadParameter(f"data file {path} is not UTF-8 text: {e}") from e
    if path.suffix.lower() == ".jsonl":
        numbered = [(k, line) for k, line in enumerate(text.splitlines(), 1) if line.strip()]
        rows = [_json(line, f"{path} line {k}") for k, line in numbered]
        return rows, lambda i: f"line {numbered[i][0]}"
    rows = _json(text, str(path))
    if isinstance(rows, dict):
        rows = _choose({k: v for k, v in rows.items() if isinstance(v, list)}, split, str(path))
    if not isinstance(rows, list):
        raise BadParameter(f"{path}: expected a list of objects or {{split: [objects]}}, "
                           f"not a {type(rows).__name__}")
    return rows, lambda i: f"row {i + 1}"


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadParameter(f"{where}: invalid JSON ({e})") from e


def _read_hub(source: str, split: str) -> tuple[Sequence, Callable[[int], str]]:
    try:
        import datasets  # imported lazily: only hub datasets need it
    except ImportError as e:
        raise BadParameter(f"hub dataset {source!r} needs the datasets library: pip install datasets") from e
    repo, _, revision = source.partition("@")
    try:
        parts = datasets.load_dataset(repo, revision=revision or None)  # honours HF_HUB_OFFLINE and the cache
    except Exception as e:  # the hub raises many types (offline, not found, gated, network)
        hint = " (HF_HUB_OFFLINE is set: it must be in the local cache)" if _offline() else ""
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadParameter(f"cannot load hub dataset {source!r}{hint}: {msg}") from e
    return _choose(dict(parts), split, source), lambda i: f"row {i + 1}"


def _offline() -> bool:
    flag = os.environ.get("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE", ""))
    return flag.upper() in ("1", "ON", "YES", "TRUE")


def _choose(parts: dict, split: str, name: str):
    """The split asked for, else the only one there is."""
    if split in parts:
        return parts[split]
    if len(parts) == 1:
        return next(iter(parts.values()))
    raise BadParameter(f"{name} has no split {split!r}; it has: {', '.join(parts) or 'none'}")


def _object(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise BadParameter(f"{where}: expected a JSON object, not a {type(row).__name__}")
    return row


def _detect(row, where: str) -> tuple[str, str]:
    keys = list(_object(row, where))
    for fields in SCHEMAS:
        if all(f in keys for f in fields):
            return fields
    known = ", ".join(f"{p}/{r}" for p, r in SCHEMAS)
    raise BadParameter(f"{where}: unknown schema (keys: {', '.join(keys) or 'none'}); known: {known}; "
                       f"or give a data format 'PROMPT_FIELD,RESPONSE_FIELD'")


def _example(row, fields: tuple[str, str], where: str) -> Example:
    row = _object(row, where)
    for f in fields:
        if f not in row:
            raise BadParameter(f"{where}: missing field {f!r} (it has: {', '.join(row) or 'none'})")
        if not isinstance(row[f], str):
            raise BadParameter(f"{where}: field {f!r} is a {type(row[f]).__name__}, not text")
    prompt, inp = row[fields[0]], row.get("input")
    if fields[0] == "instruction" and isinstance(inp, str) and inp.strip():
        prompt += f"\n\n### Input:\n{inp}"  # alpaca's context, in its own section as MergeBench puts it
    return Example(prompt, row[fields[1]])


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts a text with its bos token (Llama, Gemma, the zoo's: yes)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer.encode("a", add_special_tokens=True)[:1] == [bos]
