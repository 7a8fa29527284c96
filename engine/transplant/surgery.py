"""mbmerge tokensurgeon MODEL DONOR --out DIR: the model given the donor's tokenizer, as one stream. Every check
first (the references, the tokenizers, the tensors each method reads, -k against what the vocabularies
share), then the output planned (the model's tensors, its vocabulary tensors with the donor's rows), each
tensor written in place in plan order: the vocabulary tensors rebuilt a row chunk at a time (rows.py),
every other tensor copied through chunk by chunk; then the side files, the card, the record, and the
folder published. Memory: the chunks in flight, one approximation batch and the dictionary; never a model.
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ...common.errors import BadModel, BadParameter
from ...common.roles import EMBEDDINGS, HEADS
from ..inputs.header import DTYPES
from ..inputs.index import TensorIndex
from ..inputs.read import MappedModel
from ..inputs.resolve import Source, resolve
from ..inputs.side_files import load_tokenizer
from ..inputs.vocab_rows import reshaped
from ..journal import input_identity
from ..output.place import (check_apart, check_location, discard, missing_parents, output_lock, partial_folder,
                            publish, remove_empty)
from ..output.partial import unchanged
from ..output.write import ShardWriter
from ..plan import Plan, make_plan
from . import card
from .options import NEED_DONOR_ROWS, Options
from .rows import Rebuild
from .tokens import Alignment, align, normalized_vocabulary

COPY_CHUNK = 1 << 21       # elements per chunk of a tensor copied through


@dataclass(frozen=True, kw_only=True)
class Vocab:
    """One vocabulary tensor of the model, and what rebuilds it."""
    name: str
    head: bool
    donor: str | None             # the donor's tensor giving the targets, or None (a method that reads none)
    alignment: Alignment


@dataclass(frozen=True, kw_only=True)
class Job:
    """A transplant read and checked, nothing written yet."""
    model: Source
    donor: Source
    out: Path
    index: TensorIndex
    donor_index: TensorIndex | None     # None: a donor of a tokenizer alone
    tokenizer: object                   # the model's (subword reads it)
    donor_tokenizer: object
    vocab: list[Vocab]
    plan: Plan
    options: Options
    identity: dict                      # the input shards' size, mtime and header digest


def tokensurgeon(model: str, donor: str, out: Path, options: Options = Options(), overwrite: bool = False) -> Path:
    """Write `out`, the model with the donor's tokenizer; returns it. Every refusal (MbmergeError, one line) comes
    before anything is written."""
    check_location(out, overwrite)
    job = prepare(model, donor, Path(out), options)
    created = missing_parents(out)
    try:
        with output_lock(out):
            return _run(job, Path(out), overwrite)
    except BaseException:
        remove_empty(created)
        raise


def prepare(model: str, donor: str, out: Path, options: Options) -> Job:
    """The inputs resolved, read and checked, the rows aligned, the output planned."""
    m, d = _source(model, "model"), _source(donor, "donor")
    check_apart(out, [("model", m.path), ("donor", d.path)])
    index = TensorIndex.from_folder(m.path, "model")
    card.check_side_files(m.path, d.path)
    need = "tokensurgeon gives the model the donor's tokenizer"
    donor_tok, tokenizer = load_tokenizer(d.path, "donor", need), load_tokenizer(m.path, "model", need)
    donor_index = _donor_index(d.path, options)
    model_vocab, donor_vocab = normalized_vocabulary(tokenizer), normalized_vocabulary(donor_tok)
    vocab = []
    for name, head in _vocabulary_tensors(index):
        source = _donor_tensor(donor_index, head) if donor_index else None
        if source is None and options.method in NEED_DONOR_ROWS:
            raise BadModel(f"donor {d.path} has no {'head' if head else 'token embedding'} "
                           f"({', '.join(HEADS if head else EMBEDDINGS[:2])}, ...) to approximate {name} from with "
                           f"-a {options.method}")
        byte, prefix = options.matches(head)
        rows = None if source is None else donor_index.tensors[source].shape[0]
        alignment = align(model_vocab, donor_vocab, index.tensors[name].shape[0], rows, byte=byte, prefix=prefix)
        _check_k(options, alignment, name, donor_index.tensors[source].shape[1] if source else None)
        vocab.append(Vocab(name=name, head=head, donor=source if options.method in NEED_DONOR_ROWS else None,
                           alignment=alignment))
    plan = make_plan(reshaped(index, vocab[0].alignment.rows), n_inputs=1, budget=1 << 30,
                     out_dtype=options.out_dtype, preferred=COPY_CHUNK)
    identity = input_identity([index] + ([donor_index] if donor_index else []))
    return Job(model=m, donor=d, out=out, index=index, donor_index=donor_index, tokenizer=tokenizer,
               donor_tokenizer=donor_tok, vocab=vocab, plan=plan,
               options=options, identity=identity)


def _source(ref: str, role: str) -> Source:
    source = resolve(str(ref), role)
    if source.adapter is not None:
        raise BadParameter(f"{role} {ref}: tokensurgeon takes a model, not model+adapter; merge the adapter into "
                           f"its model first")
    if not source.path.is_dir():
        raise BadModel(f"{role} {source.path}: " + ("is not a folder" if source.path.exists() else "no such folder"))
    return source


def _donor_index(folder: Path, options: Options) -> TensorIndex | None:
    """The donor's tensors; None for a donor of a tokenizer alone, which only methods that read no donor rows
    accept."""
    if any(folder.glob("*.safetensors")):
        return TensorIndex.from_folder(folder, "donor")
    if options.method in NEED_DONOR_ROWS:
        raise BadModel(f"donor {folder} has no weights (no *.safetensors): -a {options.method} approximates new "
                       f"tokens from the donor's embedding; -a subword, mean or zero need the donor's tokenizer alone")
    return None


def _vocabulary_tensors(index: TensorIndex) -> list[tuple[str, bool]]:
    """(name, is the head) of the model's token embedding and its head, where the model stores one."""
    embed = next((n for n in EMBEDDINGS if len(getattr(index.tensors.get(n), "shape", ())) == 2), None)
    if embed is None:
        raise BadModel(f"model {index.folder} has no token embedding ({', '.join(EMBEDDINGS[:3])}, ...): "
                       f"tokensurgeon rebuilds a model's embedding and head")
    found = [(embed, False)]
    for head in HEADS:
        if head in index.tensors:
            found.append((head, True))
        if head.removesuffix("weight") + "bias" in index.tensors:
            raise BadModel(f"model {index.folder}: tensor {head.removesuffix('weight')}bias is indexed by the "
                           f"vocabulary, and tokensurgeon rebuilds only a model's embedding and head")
    return found


