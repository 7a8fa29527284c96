"""merge(): resolve the inputs, check them, plan, run, and publish the output folder."""
import os
import time
from pathlib import Path

import torch

from .. import methods
from .errors import BadParameter, InputChanged
from .execute import Merger
from .index import INDEX_FILE, TensorIndex, check_agreement
from .plan import CPU_CHUNK, GPU_CHUNK, make_plan
from .read import MappedModel
from .resolve import Source, domain_names, resolve
from .spec import VERSION, MergeSpec
from .statistics import open_statistics, read_card
from .journal import JOURNAL, Journal, fingerprint, input_identity
from .verify import input_changes, sha256_files
from .write import (ShardWriter, check_output, copy_side_files, discard, missing_parents, output_lock,
                    partial_folder, publish, remove_empty, write_card, write_index)


def merge(method: str, *, experts, out, base: str | None = None, keep_base: str | None = None,
          dtype: str | None = None, memory_budget: int | str = "2GB", allow_nonfinite: bool = False,
          overwrite: bool = False, progress: bool = True, protocol: str | None = None, resume: bool = True,
          device: str = "auto", stats: list | None = None, data: list | None = None, data_options: dict | None = None,
          overrides: list | None = None, **params) -> Path:
    """Merge experts (and a base) into a new model folder, streaming tensor by tensor.

    Args:
        method: a registered method name ("linear", "task_arithmetic", "ties", ...).
        experts: model references: folders, hub ids, or MergeBench domains ("math", "code").
        out: the output folder (refused if it exists and is not empty, unless overwrite).
        base: the base model reference; with none and domain experts, the built-in family.
        keep_base: regex of tensor names copied from the base instead of merged ("" none; None the
            method's or protocol's default, e.g. embeddings for localize_stitch).
        dtype: output dtype of float tensors (default: the base's).
        memory_budget: upper bound of the working memory, e.g. "2GB".
        protocol: "mergebench" sets MergeBench's choices (model-wide ranks, embeddings kept at the
            base, TIES sum aggregation, DARE 1/p rescale); params given here win.
        resume: continue an interrupted merge into `out` of the same recipe and inputs (its
            journal and checksums are checked); False starts over.
        device: where the merge computes: "cpu", "cuda", "cuda:N", or "auto" (CUDA when present).
        stats: data-aware methods (fisher, regmean, localize_stitch_trained): one statistics folder per
            expert, as `mbmerge stats` writes them.
        data: or one data source per expert (a zoo domain, a JSON/JSONL file, a hub dataset) to collect
            them from, cached (default for domain experts: each one's own domain data).
        data_options: how to read the data: split, data_format, max_length, batch_size, seed, dtype.
        overrides: [(regex, {param: value}), ...]: for tensors whose name matches a regex (the first
            that does), these values replace `params`, e.g. per layer: [("[.]layers[.]3[.]", {"scale": 0})].
        params: method parameters, e.g. density=0.2, weights=[0.5, 0.5], scale=1.0.
    Returns:
        the output folder.
    Example:
        >>> mbmerge.merge("ties", base="google/gemma-2-2b", experts=["math", "code"], out="m/", density=0.2)
    """
    spec = MergeSpec(method, tuple(experts), Path(out), base, params, keep_base, dtype, memory_budget,
                     allow_nonfinite, overwrite, progress, protocol, resume, device,
                     tuple(stats) if stats else None, tuple(data) if data else None, data_options or {},
                     tuple(overrides or ()))
    return run(spec)


def default_family() -> Path:
    """The mini zoo's Llama family (MBMERGE_ZOO_SIZE: full, the default, or micro), trained once
    into the cache on first use."""
    from ..eval.zoo import build_zoo
    return build_zoo("llama", os.environ.get("MBMERGE_ZOO_SIZE", "full"))


def sources(spec: MergeSpec) -> tuple[Source | None, list[Source]]:
    names = domain_names(spec.experts)
    if spec.base is None and names is not None:
        family = default_family()  # no base and domain names: the mini zoo
        return (Source("built-in", family / "base", None, "base"),
                [Source(e, family / d, None, f"expert {e}") for e, d in zip(spec.experts, names)])
    base = resolve(spec.base, "base") if spec.base else None
    if base is None and methods.get(spec.method).needs_base:
        raise BadParameter(f"method {spec.method} needs a base model (--base)")
    return base, [resolve(e, f"expert {e}", spec.base) for e in spec.experts]


def statistics_folders(spec: MergeSpec, base: Source | None, experts: list[Source]) -> list[Path]:
    """Each expert's statistics folder: given (--stats), or collected from its data (--data; by
    default, for domain experts, its own domain)."""
    if spec.stats:
        return [Path(f) for f in spec.stats]
    data = spec.data or default_data(spec)
    if data is None:
        raise BadParameter(f"method {spec.method} needs each expert's {methods.get(spec.method).statistic.kind} "
                           f"statistics: --stats DIR,... (from `mbmerge stats`) or --data SOURCE,... to collect them")
    return collect_statistics(spec.method, [s.path for s in experts], data, base=base.path if base else None,
                              params=spec.resolved, device=spec.device, memory_budget=spec.memory_budget,
                              progress=spec.progress, **spec.data_options)


