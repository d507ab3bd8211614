"""The HDF5 low level of reading run files: opening them inside tasks, reading images.

Each task opens the file itself (h5py objects do not pickle), so a graph of
reads runs on distributed workers and nothing is read before it is
computed. A task reads, for each of its tags, only the window (bounding box
of the q band) of the image with one HDF5 hyperslab read straight into the
task's output block (:func:`_read_block`). Compressed datasets (gzip,
bitshuffle/LZ4, zstd... via hdf5plugin) are read transparently; note that
HDF5 decompresses every *whole* chunk a window touches, so with the usual
one-chunk-per-image layout a window saves memory and copying but not
decompression or disk bytes. Each image is read with a single HDF5 call, so
every chunk is decompressed once and the chunk cache size does not matter.

A thin band (the pipeline's ring) can be read pixel by pixel instead
(:func:`read_pixels`): from a contiguous, uncompressed dataset
(:func:`_contiguous_region`), the rows of the band are read with one
``pread`` per image into a reused buffer and the listed pixels taken from it
(no HDF5 call per image, :func:`_take_direct`); from any other layout,
through HDF5's window read.

A tag whose bytes cannot be read or decoded (a corrupt compressed chunk, a
file truncated under the reader) raises :class:`~sacla_dask.errors.BadTagError`
naming the file and tag (``on_bad_tag="fail"``), or (``"skip"``) gives an
all-NaN image plus a warning, which the pipeline detects and keeps out of
every pair.

Callers look :func:`_read_block` and :func:`read_pixels` up in this module
at call time (``hdf5.read_pixels(...)``), so that a test or a worker preload
can wrap them here.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from .. import config
from ..errors import BadTagError, RunFileError

try:  # registers bitshuffle/LZ4/zstd... HDF5 filters used for compressed exports
    import hdf5plugin  # noqa: F401
except ImportError:  # pragma: no cover - hdf5plugin is a hard dependency
    hdf5plugin = None  # type: ignore[assignment]

import h5py

if TYPE_CHECKING:
    from .run import TagSource

#: What to do with a tag whose image is missing, malformed or unreadable.
OnBadTag = Literal["fail", "skip"]
#: How a window of a contiguous dataset is read (see :data:`READ_STRATEGY`).
ReadStrategy = Literal["auto", "hyperslab", "rows"]


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


# -- reading images -------------------------------------------------------------
def _read_one(fid: h5py.h5f.FileID, src: TagSource, window: tuple[slice, slice],
              out: np.ndarray, strategy: ReadStrategy) -> None:
    """Read one tag's window into ``out`` (C-contiguous float32, window shape).

    One HDF5 read call: ``"hyperslab"`` selects the 2-D window;
    ``"rows"`` reads the window's full rows as one contiguous run of bytes
    and copies the columns (contiguous datasets only; which is faster
    depends on the machine, see :data:`READ_STRATEGY`). HDF5 converts
    integer pixels to float32 on the way.
    """
    if src.sensors:  # an unassembled run: the window of its stacked image
        from .panels import read_stacked

        return read_stacked(fid, src, window, out)
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
    buf = np.empty((wy, wx) if consume else (0, 0), dtype=np.float32)  # consume's window
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


# -- a band's pixels, read from the file directly ------------------------------------
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
    the setting ``read.direct`` (:mod:`sacla_dask.config`, read here: in
    the process that reads). With ``into``, tag ``i``'s pixels are read into the
    float32 vector ``into(i)`` (C-contiguous, ``pixels.size``; e.g. a row of
    the caller's output) instead of the reused one: no copy left to make.
    ``consume`` is given that vector. Errors as in :func:`_read_block` (an
    unreadable tag's vector is NaN).
    """
    if direct is None:
        direct = config.get_bool("read.direct")
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
                    if sources[i].sensors:  # a stacked image: HDF5 reads the window
                        where.append(None)
                        continue
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

    One copy out of the page cache costs less than touching the pixels'
    pages through a memory map (a page fault per page), and maps nothing
    into the process.

    The rows are first read without waiting for the disk (``RWF_NOWAIT``,
    where the kernel and file system have it). Only when some of them are
    not in the page cache is the kernel asked to read ``ahead`` (``(first
    byte, bytes)``: the next image's rows) while this read waits: on a warm
    cache that hint would only be a walk over pages already there, a cost
    for nothing.
    """
    first, nbytes = image.rows(y0, y1)
    if not buf or buf[0].nbytes < nbytes:
        buf[:] = [np.empty(nbytes, dtype=np.uint8)]
    view = buf[0][:nbytes]
    got = 0
    if _PREADV.nowait:
        try:
            got = os.preadv(fd, [view], first, _PREADV.nowait)  # type: ignore[list-item]
        except BlockingIOError:  # nothing of it cached
            got = 0
        except OSError:  # not on this file system: hint and wait from now on
            _PREADV.nowait = 0
    if got < nbytes:  # not all in the page cache
        if ahead is not None and hasattr(os, "posix_fadvise"):
            try:  # a hint: a file system that refuses it reads on demand
                os.posix_fadvise(fd, *ahead, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
        while got < nbytes:
            n = os.preadv(fd, [view[got:]], first + got)  # type: ignore[list-item]
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


@dataclasses.dataclass
class _PreadvFlags:
    """What this process's ``os.preadv`` turned out to support.

    Attributes
    ----------
    nowait : int
        ``os.RWF_NOWAIT`` while the direct reader may use it; 0 where it is
        unsupported, or once a file system refused it (:func:`_take_direct`).
    """

    nowait: int = getattr(os, "RWF_NOWAIT", 0) if hasattr(os, "preadv") else 0


#: the direct reader's ``preadv`` capabilities in this process
_PREADV = _PreadvFlags()

#: Default way to read a window of a contiguous dataset: "hyperslab" (2-D
#: selection) or "rows" (full rows, then columns, one copy more). Both read the
#: same rows (HDF5's sieve buffer reads whole rows of a contiguous dataset);
#: benchmarks/bench_read.py compares them.
READ_STRATEGY: ReadStrategy = "hyperslab"


# -- the images of a run as a dask array ---------------------------------------------
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
            block = cast(np.ndarray, _read_block(srcs, self.window, self.on_bad_tag))
            return block[:, ysel, xsel]
        win = (slice(y.start, y.stop), slice(x.start, x.stop))
        return cast(np.ndarray, _read_block(srcs, win, self.on_bad_tag))
