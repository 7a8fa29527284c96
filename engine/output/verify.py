"""Re-check a merged output folder after the fact: it parses as a model, every shard's header is
valid, the files match the sha256 digests in mbmerge.json (none missing, none added), the side
files (config, tokenizer) parse, every floating tensor is finite, and optionally the recorded
inputs are unchanged.

The inputs are judged against what the merge recorded per file (journal.input_identity: size,
mtime_ns, the sha256 of the safetensors header; a content `sha256` where one is recorded):
- gone, unreadable, another size, or another header (re-hashed every time: it is small): changed;
- same size and header, another mtime: a recorded content sha256 decides; without one (merges
  record none: hashing every input would read it twice) the file passes with a note saying its
  tensor data were not compared: a `touch` and an in-place rewrite of the same shapes look alike;
- same size, mtime and header: unchanged, nothing more read. A data byte changed with the mtime
  set back (os.utime) is therefore not detected.

Every problem becomes one line naming the file (and tensor); nothing in the folder is trusted
and nothing is written. Knows nothing of merging or methods: it does not recompute the merge,
so a wrong but finite and unmodified output verifies OK; and without mbmerge.json it cannot
tell a modified file from an original one.
"""
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...common.errors import BadModel, MbmergeError
from ..inputs.header import TensorEntry, read_header
from ..inputs.index import INDEX_FILE, TensorIndex
from ..journal import header_sha256
from ..inputs.read import MappedModel
from ..inputs import side_files
from ..inputs.side_files import WEIGHT_SUFFIXES

RECORD = "mbmerge.json"
CHUNK_ELEMS = 1 << 22  # finiteness is checked 4M elements at a time: <= 16 MiB of float32 per chunk
MAX_NAMED = 10         # non-finite tensors named in the report; the rest are counted
BLOCK = 1 << 20        # sha256 read size


def sha256_files(folder: Path, names: list[str]) -> dict[str, str]:
    """{name: hex sha256} of each named file in `folder`, in the order given; OSError for a missing
    or unreadable file.

    Example:
        >>> sha256_files(Path("out"), ["model.safetensors"])["model.safetensors"][:8]
        'e3b0c442'
    """
    return {name: file_sha256(Path(folder) / name) for name in names}


def file_sha256(path: Path, start: int = 0, length: int | None = None) -> str:
    """Hex sha256 of `length` bytes of a file from `start` (default: to the end), read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = float("inf") if length is None else length
        while left and (block := f.read(int(min(left, BLOCK)))):
            h.update(block)
            left -= len(block)
    return h.hexdigest()


@dataclass
class Report:
    problems: list[str]                                # one line each; none: the folder verifies
    notes: list[str] = field(default_factory=list)     # what passed but the user should know


def verify(folder: Path, inputs: bool = False) -> list[str]:
    """Every problem found in a merged output folder, one line each; [] means it verifies.

    Args:
        folder: the output folder of a merge.
        inputs: also check the input files recorded in mbmerge.json, by the rule in the module docstring.
    Returns:
        problem lines, each naming the file (and tensor where relevant).
    Raises:
        BadModel when `folder` is missing or cannot be listed (nothing to verify).
    Example:
        >>> verify(Path("out"))
        []
    """
    return check(folder, inputs).problems


def check(folder: Path, inputs: bool = False) -> Report:
    """verify's problems, and notes on inputs whose only change is their time (see the module docstring)."""
    folder = Path(folder)
    names = _listing(folder)
    record, problems = _read_record(folder)
    index, index_problem = _index(folder)
    shards = sorted({n for n in names if n.endswith(".safetensors")} | set(index.shards if index else ()))
    headers, header_problems = _headers(folder, shards)
    problems += header_problems
    if index_problem and not any(index_problem.endswith(p) for p in header_problems):
        problems.append(index_problem)  # a bad header is reported once, by the per-shard check
    if record is not None:
        problems += _checksums(folder, names, record)
    problems += side_files.problems(folder)
    problems += _nonfinite(folder, headers)
    notes = []
    if inputs and record is not None:
        found, notes = _inputs(folder, record)
        problems += found
    return Report(problems, notes)


