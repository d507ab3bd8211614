"""Reading SACLA DataConvert run files: tags, event data, shot selection, lazy images.

This module owns the knowledge of the SACLA "DataConvert" HDF5 layout::

    /file_info/run_number_list
    /run_N/detector_2d_assembled_1/detector_info/...
    /run_N/detector_2d_assembled_1/tag_T/detector_data     (ny, nx) float32
    /run_N/event_info/tag_number_list                      (ntag_event,)
    /run_N/event_info/.../xfel_pulse_selector_status       (ntag_event,)
    /run_N/event_info/.../photon_energy_in_eV               (ntag_event,)
    /run_N/event_info/.../*pulse_energy*                     (ntag_event,)

:func:`open_run` takes one file or several (files of one run, or several
runs) and returns a :class:`Run`: the sorted tags that really have an image
(event_info may list more tags than a subset file holds images for), the
per-tag event data as an :class:`xarray.Dataset` aligned by tag, where each
tag came from (``run``, ``source``: index into ``Run.paths``), which shots
are dark, and the images as a lazy :class:`dask.array.Array` (tag, y, x)
with several tags per task. :meth:`Run.select_shots` chooses the shots to
correlate (dark shots, a tag range, a pulse-energy threshold) and records
why.

Reading. Each task opens the file itself (h5py objects do not pickle), so
the graph runs on distributed workers; nothing is read before it is
computed. A task reads, for each of its tags, only the window (bounding box
of the q band) of the image with one HDF5 hyperslab read straight into the
task's output block. Compressed datasets (gzip, bitshuffle/LZ4, zstd... via
hdf5plugin) are read transparently; note that HDF5 decompresses every
*whole* chunk a window touches, so with the usual one-chunk-per-image
layout a window saves memory and copying but not decompression or disk
bytes. Each image is read with a single HDF5 call, so every chunk is
decompressed once and the chunk cache size does not matter.

A thin band (the pipeline's ring) can be read pixel by pixel instead
(:func:`read_pixels`): from a contiguous, uncompressed dataset, the rows
of the band are read with one ``pread`` per image into a reused buffer and
the listed pixels taken from it (no HDF5 call per image); from any other
layout, through HDF5's window read.

Bad tags. A tag group without ``detector_data``, or a dataset of the wrong
shape or type, is found when the run is opened; a tag whose bytes cannot
be decoded (a corrupt compressed chunk) only when it is read. With
``on_bad_tag="fail"`` (default) either raises :class:`BadTagError` naming
the file and tag; with ``"skip"`` the first kind is left out of the run
(listed in ``Run.bad_tags`` and a warning) and the second kind yields an
all-NaN image plus a warning, which the pipeline detects and keeps out of
every pair.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import xarray as xr

from ..errors import BadTagError, LayoutError, ParameterError, RunFileError

try:  # registers bitshuffle/LZ4/zstd... HDF5 filters used for compressed exports
    import hdf5plugin  # noqa: F401
except ImportError:  # pragma: no cover - hdf5plugin is a hard dependency
    hdf5plugin = None

import h5py

DETECTOR = "detector_2d_assembled_1"
TAG_RE = re.compile(r"^tag_(\d+)$")
OnBadTag = Literal["fail", "skip"]
ReadStrategy = Literal["auto", "hyperslab", "rows"]

#: event_info dataset base names -> standard variable names in ``Run.events``.
EVENT_ALIASES = {
    "xfel_pulse_selector_status": "pulse_selector",
    "shutter_status": "shutter",
    "photon_energy_in_eV": "photon_energy",
}
#: event variables that say whether the X-ray pulse reached the sample.
STATUS_VARIABLES = ("pulse_selector", "shutter")


def _open_h5(path: str) -> h5py.File:
    """Open an HDF5 file read-only, turning every failure into RunFileError."""
    if not os.path.exists(path):
        raise RunFileError(f"run file {path!r} does not exist")
    if os.path.isdir(path):
        raise RunFileError(f"run file {path!r} is a directory, not an HDF5 file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        size = os.path.getsize(path)
        if size == 0:
            hint = "empty (0 bytes)"
        elif "truncated" in str(exc):
            hint = f"truncated ({size} bytes on disk; an interrupted copy?)"
        else:
            hint = "truncated, damaged or not an HDF5 file"
        raise RunFileError(f"cannot open run file {path!r}: {hint} ({exc})") from None


@dataclasses.dataclass(frozen=True)
class TagSource:
    """Where one tag's image lives."""

    path: str
    run: int
    tag: int

    @property
    def dataset(self) -> str:
        return f"/run_{self.run}/{DETECTOR}/tag_{self.tag}/detector_data"


class BadTag(str):
    """A tag left out of a run: the message (a ``str``) with its parts as attributes.

    Attributes
    ----------
    path : str
        The run file.
    run, tag : int
        SACLA run and tag numbers.
    reason : str
        What is wrong with the tag's ``detector_data``.
    """

    path: str
    run: int
    tag: int
    reason: str

    def __new__(cls, path: str, run: int, tag: int, reason: str) -> BadTag:
        self = super().__new__(cls, f"{path!r} run {run} tag {tag}: {reason}")
        self.path, self.run, self.tag, self.reason = path, int(run), int(tag), reason
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (BadTag, (self.path, self.run, self.tag, self.reason))


