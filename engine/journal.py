"""Resuming an interrupted merge: the journal of completed tensors in the partial output folder.

The journal's first line is the merge's fingerprint: the recipe (method, resolved parameters,
dtype, kept tensors), the output plan (tensor names, shards, offsets, dtypes) and each input
file's identity (size, mtime, sha256 of its header). Then the model-wide thresholds once computed,
and one line per completed tensor, appended after its bytes are written: the sha256 of its shard
from the start through it (tensors are written in file order), and with model-wide ranks how many
tied entries each threshold may still keep after it. A rerun with the same fingerprint re-reads
each shard and keeps the journaled tensors whose prefix digests match, up to the first that does
not, and merges the rest; a different fingerprint, a torn line or a mismatching digest is not
trusted. Knows nothing of methods; the bytes are checked, never assumed.
"""
import hashlib
import json
import threading
from pathlib import Path

from .inputs.index import TensorIndex
from .plan import Plan

JOURNAL = "mbmerge-journal.jsonl"


def input_identity(indexes: list[TensorIndex]) -> dict[str, dict]:
    """{file path: size, mtime_ns, header sha256} of every input shard."""
    out = {}
    for ix in indexes:
        for shard in ix.shards:
            path = ix.folder / shard
            st = path.stat()
            out[str(path.resolve())] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                        "header_sha256": header_sha256(path, st.st_size)}
    return out


def header_sha256(path, size: int) -> str:
    """The sha256 of a safetensors file's JSON header (its first `size` bytes at most)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return hashlib.sha256(f.read(min(n, size))).hexdigest()


def fingerprint(recipe: dict, plan: Plan, identity: dict) -> str:
    layout = [(t.name, t.shard, t.out_offset, t.out_dtype, t.merge) for t in plan.tensors]
    text = json.dumps({"recipe": recipe, "layout": layout, "inputs": identity}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class Journal:
    """Appends completed tensors to the journal; `resume` reads back what can be trusted."""

    def __init__(self, folder: Path, fingerprint: str, fresh: bool):
        self.path = folder / JOURNAL
        self._f = open(self.path, "w" if fresh else "a")
        self._lock = threading.Lock()   # tensors are recorded on the output's disk thread, thresholds on the caller's
        if fresh:
            self._append({"fingerprint": fingerprint})

    def _append(self, record: dict) -> None:
        with self._lock:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()   # in the page cache: a killed process loses nothing; a torn line is ignored

    def tensor_done(self, name: str, sha256: str, ties: list | None = None) -> None:
        self._append({"tensor": name, "sha256": sha256, **({"ties": ties} if ties is not None else {})})

    def thresholds(self, thr: list) -> None:
        self._append({"thresholds": thr})

    def close(self) -> None:
        self._f.close()

    @staticmethod
    def resume(folder: Path, fingerprint: str, plan: Plan) -> tuple | None:
        """(tensors whose bytes match the journal, model-wide thresholds or None, {tensor: ties left
        after it}, {shard: (sha256 of its verified prefix, where it ends)}) of an interrupted merge
        with this fingerprint; None when there is nothing to resume."""
        path = folder / JOURNAL
        try:
            lines = path.read_text().splitlines()
            records = [json.loads(line) for line in lines[:-1]]
            try:
                records.append(json.loads(lines[-1]))
            except (IndexError, json.JSONDecodeError):
                pass      # the last line may be torn by a kill
        except (OSError, json.JSONDecodeError):
            return None
        if not records or records[0].get("fingerprint") != fingerprint or not _shards_intact(folder, plan):
            return None
        thr = next((r["thresholds"] for r in records[1:] if "thresholds" in r), None)
        journaled = {r["tensor"]: r for r in records[1:] if isinstance(r.get("tensor"), str)}
        done, ties, prefixes = set(), {}, {}
        for shard in plan.shards:
            digest, end = _verified_prefix(folder, shard, [t for t in plan.tensors if t.shard == shard.name],
                                           journaled, done)
            prefixes[shard.name] = (digest, end)
        ties = {name: journaled[name].get("ties") for name in done}
        if thr is not None and any(ties[n] is None for n in done):
            return None   # model-wide ranks whose running tie counts were not journaled: start over
        return done, thr, ties, prefixes


def _verified_prefix(folder: Path, shard, tensors: list, journaled: dict, done: set):
    """Hash the shard from its start, tensor by tensor in file order, while the journal has the tensor
    and its prefix digest matches; add those to `done`. (the hash so far, where it ends)."""
    digest, end = hashlib.sha256(shard.header), len(shard.header)
    with open(folder / shard.name, "rb") as f:
        for t in tensors:
            record = journaled.get(t.name)
            if record is None or t.out_offset != end:
                break
            after = digest.copy()
            f.seek(t.out_offset)
            left = t.out_nbytes
            while left and (block := f.read(min(left, 1 << 24))):
                after.update(block)
                left -= len(block)
            if left or after.hexdigest() != record.get("sha256"):
                break
            digest, end = after, end + t.out_nbytes
            done.add(t.name)
    return digest, end


def _shards_intact(folder: Path, plan: Plan) -> bool:
    """Every output shard exists with its planned size and header."""
    for shard in plan.shards:
        path = folder / shard.name
        try:
            if path.stat().st_size != shard.size:
                return False
            with open(path, "rb") as f:
                if f.read(len(shard.header)) != shard.header:
                    return False
        except OSError:
            return False
    return True
