"""Collecting one expert's statistics: load the model (one at a time, never all experts), read and
tokenize its data, run the collector, write the statistics folder with a card, and cache it by
(kind, input files, data, parameters) so a merge with --data collects each expert once.

| kind   | collector          | model run              | tensors written                               |
|--------|--------------------|------------------------|-----------------------------------------------|
| fisher | fisher.fisher      | the expert, fwd + bwd  | F per parameter (embeddings excepted)         |
| gram   | gram.gram          | the expert, forward    | X^T X / tokens per linear weight, [in, in]    |
| mask   | mask.train_mask    | b + sigmoid(S) d       | 0/1 mask per parameter (embeddings excepted)  |
"""
import hashlib
import json
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..engine.device import resolve_device
from ..common.errors import BadParameter
from ..engine.inputs.index import TensorIndex
from ..engine.journal import input_identity
from ..engine.plan import parse_size
from ..engine.inputs.read import MappedModel
from ..engine.spec import VERSION
from ..engine.inputs.stats_folders import STATS_CARD
from ..common.cache import cache_dir
from ..common.quiet import quiet_transformers
from ..common.threads import model_threads, threads_for, torch_threads
from ..common.errors import MissingTensor
from ..common.roles import EMBEDDINGS_AND_HEAD
from ..methods import collection_params
from . import data as datasets
from .fisher import fisher
from .gram import gram
from .mask import MASK_TRAINING, MaskTraining, train_mask
from .writer import StatsWriter

KINDS = ("fisher", "gram", "mask")
BATCH = {"fisher": 1, "gram": 8, "mask": 8}  # fisher: one example per backward, the exact per-example Fisher
UNKEYED = ("memory_budget", "progress")      # options that change passes or output lines, not the statistics


@dataclass(frozen=True, kw_only=True)
class CollectOptions:
    """How statistics are collected, the same for every expert: how its data is read (a merge's
    data_options, `mbmerge stats`' data flags: split, data_format, max_length, seed, batch_size, and the
    model's dtype while collecting), where the model runs, the accumulators held at once, and whether
    progress lines are printed (the `options` of mbmerge.collect_statistics)."""
    split: str = "validation"
    data_format: str | None = None     # "PROMPT_FIELD,RESPONSE_FIELD" (default: detect the schema)
    max_length: int = 2048
    batch_size: int | None = None      # default: BATCH[kind]
    seed: int = 0
    dtype: str | None = None           # default: bfloat16 on a GPU, float32 on the CPU
    device: str = "auto"
    memory_budget: int | str = "4GB"
    progress: bool = True


