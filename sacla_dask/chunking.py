"""How many tags a chunk of a run holds: a count of tags, bytes, or ``"auto"``.

A tag chunk is the unit of a run's graph (one task reads, transforms and
normalises its tags), of what a worker holds (its float32 polar block), and
of resumption (a store is written chunk by chunk). The sizing rule's
numbers are settings of Dask's configuration (:mod:`sacla_dask.config`,
``sacla_dask.chunks.*``), read when a plan is made (in the client), not at
import:

``auto-bytes``
    ``chunks="auto"``: this many bytes of polar images per task ...
``auto-min-tags``
    ... but at least this many tags where a worker thread's memory allows
    (per tag chunk the graph has a few tasks and a fixed cost) ...
``auto-memory-fraction``
    ... as long as the chunk's polar block is at most this fraction of
    that memory (Dask spills at 60-70 % of a worker's memory limit).
``min-tags``, ``min-chunks``
    A size in bytes or ``"auto"`` never makes chunks of fewer tags than
    ``min-tags`` (a chunk's float64 partial sums of the correlation weigh
    as much as 4 polar images) nor fewer than ``min-chunks`` chunks (a
    short run still keeps several workers busy).
"""

from __future__ import annotations

import math

import dask

from . import config
from .errors import ParameterError
from .scheduling import memory_per_thread


def parse_chunk_size(chunk_size: int | str, image_nbytes: int) -> int:
    """Tags per chunk for a chunk size in tags (int) or bytes (``"256MiB"``).

    Bytes are parsed by :func:`dask.utils.parse_bytes`; a size smaller than
    one image gives one tag per chunk.
    """
    if isinstance(chunk_size, str):
        try:
            nbytes = dask.utils.parse_bytes(chunk_size)
        except (ValueError, TypeError):
            raise ParameterError(
                f"chunk size {chunk_size!r} is not a size such as '256MiB' or a number of tags"
            ) from None
        if nbytes <= 0:
            raise ParameterError(f"chunk size must be positive (got {chunk_size!r})")
        return max(1, int(nbytes // max(1, image_nbytes)))
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1:
        raise ParameterError(f"chunk size must be >= 1 tag (got {chunk_size!r})")
    return int(chunk_size)


def is_auto(chunks: int | str) -> bool:
    """Whether ``chunks`` asks for the default chunking (``"auto"``)."""
    return isinstance(chunks, str) and chunks.strip().lower() == "auto"


def tags_per_chunk(chunks: int | str, n_tags: int, polar_shape: tuple[int, int],
                   memory: int | None = None) -> int:
    """Tags per task for ``chunks`` in a run of ``n_tags``.

    Parameters
    ----------
    chunks : int or str
        Tags, bytes of float32 polar images (``"128MiB"``: the block a task
        holds, since it reads its tags one by one), or ``"auto"``.
    n_tags : int
        Tags in the run.
    polar_shape : (nq, nphi)
        The polar grid (bins).
    memory : int, optional
        Bytes per worker thread for ``"auto"`` (default: those of the active
        scheduler, :func:`sacla_dask.scheduling.memory_per_thread`; not
        known: ``auto-bytes`` is not raised to ``auto-min-tags``).

    Notes
    -----
    With the defaults (module docstring): the 40 x 5000 ring band (0.8 MB
    per image), 41 tags; the 1000 x 6912 wide band (27.6 MB per image), 16
    tags with 4.3 GiB or more per worker thread, 7 with 2 GiB, never fewer
    than 4.
    """
    nq, nphi = polar_shape
    image = nq * nphi * 4
    if is_auto(chunks):
        per = max(1, config.get_bytes("chunks.auto-bytes") // image)
        min_tags = int(config.get("chunks.auto-min-tags"))
        if per < min_tags:
            mem = memory_per_thread() if memory is None else memory
            fraction = float(config.get("chunks.auto-memory-fraction"))
            per = max(per, min(min_tags, int(fraction * (mem or 0)) // image))
    else:
        per = parse_chunk_size(chunks, image)
    if isinstance(chunks, str):
        per = max(per, int(config.get("chunks.min-tags")))
        per = max(1, min(per, math.ceil(max(n_tags, 1) / int(config.get("chunks.min-chunks")))))
    return per


def auto_tags_for_workers(n_tags: int, polar_shape: tuple[int, int]) -> int | None:
    """``tags_per_chunk("auto", ...)`` for the scheduler active now, or None when its
    workers' memory is not known (batch jobs not started yet)."""
    mem = memory_per_thread()
    if mem is None:
        return None
    return tags_per_chunk("auto", n_tags, polar_shape, memory=mem)


__all__ = ["auto_tags_for_workers", "is_auto", "parse_chunk_size", "tags_per_chunk"]
