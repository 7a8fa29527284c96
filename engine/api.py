"""run(spec): one merge as a short story: its models (engine/models.py), its plan, the executor writing
the tensors, and the finish (side files, tokenizer, chat template, recipe, card), then the output folder
published. Knows no workloads (the mini zoo) and collects no data statistics: those come as folders."""
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import kernels, methods
from ..common.errors import BadParameter
from ..common.threads import held_to
from ..methods import Method
from .execute import Merger
from .inputs import chat_template, side_files
from .inputs.index import INDEX_FILE, TensorIndex
from .inputs.resolve import Source
from .inputs.slices import layer_count
from .inputs.stats_folders import open_statistics, read_card
from .journal import Journal, input_identity
from .journal import fingerprint as fingerprint_of
from .models import Models, read_models, sources
from .modules import Part, cut, read_parts
from .modules import card as modules_card
from .norms import expert_norms
from .output.partial import kept_for_resume, resumed_or_fresh, written
from .output.place import (check_apart, check_location, missing_parents, output_lock, partial_folder, publish,
                           remove_empty)
from .output.verify import sha256_files
from .output import fp8
from .output.write import ShardWriter, write_card, write_index
from .plan import COMPILED_CHUNK, CPU_CHUNK, GPU_CHUNK, Plan, make_plan, parse_shard_size
from .device import resolve_device
from .spec import CONFIG_FILE, VERSION, MergeSpec, RunOptions, spec_from

__all__ = ["merge", "run", "fingerprint", "prepare", "sources", "spec_from"]


def merge(method: str, *, experts, out, **options) -> Path:
    """Merge model folders with the engine alone: merge() of the package (mbmerge.merge, documented
    there) without its two conveniences, the built-in family and collecting data statistics; a
    data-aware method needs its statistics folders (stats_folders=[...]).

    Example:
        >>> mbmerge.engine.api.merge("ties", base="B/", experts=["X1/", "X2/"], out="m/", density=0.2)
    """
    return run(spec_from(method, experts, out, **options))


def run(spec: MergeSpec) -> Path:
    """Run a checked MergeSpec; see merge(). The output's place is checked before any input is read."""
    started = time.perf_counter()
    check_location(spec.out, spec.run.overwrite)
    base, experts = sources(spec)
    models = ([base] if base else []) + experts
    for b, e in map(sources, spec.modules):      # a modules recipe's other modules' models
        models += ([b] if b else []) + e
    folders = [(s.role, f) for s in models for f in s.folders]
    folders += [(f"statistics of {s.role}", Path(f)) for s, f in zip(experts, spec.stats_folders or ())]
    check_apart(spec.out, folders + [(role, f) for role, folder in folders for f in _files(folder)])
    merged = ([base] if base and methods.get(spec.method).needs_base else []) + experts   # a copied base is no input
    _warn_repeated([(s.role, s.folders) for s in merged])
    for key, method in spec.ignored:
        print(f"mbmerge: warning: recipe key {key!r} is not a parameter of {method}; ignored, as mergekit ignores "
              f"it", file=sys.stderr)
    created = missing_parents(spec.out)
    try:
        with output_lock(spec.out), kernels.using(*_kernel_choice(spec.run)), held_to(spec.run.threads):
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


@dataclass(kw_only=True)
class Prepared:
    """One merge read and planned, nothing written yet: what it merges and how, and its fingerprint."""
    spec: MergeSpec             # the recipe's per-tensor values made overrides
    method: Method
    device: torch.device        # where it computes (spec.run.device, resolved)
    models: Models
    plan: Plan
    statistics: list[TensorIndex]   # a data-aware method's, one folder per expert
    identity: dict              # every input file's size, mtime and header digest
    fingerprint: str            # the recipe, the output layout and the identity (journal.fingerprint)
    command: str                # the command line that reruns it (a recipe's gradients stay in the recipe)
    parts: list[Part]           # what each method merges (one part; a `modules:` recipe's: engine/modules.py)


def fingerprint(spec: MergeSpec) -> str:
    """The fingerprint a merge of `spec` records in its mbmerge.json, computed without writing: an output
    recording the same one holds this merge."""
    base, experts = sources(spec)
    with kernels.using(*_kernel_choice(spec.run)):
        return prepare(spec, base, experts).fingerprint


def prepare(spec: MergeSpec, base: Source | None, experts: list[Source]) -> Prepared:
    """The models read and checked, the plan made, the statistics opened: every error before a byte is written."""
    method, device = spec.row(), resolve_device(spec.run.device)
    if spec.module is not None:
        return _prepare_modules(spec, base, experts, device)
    models = read_models(spec, base, experts)
    plan = _plan(spec, Part(spec=spec, method=method, models=models), models, device)
    if spec.weights_from:                 # NAN: a pre-pass for the experts' norms, which give the weights
        spec = replace(spec, expert_norms=tuple(expert_norms(models, plan)))
    command = spec.command()
    merged = [t for t in plan.tensors if t.merge]
    spec = _with_tensor_overrides(spec, [t.name for t in merged])
    statistics = (open_statistics(method, _stats_folders(spec), [s.role for s in experts], [t.ref for t in merged])
                  if method.data_statistic else [])
    identity = input_identity(models.files + statistics)
    return Prepared(spec=spec, method=method, device=device, models=models, plan=plan, statistics=statistics,
                    identity=identity, fingerprint=fingerprint_of(spec.recipe(), plan, identity), command=command,
                    parts=[Part(spec=spec, method=method, models=models, plan=plan)])


