"""Reading a file whole, safely: a regular file of a sane size, or one clear DataError naming it.

Every text file mlc reads (CSVs, labels files, captions files, JSON) goes through ``read_bytes``. A FIFO
would block the reader forever, ``/dev/zero`` never ends and a 40 GB "CSV" would eat all memory, so the
file is checked with ``stat`` (following links, as a reader would), opened without blocking, checked again
on the descriptor (a file swapped in between cannot slip through), and read no further than its limit.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import DataError

MiB = 1 << 20
CSV_BYTES = 1024 * MiB  # a CSV of captions: the competition's train.csv is 2 MB; ten million rows fit
LABELS_BYTES = 16 * MiB  # a labels file: one short line a label
JSON_BYTES = 64 * MiB  # every JSON file mlc writes is under a megabyte


def kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def _size(n: int) -> str:
    return f"{n / MiB:,.0f} MiB" if n >= MiB else f"{n:,} bytes"


def _refuse(path: Path, mode: int, size: int, limit: int, what: str) -> None:
    if not stat.S_ISREG(mode):
        raise DataError(str(path), None, f"not a regular file ({kind(mode)}); mlc reads a {what} only from one")
    if size > limit:
        raise DataError(str(path), None, f"{_size(size)}, more than any real {what} holds (mlc reads at most "
                                         f"{_size(limit)}); is it the right file?")


def read_bytes(path: str | os.PathLike[str], *, limit: int, what: str = "file") -> bytes:
    """The bytes of ``path``: DataError naming it when it is no regular file (FIFO, device, socket, folder)
    or holds more than ``limit`` bytes; OSError (FileNotFoundError, PermissionError) as ``open`` raises it."""
    path = Path(path)
    st = os.stat(path)
    _refuse(path, st.st_mode, st.st_size, limit, what)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        _refuse(path, st.st_mode, st.st_size, limit, what)
        data = fh.read(limit + 1)
    if len(data) > limit:  # it grew while being read
        _refuse(path, stat.S_IFREG, len(data), limit, what)
    return data


def read_text(path: str | os.PathLike[str], *, limit: int, what: str = "file", encoding: str = "utf-8") -> str:
    """``read_bytes`` decoded; UnicodeDecodeError (a ValueError) when it is not ``encoding``."""
    return read_bytes(path, limit=limit, what=what).decode(encoding)
