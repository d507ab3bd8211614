"""How many tags a chunk of a run holds: a count of tags, or a size in bytes."""

from __future__ import annotations

import dask

from .errors import ParameterError


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


__all__ = ["parse_chunk_size"]