def _plan(spec: MergeSpec, part: Part, whole: Models, device) -> Plan:
    """The output's plan (whole's layout, spec's dtype and shards), chunked for the part's method and inputs."""
    n_inputs = len(part.models.experts) + (1 if part.models.base and part.method.needs_base else 0)
    return make_plan(whole.reference, n_inputs=n_inputs, budget=spec.run.memory_budget,
                     out_dtype=spec.dtype or whole.out_dtypes(),
                     keep_base=part.spec.keep_base, span=part.method.span, preferred=_chunk_size(part.method, device),
                     shard_size=spec.out_shard_size or (parse_shard_size("5B") if spec.slices else None))


def _prepare_modules(spec: MergeSpec, base: Source | None, experts: list[Source], device) -> Prepared:
    """prepare() of a `modules:` recipe: each module a part of the one plan (engine/modules.py)."""
    whole, parts = read_parts(spec, base, experts)
    plan, parts = cut([replace(p, plan=_plan(spec, p, whole, device)) for p in parts])
    parts = [replace(p, spec=_with_tensor_overrides(p.spec, [t.name for t in p.plan.tensors if t.merge]))
             if p.module else p for p in parts]       # the copied tensors take no values
    files = list({str(ix.folder.resolve()): ix for p in parts for ix in p.models.files}.values())
    identity = input_identity(files)
    recipe = {"parts": [{"module": p.module, **p.spec.recipe()} for p in parts]}
    return Prepared(spec=parts[0].spec, method=parts[0].method, device=device, models=whole, plan=plan, statistics=[],
                    identity=identity, fingerprint=fingerprint_of(recipe, plan, identity), command=spec.command(),
                    parts=parts)


def _with_tensor_overrides(spec: MergeSpec, merged: list[str]) -> MergeSpec:
    """spec with the recipe's gradients and filters made per-tensor overrides, after the user's own; an
    --override that matches none of the merged tensors is refused (it would change nothing, silently)."""
    for pattern, _ in spec.overrides:
        if not any(re.search(pattern, name) for name in merged):
            raise BadParameter(f"--override {pattern!r} matches none of the {len(merged)} merged tensors (e.g. "
                               f"{merged[len(merged) // 2] if merged else 'none'}); check the pattern")
    if not spec.layered:
        return spec
    return replace(spec, layered=None, overrides=spec.overrides + tuple(spec.layered.overrides(merged)))


def _run_locked(spec: MergeSpec, base: Source | None, experts: list[Source], started: float) -> Path:
    p = prepare(spec, base, experts)
    for note in p.models.quantized_notes() + ([] if spec.dtype else p.models.float_width_notes()):
        print(f"mbmerge: notice: {note}", file=sys.stderr)
    tmp = partial_folder(spec.out)
    resumed = resumed_or_fresh(tmp, p.fingerprint, p.plan, spec.run.resume,
                               spec.run.progress and f"merge into {spec.out}")
    done, model_thr, ties, prefixes = resumed or (set(), None, {}, None)
    readers = []
    try:
        with kept_for_resume(tmp):
            for part in p.parts:
                readers.append(part.models.readers(part.method.needs_base, p.statistics))
            writer, journal = ShardWriter(tmp, p.plan, prefixes), Journal(tmp, p.fingerprint, fresh=resumed is None)
            try:
                if p.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(p.device)
                for part, r in zip(p.parts, readers):       # a `modules:` recipe's parts in turn
                    merger = Merger(plan=part.plan, method=part.method, readers=r, writer=writer,
                                    params=part.spec.resolved, overrides=part.spec.resolved_overrides, device=p.device,
                                    allow_nonfinite=spec.allow_nonfinite)
                    merger.run(spec.run.progress, journal, done, model_thr, ties)
            finally:
                writer.close()
                journal.close()
            written(tmp, p.identity, "it was being merged")
            _finish(p, tmp, writer, len(done), time.perf_counter() - started)
            publish(tmp, spec.out, spec.run.overwrite)
    finally:
        for r in readers:
            r.close()
    return spec.out