def _listing(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise BadModel(f"{folder}: " + ("is not a folder" if folder.exists() else "no such folder"))
    try:
        return sorted(os.listdir(folder))
    except OSError as e:
        raise BadModel(f"{folder}: cannot be listed ({e.strerror or e})") from None


def _read_record(folder: Path) -> tuple[dict | None, list[str]]:
    path = folder / RECORD
    if not path.exists():
        return None, [f"{folder}: no {RECORD}: checksums unknown (was this folder written by mbmerge?)"]
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        return None, [f"{path}: cannot be read as JSON ({type(e).__name__}): the file is corrupt; "
                      f"checksums unknown"]
    if not isinstance(record, dict):
        return None, [f"{path}: is not a JSON object: the file is corrupt; checksums unknown"]
    return record, []


def _index(folder: Path) -> tuple[TensorIndex | None, str | None]:
    try:
        return TensorIndex.from_folder(folder, "output"), None
    except MbmergeError as e:
        return None, str(e)


def _headers(folder: Path, shards: list[str]) -> tuple[dict[str, dict[str, TensorEntry]], list[str]]:
    headers, problems = {}, []
    for shard in shards:
        try:
            headers[shard], _ = read_header(folder / shard)
        except MbmergeError as e:
            problems.append(str(e))
    return headers, problems


def _checksums(folder: Path, names: list[str], record: dict) -> list[str]:
    path, listed = folder / RECORD, record.get("sha256")
    if listed is None:
        return [f"{path}: records no sha256 digests: checksums unknown"]
    if not isinstance(listed, dict) or not all(isinstance(d, str) for d in listed.values()):
        return [f"{path}: 'sha256' must map file names to hex digests: the file is corrupt"]
    problems = []
    for name, digest in sorted(listed.items()):
        if Path(name).name != name or name in ("", ".", ".."):
            problems.append(f"{path}: lists {name!r}, which is not a file name in the folder")
        elif not (folder / name).is_file():
            problems.append(f"{folder / name}: listed in {RECORD} but missing")
        elif (actual := sha256_files(folder, [name])[name]) != digest.lower():
            problems.append(f"{folder / name}: sha256 {actual} differs from {digest} in {RECORD}: "
                            f"the file changed after the merge")
    problems += [f"{folder / n}: weight file not listed in {RECORD}'s sha256 (added after the merge?)"
                 for n in names if n not in listed and (n.endswith(WEIGHT_SUFFIXES) or n == INDEX_FILE)]
    return problems


def _nonfinite(folder: Path, headers: dict[str, dict[str, TensorEntry]]) -> list[str]:
    """NaN/Inf in the floating tensors of the shards whose headers are valid."""
    index = TensorIndex(folder=folder, tensors={}, shards=tuple(headers), sharded=False, metadata={})
    found = []  # (entry, count of non-finite elements)
    mapped = MappedModel(index)
    try:
        for entries in headers.values():
            for e in sorted(entries.values(), key=lambda e: e.offset):
                if e.torch_dtype.is_floating_point and (n := _count_nonfinite(mapped, e)):
                    found.append((e, n))
    finally:
        mapped.close()
    if not found:
        return []
    shown = ", ".join(f"{e.name} in {e.file.name} ({n} of {e.numel} elements)" for e, n in found[:MAX_NAMED])
    more = f" and {len(found) - MAX_NAMED} more" if len(found) > MAX_NAMED else ""
    return [f"{folder}: {len(found)} tensor(s) hold NaN or Inf: {shown}{more}"]


def _count_nonfinite(mapped: MappedModel, e: TensorEntry) -> int:
    n = 0
    for start in range(0, e.numel, CHUNK_ELEMS):
        stop = min(start + CHUNK_ELEMS, e.numel)
        x = mapped.chunk(e, start, stop)
        if x.element_size() == 1:
            x = x.float()  # isfinite is not implemented for float8_e4m3fn
        n += int(x.numel() - torch.isfinite(x).sum())
        del x
        mapped.release(e, start, stop)
    return n


def _inputs(folder: Path, record: dict) -> tuple[list[str], list[str]]:
    """(problems, notes) of the recorded input files."""
    recorded = record.get("inputs")
    if not isinstance(recorded, dict):
        return [f"{folder / RECORD}: records no inputs (file: size, mtime_ns): cannot check them"], []
    problems, notes = [], []
    for path, was in sorted(recorded.items()):
        problem, note = _input_state(path, was if isinstance(was, dict) else {})
        problems += [f"input {path}: {problem}"] if problem else []
        notes += [f"input {path}: {note}"] if note else []
    return problems, notes


def _input_state(path: str, was: dict) -> tuple[str | None, str | None]:
    """(problem, note) of one input file against its record, by the rule in the module docstring."""
    st, problem = _stat(path)
    if problem:
        return problem, None
    if was.get("size") != st.st_size:
        return f"changed since the merge (size {was.get('size')} -> {st.st_size})", None
    try:
        if "header_sha256" in was and header_sha256(path, st.st_size) != was["header_sha256"]:
            return "changed since the merge (its safetensors header's sha256 differs from the recorded one)", None
        if was.get("mtime_ns") == st.st_mtime_ns:
            return None, None
        time = f"mtime_ns {was.get('mtime_ns')} -> {st.st_mtime_ns}"
        if isinstance(was.get("sha256"), str):
            if file_sha256(Path(path)) != was["sha256"].lower():
                return f"changed since the merge ({time}, its contents' sha256 differs from the recorded one)", None
            return None, f"unchanged: only its time changed ({time}; its contents' sha256 is the recorded one)"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})", None
    compared = "size and safetensors header" if "header_sha256" in was else "size"
    return None, (f"only its time changed ({time}): {compared} as recorded; its tensor data were not compared "
                  f"(the merge recorded no digest of them)")


def _stat(path: str) -> tuple[os.stat_result | None, str | None]:
    """(its stat, None), or (None, why it cannot be checked)."""
    try:
        return os.stat(path), None
    except FileNotFoundError:
        return None, "gone since the merge"
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"


def input_changes(identity: dict[str, dict]) -> dict[str, str]:
    """{path: what happened to it} for each input file of `identity` ({path: {size, mtime_ns, ...}},
    as recorded at the start of a merge) that is gone, unreadable, or of another size or mtime: the
    merge's own check that its inputs stayed put while it read them (stricter than verify's rule)."""
    changes = {}
    for path, was in identity.items():
        st, problem = _stat(path)
        if problem:
            changes[path] = problem
            continue
        was = was if isinstance(was, dict) else {}
        changed = [f"{k} {was.get(k)} -> {now}" for k, now in [("size", st.st_size), ("mtime_ns", st.st_mtime_ns)]
                   if was.get(k) != now]
        if changed:
            changes[path] = f"changed since the merge ({', '.join(changed)})"
    return changes