# -- scanning a file -------------------------------------------------------------
def _event_datasets(group: h5py.Group, n: int) -> dict[str, tuple[str, np.ndarray]]:
    """All numeric 1-D datasets under event_info of length ``n``.

    Returns ``{standard or base name: (HDF5 path, values)}``.
    """
    found: dict[str, tuple[str, np.ndarray]] = {}

    def visit(name: str, obj: Any) -> None:
        if not isinstance(obj, h5py.Dataset) or obj.ndim != 1 or obj.shape[0] != n:
            return
        base = name.rsplit("/", 1)[-1]
        if base == "tag_number_list" or obj.dtype.kind not in "biuf":
            return
        key = EVENT_ALIASES.get(base)
        if key is None and "pulse_energy" in base:
            key = "pulse_energy"
        if key is None:
            key = base
        if key in found:  # two datasets with one base name: use the path
            key = name.replace("/", "__")
        found[key] = (f"{group.name}/{name}", obj[()])

    group.visititems(visit)
    return found


def _check_tag(det: h5py.Group, name: str) -> tuple[tuple[int, ...], h5py.h5d.DatasetID]:
    """Shape and dataset id of ``det/name/detector_data``; ValueError saying what is wrong.

    Uses h5py's low-level API: the high-level one costs ~0.6 ms per tag,
    i.e. seconds for a 5000-tag run.
    """
    try:
        dsid = h5py.h5d.open(det.id, f"{name}/detector_data".encode())
    except KeyError as exc:
        why = str(exc).strip("'\"").rsplit("(", 1)[-1].rstrip(")")
        raise ValueError(f"no detector_data dataset in the tag group ({why})") from None
    shape = dsid.shape
    if dsid.get_type().get_class() not in (h5py.h5t.INTEGER, h5py.h5t.FLOAT):
        raise ValueError(f"detector_data has type {dsid.dtype}, expected numbers")
    if len(shape) != 2:
        raise ValueError(f"detector_data has shape {shape}, expected a 2-D image")
    return shape, dsid


def _scan_file(path: str, on_bad_tag: OnBadTag) -> tuple[list[dict[str, Any]], list[BadTag]]:
    """Read the layout of one file: per-run tags, events, image shape/dtype."""
    runs: list[dict[str, Any]] = []
    bad: list[BadTag] = []
    with _open_h5(path) as fh:
        try:
            _scan_open_file(fh, path, on_bad_tag, runs, bad)
        except (OSError, RuntimeError) as exc:
            raise RunFileError(f"cannot read the layout of run file {path!r}: damaged or "
                               f"truncated ({exc})") from None
    return runs, bad


def _scan_open_file(fh: h5py.File, path: str, on_bad_tag: OnBadTag,
                    runs: list[dict[str, Any]], bad: list[BadTag]) -> None:
    if "file_info" not in fh or "run_number_list" not in fh["file_info"]:
        raise LayoutError(f"{path!r} is HDF5 but not a SACLA DataConvert file: "
                          "no /file_info/run_number_list")
    run_numbers = [int(r) for r in np.atleast_1d(fh["file_info/run_number_list"][()])]
    if not run_numbers:
        raise LayoutError(f"{path!r}: /file_info/run_number_list is empty")
    for rn in run_numbers:
        rgrp = f"run_{rn}"
        if rgrp not in fh:
            raise LayoutError(f"{path!r}: run {rn} is listed but /{rgrp} is missing")
        g = fh[rgrp]
        if DETECTOR not in g:
            raise LayoutError(f"{path!r}: /{rgrp}/{DETECTOR} is missing")
        if "event_info" not in g or "tag_number_list" not in g["event_info"]:
            raise LayoutError(f"{path!r}: /{rgrp}/event_info/tag_number_list is missing")
        event_tags = np.asarray(g["event_info/tag_number_list"][()], dtype=np.int64).ravel()
        uniq, counts = np.unique(event_tags, return_counts=True)
        if (counts > 1).any():
            raise LayoutError(f"{path!r}: /{rgrp}/event_info/tag_number_list repeats tags "
                              f"{uniq[counts > 1][:5].tolist()}")
        events = _event_datasets(g["event_info"], event_tags.size)
        det = g[DETECTOR]
        image_tags = []
        shape = dtype = None
        for name in det:
            m = TAG_RE.match(name)
            if not m:
                continue
            tag = int(m.group(1))
            try:
                try:
                    tshape, dsid = _check_tag(det, name)
                except (OSError, RuntimeError) as exc:
                    raise ValueError(f"detector_data cannot be opened ({exc})") from None
                if shape is None:
                    shape, dtype = tshape, dsid.dtype
                elif tshape != shape:
                    raise ValueError(f"detector_data has shape {tshape}, but other tags "
                                     f"have {shape}")
            except ValueError as exc:
                bt = BadTag(path, rn, tag, f"{exc} (/{rgrp}/{DETECTOR}/{name})")
                if on_bad_tag == "fail":
                    raise BadTagError(f"{bt}; use on_bad_tag='skip' (--on-bad-tag skip) to "
                                      "go on without it") from None
                bad.append(bt)
                continue
            image_tags.append(tag)
        runs.append(dict(run=rn, event_tags=event_tags, events=events,
                         image_tags=np.array(sorted(image_tags), dtype=np.int64),
                         shape=shape, dtype=dtype))