def _finish(p: Prepared, tmp: Path, writer: ShardWriter, resumed: int, seconds: float) -> None:
    """Everything beside the tensors: the index, config and tokenizer files, the recipe, the card."""
    spec, plan, models, vocab = p.spec, p.plan, p.models, p.models.vocab
    write_index(tmp, plan)
    out_quant = fp8.quantize_folder(tmp, [s.name for s in plan.shards], plan.sharded) if spec.out_quant else None
    copied = side_files.copy(models.side, tmp, spec.dtype, tokenizer=spec.copy_tokenizer and not vocab)
    fp8.set_quantization(tmp, out_quant)        # the inputs' quantization_config does not describe the output
    if spec.slices and spec.module is None:      # a module's slices keep the reference's layers
        side_files.set_config(tmp, "num_hidden_layers", layer_count(models.reference))
    if vocab:             # the built tokenizer, whatever copy_tokenizer says (mergekit's rule)
        copied += [Path(f).name for f in vocab.tokenizer.save_pretrained(str(tmp)) if Path(f).parent == tmp]
        side_files.set_config(tmp, "vocab_size", vocab.rows)
    if models.template and models.template[0]:
        chat_template.write(tmp, models.template[0])
    if spec.config is not None:           # the recipe the merge ran, beside it (as mergekit_config.yml)
        (tmp / CONFIG_FILE).write_text(spec.config)
        copied.append(CONFIG_FILE)
    record = _record(spec, *models.given, plan, p.device, seconds)
    record.update(command=p.command, chat_template=models.template[1] if models.template else None,
                  tied_heads=models.tied, vocabulary=vocab.notes if vocab else None, fingerprint=p.fingerprint,
                  quantized_inputs=models.quantized_notes(), out_quant=out_quant)
    if spec.module is not None:
        record["modules"] = modules_card(p.parts)
    if spec.ignored:
        record["ignored_parameters"] = [{"key": key, "method": method} for key, method in spec.ignored]
    if p.statistics:
        record["statistics"] = [{"path": str(ix.folder.resolve()), **read_card(ix.folder)} for ix in p.statistics]
    digests = sha256_files(tmp, [s.name for s in plan.shards]) if out_quant else \
        {s.name: writer.sha256(s.name) for s in plan.shards}         # taken while writing
    record.update(resumed_tensors=resumed, inputs=p.identity,
                  sha256={**digests, **sha256_files(tmp, [INDEX_FILE] * plan.sharded + copied)})
    write_card(tmp, record)


def _kernel_choice(run: RunOptions) -> tuple[str, bool]:
    """(backend, compile) the merge runs under: the run's, else the caller's kernels.using, else the
    environment's (kernels.chosen)."""
    chosen = kernels.chosen()
    return run.kernels or chosen.backend, chosen.compile if run.compile is None else run.compile


def _chunk_size(method, device) -> int:
    """Elements per chunk: a GPU's, the compiled CPU loops' (they hold no float32 copies), or the
    torch methods' (whose float32 temporaries fit in the cache)."""
    if device.type == "cuda":
        return GPU_CHUNK
    return COMPILED_CHUNK if method.fused is not None and kernels.compiled(device) else CPU_CHUNK


def _stats_folders(spec: MergeSpec) -> list[Path]:
    if not spec.stats_folders:
        kind = methods.get(spec.method).data_statistic.kind
        raise BadParameter(f"method {spec.method} needs each expert's {kind} statistics: --stats DIR,... "
                           f"(from `mbmerge stats`) or --data SOURCE,... to collect them")
    return [Path(f) for f in spec.stats_folders]


def _record(spec: MergeSpec, base: Source | None, experts: list[Source], plan, device: torch.device,
            seconds: float) -> dict:
    def source(s: Source) -> dict:
        return {"role": s.role, "ref": s.ref, "path": str(s.path.resolve()), "revision": s.revision}
    method = spec.row()
    backend, threads = kernels.merge_backend(device, fused=method.fused is not None, span=method.span)
    return {
        "mbmerge_version": VERSION, "method": spec.method, "protocol": spec.protocol, "params": spec.resolved,
        **({"calibrate": spec.calibrate} if spec.calibrate else {}),
        **({"weights_from": spec.weights_from, "expert_norms": list(spec.expert_norms)} if spec.weights_from else {}),
        "base": source(base) if base else None, "experts": [source(s) for s in experts],
        "dtype": spec.dtype or "as stored", "keep_base": spec.keep_base, "out_shard_size": spec.out_shard_size,
        "copy_tokenizer": spec.copy_tokenizer, "shards": len(plan.shards),
        **({"tokenizer": spec.tokenizer} if spec.tokenizer else {}),
        **({"slices": spec.recipe()["slices"]} if spec.slices else {}),
        **({"overrides": spec.recipe()["overrides"]} if spec.overrides else {}),
        **({"recipe_file": CONFIG_FILE} if spec.config is not None else {}),
        "tensors_merged": sum(t.merge for t in plan.tensors),
        "tensors_copied": sum(not t.merge for t in plan.tensors),
        "chunk_elements": plan.chunk_elems, "wall_seconds": round(seconds, 3), "device": str(device),
        "kernels": {"backend": backend, "threads": threads},      # what merged the chunks (kernels.merge_backend)
        **({"peak_gpu_bytes": torch.cuda.max_memory_allocated(device)} if device.type == "cuda" else {}),
    }
