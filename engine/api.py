"""run(spec): resolve the inputs, check them, plan, merge, and publish the output folder. Knows no
workloads (the mini zoo) and collects no data statistics: those come as folders."""
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import kernels, methods
from ..common.errors import BadParameter, InputChanged
from ..common.names import domain_names
from . import chat_template, lora, side_files, vocabulary
from .execute import Merger
from .index import INDEX_FILE, TensorIndex, check_agreement, float_width_notes
from .journal import JOURNAL, Journal, input_identity
from .journal import fingerprint as fingerprint_of
from .output import (check_apart, check_location, discard, missing_parents, output_lock, partial_folder, publish,
                     remove_empty)
from .plan import COMPILED_CHUNK, CPU_CHUNK, GPU_CHUNK, make_plan, parse_shard_size
from .read import MappedModel
from .recipe import tensor_overrides
from .resolve import Source, resolve
from .slices import layer_count, virtual_inputs
from .spec import CONFIG_FILE, VERSION, MergeSpec, spec_from
from .stats_folders import open_statistics, read_card
from .tied import reconcile
from .vocab_rows import VocabularyModel, reshaped, vocab_tensors
from .verify import input_changes, sha256_files
from .write import ShardWriter, write_card, write_index


def merge(method: str, *, experts, out, **options) -> Path:
    """Merge model folders with the engine alone: merge() of the package (mbmerge.merge, documented
    there) without its two conveniences, the built-in family and collecting data statistics; a
    data-aware method needs its statistics folders (stats_folders=[...]).

    Example:
        >>> mbmerge.engine.merge("ties", base="B/", experts=["X1/", "X2/"], out="m/", density=0.2)
    """
    return run(spec_from(method, experts, out, **options))


def sources(spec: MergeSpec) -> tuple[Source | None, list[Source]]:
    """The base and the experts as local folders: domain names with no base refer to spec.family."""
    names = domain_names(spec.experts)
    if spec.base is None and names is not None:
        if spec.family is None:
            raise BadParameter("domain experts with no --base: pass --base (a hub base such as "
                               "google/gemma-2-2b, or a folder)")
        family = Path(spec.family)
        return (Source("built-in", family / "base", None, "base"),
                [Source(e, family / d, None, f"expert {e}") for e, d in zip(spec.experts, names)])
    base = resolve(spec.base, "base") if spec.base else None
    if base is None and methods.get(spec.method).needs_base:
        raise BadParameter(f"method {spec.method} needs a base model (--base)")
    return base, [_on_base(resolve(e, f"expert {e}", spec.base), base) for e in spec.experts]


def _on_base(s: Source, base: Source | None) -> Source:
    """An expert given as a LoRA adapter folder alone adapts the base."""
    if s.adapter is not None or not lora.is_adapter(s.path):
        return s
    if base is None:
        raise BadParameter(f"{s.role} is a LoRA adapter ({s.path}): pass --base, the model it adapts, or name "
                           f"both as MODEL+ADAPTER")
    return replace(base, ref=s.ref, role=s.role, adapter=s.path)


def run(spec: MergeSpec) -> Path:
    """Run a checked MergeSpec; see merge(). The output's place is checked before any input is read."""
    started = time.perf_counter()
    check_location(spec.out, spec.overwrite)
    base, experts = sources(spec)
    models = ([base] if base else []) + experts
    folders = [(s.role, f) for s in models for f in s.folders]
    folders += [(f"statistics of {s.role}", Path(f)) for s, f in zip(experts, spec.stats_folders or ())]
    check_apart(spec.out, folders + [(role, f) for role, folder in folders for f in _files(folder)])
    merged = ([base] if base and methods.get(spec.method).needs_base else []) + experts   # a copied base is no input
    _warn_repeated([(s.role, s.folders) for s in merged])
    created = missing_parents(spec.out)
    try:
        with output_lock(spec.out), kernels.using(spec.kernels, spec.compile):
            return _run_locked(spec, base, experts, started)
    except BaseException:
        remove_empty(created)
        raise