# -- reading images ------------------------------------------------------------
def _read_one(fid: h5py.h5f.FileID, src: TagSource, window: tuple[slice, slice],
              out: np.ndarray, strategy: ReadStrategy) -> None:
    """Read one tag's window into ``out`` (C-contiguous float32, window shape).

    One HDF5 read call: ``"hyperslab"`` selects the 2-D window;
    ``"rows"`` reads the window's full rows as one contiguous run of bytes
    and copies the columns (contiguous datasets only; see
    benchmarks/bench_read.py for which is faster). HDF5 converts integer
    pixels to float32 on the way.
    """
    (y0, y1), (x0, x1) = (window[0].start, window[0].stop), (window[1].start, window[1].stop)
    dsid = h5py.h5d.open(fid, src.dataset.encode())
    fspace = dsid.get_space()
    ny, nx = fspace.shape
    full_rows = x0 == 0 and x1 == nx
    if strategy == "rows" and not full_rows and (
            dsid.get_create_plist().get_layout() == h5py.h5d.CONTIGUOUS):
        buf = np.empty((y1 - y0, nx), dtype=np.float32)
        fspace.select_hyperslab((y0, 0), (y1 - y0, nx))
        dsid.read(h5py.h5s.create_simple(buf.shape), fspace, buf)
        out[...] = buf[:, x0:x1]
        return
    if y0 == 0 and y1 == ny and full_rows:
        dsid.read(h5py.h5s.ALL, h5py.h5s.ALL, out)
        return
    fspace.select_hyperslab((y0, x0), (y1 - y0, x1 - x0))
    dsid.read(h5py.h5s.create_simple(out.shape), fspace, out)


#: what reading a tag's bytes may raise (h5py, a direct read, a bad dataset)
_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError)


def _unreadable(src: TagSource, exc: BaseException, on_bad_tag: OnBadTag) -> None:
    """A tag whose image cannot be read: BadTagError, or (``"skip"``) a warning."""
    if on_bad_tag == "fail":
        raise BadTagError(f"{src.path!r}: tag {src.tag} cannot be read ({exc}); "
                          "use on_bad_tag='skip' (--on-bad-tag skip) to go on without it"
                          ) from None
    warnings.warn(f"{src.path!r}: tag {src.tag} cannot be read ({exc}); its image is NaN "
                  "and it is left out of every pair", stacklevel=3)


def _by_file(sources: Sequence[TagSource]) -> dict[str, list[int]]:
    """Positions of ``sources`` grouped by file, in order (each file is opened once)."""
    by_path: dict[str, list[int]] = {}
    for i, src in enumerate(sources):
        by_path.setdefault(src.path, []).append(i)
    return by_path


def _read_block(
    sources: Sequence[TagSource],
    window: tuple[slice, slice],
    on_bad_tag: OnBadTag,
    strategy: ReadStrategy = "auto",
    consume: Callable[[int, np.ndarray], None] | None = None,
) -> np.ndarray | None:
    """Read the window of each tag's image into one float32 block (the task kernel).

    Each file is opened once per block. A tag that cannot be read raises
    :class:`BadTagError` (``on_bad_tag="fail"``) or is filled with NaN and
    warned about (``"skip"``).

    With ``consume``, no block is made: each tag is read into one reused
    window buffer and handed to ``consume(i, window)`` (which must not keep
    it) in the order of ``sources``; returns None. A task that transforms
    the images at once so holds one image, not the block.
    """
    if strategy == "auto":
        strategy = READ_STRATEGY
    wy = window[0].stop - window[0].start
    wx = window[1].stop - window[1].start
    out = None if consume else np.empty((len(sources), wy, wx), dtype=np.float32)
    buf = np.empty((wy, wx), dtype=np.float32) if consume else None
    for path, idx in _by_file(sources).items():
        with _open_h5(path) as fh:
            fid = fh.id
            for i in idx:
                src = sources[i]
                dest = buf if out is None else out[i]
                try:
                    _read_one(fid, src, window, dest, strategy)
                except _READ_ERRORS as exc:
                    _unreadable(src, exc, on_bad_tag)
                    dest[...] = np.nan
                if consume is not None:
                    consume(i, dest)
    return out


@dataclasses.dataclass(frozen=True)
class _Contiguous:
    """A contiguous image in its file: byte ``offset``, pixel ``dtype``, ``nx`` columns."""

    offset: int
    dtype: np.dtype
    nx: int

    def rows(self, y0: int, y1: int) -> tuple[int, int]:
        """``(first byte, bytes)`` of the image's rows ``y0:y1`` in the file."""
        row = self.nx * self.dtype.itemsize
        return self.offset + y0 * row, (y1 - y0) * row


def _contiguous_region(dsid: h5py.h5d.DatasetID, file_size: int) -> _Contiguous | None:
    """Where a dataset's pixels can be read from the file directly (:class:`_Contiguous`).

    That is a contiguous, unfiltered dataset of a native-endian number type
    stored inside the file (an uncompressed export); None for
    any other (chunked, compressed, external, virtual...), which HDF5 reads.
    Raises OSError if its bytes run past the end of the file (a truncated
    copy), before any read of them.
    """
    if dsid.get_create_plist().get_layout() != h5py.h5d.CONTIGUOUS:
        return None
    offset = dsid.get_offset()
    dtype = np.dtype(dsid.dtype)
    if offset is None or not dtype.isnative or dtype.kind not in "fiu":
        return None
    nbytes = int(np.prod(dsid.shape, dtype=np.int64)) * dtype.itemsize
    if dsid.get_storage_size() != nbytes:
        return None
    if offset + nbytes > file_size:
        raise OSError(f"its {nbytes} bytes at offset {offset} run past the end of the file "
                      f"({file_size} bytes): the file is truncated")
    return _Contiguous(int(offset), dtype, int(dsid.shape[1]))


