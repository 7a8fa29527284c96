"""The safetensors format: validated header parsing and header encoding.

File layout: 8-byte little-endian header length N, N bytes of JSON
(`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}`),
then the data buffer; offsets are relative to the buffer, tensors are packed with no
overlap and no holes, and the buffer ends with the last tensor.
Knows nothing of model folders or merging.
"""
import json
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import NamedTuple

from ...common.errors import BadHeader, BadOffsets, BadParameter

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own bound
MAX_DIM = 2 ** 63  # torch sizes are int64
ALIGN = 8  # the header is padded with spaces so the buffer starts 8-byte aligned

class Dtype(NamedTuple):
    itemsize: int
    torch_name: str

    @property
    def torch(self):
        """The torch dtype (torch is imported here, not with the module: reading headers needs none)."""
        import torch
        return getattr(torch, self.torch_name)


DTYPES = {
    "F64": Dtype(8, "float64"), "F32": Dtype(4, "float32"), "F16": Dtype(2, "float16"), "BF16": Dtype(2, "bfloat16"),
    "I64": Dtype(8, "int64"), "I32": Dtype(4, "int32"), "I16": Dtype(2, "int16"), "I8": Dtype(1, "int8"),
    "U8": Dtype(1, "uint8"), "BOOL": Dtype(1, "bool"),
    "F8_E4M3": Dtype(1, "float8_e4m3fn"), "F8_E5M2": Dtype(1, "float8_e5m2"),
    "U16": Dtype(2, "uint16"), "U32": Dtype(4, "uint32"), "U64": Dtype(8, "uint64"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")   # merged; other dtypes are copied


@dataclass(frozen=True, kw_only=True)
class TensorEntry:
    """Where one tensor's bytes are: `offset` is absolute within `file`."""
    name: str
    file: Path
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return self.nbytes // DTYPES[self.dtype].itemsize  # = prod(shape), validated; O(1) for any shape

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype].torch


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate one safetensors file's header.

    Returns ({name: TensorEntry}, metadata). Raises BadHeader or BadOffsets naming the file
    (and tensor) for anything the format forbids.
    """
    try:
        size, n, text = _read_prefix(path)
    except OSError as e:
        raise BadHeader(f"{path}: cannot be read ({e.strerror or e})") from None
    header = _parse_json(path, text)
    meta = header.pop("__metadata__", None)
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BadHeader(f"{path}: __metadata__ must map strings to strings")
    buffer_start = 8 + n
    entries = {name: _entry(path, name, spec, buffer_start) for name, spec in header.items()}
    _check_packing(path, entries, buffer_start, size)
    return entries, meta


def _read_prefix(path) -> tuple[int, int, bytes]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise BadHeader(f"{path}: file is {size} bytes, too short to be safetensors (truncated?)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise BadHeader(f"{path}: header length {n} exceeds the file ({size} bytes) or the "
                            f"{MAX_HEADER_BYTES}-byte limit: file is truncated or not safetensors")
        return size, n, f.read(n)


def _parse_json(path, text: bytes) -> dict:
    def no_duplicates(pairs):
        seen = set()  # linear: a header of millions of keys must not cost quadratic time
        for k, _ in pairs:
            if k in seen:
                raise BadHeader(f"{path}: header names tensor {k!r} twice")
            seen.add(k)
        return dict(pairs)
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as e:  # ValueError: also ints over Python's 4300-digit limit
        raise BadHeader(f"{path}: header is not valid UTF-8 JSON ({type(e).__name__}): "
                        f"file is corrupt or not safetensors") from None
    if not isinstance(header, dict):
        raise BadHeader(f"{path}: header JSON is not an object")
    return header


def _entry(path, name, spec, buffer_start) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise BadHeader(f"{where}: entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise BadHeader(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(type(s) is int and 0 <= s < MAX_DIM for s in shape):
        raise BadHeader(f"{where}: shape {shape!r} is not a list of non-negative integers below 2**63")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise BadOffsets(f"{where}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    nbytes = offsets[1] - offsets[0]
    expected = _needed(shape, DTYPES[dtype].itemsize, nbytes)
    if nbytes != expected:
        needs = f"more than {nbytes}" if expected is None else expected
        raise BadOffsets(f"{where}: holds {nbytes} bytes but shape {shape} of {dtype} needs {needs}")
    return TensorEntry(name=name, file=Path(path), offset=buffer_start + offsets[0], nbytes=nbytes, dtype=dtype,
                       shape=tuple(shape))


def _needed(shape: list[int], itemsize: int, limit: int) -> int | None:
    """numel * itemsize, or None as soon as it exceeds `limit`: a header claiming millions of
    huge dimensions costs no big-integer arithmetic."""
    if 0 in shape:
        return 0
    n = itemsize
    for s in shape:
        n *= s
        if n > limit:
            return None
    return n


def _check_packing(path, entries: dict[str, TensorEntry], buffer_start: int, size: int) -> None:
    end, buffer = 0, size - buffer_start
    for e in sorted(entries.values(), key=lambda e: (e.offset, e.nbytes)):
        begin = e.offset - buffer_start
        if begin != end:
            kind = "overlaps the previous tensor" if begin < end else "leaves a hole before it"
            raise BadOffsets(f"{path}: tensor {e.name!r} at buffer offset {begin} {kind}")
        end = begin + e.nbytes
        if end > buffer:
            raise BadOffsets(f"{path}: tensor {e.name!r} ends at buffer offset {end} but the buffer has "
                             f"{buffer} bytes (file truncated?)")
    if end != buffer:
        raise BadOffsets(f"{path}: tensor data ends at buffer offset {end} but the buffer has {buffer} "
                         f"bytes (trailing garbage)")


def encode_header(tensors: list[tuple[str, str, tuple[int, ...]]],
                  metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """Header bytes (length prefix + padded JSON) for tensors packed in the given order.

    tensors: [(name, dtype name, shape)]. Returns (prefix bytes, buffer-relative offsets).
    """
    header, offsets, pos = {"__metadata__": metadata}, [], 0
    for name, dtype, shape in tensors:
        nbytes = prod(shape) * DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)
    return struct.pack("<Q", len(text)) + text, offsets


def dtype_name(name: str | None) -> str | None:
    """'bfloat16' / 'bf16' / 'BF16' -> 'BF16' (None stays None)."""
    if name is None:
        return None
    aliases = {"bfloat16": "BF16", "bf16": "BF16", "float16": "F16", "fp16": "F16", "half": "F16",
               "float32": "F32", "fp32": "F32", "float": "F32", "float64": "F64", "fp64": "F64"}
    key = aliases.get(name.lower(), name.upper())
    if key not in FLOAT_DTYPES:
        raise BadParameter(f"--dtype {name!r}: choose bfloat16, float16, float32 or float64")
    return key
