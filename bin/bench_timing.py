"""How `mbmerge bench` times a tool: each run its own process from a warm page cache, or with `cold` from the
disk (the inputs evicted before every run), its wall time and that process's peak RSS, the best of a few runs,
held to the first `threads` cores; and the I/O floor, the time no tool can beat on this machine: reading every
input once (from the page cache, or cold from the disk) and writing one output-sized file (cold: with fsync, as
a cold run's writes reach the disk before the next run starts)."""
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

BLOCK = 64 << 20
GB = 1e9


@dataclass(frozen=True)
class Timing:
    repeat: int = 1          # runs per tool: the best wall and the largest peak RSS are kept
    cold: bool = False       # every run (and the floor) starts with the inputs evicted from the page cache
    threads: int | None = None  # the tools run on the first `threads` cores the bench may use; None: all of them

    def cores(self) -> list[int]:
        return sorted(os.sched_getaffinity(0))[:self.threads]


def evict(files):
    """Drop the files' pages from the page cache (posix_fadvise DONTNEED needs no privileges; dirty pages are
    written first, or the kernel keeps them)."""
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(files):
    """Read every file once, into the page cache."""
    buf = bytearray(BLOCK)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def io_floor(files, out_bytes, tmp: Path, cold: bool = False) -> float:
    """Seconds to read `files` (from the warm page cache, or `cold` from the disk) and write one `out_bytes`
    file (cold: fsync'd).

    The warm floor writes buffered without fsync, as mergekit's writer (safetensors save_file) does, so a
    tool's wall holds the writeback the kernel forces while it writes (dirty pages past
    vm.dirty_background_ratio, throttling past vm.dirty_ratio) and none after it exits (on this project's
    2-core VM a buffered 2 GB write took 4.6 s, 5.4 s with fsync: most writeback is paid in the write).
    mbmerge's writer writes past the page cache (O_DIRECT: each write waits for the disk), which this floor
    does not ask of itself. Once timed, the floor waits for its writeback and only then deletes the file,
    which used to drop its dirty pages unwritten: each floor leaves the disk idle, as timed_run's sync leaves
    it for the tools."""
    warm(files)
    if cold:
        evict(files)
    os.sync()
    block, t = bytes(BLOCK), time.perf_counter()
    warm(files)
    with open(tmp / "floor.bin", "wb", buffering=0) as fh:
        for off in range(0, out_bytes, BLOCK):
            fh.write(block[:min(BLOCK, out_bytes - off)])
        if cold:
            os.fsync(fh.fileno())
        elapsed = time.perf_counter() - t
        os.fsync(fh.fileno())
    (tmp / "floor.bin").unlink()
    return elapsed


# Runs argv[1:] and prints "wall_s maxrss_KiB exit_code". It runs in a fresh small interpreter because
# ru_maxrss counts the memory of the process that exec'd the command: a child spawned straight from this
# process would report this process's peak (measured: `python -c pass` from a parent that had held 2 GB: 2.1 GB).
LAUNCHER = ("import os, subprocess, sys, time; t = time.perf_counter(); "
            "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); _, status, ru = os.wait4(p.pid, 0); "
            "print(time.perf_counter() - t, ru.ru_maxrss, os.waitstatus_to_exitcode(status))")


@contextlib.contextmanager
def busy_processes(n: int):
    """n processes spinning on the CPU while the block runs."""
    spinning = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in spinning:
            p.kill()
            p.wait()


def timed_run(cmd, files, out: Path, cold: bool = False, cores: list[int] | None = None) -> tuple[float, float]:
    """(wall s, peak RSS GB) of one process, started from a warm cache (or `cold`, with the inputs evicted) with
    no dirty pages pending, on `cores` (None: all the bench may use)."""
    shutil.rmtree(out, ignore_errors=True)
    evict(files) if cold else warm(files)
    os.sync()
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None      # inherited by the tool
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True, preexec_fn=pin)
    wall, maxrss, code = done.stdout.split() if done.returncode == 0 else (0, 0, "?")
    if code != "0":
        raise click.ClickException(f"{cmd[0]} failed (exit {code}):\n{done.stderr[-2000:]}")
    return float(wall), int(maxrss) * 1024 / 1e9                               # ru_maxrss is in KiB on Linux


def best_of(timing: Timing, cmd, files, out):
    """min wall, max peak RSS, every wall over `timing.repeat` runs, and the last run's mbmerge.json ({} if none);
    the output is then removed, so at most one exists at a time."""
    runs = [timed_run(cmd, files, out, timing.cold, timing.cores()) for _ in range(timing.repeat)]
    card = json.loads((out / "mbmerge.json").read_text()) if (out / "mbmerge.json").is_file() else {}
    shutil.rmtree(out, ignore_errors=True)
    return min(w for w, _ in runs), max(r for _, r in runs), [round(w, 3) for w, _ in runs], card


def mbmerge_head() -> list[str]:
    """The mbmerge command of this interpreter's environment."""
    exe = Path(sys.executable).with_name("mbmerge")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from mbmerge.bin.cli import main; main()"]


def floor_row(case: str, files, out_bytes: int, timing: Timing, tmp: Path) -> dict:
    """A case's row begun: its input size, the tools' thread count and the I/O floor (the best of at least three)."""
    row = {"method": case, "input_GB": sum(f.stat().st_size for f in files) / GB, "threads": len(timing.cores()),
           "floor_s": min(io_floor(files, out_bytes, tmp, timing.cold) for _ in range(max(3, timing.repeat)))}
    row["floor_in_GBps"] = row["input_GB"] / row["floor_s"]
    return row


def time_tool(row: dict, tool: str, timing: Timing, cmd, files, out: Path) -> dict:
    """`tool`'s figures (tool_s, tool_rss_GB, tool_walls, tool_in_GBps) added to the row; the speed-up and the
    RSS ratio once both mbmerge and mergekit have run. Returns the last run's mbmerge.json."""
    row[f"{tool}_s"], row[f"{tool}_rss_GB"], row[f"{tool}_walls"], card = best_of(timing, cmd, files, out)
    row[f"{tool}_in_GBps"] = row["input_GB"] / row[f"{tool}_s"]
    if tool == "mbmerge":
        row["x_floor"] = row["mbmerge_s"] / row["floor_s"]
        row["floor_pct"] = 100 / row["x_floor"]
    if "mbmerge_s" in row and "mergekit_s" in row:
        row["speedup"] = row["mergekit_s"] / row["mbmerge_s"]
        row["rss_ratio"] = row["mbmerge_rss_GB"] / row["mergekit_rss_GB"]
    return card
