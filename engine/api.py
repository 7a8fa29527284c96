"""run(spec): resolve the inputs, check them, plan, merge, and publish the output folder. Knows no
workloads (the mini zoo) and collects no data statistics: those come as folders."""
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from .. import kernels, methods
from ..common.errors import BadParameter, InputChanged
from ..common.names import domain_names
from . import chat_template, side_files
from .execute import Merger
from .index import INDEX_FILE, TensorIndex, check_agreement
from .journal import JOURNAL, Journal, fingerprint, input_identity
from .output import (check_apart, check_location, discard, missing_parents, output_lock, partial_folder, publish,
                     remove_empty)
from .plan import COMPILED_CHUNK, CPU_CHUNK, GPU_CHUNK, make_plan
from .read import MappedModel
from .recipe import tensor_overrides
from .resolve import Source, resolve
from .spec import VERSION, MergeSpec, spec_from
from .stats_folders import open_statistics, read_card
from .tied import reconcile
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
    return base, [resolve(e, f"expert {e}", spec.base) for e in spec.experts]


def run(spec: MergeSpec) -> Path:
    """Run a checked MergeSpec; see merge(). The output's place is checked before any input is read."""
    started = time.perf_counter()
    check_location(spec.out, spec.overwrite)
    base, experts = sources(spec)
    folders = [(s.role, s.path) for s in ([base] if base else []) + experts]
    folders += [(f"statistics of {s.role}", Path(f)) for s, f in zip(experts, spec.stats_folders or ())]
    check_apart(spec.out, folders + [(role, f) for role, folder in folders for f in _files(folder)])
    _warn_repeated(folders)
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


def _warn_repeated(folders: list[tuple[str, Path]]) -> None:
    """One warning line when a model is given twice (an expert twice, or the base as an expert)."""
    seen = {}
    for role, folder in folders:
        real = Path(folder).resolve()
        if real in seen:
            print(f"mbmerge: warning: {role} is the same model as {seen[real]} ({folder}); it is merged twice",
                  file=sys.stderr)
        seen.setdefault(real, role)


