"""The mini zoo: a MergeBench in miniature, trained on CPU in minutes.

A tiny base (transformers' own LlamaForCausalLM or Gemma2ForCausalLM) is pre-trained on general
knowledge (the GENERAL facts, as questions and as statements) plus the prompts of every domain with
no answers (the alphabet and the formats) and some solved train examples of each domain (it
half-knows the tasks, as a real base does). From it, one full fine-tune per
domain on that domain's train split (loss on the answer only), and a multi-task model on the mixture
with the experts' total budget. Each is saved as an ordinary HF folder (safetensors, config,
character-level tokenizer.json, generation config); `zoo.json` records sizes, steps, seeds, timings
and the greedy scores of every model on every domain.

Training is deterministic: seeded data and init, fixed thread count, eager attention, so a rebuild
on the same machine writes the same bytes (zoo.json's "timings" aside). Sequences are
`<s>` + prompt + " " + answer + `</s>`; a completion is what the model generates after the prompt.

Full sizes (v2): the base reads many solved examples of the hard domains (instruction, math,
coding), some of multilingual and few of safety (`answered_by_domain`), so, as a real base does, it
already half-knows every task (base/expert about 0.5) and the fine-tunes sharpen it: every expert
beats the base by +0.3..+0.55 and merging all five keeps ~65% normalised performance (task
arithmetic scale 0.4; TIES density 0.2, scale 1.0, mergebench protocol), against ~43% for v1.
Micro sizes (v2; 25k parameters, ~10 s): a base pre-trained 5x longer than v1's and fine-tunes of 80
steps at 5x v1's learning rate, so each expert beats the base (which scores 0) on its own domain, in
zoo.json's scores on 96 test examples: 0.04-0.09 on instruction, math, multilingual and coding (the
common short answers) and 0.55 on safety. v1's experts scored 0 everywhere, so normalised
performance had no value. Merges of five keep little (they answer most prompts with a digit or a
made-up word: the experts' short answers), but their scores, and so their NP, differ by method.
This module knows nothing of merging; `bin/zoo.py` is its command line.
"""
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..common.cache import cache_dir
from ..common.domains import ALL, DOMAINS, FACTS, Domain, fact_statement
from ..common.quiet import quiet_transformers

VERSION = "v2"  # of the full zoo; a size whose data or settings have not changed keeps its own
VERSIONS = {"micro": "v2", "full": VERSION}
ZOO_FAMILIES = ("llama", "gemma2")
MODELS = ("base", *DOMAINS, "multitask")

# --- tokenizer: one token per character -----------------------------------------------------
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS, UNK = range(4)
VOCAB = {**{t: i for i, t in enumerate(SPECIALS)}, "\n": 4, **{chr(c): c - 27 for c in range(32, 127)}}
V = 100  # 4 specials + newline + 95 printable characters


def encode(text: str) -> list[int]:
    return [VOCAB.get(ch, UNK) for ch in text]


def tokenizer_files() -> dict:
    """tokenizer.json (WordLevel over single characters, Fuse decoder, <s> prepended) and its config."""
    added = [dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
             for i, t in enumerate(SPECIALS)]
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
           "pre_tokenizer": {"type": "Split", "pattern": {"String": ""}, "behavior": "Isolated", "invert": False},
           "post_processor": {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                       {"Sequence": {"id": "A", "type_id": 0}},
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS], "tokens": ["<s>"]}}},
           "decoder": {"type": "Fuse"},
           "model": {"type": "WordLevel", "vocab": VOCAB, "unk_token": "<unk>"}}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "pad_token": "<pad>", "padding_side": "left", "model_max_length": 256,
           "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": tok, "tokenizer_config.json": cfg,
            "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                        "pad_token": "<pad>"}}


# --- sizes and models -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Size:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    pretrain_steps: int
    pretrain_lr: float
    finetune_steps: int
    finetune_lr: float
    batch: int
    multitask_steps: int
    answered: int  # solved examples per domain in pre-training
    eval_n: int  # test examples per domain for zoo.json's scores
    answered_by_domain: tuple = ()  # (domain, n) pairs overriding `answered` for those domains


