"""Warm the page cache with a run's first images while the command starts up.

A command spends its first second or two importing the scientific stack and
planning; on a run that is not in the page cache the disk would sit idle
all that time. :func:`start_prefetch` is called first thing: in a
background thread it finds where the first images of the run lie in their
files and asks the kernel to read them ahead (``posix_fadvise(WILLNEED)``,
which returns at once; the kernel reads asynchronously), so the first
chunks' reads find them in memory. Only contiguous, unfiltered detector
datasets have byte ranges to hint; anything else is left to HDF5. On a
warm file the first images are found cached and nothing is hinted.

This module imports only numpy and h5py, so that it can run before the rest
of the package is imported.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from typing import Any

#: images found already cached, in a row, after which a warm file is left alone
_WARM_AFTER = 3
_TAG = re.compile(r"^tag_(\d+)$")


def start_prefetch(paths: Sequence[str], first_tag: int | None = None,
                   nbytes: int | None = None) -> threading.Thread | None:
    """Start reading the first images of ``paths`` ahead, in a daemon thread.

    Parameters
    ----------
    paths : sequence of str
        The run's files, in the order their tags are processed.
    first_tag : int, optional
        Start at this tag (``--tag-range``); default the first.
    nbytes : int, optional
        Bytes of images to hint at most; default the setting
        ``sacla_dask.read.prefetch-bytes``, at most a quarter of the free
        memory. 0 turns prefetching off.

    Returns
    -------
    threading.Thread or None
        The thread (None where there is nothing to do: no ``posix_fadvise``).
        Errors in it are swallowed: prefetching is only a hint, and the real
        reads report any problem with the file.
    """
    if not hasattr(os, "posix_fadvise") or not paths:
        return None
    t = threading.Thread(target=_prefetch, args=(list(paths), first_tag, nbytes),
                         name="sacla-dask-prefetch", daemon=True)
    t.start()
    return t


def _budget(nbytes: int | None) -> int:
    if nbytes is None:
        from .. import config

        if not config.get_bool("read.direct"):
            return 0
        nbytes = config.get_bytes("read.prefetch-bytes")
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        nbytes = min(nbytes, free // 4)
    except (ValueError, OSError):
        pass
    return max(0, int(nbytes))


def _prefetch(paths: list[str], first_tag: int | None, nbytes: int | None) -> None:
    try:
        budget = _budget(nbytes)
        for path in paths:
            if budget <= 0:
                return
            budget = _prefetch_file(path, first_tag, budget)
    except Exception:  # noqa: BLE001 - a hint only: the real reads report problems
        return


def _cached(fd: int, offset: int, size: int) -> bool:
    """Whether the last page of ``offset:offset+size`` is in the page cache."""
    flag = getattr(os, "RWF_NOWAIT", 0)
    if not flag or not hasattr(os, "preadv"):
        return False
    buf = bytearray(4096)
    try:
        return os.preadv(fd, [buf], max(offset, offset + size - 4096), flag) > 0
    except OSError:
        return False


def _prefetch_file(path: str, first_tag: int | None, budget: int) -> int:
    """Hint the images of one file in tag order; returns the budget left."""
    import h5py

    with h5py.File(path, "r") as fh:
        fd = os.open(path, os.O_RDONLY)
        try:
            warm = 0
            for det in _detector_groups(fh):
                tags = sorted(int(m.group(1)) for m in map(_TAG.match, det) if m)
                for tag in tags:
                    if first_tag is not None and tag < first_tag:
                        continue
                    dsid = h5py.h5d.open(det.id, f"tag_{tag}/detector_data".encode())
                    if dsid.get_create_plist().get_layout() != h5py.h5d.CONTIGUOUS:
                        return 0  # chunked or compressed: HDF5 reads these itself
                    offset, size = dsid.get_offset(), dsid.get_storage_size()
                    if offset is None or size == 0:
                        continue
                    if _cached(fd, offset, size):
                        warm += 1
                        if warm >= _WARM_AFTER:
                            return 0
                        continue
                    warm = 0
                    os.posix_fadvise(fd, offset, size, os.POSIX_FADV_WILLNEED)
                    budget -= size
                    if budget <= 0:
                        return 0
        finally:
            os.close(fd)
    return budget


def _detector_groups(fh: Any) -> list[Any]:
    """The assembled-detector groups of a DataConvert file, by run."""
    import numpy as np

    out = []
    for rn in np.atleast_1d(fh["file_info/run_number_list"][()]):
        name = f"run_{int(rn)}/detector_2d_assembled_1"
        if name in fh:
            out.append(fh[name])
    return out
