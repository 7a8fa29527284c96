"""Where a merge may write: the output location checked before any input is read, the inputs kept
apart from it, the folder locked for the whole merge, and the finished merge published by renames.

--overwrite replaces only an earlier mbmerge output or an empty folder, and only once the new merge is
complete. An earlier output is a folder whose mbmerge.json lists the files mbmerge wrote into it
("files", added by `publish`); a folder that holds anything else (a user's evaluation, a checkpoint) is
refused in one line naming those files, and nothing in it is touched. An output equal to, inside or
containing any input is refused, overwrite or not. Knows nothing of tensors.
"""
import contextlib
import fcntl
import json
import os
import shutil
import sys
from pathlib import Path

from ...common.errors import OutputBusy, OutputExists, OutputLocation

RECORD = "mbmerge.json"


def check_location(out: Path, overwrite: bool) -> None:
    """Refuse in one line an output that cannot be a folder (a file, or under one; the root) or that
    exists and may not be replaced (see the module docstring)."""
    out = Path(out).absolute()
    if out.parent == out:
        raise OutputLocation(f"output {out}: the root folder cannot be an output; choose a new folder")
    existing = next(p for p in (out, *out.parents) if p.exists() or p.is_symlink())
    if existing != out and not existing.is_dir():
        raise OutputLocation(f"output {out}: {existing} is a file, not a folder; choose another --out")
    if existing == out:
        if not out.is_dir():
            raise OutputExists(f"output {out} is a file, not a folder; choose another --out")
        _check_replaceable(out, overwrite)


def _check_replaceable(out: Path, overwrite: bool) -> None:
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        raise OutputLocation(f"output {out}: cannot be listed ({e.strerror})") from None
    if empty:
        return
    if not overwrite:
        raise OutputExists(f"output {out} already exists and is not empty (pass --overwrite to replace an "
                           f"earlier mbmerge output, or choose another --out)")
    record = read_record(out)
    if record is None:
        raise OutputExists(f"output {out} holds files mbmerge did not write (no {RECORD} of a merge): "
                           f"--overwrite replaces only an earlier mbmerge output or an empty folder; "
                           f"choose another --out")
    foreign = foreign_files(out, record)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputExists(f"output {out} holds files mbmerge did not write ({shown}): --overwrite replaces only "
                           f"an earlier output's own files; move them out of it or choose another --out")


def read_record(folder: Path) -> dict | None:
    """The record (mbmerge.json) of an mbmerge output in `folder`, or None where there is none."""
    try:
        record = json.loads((Path(folder) / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) and "mbmerge_version" in record and "method" in record else None


def written_by_mbmerge(folder: Path) -> bool:
    """Whether `folder` holds the record of an mbmerge merge."""
    return read_record(folder) is not None


def foreign_files(folder: Path, record: dict) -> list[str]:
    """The entries of `folder` (relative paths, sorted) that its record does not list as mbmerge's: files
    and links, and folders holding none of its files. A record older than the list names its files by
    their checksums (sha256) besides the card and the record."""
    own = record.get("files")
    if not isinstance(own, list):
        own = [*(record.get("sha256") or {}), "README.md", RECORD]
    own = {str(f) for f in own}
    parents = {str(p) for f in own for p in Path(f).parents}
    foreign = []
    for path in sorted(Path(folder).rglob("*")):
        name = str(path.relative_to(folder))
        if name in own and path.is_file() and not path.is_symlink():
            continue
        if path.is_dir() and not path.is_symlink() and name in parents:
            continue
        if not any(f"{p}/" in foreign for p in Path(name).parents):   # a foreign folder, once
            foreign.append(name + ("/" if path.is_dir() and not path.is_symlink() else ""))
    return foreign


def check_apart(out: Path, inputs: list[tuple[str, Path]]) -> None:
    """Refuse an output that is, lies inside or contains an input (role, folder or file), compared
    as real paths (links resolved), whatever --overwrite says."""
    target = _real(out)
    for role, path in inputs:
        where = Path(path).resolve()
        if target == where:
            why = "is"
        elif where in target.parents:
            why = "is inside"
        elif target in where.parents:
            why = "contains"
        else:
            continue
        shown = role if role.endswith(str(path)) else f"{role} ({path})"
        raise OutputLocation(f"output {out} {why} {shown}: the merge would overwrite its own inputs; "
                             f"choose an --out apart from every input")


def _real(path: Path) -> Path:
    """The real path of `path`, which need not exist: its nearest existing ancestor resolved."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    return existing.resolve() / path.relative_to(existing)


def missing_parents(out: Path) -> list[Path]:
    """The folders above `out` that do not exist yet (outermost first), for `remove_empty`."""
    return [p for p in reversed(Path(out).absolute().parents) if not p.exists()]


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
    return Path(out).absolute().parent / f".{Path(out).absolute().name}.mbmerge-partial"


@contextlib.contextmanager
def output_lock(out: Path):
    """Hold an exclusive lock on `out` for the whole merge (a second merge into it stops at once),
    creating the folders above it; OutputLocation in one line where they cannot be made."""
    path = Path(out).absolute().parent / f".{Path(out).absolute().name}.mbmerge-lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputLocation(f"output {out}: cannot create {e.filename or path} ({e.strerror}); "
                             f"choose another --out") from None
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


def own_files(folder: Path, *names: str) -> None:
    """Add files written beside an output after it was published (tune.json, a plot) to its record, so
    a later --overwrite may replace them too."""
    record = read_record(folder)
    if record is not None:
        update_record(folder, files=sorted({*record.get("files", []), *names}))


def update_record(folder: Path, **fields) -> None:
    """Set fields of a published output's record (what its caller knows and the merge did not)."""
    record = read_record(folder)
    if record is not None:
        _write_record(folder, {**record, **fields})


def _write_record(folder: Path, record: dict) -> None:
    (Path(folder) / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished temporary folder to `out`, its record listing every file in it; an old output
    (checked again: it may have changed during the merge) is renamed aside first and removed once the
    new one is in place."""
    out = Path(out).absolute()
    record = read_record(tmp)
    if record is not None:
        record["files"] = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        _write_record(tmp, record)
    check_location(out, overwrite)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.mbmerge-old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)
