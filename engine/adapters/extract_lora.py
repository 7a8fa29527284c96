"""A LoRA adapter out of (base, fine-tuned model), as mergekit-extract-lora makes one: per 2-D weight,
the delta D = W_ft - W_base cut to rank r by a truncated SVD, D ~ B A with A = sqrt(S) V^T and
B = U sqrt(S) (or A = S V^T, B = U without distribute_scale); embeddings and the head saved whole
(modules_to_save) unless embed_lora; 1-D weights (norms) saved whole unless skipped. One tensor at a
time: memory is the largest tensor's delta and its SVD. Written as a PEFT folder (adapter_config.json
with r = alpha = the largest rank, so each module's scale is 1, and adapter_model.safetensors) with
each tensor's relative reconstruction error ||D - B A||_F / ||D||_F in mbmerge.json.

A tensor whose delta is exactly zero (every element equal to the base's) is left out: no zero LoRA,
no whole copy (mergekit-extract-lora 0.1.5 writes a rank-r LoRA of zeros, and saves the embeddings
and head whole, changed or not). mbmerge.json lists it under "unchanged", and the config names
only modules that have weights in the file: a module's last part (q_proj) where every module ending
in it has them, else full names (PEFT matches a name to every module ending in it, and a matched
module with no weights gets a fresh LoRA or copy and a "missing adapter keys" warning). A model
whose 2-D weights all equal the base's is refused: PEFT loads no LoRA config that targets nothing.
"""
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ...common import VERSION
from ...common.errors import BadParameter, ShapeMismatch
from ...common.roles import EMBEDDINGS, VOCABULARY
from ..inputs.header import encode_header
from ..inputs.index import TensorIndex
from ..inputs.read import MappedModel
from ..inputs.side_files import is_tokenizer_file, side_files
from ..output.place import check_location, discard, output_lock, partial_folder, publish

PREFIX = "base_model.model."


@dataclass(frozen=True, kw_only=True)
class Options:
    max_rank: int = 128
    distribute_scale: bool = True
    embed_lora: bool = False
    modules_to_save: tuple[str, ...] = ()      # module names (or their last part) saved whole
    include: tuple[str, ...] = ()              # regexes: only these modules are extracted
    exclude: tuple[str, ...] = ()
    sv_epsilon: float = 0.0                    # singular values at or below it are dropped
    skip_undecomposable: bool = False          # 1-D weights: left out instead of saved whole
    progress: bool = True


@dataclass
class _Out:
    """The adapter file's tensors as they are computed: bytes go to a data file, the header comes last."""
    data: object
    entries: list = field(default_factory=list)

    def add(self, name: str, t: torch.Tensor, dtype: str) -> None:
        self.entries.append((name, dtype, tuple(t.shape)))
        dense = torch.empty(t.shape, dtype=t.dtype).copy_(t)      # row-major strides, even for a [n, 1] slice
        self.data.write(dense.view(torch.uint8).numpy().tobytes())


def extract_lora(base: Path, model: Path, out: Path, options: Options = Options(), overwrite: bool = False) -> Path:
    """Write the adapter folder `out`; returns it. BadParameter/ShapeMismatch in one line before anything
    is written when the models do not fit together."""
    check_location(out, overwrite)
    b_ix, m_ix = TensorIndex.from_folder(Path(base), "base"), TensorIndex.from_folder(Path(model), "model")
    for name, e in m_ix.tensors.items():
        if name not in b_ix.tensors:
            raise ShapeMismatch(f"model {model}: tensor {name} is not in base {base}")
        if name not in VOCABULARY and e.shape != b_ix.tensors[name].shape:
            raise ShapeMismatch(f"model {model}: tensor {name} {list(e.shape)} vs base "
                                f"{list(b_ix.tensors[name].shape)}")
    with output_lock(out):
        return _extract(Path(base), Path(model), Path(out), b_ix, m_ix, options, overwrite)


def _extract(base: Path, model: Path, out: Path, b_ix, m_ix, options: Options, overwrite: bool) -> Path:
    started, tmp = time.perf_counter(), partial_folder(out)
    discard(tmp)
    tmp.mkdir(parents=True)
    bm, mm = MappedModel(b_ix), MappedModel(m_ix)
    try:
        found = _Found()
        with open(tmp / "data.bin", "wb") as data:
            sink = _Out(data)
            for name, e in tqdm(list(m_ix.tensors.items()), desc="mbmerge extract-lora", disable=not options.progress):
                _add(name, e, b_ix.tensors[name], bm, mm, sink, found, options)
        _assemble(tmp, sink.entries)
        _config(tmp, base, found, {_module(n) for n in m_ix.tensors})
        (tmp / "mbmerge.json").write_text(json.dumps({
            "mbmerge_version": VERSION, "method": "extract-lora", "base": str(Path(base).resolve()),
            "model": str(Path(model).resolve()),
            "options": {k: v for k, v in options.__dict__.items() if k != "progress"},
            "ranks": found.ranks, "relative_error": found.errors,
            "saved_whole": sorted({m.split(".")[-1] for m in found.saved}), "unchanged": sorted(found.unchanged),
            "wall_seconds": round(time.perf_counter() - started, 3)}, indent=2) + "\n")
        for f in side_files(model):          # the fine-tune's tokenizer, as a merge copies one
            if is_tokenizer_file(f.name):
                shutil.copyfile(f, tmp / f.name)
        publish(tmp, Path(out), overwrite)
    except BaseException:
        discard(tmp)
        raise
    finally:
        bm.close()
        mm.close()
    return Path(out)


@dataclass(kw_only=True)
class _Found:
    """What the tensors became: LoRA ranks and errors, modules saved whole, tensors left out as unchanged."""
    ranks: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    saved: set = field(default_factory=set)
    unchanged: list = field(default_factory=list)


