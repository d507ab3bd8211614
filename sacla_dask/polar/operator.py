"""The polar operator: an engine mapping an image window's pixels to the polar bins.

A :class:`PolarOperator` says which pixels it reads and in what order (its
*columns*: the pixels of a bounding-box window, row-major or tile by tile,
or, in a *compact* operator, only the pixels it reads), which bins are good
(the polar mask) and how well covered, and holds one engine that maps the
column vector of an image to its polar image:

* :class:`~.sparse.SparseEngine`, a CSR matrix (any method, any
  corrections);
* :class:`~.gather.GatherEngine`, one pixel of weight 1 per bin
  (``nearest`` without corrections), applied as a gather.

The engine is chosen when the operator is built (:func:`select_engine`)
and is immutable; each pickles itself (a gather as its int32 index). The
kernels of this module act on one image or one block of images:
:func:`apply_polar` (a block of windows), :func:`polar_into` (one window),
:func:`polar_from_columns` (one image already as the operator's columns,
e.g. the pixels a reader fetched) and :func:`polar_from_gathered` (one
image whose bins a reader gathered straight from the file's rows).
"""

from __future__ import annotations

from typing import Any, TypeAlias

import numpy as np
import scipy.sparse as sp

from ..errors import ParameterError
from .gather import GatherEngine
from .sparse import SparseEngine

__all__ = ["Engine", "PolarOperator", "apply_polar", "polar_from_columns",
           "polar_from_gathered", "polar_into", "select_engine"]

#: the engines a polar operator may hold
Engine: TypeAlias = SparseEngine | GatherEngine

_INTP_BYTES = np.dtype(np.intp).itemsize


def select_engine(matrix: sp.csr_matrix, method: str) -> Engine:
    """The engine for a built map: a gather for a ``nearest`` map that takes one pixel of
    weight 1 per bin (no corrections), else the CSR matrix itself."""
    if method == "nearest":
        gather = GatherEngine.from_matrix(matrix)
        if gather is not None:
            return gather
    return SparseEngine(matrix)


