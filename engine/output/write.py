"""The output folder's contents: shards preallocated with their final headers, tensor bytes written
in place at planned offsets (no shard is ever held in memory), the index, the files copied from
the reference model, the model card and mbmerge.json; all in a temporary folder beside the output
(output.py places it and publishes it when complete). Knows nothing of the methods.
"""
import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

from ..inputs.index import INDEX_FILE
from ..plan import Plan, TensorPlan
from .direct import Appender, pwrite_all
from .verify import file_sha256


class ShardWriter:
    """Output shards, preallocated (fresh) or reopened where an interrupted merge stopped; chunks are
    written in place. Tensors come in plan order, which is file order, so each shard's sha256 is taken
    on the way, in one pass: the journal records its prefix after each tensor, and mbmerge.json the
    whole file's (a shard not written in order is read back instead). Bytes in file order go through
    one Appender (direct writes past the page cache, on its own thread) for the shard being written; others,
    pwrite."""

    def __init__(self, folder: Path, plan: Plan, resumed: dict | None = None):
        """resumed: {shard: (sha256 of its verified prefix, where the prefix ends)} (Journal.resume)."""
        self.folder, self._fds, self._state, self._open = folder, {}, {}, None
        self._size = {shard.name: shard.size for shard in plan.shards}
        for shard in plan.shards:
            if resumed is not None:
                self._fds[shard.name] = os.open(folder / shard.name, os.O_RDWR)
                digest, end = resumed[shard.name]
                self._state[shard.name] = [digest.copy(), end]
                continue
            fd = os.open(folder / shard.name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[shard.name] = fd
            _reserve(fd, shard.size, folder / shard.name)
            pwrite_all(fd, memoryview(shard.header), 0, folder / shard.name)
            self._state[shard.name] = [hashlib.sha256(shard.header), len(shard.header)]

    def write(self, t: TensorPlan, start: int, values: torch.Tensor) -> None:
        """Write `values` (t's output dtype, contiguous) as elements [start, ...) of tensor t."""
        if values.numel() == 0:
            return
        data = memoryview(values.reshape(-1).view(torch.uint8).numpy())
        pos = t.out_offset + start * values.element_size()
        state = self._state[t.shard]
        if state is not None and state[1] == pos:
            state[0].update(data)
            state[1] += len(data)
            return self._appender(t.shard, pos).append(data)
        self._state[t.shard] = None           # out of file order: digested by reading it back
        if self._appending(t.shard):
            self._close_appender()
        pwrite_all(self._fds[t.shard], data, pos, self.folder / t.shard)

    def when_written(self, t: TensorPlan, fn: Callable[[str | None], None]) -> None:
        """fn(sha256 of t's shard from its start through tensor t, None if not written in order) once the
        bytes it digests are in the file (the journal records it): at once, or on the open appender's disk
        thread after its writes (one thread calls fn, in order)."""
        state = self._state[t.shard]
        digest = state[0].copy().hexdigest() if state is not None else None
        if self._open:
            self._open[1].then(lambda: fn(digest))
        else:
            fn(digest)

    def _appending(self, shard: str) -> Appender | None:
        """The open Appender if it is the shard's."""
        return self._open[1] if self._open and self._open[0] == shard else None

    def _appender(self, shard: str, end: int) -> Appender:
        """The shard's Appender, at `end` (one shard's at a time: their staging is 8 MB)."""
        if not self._appending(shard):
            self._close_appender()
            self._open = (shard, Appender(self.folder / shard, self._fds[shard], end, self._size[shard]))
        return self._open[1]

    def _close_appender(self) -> None:
        if self._open:
            self._open, appender = None, self._open[1]
            appender.close()

    def sha256(self, shard: str) -> str:
        """The whole shard's sha256: taken while writing it in order, else read back."""
        state = self._state[shard]
        if state is not None and state[1] == self._size[shard]:
            return state[0].hexdigest()
        return file_sha256(self.folder / shard)

    def close(self) -> None:
        try:
            self._close_appender()
        finally:
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


def write_card(folder: Path, record: dict) -> None:
    """mbmerge.json (machine-readable recipe and timing) and a README.md model card."""
    (folder / "mbmerge.json").write_text(json.dumps(record, indent=2) + "\n")
    inputs = [record["base"]] if record["base"] else []
    inputs += record["experts"]
    rows = "\n".join(f"| {s['role']} | `{s['ref']}` | {s['revision'] or 'local'} |" for s in inputs)
    params = "\n".join(f"- `{k}`: {v}" for k, v in record["params"].items())
    if record.get("recipe_file"):         # a recipe's values may vary per layer: the recipe says them
        recipe = (folder / record["recipe_file"]).read_text()
        params = f"As the recipe `{record['recipe_file']}` beside this card says:\n\n```yaml\n{recipe.rstrip()}\n```"
    base_line = f"base_model: {record['base']['ref']}\n" if record["base"] and record["base"]["revision"] else ""
    heads = "".join(f"- {note}\n" for note in record.get("tied_heads") or [])
    heads = f"## Tied and untied heads\n\n{heads}\n" if heads else ""
    heads = _modules(record) + _ignored(record) + heads
    heads += _quantization(record)
    calibrate = f" then **{record['calibrate']}** (calibration)" if record.get("calibrate") else ""
    (folder / "README.md").write_text(
        f"---\n{base_line}library_name: transformers\ntags:\n- merge\n- mbmerge\n---\n\n"
        f"# Merged model\n\nMerged with mbmerge {record['mbmerge_version']} using "
        f"**{record['method']}**{calibrate} in {record['wall_seconds']:.1f} s on {record['device']} "
        f"({_kernels(record)}).\n\n"
        f"## Inputs\n\n| role | model | revision |\n|---|---|---|\n{rows}\n\n"
        f"## Parameters\n\n{params}\n\n"
        f"Output dtype: {record['dtype']}. Tensors kept from the base: "
        f"`{record['keep_base'] or 'none'}`.\n\n{heads}Reproduce with:\n\n```\n{record['command']}\n```\n")


def _quantization(record: dict) -> str:
    """The card's section on quantized inputs (read dequantized) and a quantized output, if any."""
    lines = [f"- {note}\n" for note in record.get("quantized_inputs") or []]
    q = record.get("out_quant")
    if q:
        kept = ", ".join(q["modules_to_not_convert"]) or "none"
        lines.append(f"- written as FP8 {q['fmt']} with a weight_scale_inv per {q['weight_block_size']} block of "
                     f"each merged matrix (quantization_config in config.json); left unquantized: {kept}\n")
    elif lines:
        lines.append(f"- written unquantized, in {record['dtype']} (dequantized tensors of a quantized reference "
                     f"in bfloat16 unless --dtype); config.json has no quantization_config\n")
    return f"## Quantization\n\n{''.join(lines)}\n" if lines else ""


def _modules(record: dict) -> str:
    """The card's section on a `modules:` recipe: each module's method and models, or where it was copied from."""
    lines = [f"- {m['module']}: **{m['method']}** of {', '.join(f'`{e}`' for e in m['experts'])}"
             + (f" on `{m['base']}`" if m["base"] else "") + "".join(f"\n  - {n}" for n in m.get("renamed", []))
             if "module" in m else
             f"- {', '.join(m['modules'])}: copied from `{m['copied_from']}`" for m in record.get("modules") or []]
    return "## Modules\n\n" + "\n".join(lines) + "\n\n" if lines else ""


def _ignored(record: dict) -> str:
    """The card's section on the recipe's parameters that their method does not take (left out, as mergekit does)."""
    lines = [f"- `{i['key']}`: not a parameter of {i['method']}" for i in record.get("ignored_parameters") or []]
    return "## Ignored recipe parameters\n\n" + "\n".join(lines) + "\n\n" if lines else ""


def _kernels(record: dict) -> str:
    """What merged the chunks, as the card says it: 'compiled C loops, 2 threads'."""
    k = record.get("kernels") or {}
    threads = f", {k['threads']} thread{'s' * (k['threads'] != 1)}" if k.get("threads") else ""
    return f"{k.get('backend', 'unknown kernels')}{threads}"
