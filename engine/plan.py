"""The plan of a merge, fixed before any data is read: which tensors are merged or copied, in
which order (file order of the reference model, so reads are sequential), the chunks each is
cut into, and where every output tensor's bytes go. Knows nothing of the methods' maths.
"""
import re
import sys
from dataclasses import dataclass, replace

from ..common.errors import BadParameter
from ..methods import CHUNK_ALIGN, row_length
from .inputs.header import DTYPES, FLOAT_DTYPES, TensorEntry, encode_header
from .inputs.index import SINGLE_FILE, TensorIndex

UNSUPPORTED = ("F8_E4M3", "F8_E5M2")
CPU_CHUNK = 1 << 17  # elements; keeps a method's float32 temporaries in cache. TIES apply, 2 experts,
                     # 2 cores, per 229M elements: 1.5 s at 2^17, 1.6 s at 2^18, 4.8 s at 2^20, 1.9 s at 2^16
COMPILED_CHUNK = 1 << 21  # the compiled CPU loops read mapped bytes, hold no float32 copies, and pay ~1 ms of
                          # Python per chunk: large chunks (TA on 240M params: 2^17 -> 2^21, 6.8 s -> ...)
GPU_CHUNK = 1 << 22  # a GPU wants few, large launches; 4M elements x 4 inputs is 64 MB of bf16 per chunk


@dataclass(frozen=True, kw_only=True)
class TensorPlan:
    name: str
    ref: TensorEntry                 # the reference input's entry (base, or first expert)
    out_dtype: str
    merge: bool                      # False: the reference tensor is copied (cast if needed)
    chunks: tuple[tuple[int, int], ...]
    shard: str
    out_offset: int                  # absolute byte offset in the output shard

    @property
    def out_nbytes(self) -> int:
        return self.ref.numel * DTYPES[self.out_dtype].itemsize


@dataclass(frozen=True)
class ShardPlan:
    name: str
    header: bytes
    size: int


@dataclass(frozen=True, kw_only=True)
class Plan:
    tensors: tuple[TensorPlan, ...]  # in read order
    shards: tuple[ShardPlan, ...]
    sharded: bool                    # write model.safetensors.index.json
    chunk_elems: int
    budget: int                      # bytes of working memory allowed