def _files(folder: Path) -> list[Path]:
    """The files in an input folder (hub snapshots link them into the cache's blobs/)."""
    try:
        return [f for f in Path(folder).iterdir() if f.is_file()]
    except OSError:
        return []   # reading the folder fails later, with its own message


def _warn_repeated(models: list[tuple[str, list[Path]]]) -> None:
    """One warning line when a model is given twice (an expert twice, or the base as an expert); a model
    with an adapter is another model."""
    seen = {}
    for role, folders in models:
        real = tuple(Path(f).resolve() for f in folders)
        if real in seen:
            print(f"mbmerge: warning: {role} is the same model as {seen[real]} ({folders[-1]}); it is merged twice",
                  file=sys.stderr)
        seen.setdefault(real, role)


@dataclass
class _Inputs:
    """One merge's inputs read and checked, and its plan: everything known before a byte is written."""
    spec: MergeSpec
    method: object
    base: Source | None
    experts: list[Source]
    side: Path                  # config and tokenizer files come from here
    raw: dict                   # role -> each input's index as stored
    adapters: dict              # role -> its LoRA adapter, for inputs that have one
    base_index: TensorIndex | None
    indexes: list[TensorIndex]
    roles: list[str]
    refs: list[str]
    tied: list[str]
    vocab: object
    template: tuple | None
    ref_index: TensorIndex
    plan: object
    stat_indexes: list[TensorIndex]
    identity: dict
    fingerprint: str
    command: str                # the command line that reruns it (the recipe's gradients stay in the recipe)


def fingerprint(spec: MergeSpec) -> str:
    """The fingerprint a merge of `spec` records in its mbmerge.json (its recipe, output layout and each
    input file's identity), computed without writing: an output recording the same one is this merge."""
    base, experts = sources(spec)
    with kernels.using(spec.kernels, spec.compile):
        return _read_inputs(spec, base, experts).fingerprint


def _read_inputs(spec: MergeSpec, base: Source | None, experts: list[Source]) -> _Inputs:
    method = methods.get(spec.method)
    base_index = TensorIndex.from_folder(base.path, "base") if base else None
    indexes = [TensorIndex.from_folder(s.path, s.role) for s in experts]
    side = (base_index or indexes[0]).folder
    pairs = [(s, ix) for s, ix in zip([base, *experts], [base_index, *indexes]) if s is not None]
    raw = {s.role: ix for s, ix in pairs}
    adapters = {s.role: lora.read_adapter(s.adapter, ix, s.role) for s, ix in pairs if s.adapter is not None}
    folders = [ix for _, ix in pairs] + [a.index for a in adapters.values()]   # the inputs' own files (identity)
    if adapters:              # each adapted model as the merge reads it: its LoRA folded in
        if spec.slices:
            raise BadParameter("LoRA adapters with slices are not supported yet: fold the adapters in a stage of "
                               "their own first")
        base_index = adapters[base.role].view(base_index) if base and base.role in adapters else base_index
        indexes = [adapters[s.role].view(ix) if s.role in adapters else ix for s, ix in zip(experts, indexes)]
    side_files.check(side, "base" if base else experts[0].role)
    refs, roles = [s.ref for s in experts], [s.role for s in experts]
    if spec.slices:           # the inputs become one virtual model per position of the slices
        base_index, indexes, refs = _sliced(spec, method, pairs)
        roles = refs
    indexes, tied = reconcile(base_index or indexes[0], list(zip(roles, indexes)))
    vocab = _vocabulary(spec, method, base, experts, base_index, indexes)
    shaped = (lambda ix: reshaped(ix, vocab.rows)) if vocab else (lambda ix: ix)   # noqa: E731
    ref_index = shaped(base_index or indexes[0])
    template = _chat_template(spec, base, experts, side, vocab)    # its errors before any work
    check_agreement(ref_index, {r.removeprefix("expert "): shaped(ix) for r, ix in zip(roles, indexes)},
                    "base" if base else f"expert {spec.experts[0]!r}")
    n_inputs = len(indexes) + (1 if base_index and method.needs_base else 0)
    plan = make_plan(ref_index, n_inputs=n_inputs, budget=spec.memory_budget, out_dtype=spec.dtype,
                     keep_base=spec.keep_base, span=method.span, preferred=_chunk_size(method, spec.device),
                     shard_size=spec.out_shard_size or (parse_shard_size("5B") if spec.slices else None))
    command = spec.command()
    spec = _with_tensor_overrides(spec, [t.name for t in plan.tensors if t.merge])
    stat_indexes = (open_statistics(method, _stats_folders(spec), [s.role for s in experts], plan)
                    if method.data_statistic else [])
    identity = input_identity(folders + stat_indexes)
    return _Inputs(spec, method, base, experts, side, raw, adapters, base_index, indexes, roles, refs, tied, vocab,
                   template, ref_index, plan, stat_indexes, identity, fingerprint_of(spec.recipe(), plan, identity),
                   command)


