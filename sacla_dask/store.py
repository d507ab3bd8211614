"""Result stores: labelled xarray Datasets in Zarr (format 3).

This module owns the on-disk result contract: how a result store is laid
out, the codec used, the ``complete`` flag that is set only once every
array has been written, refusing to overwrite foreign data, and opening a
store for reading (refusing an unfinished one unless asked).

It also owns resumable writing. A run is written in three steps:

1. :func:`write_template`: every array's metadata and the small in-memory
   arrays (coordinates, mask, pairs, event data), a boolean
   ``_chunk_done`` array with one element (and one Zarr chunk) per tag
   chunk, and the run's parameters with their SHA-256 fingerprint.
2. :func:`chunk_writes`: one task per tag chunk writes that chunk's per-tag
   arrays (``polar``, ``row_mean``, ``nonfinite_bins``) with plain Zarr
   region writes (Zarr chunks aligned with Dask chunks, so writers never
   share a chunk), then sets the chunk's ``_chunk_done`` element. A killed
   run therefore leaves every finished chunk on disk; a re-computed task
   (a lost worker) rewrites the same bytes, so no tag is lost or doubled.
3. :func:`array_writes`: the workers store the other lazy arrays (the
   reductions over pairs, ``corr``..., and per-tag flags derived from the
   polar images), then :func:`finish`: ``complete=True``, and the
   bookkeeping arrays are removed.

On resume (:func:`prepare_output` with the same fingerprint), finished
chunks are read back from the store (:func:`resume_array`) instead of from
the raw images, so only the missing chunks are computed; the reductions are
then recomputed from the stored plus the fresh chunks (cheap next to reading
the raw images). In correlation-only mode (no ``polar`` in the result) no
polar images are written, not even as scratch (a wide band's outweigh the
raw data): a resumed run keeps the finished chunks' per-tag arrays but
computes their polar images again for the pairs.

A finished store gets consolidated metadata (:func:`consolidate`), so that a
plain ``xr.open_zarr(path)`` opens it silently with one metadata read.
Consolidated metadata is not part of the Zarr v3 specification: it is an
index that zarr-python and xarray read, and :func:`open_result` does not
depend on it (it reads each array's own metadata, ``consolidated=False``),
so a store whose index went stale still opens correctly there. An
unfinished store has none (its arrays are still changing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from .errors import IncompleteStoreError, OutputError, ParameterError
from .scheduling import chunk_first

if TYPE_CHECKING:
    from zarr.core.array_spec import ArrayConfigParams

log = logging.getLogger(__name__)

#: attrs key that marks a store as a sacla_dask result
MARKER = "sacla_dask_version"
COMPRESSIONS = ("none", "lz4", "zstd")
#: per-tag-chunk "written" flags (bool, one Zarr chunk per element)
DONE = "_chunk_done"
#: dimension of :data:`DONE`
DONE_DIM = "resume_chunk"
#: arrays that exist only while a store is being written
BOOKKEEPING = (DONE,)
#: attrs keys of the run's parameters (JSON text) and their SHA-256
PARAMETERS = "parameters"
FINGERPRINT = "parameters_sha256"


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


# -- state -------------------------------------------------------------------
def _attrs(p: str) -> dict[str, Any] | None:
    try:
        return dict(zarr.open_group(p, mode="r").attrs)
    except Exception:
        return None


def _parameters_in(attrs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The parameters recorded in a store's root attrs (None if unreadable)."""
    try:
        params = json.loads(attrs.get(PARAMETERS, "{}"))
    except (TypeError, ValueError):
        return None
    return params if isinstance(params, dict) else None


