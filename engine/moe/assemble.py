"""A MoE written tensor by tensor: each output tensor copied (cast to the output dtype) from its one source in
chunks through the mapped reads, or taken from the computed routers, into shards preallocated with their
final headers (the merge's ShardWriter), journaled so an interrupted run resumes; then the config of the chosen
architecture, the base's tokenizer and chat template, the recipe and the card, and the folder published.
Memory: the chunks in flight, never a whole tensor of a model (a router is [experts, hidden]).
"""
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ...common import VERSION
from ..inputs import side_files
from ..inputs.header import DTYPES
from ..inputs.index import INDEX_FILE
from ..inputs.read import MappedModel
from ..journal import Journal, fingerprint, input_identity
from ..output.partial import kept_for_resume, resumed_or_fresh, written
from ..output.place import (check_apart, check_location, missing_parents, output_lock, partial_folder, publish,
                            remove_empty)
from ..output.verify import sha256_files
from ..output.write import ShardWriter, write_index
from ..plan import Plan, assembly_plan, parse_shard_size
from ..spec import RunOptions
from .card import RECIPE_FILE, command, write_moe_card
from .inputs import MoeInputs, Piece
from .recipe import recipe_yaml


@dataclass(frozen=True, kw_only=True)
class MoeRun:
    """How a MoE is built (what it is: the MoeRecipe): the run's options, the seed of random gates and noise,
    the output's shard size."""
    run: RunOptions = field(default_factory=RunOptions)
    seed: int = 0
    out_shard_size: int | str = "5B"


@dataclass(frozen=True)
class Routers:
    """The routers' rows [layers, gated experts, hidden] (stats/routers.py), the seconds they took, and the layers
    whose rows are too alike to route apart."""
    rows: torch.Tensor
    seconds: float = 0.0
    degenerate: tuple[int, ...] = ()


def assemble(inputs: MoeInputs, routers: Routers, out: Path, options: MoeRun) -> Path:
    """Write the MoE of `inputs` with these routers into `out`."""
    started = time.perf_counter()
    check_location(out, options.run.overwrite)
    check_apart(out, [(s.role, f) for s in inputs.sources for f in s.folders])
    created = missing_parents(out)
    try:
        with output_lock(out):
            return _assemble_locked(inputs, routers, Path(out), options, started)
    except BaseException:
        remove_empty(created)
        raise


def computed_tensors(inputs: MoeInputs, routers: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors no model holds: each layer's router (the routed experts' rows), the shared expert's gate
    (its row, where the architecture gates it), zero attention biases."""
    n, arch = len(inputs.recipe.experts), inputs.architecture
    out = {}
    for layer in range(inputs.layers):
        out[arch.router(layer)] = routers[layer, :n]
        if arch.shared_gate is not None:
            out[arch.shared_gate(layer)] = routers[layer, n:n + 1]
    for p in inputs.pieces:
        if p.model is None and p.entry.name not in out:
            out[p.entry.name] = torch.zeros(p.entry.shape)
    return {k: v.float().contiguous().reshape(-1) for k, v in out.items()}


def _assemble_locked(inputs: MoeInputs, routers: Routers, out: Path, options: MoeRun, started: float) -> Path:
    plan = assembly_plan([p.entry for p in inputs.pieces], inputs.dtypes, budget=options.run.memory_budget,
                         shard_size=parse_shard_size(options.out_shard_size))
    computed = computed_tensors(inputs, routers.rows)
    identity = input_identity([m.stored for m in inputs.models] + [m.adapter.index for m in inputs.models
                                                                    if m.adapter])
    key = {"recipe": {k: v for k, v in asdict(inputs.recipe).items() if k != "text"}, "seed": options.seed,
           "routers": hashlib.sha256(routers.rows.float().contiguous().numpy().tobytes()).hexdigest()}
    digest = fingerprint(key, plan, identity)
    tmp = partial_folder(out)
    resumed = resumed_or_fresh(tmp, digest, plan, options.run.resume, options.run.progress and f"MoE into {out}")
    done, _, _, prefixes = resumed or (set(), None, {}, None)
    readers = [m.reader(None) for m in inputs.models]
    try:
        with kept_for_resume(tmp):
            writer, journal = ShardWriter(tmp, plan, prefixes), Journal(tmp, digest, fresh=resumed is None)
            try:
                _write_tensors(plan, {p.entry.name: p for p in inputs.pieces}, readers, computed, writer, journal,
                               done, options)
            finally:
                writer.close()
                journal.close()
            written(tmp, identity, "the MoE was being written")
            _finish(inputs, routers, tmp, plan, writer, options, {"fingerprint": digest, "inputs": identity,
                                                                  "resumed_tensors": len(done), "started": started,
                                                                  "out": out})
            publish(tmp, out, options.run.overwrite)
    finally:
        for r in readers:
            r.close()
    return out


def _write_tensors(plan: Plan, pieces: dict[str, Piece], readers, computed: dict, writer: ShardWriter,
                   journal: Journal, done: set, options: MoeRun) -> None:
    bar = tqdm(total=sum(t.out_nbytes for t in plan.tensors), unit="B", unit_scale=True, desc="mbmerge moe",
               disable=not options.run.progress, file=sys.stderr)
    with bar, _RawFiles() as raw:
        for t in plan.tensors:
            if t.name not in done:
                piece = pieces[t.name]
                if _verbatim(t, piece, readers):
                    raw.copy(t, piece.source, writer)
                else:
                    _write_one(t, piece, readers, computed, writer, options.seed)
                writer.when_written(t, lambda digest, name=t.name: journal.tensor_done(name, digest))
            bar.update(t.out_nbytes)


def _verbatim(t, piece: Piece, readers) -> bool:
    """Whether a tensor's bytes are its source's as stored: a model's own tensor (no adapter folded in), no noise
    or scale, the same dtype."""
    e = piece.expert
    return (piece.model is not None and type(readers[piece.model]) is MappedModel and t.out_dtype == piece.source.dtype
            and not (e and (e.noise_scale is not None or (piece.residual and e.residual_scale is not None))))


class _RawFiles:
    """Source files read with pread into one reused buffer: a copied tensor's bytes go from the page cache to the
    output without a page fault per 4 KiB page of a mapping (twice faster: 0.95 s -> 0.4 s per 0.6 GB here)."""

    def __init__(self):
        self._fds, self._buf = {}, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for fd in self._fds.values():
            os.close(fd)

    def copy(self, t, source, writer: ShardWriter) -> None:
        fd = self._fds.get(source.file) or self._fds.setdefault(source.file, os.open(source.file, os.O_RDONLY))
        size = DTYPES[source.dtype].itemsize
        need = max(z - a for a, z in t.chunks) * size if t.chunks else 0
        if self._buf is None or len(self._buf) < need:
            self._buf = bytearray(need)
        for a, z in t.chunks:
            view, pos = memoryview(self._buf)[:(z - a) * size], source.offset + a * size
            got = 0
            while got < len(view):
                n = os.preadv(fd, [view[got:]], pos + got)
                if n == 0:
                    raise OSError(f"{source.file}: tensor {source.name} ends early (the file was truncated)")
                got += n
            writer.write(t, a, torch.frombuffer(view, dtype=DTYPES[source.dtype].torch))


def _write_one(t, piece: Piece, readers, computed: dict, writer: ShardWriter, seed: int) -> None:
    """One output tensor, chunk by chunk: read (or computed), an expert's noise and residual scale, cast."""
    out_dtype = DTYPES[t.out_dtype].torch
    expert = piece.expert
    noise = _generator(seed, t.name) if expert and expert.noise_scale is not None else None
    scale = expert.residual_scale if expert and piece.residual else None
    for a, z in t.chunks:
        if piece.model is None:
            x = computed[t.name][a:z]
        else:
            x = readers[piece.model].chunk(piece.source, a, z)
        if noise is not None:       # mergekit: x + N(0, 1) * noise_scale, then the residual scale
            x = x.float() + torch.randn(z - a, generator=noise) * expert.noise_scale
        if scale is not None:
            x = x * scale
        writer.write(t, a, x.to(out_dtype, copy=True))
        if piece.model is not None:
            readers[piece.model].release(piece.source, a, z)


