"""The output vocabulary of a merge whose models' vocabularies may differ, as mergekit 0.1.5 builds it
for `tokenizer_source` and the `tokenizer:` block: the output tokenizer (base, union, or a model's), and
for each output token the embedding row every model gives it. A model that has the token (and is not
forced off it) gives its own row; otherwise the token's row is made once for all models:
  - a `tokens:` entry: zero, a model's row of this token, or a model's row of a named token or id;
  - else the row of the one merge input that has it, the base's if the base is a merge input and has it,
    the mean of the inputs that have it, or zero when none has it.
Rows past the vocabulary (pad_to_multiple_of) take each model's mean row. Reads tokenizers and
configs, never tensors (vocab_rows.py gathers the rows).
"""
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ...common.errors import BadModel, BadParameter

KEYS = {"source", "tokens", "pad_to_multiple_of"}
TOKEN_KEYS = {"source", "force"}


@dataclass(frozen=True, kw_only=True)
class TokenizerSpec:
    """What the recipe or the command line asks for: mergekit's `tokenizer:` block (`tokenizer_source: X`
    is {source: X})."""
    source: str = "union"                    # union | base | a model reference
    tokens: dict = field(default_factory=dict)   # token -> {"source": ..., "force": bool}, as in the recipe
    pad_to_multiple_of: int | None = None

    def as_dict(self) -> dict:
        return {"source": self.source, "tokens": self.tokens, "pad_to_multiple_of": self.pad_to_multiple_of}


def parse(value, key: str = "tokenizer") -> TokenizerSpec:
    """A `tokenizer:` block (a mapping), or a tokenizer source alone (a string), checked: BadParameter
    naming the key. Models named in it are checked against the merge's when the merge starts."""
    if isinstance(value, TokenizerSpec):
        return value
    if isinstance(value, str):
        value = {"source": value}
    if not isinstance(value, dict):
        raise BadParameter(f"{key} must be union, base, a model, or a mapping with {', '.join(sorted(KEYS))}")
    if unknown := set(value) - KEYS:
        raise BadParameter(f"{key}.{sorted(unknown)[0]} is not a key of mergekit's tokenizer block "
                           f"({', '.join(sorted(KEYS))})")
    source = value.get("source", "union")
    if not isinstance(source, str) or not source:
        raise BadParameter(f"{key}.source must be union, base or a model of the merge")
    pad = value.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise BadParameter(f"{key}.pad_to_multiple_of = {pad!r} must be a positive whole number")
    tokens = value.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise BadParameter(f"{key}.tokens must map tokens to {{source: ..., force: true|false}}")
    return TokenizerSpec(source=source, tokens={str(t): _token(f"{key}.tokens.{t}", c) for t, c in tokens.items()},
                         pad_to_multiple_of=pad)


def _token(key: str, setting) -> dict:
    """{source: a model | {kind: zero} | {kind: model_token, model, token_id | token}, force}, checked."""
    if not isinstance(setting, dict) or set(setting) - TOKEN_KEYS:
        raise BadParameter(f"{key} must be a mapping with source and force")
    force, source = setting.get("force", False), setting.get("source")
    if not isinstance(force, bool):
        raise BadParameter(f"{key}.force = {force!r} must be true or false")
    if isinstance(source, dict):
        kind = source.get("kind")
        if kind == "zero" and set(source) == {"kind"}:
            pass
        elif kind == "model_token" and set(source) in ({"kind", "model", "token"}, {"kind", "model", "token_id"}):
            if not isinstance(source["model"], str) or not isinstance(source.get("token", source.get("token_id")),
                                                                      str if "token" in source else int):
                raise BadParameter(f"{key}.source: model must be a model of the merge, token a string, "
                                   f"token_id a whole number")
        else:
            raise BadParameter(f"{key}.source must be a model, {{kind: zero}} or {{kind: model_token, model: M, "
                               f"token: T}} (or token_id: N)")
    elif source is not None and (not isinstance(source, str) or not source):
        raise BadParameter(f"{key}.source must be a model of the merge")
    return {"source": source, "force": force}


@dataclass(frozen=True, kw_only=True)
class Vocabulary:
    tokenizer: object            # a transformers tokenizer, saved into the output
    tokens: int                  # ids 0 .. tokens - 1
    rows: int                    # the output's embedding rows: tokens, padded up to pad_to_multiple_of
    own: dict                    # per model reference: each token's row of that model (a tensor), -1 where
                                 # it lacks the token (or is forced off it)
    made_ids: object             # the tokens whose row is made (a tensor, ascending), and for each, per
    made_from: object            # merge input (columns: `inputs`), its row averaged in or -1 ([n, inputs])
    inputs: list[str]            # the merge inputs' references
    notes: list[str]