def read_pixels(
    sources: Sequence[TagSource],
    window: tuple[slice, slice],
    pixels: np.ndarray,
    row_offsets: Callable[[int], np.ndarray],
    on_bad_tag: OnBadTag,
    consume: Callable[[int, np.ndarray], None],
    direct: bool | None = None,
    into: Callable[[int], np.ndarray] | None = None,
) -> None:
    """Read only the given pixels of each tag's window (the ring band's reader).

    For each tag, in order, the window pixels ``pixels`` (row-major flat
    indices in ``window``) are read into one reused float32 vector handed
    to ``consume(i, x)`` (which must not keep it). A contiguous unfiltered
    dataset (:func:`_contiguous_region`) is read directly from the file: the
    window's rows of one image in one ``pread`` into a reused buffer
    (:func:`_take_direct`), from which the pixels are taken at
    ``row_offsets(nx)`` (their flat positions from the window's first row
    in an image ``nx`` wide, see
    :meth:`sacla_dask.polar.PolarOperator.row_offsets`); when an image's
    rows are not all in the page cache, the kernel is asked to read the
    next image's ahead (``posix_fadvise``) while this one is read. Any
    other dataset (``direct=False``, or chunked / compressed) is read by
    HDF5 as a window and the pixels taken from it. ``direct=None`` means
    :data:`DIRECT_READ`. With ``into``, tag ``i``'s pixels are read into the
    float32 vector ``into(i)`` (C-contiguous, ``pixels.size``; e.g. a row of
    the caller's output) instead of the reused one: no copy left to make.
    ``consume`` is given that vector. Errors as in :func:`_read_block` (an
    unreadable tag's vector is NaN).
    """
    if direct is None:
        direct = DIRECT_READ
    (y0, y1), x0 = (window[0].start, window[0].stop), window[1].start
    wy, wx = y1 - y0, window[1].stop - x0
    reused = np.empty(pixels.size if into is None else 0, dtype=np.float32)
    win: list[np.ndarray] = []  # a window buffer, made if HDF5 has to read one
    rows: list[np.ndarray] = []  # the buffer of an image's rows read directly

    for path, idx in _by_file(sources).items():
        with _open_h5(path) as fh:
            fd = os.open(path, os.O_RDONLY) if direct else -1
            try:
                size = os.fstat(fd).st_size if direct else 0
                # each tag: where its image is in the file, None (HDF5 reads it) or the
                # error met looking it up
                where: list[_Contiguous | BaseException | None] = []
                for i in idx:
                    try:
                        dsid = h5py.h5d.open(fh.id, sources[i].dataset.encode())
                        if y1 > dsid.shape[0] or window[1].stop > dsid.shape[1]:
                            raise ValueError(f"image shape {dsid.shape} does not hold the "
                                             f"window {window}")
                        where.append(_contiguous_region(dsid, size) if direct else None)
                    except _READ_ERRORS as exc:
                        where.append(exc)
                for k, i in enumerate(idx):
                    src, w = sources[i], where[k]
                    x = reused if into is None else into(i)
                    nxt = next((v for v in where[k + 1:] if isinstance(v, _Contiguous)), None)
                    try:
                        if isinstance(w, BaseException):
                            raise w
                        if isinstance(w, _Contiguous):
                            _take_direct(fd, w, y0, y1, row_offsets(w.nx), x, rows,
                                         None if nxt is None else nxt.rows(y0, y1))
                        else:
                            if not win:
                                win.append(np.empty((wy, wx), dtype=np.float32))
                            _read_one(fh.id, src, window, win[0], READ_STRATEGY)
                            np.take(win[0].reshape(-1), pixels, out=x, mode="clip")
                    except _READ_ERRORS as exc:
                        _unreadable(src, exc, on_bad_tag)
                        x[...] = np.nan
                    consume(i, x)
            finally:
                if fd >= 0:
                    os.close(fd)


def _take_direct(fd: int, image: _Contiguous, y0: int, y1: int, index: np.ndarray,
                 out: np.ndarray, buf: list[np.ndarray],
                 ahead: tuple[int, int] | None = None) -> None:
    """``out[:] =`` rows ``y0:y1`` of ``image``, flat, at ``index``: one ``pread`` of
    those rows into the reused buffer ``buf[0]`` (made or grown here), then a gather.

    One copy out of the page cache beats touching the pixels' pages through
    a memory map: measured on the ring band (1569 rows of 2400 float32 per
    image, 177k pixels), 1.1 ms per image against 1.9 ms of page faults
    (AMD EPYC VM, warm cache; benchmarks/README.md).

    The rows are first read without waiting for the disk (``RWF_NOWAIT``,
    where the kernel and file system have it). Only when some of them are
    not in the page cache is the kernel asked to read ``ahead`` (``(first
    byte, bytes)``: the next image's rows) while this read waits: on a warm
    cache that hint, a walk over pages already there, cost 0.13 ms per
    ring image (12 % of the read).
    """
    global _NOWAIT
    first, nbytes = image.rows(y0, y1)
    if not buf or buf[0].nbytes < nbytes:
        buf[:] = [np.empty(nbytes, dtype=np.uint8)]
    view = buf[0][:nbytes]
    got = 0
    if _NOWAIT:
        try:
            got = os.preadv(fd, [view], first, _NOWAIT)
        except BlockingIOError:  # nothing of it cached
            got = 0
        except OSError:  # not on this file system: hint and wait from now on
            _NOWAIT = 0
    if got < nbytes:  # not all in the page cache
        if ahead is not None and hasattr(os, "posix_fadvise"):
            try:  # a hint: a file system that refuses it reads on demand
                os.posix_fadvise(fd, *ahead, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
        while got < nbytes:
            n = os.preadv(fd, [view[got:]], first + got)
            if n <= 0:
                size = os.fstat(fd).st_size
                raise OSError(f"the image's bytes run past the end of the file ({size} "
                              "bytes): it was truncated while being read")
            got += n
    rows = view.view(image.dtype)
    if image.dtype == np.float32:
        np.take(rows, index, out=out, mode="clip")
    else:
        np.copyto(out, rows[index], casting="unsafe")


#: ``os.RWF_NOWAIT`` while the direct reader may use it (0: unsupported here, see
#: :func:`_take_direct`)
_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0) if hasattr(os, "preadv") else 0