def _with_tensor_overrides(spec: MergeSpec, merged: list[str]) -> MergeSpec:
    """spec with the recipe's gradients and filters made per-tensor overrides, after the user's own; an
    --override that matches none of the merged tensors is refused (it would change nothing, silently)."""
    for pattern, _ in spec.overrides:
        if not any(re.search(pattern, name) for name in merged):
            raise BadParameter(f"--override {pattern!r} matches none of the {len(merged)} merged tensors (e.g. "
                               f"{merged[len(merged) // 2] if merged else 'none'}); check the pattern")
    if not spec.layered:
        return spec
    return replace(spec, layered=None, overrides=spec.overrides + tuple(
        tensor_overrides(spec.method, spec.layered, merged)))


def _run_locked(spec: MergeSpec, base: Source | None, experts: list[Source], started: float) -> Path:
    got = _read_inputs(spec, base, experts)
    spec, plan = got.spec, got.plan
    if not spec.dtype:
        for note in float_width_notes(got.ref_index, dict(zip(got.refs, got.indexes)),
                                      "the base" if got.base_index else f"expert {got.refs[0]!r}"):
            print(f"mbmerge: notice: {note}", file=sys.stderr)
    tmp = partial_folder(spec.out)
    resumed = Journal.resume(tmp, got.fingerprint, plan) if spec.resume else None
    if resumed is None:
        discard(tmp, notice=True)
        tmp.mkdir()
    elif spec.progress:
        print(f"mbmerge: resuming the interrupted merge into {spec.out}: {len(resumed[0])} of {len(plan.tensors)} "
              f"tensors are written and check out, merging the rest", file=sys.stderr)
    done, model_thr, ties, prefixes = resumed or (set(), None, {}, None)
    maps = []
    try:
        base_map, expert_maps, stat_maps = _open_inputs(got)
        maps = [m for m in [base_map, *expert_maps, *stat_maps] if m is not None]
        writer, journal = ShardWriter(tmp, plan, prefixes), Journal(tmp, got.fingerprint, fresh=resumed is None)
        try:
            if spec.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(spec.device)
            merger = Merger(plan=plan, method=got.method, params=spec.resolved, base=base_map, experts=expert_maps,
                            roles=got.roles, writer=writer, allow_nonfinite=spec.allow_nonfinite,
                            device=spec.device, stat_inputs=stat_maps, overrides=spec.resolved_overrides)
            merger.run(spec.progress, journal, done, model_thr, ties)
        finally:
            writer.close()
            journal.close()
        if changed := input_changes(got.identity):
            raise InputChanged(f"input {min(changed)} changed while it was being merged; nothing was written")
        (tmp / JOURNAL).unlink()
        _finish(got, tmp, writer, len(done), time.perf_counter() - started)
        publish(tmp, spec.out, spec.overwrite)
    except KeyboardInterrupt:
        raise         # the partial folder and its journal stay: the same command resumes
    except BaseException:
        discard(tmp)
        raise
    finally:
        for m in maps:
            m.close()
    return spec.out