def _donor_tensor(index: TensorIndex, head: bool) -> str | None:
    """The donor's head (its embedding where it ties them) or its embedding; None where it has none."""
    embed = next((n for n in EMBEDDINGS if len(getattr(index.tensors.get(n), "shape", ())) == 2), None)
    if not head:
        return embed
    found = next((n for n in HEADS if n in index.tensors), None)
    return found or (embed if card.donor_ties(index.folder) else None)


def _check_k(options: Options, alignment: Alignment, name: str, width: int | None) -> None:
    """omp and common_interpolation combine k of the shared tokens: no more than there are, and omp no more
    than the donor's width (past it the residual is zero and the picks are noise)."""
    if options.method not in NEED_DONOR_ROWS or not alignment.new:
        return
    shared = len(alignment.shared)
    if options.k > shared:
        raise BadParameter(f"-k {options.k} is more than the {shared} tokens the vocabularies share ({name}); "
                           f"pass a smaller -k")
    if options.method == "omp" and options.k > width:
        raise BadParameter(f"-k {options.k} is more than the donor's embedding width {width}: omp cannot pick more "
                           f"independent rows than that; pass -k {width} or less")


def _run(job: Job, out: Path, overwrite: bool) -> Path:
    started, tmp = time.perf_counter(), partial_folder(out)
    discard(tmp, notice=True)
    tmp.mkdir()
    model = MappedModel(job.index)
    donor = MappedModel(job.donor_index) if job.donor_index else None
    try:
        writer = ShardWriter(tmp, job.plan)
        try:
            _write_tensors(job, model, donor, writer)
        finally:
            writer.close()
        unchanged(job.identity, "it was being read")
        card.finish(job, tmp, writer, time.perf_counter() - started)
        publish(tmp, out, overwrite)
    except BaseException:
        discard(tmp)
        raise
    finally:
        model.close()
        if donor is not None:
            donor.close()
    return out


def _write_tensors(job: Job, model: MappedModel, donor: MappedModel | None, writer: ShardWriter) -> None:
    vocab = {v.name: v for v in job.vocab}
    total = sum(t.out_nbytes for t in job.plan.tensors)
    with tqdm(total=total, unit="B", unit_scale=True, desc="mbmerge tokensurgeon", disable=not job.options.progress,
              file=sys.stderr) as bar:
        for t in job.plan.tensors:
            if t.name in vocab:
                _rebuild(job, vocab[t.name], t, model, donor, writer, bar.update)
                continue
            out_dtype = DTYPES[t.out_dtype].torch
            for a, z in t.chunks:
                x = model.chunk(t.ref, a, z)
                writer.write(t, a, x if x.dtype == out_dtype else x.to(out_dtype))
                model.release(t.ref, a, z)
                bar.update((z - a) * out_dtype.itemsize)


def _rebuild(job: Job, v: Vocab, t, model: MappedModel, donor: MappedModel | None, writer: ShardWriter,
             done) -> None:
    """Tensor t rebuilt a row chunk at a time; the mapped pages of the tensors it reads released after each."""
    read = [(model, job.index.tensors[v.name])] + ([(donor, job.donor_index.tensors[v.donor])] if v.donor else [])
    table, source = [m.chunk(e, 0, e.numel).view(e.shape) for m, e in read] + [None] * (2 - len(read))
    pieces = _pieces(job.tokenizer, v.alignment.texts, table.shape[0]) if job.options.method == "subword" else None
    rebuild = Rebuild(name=v.name, head=v.head, table=table, donor=source, alignment=v.alignment, pieces=pieces,
                      options=job.options)
    for a, rows in rebuild.chunks(DTYPES[t.out_dtype].torch):
        writer.write(t, a * table.shape[1], rows)
        for m, e in read:
            m.release(e, 0, e.numel)
        done(rows.numel() * rows.element_size())


def _pieces(tokenizer, texts: list[str], rows: int) -> list[list[int]]:
    """The model's token ids of each text (no special tokens added), those past the tensor's rows left out."""
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [[i for i in p if i < rows] for p in ids]
