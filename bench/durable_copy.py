#!/usr/bin/env python3
"""The disk's durable-write ceiling, for scale: copies every file of SRC into
DST with O_DIRECT and fdatasync per file (then syncs DST), the way a Caravan
fetch lands data, with no network, no crypto and no verification.

It is about as fast as one stream of durable writes lands on this disk (a
fetch may write several files at once), so it is reported beside the tools,
never counted as one of them.

    durable_copy.py SRC DST     # prints the copy's seconds (without the
                                # interpreter's start, which no tool pays)
"""
import mmap
import os
import sys
import time

BLOCK = 8 << 20
ALIGN = 4096


def copy(src: str, dst: str, buf: mmap.mmap) -> None:
    size = os.path.getsize(src)
    fd_in = os.open(src, os.O_RDONLY)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0)
    fd_out = os.open(dst, flags, 0o644)
    try:
        view = memoryview(buf)
        done = 0
        while done < size:
            n = os.readv(fd_in, [view[:BLOCK]])
            if n <= 0:
                break
            # O_DIRECT wants whole blocks: the tail is written padded and
            # the file cut back to its length.
            padded = (n + ALIGN - 1) // ALIGN * ALIGN
            if padded > n:
                view[n:padded] = bytes(padded - n)
            os.pwritev(fd_out, [view[:padded]], done)
            done += n
        os.ftruncate(fd_out, size)
        os.fdatasync(fd_out)
    finally:
        os.close(fd_in)
        os.close(fd_out)


def main() -> None:
    src, dst = sys.argv[1:3]
    t0 = time.monotonic()
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
    for root, _dirs, files in os.walk(src):
        out = os.path.join(dst, os.path.relpath(root, src))
        os.makedirs(out, exist_ok=True)
        for name in sorted(files):
            copy(os.path.join(root, name), os.path.join(out, name), buf)
    for root, dirs, _files in os.walk(dst):
        for d in [root] + [os.path.join(root, x) for x in dirs]:
            fd = os.open(d, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    print(f"{time.monotonic() - t0:.6f}")


if __name__ == "__main__":
    main()