def _run_locked(spec: MergeSpec, base: Source | None, experts: list[Source], started: float) -> Path:
    method = methods.get(spec.method)
    base_index = TensorIndex.from_folder(base.path, "base") if base else None
    indexes = [TensorIndex.from_folder(s.path, s.role) for s in experts]
    indexes, tied = reconcile(base_index or indexes[0], [(s.role, ix) for s, ix in zip(experts, indexes)])
    ref_index = base_index or indexes[0]
    side_files.check(ref_index.folder, "base" if base else experts[0].role)
    template = _chat_template(spec, base, experts, ref_index.folder)        # its errors before any work
    check_agreement(ref_index, {s.role.removeprefix("expert "): ix for s, ix in zip(experts, indexes)},
                    "base" if base else f"expert {spec.experts[0]!r}")
    n_inputs = len(experts) + (1 if base and method.needs_base else 0)
    plan = make_plan(ref_index, n_inputs=n_inputs, budget=spec.memory_budget, out_dtype=spec.dtype,
                     keep_base=spec.keep_base, span=method.span, shard_size=spec.out_shard_size,
                     preferred=_chunk_size(method, spec.device))
    if spec.layered:          # the recipe's gradients and filters, per tensor, after the user's own overrides
        spec = replace(spec, layered=None, overrides=spec.overrides + tuple(
            tensor_overrides(spec.method, spec.layered, [t.name for t in plan.tensors if t.merge])))
    stat_indexes = (open_statistics(method, _stats_folders(spec), [s.role for s in experts], plan)
                    if method.data_statistic else [])
    identity = input_identity([ix for ix in [base_index, *indexes, *stat_indexes] if ix is not None])
    fp = fingerprint(spec.recipe(), plan, identity)
    tmp = partial_folder(spec.out)
    resumed = Journal.resume(tmp, fp, plan) if spec.resume else None
    if resumed is None:
        discard(tmp, notice=True)
        tmp.mkdir()
    elif spec.progress:
        print(f"mbmerge: resuming the interrupted merge into {spec.out}: {len(resumed[0])} of {len(plan.tensors)} "
              f"tensors are written and check out, merging the rest", file=sys.stderr)
    done, model_thr, ties, prefixes = resumed or (set(), None, {}, None)
    maps = []
    try:
        base_map = MappedModel(base_index) if base_index else None
        expert_maps = [MappedModel(ix) for ix in indexes]
        stat_maps = [MappedModel(ix) for ix in stat_indexes]
        maps = [m for m in [base_map, *expert_maps, *stat_maps] if m is not None]
        writer, journal = ShardWriter(tmp, plan, prefixes), Journal(tmp, fp, fresh=resumed is None)
        try:
            if spec.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(spec.device)
            merger = Merger(plan=plan, method=method, params=spec.resolved, base=base_map, experts=expert_maps,
                            roles=[s.role for s in experts], writer=writer, allow_nonfinite=spec.allow_nonfinite,
                            device=spec.device, stat_inputs=stat_maps, overrides=spec.resolved_overrides)
            merger.run(spec.progress, journal, done, model_thr, ties)
        finally:
            writer.close()
            journal.close()
        if changed := input_changes(identity):
            raise InputChanged(f"input {min(changed)} changed while it was being merged; nothing was written")
        (tmp / JOURNAL).unlink()
        write_index(tmp, plan)
        copied = side_files.copy(ref_index.folder, tmp, spec.dtype, tokenizer=spec.copy_tokenizer)
        if template and template[0]:
            chat_template.write(tmp, template[0])
        record = _record(spec, base, experts, plan, time.perf_counter() - started)
        record["chat_template"] = template[1] if template else None
        record["tied_heads"] = tied            # what was merged as a head, or left out, and why
        if stat_indexes:
            record["statistics"] = [{"path": str(ix.folder.resolve()), **read_card(ix.folder)} for ix in stat_indexes]
        digests = {s.name: writer.sha256(s.name) for s in plan.shards}   # taken while writing
        record.update(resumed_tensors=len(done), inputs=identity,
                      sha256={**digests, **sha256_files(tmp, [INDEX_FILE] * plan.sharded + copied)})
        write_card(tmp, record)
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


def _chunk_size(method, device) -> int:
    """Elements per chunk: a GPU's, the compiled CPU loops' (they hold no float32 copies), or the
    torch methods' (whose float32 temporaries fit in the cache)."""
    if device.type == "cuda":
        return GPU_CHUNK
    return COMPILED_CHUNK if method.fused is not None and kernels.compiled(device) else CPU_CHUNK


def _chat_template(spec: MergeSpec, base: Source | None, experts: list[Source], ref: Path) -> tuple | None:
    """(the output's chat template or None, where it came from) where spec asks for one, else None."""
    if spec.chat_template is None:
        return None
    if not spec.copy_tokenizer or not (ref / chat_template.CONFIG).is_file():
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
    return {
        "mbmerge_version": VERSION, "method": spec.method, "protocol": spec.protocol, "params": spec.resolved,
        "base": source(base) if base else None, "experts": [source(s) for s in experts],
        "dtype": spec.dtype or "as stored", "keep_base": spec.keep_base, "out_shard_size": spec.out_shard_size,
        "copy_tokenizer": spec.copy_tokenizer, "shards": len(plan.shards),
        **({"overrides": spec.recipe()["overrides"]} if spec.overrides else {}),
        "tensors_merged": sum(t.merge for t in plan.tensors),
        "tensors_copied": sum(not t.merge for t in plan.tensors),
        "chunk_elements": plan.chunk_elems, "wall_seconds": round(seconds, 3), "device": str(spec.device),
        **({"peak_gpu_bytes": torch.cuda.max_memory_allocated(spec.device)} if spec.device.type == "cuda" else {}),
        "command": spec.command(),
    }