def build(spec: TokenizerSpec, models: list[tuple[str, Path, int]], inputs: list[str],
          base: str | None) -> Vocabulary:
    """The vocabulary for `models` [(reference, folder, embedding rows)], the reference model first;
    `inputs` are the references of the merge inputs (whose rows make missing ones), `base` the base's
    reference or None."""
    import torch
    tokenizers = {ref: _load(folder, ref) for ref, folder, _ in models}
    vocabs = {ref: tok.get_vocab() for ref, tok in tokenizers.items()}
    limits = {ref: min(rows, _rows_of(folder, rows)) for ref, folder, rows in models}   # ids past them: no row
    out = _output_tokenizer(spec, [(ref, tokenizers[ref], limits[ref]) for ref, _, _ in models])
    for token in spec.tokens:
        if token not in out.get_vocab():
            out.add_tokens(token)          # a token the block names that no tokenizer has, as mergekit adds it
    vocab = out.get_vocab()
    n = max(vocab.values()) + 1
    rows = n if not spec.pad_to_multiple_of else -(-n // spec.pad_to_multiple_of) * spec.pad_to_multiple_of
    own = {}
    for ref, _, _ in models:
        theirs, limit = vocabs[ref], limits[ref]
        own[ref] = [-1] * n
        for token, i in vocab.items():
            j = theirs.get(token, -1)
            own[ref][i] = j if j < limit else -1
    made = _made_rows(spec, vocab, own, inputs, base, vocabs, limits)
    for token, setting in spec.tokens.items():
        if setting.get("force"):
            for rows_of in own.values():
                rows_of[vocab[token]] = -1
    ids = sorted(made)
    note = (f"output vocabulary ({spec.source}): {len(vocab)} tokens"
            + (f", {rows} embedding rows (padded to a multiple of {spec.pad_to_multiple_of})" if rows > n else "")
            + f"; {len(ids)} token rows made for the models that lack them")
    return Vocabulary(tokenizer=out, tokens=n, rows=rows, own={r: torch.tensor(o) for r, o in own.items()},
                      made_ids=torch.tensor(ids, dtype=torch.long),
                      made_from=torch.tensor([made[i] for i in ids], dtype=torch.long).view(len(ids), len(inputs)),
                      inputs=list(inputs), notes=[note])


def _made_rows(spec, vocab: dict, own: dict, inputs: list[str], base: str | None, vocabs: dict,
               limits: dict) -> dict[int, list[int]]:
    """{token id: per merge input, its row averaged in or -1} for every token some input lacks (or forced)."""
    made = {}
    for token, i in vocab.items():
        setting = spec.tokens.get(token)
        have = [own[ref][i] for ref in inputs]
        if not (setting and setting.get("force")) and all(r >= 0 for r in have):
            continue
        picked = [-1] * len(inputs)
        if setting is not None:
            source = setting.get("source")
            if source is None:
                raise BadParameter(f"tokenizer.tokens.{token} has no source, and a model of the merge lacks "
                                   f"the token (or it is forced)")
            kind = source.get("kind") if isinstance(source, dict) else "model"
            if kind == "model_token":
                ref = _input(source["model"], inputs, token)
                row = source.get("token_id")
                if row is None:
                    row = vocabs[ref].get(source["token"], -1)
                if not 0 <= row < limits[ref]:
                    what = source.get("token", row)
                    raise BadParameter(f"tokenizer.tokens.{token}: token {what!r} is not in {ref}'s vocabulary")
                picked[inputs.index(ref)] = row
            elif kind == "model":
                ref = _input(source, inputs, token)
                if have[inputs.index(ref)] < 0:
                    raise BadParameter(f"tokenizer.tokens.{token}: {ref} does not have the token {token!r}")
                picked[inputs.index(ref)] = have[inputs.index(ref)]
        elif len(present := [k for k, r in enumerate(have) if r >= 0]) == 1 or \
                (base in inputs and have[inputs.index(base)] >= 0):
            k = present[0] if len(present) == 1 else inputs.index(base)
            picked[k] = have[k]
        else:
            picked = have                   # the mean of the inputs that have it (none: zero)
        made[i] = picked
    return made


def _input(ref, inputs: list[str], token: str) -> str:
    if ref not in inputs:
        raise BadParameter(f"tokenizer.tokens.{token}: source {ref!r} is not a model of the merge "
                           f"({', '.join(inputs)})")
    return ref


def _output_tokenizer(spec: TokenizerSpec, models: list[tuple]):
    """base: the reference model's tokenizer; a model's: its own; union: the reference model's, with every
    other model's tokens it lacks added, plain ones first, then added (special) ones, in model order."""
    first = models[0][1]
    if spec.source == "base":
        return first
    if spec.source != "union":       # a model of the merge (loaded already), or another folder
        loaded = {ref: tok for ref, tok, _ in models}
        if spec.source in loaded:
            return loaded[spec.source]
        if not Path(spec.source).is_dir():
            raise BadParameter(f"tokenizer source {spec.source!r} is not union, base, nor a model of the merge")
        return _load(Path(spec.source), spec.source)
    out = _copy(first)
    vocab, plain, added = out.get_vocab(), {}, {}
    for _, tok, limit in models:       # the reference model first, then the others in the recipe's order
        decoder = {i: t for i, t in tok.added_tokens_decoder.items() if i < limit}
        names = {t.content for t in decoder.values()}
        for token, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < limit and token not in names:
                plain.setdefault(token, None)
        for i, t in sorted(decoder.items()):
            added.setdefault(t.content, t)
    for token in plain:
        if token not in vocab and token not in added:
            out.add_tokens(token)
    for t in added.values():
        out.add_tokens(t)                  # keeps each one's special flag; those already there keep their id
    return out


def _copy(tokenizer):
    """A tokenizer of its own (adding tokens to the reference model's must not change it)."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return _load(Path(d), "the reference model")


def _load(folder: Path, ref: str):
    """The folder's tokenizer, by the class its tokenizer_config names (AutoTokenizer's answer without its
    2 s of probing the model config), else by AutoTokenizer."""
    import transformers
    try:
        name = json.loads((Path(folder) / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        name = None
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerFast)):
        cls = transformers.AutoTokenizer
    try:
        return cls.from_pretrained(str(folder))
    except Exception as e:       # transformers raises many kinds for a folder without a usable tokenizer
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise BadModel(f"{ref} ({folder}): its tokenizer cannot be loaded ({why}); merging vocabularies "
                       f"needs every model's tokenizer") from None


def _rows_of(folder: Path, default: int) -> int:
    """The model's vocab_size from its config (ids past it have no row), else `default`."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        size = None
    return size if isinstance(size, int) and size > 0 else default

