"""The output Appender: bytes appended in file order land exactly as a plain write would put them,
through direct writes of whole aligned blocks where the file system takes them, buffered otherwise."""
import errno
import os

import pytest

from mbmerge.engine.output import direct
from mbmerge.engine.output.direct import ALIGN, Appender


@pytest.fixture
def small_stage(monkeypatch):
    monkeypatch.setattr(direct, "STAGE", 4 * ALIGN)     # several direct writes in a small file


@pytest.fixture
def pwrites(monkeypatch):
    """Every pwrite: (fd, bytes, file offset)."""
    calls, real = [], os.pwrite

    def spy(fd, data, pos):
        calls.append((fd, len(data), pos))
        return real(fd, data, pos)
    monkeypatch.setattr(os, "pwrite", spy)
    return calls


def preallocated(path, size: int, head: bytes) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, size)
    os.pwrite(fd, head, 0)
    return fd


@pytest.mark.parametrize("size,head,pieces", [
    (9 * ALIGN + 123, 5000, [1, 7, 3000, 20000, 4096, 77]),      # a head past one block, odd pieces
    (4 * ALIGN, 8, [4 * ALIGN - 8]),                              # one piece filling a block-sized file
    (100, 8, [50, 42]),                                           # a file shorter than a block
])
def test_appended_bytes_are_the_file_a_plain_write_gives(tmp_path, small_stage, pwrites, size, head, pieces):
    path, data = tmp_path / "shard", os.urandom(size)
    fd = preallocated(path, size, data[:head])
    a, at = Appender(path, fd, head, size), head
    took_direct, pwrites[:] = a.direct is not None, []
    for i, n in enumerate(pieces):
        a.append(memoryview(data)[at:at + n])
        at += n
        if i % 2:
            a.flush()                                             # as after each tensor: all in the file
            assert path.read_bytes()[:at] == data[:at]
            assert os.path.getsize(path) == size                  # padding never grows the file
    a.close()
    os.close(fd)
    want = data[:at] + bytes(size - at)                           # the rest: the preallocated zeros
    assert path.read_bytes() == want
    if took_direct and size >= ALIGN:                             # the file system takes direct writes:
        assert any(f != fd for f, _, _ in pwrites)
        assert all(n % ALIGN == 0 and pos % ALIGN == 0 for f, n, pos in pwrites if f != fd)   # whole blocks
        assert all(pos >= size // ALIGN * ALIGN for f, n, pos in pwrites if f == fd)   # buffered: the last block


def test_without_direct_writes_it_writes_buffered(tmp_path, small_stage, monkeypatch):
    """A file system that refuses O_DIRECT at open, or at the first write (EINVAL): the same bytes."""
    size = 6 * ALIGN + 10
    data = os.urandom(size)
    real_open, real_pwrite, direct_fds = os.open, os.pwrite, set()

    def refused(*_):
        raise OSError(errno.EINVAL, "Invalid argument")

    def open_refusing_direct(path, flags, *mode):
        return refused() if flags & os.O_DIRECT else real_open(path, flags, *mode)

    def pwrite_refusing_direct(fd, data, pos):
        return refused() if fd in direct_fds else real_pwrite(fd, data, pos)

    for refusal in ("open", "write"):
        path = tmp_path / refusal
        fd = preallocated(path, size, data[:100])
        with monkeypatch.context() as m:
            if refusal == "open":
                m.setattr(os, "open", open_refusing_direct)
            a = Appender(path, fd, 100, size)
            direct_fds.add(a.direct)
            m.setattr(os, "pwrite", pwrite_refusing_direct)
            a.append(memoryview(data)[100:])
            a.close()
        os.close(fd)
        assert path.read_bytes() == data and a.direct is None


def test_then_runs_once_the_bytes_are_in_the_file_while_appending_goes_on(tmp_path, small_stage):
    """then(fn): fn on the disk thread after every earlier write, in order, while the caller keeps appending
    (the journal's line for a tensor follows its bytes)."""
    size = 40 * ALIGN + 321
    path, data = tmp_path / "shard", os.urandom(size)
    fd = preallocated(path, size, data[:10])
    seen, at = [], 10
    a = Appender(path, fd, at, size)
    for n in [5000, 3 * ALIGN, 17, 9 * ALIGN + 5, 1, 20 * ALIGN, size - 10 - 5000 - 12 * ALIGN - 23 - 20 * ALIGN]:
        a.append(memoryview(data)[at:at + n])
        at += n
        a.then(lambda end=at: seen.append((end, path.read_bytes()[:end] == data[:end])))
    a.close()
    os.close(fd)
    assert at == size and path.read_bytes() == data
    assert [end for end, _ in seen] == sorted(end for end, _ in seen) and len(seen) == 7   # in order, each once
    assert all(ok for _, ok in seen)


def test_a_failed_write_is_raised_once_and_nothing_after_it_runs(tmp_path, small_stage, monkeypatch):
    size = 30 * ALIGN
    path, data = tmp_path / "shard", os.urandom(size)
    fd = preallocated(path, size, b"")
    real_pwrite, after = os.pwrite, []

    def full_disk(fd_, chunk, pos):
        if pos >= 8 * ALIGN:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd_, chunk, pos)
    monkeypatch.setattr(os, "pwrite", full_disk)
    a = Appender(path, fd, 0, size)
    with pytest.raises(OSError, match="No space left"):
        a.append(memoryview(data)[:4 * ALIGN])
        a.then(lambda: after.append("first"))        # before the failing write: runs
        a.append(memoryview(data)[4 * ALIGN:20 * ALIGN])
        a.then(lambda: after.append("second"))       # after it: never runs
        a.flush()
    a.close()                                        # raised once: closing after it is quiet
    os.close(fd)
    assert after == ["first"]
    assert path.read_bytes()[:4 * ALIGN] == data[:4 * ALIGN]
