"""A shard's bytes appended in file order past the page cache (O_DIRECT), from an aligned staging buffer.

Buffered writes copy every output byte into the kernel's page cache and leave it dirty for writeback:
beside a 2-core merge of 834M parameters that was 2.6-4.4 s of system CPU for 1.7 GB of output (ties:
7.5-8.9 s against 5.3-5.5 s with the writes skipped). A direct write hands the disk the staged pages
themselves (1.6 GB in 0.8 s, 0.04 s of CPU, on the same machine). Direct writes need file offsets,
lengths and memory aligned to the device's block; ALIGN covers the usual 512 and 4096. Where the file
system refuses them (tmpfs on older kernels, some FUSE mounts) the appender writes buffered, as before.
"""
import errno
import mmap
import os

ALIGN = 4096
STAGE = 8 << 20   # bytes gathered before a direct write


class Appender:
    """Bytes appended at a shard's end, written when STAGE are gathered or on flush(). `fd` is the shard
    opened for reading and writing; the file is preallocated to `size` (flush pads its last block with
    zeros, which the next write covers, but never past `size`)."""

    def __init__(self, path, fd: int, end: int, size: int):
        self.fd, self.size = fd, size
        try:
            self.direct = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except (OSError, AttributeError):  # no O_DIRECT on this file system (or platform)
            self.direct = None
        self.buf = mmap.mmap(-1, STAGE + ALIGN)          # page-aligned
        self.base = end // ALIGN * ALIGN                 # the file offset of buf[0]: a block's start
        self.fill = end - self.base
        self.buf[:self.fill] = os.pread(fd, self.fill, self.base)   # the block's bytes written before

    def append(self, data: memoryview) -> None:
        while data:
            n = min(len(data), len(self.buf) - self.fill)
            self.buf[self.fill:self.fill + n] = data[:n]
            self.fill, data = self.fill + n, data[n:]
            if self.fill >= STAGE:
                self._write(self.fill // ALIGN * ALIGN)

    def flush(self) -> None:
        """Everything appended onto the file (the partial last block too, and kept staged)."""
        whole = self.fill // ALIGN * ALIGN
        self._write(whole)
        if self.fill:
            if self.size - self.base < ALIGN or self.direct is None:   # the file's last block: buffered, not past its end
                self._pwrite(self.fd, self.fill)
            else:
                self.buf[self.fill:ALIGN] = bytes(ALIGN - self.fill)
                self._pwrite_direct(ALIGN)

    def close(self) -> None:
        self.flush()
        self.buf.close()
        if self.direct is not None:
            os.close(self.direct)

    def _write(self, n: int) -> None:
        """Write the first n staged bytes (whole blocks) and keep the rest at the buffer's start."""
        if not n:
            return
        self._pwrite_direct(n)
        rest = self.fill - n
        self.buf[:rest] = self.buf[n:self.fill]
        self.base, self.fill = self.base + n, rest

    def _pwrite_direct(self, n: int) -> None:
        if self.direct is not None:
            try:
                return self._pwrite(self.direct, n)
            except OSError as e:
                if e.errno != errno.EINVAL:                  # EINVAL: refused after all (alignment, file system)
                    raise
                os.close(self.direct)
                self.direct = None
        self._pwrite(self.fd, min(n, self.size - self.base))

    def _pwrite(self, fd: int, n: int) -> None:
        """The first n staged bytes at the buffer's file offset."""
        with memoryview(self.buf) as view:
            pwrite_all(fd, view[:n], self.base)


def pwrite_all(fd: int, data: memoryview, pos: int) -> None:
    """data at pos, however many calls pwrite takes."""
    while data:
        n = os.pwrite(fd, data, pos)
        data, pos = data[n:], pos + n