def collect(kind: str, model: Path, data: str, out: Path, *, base: Path | None = None, params: dict | None = None,
            options: CollectOptions = CollectOptions(), overwrite: bool = False) -> Path:
    """Statistics of KIND for MODEL (a folder) on DATA into OUT; see the module table. params: the
    method's collection parameters (samples, fisher labels; mask: sparsity, sigmoid_bias, lr,
    epochs, l1); mask needs the BASE the model was fine-tuned from; options: how (CollectOptions).

    Example:
        collect("gram", Path("zoo/math"), "math", Path("grams/"), options=CollectOptions(device="cuda"))
    """
    from transformers import AutoModelForCausalLM
    if kind not in KINDS:
        raise BadParameter(f"unknown statistics kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "mask" and base is None:
        raise BadParameter("mask statistics train on b + sigmoid(S) d: give the base (--base)")
    for folder, role in [(model, "model"), (base, "base")]:   # checked headers before transformers reads them
        if folder is not None:
            TensorIndex.from_folder(Path(folder), role)
    p = {**{n: q.default for n, q in collection_params(kind).items()}, **(params or {})}
    dev, budget = resolve_device(str(options.device)), parse_size(options.memory_budget)
    torch_dtype = _torch_dtype(options.dtype, dev)
    writer = StatsWriter(out, overwrite)
    if options.progress:
        print(f"mbmerge stats: {kind} of {model} on {data} ({p['samples']} examples)", file=sys.stderr, flush=True)
    try:
        started = time.perf_counter()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        batches, record = _data(model, data, p["samples"], split=options.split, data_format=options.data_format,
                                seed=options.seed, max_length=options.max_length,
                                batch_size=options.batch_size or BATCH[kind])
        with quiet_transformers():  # loaded in the collecting dtype: a cast afterwards would hold both copies
            net = AutoModelForCausalLM.from_pretrained(base if kind == "mask" else model, torch_dtype=torch_dtype)
        net.to(dev).eval()
        names = [n for n, t in net.named_parameters()
                 if t.is_floating_point() and not re.search(EMBEDDINGS_AND_HEAD, n)]
        with model_threads(net):    # a small model's eager ops on one thread: no collapse beside a busy core
            if kind == "fisher":
                info = fisher(net, batches, names=names, labels=p["fisher"], seed=options.seed, budget=budget,
                              emit=writer)
            elif kind == "gram":
                info = gram(net, batches, budget=budget, emit=writer)
            else:
                base_t, expert_t = _tensors(base, "base"), _tensors(model, "expert")
                training = MaskTraining(**{k: p[k] for k in MASK_TRAINING})
                info = train_mask(net, base_t, expert_t, batches, names=names, training=training, emit=writer)
        card = {"kind": kind, "mbmerge_version": VERSION, "model": str(Path(model).resolve()),
                "base": str(Path(base).resolve()) if base else None, "data": record,
                "params": {k: p[k] for k in collection_params(kind)},
                "dtype": str(torch_dtype).removeprefix("torch."),
                "device": str(dev), "info": info, "seconds": round(time.perf_counter() - started, 3),
                "model_bytes": sum(t.numel() * t.element_size() for t in net.parameters()),
                "peak_rss_bytes": _peak_rss(),
                **({"peak_gpu_bytes": torch.cuda.max_memory_allocated(dev)} if dev.type == "cuda" else {}),
                "torch": torch.__version__}
        return writer.publish(card, overwrite)
    except BaseException:
        writer.discard()
        raise


def collect_cached(kind: str, model: Path, data: str, *, base: Path | None = None, params: dict | None = None,
                   progress: bool = True, **options) -> Path:
    """collect() into the cache (MBMERGE_CACHE/stats), or the folder a same-keyed call wrote before.
    options: CollectOptions' fields, keyed as given."""
    key = {"kind": kind, "version": VERSION, "data": data,
           "params": {k: (params or {}).get(k) for k in collection_params(kind)},
           "options": {k: str(v) for k, v in options.items() if k not in UNKEYED},
           "inputs": input_identity([TensorIndex.from_folder(Path(f)) for f in (model, base) if f is not None])}
    if content := _content(data):
        key["data_file"] = content
    out = cache_dir() / "stats" / f"{kind}-{Path(model).name}-{_digest(key)}"
    if (out / STATS_CARD).is_file():
        return out
    return collect(kind, model, data, out, base=base, params=params,
                   options=CollectOptions(progress=progress, **options), overwrite=True)


def _data(model: Path, data: str, samples: int, *, split: str, data_format: str | None, seed: int, max_length: int,
          batch_size: int):
    """(a callable giving fresh batch iterators of the model's tokens of DATA, what the card records of it)."""
    from transformers import AutoTokenizer
    template = datasets.default_template(data)
    examples = datasets.load_examples(data, split=split, n=samples, seed=seed, data_format=data_format)
    record = datasets.describe(data, examples, split=split, n=samples, seed=seed, data_format=data_format,
                               template=template, max_length=max_length)
    tok = AutoTokenizer.from_pretrained(model)
    seqs = datasets.tokenize(examples, tok, template=template, max_length=max_length)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return datasets.batches(seqs, batch_size, pad), record


def collect_plusplus_cached(base: Path, experts: list[Path], data: list[str], *, params: dict, progress: bool = True,
                            **options) -> list[Path]:
    """RegMean++ statistics (regmean_plusplus.py) of every expert at once, one folder each, cached by all
    the inputs, the data and the parameters (each expert's Grams depend on every other expert).
    options: CollectOptions' fields."""
    from .regmean_plusplus import ExpertData, collect_plusplus
    o = CollectOptions(progress=progress, **options)
    key = {"kind": "gram_plusplus", "version": VERSION, "data": list(data), "params": params,
           "options": {k: str(v) for k, v in asdict(o).items() if k not in UNKEYED},
           "inputs": input_identity([TensorIndex.from_folder(Path(f)) for f in (base, *experts)]),
           "data_files": [_content(d) for d in data]}
    digest = _digest(key)
    outs = [cache_dir() / "stats" / f"gram_plusplus-{Path(e).name}-{k}-{digest}" for k, e in enumerate(experts)]
    if all((o / STATS_CARD).is_file() for o in outs):
        return outs
    dev = resolve_device(str(o.device))
    torch_dtype = _torch_dtype(o.dtype, dev)
    data_of = [_data(e, d, params["samples"], split=o.split, data_format=o.data_format, seed=o.seed,
                     max_length=o.max_length, batch_size=o.batch_size or BATCH["gram"]) for e, d in zip(experts, data)]
    writers = [StatsWriter(o, overwrite=True) for o in outs]
    parameters = sum(e.numel for e in TensorIndex.from_folder(Path(base), "base").tensors.values())
    try:
        with torch_threads(threads_for(parameters)):
            runs = [ExpertData(folder=Path(e), batches=b, emit=w) for e, (b, _), w in zip(experts, data_of, writers)]
            info = collect_plusplus(Path(base), runs, reduction=params["reduction"], dtype=torch_dtype, device=dev,
                                    budget=parse_size(o.memory_budget), progress=o.progress)
        for e, (_, record), writer in zip(experts, data_of, writers):
            writer.publish({"kind": "gram_plusplus", "mbmerge_version": VERSION, "model": str(Path(e).resolve()),
                            "base": str(Path(base).resolve()), "data": record, "params": params,
                            "dtype": str(torch_dtype).removeprefix("torch."), "device": str(dev), "info": info,
                            "seconds": round(info["seconds"] / len(experts), 3),   # its share of the joint pass
                            "peak_rss_bytes": _peak_rss(), "torch": torch.__version__}, True)
    except BaseException:
        for writer in writers:
            writer.discard()
        raise
    return outs


def _torch_dtype(dtype: str | None, dev: torch.device) -> torch.dtype:
    """The collecting dtype: as asked, else bf16 on a GPU and float32 on the CPU."""
    return getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)


def _content(source: str) -> str | None:
    """sha256 of a data file's bytes (a changed file is another cache key); None for other sources."""
    return hashlib.sha256(Path(source).read_bytes()).hexdigest() if Path(source).is_file() else None


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tensors(folder: Path, role: str):
    """name -> float32 CPU tensor of a model folder, read through the engine's checked reader."""
    m = MappedModel(TensorIndex.from_folder(Path(folder), role))

    def get(name: str) -> torch.Tensor:
        if name not in m.index.tensors:
            raise MissingTensor(f"{folder}: no tensor {name}, a parameter of the model ({role})")
        e = m.index.tensors[name]
        return m.chunk(e, 0, e.numel).float().view(e.shape)
    return get


def _peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
