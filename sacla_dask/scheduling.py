"""Task priorities: what sacla_dask tells Dask's scheduler about the order of work.

Dask orders a graph by its shape (``dask.order``), which for a run's graph
interleaves tag chunks: a worker could start reading chunk 15 while the
write and the correlation of chunk 11, whose polar block it holds, were
ready and waiting, so blocks piled up (measured: three ring-band blocks
held at once where one or two suffice). The layers built inside
:func:`chunk_first` carry a ``priority`` annotation of minus their tag
chunk index, so a worker finishes what an older block feeds before it
starts a newer one, and root tasks (the reads) are handed out in chunk
order. Tasks without one (the fold steps of the pair sums, the final
statistics) keep priority 0 and run as soon as they can, which frees
partial sums early.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator

import dask

__all__ = ["block_index", "chunk_first"]


def block_index(key: Hashable) -> int:
    """The tag-chunk index of a task key: its first integer after the name (0 if none).

    ``("polar-chunk-<token>", 7, 0, 0)`` -> 7, ``("write-tag-chunk-<token>", 7)`` -> 7,
    ``("write-array-<token>", "bragg_bins", 7, 0)`` -> 7, ``"tag-chunks-written-<token>"`` -> 0.
    """
    if isinstance(key, tuple):
        for part in key[1:]:
            if isinstance(part, int):
                return part
    return 0


@contextlib.contextmanager
def chunk_first(index: Callable[[Hashable], int] = block_index) -> Iterator[None]:
    """Annotate the graph layers built inside with ``priority = -index(key)``.

    Parameters
    ----------
    index : callable
        Maps a task key to the tag chunk it belongs to (default
        :func:`block_index`).
    """
    with dask.annotate(priority=lambda key: -int(index(key))):
        yield
