"""Quantized checkpoints as merge inputs: which tensors of a model folder are quantized and how (its
config.json's quantization_config), the index the merge reads instead (each quantized tensor as one float32
tensor under the name transformers loads it by, its scales gone), and the reader that dequantizes the
chunks asked for (engine/inputs/dequantize.py), never a whole model. Layouts, as transformers reads them:

    fp8                FP8 e4m3/e5m2 `X` with `X_scale_inv` per weight_block_size block, or one per tensor
                       (integrations/finegrained_fp8.py; DeepSeek-V3, Qwen3-*-FP8)
    mxfp4              gpt-oss experts: `X_blocks` uint8 [E, rows, G, 16], `X_scales` e8m0 [E, rows, G] -> X
                       [E, G * 32, rows] (integrations/mxfp4.py)
    compressed-tensors float-quantized FP8 `X.weight` with `X.weight_scale`, per tensor, channel or block
                       (integrations/compressed_tensors.py: quant.float() * scale.float())

Anything else is refused in one line. Knows nothing of methods or of the output.
"""
import contextlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ...common.errors import BadModel
from .dequantize import Blocks, block_rows, mxfp4_range, mxfp4_shape
from .header import TensorEntry
from .index import TensorIndex, _where
from .read import MappedModel

F8 = ("F8_E4M3", "F8_E5M2")
SCALE_DTYPES = ("F32", "BF16", "F16", "U8")
ACTIVATION_SCALES = (".input_scale", ".activation_scale")   # static activation schemes: not weights
READ = "mbmerge reads fp8 (block or per-tensor scales), mxfp4 and compressed-tensors float-quantized FP8"


@dataclass(frozen=True, kw_only=True)
class Quantized:
    """One quantized tensor: `q` as stored, its `scale`, and the float32 tensor it stands for."""
    name: str
    q: TensorEntry
    scale: TensorEntry
    shape: tuple[int, ...]
    blocks: Blocks | None          # fp8 and compressed-tensors; None: mxfp4

    @property
    def entry(self) -> TensorEntry:
        """The dequantized tensor as the merge indexes it: float32, at the stored values' place."""
        return replace(self.q, name=self.name, dtype="F32", shape=self.shape, nbytes=4 * math.prod(self.shape))


@dataclass(frozen=True, kw_only=True)
class Quantization:
    """A model folder's quantized tensors, read from its quantization_config."""
    method: str
    tensors: dict[str, Quantized]
    dropped: tuple[str, ...]       # static activation scales: not weights, not merge inputs

    def view(self, index: TensorIndex) -> TensorIndex:
        """The index as the merge reads it: each quantized tensor one float32 entry, no scales."""
        gone = {n for t in self.tensors.values() for n in (t.q.name, t.scale.name)} | set(self.dropped)
        tensors = {n: e for n, e in index.tensors.items() if n not in gone}
        return replace(index, tensors={**tensors, **{n: t.entry for n, t in self.tensors.items()}})

    def note(self, role: str) -> str:
        kinds = sorted({"mxfp4" if t.blocks is None else f"{t.q.dtype} blocks {list(t.blocks.block)}"
                        for t in self.tensors.values()})
        return (f"{role} is quantized ({self.method}: {', '.join(kinds)}): {len(self.tensors)} tensor(s) "
                f"dequantized to float32 chunk by chunk, as transformers reads them")


def read_quantization(folder: Path, index: TensorIndex, role: str) -> Quantization | None:
    """The quantized tensors of a model folder (None when its config has no quantization_config and it
    stores no FP8); BadModel in one line naming the folder, the tensor and what mbmerge reads otherwise."""
    where = _where(role, Path(folder))
    config = _quantization_config(Path(folder), where)
    if config is None:
        if f8 := next((e for e in index.tensors.values() if e.dtype in F8), None):
            raise BadModel(f"{where}: tensor {f8.name} ({f8.file.name}) is {f8.dtype} but config.json has no "
                           f"quantization_config saying how it is scaled ({READ})")
        return None
    method = config.get("quant_method")
    if method == "fp8":
        tensors = _fp8(index, where, _block_size(config, where), "_scale_inv")
    elif method == "mxfp4":
        tensors = _mxfp4(index, where)
    elif method == "compressed-tensors":
        _check_float_quantized(config, index, where)
        tensors = _fp8(index, where, None, "_scale")
    else:
        raise BadModel(f"{where}: config.json's quantization_config has quant_method {method!r}, which mbmerge "
                       f"cannot dequantize ({READ}); merge a bf16/fp16 copy of it")
    dropped = tuple(n for n in index.tensors if n.endswith(ACTIVATION_SCALES))
    return Quantization(method=method, tensors=tensors, dropped=dropped)