SIZES = {
    "micro": Size(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, pretrain_steps=300, pretrain_lr=5e-3,
                  finetune_steps=80, finetune_lr=5e-3, batch=8, multitask_steps=150, answered=40, eval_n=96),
    "full": Size(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384, pretrain_steps=2500, pretrain_lr=2e-3,
                 finetune_steps=300, finetune_lr=3e-4, batch=32, multitask_steps=1500, answered=40, eval_n=100,
                 answered_by_domain=(("instruction", 600), ("math", 600), ("multilingual", 120), ("coding", 800),
                                     ("safety", 40))),
}


BUILD_TIME = {"micro": "~10 s", "full": "~12 min"}   # on 2 CPU cores, the Llama family


def model_config(family: str, s: Size):
    """A transformers config of FAMILY at size S (fp32, eager attention, vocabulary V)."""
    from transformers import Gemma2Config, LlamaConfig
    common = dict(vocab_size=V, hidden_size=s.hidden, intermediate_size=s.intermediate,
                  num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                  max_position_embeddings=256, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                  torch_dtype="float32")
    if family == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5)
    elif family == "gemma2":
        hd = s.hidden // s.heads
        cfg = Gemma2Config(**common, head_dim=hd, query_pre_attn_scalar=hd, sliding_window=128,
                           tie_word_embeddings=True)
    else:
        raise ValueError(f"family must be one of {ZOO_FAMILIES}, not {family!r}")
    cfg._attn_implementation = "eager"
    return cfg


# --- data ---------------------------------------------------------------------------------------


def sequence(ex: dict, *, answer_only: bool) -> tuple[list[int], list[int]]:
    """(input ids, labels) of <s> prompt ' ' answer </s>; labels -100 on the prompt when answer_only."""
    p, a = [BOS, *encode(ex["prompt"])], [*encode(" " + ex["answer"]), EOS]
    return p + a, ([-100] * len(p) if answer_only else [-100, *p[1:]]) + a


def pretrain_data(n_prompts: int, n_answered: int,
                  by_domain: dict | None = None) -> list[tuple[list[int], list[int]]]:
    """General facts (question and statement forms, every split: it is the knowledge whose loss is
    forgetting), domain prompts without answers (formats, not tasks), and a light exposure to
    N_ANSWERED solved train examples per domain, or BY_DOMAIN[domain] where given (the base knows of
    the tasks, as a real base does, so fine-tunes stay near it and merge)."""
    seqs = []
    for ex in FACTS * 3:
        seqs.append(sequence(ex, answer_only=False))
        ids = [BOS, *encode(fact_statement(ex)), EOS]
        seqs.append((ids, [-100, *ids[1:]]))
    for d in DOMAINS.values():
        for ex in d.examples("train", n_prompts, seed=1):
            ids = [BOS, *encode(ex["prompt"])]
            seqs.append((ids, [-100, *ids[1:]]))
        k = (by_domain or {}).get(d.name, n_answered)
        seqs += [sequence(ex, answer_only=False) for ex in d.examples("train", k, seed=2)]
    return seqs


def finetune_data(domains: list[str], n: int) -> list[tuple[list[int], list[int]]]:
    return [sequence(ex, answer_only=True) for d in domains for ex in DOMAINS[d].examples("train", n)]


