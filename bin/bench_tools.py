"""`mbmerge bench`'s cases for mergekit's other tools, each against its mergekit counterpart (found beside
mergekit-yaml) in the same run: MoE assembly (mbmerge moe, mergekit-moe) and tokenizer transplant
(mbmerge tokensurgeon, mergekit-tokensurgeon)."""
import json
import os
import shutil
import sysconfig
from pathlib import Path

import click

from ..eval.synthetic import llama_config, write_family
from .bench_timing import floor_row, mbmerge_head, time_tool

MOE_CASES = {"moe": "hidden", "moe_cheap_embed": "cheap_embed"}       # case: gate mode; every expert, top-2
TRANSPLANT_CASES = {"tokensurgeon_omp": "omp", "tokensurgeon_subword": "subword", "tokensurgeon_mean": "mean"}
TOOL_CASES = [*MOE_CASES, *TRANSPLANT_CASES]
DONOR_ADDS = 1000        # the donor's tokenizer: this many more merges of the same corpus, two more specials


def tool_case(case, fx, experts, mergekit, timing, device, tmp: Path) -> dict:
    if case in MOE_CASES:
        return moe_case(case, fx, experts, mergekit, timing, device, tmp)
    return transplant_case(case, fx, mergekit, timing, tmp)


def _sibling(mergekit: str | None, name: str) -> Path | None:
    """mergekit's other command `name`, beside its mergekit-yaml."""
    found = mergekit and Path(mergekit).with_name(name)
    return found if found and found.exists() else None


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def write_moe_recipe(case, fx, experts, folder: Path) -> Path:
    """Every expert, top-2, routed by two prompts of its own (characters of the fixtures' tokenizer)."""
    lines = [f"base_model: {fx / 'base'}", f"gate_mode: {MOE_CASES[case]}", "experts_per_token: 2", "experts:"]
    for k, e in enumerate(experts):
        lines += [f"  - source_model: {fx / e}", f"    positive_prompts: ['{e} {k} prompt', 'about {e}, {k}']"]
    path = folder / f"{case}.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def moe_case(case, fx, experts, mergekit, timing, device, tmp: Path) -> dict:
    """A MoE of the experts: the floor reads the base and the experts and writes the MoE."""
    files = [f for m in ["base", *experts] for f in _shards(fx / m)]
    cfg = json.loads((fx / "base" / "config.json").read_text())
    mlp = 3 * cfg["hidden_size"] * cfg["intermediate_size"] * cfg["num_hidden_layers"] * 2        # bf16 bytes
    out_bytes = sum(f.stat().st_size for f in _shards(fx / "base")) + (len(experts) - 1) * mlp
    row = floor_row(case, files, out_bytes, timing, tmp)
    recipe = write_moe_recipe(case, fx, experts, tmp)
    cmd = mbmerge_head() + ["moe", str(recipe), "--out", str(tmp / "mb"), "-q",
                            *(["--device", device] * (device != "auto"))]
    time_tool(row, "mbmerge", timing, cmd, files, tmp / "mb")
    if moe := _sibling(mergekit, "mergekit-moe"):
        cmd = [str(moe), str(recipe), str(tmp / "mk"), "--device", "cuda" if device == "cuda" else "cpu"]
        time_tool(row, "mergekit", timing, cmd, files, tmp / "mk")
    return row


def transplant_case(case, fx, mergekit, timing, tmp: Path) -> dict:
    """The fixture's base, given a real-size byte-level BPE tokenizer, takes a donor's: the floor reads the
    model and the donor and writes a model."""
    model, donor = transplant_fixture(fx)
    files = _shards(model) + _shards(donor)
    row = floor_row(case, files, sum(f.stat().st_size for f in _shards(model)), timing, tmp)
    method = TRANSPLANT_CASES[case]
    cmd = mbmerge_head() + ["tokensurgeon", str(model), str(donor), "--out", str(tmp / "mb"), "-a", method, "-q"]
    time_tool(row, "mbmerge", timing, cmd, files, tmp / "mb")
    if surgeon := _sibling(mergekit, "mergekit-tokensurgeon"):
        time_tool(row, "mergekit", timing, [str(surgeon), str(model), str(donor), str(tmp / "mk"), "-a", method],
                  files, tmp / "mk")
    return row


def transplant_fixture(fx: Path) -> tuple[Path, Path]:
    """fx-transplant/{model, donor}, built once: the model is the fixture's base (its shards hard-linked) with a
    byte-level BPE tokenizer of its vocab_size trained on Python's standard library sources (nothing
    downloaded); the donor a 2-layer Llama of hidden 512 whose tokenizer has DONOR_ADDS more merges of the same
    corpus and two more special tokens, so every id moves."""
    out = fx.with_name(f"{fx.name}-transplant")
    if (out / "done").exists():
        return out / "model", out / "donor"
    shutil.rmtree(out, ignore_errors=True)
    tmp = fx.with_name(f".build-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    vocab = json.loads((fx / "base" / "config.json").read_text())["vocab_size"]
    (tmp / "model").mkdir(parents=True)
    for f in (fx / "base").iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            os.link(f, tmp / "model" / f.name)
    write_family(tmp / "donor-family", llama_config(512, 2, vocab + DONOR_ADDS + 2), [], 1 << 30)
    (tmp / "donor-family" / "base").rename(tmp / "donor")
    (tmp / "donor-family").rmdir()
    texts = _corpus(min(24 << 20, 800 * (vocab + DONOR_ADDS)))     # ~800 characters a token: all merges learnt
    _train_tokenizer(tmp / "model", texts, vocab, ["<|endoftext|>"])
    _train_tokenizer(tmp / "donor", texts, vocab + DONOR_ADDS + 2, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    (tmp / "done").touch()
    tmp.rename(out)
    click.echo(f"built {out}", err=True)
    return out / "model", out / "donor"


def _corpus(limit: int) -> list[str]:
    """The text of the standard library's .py files, sorted by path, up to `limit` characters."""
    texts, size = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        texts.append(f.read_text(errors="replace"))
        size += len(texts[-1])
        if size > limit:
            break
    return texts


def _train_tokenizer(folder: Path, texts: list[str], size: int, specials: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=size, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    for f in folder.glob("tokenizer*"):
        f.unlink()
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=specials[0], eos_token=specials[-1]).save_pretrained(folder)