def _quantization_config(folder: Path, where: str) -> dict | None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None                               # side_files.check refuses a broken config
    q = config.get("quantization_config") if isinstance(config, dict) else None
    if q is not None and not isinstance(q, dict):
        raise BadModel(f"{where}: config.json's quantization_config is not an object")
    return q


def _block_size(config: dict, where: str) -> tuple[int, int] | None:
    block = config.get("weight_block_size")
    if block is None:
        return None                                # one scale per tensor
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
        raise BadModel(f"{where}: quantization_config's weight_block_size {block!r} is not two positive integers")
    return tuple(block)


def _check_float_quantized(config: dict, index: TensorIndex, where: str) -> None:
    """compressed-tensors: only FP8 weights in the float-quantized format, symmetric (no zero point)."""
    if zero := next((n for n in index.tensors if n.endswith("_zero_point")), None):
        raise BadModel(f"{where}: tensor {zero}: asymmetric compressed-tensors weights are not read ({READ})")
    formats = {config.get("format")} | {g.get("format") for g in (config.get("config_groups") or {}).values()
                                        if isinstance(g, dict) and g.get("format")}
    formats.discard(None)
    if formats != {"float-quantized"}:
        other = sorted(map(str, formats - {"float-quantized"})) or ["unknown (none named)"]
        raise BadModel(f"{where}: compressed-tensors format {', '.join(other)} is not read ({READ}); merge a "
                       f"bf16/fp16 copy of it")


def _fp8(index: TensorIndex, where: str, block: tuple[int, int] | None, suffix: str) -> dict[str, Quantized]:
    """Every FP8 tensor X with its scale X<suffix> ('_scale_inv': fp8's, '_scale': compressed-tensors')."""
    out = {}
    for name, q in index.tensors.items():
        scaled = index.tensors.get(name.removesuffix(suffix)) if name.endswith(suffix) else None
        if scaled is not None and scaled.dtype not in F8:
            raise BadModel(f"{where}: tensor {name} ({q.file.name}) scales {scaled.name}, which is {scaled.dtype}, "
                           f"not FP8")
        if q.dtype not in F8:
            continue
        scale = index.tensors.get(name + suffix)
        if scale is None:
            raise BadModel(f"{where}: FP8 tensor {name} ({q.file.name}) has no scale tensor {name + suffix}: "
                           f"the checkpoint is incomplete")
        out[name] = Quantized(name=name, q=q, scale=scale, shape=q.shape,
                              blocks=_fp8_blocks(q, scale, block, where))
    return out