def _module(name: str) -> str:
    return name.removesuffix(".weight")


def _add(name: str, e, b, bm: MappedModel, mm: MappedModel, sink: _Out, found: _Found, options: Options) -> None:
    """One tensor into the adapter as _what plans it, unless its delta is exactly zero."""
    what = _what(name, e, b, options)
    if what == "skip":
        return
    x = mm.chunk(e, 0, e.numel).view(e.shape)
    y = bm.chunk(b, 0, b.numel).view(b.shape) if e.shape == b.shape else None
    if y is not None and _equal(x, y):
        found.unchanged.append(name)
    elif what == "whole":
        sink.add(PREFIX + name, x, e.dtype)
        found.saved.add(_module(name))
    else:
        delta = x.float() - y.float()
        embedding = name in EMBEDDINGS
        lora_a, lora_b = _factors(delta.T if embedding else delta, options)
        lora_a, lora_b = lora_a.to(e.torch_dtype), lora_b.to(e.torch_dtype)
        found.errors[name] = _relative_error(delta.T if embedding else delta, lora_b.float() @ lora_a.float())
        found.ranks[_module(name)] = lora_a.shape[0]
        names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        sink.add(f"{PREFIX}{_module(name)}.{names[0]}", lora_a, e.dtype)
        sink.add(f"{PREFIX}{_module(name)}.{names[1]}", lora_b, e.dtype)
    mm.release(e, 0, e.numel)
    if y is not None:
        bm.release(b, 0, b.numel)


def _equal(x: torch.Tensor, y: torch.Tensor, block: int = 1 << 22) -> bool:
    """Whether x - y is exactly zero everywhere (float32 blocks of 4M elements: an embedding is never
    widened whole; NaN never equals)."""
    xs, ys = x.reshape(-1).split(block), y.reshape(-1).split(block)
    return all(torch.equal(a.float(), b.float()) for a, b in zip(xs, ys))


def _what(name: str, e, b, options: Options) -> str:
    """'lora', 'whole' or 'skip' for one tensor, as mergekit-extract-lora plans it."""
    module = _module(name)
    short = module.split(".")[-1]
    if module in options.modules_to_save or short in options.modules_to_save:
        return "whole"
    if name in VOCABULARY and (not options.embed_lora or e.shape != b.shape):
        return "whole"                                  # a resized vocabulary has no delta to decompose
    if options.include and not any(re.search(r, module) for r in options.include):
        return "skip"
    if any(re.search(r, module) for r in options.exclude):
        return "skip"
    if len(e.shape) != 2 or not name.endswith(".weight"):
        return "skip" if options.skip_undecomposable else "whole"
    return "lora"


def _factors(delta: torch.Tensor, options: Options) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, in] and B [out, r] with B A the best rank-r approximation of delta (truncated SVD)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    rank = min(options.max_rank, s.shape[0])
    if options.sv_epsilon > 0:
        rank = max(1, min(rank, int((s > options.sv_epsilon).sum())))
    s = s[:rank]
    if options.distribute_scale:
        root = s.sqrt()
        return root[:, None] * vh[:rank], u[:, :rank] * root
    return s[:, None] * vh[:rank], u[:, :rank].clone()


def _relative_error(delta: torch.Tensor, approx: torch.Tensor) -> float:
    norm = float(delta.norm())
    return float((delta - approx).norm()) / norm if norm > 0 else 0.0


def _assemble(folder: Path, entries: list) -> None:
    """adapter_model.safetensors: the header, then the data file's bytes (streamed, not held)."""
    prefix, _ = encode_header(entries, {"format": "pt"})
    with open(folder / "adapter_model.safetensors", "wb") as f, open(folder / "data.bin", "rb") as data:
        f.write(prefix)
        shutil.copyfileobj(data, f, 16 << 20)
    os.unlink(folder / "data.bin")


def _config(folder: Path, base: Path, found: _Found, modules: set[str]) -> None:
    """adapter_config.json: r = lora_alpha = the largest rank; modules of another rank get it (and the
    same alpha, so every scale is 1) in rank_pattern and alpha_pattern, as mergekit writes them;
    target_modules and modules_to_save name exactly the modules with weights in the file (_peft_names)."""
    ranks = found.ranks
    if not ranks and not found.saved:
        raise BadParameter("nothing to extract: every tensor was excluded or equals the base's")
    if not ranks:   # PEFT refuses a LoRA config that targets no module
        saved = sorted(found.saved)
        shown = ", ".join(saved[:3]) + (f" and {len(saved) - 3} more" if len(saved) > 3 else "")
        raise BadParameter(f"no LoRA to extract: every 2-D weight was excluded or equals the base's, and PEFT loads "
                           f"no adapter without one (changed: {shown})")
    r = max(ranks.values(), default=1)
    other = {m: k for m, k in ranks.items() if k != r}
    config = {"base_model_name_or_path": str(base), "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r,
              "lora_alpha": r, "use_rslora": False, "target_modules": _peft_names(set(ranks), modules),
              "modules_to_save": _peft_names(found.saved, modules) or None, "rank_pattern": other,
              "alpha_pattern": other,
              "lora_dropout": 0.0, "fan_in_fan_out": False, "bias": "none", "inference_mode": True}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _peft_names(chosen: set[str], modules: set[str]) -> list[str]:
    """Names PEFT matches to exactly the `chosen` modules (it takes every module whose name ends in one):
    a module's last part, as mergekit names them, where every module ending in it is chosen, else its
    full name."""
    short = {m: m.split(".")[-1] for m in chosen}
    whole = {s for s in set(short.values()) if all(m in chosen for m in modules if m.endswith(s))}
    return sorted({s if s in whole else m for m, s in short.items()})