#: Whether :func:`read_pixels` reads contiguous uncompressed datasets from the file
#: itself (True unless the environment sets ``SACLA_DASK_DIRECT_READ=0``, e.g. on a
#: file system where that misbehaves: HDF5 then reads every window).
DIRECT_READ: bool = os.environ.get("SACLA_DASK_DIRECT_READ", "1").strip().lower() not in (
    "0", "no", "false", "off")

#: Default way to read a window of a contiguous dataset: "hyperslab" (2-D
#: selection) or "rows" (full rows, then columns). Chosen from
#: benchmarks/bench_read.py on this project's machines; both read the same
#: rows (HDF5's sieve buffer reads whole rows of a contiguous dataset).
READ_STRATEGY: ReadStrategy = "hyperslab"


class _TagReader:
    """Array-like over (tag, y, x) that dask's ``from_array`` slices per block.

    Holds only file paths and tag numbers, so it pickles to workers cheaply.
    """

    def __init__(self, sources: Sequence[TagSource], window: tuple[slice, slice],
                 on_bad_tag: OnBadTag) -> None:
        self.sources = list(sources)
        self.window = window
        self.on_bad_tag = on_bad_tag
        wy = window[0].stop - window[0].start
        wx = window[1].stop - window[1].start
        self.shape = (len(self.sources), wy, wx)
        self.dtype = np.dtype(np.float32)
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        tsel, ysel, xsel = key
        idx = range(len(self.sources))[tsel]
        y = range(self.window[0].start, self.window[0].stop)[ysel]
        x = range(self.window[1].start, self.window[1].stop)[xsel]
        srcs = [self.sources[i] for i in idx]
        if y.step != 1 or x.step != 1:
            return _read_block(srcs, self.window, self.on_bad_tag)[:, ysel, xsel]
        win = (slice(y.start, y.stop), slice(x.start, x.stop))
        return _read_block(srcs, win, self.on_bad_tag)


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