def stored_parameters(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parameters a sacla_dask store was written with (empty if there is none)."""
    p = os.fspath(path)
    if not os.path.isdir(p):
        return {}
    attrs = _attrs(p) or {}
    if MARKER not in attrs:
        return {}
    return _parameters_in(attrs) or {}


def store_state(path: str | os.PathLike[str]) -> str:
    """What is at ``path``: ``"absent"``, ``"complete"``, ``"incomplete"`` or ``"foreign"``."""
    p = os.fspath(path)
    if not os.path.exists(p):
        return "absent"
    if not os.path.isdir(p):
        return "foreign"
    if not os.listdir(p):
        return "absent"
    attrs = _attrs(p)
    if attrs is None or MARKER not in attrs:
        return "foreign"
    return "complete" if attrs.get("complete") is True else "incomplete"


def done_chunks(path: str | os.PathLike[str], n_chunks: int | None = None) -> np.ndarray:
    """The ``_chunk_done`` flags of an unfinished store (all False if it has none)."""
    try:
        flags = np.asarray(zarr.open_array(store=os.fspath(path), path=DONE, mode="r")[...],
                           dtype=bool)
    except Exception:
        flags = np.zeros(n_chunks or 0, dtype=bool)
    if n_chunks is not None and flags.shape != (n_chunks,):
        return np.zeros(n_chunks, dtype=bool)
    return flags


def progress_text(path: str | os.PathLike[str]) -> str:
    """``"k of n tag chunks written"`` for an unfinished store, else ``""``."""
    flags = done_chunks(path)
    return f"{int(flags.sum())} of {flags.size} tag chunks written" if flags.size else ""


# -- parameters ----------------------------------------------------------------
def _digest(values: np.ndarray) -> str:
    a = np.asarray(values)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    if a.dtype.kind == "O":
        h.update(repr(a.tolist()).encode())
    else:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def parameters(ds: xr.Dataset, **extra: Any) -> tuple[dict[str, Any], str]:
    """What determines a result's content, and its SHA-256 fingerprint.

    The dataset's attrs (geometry, q band, grid, mask path, sources,
    chunking, version...), the name, dims, shape and dtype of every variable,
    a digest of every variable already in memory (tags, pairs, polar mask,
    event data...) and ``extra`` (codec, source file sizes...). Two runs with
    the same fingerprint write the same bytes, so one may resume the other.

    Returns
    -------
    params : dict
        JSON-serialisable.
    sha256 : str
    """
    params: dict[str, Any] = {k: v for k, v in ds.attrs.items()
                              if k not in ("complete", PARAMETERS, FINGERPRINT)}
    variables = {}
    for name, var in ds.variables.items():
        desc = f"{var.dims} {var.shape} {var.dtype}"
        if not isinstance(var.data, da.Array):
            desc += f" {_digest(var.values)}"
        variables[str(name)] = desc
    params["variables"] = variables
    params.update(extra)
    text = json.dumps(params, sort_keys=True, default=_jsonable)
    return json.loads(text), hashlib.sha256(text.encode()).hexdigest()


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two parameter sets, parameters first, then arrays."""
    out = []
    for k in sorted((set(old) | set(new)) - {"variables"}):
        a, b = old.get(k), new.get(k)
        if a != b:
            ra, rb = (repr(x) if len(repr(x)) <= 40 else repr(x)[:37] + "..." for x in (a, b))
            out.append(f"{k} (store {ra}, now {rb})")
    va, vb = old.get("variables") or {}, new.get("variables") or {}
    arrays = sorted(n for n in set(va) | set(vb) if va.get(n) != vb.get(n))
    if arrays:
        out.append("arrays " + ", ".join(arrays[:8]) + (", ..." if len(arrays) > 8 else ""))
    return out


def _looks_like_zarr(path: str) -> bool:
    """A folder holding Zarr (v2 or v3) metadata at its top."""
    return any(os.path.exists(os.path.join(path, f)) for f in ("zarr.json", ".zgroup", ".zarray"))