class PolarOperator:
    """Resampling operator from an image window to the polar grid.

    Parameters
    ----------
    engine : SparseEngine or GatherEngine
        The map from the columns to the ``nq * nphi`` bins; its weights are
        over good pixels only (masked pixels carry zero weight) and masked
        bins read nothing.
    window : tuple of slice
        ``(rows, cols)`` bounding box of the image the operator reads.
    shape : tuple
        ``(nq, nphi)``.
    polar_mask : ndarray of bool (nq, nphi)
        True where the bin has enough good-pixel coverage.
    coverage : ndarray of float32 (nq, nphi), or None
        Fraction of the bin's weight (interpolation weight, or area for
        ``splitting``) that falls on good pixels of the image (None in an
        operator made for the workers, which only apply the weights).
    method : str
        ``nearest``, ``bilinear`` or ``splitting``.
    tile : (int, int) or None
        Tile shape of the column order (None: row-major window).
    corrections : str
        Intensity corrections folded into the weights (``"none"``,
        ``"solid_angle"``, ``"polarization(f)"`` or both).
    token : str
        Deterministic name of the operator's inputs (for Dask's graph key).
    pixels : ndarray of int32 or None
        Set in a *compact* operator (:meth:`compact`): its columns are only
        the pixels it reads, column ``j`` being window pixel ``pixels[j]``
        (row-major flat index in the window). None: the columns are all the
        window's pixels.

    Each parameter is an attribute of the same name (the engine ready for
    use: :attr:`engine`).

    An operator is not changed once made. What it derives on first use
    (file offsets of its pixels, its compact or workers' form) is kept
    aside and never pickled, and the one change of its state, a gather
    engine made ready for use after unpickling (:attr:`engine`), replaces
    one immutable engine by another in a single step: a worker may pickle
    the operator (to send it on) while a task on another thread uses it.
    """

    def __init__(self, engine: Engine, window: tuple[slice, slice], shape: tuple[int, int],
                 polar_mask: np.ndarray, coverage: np.ndarray | None, method: str, *,
                 tile: tuple[int, int] | None = None, corrections: str = "none",
                 token: str = "", pixels: np.ndarray | None = None) -> None:
        self._engine = engine
        self.window = window
        self.shape = shape
        self.polar_mask = polar_mask
        self.coverage = coverage
        self.method = method
        self.tile = tile
        self.corrections = corrections
        self.token = token
        self.pixels = pixels
        self._derived: dict[Any, Any] = {}

    # -- what is shipped ---------------------------------------------------------
    _FIELDS = ("window", "shape", "polar_mask", "coverage", "method", "tile", "corrections",
               "token", "pixels")

    def __getstate__(self) -> dict[str, Any]:
        """The fields and the engine (which pickles itself); nothing derived."""
        state = {name: getattr(self, name) for name in self._FIELDS}
        state["engine"] = self._engine  # one read: an engine whole, as shipped or ready
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self._engine = state.pop("engine")
        self.__dict__.update(state)
        self._derived = {}

    def __dask_tokenize__(self) -> tuple[str, str]:
        # Tokenizing the weights would hash hundreds of MB each time the
        # pipeline wraps the operator in ``dask.delayed``; the inputs name it.
        return ("sacla_dask.PolarOperator", self.token or str(id(self)))

    def __repr__(self) -> str:
        (y0, y1), (x0, x1) = ((s.start, s.stop) for s in self.window)
        nq, nphi = self.shape
        parts = [f"{self.method}", f"{nq} x {nphi} bins",
                 f"window [{y0}:{y1}, {x0}:{x1}]"]
        if self.corrections != "none":
            parts.append(f"corrections {self.corrections}")
        if self.pixels is not None:
            parts.append(f"compact: {self.pixels.size} pixels")
        if self.tile is not None:
            parts.append(f"tiles {self.tile[0]}x{self.tile[1]}")
        return f"PolarOperator({', '.join(parts)}, token {self.token!r})"

    # -- the map -----------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        """The engine, ready to apply (an unpickled gather is made ready on first use)."""
        engine = self._engine
        if not engine.is_ready:
            engine = self._engine = engine.ready()
        return engine

    @property
    def matrix(self) -> sp.csr_matrix:
        """The map as a CSR matrix (a gather engine derives it on first use)."""
        return self.engine.matrix

    @property
    def gather(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(index, empty)`` of a gather engine (:class:`GatherEngine`), else None."""
        engine = self.engine
        if isinstance(engine, GatherEngine):
            return engine.index, engine.empty
        return None

    @property
    def used_columns(self) -> np.ndarray:
        """Boolean per column: the pixels the operator reads."""
        return self.engine.used_columns

    @property
    def window_shape(self) -> tuple[int, int]:
        rows, cols = self.window
        return (rows.stop - rows.start, cols.stop - cols.start)

    @property
    def nbins(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def n_columns(self) -> int:
        """The map's columns: the window's pixels, or the pixels of a compact operator."""
        if self.pixels is not None:
            return int(self.pixels.size)
        wy, wx = self.window_shape
        return wy * wx

    @property
    def nbytes(self) -> int:
        """Memory of the operator in bytes (what each worker holds once it is used).

        Counts the polar mask and coverage, the engine's arrays (a gather's
        index as intp, as it is applied), and for a compact operator its
        pixel list and the file positions a reader derives from it (8
        bytes per pixel, :meth:`row_offsets`; and for a compact gather 16
        bytes per bin, :meth:`bin_offsets` and :attr:`bin_pixels`).
        """
        engine = self._engine
        n = self.polar_mask.nbytes + engine.nbytes
        if self.coverage is not None:
            n += self.coverage.nbytes
        if self.pixels is not None:
            n += self.pixels.nbytes + self.pixels.size * _INTP_BYTES
            if isinstance(engine, GatherEngine):
                n += 2 * self.nbins * _INTP_BYTES  # bin_offsets, bin_pixels
        return int(n)

    # -- the forms shipped to workers -----------------------------------------------
    def _derive(self, key: Any, make: Any) -> Any:
        """``make()``, once: kept aside (never pickled) under ``key``."""
        value = self._derived.get(key)
        if value is None:
            value = self._derived[key] = make()
        return value

    def for_workers(self) -> PolarOperator:
        """This operator without what only the client uses (its coverage), for shipping.

        Same engine, bins and polar mask (cached).
        """
        if self.coverage is None:
            return self
        return self._derive("for_workers", lambda: PolarOperator(
            self.engine, self.window, self.shape, self.polar_mask, None, self.method,
            tile=self.tile, corrections=self.corrections, token=f"{self.token}-workers",
            pixels=self.pixels))

    def compact(self) -> PolarOperator:
        """This operator with columns for only the pixels it reads (cached).

        A ring band reads a small part of its window's pixels; the compact
        operator's columns are those pixels (in this operator's column
        order, so a tiled operator keeps its cache-friendly order), listed
        in :attr:`pixels`, and a reader can fetch just them
        (:func:`sacla_dask.io.hdf5.read_pixels`) instead of the whole window.
        Same weights, bins and polar mask; no coverage. Applying it to the
        pixels gives bit for bit what this operator gives on the window.
        """
        if self.pixels is not None:
            return self
        return self._derive("compact", self._make_compact)

    def _make_compact(self) -> PolarOperator:
        cols = np.flatnonzero(self.used_columns)
        idx_dtype = np.int32 if self.n_columns < 2**31 - 1 else np.int64
        new_column = np.zeros(self.n_columns, dtype=idx_dtype)
        new_column[cols] = np.arange(cols.size, dtype=idx_dtype)
        return PolarOperator(self.engine.compact(new_column, cols.size), self.window,
                             self.shape, self.polar_mask, None, self.method, tile=None,
                             corrections=self.corrections, token=f"{self.token}-compact",
                             pixels=self._window_pixels(cols).astype(idx_dtype))

    def _window_pixels(self, cols: np.ndarray) -> np.ndarray:
        """Row-major flat window index of each column in ``cols`` (undoes the tile order)."""
        cols = np.asarray(cols, dtype=np.int64)
        if self.tile is None:
            return cols
        wy, wx = self.window_shape
        ty, tx = self.tile
        tile_no, within = np.divmod(cols, ty * tx)
        ty_no, tx_no = np.divmod(tile_no, wx // tx)
        u = ty_no * ty + within // tx
        v = tx_no * tx + within % tx
        return u * wx + v

    # -- where a reader finds the pixels ---------------------------------------------
    def row_offsets(self, nx: int) -> np.ndarray:
        """Of a compact operator: each pixel's flat index from the start of the window's
        first image row, in an image ``nx`` pixels wide (cached; intp).

        ``image.reshape(-1)[window_rows.start * nx + row_offsets(nx)]`` are
        the operator's columns: what :func:`sacla_dask.io.hdf5.read_pixels` takes
        from a file.
        """
        pixels = self.pixels
        if pixels is None:
            raise ParameterError("row_offsets: not a compact operator (see compact())")

        def make() -> np.ndarray:
            # (u * wx + v) -> u * nx + v + x0, in place and in pieces: no full-size
            # temporaries, which a worker's allocator may keep for good
            wx, x0 = self.window_shape[1], self.window[1].start
            off = pixels.astype(np.intp)
            step = 1 << 20
            for s in range(0, off.size, step):
                seg = off[s:s + step]
                seg += (seg // wx) * (nx - wx) + x0
            return off

        return self._derive(("row_offsets", int(nx)), make)

    def _compact_gather(self, what: str) -> tuple[np.ndarray, np.ndarray]:
        """``(pixels, index)`` of a compact gather operator; else ParameterError."""
        g = self.gather
        if self.pixels is None or g is None:
            raise ParameterError(f"{what}: not a compact gather operator (see compact(), "
                                 "gather)")
        return self.pixels, g[0]

    def bin_offsets(self, nx: int) -> np.ndarray:
        """Of a compact gather operator: the pixel each polar bin takes, as its flat
        index from the start of the window's first image row in an image ``nx``
        pixels wide (cached; intp, ``nq * nphi``).

        ``image_rows.reshape(-1)[bin_offsets(nx)]`` is the polar image (but
        for its empty bins, which take the first pixel: see
        :func:`polar_from_gathered`) in one gather straight from the rows a
        reader fetched, instead of gathering the pixels
        (:meth:`row_offsets`) and then the bins from them.
        """
        index = self._compact_gather("bin_offsets")[1]
        return self._derive(("bin_offsets", int(nx)),
                            lambda: self.row_offsets(nx)[index])

    @property
    def bin_pixels(self) -> np.ndarray:
        """Of a compact gather operator: the window pixel (row-major flat index) each
        polar bin takes (cached; intp); :meth:`bin_offsets` for a window read whole."""
        pixels, index = self._compact_gather("bin_pixels")
        return self._derive("bin_pixels",
                            lambda: pixels.astype(np.intp)[index])

    # -- an image as the engine's columns ----------------------------------------------
    def columns(self, window: np.ndarray, buf: np.ndarray | None = None) -> np.ndarray:
        """One image window as the float32 vector the engine maps (column order).

        ``buf`` (float32, :attr:`n_columns`) is reused when a copy is needed
        (tiled order, a compact operator, another dtype, or a non-contiguous
        window).
        """
        if (self.tile is None and self.pixels is None and window.dtype == np.float32
                and window.flags.c_contiguous):
            return window.reshape(-1)
        if buf is None:
            buf = np.empty(self.n_columns, dtype=np.float32)
        wy, wx = self.window_shape
        if self.pixels is not None:
            flat = np.ravel(window)
            if flat.dtype == np.float32:
                np.take(flat, self.pixels, out=buf, mode="clip")
            else:
                np.copyto(buf, flat[self.pixels], casting="unsafe")
        elif self.tile is None:
            np.copyto(buf.reshape(wy, wx), window, casting="unsafe")
        else:
            ty, tx = self.tile
            np.copyto(buf.reshape(wy // ty, wx // tx, ty, tx),
                      window.reshape(wy // ty, ty, wx // tx, tx).transpose(0, 2, 1, 3),
                      casting="unsafe")
        return buf


# -- kernels: one image, or one block of images ---------------------------------------
def apply_polar(windows: np.ndarray, op: PolarOperator) -> tuple[np.ndarray, np.ndarray]:
    """Resample a block of image windows onto the polar grid.

    One engine application per image (a sparse matrix-vector product, or a
    plain gather for an uncorrected ``nearest`` operator), written in place
    into the output. Non-finite pixels cost nothing unless the operator
    reads one: the (cheap) sum of each polar image is checked, and only an
    image whose sum is not finite is redone with those pixels set aside.

    Parameters
    ----------
    windows : ndarray (ntag, wy, wx)
        Image windows (``image[op.window]``), any real dtype (computed in
        float32).
    op : PolarOperator
        Operator from :func:`~sacla_dask.polar.build_operator`.

    Returns
    -------
    polar : ndarray float32 (ntag, nq, nphi)
        Polar intensities; 0 in masked bins, NaN in bins that read a
        non-finite pixel of that image.
    nonfinite : ndarray int64 (ntag,)
        Number of non-finite pixels the operator read in each image (pixels
        it gives no weight to, masked or outside the band, are not counted).
    """
    windows = np.asarray(windows)
    if windows.ndim != 3 or windows.shape[1:] != op.window_shape:
        raise ParameterError(
            f"image window shape {windows.shape[1:]} does not match the operator's "
            f"{op.window_shape}"
        )
    k = windows.shape[0]
    nq, nphi = op.shape
    out = np.empty((k, nq * nphi), dtype=np.float32)
    nonfinite = np.zeros(k, dtype=np.int64)
    buf: list[np.ndarray] = []
    for i in range(k):
        nonfinite[i] = polar_into(windows[i], op, out[i], buf)
    return out.reshape(k, nq, nphi), nonfinite


def polar_into(window: np.ndarray, op: PolarOperator, out: np.ndarray,
               buf: list[np.ndarray] | None = None) -> int:
    """Resample one image window into ``out`` (float32, ``nq * nphi`` or ``(nq, nphi)``).

    The kernel of :func:`apply_polar` for one image; ``buf``, a list kept
    by the caller, holds a reusable pixel buffer across calls. Returns the
    number of non-finite pixels the operator read (their bins are NaN).
    """
    if window.shape != op.window_shape:
        raise ParameterError(f"image window shape {window.shape} does not match the "
                             f"operator's {op.window_shape}")
    need = (op.tile is not None or op.pixels is not None or window.dtype != np.float32
            or not window.flags.c_contiguous)
    if need and buf is not None and not buf:
        buf.append(np.empty(op.n_columns, dtype=np.float32))
    return polar_from_columns(op.columns(window, buf[0] if need and buf else None), op, out)


def polar_from_columns(x: np.ndarray, op: PolarOperator, out: np.ndarray) -> int:
    """Resample one image given as the operator's column vector ``x`` into ``out``.

    ``x`` (float32, :attr:`PolarOperator.n_columns`) is what
    :meth:`PolarOperator.columns` makes of a window, or, for a compact
    operator, the pixels :func:`sacla_dask.io.hdf5.read_pixels` fetched;
    ``out`` is float32, ``nq * nphi`` or ``(nq, nphi)``. Returns the number
    of non-finite pixels the operator read (their bins are NaN).
    """
    return op.engine.apply(x, out.reshape(-1))


def polar_from_gathered(y: np.ndarray, op: PolarOperator) -> int:
    """Finish a polar image whose bins were gathered at a compact gather operator's
    :meth:`PolarOperator.bin_offsets` (or :attr:`~PolarOperator.bin_pixels`).

    ``y`` (float32, C-contiguous, ``nq * nphi`` or ``(nq, nphi)``, in place)
    holds the pixel each bin takes; its empty bins (masked, or reading no
    pixel) are set to 0 and bins that read a non-finite pixel to NaN, so
    that ``y`` is what :func:`polar_from_columns` gives from the operator's
    columns, bit for bit. Returns the number of bins that read a non-finite
    pixel (0 when none did).
    """
    if not y.flags.c_contiguous:  # (a reshape would copy, and the work be lost)
        raise ParameterError("polar_from_gathered: the polar image must be C-contiguous")
    engine = op.engine
    if not isinstance(engine, GatherEngine):
        raise ParameterError("polar_from_gathered: not a gather operator (see gather)")
    return engine.finish_gathered(y.reshape(-1))
