"""Interrupted merges resume bit-identically; what cannot be trusted is redone; faults leave nothing
behind. Merges are killed for real (SIGKILL, in a subprocess) at chosen writes: mid-tensor, after
the first output shard, right after the model-wide thresholds pass."""
import errno
import json
import os
import resource
import signal
import subprocess
import sys

import pytest

import mbmerge
from mbmerge.common.errors import InputChanged, OutputBusy
from mbmerge.engine.output.place import output_lock

# Runs the mbmerge command, but SIGKILLs itself at the KILL_AT-th chunk write, or at the first write
# into the KILL_IN_SHARD-th output shard (counted from 1).
KILLER = """
import os, signal, sys
import mbmerge.engine.output.write as w
at, shard = int(os.environ.get("KILL_AT", 0)), int(os.environ.get("KILL_IN_SHARD", 0))
calls, shards, write = [0], [], w.ShardWriter.write
def killing_write(self, t, start, values):
    calls[0] += 1
    if t.shard not in shards:
        shards.append(t.shard)
    if calls[0] == at or len(shards) == shard:
        os.kill(os.getpid(), signal.SIGKILL)
    write(self, t, start, values)
w.ShardWriter.write = killing_write
from mbmerge.bin.cli import main
sys.argv[0] = "mbmerge"
main()
"""


def args(wide, out, *extra, method="ties"):
    p = wide["paths"]
    return ["--method", method, "--base", str(p["base"]), "--experts", f"{p['e0']},{p['e1']},{p['e2']}",
            "--out", str(out), "--memory-budget", "100KB", "-q", *extra]       # 4096-element chunks


def run(argv, env=None, **kw):
    return subprocess.run([sys.executable, "-c", KILLER, *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, **kw)


def weights(folder):
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.suffix in (".safetensors", ".json")
            and f.name != "mbmerge.json"}


@pytest.fixture(scope="module")
def clean(wide_family, tmp_path_factory):
    """Uninterrupted outputs, per extra arguments."""
    cache = {}

    def get(*extra, method="ties"):
        key = (method, extra)
        if key not in cache:
            out = tmp_path_factory.mktemp("clean") / "out"
            assert run(args(wide_family, out, *extra, method=method)).returncode == 0
            cache[key] = weights(out)
        return cache[key]
    return get


@pytest.mark.parametrize("kill, extra", [
    ({"KILL_AT": "7"}, ()),                                   # mid-tensor: the first tensor has 5 chunks
    ({"KILL_IN_SHARD": "2"}, ()),                             # the first shard complete, nothing of the second
    ({"KILL_AT": "1"}, ("--sparsify-scope", "model")),        # right after the model-wide thresholds
    ({"KILL_AT": "12"}, ("--sparsify-scope", "model")),
])
def test_killed_merge_resumes_to_identical_bytes(wide_family, tmp_path, clean, kill, extra):
    out = tmp_path / "out"
    killed = run(args(wide_family, out, *extra), env=kill)
    assert killed.returncode == -signal.SIGKILL
    partial = tmp_path / ".out.mbmerge-partial"
    assert partial.is_dir() and not out.exists()
    journal = [json.loads(line) for line in (partial / "mbmerge-journal.jsonl").read_text().splitlines()]
    assert ("--sparsify-scope" in extra) == any("thresholds" in r for r in journal)
    done = sum("tensor" in r for r in journal)
    resumed = run(args(wide_family, out, *extra))
    assert resumed.returncode == 0, resumed.stderr
    assert weights(out) == clean(*extra)
    assert json.loads((out / "mbmerge.json").read_text())["resumed_tensors"] == done
    assert not partial.exists() and not (tmp_path / ".out.mbmerge-lock").exists()