def _open_inputs(got: _Inputs) -> tuple:
    """(the base's reader or None, the experts', the statistics') over mapped files."""
    vocab = got.vocab

    def mapped(ix: TensorIndex, role: str, ref: str):
        inner = lora.AdaptedModel(got.raw[role], got.adapters[role]) if role in got.adapters else MappedModel(ix)
        return VocabularyModel(inner, ref, vocab) if vocab else inner
    base_map = mapped(got.base_index, "base", got.base.ref) if got.base_index else None
    expert_maps = [mapped(ix, role, ref) for ix, role, ref in zip(got.indexes, got.roles, got.refs)]
    if vocab:             # rows a model lacks are made from the merge inputs' rows
        inputs = {m.ref: m for m in ([base_map] if base_map and got.method.needs_base else []) + expert_maps}
        for m in [base_map, *expert_maps]:
            if m is not None:
                m.attach([inputs[ref] for ref in vocab.inputs])
    return base_map, expert_maps, [MappedModel(ix) for ix in got.stat_indexes]


def _finish(got: _Inputs, tmp: Path, writer: ShardWriter, resumed: int, seconds: float) -> None:
    """Everything beside the tensors: the index, config and tokenizer files, the recipe, the card."""
    spec, plan, vocab = got.spec, got.plan, got.vocab
    write_index(tmp, plan)
    copied = side_files.copy(got.side, tmp, spec.dtype, tokenizer=spec.copy_tokenizer and not vocab)
    if spec.slices:
        side_files.set_config(tmp, "num_hidden_layers", layer_count(got.ref_index))
    if vocab:             # the built tokenizer, whatever copy_tokenizer says (mergekit's rule)
        copied += [Path(f).name for f in vocab.tokenizer.save_pretrained(str(tmp)) if Path(f).parent == tmp]
        side_files.set_config(tmp, "vocab_size", vocab.rows)
    if got.template and got.template[0]:
        chat_template.write(tmp, got.template[0])
    if spec.config is not None:           # the recipe the merge ran, beside it (as mergekit_config.yml)
        (tmp / CONFIG_FILE).write_text(spec.config)
        copied.append(CONFIG_FILE)
    record = _record(spec, got.base, got.experts, plan, seconds)
    record.update(command=got.command, chat_template=got.template[1] if got.template else None,
                  tied_heads=got.tied,    # what was merged as a head, or left out, and why
                  vocabulary=vocab.notes if vocab else None, fingerprint=got.fingerprint)
    if got.stat_indexes:
        record["statistics"] = [{"path": str(ix.folder.resolve()), **read_card(ix.folder)}
                                for ix in got.stat_indexes]
    digests = {s.name: writer.sha256(s.name) for s in plan.shards}   # taken while writing
    record.update(resumed_tensors=resumed, inputs=got.identity,
                  sha256={**digests, **sha256_files(tmp, [INDEX_FILE] * plan.sharded + copied)})
    write_card(tmp, record)


def _chunk_size(method, device) -> int:
    """Elements per chunk: a GPU's, the compiled CPU loops' (they hold no float32 copies), or the
    torch methods' (whose float32 temporaries fit in the cache)."""
    if device.type == "cuda":
        return GPU_CHUNK
    return COMPILED_CHUNK if method.fused is not None and kernels.compiled(device) else CPU_CHUNK


def _sliced(spec: MergeSpec, method, pairs: list[tuple[Source, TensorIndex]]) -> tuple:
    """(the base's virtual index or None, the experts', their names) of a recipe's slices (engine/slices.py),
    from each input (source, index)."""
    if spec.tokenizer is not None:
        raise BadParameter("a tokenizer source with slices is not supported: the embeddings and the head may come "
                           "from different models; merge the vocabularies in a stage of their own")
    virtual = virtual_inputs(list(spec.slices), {s.ref: ix for s, ix in pairs})
    names = [f"slice input {j + 1}" for j in range(len(virtual))]
    if method.needs_base:
        return virtual[0], virtual[1:], names[1:]
    return None, virtual, names