# -- the run -----------------------------------------------------------------------
class Run:
    """One SACLA run (or several files/runs merged by tag).

    Attributes
    ----------
    paths : list of str
        The files read; ``events["source"]`` indexes this list.
    runs : list of int
        SACLA run numbers.
    tags : ndarray of int64
        Sorted tags that have an image.
    events : xarray.Dataset
        Per-tag event data on the ``tag`` dimension (image tags only):
        ``bright`` (bool: the X-ray pulse reached the sample), ``selected``
        (bool: used for pairs), ``run``, ``source`` (index into ``paths``),
        and whatever event_info holds (``pulse_selector``,
        ``photon_energy`` in eV, ``pulse_energy`` in J...), NaN for tags
        that event_info does not list. Each event variable's ``hdf5_path``
        attr says where it came from.
    selection : dict
        How ``bright`` and ``selected`` were decided, and the counts (plain
        JSON values, written to the output's attrs).
    image_shape : (ny, nx)
        Detector image shape.
    bad_tags : list of BadTag
        Tags left out when the run was opened (``on_bad_tag="skip"``).
    """

    def __init__(self, paths: list[str], sources: list[TagSource], events: xr.Dataset,
                 image_shape: tuple[int, int], image_dtype: np.dtype, bad_tags: list[BadTag],
                 on_bad_tag: OnBadTag, all_events: xr.Dataset | None = None,
                 selection: dict[str, Any] | None = None,
                 run_tags: dict[int, np.ndarray] | None = None) -> None:
        self.paths = paths
        self._sources = sources
        self.events = events
        self.all_events = all_events if all_events is not None else events
        self.image_shape = image_shape
        self.image_dtype = image_dtype
        self.bad_tags = bad_tags
        self.on_bad_tag = on_bad_tag
        self.selection = dict(selection or {})
        self._run_tags = run_tags or {}

    # -- description ---------------------------------------------------
    @property
    def tags(self) -> np.ndarray:
        return self.events["tag"].values

    @property
    def runs(self) -> list[int]:
        return sorted({s.run for s in self._sources})

    @property
    def run_number(self) -> int:
        """The run number (the first one when several runs are merged)."""
        return self.runs[0]

    @property
    def bright(self) -> np.ndarray:
        """Boolean per tag: True for X-ray (bright) shots."""
        return self.events["bright"].values

    @property
    def selected(self) -> np.ndarray:
        """Boolean per tag: True for the shots to pair (bright and passing the selection)."""
        if "selected" in self.events:
            return self.events["selected"].values
        return self.bright

    @property
    def sources(self) -> list[TagSource]:
        return list(self._sources)

    def tag_paths(self) -> list[str]:
        """The file of each tag (same order as ``tags``)."""
        return [s.path for s in self._sources]

    def __len__(self) -> int:
        return len(self._sources)

    def __repr__(self) -> str:
        t = self.tags
        rng = f"{t[0]}..{t[-1]}" if t.size else "none"
        bad = f", {len(self.bad_tags)} bad tag(s) left out" if self.bad_tags else ""
        return (f"<Run {','.join(map(str, self.runs))}: {len(self)} tags ({rng}), "
                f"{int(self.bright.sum())} bright, {int(self.selected.sum())} selected, "
                f"images {self.image_shape} {self.image_dtype} from {len(self.paths)} "
                f"file(s){bad}>")

    def _replace(self, keep: np.ndarray | None = None, events: xr.Dataset | None = None,
                 selection: dict[str, Any] | None = None) -> Run:
        ev = self.events if events is None else events
        sources = self._sources
        if keep is not None:
            idx = np.nonzero(keep)[0]
            ev = ev.isel(tag=idx)
            sources = [sources[i] for i in idx]
        return Run(self.paths, sources, ev, self.image_shape, self.image_dtype,
                   self.bad_tags, self.on_bad_tag, self.all_events,
                   self.selection if selection is None else selection, self._run_tags)

    # -- selection -----------------------------------------------------
    def select(self, keep: np.ndarray | Sequence[bool]) -> Run:
        """A new Run holding only the tags where ``keep`` is True."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (len(self),):
            raise ParameterError(f"selection must have one boolean per tag ({len(self)})")
        return self._replace(keep=keep)

    def sel_tags(self, tags: Iterable[int]) -> Run:
        """A new Run with the given tags (all must exist)."""
        tags = np.asarray(list(tags), dtype=np.int64)
        missing = np.setdiff1d(tags, self.tags)
        if missing.size:
            raise ParameterError(f"tags not in the run: {missing[:10].tolist()}")
        return self.select(np.isin(self.tags, tags))

    def select_shots(
        self,
        tag_range: tuple[int, int] | None = None,
        min_pulse_energy: float | None = None,
        skip_first: int | None = None,
        drop_unselected: bool = False,
    ) -> Run:
        """Choose the shots to correlate; the choice is recorded.

        Dark shots (pulse selector / shutter closed, from event_info) are
        never selected. The criteria add up: calling this twice applies both.

        Parameters
        ----------
        tag_range : (first, last), optional
            Keep only tags ``first <= tag <= last`` (the others are not read).
        min_pulse_energy : float, optional
            Select only shots whose pulse energy (event_info ``*pulse_energy*``,
            joules) is at least this; a shot without a pulse energy is not
            selected.
        skip_first : int, optional
            Treat the first N exposures of each run as dark (for files
            without a pulse-selector status; applied in addition to the
            status when there is one). Counted from the run's first
            exposure known to event_info, not from the file's first image.
        drop_unselected : bool
            Leave unselected shots out of the run altogether (not read).
            By default they stay (read, transformed, stored) but are not
            paired, so that the output shows what was left out.

        Returns
        -------
        Run
            ``events["bright"]`` and ``events["selected"]`` updated and
            ``selection`` describing the criteria and counts.
        """
        sel = dict(self.selection)
        run = self
        if tag_range is not None:
            try:
                first, last = (int(t) for t in tag_range)
            except (TypeError, ValueError):
                raise ParameterError(f"tag_range must be (first, last) tag numbers (got "
                                     f"{tag_range!r})") from None
            if first > last:
                raise ParameterError(f"tag_range first {first} > last {last}")
            inside = (self.tags >= first) & (self.tags <= last)
            if not inside.any():
                t = self.tags
                raise ParameterError(
                    f"no tag of the run lies in the tag range {first}..{last} (the run has "
                    f"{t.size} tags {t[0]}..{t[-1]})" if t.size else "the run has no tag")
            prev = sel.get("tag_range")
            if prev:
                first, last = max(first, prev[0]), min(last, prev[1])
            sel["tag_range"] = [first, last]
            sel["n_out_of_range"] = int(sel.get("n_out_of_range", 0) + (~inside).sum())
            run = run._replace(keep=inside)
        ev = run.events.copy()
        bright = ev["bright"].values.copy()
        if skip_first:
            n = int(skip_first)
            if n < 0:
                raise ParameterError(f"skip_first must be >= 0 (got {skip_first})")
            bright &= ~_first_exposures(ev, run._run_tags, n)
            sel["skip_first"] = max(n, int(sel.get("skip_first") or 0))
        selected = bright & (ev["selected"].values if "selected" in ev else True)
        if min_pulse_energy is not None:
            e_min = float(min_pulse_energy)
            if not np.isfinite(e_min):
                raise ParameterError(f"min_pulse_energy must be a finite number of joules "
                                     f"(got {min_pulse_energy!r})")
            if "pulse_energy" not in ev:
                raise ParameterError(
                    f"a pulse-energy threshold needs the pulse energy in event_info, but "
                    f"{self.paths} has none (event data: {sorted(map(str, ev.data_vars))})")
            e = ev["pulse_energy"].values.astype(np.float64)
            with np.errstate(invalid="ignore"):
                ok = np.isfinite(e) & (e >= e_min)
            selected &= ok
            prev_e = sel.get("min_pulse_energy")
            sel["min_pulse_energy"] = e_min if prev_e is None else max(e_min, prev_e)
            sel["pulse_energy_dataset"] = ev["pulse_energy"].attrs.get("hdf5_path", "")
        ev["bright"] = ("tag", bright, ev["bright"].attrs)
        ev["selected"] = ("tag", selected, ev["selected"].attrs if "selected" in ev else {})
        if min_pulse_energy is not None:
            sel["n_low_pulse_energy"] = int((bright & ~ok).sum())
        sel["n_dark"] = int((~bright).sum())
        sel["n_selected"] = int(selected.sum())
        sel["n_tags"] = int(selected.size)
        out = run._replace(events=ev, selection=sel)
        if drop_unselected:
            sel["dropped_unselected"] = True
            sel["n_tags"] = int(selected.sum())
            out = out._replace(keep=selected, selection=sel)
        return out

    # -- images --------------------------------------------------------
    def images(self, chunks: int | str = "128MiB",
               window: tuple[slice, slice] | None = None) -> da.Array:
        """The images as a lazy dask array (tag, y, x) of float32.

        Parameters
        ----------
        chunks : int or str
            Tags per chunk, or a byte size of window data per chunk such as
            ``"256MiB"``. One task per chunk reads its tags.
        window : (slice, slice), optional
            Read only this (rows, cols) bounding box of each image (a
            hyperslab read). Steps are not allowed.
        """
        ny, nx = self.image_shape
        if window is None:
            window = (slice(0, ny), slice(0, nx))
        if len(window) != 2 or not all(isinstance(s, slice) for s in window):
            raise ParameterError(f"window must be (rows, cols) slices (got {window!r})")
        if any(s.step not in (None, 1) for s in window):
            raise ParameterError(f"window slices must have step 1 (got {window})")
        win = tuple(slice(*s.indices(n)[:2]) for s, n in zip(window, (ny, nx), strict=True))
        wy = win[0].stop - win[0].start
        wx = win[1].stop - win[1].start
        if wy <= 0 or wx <= 0:
            raise ParameterError(f"window {window} is empty for images of shape {(ny, nx)}")
        per = parse_chunk_size(chunks, wy * wx * 4)
        reader = _TagReader(self._sources, win, self.on_bad_tag)  # type: ignore[arg-type]
        n = len(self._sources)
        tchunks = tuple([per] * (n // per) + ([n % per] if n % per else [])) or (0,)
        name = "sacla-images-" + dask.base.tokenize(
            [(s.path, s.run, s.tag) for s in self._sources], win, self.on_bad_tag,
            [os.path.getmtime(p) for p in self.paths])
        return da.from_array(reader, chunks=(tchunks, wy, wx), name=name, asarray=False,
                             fancy=False, meta=np.empty((0, 0, 0), np.float32))


def _first_exposures(events: xr.Dataset, run_tags: dict[int, np.ndarray], n: int) -> np.ndarray:
    """True for tags among the first ``n`` exposures of their run."""
    tags = events["tag"].values
    runs = events["run"].values
    out = np.zeros(tags.size, dtype=bool)
    for rn in np.unique(runs):
        known = run_tags.get(int(rn))
        on = runs == rn
        if known is None:
            known = np.sort(tags[on])
        rank = np.searchsorted(known, tags[on])
        out[on] = rank < n
    return out


def _status_bright(events: xr.Dataset) -> tuple[np.ndarray, list[str]]:
    """Bright from the pulse-selector/shutter status; the variables used."""
    bright = np.ones(events.sizes["tag"], dtype=bool)
    used = []
    for key in STATUS_VARIABLES:
        if key in events:
            v = events[key].values.astype(np.float64)
            bright &= np.nan_to_num(v, nan=0) != 0
            used.append(events[key].attrs.get("hdf5_path", key))
    return bright, used


def open_run(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    on_bad_tag: OnBadTag = "fail",
    skip_first: int | None = None,
) -> Run:
    """Open one or several SACLA run files.

    Parameters
    ----------
    paths : path or list of paths
        DataConvert HDF5 files: several files of one run, or several runs.
        Tags are merged in order; a tag present in two files is refused.
    on_bad_tag : {"fail", "skip"}
        What to do with a tag whose detector dataset is missing or damaged.
    skip_first : int, optional
        Treat the first N exposures of each run as dark (see
        :meth:`Run.select_shots`).

    Returns
    -------
    Run

    Raises
    ------
    RunFileError, LayoutError, BadTagError
        With the file (and tag) at fault named.
    """
    if on_bad_tag not in ("fail", "skip"):
        raise ParameterError(f"on_bad_tag must be 'fail' or 'skip' (got {on_bad_tag!r})")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    plist = [os.fspath(p) for p in paths]
    if not plist:
        raise ParameterError("no run file given")
    real: dict[str, str] = {}
    for p in plist:
        rp = os.path.realpath(p)
        if rp in real:
            raise ParameterError(f"run file {p!r} is given twice (also as {real[rp]!r})")
        real[rp] = p
    sources: list[TagSource] = []
    ev_tables = []
    all_ev_tables = []
    bad_all: list[BadTag] = []
    shape = dtype = None
    seen: dict[int, str] = {}
    run_tags: dict[int, list[np.ndarray]] = {}
    for fi, p in enumerate(plist):
        runs, bad = _scan_file(p, on_bad_tag)
        bad_all += bad
        for r in runs:
            if r["shape"] is not None:
                if shape is None:
                    shape, dtype = r["shape"], r["dtype"]
                elif r["shape"] != shape:
                    raise LayoutError(f"{p!r} run {r['run']}: images are {r['shape']} but "
                                      f"earlier files have {shape}")
            ev = xr.Dataset({k: ("tag", v, {"hdf5_path": h5})
                             for k, (h5, v) in r["events"].items()},
                            coords={"tag": r["event_tags"]})
            ev["run"] = ("tag", np.full(r["event_tags"].size, r["run"], dtype=np.int64))
            all_ev_tables.append(ev)
            tags = r["image_tags"]
            run_tags.setdefault(r["run"], []).extend([r["event_tags"], tags])
            missing = np.setdiff1d(tags, r["event_tags"])
            if missing.size:
                warnings.warn(f"{p!r}: {missing.size} image tags are not in event_info "
                              f"(e.g. {missing[:3].tolist()}); their event data is NaN"
                              + (" and they count as dark"
                                 if any(k in r["events"] for k in STATUS_VARIABLES) else ""),
                              stacklevel=2)
            for t in tags.tolist():
                if t in seen:
                    raise LayoutError(f"tag {t} appears twice: in {seen[t]!r} and {p!r}; "
                                      "give each tag's file once")
                seen[t] = p
                sources.append(TagSource(p, r["run"], t))
            sub = ev.reindex(tag=tags)
            sub["source"] = ("tag", np.full(tags.size, fi, dtype=np.int64))
            sub["run"] = ("tag", np.full(tags.size, r["run"], dtype=np.int64))
            ev_tables.append(sub)
    if not sources:
        raise LayoutError(f"no tag with a detector image in {plist}"
                          + (f" ({len(bad_all)} bad tag(s) left out)" if bad_all else ""))
    sources.sort(key=lambda s: s.tag)
    events = xr.concat(ev_tables, dim="tag", join="outer") if len(ev_tables) > 1 else ev_tables[0]
    events = events.sortby("tag")
    all_events = (xr.concat(all_ev_tables, dim="tag", join="outer")
                  if len(all_ev_tables) > 1 else all_ev_tables[0])
    _, first = np.unique(all_events["tag"].values, return_index=True)
    all_events = all_events.isel(tag=first)  # files of one run may repeat its event data
    for tab in ev_tables + all_ev_tables:  # concat keeps only the first table's attrs
        for k, v in tab.data_vars.items():
            if k in events and "hdf5_path" in v.attrs:
                events[k].attrs.setdefault("hdf5_path", v.attrs["hdf5_path"])
    bright, status = _status_bright(events)
    events["tag"].attrs["long_name"] = "SACLA tag number"
    events["run"].attrs["long_name"] = "SACLA run number"
    abspaths = [os.path.abspath(p) for p in plist]
    events["source"].attrs.update(long_name="index of the tag's run file in the 'sources' "
                                            "attribute", sources=abspaths)
    if "photon_energy" in events:
        events["photon_energy"].attrs["units"] = "eV"
    if "pulse_energy" in events:
        events["pulse_energy"].attrs["units"] = "J"
    events["bright"] = ("tag", bright, {"long_name": "X-ray shot (pulse selector/shutter "
                                                     "open, not skipped)"})
    events["selected"] = ("tag", bright.copy(), {"long_name": "used for pairs"})
    events.attrs["sources"] = abspaths
    selection = {"dark_from": status or "none", "skip_first": 0, "tag_range": None,
                 "min_pulse_energy": None, "n_tags": int(bright.size),
                 "n_dark": int((~bright).sum()), "n_selected": int(bright.sum())}
    if bad_all:
        warnings.warn(f"{len(bad_all)} bad tag(s) left out: "
                      + "; ".join(map(str, bad_all[:5])) + ("..." if len(bad_all) > 5 else ""),
                      stacklevel=2)
    rt = {k: np.unique(np.concatenate(v)) for k, v in run_tags.items()}
    run = Run(plist, sources, events, tuple(shape), np.dtype(dtype), bad_all,  # type: ignore
              on_bad_tag, all_events, selection, rt)
    if skip_first:
        run = run.select_shots(skip_first=skip_first)
    return run


def mean_wavelength(run: Run) -> float:
    """Mean wavelength (Angstrom) of the selected shots from the photon energy in eV."""
    from ..geometry import energy_to_wavelength

    if "photon_energy" not in run.events:
        raise ParameterError(
            f"no photon energy in the event data of {run.paths}; give the wavelength "
            "(--wavelength, Angstrom)")
    use = run.selected if run.selected.any() else np.ones(len(run), dtype=bool)
    e = run.events["photon_energy"].values[use]
    e = e[np.isfinite(e)]
    if e.size == 0 or not np.all(e > 0):
        raise ParameterError(f"the photon energy in {run.paths} is missing or not positive; "
                             "give the wavelength (--wavelength, Angstrom)")
    return float(energy_to_wavelength(float(np.mean(e))))


__all__ = ["Run", "TagSource", "BadTag", "open_run", "parse_chunk_size", "mean_wavelength",
           "DETECTOR"]
