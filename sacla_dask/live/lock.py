"""One writer per result store: an advisory lock the kernel releases when its holder dies.

``process`` and ``follow`` take :func:`store_lock` on their ``--out`` for as
long as they write it. The lock is ``fcntl.flock`` on a small file beside
the store (``.NAME.lock`` in the store's folder): the kernel drops it when
the process exits, however it exits (SIGKILL included), so a killed writer
never leaves a stuck lock, and the file left behind is harmless. It sits
beside the store, not inside, because ``--overwrite`` removes the store's
folder (a lock file inside would vanish while held, and a second writer
could lock a new one) and because a folder holding only a lock file is not
an empty store. The file holds the holder's pid and command, for the
message a second writer gets.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator

from ..errors import OutputError


class StoreLockedError(OutputError):
    """Another process is writing the store."""


def lock_path(store: str | os.PathLike[str]) -> str:
    """The lock file of ``store``: ``.NAME.lock`` beside it (its real path)."""
    p = os.path.realpath(os.fspath(store)).rstrip(os.sep)
    folder, name = os.path.split(p)
    return os.path.join(folder, f".{name}.lock")


@contextlib.contextmanager
def store_lock(store: str | os.PathLike[str], what: str = "") -> Iterator[None]:
    """Hold the write lock of ``store`` for the block; refuse if another process holds it.

    Raises
    ------
    StoreLockedError
        Another live process holds it (its pid and command in the message).
    """
    path = lock_path(store)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):  # (prepare_output says what is wrong with the folder)
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise StoreLockedError(
                f"output store {os.fspath(store)!r} is being written by another process "
                f"({holder}); one writer per store: wait for it to finish or stop it "
                "(a killed writer releases the lock), or choose another --out") from None
        os.ftruncate(fd, 0)
        cmd = what or " ".join(os.path.basename(a) if i == 0 else a
                               for i, a in enumerate(sys.argv[:4]))
        os.pwrite(fd, f"pid {os.getpid()}, '{cmd}' since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)  # (closing the descriptor releases the lock)


__all__ = ["StoreLockedError", "lock_path", "store_lock"]