def test_a_changed_recipe_or_input_starts_over(wide_family, tmp_path, clean):
    out = tmp_path / "out"
    assert run(args(wide_family, out), env={"KILL_IN_SHARD": "2"}).returncode == -signal.SIGKILL
    changed = run(args(wide_family, out, "--density", "0.3"))
    assert changed.returncode == 0 and "starting over" in changed.stderr
    assert weights(out) == clean("--density", "0.3")
    assert json.loads((out / "mbmerge.json").read_text())["resumed_tensors"] == 0

    out2 = tmp_path / "out2"
    assert run(args(wide_family, out2), env={"KILL_IN_SHARD": "2"}).returncode == -signal.SIGKILL
    shard = sorted(wide_family["paths"]["e1"].glob("*.safetensors"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    again = run(args(wide_family, out2))
    assert again.returncode == 0 and "starting over" in again.stderr and weights(out2) == clean()


def test_corrupted_journaled_bytes_are_redone_and_no_resume_starts_over(wide_family, tmp_path, clean):
    out = tmp_path / "out"
    assert run(args(wide_family, out), env={"KILL_IN_SHARD": "2"}).returncode == -signal.SIGKILL
    partial = tmp_path / ".out.mbmerge-partial"
    shard = sorted(partial.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF                                            # inside the first shard's last tensor
    shard.write_bytes(bytes(data))
    fixed = run(args(wide_family, out))
    assert fixed.returncode == 0 and weights(out) == clean()
    journal_done = json.loads((out / "mbmerge.json").read_text())["resumed_tensors"]
    assert 0 < journal_done

    out2 = tmp_path / "out2"
    assert run(args(wide_family, out2), env={"KILL_IN_SHARD": "2"}).returncode == -signal.SIGKILL
    fresh = run(args(wide_family, out2, "--no-resume"))
    assert fresh.returncode == 0 and "starting over" in fresh.stderr and weights(out2) == clean()


def test_keyboard_interrupt_keeps_the_partial_merge(wide_family, tmp_path, clean, monkeypatch):
    import mbmerge.engine.output.write as w
    calls, write = [0], w.ShardWriter.write

    def interrupted(self, t, start, values):
        calls[0] += 1
        if calls[0] == 9:
            raise KeyboardInterrupt
        write(self, t, start, values)
    monkeypatch.setattr(w.ShardWriter, "write", interrupted)
    p, out = wide_family["paths"], tmp_path / "out"
    kw = dict(base=str(p["base"]), experts=[str(p[e]) for e in ("e0", "e1", "e2")], out=out, progress=False,
              memory_budget="100KB")
    with pytest.raises(KeyboardInterrupt):
        mbmerge.merge("ties", **kw)
    assert (tmp_path / ".out.mbmerge-partial").is_dir() and not out.exists()
    monkeypatch.setattr(w.ShardWriter, "write", write)
    mbmerge.merge("ties", **kw)
    assert weights(out) == clean()


def test_a_second_merge_into_the_same_output_is_refused(wide_family, tmp_path):
    p, out = wide_family["paths"], tmp_path / "out"
    with output_lock(out):
        with pytest.raises(OutputBusy, match=f"output {out} is being written by another mbmerge \\(pid {os.getpid()}\\)"):
            mbmerge.merge("ties", base=str(p["base"]), experts=[str(p["e0"])], out=out, progress=False)
    assert not out.exists() and not (tmp_path / ".out.mbmerge-partial").exists()


def test_an_input_changed_during_the_merge_is_refused(wide_family, tmp_path, monkeypatch):
    import mbmerge.engine.execute as ex
    shard = sorted(wide_family["paths"]["e0"].glob("*.safetensors"))[0]
    run_ = ex.Merger.run

    def touching_run(self, *a, **kw):
        run_(self, *a, **kw)
        os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    monkeypatch.setattr(ex.Merger, "run", touching_run)
    p, out = wide_family["paths"], tmp_path / "out"
    with pytest.raises(InputChanged, match=f"input {shard.resolve()} changed while it was being merged"):
        mbmerge.merge("ties", base=str(p["base"]), experts=[str(p["e0"])], out=out, progress=False)
    assert not out.exists() and not (tmp_path / ".out.mbmerge-partial").exists()


def test_disk_full_is_one_line_and_leaves_nothing(wide_family, tmp_path):
    def small_files():                     # the output shards (about 40 KiB each) cannot be allocated
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))
    out = tmp_path / "sub" / "out"
    r = run(args(wide_family, out, "--memory-budget", "320KB"), preexec_fn=small_files)   # one chunk: no notice
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"mbmerge: error: {os.strerror(errno.EFBIG)}: ")
    assert ".out.mbmerge-partial" in r.stderr
    assert list(tmp_path.iterdir()) == []                     # no output, no partial folder, no parent made
