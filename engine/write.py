"""The output folder: shards preallocated with their final headers, tensor bytes written in
place at planned offsets (no shard is ever held in memory), the index, the files copied from
the reference model, the model card and mbmerge.json; all in a temporary folder beside the
output, renamed into place only when complete. Knows nothing of the methods.
"""
import json
import os
import shutil
from pathlib import Path

import torch

from .errors import OutputExists
from .index import INDEX_FILE
from .plan import Plan, TensorPlan

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
NOT_COPIED = {INDEX_FILE, "README.md", "mbmerge.json", "pytorch_model.bin.index.json"}
TORCH_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty output folder unless overwriting."""
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise OutputExists(f"output {out} already exists and is not empty "
                           f"(pass --overwrite to replace it, or choose another --out)")


def temp_folder(out: Path) -> tuple[Path, list[Path]]:
    """A fresh temporary folder beside `out` (same file system, so the final rename is atomic),
    and the parent folders created for it (deepest last), for `discard`."""
    created = [p for p in reversed(out.absolute().parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.mbmerge-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp, created


def discard(tmp: Path, created: list[Path]) -> None:
    """Remove a failed merge's temporary folder and the parents made for it."""
    shutil.rmtree(tmp, ignore_errors=True)
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:
            break


class ShardWriter:
    """Preallocated output shards; tensors' chunks are written in place with pwrite."""

    def __init__(self, folder: Path, plan: Plan):
        self._fds = {}
        for shard in plan.shards:
            fd = os.open(folder / shard.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(fd, shard.size)
            os.pwrite(fd, shard.header, 0)
            self._fds[shard.name] = fd

    def write(self, t: TensorPlan, start: int, values: torch.Tensor) -> None:
        """Write `values` (t's output dtype, contiguous) as elements [start, ...) of tensor t."""
        if values.numel() == 0:
            return
        data = memoryview(values.view(torch.uint8).numpy())
        pos = t.out_offset + start * values.element_size()
        while data:
            n = os.pwrite(self._fds[t.shard], data, pos)
            data, pos = data[n:], pos + n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def write_index(folder: Path, plan: Plan) -> None:
    if not plan.sharded:
        return
    total = sum(t.out_nbytes for t in plan.tensors)
    weight_map = {t.name: t.shard for t in sorted(plan.tensors, key=lambda t: t.name)}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(src: Path, folder: Path, out_dtype: str | None) -> None:
    """config, tokenizer and generation config from the reference model; config's dtype updated."""
    for f in sorted(src.iterdir()):
        if f.name.startswith(".") or not f.is_file() or f.name in NOT_COPIED or f.suffix in WEIGHT_SUFFIXES:
            continue
        shutil.copyfile(f, folder / f.name)
    config = folder / "config.json"
    if out_dtype and config.is_file():
        cfg = json.loads(config.read_text())
        for key in [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]:
            cfg[key] = TORCH_DTYPE[out_dtype]
        config.write_text(json.dumps(cfg, indent=2) + "\n")


def write_card(folder: Path, record: dict) -> None:
    """mbmerge.json (machine-readable recipe and timing) and a README.md model card."""
    (folder / "mbmerge.json").write_text(json.dumps(record, indent=2) + "\n")
    inputs = [record["base"]] if record["base"] else []
    inputs += record["experts"]
    rows = "\n".join(f"| {s['role']} | `{s['ref']}` | {s['revision'] or 'local'} |" for s in inputs)
    params = "\n".join(f"- `{k}`: {v}" for k, v in record["params"].items())
    base_line = f"base_model: {record['base']['ref']}\n" if record["base"] and record["base"]["revision"] else ""
    (folder / "README.md").write_text(
        f"---\n{base_line}library_name: transformers\ntags:\n- merge\n- mbmerge\n---\n\n"
        f"# Merged model\n\nMerged with mbmerge {record['mbmerge_version']} using "
        f"**{record['method']}** in {record['wall_seconds']:.1f} s.\n\n"
        f"## Inputs\n\n| role | model | revision |\n|---|---|---|\n{rows}\n\n"
        f"## Parameters\n\n{params}\n\n"
        f"Output dtype: {record['dtype']}. Tensors kept from the base: "
        f"`{record['keep_base'] or 'none'}`.\n\nReproduce with:\n\n```\n{record['command']}\n```\n")


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished temporary folder to `out`, atomically replacing an old output."""
    check_output(out, overwrite)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.mbmerge-old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