def prepare_output(path: str | os.PathLike[str], overwrite: bool = False,
                   resume: bool = False, fingerprint: str | None = None,
                   params: Mapping[str, Any] | None = None, check_only: bool = False) -> str:
    """Check that ``path`` may be written, clearing it when allowed.

    Parameters
    ----------
    path : path
        The Zarr store.
    overwrite : bool
        Replace whatever is there.
    resume : bool
        Accept a sacla_dask store written with the same ``fingerprint``:
        an unfinished one is resumed, a complete one is left as it is.
    fingerprint, params : optional
        From :func:`parameters`; ``params`` makes the refusal message name
        what differs.
    check_only : bool
        Raise what would be raised, but remove nothing (to refuse a bad
        output before starting a cluster).

    Returns
    -------
    str
        ``"absent"`` (write a template), ``"incomplete"`` (resume it) or
        ``"complete"`` (nothing left to do).

    Raises
    ------
    OutputError
        The path holds something else, a result of other parameters, or
        (``resume=False``) any result, and ``overwrite`` is false; or its
        folder is missing or not writable.
    """
    p = os.fspath(path)
    state = store_state(p)
    parent = os.path.dirname(os.path.abspath(p)) or "."
    if not os.path.isdir(parent):
        what = "is a file, not a folder" if os.path.exists(parent) else "does not exist"
        raise OutputError(f"output folder {parent!r} {what}")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder {parent!r} is not writable")
    if overwrite:
        if state == "foreign" and os.path.isdir(p) and not _looks_like_zarr(p):
            raise OutputError(
                f"output path {p!r} is a folder with {len(os.listdir(p))} entries that is not "
                "a Zarr store; sacla_dask does not delete it even with --overwrite: "
                "choose another path"
            )
        if state != "absent" and not check_only:
            remove(p)
        return "absent"
    if state == "foreign":
        raise OutputError(
            f"output path {p!r} exists and is not a sacla_dask result store; "
            "choose another path or pass --overwrite (overwrite=True) to replace it"
        )
    if state == "absent":
        return state
    if not resume:
        what = "a complete result" if state == "complete" else "an unfinished result"
        raise OutputError(f"output store {p!r} already holds {what}; pass --overwrite "
                          "(overwrite=True) to recompute it")
    attrs = _attrs(p) or {}
    found = attrs.get(FINGERPRINT)
    if found is None and state == "incomplete":
        # killed while the template itself was being written: ours, and empty
        if not check_only:
            remove(p)
        return "absent"
    if found != fingerprint:
        found_params = _parameters_in(attrs)
        try:
            diff = [] if found_params is None else _differences(found_params, params or {})
        except (TypeError, ValueError):
            diff = []
        what = "a complete result" if state == "complete" else "an unfinished result"
        raise OutputError(
            f"output store {p!r} holds {what} computed with different parameters"
            + (f" ({'; '.join(diff[:6])}{'; ...' if len(diff) > 6 else ''})" if diff else "")
            + ": it cannot be resumed; choose another --out, or pass --overwrite "
            "(overwrite=True) to replace it"
        )
    return state


def remove(path: str) -> None:
    """Remove a file or folder tree."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an ``OSError`` while writing the store into an :class:`OutputError` naming it."""
    try:
        yield
    except OSError as exc:
        what = exc.strerror or str(exc) or type(exc).__name__
        where = f" ({exc.filename})" if exc.filename else ""
        raise OutputError(
            f"cannot write the result store {os.fspath(path)!r}: {what}{where}; the "
            "finished tag chunks are kept: fix the cause (disk space, permissions, quota), "
            "then run the same command again to resume"
        ) from exc


def set_attrs(path: str | os.PathLike[str], **attrs: Any) -> None:
    """Update the root attrs of a store in place."""
    with writing(path):
        g = zarr.open_group(os.fspath(path), mode="r+")
        g.attrs.update(attrs)


def mark_complete(path: str | os.PathLike[str]) -> None:
    """Flag a store as complete: call only once every array is written."""
    set_attrs(path, complete=True)


