"""Result stores: labelled xarray Datasets in Zarr (format 3).

This module owns the on-disk result contract: how a result store is laid
out, the codec used, the ``complete`` flag that is set only once every
array has been written, refusing to overwrite foreign data, and opening a
store for reading (refusing an unfinished one unless asked).

Consolidated metadata is not part of the Zarr v3 specification; stores are
written without it and read with ``consolidated=False``: one metadata read
per array, which is negligible for the handful of arrays in a result.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import xarray as xr
import zarr

from .errors import IncompleteStoreError, OutputError, ParameterError

#: attrs key that marks a store as a sacla_dask result
MARKER = "sacla_dask_version"
COMPRESSIONS = ("none", "lz4", "zstd")


def compressors(name: str = "lz4") -> Any:
    """Zarr v3 compressors for a codec name.

    ``"lz4"`` (default): Blosc LZ4 with bit-shuffle, fast enough not to bound
    the pipeline; ``"zstd"``: Blosc zstd level 1 with bit-shuffle, smaller;
    ``"none"``: uncompressed, fastest to write.
    """
    from zarr.codecs import BloscCodec

    if name == "none":
        return None
    if name == "lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")]
    if name == "zstd":
        return [BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")]
    raise ParameterError(f"compression must be one of {COMPRESSIONS} (got {name!r})")


def store_state(path: str | os.PathLike[str]) -> str:
    """What is at ``path``: ``"absent"``, ``"complete"``, ``"incomplete"`` or ``"foreign"``."""
    p = os.fspath(path)
    if not os.path.exists(p):
        return "absent"
    if not os.path.isdir(p):
        return "foreign"
    if not os.listdir(p):
        return "absent"
    try:
        g = zarr.open_group(p, mode="r")
        attrs = dict(g.attrs)
    except Exception:
        return "foreign"
    if MARKER not in attrs:
        return "foreign"
    return "complete" if attrs.get("complete") is True else "incomplete"


def prepare_output(path: str | os.PathLike[str], overwrite: bool = False,
                   resume: bool = False) -> str:
    """Check that ``path`` may be written, clearing it when allowed.

    Returns the store state found (see :func:`store_state`). Raises
    :class:`OutputError` when the path holds something else (or a complete
    result) and ``overwrite`` is false, or when its folder is not writable.
    """
    p = os.fspath(path)
    state = store_state(p)
    parent = os.path.dirname(os.path.abspath(p)) or "."
    if not os.path.isdir(parent):
        raise OutputError(f"output folder {parent!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder {parent!r} is not writable")
    if state == "foreign" and not overwrite:
        raise OutputError(
            f"output path {p!r} exists and is not a sacla_dask result store; "
            "choose another path or pass --overwrite (overwrite=True) to replace it"
        )
    if state == "complete" and not overwrite:
        raise OutputError(
            f"output store {p!r} already holds a complete result; pass --overwrite "
            "(overwrite=True) to recompute it"
        )
    if state == "incomplete" and not (overwrite or resume):
        raise OutputError(
            f"output store {p!r} holds an unfinished result; pass --overwrite to start again"
        )
    if overwrite and state != "absent":
        remove(p)
    return state


def remove(path: str) -> None:
    """Remove a file or folder tree."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def set_attrs(path: str | os.PathLike[str], **attrs: Any) -> None:
    """Update the root attrs of a store in place."""
    g = zarr.open_group(os.fspath(path), mode="r+")
    g.attrs.update(attrs)


def mark_complete(path: str | os.PathLike[str]) -> None:
    """Flag a store as complete: call only once every array is written."""
    set_attrs(path, complete=True)


def open_result(path: str | os.PathLike[str], allow_incomplete: bool = False,
                **kwargs: Any) -> xr.Dataset:
    """Open a result store written by :func:`sacla_dask.process_run`.

    Parameters
    ----------
    path : path
        The Zarr store.
    allow_incomplete : bool
        Open a store that is not marked complete (for inspection).

    Raises
    ------
    IncompleteStoreError
        If the store is not marked complete and ``allow_incomplete`` is false.
    OutputError
        If the path is not a sacla_dask result store.
    """
    p = os.fspath(path)
    state = store_state(p)
    if state in ("absent", "foreign"):
        raise OutputError(f"{p!r} is not a sacla_dask result store ({state})")
    if state == "incomplete" and not allow_incomplete:
        raise IncompleteStoreError(
            f"result store {p!r} is not marked complete: the run that wrote it was "
            "interrupted or is still running; re-run the same command to finish it"
        )
    return xr.open_zarr(p, consolidated=False, **kwargs)
