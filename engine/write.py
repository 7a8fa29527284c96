"""The output folder: shards preallocated with their final headers, tensor bytes written in
place at planned offsets (no shard is ever held in memory), the index, the files copied from
the reference model, the model card and mbmerge.json; all in a temporary folder beside the
output, renamed into place only when complete. Knows nothing of the methods.
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from ..common.errors import OutputBusy, OutputExists
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


def missing_parents(out: Path) -> list[Path]:
    """The folders above `out` that do not exist yet (outermost first), for `remove_empty`."""
    return [p for p in reversed(out.absolute().parents) if not p.exists()]


def remove_empty(created: list[Path]) -> None:
    """Remove the folders a failed merge created, innermost first, while they are empty."""
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:
            break


def partial_folder(out: Path) -> Path:
    """The hidden folder beside `out` where the merge is written: on the same file system, so the
    final rename is atomic, and with a fixed name, so a rerun finds an interrupted merge."""
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    return out.absolute().parent / f".{out.name}.mbmerge-partial"


@contextlib.contextmanager
def output_lock(out: Path):
    """Hold an exclusive lock on `out` for the whole merge: a second merge into it stops at once."""
    path = out.absolute().parent / f".{out.name}.mbmerge-lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise OutputBusy(f"output {out} is being written by another mbmerge (pid {holder}); "
                             f"wait for it or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            os.unlink(path)   # while still locked
    finally:
        os.close(fd)


def discard(tmp: Path, notice: bool = False) -> None:
    """Remove a partial output folder (saying so, with `notice`, if it held an interrupted merge)."""
    if tmp.exists():
        if notice:
            print(f"mbmerge: {tmp} holds an interrupted merge of other inputs or parameters "
                  f"(or --no-resume); starting over", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


class ShardWriter:
    """Output shards, preallocated (fresh) or reopened (resume); chunks are written in place with
    pwrite, in order within each tensor, and hashed on the way for the journal."""

    def __init__(self, folder: Path, plan: Plan, fresh: bool = True):
        self._fds, self._hashes = {}, {}
        for shard in plan.shards:
            if not fresh:
                self._fds[shard.name] = os.open(folder / shard.name, os.O_WRONLY)
                continue
            fd = os.open(folder / shard.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[shard.name] = fd
            _reserve(fd, shard.size, folder / shard.name)
            os.pwrite(fd, shard.header, 0)

    def write(self, t: TensorPlan, start: int, values: torch.Tensor) -> None:
        """Write `values` (t's output dtype, contiguous) as elements [start, ...) of tensor t."""
        if values.numel() == 0:
            return
        data = memoryview(values.view(torch.uint8).numpy())
        self._hashes.setdefault(t.name, hashlib.sha256()).update(data)
        pos = t.out_offset + start * values.element_size()
        while data:
            n = os.pwrite(self._fds[t.shard], data, pos)
            data, pos = data[n:], pos + n

    def sha256(self, t: TensorPlan) -> str:
        """The digest of the bytes written for tensor t (all of them, in order)."""
        return self._hashes.pop(t.name, hashlib.sha256()).hexdigest()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def _reserve(fd: int, size: int, path: Path) -> None:
    """Allocate the shard's blocks now, so a full disk fails here rather than mid-merge."""
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, size)   # a file system without fallocate: sparse, as before
    except OSError as e:
        raise OSError(e.errno, os.strerror(e.errno), str(path)) from None


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