# -- resumable writing ---------------------------------------------------------
def template_dataset(ds: xr.Dataset, chunk_vars: Sequence[str], tags_per_chunk: int,
                     compression: str = "lz4", params: Mapping[str, Any] | None = None,
                     fingerprint: str | None = None
                     ) -> tuple[xr.Dataset, dict[str, dict[str, Any]]]:
    """The dataset and Zarr encoding :func:`write_template` writes (nothing computed).

    ``ds`` with the chunk flags (:data:`DONE`), ``complete=False``, the
    parameters and their fingerprint in its attrs, and every Dask-backed
    array stood in for by an empty one of the same dtype and chunks (only
    its metadata is written). Parameters as :func:`write_template`.
    """
    n_tags = ds.sizes["tag"]
    n_chunks = -(-n_tags // tags_per_chunk)
    tmpl = ds.assign({DONE: ((DONE_DIM,), np.zeros(n_chunks, dtype=bool))})
    comp = compressors(compression)
    encoding: dict[str, dict[str, Any]] = {DONE: {"chunks": (1,)}}
    for name in chunk_vars:
        var = tmpl[name]
        if var.dims[0] != "tag":
            raise ValueError(f"{name} is not a per-tag array (dims {var.dims})")
        enc: dict[str, Any] = {"chunks": (tags_per_chunk,) + var.shape[1:]}
        if var.ndim == 3:
            enc["compressors"] = comp
        encoding[name] = enc
    for vname, v in tmpl.variables.items():
        # other lazy arrays are stored whole by array_writes, rechunked to
        # whatever Zarr chunks they get: give irregular ones regular chunks
        if (vname not in encoding and isinstance(v.data, da.Array)
                and not _regular(v.data.chunks)):
            encoding[str(vname)] = {"chunks": tuple(max(c) for c in v.data.chunks)}
    # the lazy arrays' real graphs need not be wrapped in a store graph that is thrown away
    empty = {name: var.copy(data=da.empty(var.shape, dtype=var.dtype, chunks=var.chunks))
             for name, var in tmpl.variables.items() if isinstance(var.data, da.Array)}
    tmpl = (tmpl.assign_coords({k: v for k, v in empty.items() if k in tmpl.coords})
            .assign({k: v for k, v in empty.items() if k not in tmpl.coords}))
    tmpl.attrs.update({"complete": False,
                       PARAMETERS: json.dumps(params or {}, sort_keys=True),
                       FINGERPRINT: fingerprint or ""})
    return tmpl, encoding


def write_template(path: str | os.PathLike[str], ds: xr.Dataset, chunk_vars: Sequence[str],
                   tags_per_chunk: int, compression: str = "lz4",
                   params: Mapping[str, Any] | None = None,
                   fingerprint: str | None = None) -> None:
    """Write a result's layout: metadata, in-memory arrays and the chunk flags.

    Parameters
    ----------
    path : path
        The Zarr store (replaced).
    ds : xarray.Dataset
        The lazy result; its Dask-backed arrays are not computed.
    chunk_vars : sequence of str
        Per-tag arrays written chunk by chunk (Zarr chunks of
        ``tags_per_chunk`` tags; 3-d ones with ``compression``).
    params, fingerprint :
        From :func:`parameters`; written last, so that a store holding a
        fingerprint holds a whole template.

    Notes
    -----
    The store is what ``template_dataset(...)`` written by xarray's
    ``to_zarr(path, compute=False)`` would be, file for file, but made in
    an in-memory Zarr store and then written as files: writing straight to
    disk takes xarray and Zarr ~80 store calls, each a trip to Zarr's event
    loop and a thread doing the file I/O, several times slower than in
    memory (docs/benchmarks.md).
    """
    p = os.fspath(path)
    tmpl, encoding = template_dataset(ds, chunk_vars, tags_per_chunk, compression, params,
                                      fingerprint)
    nodes: dict[str, Any] = {}
    tmpl.to_zarr(zarr.storage.MemoryStore(nodes), mode="w", compute=False,
                 consolidated=False, zarr_format=3, encoding=encoding, safe_chunks=False)
    root = nodes.pop("zarr.json")
    with writing(p):
        # the root group first, born with the marker: a run that dies on the next
        # write (a full disk) leaves a store that is recognisably ours, incomplete
        zarr.open_group(p, mode="w", zarr_format=3,
                        attributes={MARKER: tmpl.attrs.get(MARKER, ""), "complete": False})
        for key, value in nodes.items():
            _write_file(os.path.join(p, *key.split("/")), value.to_bytes())
        # the root's metadata with the parameters and fingerprint last: a store holding
        # a fingerprint holds a whole template
        _write_file(os.path.join(p, "zarr.json"), root.to_bytes())


def _write_file(path: str, data: bytes) -> None:
    """One key of a local Zarr store (its file, and directories above it)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def _regular(chunks: tuple[tuple[int, ...], ...]) -> bool:
    """Dask chunks Zarr can mirror: all equal but a smaller last one."""
    return all(len(set(c[:-1])) <= 1 and c[-1] <= c[0] for c in chunks if c)


def _graph(name: str, dsk: dict[Any, Any], dependencies: Sequence[da.Array]) -> HighLevelGraph:
    """The graph of the collection ``name``: ``dsk`` over the graphs of ``dependencies``."""
    with chunk_first():
        # dask's DaskCollection protocol declares __dask_scheduler__ a staticmethod
        # object, which da.Array's (a function on the class) does not match
        return HighLevelGraph.from_collections(
            name, dsk, dependencies=dependencies)  # type: ignore[arg-type]


def _read_chunk(path: str, name: str, start: int, stop: int) -> np.ndarray:
    # (a slice of a Zarr array is a numpy array; asarray returns it as is)
    return np.asarray(zarr.open_array(store=path, path=name, mode="r")[start:stop])


def resume_array(path: str | os.PathLike[str], name: str, fresh: da.Array,
                 done: np.ndarray) -> da.Array:
    """``fresh`` with its finished tag chunks read back from the store instead.

    Parameters
    ----------
    path : path
        The Zarr store.
    name : str
        The array in the store holding the chunks of ``fresh``.
    fresh : dask array
        The array as computed from the raw data, chunked along its first
        axis only, with the store's tag chunks.
    done : bool array (n_chunks,)
        Chunks already in the store. Their tasks in ``fresh`` (and all
        upstream work, such as reading the raw images) drop out of the graph.
    """
    done = np.asarray(done, dtype=bool)
    if done.shape != (len(fresh.chunks[0]),):
        raise ValueError(f"{done.size} chunk flags for {len(fresh.chunks[0])} chunks")
    if any(len(c) != 1 for c in fresh.chunks[1:]):
        fresh = fresh.rechunk({i: -1 for i in range(1, fresh.ndim)})
    if not done.any():
        return fresh
    p = os.fspath(path)
    out = f"resumed-{name}-" + dask.base.tokenize(fresh.name, p, name, done)
    bounds = np.cumsum((0,) + fresh.chunks[0])
    rest = (0,) * (fresh.ndim - 1)
    dsk: dict[Any, Any] = {}
    for i, flag in enumerate(done):
        if flag:
            dsk[(out, i) + rest] = (_read_chunk, p, name, int(bounds[i]), int(bounds[i + 1]))
        else:
            dsk[(out, i) + rest] = (fresh.name, i) + rest
    graph = _graph(out, dsk, [fresh])
    return da.Array(graph, out, fresh.chunks, meta=fresh._meta)


def _open_for_writing(path: str, name: str) -> zarr.Array:
    """An array of the store, writing every chunk given (no all-fill-value scan of it)."""
    # (the cast: zarr's ArrayConfigParams marks its keys typing.NotRequired, which
    # type checkers targeting Python 3.10 do not see, so they require every key)
    config = cast("ArrayConfigParams", {"write_empty_chunks": True})
    return zarr.open_array(store=path, path=name, mode="r+").with_config(config)


@dataclasses.dataclass(frozen=True)
class _Derived:
    """A per-tag array the chunk write computes from another one's block."""

    name: str
    function: Callable[[np.ndarray], np.ndarray]
    source: str


def _write_chunk(path: str, index: int, start: int, stop: int, names: Sequence[str],
                 targets: Mapping[str, zarr.Array], derived: Sequence[_Derived],
                 *blocks: np.ndarray) -> int:
    with writing(path):
        out = dict(zip(names, blocks, strict=True))
        for d in derived:
            out[d.name] = d.function(out[d.source])
        for name, block in out.items():
            targets[name][start:stop] = block
        # the flag last: a chunk flagged done has all its arrays written
        targets[DONE][index] = True
    return stop - start


def _total(counts: Sequence[int]) -> int:
    return int(sum(counts))


def chunk_writes(path: str | os.PathLike[str], arrays: Mapping[str, da.Array],
                 todo: np.ndarray,
                 derived: Mapping[str, tuple[Callable[[np.ndarray], np.ndarray], str]]
                 | None = None) -> Delayed:
    """Lazy writes of the tag chunks ``todo`` of ``arrays`` into the store.

    One task per chunk writes that chunk of every array (region writes into
    the template of :func:`write_template`), then flags it in
    ``_chunk_done``. The result is the number of tags written.

    Parameters
    ----------
    arrays : mapping of store array name -> dask array
        Per-tag arrays with the same tag chunks, one chunk on other axes.
    todo : bool array (n_chunks,)
    derived : mapping of store array name -> (function, source name), optional
        Per-tag arrays computed by the write task itself from the block of
        the array ``source`` (a cheap per-tag flag: no task of its own).
    """
    p = os.fspath(path)
    names = list(arrays)
    arrs = [arrays[n] for n in names]
    chunks = arrs[0].chunks[0]
    for n, a in zip(names, arrs, strict=True):
        if a.chunks[0] != chunks or any(len(c) != 1 for c in a.chunks[1:]):
            raise ValueError(f"{n}: chunks {a.chunks} are not the tag chunks {chunks}")
    todo = np.asarray(todo, dtype=bool)
    bounds = np.cumsum((0,) + chunks)
    extra = [_Derived(n, fn, src) for n, (fn, src) in (derived or {}).items()]
    for d in extra:
        if d.source not in arrays:
            raise ValueError(f"{d.name}: source array {d.source!r} is not written")
    token = dask.base.tokenize(p, [a.name for a in arrs], todo, extra)
    name, final = "write-tag-chunk-" + token, "tag-chunks-written-" + token
    # opened here once, not by each task: an array opened in a task reads its metadata,
    # which takes as long as the chunk's writes themselves
    targets = {n: _open_for_writing(p, n) for n in names + [d.name for d in extra] + [DONE]}
    dsk: dict[Any, Any] = {}
    keys = []
    for i in np.flatnonzero(todo):
        blocks = [(a.name, int(i)) + (0,) * (a.ndim - 1) for a in arrs]
        dsk[(name, int(i))] = (_write_chunk, p, int(i), int(bounds[i]), int(bounds[i + 1]),
                               names, targets, extra, *blocks)
        keys.append((name, int(i)))
    dsk[final] = (_total, keys)
    graph = _graph(final, dsk, arrs)
    return Delayed(final, graph)


def _store_block(path: str, target: zarr.Array, region: tuple[slice, ...], block: Any) -> None:
    with writing(path):
        target[region] = block


def _nothing(_: Any) -> None:
    return None


def array_writes(path: str | os.PathLike[str], arrays: Mapping[str, da.Array]) -> Delayed:
    """Lazy writes of whole dask arrays into their place in the template.

    Each array is rechunked to its Zarr chunks (so no two tasks write one
    Zarr chunk) and each block stored by a worker: nothing large passes
    through the client. The graph is built by hand, not with ``da.store``:
    that optimises (fuses) its sources on its own, which would rename the
    polar tasks these arrays share with :func:`chunk_writes` and compute
    them twice. Computes to None.
    """
    p = os.fspath(path)
    token = dask.base.tokenize(p, sorted((n, a.name) for n, a in arrays.items()))
    wname, final = "write-array-" + token, "arrays-written-" + token
    dsk: dict[Any, Any] = {}
    deps = []
    keys = []
    for name, arr in arrays.items():
        z = _open_for_writing(p, name)  # once, not by each task
        if tuple(z.shape) != tuple(arr.shape):
            raise ValueError(f"{name}: shape {arr.shape} does not match the store's {z.shape}")
        if arr.ndim:
            arr = arr.rechunk(z.chunks)
        deps.append(arr)
        bounds = [np.cumsum((0,) + c) for c in arr.chunks]
        for idx in np.ndindex(*arr.numblocks):
            region = tuple(slice(int(b[i]), int(b[i + 1]))
                           for b, i in zip(bounds, idx, strict=True))
            key = (wname, name) + tuple(idx)
            dsk[key] = (_store_block, p, z, region, (arr.name,) + tuple(idx))
            keys.append(key)
    dsk[final] = (_nothing, keys)
    graph = _graph(final, dsk, deps)
    return Delayed(final, graph)


def read_array(path: str | os.PathLike[str], name: str) -> np.ndarray:
    """One array of a store, as stored (no xarray decoding)."""
    return np.asarray(zarr.open_array(store=os.fspath(path), path=name, mode="r")[...])


def write_arrays(path: str | os.PathLike[str], values: Mapping[str, Any]) -> None:
    """Write whole arrays (computed values) into their place in the template."""
    p = os.fspath(path)
    for name, value in values.items():
        arr = zarr.open_array(store=p, path=name, mode="r+")
        v = np.asarray(value)
        if v.shape != arr.shape:
            raise ValueError(f"{name}: shape {v.shape} does not match the store's {arr.shape}")
        with writing(p):
            arr[...] = v


def finish(path: str | os.PathLike[str]) -> None:
    """Mark a fully written store complete and drop its bookkeeping arrays."""
    p = os.fspath(path)
    mark_complete(p)
    try:
        g = zarr.open_group(p, mode="r+")
        for name in BOOKKEEPING:
            if name in g:
                del g[name]
    except OSError as exc:  # complete all the same: open_result hides the leftovers
        log.warning("could not remove the bookkeeping arrays of %s: %s", p, exc)
    consolidate(p)


def consolidate(path: str | os.PathLike[str]) -> None:
    """Write the consolidated metadata of a finished store (see the module docstring).

    Called again by anything that changes a finished store's arrays or attrs.
    """
    import warnings

    with warnings.catch_warnings():
        # zarr warns that consolidated metadata is outside the v3 spec: known, and chosen
        warnings.filterwarnings("ignore", message="Consolidated metadata",
                                category=UserWarning)
        zarr.consolidate_metadata(os.fspath(path))


def open_result(path: str | os.PathLike[str], allow_incomplete: bool = False,
                **kwargs: Any) -> xr.Dataset:
    """Open a result store written by :func:`sacla_dask.process_run`.

    Parameters
    ----------
    path : path
        The Zarr store.
    allow_incomplete : bool
        Open a store that is not marked complete (for inspection: arrays
        not yet written read as their fill value; ``_chunk_done`` says
        which tag chunks are in).

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
        done = progress_text(p)
        raise IncompleteStoreError(
            f"result store {p!r} is not marked complete"
            + (f" ({done})" if done else "")
            + ": the run that wrote it was interrupted or is still running; "
            "re-run the same command to finish it"
        )
    if state == "incomplete" and "live_tags" in (_attrs(p) or {}):
        from .live.growing import open_live  # a store being followed: its committed part

        return open_live(p, **kwargs)
    if state == "complete":
        # left over only if the writer died between marking and cleaning up
        g = zarr.open_group(p, mode="r")
        left = [n for n in BOOKKEEPING if n in g]
        if left:
            kwargs["drop_variables"] = list(kwargs.get("drop_variables") or []) + left
    return xr.open_zarr(p, consolidated=False, **kwargs)