def collect_statistics(method: str, experts: list[Path], data: list[str], *, base: Path | None = None,
                       params: dict | None = None, progress: bool = True, **options) -> list[Path]:
    """The statistics a data-aware method needs of each expert folder, collected on its data source
    (paired by position) into the cache, or found there. options: device, split, data_format,
    max_length, batch_size, seed, dtype, memory_budget (see mbmerge.stats.collect)."""
    m = methods.get(method)
    if len(data) != len(experts):
        raise BadParameter(f"{len(data)} data source(s) for {len(experts)} experts; give one per expert")
    from ..stats.collect import collect_cached  # runs models: transformers is imported only here
    p = methods.resolve_params(m, len(experts), params or {})
    p = {k: v for k, v in p.items() if k in m.statistic.collect}
    return [collect_cached(m.statistic.kind, Path(e), src, base=base, progress=progress,
                           params={k: v[i] if isinstance(v, list) else v for k, v in p.items()}, **options)
            for i, (e, src) in enumerate(zip(experts, data))]


def default_data(spec: MergeSpec) -> tuple[str, ...] | None:
    """Domain experts' own data: the zoo's domain for the built-in family, MergeBench's `_val` set
    (MergeBench/<domain>_val) for a hub family."""
    names = domain_names(spec.experts)
    if names is None:
        return None
    return tuple(names) if spec.base is None else tuple(f"MergeBench/{d}_val" for d in names)


def run(spec: MergeSpec) -> Path:
    """Run a checked MergeSpec; see merge()."""
    started = time.perf_counter()
    check_output(spec.out, spec.overwrite)
    created = missing_parents(spec.out)
    try:
        with output_lock(spec.out):
            return _run_locked(spec, started)
    except BaseException:
        remove_empty(created)
        raise


def _run_locked(spec: MergeSpec, started: float) -> Path:
    method = methods.get(spec.method)
    base, experts = sources(spec)
    base_index = TensorIndex.from_folder(base.path, "base") if base else None
    indexes = [TensorIndex.from_folder(s.path, s.role) for s in experts]
    ref_index = base_index or indexes[0]
    check_agreement(ref_index, {s.role.removeprefix("expert "): ix for s, ix in zip(experts, indexes)},
                    "base" if base else f"expert {spec.experts[0]!r}")
    n_inputs = len(experts) + (1 if base and method.needs_base else 0)
    plan = make_plan(ref_index, n_inputs=n_inputs, budget=spec.memory_budget, out_dtype=spec.dtype,
                     keep_base=spec.keep_base, span=method.span,
                     preferred=GPU_CHUNK if spec.device.type == "cuda" else CPU_CHUNK)
    stat_indexes = (open_statistics(method, statistics_folders(spec, base, experts), [s.role for s in experts], plan)
                    if method.statistic else [])
    identity = input_identity([ix for ix in [base_index, *indexes, *stat_indexes] if ix is not None])
    fp = fingerprint(spec.recipe(), plan, identity)
    tmp = partial_folder(spec.out)
    resumed = Journal.resume(tmp, fp, plan) if spec.resume else None
    if resumed is None:
        discard(tmp, notice=True)
        tmp.mkdir()
    done, model_thr = resumed or (set(), None)
    maps = []
    try:
        base_map = MappedModel(base_index) if base_index else None
        expert_maps = [MappedModel(ix) for ix in indexes]
        stat_maps = [MappedModel(ix) for ix in stat_indexes]
        maps = [m for m in [base_map, *expert_maps, *stat_maps] if m is not None]
        writer, journal = ShardWriter(tmp, plan, fresh=resumed is None), Journal(tmp, fp, fresh=resumed is None)
        try:
            if spec.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(spec.device)
            Merger(plan, method, spec.resolved, base_map, expert_maps, [s.role for s in experts], writer,
                   spec.allow_nonfinite, spec.device, stat_maps, spec.resolved_overrides).run(
                spec.progress, journal, done, model_thr)
        finally:
            writer.close()
            journal.close()
        if changed := input_changes(identity):
            raise InputChanged(f"input {min(changed)} changed while it was being merged; nothing was written")
        (tmp / JOURNAL).unlink()
        write_index(tmp, plan)
        copy_side_files(ref_index.folder, tmp, spec.dtype)
        record = _record(spec, base, experts, plan, time.perf_counter() - started)
        if stat_indexes:
            record["statistics"] = [{"path": str(ix.folder.resolve()), **read_card(ix.folder)} for ix in stat_indexes]
        record.update(resumed_tensors=len(done), inputs=identity,
                      sha256=sha256_files(tmp, [s.name for s in plan.shards] + [INDEX_FILE] * plan.sharded))
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


def _record(spec: MergeSpec, base: Source | None, experts: list[Source], plan, seconds: float) -> dict:
    def source(s: Source) -> dict:
        return {"role": s.role, "ref": s.ref, "path": str(s.path.resolve()), "revision": s.revision}
    return {
        "mbmerge_version": VERSION, "method": spec.method, "protocol": spec.protocol, "params": spec.resolved,
        "base": source(base) if base else None, "experts": [source(s) for s in experts],
        "dtype": spec.dtype or "as stored", "keep_base": spec.keep_base,
        **({"overrides": spec.recipe()["overrides"]} if spec.overrides else {}),
        "tensors_merged": sum(t.merge for t in plan.tensors),
        "tensors_copied": sum(not t.merge for t in plan.tensors),
        "chunk_elements": plan.chunk_elems, "wall_seconds": round(seconds, 3), "device": str(spec.device),
        **({"peak_gpu_bytes": torch.cuda.max_memory_allocated(spec.device)} if spec.device.type == "cuda" else {}),
        "command": spec.command(),
    }
