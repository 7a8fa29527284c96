"""A shard's bytes appended in file order past the page cache (O_DIRECT), from aligned staging buffers
that a disk thread writes while the next fill.

Buffered writes copy every output byte into the kernel's page cache and leave it dirty for writeback:
beside a 2-core merge of 834M parameters that was 2.6-4.4 s of system CPU for 1.7 GB of output (ties:
7.5-8.9 s against 5.3-5.5 s with the writes skipped). A direct write hands the disk the staged pages
themselves (1.6 GB in 0.8 s, 0.04 s of CPU, on the same machine). Direct writes need file offsets,
lengths and memory aligned to the device's block; ALIGN covers the usual 512 and 4096. Where the file
system refuses them (tmpfs on older kernels, some FUSE mounts) the appender writes buffered, as before.

The writes wait on the disk, so they run on the appender's own thread, two buffers of STAGE taking
turns: the caller (the merge's writer thread, which also hashes) fills one while the other is written
(linear merge of 834M parameters, 2 cores: the writer thread was the bottleneck, 3.4 s with the writes
in line against 2.2 s without them).
"""
import errno
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor

ALIGN = 4096
STAGE = 4 << 20   # bytes gathered before a direct write; two buffers of it


class Appender:
    """Bytes appended at a shard's end, written when STAGE are gathered, on flush() or on then(). `fd` is
    the shard opened for reading and writing; the file is preallocated to `size` (a flush pads its last
    block with zeros, which a later write covers, but never past `size`)."""

    def __init__(self, path, fd: int, end: int, size: int):
        self.path, self.fd, self.size = path, fd, size
        try:
            self.direct = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except (OSError, AttributeError):  # no O_DIRECT on this file system (or platform)
            self.direct = None
        self.bufs = [mmap.mmap(-1, STAGE + ALIGN) for _ in range(2)]   # page-aligned
        self.busy: list[Future | None] = [None, None]   # each buffer's last job on the disk thread
        self.cur, self.failed, self.error = 0, False, None
        self.disk = ThreadPoolExecutor(1, thread_name_prefix="mbmerge-disk")   # jobs run in order
        self.base = end // ALIGN * ALIGN                 # the file offset of buf[0]: a block's start
        self.fill = end - self.base
        self.buf[:self.fill] = os.pread(fd, self.fill, self.base)   # the block's bytes written before

    @property
    def buf(self) -> mmap.mmap:
        return self.bufs[self.cur]

    def append(self, data: memoryview) -> None:
        while data:
            n = min(len(data), len(self.buf) - self.fill)
            self.buf[self.fill:self.fill + n] = data[:n]
            self.fill, data = self.fill + n, data[n:]
            if self.fill >= STAGE:
                self._write(self.fill // ALIGN * ALIGN)

    def then(self, fn) -> None:
        """fn() on the disk thread once everything appended so far is in the file (the partial last block
        too, and kept staged): the caller goes on meanwhile. Not after a failed write: the error is
        raised by the next call."""
        self._write(self.fill // ALIGN * ALIGN)
        if self.fill:
            if self.size - self.base < ALIGN or self.direct is None:   # the file's last block: buffered, not past its end
                self._job(self._pwrite, self.fd, self.buf, self.base, self.fill)
            else:
                # the zeros past fill go to the disk now; bytes appended later over them (racing the write)
                # are written again, whole, by a later job
                self.buf[self.fill:ALIGN] = bytes(ALIGN - self.fill)
                self._job(self._pwrite_direct, self.buf, self.base, ALIGN)
        self._job(fn)

    def flush(self) -> None:
        """Everything appended onto the file (the partial last block too, and kept staged), waited for."""
        self.then(lambda: None)
        self._wait(self.cur)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.disk.shutdown()
            for b in self.bufs:
                b.close()
            if self.direct is not None:
                os.close(self.direct)

    def _write(self, n: int) -> None:
        """Hand the first n staged bytes (whole blocks) to the disk thread; the rest moves to the start of the
        other buffer, which becomes the one filled."""
        if not n:
            return
        other = 1 - self.cur
        self._wait(other)
        rest = self.fill - n
        self.bufs[other][:rest] = self.buf[n:self.fill]
        self._job(self._pwrite_direct, self.buf, self.base, n)
        self.cur, self.base, self.fill = other, self.base + n, rest

    def _job(self, fn, *args) -> None:
        """fn(*args) on the disk thread after the jobs before it, unless one of them failed."""
        self._raise()

        def run():
            if not self.failed:
                try:
                    fn(*args)
                except BaseException as e:  # raised by the caller's next call; no job runs after it
                    # without its frames, which hold views of the staging buffers (closed in close())
                    self.failed, self.error = True, e.with_traceback(None)
        self.busy[self.cur] = self.disk.submit(run)

    def _wait(self, i: int) -> None:
        """Until buffer i's jobs are done (and every job before them)."""
        if self.busy[i] is not None:
            self.busy[i].result()
            self.busy[i] = None
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:     # once
            error, self.error = self.error, None
            raise error

    def _pwrite_direct(self, buf: mmap.mmap, base: int, n: int) -> None:
        if self.direct is not None:
            try:
                return self._pwrite(self.direct, buf, base, n)
            except OSError as e:
                if e.errno != errno.EINVAL:                  # EINVAL: refused after all (alignment, file system)
                    raise
                os.close(self.direct)
                self.direct = None
        self._pwrite(self.fd, buf, base, min(n, self.size - base))

    def _pwrite(self, fd: int, buf: mmap.mmap, base: int, n: int) -> None:
        """The first n bytes of a staging buffer at file offset `base`."""
        with memoryview(buf) as view:
            pwrite_all(fd, view[:n], base, self.path)


def pwrite_all(fd: int, data: memoryview, pos: int, path) -> None:
    """data at pos of the file `path` (opened as fd), however many calls pwrite takes; an error names the file
    (pwrite names none: a full disk's line would not say which)."""
    try:
        while data:
            n = os.pwrite(fd, data, pos)
            data, pos = data[n:], pos + n
    except OSError as e:
        e.filename = str(path)
        raise