def _fp8_blocks(q: TensorEntry, scale: TensorEntry, block: tuple[int, int] | None, where: str) -> Blocks:
    """The block layout of an FP8 tensor, checked against its scale's shape. Without a weight_block_size
    the grid gives it (one scale, or one per row: per-tensor and per-channel scales)."""
    if len(q.shape) < 2 or scale.dtype not in SCALE_DTYPES:
        raise BadModel(f"{where}: FP8 tensor {q.name} {list(q.shape)} with scale {scale.dtype}: mbmerge reads "
                       f"FP8 matrices (2-D or more) with float or e8m0 scales")
    *lead, rows, cols = q.shape
    if block is None:
        grid = scale.shape[-2:] if len(scale.shape) >= 2 else (1, 1)
        block = (rows // grid[0] if grid[0] and rows % grid[0] == 0 else 0,
                 cols // grid[1] if grid[1] and cols % grid[1] == 0 else 0)
    layout = Blocks(shape=q.shape, block=block) if min(block) > 0 else None
    per_tensor = scale.numel == 1 and not lead and layout is not None and layout.grid == (1, 1)
    if layout is None or (tuple(scale.shape) != layout.grid and not per_tensor):
        raise BadModel(f"{where}: scale {scale.name} {list(scale.shape)} ({scale.file.name}) does not fit FP8 "
                       f"tensor {q.name} {list(q.shape)}" + (f" in blocks of {list(block)}" if min(block) > 0 else ""))
    for dim, b in ((rows, block[0]), (cols, block[1])):
        if dim > b and dim % b:      # transformers' loaders read such a tensor two ways: refuse it
            raise BadModel(f"{where}: FP8 tensor {q.name} {list(q.shape)} ({q.file.name}): block size "
                           f"{list(block)} does not divide it, and transformers' readers disagree on such a tensor")
    return layout


def _mxfp4(index: TensorIndex, where: str) -> dict[str, Quantized]:
    """Every X_blocks (uint8 [E, rows, G, 16]) with its X_scales (uint8 [E, rows, G]) as X."""
    out = {}
    for name, q in index.tensors.items():
        if not name.endswith("_blocks"):
            continue
        target = name.removesuffix("_blocks")
        scale = index.tensors.get(target + "_scales")
        if scale is None:
            raise BadModel(f"{where}: MXFP4 tensor {name} ({q.file.name}) has no scale tensor {target}_scales: "
                           f"the checkpoint is incomplete")
        if q.dtype != "U8" or scale.dtype != "U8" or len(q.shape) != 4 or q.shape[3] != 16 \
                or tuple(scale.shape) != q.shape[:3]:
            raise BadModel(f"{where}: MXFP4 tensor {name} {q.dtype}{list(q.shape)} with {scale.name} "
                           f"{scale.dtype}{list(scale.shape)}: expected uint8 [E, rows, G, 16] and [E, rows, G]")
        out[target] = Quantized(name=target, q=q, scale=scale, shape=mxfp4_shape(q.shape), blocks=None)
    return out


@contextlib.contextmanager
def _one_thread():
    """Dequantization on the reading thread's one core: an OpenMP team of 2 waits for its slowest thread, and
    beside one busy process FP8 chunks of 2^21 elements went from 199 to 54 M elements/s (2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class QuantizedModel(MappedModel):
    """A MappedModel of a quantized folder: its quantized tensors read as float32 chunks (their entries
    say F32), dequantized from the stored values and scales of the elements asked for."""

    def __init__(self, stored: TensorIndex, quantization: Quantization, index: TensorIndex):
        super().__init__(stored)
        self.parts = {(t.q.file, t.q.offset): t for t in quantization.tensors.values()}
        self.index = index             # quantization.view(stored), as the merge reads it (tied heads reconciled)

    def _part(self, entry: TensorEntry) -> Quantized | None:
        t = self.parts.get((entry.file, entry.offset))
        return t if t is not None and entry.dtype == "F32" and entry.nbytes == t.entry.nbytes else None

    def chunk(self, entry: TensorEntry, start: int, stop: int) -> torch.Tensor:
        t = self._part(entry)
        if t is None or stop <= start:
            return super().chunk(entry, start, stop)
        scales = super().chunk(t.scale, 0, t.scale.numel)
        with _one_thread():
            if t.blocks is not None:       # FP8 values map one to one onto the elements: the chunk's whole rows
                cols = t.shape[-1]
                first, end = start // cols, min(-(-stop // cols) * cols, t.entry.numel)
                rows = block_rows(super().chunk(t.q, first * cols, end), scales, t.blocks, first)
                return rows[start - first * cols: stop - first * cols]
            blocks = super().chunk(t.q, 0, t.q.numel).view(t.q.shape)
            return mxfp4_range(blocks, scales.view(t.scale.shape), start, stop)

    def release(self, entry: TensorEntry, start: int, stop: int) -> None:
        t = self._part(entry)
        if t is None:
            return super().release(entry, start, stop)
        if t.blocks is not None:
            super().release(t.q, start, stop)
        else:                          # an expert's columns read all its rows: release whole experts
            per_e, per_e_bytes = t.entry.numel // t.shape[0], t.q.numel // t.shape[0]
            lo = start // per_e * per_e_bytes
            hi = t.q.numel if stop == t.entry.numel else stop // per_e * per_e_bytes
            if hi > lo:
                super().release(t.q, lo, hi)
        if stop == t.entry.numel:
            super().release(t.scale, 0, t.scale.numel)

    def prefetch(self, entry: TensorEntry, *args) -> None:
        t = self._part(entry)
        super().prefetch(t.q if t is not None else entry, *args)


def open_model(folder: Path, role: str) -> MappedModel:
    """A model folder's reader as a collector reads it (the MoE routers, RegMean++'s Grams): its tensors as
    stored, a quantized folder's read dequantized."""
    index = TensorIndex.from_folder(Path(folder), role)
    quantization = read_quantization(folder, index, role)
    return QuantizedModel(index, quantization, quantization.view(index)) if quantization else MappedModel(index)