def batch_of(seqs: list, idx: list[int]) -> dict:
    """Right-padded batch: input_ids, attention_mask, labels."""
    T = max(len(seqs[i][0]) for i in idx)
    ids = torch.full((len(idx), T), PAD)
    labels = torch.full((len(idx), T), -100)
    mask = torch.zeros((len(idx), T), dtype=torch.long)
    for r, i in enumerate(idx):
        x, y = seqs[i]
        ids[r, :len(x)], labels[r, :len(y)], mask[r, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def train(model, seqs: list, *, steps: int, lr: float, batch: int, seed: int, log=None, step=None) -> float:
    """AdamW, linear warm-up then cosine decay, gradient clip 1; batches drawn by a seeded sampler.
    Returns the mean loss of the last 10% of steps. log: a line every fifth of the steps; step:
    called after every step with its loss (a progress bar's tick)."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    model.train()
    tail = []
    for t in range(steps):
        loss = model(**batch_of(seqs, [rng.randrange(len(seqs)) for _ in range(batch)])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if t >= steps - max(1, steps // 10):
            tail.append(loss.item())
        if log and (t + 1) % max(1, steps // 5) == 0:
            log(f"    step {t + 1}/{steps} loss {loss.item():.3f}")
        step and step(loss.item())
    model.eval()
    return sum(tail) / len(tail)


# --- evaluation -------------------------------------------------------------------------------


def _domain(domain) -> Domain:
    return domain if isinstance(domain, Domain) else ALL[domain]


@torch.no_grad()
def greedy_completions(model, tok, prompts: list[str], max_new_tokens: int, batch: int = 64) -> list[str]:
    """Greedy generations after each prompt (left-padded batches), special tokens dropped."""
    out = []
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i:i + batch], return_tensors="pt", padding=True)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD,
                             eos_token_id=EOS, bos_token_id=BOS)
        out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def greedy_scores(model_dir, domain, n: int, split: str = "test", *, model=None, tok=None) -> float:
    """Mean checker score of greedy generations on n examples of DOMAIN's SPLIT (distinct prompts;
    fewer when the split holds fewer). Loads MODEL_DIR with AutoModelForCausalLM/AutoTokenizer
    unless a loaded model and tokenizer are given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = _domain(domain)
    tok = tok or AutoTokenizer.from_pretrained(model_dir)
    model = model or AutoModelForCausalLM.from_pretrained(model_dir).eval()
    exs = list({e["prompt"]: e for e in d.examples(split, n)}.values())
    outs = greedy_completions(model, tok, [e["prompt"] for e in exs], d.max_new_tokens)
    return sum(d.score(e, o) for e, o in zip(exs, outs)) / len(exs)


# --- building -----------------------------------------------------------------------------------


def zoo_folder(family: str = "llama", size: str = "full", cache: Path | None = None) -> Path:
    return Path(cache or cache_dir()) / "zoo" / f"{family}-{size}-{VERSIONS.get(size, VERSION)}"


def is_complete(folder: Path) -> bool:
    return (folder / "zoo.json").exists() and all((folder / m / "config.json").exists() for m in MODELS)


def build_zoo(family: str = "llama", size: str = "full", cache: Path | None = None, progress=True) -> Path:
    """The zoo's folder: base/, one folder per domain, multitask/ and zoo.json; trained on first use
    (into a temporary folder renamed when complete), found in the cache afterwards."""
    if family not in ZOO_FAMILIES:
        raise ValueError(f"family must be one of {ZOO_FAMILIES}, not {family!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, not {size!r}")
    root = zoo_folder(family, size, cache)
    if is_complete(root):
        return root
    if progress:    # said once, before minutes of training nobody asked for by name
        print(f"mbmerge: building the mini zoo (the built-in default family: a tiny base and one expert per "
              f"domain, trained once on CPU, {BUILD_TIME[size]}, cached in {root})", file=sys.stderr, flush=True)
    tmp = root.with_name(f".{root.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with quiet_transformers():
            _build(tmp, family, SIZES[size], size, progress)
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


@contextlib.contextmanager
def _bar(progress: bool, desc: str, total: int, unit: str = "step"):
    """A progress bar on stderr with its ETA, yielding its tick (tick(loss) after a training step,
    tick() after anything else); a tick that does nothing when progress is off."""
    if not progress:
        yield lambda loss=None: None
        return
    from tqdm import tqdm
    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True) as bar:
        def tick(loss=None):
            if loss is not None:
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update(1)
        yield tick


