"""Which of the model's rows each of the donor's tokens takes, by mergekit-tokensurgeon 0.1.5's rules.

Tokens are compared normalized: a leading word-start mark (Ġ for byte-level tokenizers and for kinds it does
not know, ▁ for sentencepiece ones) becomes a flag, so the model's `▁cat` is the donor's `Ġcat`; a special
token (the tokenizer's bos, eos, unk, pad, ... token) becomes its role, so the model's `<s>` is the donor's
`<|begin_of_text|>`. A donor token the model has takes the model's row (exact); where allowed, a byte token
takes its character's row and a character its byte token's (`<0x41>`, `A`: byte), and a token the row of
its longest prefix the model has (prefix); the others are approximated (approximate.py). Reads tokenizers,
never tensors; imports no torch.
"""
from dataclasses import dataclass

WORD_START, SPECIAL = "word_start", "special"
BYTE_LEVEL = ("GPT2Tokenizer", "GPT2TokenizerFast", "OpenAIGPTTokenizer", "OpenAIGPTTokenizerFast",
              "Qwen2Tokenizer", "Qwen2TokenizerFast")
SENTENCEPIECE = ("LlamaTokenizer", "LlamaTokenizerFast", "T5Tokenizer", "T5TokenizerFast", "GemmaTokenizer",
                 "GemmaTokenizerFast")


def word_start_mark(tokenizer) -> str:
    """'▁' for a sentencepiece tokenizer (unless its vocabulary is byte-level anyway, as DeepSeek's), else 'Ġ'."""
    import transformers
    kinds = {n: c for n in BYTE_LEVEL + SENTENCEPIECE if isinstance(c := getattr(transformers, n, None), type)}
    if isinstance(tokenizer, tuple(c for n, c in kinds.items() if n in BYTE_LEVEL)):
        return "Ġ"
    if isinstance(tokenizer, tuple(c for n, c in kinds.items() if n in SENTENCEPIECE)):
        return "Ġ" if "Ġhello" in tokenizer.get_vocab() else "▁"
    return "Ġ"


def normalized_vocabulary(tokenizer) -> dict:
    """{normalized token: id}: a plain token as itself, (WORD_START, rest) or (SPECIAL, role). Where two tokens
    normalize alike the higher id keeps the key (mergekit keeps whichever its dict saw last)."""
    mark, roles = word_start_mark(tokenizer), tokenizer.special_tokens_map
    out = {}
    for token, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        out[_normalized(token, mark, roles)] = i
    return out


def _normalized(token: str, mark: str, roles: dict):
    if token.startswith(mark):
        return WORD_START, token[len(mark):]
    for role, values in roles.items():
        if token in ([values] if isinstance(values, str) else values):
            return SPECIAL, role
    return token


def text_of(key) -> str:
    """The text a normalized token stands for, as the model's tokenizer reads it for subword: a word start as a
    space, a special token as its role's name (mergekit's reading)."""
    if isinstance(key, tuple):
        return " " + key[1] if key[0] == WORD_START else key[1]
    return key


@dataclass(frozen=True, kw_only=True)
class Alignment:
    """Where each output row of one vocabulary tensor comes from."""
    rows: int                        # the donor's largest token id + 1
    source: list[int]                # per output row, the model's row it copies, or -1
    new: list[int]                   # the rows approximated, ascending
    texts: list[str]                 # their tokens' text (text_of), for subword
    shared: list[tuple[int, int]]    # (donor row, model row) of every exact match, by donor row
    counts: dict[str, int]           # exact, byte, prefix, approximated; empty: rows of no token, left zero


def align(model_vocab: dict, donor_vocab: dict, model_rows: int, donor_rows: int | None, *, byte: bool,
          prefix: bool) -> Alignment:
    """The rows of a tensor with `model_rows` rows rebuilt for the donor's vocabulary (both normalized); a
    donor token whose id is past `donor_rows` (the donor tensor's rows; None: no limit) gets no row."""
    ours = {key: i for key, i in model_vocab.items() if i < model_rows}
    rows = max(len(donor_vocab), max(donor_vocab.values()) + 1)
    source, new, texts, shared = [-1] * rows, [], [], []
    counts = {"exact": 0, "byte": 0, "prefix": 0, "approximated": 0}
    for key, d in sorted(donor_vocab.items(), key=lambda kv: kv[1]):
        if donor_rows is not None and d >= donor_rows:
            continue
        if key in ours:
            source[d], how = ours[key], "exact"
            shared.append((d, ours[key]))
        elif byte and (m := _byte_twin(key, ours)) is not None:
            source[d], how = m, "byte"
        elif prefix and (m := _longest_prefix(key, ours)) is not None:
            source[d], how = m, "prefix"
        else:
            new.append(d)
            texts.append(text_of(key))
            how = "approximated"
        counts[how] += 1
    counts["empty"] = rows - sum(counts.values())
    return Alignment(rows=rows, source=source, new=new, texts=texts, shared=shared, counts=counts)


def _byte_twin(key, ours: dict) -> int | None:
    """The model's row of a character's byte token (`A` -> `<0x41>`), or of a byte token's character."""
    if not isinstance(key, str):
        return None
    if len(key) == 1 and ord(key) < 256:
        return ours.get(f"<0x{ord(key):02X}>")
    if len(key) == 6 and key.startswith("<0x") and key.endswith(">"):
        try:
            return ours.get(chr(int(key[3:-1], 16)))
        except ValueError:
            return None
    return None


def _longest_prefix(key, ours: dict) -> int | None:
    """The model's row of the longest proper prefix of a token it has (a special token has none; a prefix of
    only whitespace ends the search)."""
    mark, text = key if isinstance(key, tuple) else (None, key)
    if mark == SPECIAL:
        return None
    for i in range(len(text) - 1, 0, -1):
        if not text[:i].strip():
            return None
        found = ours.get((mark, text[:i]) if mark else text[:i])
        if found is not None:
            return found
    return None