def _vocabulary(spec: MergeSpec, method, base: Source | None, experts: list[Source], base_index,
                indexes) -> vocabulary.Vocabulary | None:
    """The output vocabulary where spec asks for one (spec.tokenizer), from the models' tokenizers."""
    if spec.tokenizer is None:
        return None
    models = [(base, base_index)] * (base is not None) + list(zip(experts, indexes))
    rows = [ix.tensors[names[0]].shape[0] if (names := vocab_tensors(ix)) else 0 for _, ix in models]
    inputs = [s.ref for s, _ in models if s is not base or method.needs_base]
    folders = [s.adapter if s.adapter and lora.has_tokenizer(s.adapter) else s.path for s, _ in models]
    return vocabulary.build(vocabulary.parse(spec.tokenizer),
                            [(s.ref, f, r) for (s, _), f, r in zip(models, folders, rows)], inputs,
                            base.ref if base else None)


def _chat_template(spec: MergeSpec, base: Source | None, experts: list[Source], ref: Path,
                   vocab) -> tuple | None:
    """(the output's chat template or None, where it came from) where spec asks for one, else None."""
    if spec.chat_template is None:
        return None
    if not vocab and (not spec.copy_tokenizer or not (ref / chat_template.CONFIG).is_file()):
        raise BadParameter(f"chat_template: the output would have no {chat_template.CONFIG} to carry it "
                           f"({'--no-copy-tokenizer' if not spec.copy_tokenizer else f'{ref} has none'})")
    return chat_template.choose(spec.chat_template, [(s.ref, s.path) for s in ([base] if base else []) + experts])


def _stats_folders(spec: MergeSpec) -> list[Path]:
    if not spec.stats_folders:
        kind = methods.get(spec.method).data_statistic.kind
        raise BadParameter(f"method {spec.method} needs each expert's {kind} statistics: --stats DIR,... "
                           f"(from `mbmerge stats`) or --data SOURCE,... to collect them")
    return [Path(f) for f in spec.stats_folders]


def _record(spec: MergeSpec, base: Source | None, experts: list[Source], plan, seconds: float) -> dict:
    def source(s: Source) -> dict:
        return {"role": s.role, "ref": s.ref, "path": str(s.path.resolve()), "revision": s.revision}
    method = methods.get(spec.method)
    backend, threads = kernels.merge_backend(spec.device, fused=method.fused is not None, span=method.span)
    return {
        "mbmerge_version": VERSION, "method": spec.method, "protocol": spec.protocol, "params": spec.resolved,
        "base": source(base) if base else None, "experts": [source(s) for s in experts],
        "dtype": spec.dtype or "as stored", "keep_base": spec.keep_base, "out_shard_size": spec.out_shard_size,
        "copy_tokenizer": spec.copy_tokenizer, "shards": len(plan.shards),
        **({"tokenizer": spec.tokenizer} if spec.tokenizer else {}),
        **({"slices": spec.recipe()["slices"]} if spec.slices else {}),
        **({"overrides": spec.recipe()["overrides"]} if spec.overrides else {}),
        **({"recipe_file": CONFIG_FILE} if spec.config is not None else {}),
        "tensors_merged": sum(t.merge for t in plan.tensors),
        "tensors_copied": sum(not t.merge for t in plan.tensors),
        "chunk_elements": plan.chunk_elems, "wall_seconds": round(seconds, 3), "device": str(spec.device),
        "kernels": {"backend": backend, "threads": threads},      # what merged the chunks (kernels.merge_backend)
        **({"peak_gpu_bytes": torch.cuda.max_memory_allocated(spec.device)} if spec.device.type == "cuda" else {}),
    }