def _build(out: Path, family: str, s: Size, size_name: str, progress: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else None
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    timings, losses, seeds = {}, {}, {"base": 0}
    try:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        cfg = model_config(family, s)
        model = AutoModelForCausalLM.from_config(cfg)
        plan = [(d, [d], s.finetune_steps) for d in DOMAINS] + [("multitask", list(DOMAINS), s.multitask_steps)]
        n = len(plan) + 1
        log and log(f"zoo {family}-{size_name}: {n} models of {sum(p.numel() for p in model.parameters()):,} "
                    f"parameters")
        with _bar(progress, f"1/{n} base", s.pretrain_steps) as tick:
            losses["base"] = train(model, pretrain_data(400, s.answered, dict(s.answered_by_domain)),
                                   steps=s.pretrain_steps, lr=s.pretrain_lr, batch=s.batch, seed=0, step=tick)
        _save(model, out / "base")
        timings["base"] = time.perf_counter() - t0
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        for i, (name, domains, steps) in enumerate(plan, start=1):
            t = time.perf_counter()
            torch.manual_seed(1000 + i)
            model.load_state_dict(base_state)
            seeds[name] = 1000 + i
            with _bar(progress, f"{i + 1}/{n} {name}", steps) as tick:
                losses[name] = train(model, finetune_data(domains, 3000), steps=steps, lr=s.finetune_lr,
                                     batch=s.batch, seed=1000 + i, step=tick)
            _save(model, out / name)
            timings[name] = time.perf_counter() - t
        t = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(out / "base")
        scores = {}
        with _bar(progress, "scoring", len(MODELS), unit="model") as tick:
            for name in MODELS:
                m = AutoModelForCausalLM.from_pretrained(out / name).eval()
                doms = list(ALL) if name in ("base", "multitask") else [name, "general"]
                scores[name] = {d: round(greedy_scores(None, d, s.eval_n, model=m, tok=tok), 4) for d in doms}
                tick()
        for name in MODELS:
            log and log(f"zoo {family}-{size_name}: {name} scores {scores[name]}")
        timings["eval"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        margins = {d: round(scores[d][d] - scores["base"][d], 4) for d in DOMAINS}
        record = {"family": family, "size": size_name, "version": VERSIONS.get(size_name, VERSION),
                  "models": list(MODELS),
                  "domains": list(DOMAINS), "config": asdict(s),
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "seeds": seeds, "final_loss": {k: round(v, 4) for k, v in losses.items()},
                  "eval": {"split": "test", "n": s.eval_n, "decoding": "greedy"},
                  "scores": scores, "margins": margins,
                  "timings": {k: round(v, 1) for k, v in timings.items()},
                  "torch": torch.__version__}
        (out / "zoo.json").write_text(json.dumps(record, indent=2) + "\n")
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


def _save(model, folder: Path) -> None:
    """An ordinary HF folder: model.safetensors, config.json, generation_config.json, tokenizer files."""
    model.generation_config.do_sample = False
    model.save_pretrained(folder, safe_serialization=True)
    for name, obj in tokenizer_files().items():
        (folder / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def load_record(folder: Path) -> dict:
    return json.loads((Path(folder) / "zoo.json").read_text())


def margins_table(record: dict) -> str:
    """Markdown: per domain, the base's score, the expert's, the margin and the multi-task model's."""
    rows = ["| domain | base | expert | margin | multitask |", "|---|---|---|---|---|"]
    for d in record["domains"]:
        s = record["scores"]
        rows.append(f"| {d} | {s['base'][d]:.2f} | {s[d][d]:.2f} | {record['margins'][d]:+.2f} | "
                    f"{s['multitask'][d]:.2f} |")
    s = record["scores"]
    rows.append(f"| general | {s['base']['general']:.2f} | "
                f"{sum(s[d]['general'] for d in record['domains']) / len(record['domains']):.2f} (mean) | | "
                f"{s['multitask']['general']:.2f} |")
    return "\n".join(rows)