def parse_size(text: str | int) -> int:
    """'2GB', '512MiB', '1.5G', '4096' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise BadParameter(f"memory budget {text!r} is not a size like 2GB or 512MB")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def parse_shard_size(text: str | int) -> int:
    """Bytes per output shard as mergekit's --out-shard-size reads them ('5B': 5e9, k/m/b thousands,
    millions, billions) or as transformers' max_shard_size does ('500MB' decimal, '2GiB' binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(k|m|b|kb|mb|gb|tb|kib|mib|gib|tib)?\s*", str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise BadParameter(f"--out-shard-size {text!r} is not a positive size like 5B (mergekit: 5 billion bytes), "
                           f"500MB or 2GiB")
    unit = {None: 1, "k": 10**3, "m": 10**6, "b": 10**9, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
            "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}[m.group(2)]
    return max(1, int(float(m.group(1)) * unit))


def _per_element(n_inputs: int) -> int:
    return 8 * n_inputs + 8 * (n_inputs - 1) + 20


def chunk_elems(budget: int, n_inputs: int, preferred: int = CPU_CHUNK) -> int:
    """Elements per chunk: the preferred size, shrunk to fit the budget, a multiple of CHUNK_ALIGN.

    Budgeted per element: every input as stored (<= 4 bytes) and as float32, one float32
    temporary per expert for deltas and one for trimmed deltas, and five more (sign, sums, output).
    """
    fit = budget // _per_element(n_inputs) // CHUNK_ALIGN * CHUNK_ALIGN
    if fit < CHUNK_ALIGN:
        need = CHUNK_ALIGN * _per_element(n_inputs)
        print(f"mbmerge: --memory-budget {budget / 1024:.0f} KiB is less than one chunk of {CHUNK_ALIGN} elements "
              f"needs with {n_inputs} inputs; using {need / 1024:.0f} KiB", file=sys.stderr)
    return max(CHUNK_ALIGN, min(preferred, fit))


def _chunks(e: TensorEntry, step: int, span: str, budget: int, n_inputs: int) -> tuple[tuple[int, int], ...]:
    """[a, z) element ranges of a merged tensor: `step` elements, or whole rows (span 'row': a 1-D
    tensor is one row), or the whole tensor (span 'tensor', refused if it cannot fit the budget)."""
    if span == "tensor":
        need = e.numel * _per_element(n_inputs)
        if need > budget:
            raise BadParameter(f"{e.file}: tensor {e.name} {list(e.shape)} must be merged whole and needs about "
                               f"{need / 2**30:.1f} GiB; raise --memory-budget or copy it with --keep-base")
        return ((0, e.numel),) if e.numel else ()
    if span == "row":
        row = row_length(e.shape)
        step = max(1, step // row) * row
    return tuple((a, min(a + step, e.numel)) for a in range(0, e.numel, step))


def make_plan(ref: TensorIndex, *, n_inputs: int, budget: int, out_dtype: str | dict[str, str] | None = None,
              keep_base: str | None = None, preferred: int = CPU_CHUNK, span: str = "element",
              shard_size: int | None = None) -> Plan:
    """Plan the merge of every tensor of `ref` (whose folder fixes names and shapes, and the sharding
    unless `shard_size` bytes per output shard is given); `span` is what one chunk of a merged tensor
    must hold whole (see Method.span); `out_dtype` a dict: per tensor, the others as stored."""
    step = chunk_elems(budget, n_inputs, preferred)
    keep = re.compile(keep_base) if keep_base else None
    rank = {ref.folder / s: k for k, s in enumerate(ref.shards)}
    entries = sorted(ref.tensors.values(), key=lambda e: (rank[e.file], e.offset))   # read order
    kinds = {e.name: _kind(e, out_dtype, keep) for e in entries}   # (dtype, merge)
    if shard_size is None:
        by_shard = {s: [] for s in ref.shards}
        for e in entries:
            by_shard[e.file.name].append(e)
        if not (ref.sharded or len(ref.shards) > 1):
            by_shard = {SINGLE_FILE: by_shard[ref.shards[0]]}
    else:
        by_shard = _reshard(entries, [e.numel * DTYPES[kinds[e.name][0]].itemsize for e in entries], shard_size)
    chunks = {e.name: _chunks(e, step, span if kinds[e.name][1] else "element", budget, n_inputs) for e in entries}
    plan = _laid_out(by_shard, kinds, chunks, step, budget)
    return replace(plan, sharded=plan.sharded or (shard_size is None and ref.sharded))  # an index, as the reference has one


def assembly_plan(entries: list[TensorEntry], dtypes: list[str], *, budget: int, shard_size: int) -> Plan:
    """The plan of tensors each copied (cast) from one source, in the order given and under the entries' names
    (a renamed source entry, or a computed tensor's), into shards of at most shard_size bytes (mbmerge moe)."""
    step = chunk_elems(budget, 1, COMPILED_CHUNK)
    kinds = {e.name: (d, False) for e, d in zip(entries, dtypes)}
    by_shard = _reshard(entries, [e.numel * DTYPES[d].itemsize for e, d in zip(entries, dtypes)], shard_size)
    return _laid_out(by_shard, kinds, {e.name: _chunks(e, step, "element", budget, 1) for e in entries}, step, budget)


def _laid_out(by_shard: dict[str, list[TensorEntry]], kinds: dict, chunks: dict, step: int, budget: int) -> Plan:
    """Each shard's header and each tensor's place in it: kinds {name: (output dtype, merged?)}."""
    shards, tensors = [], []
    for name, entries in by_shard.items():
        header, offsets = encode_header([(e.name, kinds[e.name][0], e.shape) for e in entries], {"format": "pt"})
        size = len(header)
        for e, off in zip(entries, offsets):
            dtype, merge = kinds[e.name]
            tensors.append(TensorPlan(name=e.name, ref=e, out_dtype=dtype, merge=merge, chunks=chunks[e.name],
                                      shard=name, out_offset=len(header) + off))
            size += tensors[-1].out_nbytes
        shards.append(ShardPlan(name, header, size))
    return Plan(tensors=tuple(tensors), shards=tuple(shards), sharded=len(shards) > 1, chunk_elems=step, budget=budget)


def _reshard(entries: list[TensorEntry], sizes: list[int], limit: int) -> dict[str, list[TensorEntry]]:
    """Output shards of at most `limit` bytes of tensor data, in read order, as mergekit fills them: a tensor
    that would overflow a non-empty shard starts the next (one larger than `limit` is a shard alone);
    named model.safetensors, or model-0000i-of-0000N.safetensors as transformers names them."""
    groups, total = [[]], 0
    for e, size in zip(entries, sizes):
        if groups[-1] and total + size > limit:
            groups.append([])
            total = 0
        groups[-1].append(e)
        total += size
    if len(groups) == 1:
        return {SINGLE_FILE: groups[0]}
    return {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": g for i, g in enumerate(groups)}


def _kind(e: TensorEntry, out_dtype: str | dict | None, keep) -> tuple[str, bool]:
    """(output dtype, merged?): floats are merged unless --keep-base matches; others are copied."""
    if e.dtype in UNSUPPORTED:     # quantized tensors come dequantized (engine/inputs/quantized.py)
        raise BadParameter(f"{e.file}: tensor {e.name} is {e.dtype} with no quantization_config in config.json "
                           f"saying how it is scaled; merge the bf16/fp16 originals")
    if e.dtype not in FLOAT_DTYPES:
        return e.dtype, False
    chosen = out_dtype.get(e.name) if isinstance(out_dtype, dict) else out_dtype
    return chosen or e.dtype, not (keep and keep.search(e.name))


