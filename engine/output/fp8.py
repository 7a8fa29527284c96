"""FP8 output (--out-quant fp8), and the output config's quantization_config. A written merge's matrices are
rewritten as FP8 e4m3 with a float32 `weight_scale_inv` per 128x128 block, computed as transformers'
FineGrainedFP8 writes them (integrations/finegrained_fp8.py Fp8Quantize: inv = 1 / (448 / amax), a zero
block's scale 1; q = clamp(x * 448 / amax) cast), so transformers reads the folder as the FP8 release
format. Like Fp8Quantize, it quantizes 2-D `.weight` tensors both of whose sides are multiples of 128; the
embeddings and the head stay (FP8Linear replaces nn.Linear, and transformers leaves the head out); the
matrices left as they are go into modules_to_not_convert. Streamed one band of 128 rows at a time, read
with plain reads (no map grows the resident set). Knows nothing of merging.
"""
import json
import os
from pathlib import Path

import torch

from ...common.roles import EMBEDDINGS, HEADS
from ..inputs.header import DTYPES, FLOAT_DTYPES, TensorEntry, encode_header, read_header
from ..inputs import side_files
from ..inputs.index import INDEX_FILE

BLOCK = 128
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max          # 448
CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK], "activation_scheme": "dynamic"}
COPY_BYTES = 16 << 20


def quantizable(e: TensorEntry, block: int = BLOCK) -> bool:
    """A matrix FP8Linear would hold, tiling into whole blocks (Fp8Quantize passes the others through)."""
    return (e.dtype in FLOAT_DTYPES and len(e.shape) == 2 and e.name.endswith(".weight")
            and e.name not in (*EMBEDDINGS, *HEADS) and e.shape[0] % block == 0 and e.shape[1] % block == 0)


def scale_name(name: str) -> str:
    return name + "_scale_inv"          # X.weight -> X.weight_scale_inv, as Fp8Quantize names it


def quantize_band(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [k * b, cols] float32 -> (FP8 e4m3 values [k * b, cols], weight_scale_inv [k, cols / b]), b = block."""
    rows, cols = x.shape
    tiles = x.reshape(rows // block, block, cols // block, block)          # [k, b, c, b]
    amax = tiles.abs().amax(dim=(-3, -1))                                  # [k, c]
    scales = FP8_MAX / torch.where(amax > 0, amax, torch.ones_like(amax))
    scales = torch.where(amax > 0, scales, torch.ones_like(scales))       # a zero block stays 0 with scale 1
    q = torch.clamp(tiles * scales[:, None, :, None], -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(rows, cols), (1.0 / scales).to(torch.float32)


def quantize_folder(folder: Path, shards: list[str], sharded: bool, block: int = BLOCK) -> dict:
    """Rewrite each shard of `folder` with its quantizable matrices in FP8 and their scales beside them
    (and the index, if `sharded`); the quantization_config the output's config takes. Blocks of
    block x block (the bench's small fixtures take 64)."""
    folder, kept, weight_map, total = Path(folder), [], {}, 0
    for shard in shards:
        entries, nbytes = _rewrite(folder / shard, block)
        total += nbytes
        for e in entries:
            weight_map.update({n: shard for n in [e.name] + [scale_name(e.name)] * quantizable(e, block)})
            if not quantizable(e, block) and e.name.endswith(".weight") and len(e.shape) >= 2:
                kept.append(e.name.removesuffix(".weight"))
    if sharded:
        index = json.loads((folder / INDEX_FILE).read_text())
        index.update(metadata={"total_size": total}, weight_map=dict(sorted(weight_map.items())))
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return {**CONFIG, "weight_block_size": [block, block], "modules_to_not_convert": sorted(kept)}


def _rewrite(path: Path, block: int) -> tuple[list[TensorEntry], int]:
    """One shard rewritten (a new file renamed over it): its entries as they were, and its tensor bytes now."""
    entries, meta = read_header(path)
    order = sorted(entries.values(), key=lambda e: e.offset)
    layout = []
    for e in order:
        q = quantizable(e, block)
        layout.append((e.name, "F8_E4M3" if q else e.dtype, e.shape))
        if q:
            layout.append((scale_name(e.name), "F32", (e.shape[0] // block, e.shape[1] // block)))
    header, _ = encode_header(layout, meta)
    tmp = path.with_name(path.name + ".fp8-partial")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(header)
        for e in order:
            _quantized(src, dst, e, block) if quantizable(e, block) else _copied(src, dst, e)
        nbytes = dst.tell() - len(header)
    os.replace(tmp, path)
    return order, nbytes


def _read(src, offset: int, n: int) -> bytearray:
    buf = bytearray(n)
    src.seek(offset)
    if src.readinto(buf) != n:
        raise OSError(f"{src.name}: short read at {offset}")
    return buf


def _quantized(src, dst, e: TensorEntry, block: int) -> None:
    rows, cols = e.shape
    band = block * cols * DTYPES[e.dtype].itemsize
    scales = []
    for k in range(rows // block):
        x = torch.frombuffer(_read(src, e.offset + k * band, band), dtype=e.torch_dtype).float()
        q, inv = quantize_band(x.view(block, cols), block)
        dst.write(q.view(torch.uint8).numpy().tobytes())
        scales.append(inv)
    dst.write(torch.cat(scales).numpy().tobytes())


def _copied(src, dst, e: TensorEntry) -> None:
    for a in range(0, e.nbytes, COPY_BYTES):
        dst.write(_read(src, e.offset + a, min(COPY_BYTES, e.nbytes - a)))


def set_quantization(folder: Path, config: dict | None) -> None:
    """The output config.json's quantization_config: `config`, or none (the inputs' dequantized)."""
    if config is None:
        side_files.drop_config(folder, "quantization_config")
    else:
        side_files.set_config(folder, "quantization_config", config)