def _generator(seed: int, name: str) -> torch.Generator:
    """A tensor's own noise generator: the same draws for it whichever tensors ran before (a resumed run)."""
    word = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(word)


def _finish(inputs: MoeInputs, routers: Routers, tmp: Path, plan: Plan, writer: ShardWriter, options: MoeRun,
            run: dict) -> None:
    """The index, the architecture's config, the base's tokenizer and chat template, the recipe, the card."""
    recipe, arch = inputs.recipe, inputs.architecture
    write_index(tmp, plan)
    copied = side_files.copy(inputs.models[0].stored.folder, tmp, None)     # its config.json is replaced here
    config = arch.config(inputs.config, recipe)
    config.pop("quantization_config", None)      # quantized inputs are read dequantized (engine/inputs/quantized.py)
    dtypes = set(inputs.dtypes)
    if len(dtypes) == 1:
        name = side_files.TORCH_DTYPE[dtypes.pop()]
        config.pop("torch_dtype", None)
        config.update(dtype=name, **({"torch_dtype": name} if "auto_map" in config else {}))   # remote code reads torch_dtype
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / RECIPE_FILE).write_text(recipe_yaml(recipe))
    files = sorted({*copied, "config.json", RECIPE_FILE})
    n = len(recipe.experts)
    record = {
        "mbmerge_version": VERSION, "kind": "moe", "architecture": arch.name, "gate_mode": recipe.gate_mode,
        "experts_per_token": recipe.experts_per_token, "seed": options.seed,
        "base": _source(inputs.sources[0]), "experts": [_source(s) for s in inputs.sources[1:n + 1]],
        "shared_experts": [_source(s) for s in inputs.sources[n + 1:]],
        "dtype": config.get("dtype", "as stored"), "shards": len(plan.shards), "tensors": len(plan.tensors),
        "degenerate_router_layers": list(routers.degenerate), "recipe_file": RECIPE_FILE,
        "command": command(run["out"], options.seed, options.out_shard_size), "router_seconds": round(routers.seconds, 3),
        "wall_seconds": round(time.perf_counter() - run["started"] + routers.seconds, 3),
        **{k: run[k] for k in ("fingerprint", "resumed_tensors", "inputs")},
        "sha256": {**{s.name: writer.sha256(s.name) for s in plan.shards},
                   **sha256_files(tmp, [INDEX_FILE] * plan.sharded + files)},
    }
    write_moe_card(tmp, record, recipe_yaml(recipe))


def _source(s) -> dict:
    return {"role": s.role, "ref": s.ref, "path": str(s.path.resolve()), "revision": s.revision,
            **({"adapter": str(s.adapter.resolve())} if s.adapter else {})}
