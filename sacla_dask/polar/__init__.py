"""Polar transform: detector image -> (q, phi) grid inside a q band.

This module owns the precomputed resampling operator that maps a detector
image (or the bounding-box window of it that the band touches) onto a polar
grid, the polar mask and per-bin coverage derived from the user's pixel
mask, the optional solid-angle and polarisation corrections, and the
per-row masked-mean normalisation. The numerical kernels
(:func:`apply_polar`, :func:`normalize_rows`) act on one numpy block of
images; :mod:`sacla_dask.pipeline` lifts them with ``map_blocks``, the
operator being one graph key shipped once to each worker.

Grid conventions
----------------
* Pixel centres sit at integer coordinates; ``x`` is the fast (column)
  axis, ``y`` the slow (row) axis; a pixel covers ``[x - 1/2, x + 1/2) x
  [y - 1/2, y + 1/2)``.
* Radius bins are evenly spaced in pixels between the band's inner and
  outer radius; ``radius`` and ``q`` (inverse Angstrom) are given at the
  bin centres.
* ``phi_j = 2 pi j / nphi`` (radians), ``phi = atan2(y - cy, x - cx)``,
  from +x (fast axis) toward +y (slow axis). Bin ``(i, j)`` covers
  ``|r - radius_i| <= dr / 2`` and ``|phi - phi_j| <= pi / nphi``.

Methods
-------
``nearest``
    The value of the pixel that contains the bin centre (the tutorial's
    ``InterpSimple.nearest``).
``bilinear``
    Bilinear interpolation between the four pixel centres around the bin
    centre.
``splitting``
    The bin's area average: the weight of a pixel is the area of its
    overlap with the annular-sector bin, estimated by sampling the bin on a
    polar sub-grid of at least ``subdivision`` points per pixel length in
    radius and in arc (and at least one per bin), each sample weighted by
    its area element ``r dr dphi``. This is what pyFAI's pixel splitting
    computes, and it stays honest where the bins are smaller than a pixel
    (the inner part of a wide band): neighbouring bins then share the pixel
    rather than sampling it at a point.

Masked pixels (and pixels off the image) carry zero weight; each bin's
``coverage`` is the fraction of its weight that falls on good pixels, a bin
is good in the polar mask when ``coverage >= min_coverage``, and the weights
of a good bin are renormalised over its good pixels.

Corrections (pyFAI's conventions, off by default as in the tutorial): with
``c_p`` the product of the solid angle ``cos^3(2 theta)`` (relative to the
beam centre) and the polarisation factor
``P = (1 + cos^2 2theta - f cos(2 phi) sin^2 2theta) / 2`` of pixel ``p``, a
bin's value is ``sum_p w_p I_p / sum_p w_p c_p``, pyFAI's
signal / normalisation ratio.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from ..errors import GeometryError, MaskError, ParameterError
from ..geometry import Geometry, default_nphi

try:  # the in-place y += A @ x of scipy's own CSR product (no allocation, no copy)
    from scipy.sparse._sparsetools import csr_matvec as _csr_matvec
except ImportError:  # pragma: no cover - private API moved: fall back to ``A @ x``
    _csr_matvec = None

Method = Literal["nearest", "bilinear", "splitting"]
METHODS: tuple[str, ...] = ("nearest", "bilinear", "splitting")

#: Tile (rows, columns) of the cache-friendly pixel order used when the
#: operator reads its window densely (see :func:`build_operator`).
TILE: tuple[int, int] = (8, 16)

#: Bins processed at once while building an operator (bounds its memory).
_BUILD_CHUNK_BINS = 1 << 20
#: Threads building the blocks of an operator (:func:`build_operator`).
_BUILD_THREADS = 2


def check_mask(mask: np.ndarray | None, shape: tuple[int, int], name: str = "mask") -> np.ndarray:
    """Validate a user pixel mask (1/True = good) against an image shape.

    Returns a C-contiguous boolean array; raises :class:`MaskError` naming the
    shapes or the offending values otherwise.
    """
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise MaskError(f"{name} has shape {m.shape} but the detector images are {tuple(shape)}")
    if m.dtype == bool:
        return np.ascontiguousarray(m)
    if not np.issubdtype(m.dtype, np.number):
        raise MaskError(f"{name} must be boolean or 0/1 numbers (got dtype {m.dtype})")
    bad = (m != 0) & (m != 1)  # (NaN included); np.unique would sort 6 M pixels: 20 ms
    if bad.any():
        shown = np.unique(m[bad])[:5]
        raise MaskError(
            f"{name} must hold only 0 (masked) and 1 (good); found other values such as "
            f"{shown.tolist()}"
        )
    return np.ascontiguousarray(m.astype(bool))


@dataclasses.dataclass(frozen=True)
class PolarGrid:
    """The (q, phi) sampling grid of a band.

    Attributes
    ----------
    radius : ndarray (nq,)
        Bin-centre radii in pixels.
    q : ndarray (nq,)
        Bin-centre momentum transfer in inverse Angstrom.
    phi : ndarray (nphi,)
        Azimuth in radians, ``2 pi j / nphi``.
    nphi_default : int
        The one-pixel-of-arc nphi before any FFT-friendly rounding.
    r_edges : (float, float), optional
        Inner and outer edge of the band in pixels.
    """

    radius: np.ndarray
    q: np.ndarray
    phi: np.ndarray
    nphi_default: int
    r_edges: tuple[float, float] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.radius.size, self.phi.size)

    @property
    def r_in(self) -> float:
        """Inner edge of the band in pixels."""
        return float(self.radius[0] - self.dr / 2)

    @property
    def dr(self) -> float:
        """Radial bin width in pixels."""
        if self.r_edges is not None:
            return (self.r_edges[1] - self.r_edges[0]) / self.radius.size
        return float(self.radius[1] - self.radius[0]) if self.radius.size > 1 else 1.0

    @property
    def dphi(self) -> float:
        """Azimuthal bin width in radians."""
        return 2 * math.pi / self.phi.size


def make_grid(
    geometry: Geometry,
    qmin: float,
    qmax: float,
    nphi: int | None = None,
    nq: int | None = None,
    fast_nphi: bool = True,
) -> PolarGrid:
    """Build the polar grid for the band ``qmin <= q < qmax`` (inverse Angstrom).

    ``nq`` defaults to one bin per pixel of radius; ``nphi`` to one pixel of
    arc at the band's outer radius (in pixels), rounded up to an
    FFT-friendly length (``scipy.fft.next_fast_len``) unless ``fast_nphi``
    is False (:func:`~sacla_dask.geometry.default_nphi`). An ``nphi`` given
    is used as it is.
    """
    for name, v in (("qmin", qmin), ("qmax", qmax)):
        if not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
            raise ParameterError(f"{name} must be a finite number in 1/A (got {v!r})")
    if qmin < 0:
        raise ParameterError(f"qmin must be >= 0 1/A (got qmin={qmin})")
    if qmin >= qmax:
        raise ParameterError(f"qmin must be smaller than qmax (got qmin={qmin}, qmax={qmax} 1/A)")
    r_in = float(geometry.q_to_radius(qmin))
    r_out = float(geometry.q_to_radius(qmax))
    if nq is None:
        nq = max(1, int(round(r_out - r_in)))
    if int(nq) < 1:
        raise ParameterError(f"nq must be >= 1 (got {nq})")
    nq = int(nq)
    n_default = default_nphi(r_out, fast=False)
    if nphi is None:
        nphi = default_nphi(r_out, fast=fast_nphi)
    if int(nphi) < 2:
        raise ParameterError(f"nphi must be >= 2 (got {nphi})")
    nphi = int(nphi)
    dr = (r_out - r_in) / nq
    radius = r_in + (np.arange(nq) + 0.5) * dr
    q = np.asarray(geometry.radius_to_q(radius), dtype=float)
    phi = 2 * np.pi * np.arange(nphi) / nphi
    return PolarGrid(radius=radius, q=q, phi=phi, nphi_default=n_default,
                     r_edges=(r_in, r_out))


def correction_factors(geometry: Geometry, iy: np.ndarray, ix: np.ndarray,
                       solid_angle: bool = False,
                       polarization: float | None = None) -> np.ndarray:
    """Per-pixel intensity correction ``c`` (the value is divided by it), pyFAI's convention.

    Parameters
    ----------
    geometry : Geometry
        Beam centre (pixels), pixel size and distance (metres).
    iy, ix : ndarray of int
        Pixel row and column indices.
    solid_angle : bool
        Include ``cos^3(2 theta)``, the pixel's solid angle relative to one
        at the beam centre (pyFAI ``correctSolidAngle=True``).
    polarization : float, optional
        Polarisation factor ``f = (Ih - Iv) / (Ih + Iv)`` in ``[-1, 1]``,
        horizontal meaning along +x (pyFAI ``polarization_factor``, axis
        offset 0); ``None`` for no correction.

    Returns
    -------
    ndarray float64
        ``c = cos^3(2 theta) * P(2 theta, phi)`` (the factors asked for).
    """
    dx = ix - geometry.center_x
    dy = iy - geometry.center_y
    rho2 = (dx * dx + dy * dy) * geometry.pixel_size ** 2
    d2 = geometry.distance ** 2
    cos2 = d2 / (d2 + rho2)  # cos^2(2 theta)
    c = np.ones(np.shape(dx))
    if solid_angle:
        c = c * cos2 ** 1.5
    if polarization is not None:
        phi = np.arctan2(dy, dx)
        c = c * 0.5 * (1.0 + cos2 - polarization * np.cos(2 * phi) * (1.0 - cos2))
    return c


@dataclasses.dataclass
class PolarOperator:
    """Sparse resampling operator from an image window to the polar grid.

    Attributes
    ----------
    matrix : scipy.sparse.csr_matrix float32, shape (nq * nphi, window pixels)
        Weights over good pixels only (masked pixels carry zero weight);
        rows of masked bins are empty. Columns number the window's pixels
        in row-major order, or tile by tile when ``tile`` is set.
    window : tuple of slice
        ``(rows, cols)`` bounding box of the image the operator reads.
    shape : tuple
        ``(nq, nphi)``.
    polar_mask : ndarray of bool (nq, nphi)
        True where the bin has enough good-pixel coverage.
    coverage : ndarray of float32 (nq, nphi), or None
        Fraction of the bin's weight (interpolation weight, or area for
        ``splitting``) that falls on good pixels of the image (None in a
        compact operator, which only applies the weights).
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
    """

    matrix: sp.csr_matrix
    window: tuple[slice, slice]
    shape: tuple[int, int]
    polar_mask: np.ndarray
    coverage: np.ndarray | None
    method: str
    tile: tuple[int, int] | None = None
    corrections: str = "none"
    token: str = ""
    pixels: np.ndarray | None = None
    _cache: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __repr__(self) -> str:
        # never the matrix: a worker's copy of a pick would rebuild it just to be shown
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

    @property
    def window_shape(self) -> tuple[int, int]:
        rows, cols = self.window
        return (rows.stop - rows.start, cols.stop - cols.start)

    @property
    def nbins(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """Memory of the operator in bytes (what each worker holds once).

        Counts the matrix (unless this is a worker's copy of a pixel pick,
        which holds no matrix: see :meth:`__getstate__`), the polar mask and
        coverage, for an uncorrected ``nearest`` operator the pick index
        each worker derives (8 bytes per bin), and for a compact operator
        its pixel list and the file positions a reader derives from it (8
        bytes per pixel, :meth:`row_offsets`; and for a compact pick 16 bytes
        per bin, :meth:`bin_offsets` and :attr:`bin_pixels`).
        """
        n = self.polar_mask.nbytes
        if self.coverage is not None:
            n += self.coverage.nbytes
        m = self.__dict__.get("matrix")
        if m is not None:
            n += m.data.nbytes + m.indices.nbytes + m.indptr.nbytes
        if self.method == "nearest" and self.corrections == "none":
            n += self.nbins * np.dtype(np.intp).itemsize
        if self.pixels is not None:
            n += self.pixels.nbytes + self.pixels.size * np.dtype(np.intp).itemsize
            if self.method == "nearest" and self.corrections == "none":
                n += 2 * self.nbins * np.dtype(np.intp).itemsize  # bin_offsets, bin_pixels
        return int(n)

    @property
    def n_columns(self) -> int:
        """The matrix's columns: the window's pixels, or the pixels of a compact operator."""
        if self.pixels is not None:
            return int(self.pixels.size)
        wy, wx = self.window_shape
        return wy * wx

    def for_workers(self) -> PolarOperator:
        """This operator without what only the client uses (its coverage), for shipping.

        Same weights, bins, polar mask and cached pick; the wide band's
        workers each hold 28 MB less (its float32 coverage). Cached.
        """
        if self.coverage is None:
            return self
        cached = self._cache.get("for_workers")
        if cached is None:
            new = object.__new__(PolarOperator)
            new.__dict__.update(self.__dict__)
            new.__dict__.update(coverage=None, token=f"{self.token}-workers",
                                _cache=dict(self._cache))
            new._cache.pop("compact", None)
            cached = self._cache["for_workers"] = new
        return cached

    def compact(self) -> PolarOperator:
        """This operator with columns for only the pixels it reads (cached).

        A ring band reads ~200 000 of its window's 2.5 million pixels; the
        compact operator's columns are those pixels (in this operator's
        column order, so a tiled operator keeps its cache-friendly order),
        listed in :attr:`pixels`, and a reader can fetch just them
        (:func:`sacla_dask.run.read_pixels`) instead of the whole window.
        Same weights, bins and polar mask; no coverage. Applying it to the
        pixels gives bit for bit what this operator gives on the window.
        """
        if self.pixels is not None:
            return self
        cached = self._cache.get("compact")
        if cached is not None:
            return cached
        cols = np.flatnonzero(self.used_columns)
        idx_dtype = np.int32 if self.n_columns < 2**31 - 1 else np.int64
        newcol = np.zeros(self.n_columns, dtype=idx_dtype)
        newcol[cols] = np.arange(cols.size, dtype=idx_dtype)
        state = {k: v for k, v in self.__dict__.items() if k not in ("matrix", "_cache")}
        state.update(coverage=None, tile=None, token=f"{self.token}-compact",
                     pixels=self._window_pixels(cols).astype(idx_dtype), _cache={})
        new = object.__new__(PolarOperator)
        new.__dict__.update(state)
        pick = self.gather
        if pick is not None:
            full, columns = self._pick_columns()
            index = np.zeros(self.nbins, dtype=np.intp)
            index[full] = newcol[columns]
            new._cache["gather"] = (index, pick[1])
        else:
            m = self.matrix
            new.__dict__["matrix"] = sp.csr_matrix((m.data, newcol[m.indices], m.indptr),
                                                   shape=(self.nbins, cols.size))
        self._cache["compact"] = new
        return new

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

    def row_offsets(self, nx: int) -> np.ndarray:
        """Of a compact operator: each pixel's flat index from the start of the window's
        first image row, in an image ``nx`` pixels wide (cached; intp).

        ``image.reshape(-1)[window_rows.start * nx + row_offsets(nx)]`` are
        the operator's columns: what :func:`sacla_dask.run.read_pixels` takes
        from a file.
        """
        if self.pixels is None:
            raise ParameterError("row_offsets: not a compact operator (see compact())")
        key = ("row_offsets", int(nx))
        off = self._cache.get(key)
        if off is None:
            # (u * wx + v) -> u * nx + v + x0, in place and in pieces: a worker computes
            # this once, and a wide band's full-size temporaries (~150 MB) would stay in
            # its heap for good under the "retain" allocator policy
            wx, x0 = self.window_shape[1], self.window[1].start
            off = self.pixels.astype(np.intp)
            step = 1 << 20
            for s in range(0, off.size, step):
                seg = off[s:s + step]
                seg += (seg // wx) * (nx - wx) + x0
            self._cache[key] = off
        return off

    def bin_offsets(self, nx: int) -> np.ndarray:
        """Of a compact pixel pick (:attr:`gather`): the pixel each polar bin takes,
        as its flat index from the start of the window's first image row in an
        image ``nx`` pixels wide (cached; intp, ``nq * nphi``).

        ``image_rows.reshape(-1)[bin_offsets(nx)]`` is the polar image (but
        for its empty bins, which take the first pixel: see
        :func:`polar_from_pick`) in one gather straight from the rows a
        reader fetched, instead of gathering the pixels
        (:meth:`row_offsets`) and then the bins from them: the ring band's
        polar task 1.54-1.62 -> 1.40-1.44 ms per image (benchmarks/README.md).
        """
        g = self.gather
        if self.pixels is None or g is None:
            raise ParameterError("bin_offsets: not a compact pixel pick (see compact(), "
                                 "gather)")
        key = ("bin_offsets", int(nx))
        off = self._cache.get(key)
        if off is None:
            off = self._cache[key] = self.row_offsets(nx)[g[0]]
        return off

    @property
    def bin_pixels(self) -> np.ndarray:
        """Of a compact pixel pick: the window pixel (row-major flat index) each polar
        bin takes (cached; intp); :meth:`bin_offsets` for a window read whole."""
        g = self.gather
        if self.pixels is None or g is None:
            raise ParameterError("bin_pixels: not a compact pixel pick (see compact(), "
                                 "gather)")
        pix = self._cache.get("bin_pixels")
        if pix is None:
            pix = self._cache["bin_pixels"] = self.pixels.astype(np.intp)[g[0]]
        return pix

    @property
    def gather(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(index, empty)`` when the operator is a plain pixel pick, else None.

        A ``nearest`` operator without corrections has one weight of 1 per
        good bin: applying it is ``x[index]`` (then 0 in the ``empty``
        bins), which reads 8 bytes per bin instead of the CSR's 12. Derived
        from the matrix on first use; pickled in its place (int32, see
        :meth:`__getstate__`), and made intp again on first use after
        unpickling.
        """
        if "gather" not in self._cache:
            shipped = self._cache.get("pick32")
            if shipped is not None:  # as unpickled: int32 until used
                # the pick is in the cache in one form or the other at every moment: a
                # worker may pickle this operator (to send it on) from another thread
                g = self._cache["gather"] = (shipped[0].astype(np.intp), shipped[1])
                self._cache.pop("pick32", None)
                return g
            m = self.matrix
            counts = np.diff(m.indptr)
            g = None
            if self.method == "nearest" and counts.max(initial=0) <= 1 and np.all(m.data == 1):
                full = counts == 1
                index = np.zeros(m.shape[0], dtype=np.intp)
                index[full] = m.indices
                g = (index, np.flatnonzero(~full))
            self._cache["gather"] = g
        return self._cache["gather"]

    @property
    def used_columns(self) -> np.ndarray:
        """Boolean (window pixels,) in column order: the pixels the operator reads."""
        used = self._cache.get("used")
        if used is None:
            used = np.zeros(self.n_columns, dtype=bool)
            if "matrix" in self.__dict__:
                used[self.matrix.indices] = True
            else:  # a pick without its matrix
                used[self._pick_columns()[1]] = True
            self._cache["used"] = used
        return used

    def _pick_columns(self) -> tuple[np.ndarray, np.ndarray]:
        """Of a pick (:attr:`gather`): which bins read a pixel, and that pixel's column."""
        index, empty = self.gather  # type: ignore[misc]
        full = np.ones(index.size, dtype=bool)
        full[empty] = False
        return full, index[full]

    def __getstate__(self) -> dict[str, Any]:
        """What is pickled (to each worker): no cache, and a pick as its index.

        A plain pixel pick (:attr:`gather`) travels as its int32 index (4
        bytes per bin) instead of its CSR matrix (12 bytes per bin), and
        the worker keeps only the pick: for the wide band 28 MB shipped
        instead of 82 MB, and 82 MB less held on every worker. The matrix is
        rebuilt, identical, on first use (only for an image with a
        non-finite pixel in the band).

        An unpickled pick keeps its int32 index until first used
        (:attr:`gather`), so a copy that only passes it on (Dask's
        scheduler unpickles the graph and pickles each task again for the
        workers) converts nothing: the wide band's operator, in a fresh
        process, unpickled in 14 ms instead of 21 and pickled again in 16
        instead of 24-85 (benchmarks/README.md).
        """
        state = dict(self.__dict__)
        state["_cache"] = {}
        pick = self._cache.get("pick32")
        if pick is None:
            g = self.gather if "matrix" in self.__dict__ else self._cache.get("gather")
            if g is not None and self.n_columns < 2**31:
                pick = (g[0].astype(np.int32), g[1])
        if pick is not None:
            state.pop("matrix", None)
            state["_pick"] = pick
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        pick = state.pop("_pick", None)
        self.__dict__.update(state)
        if pick is not None:
            self._cache["pick32"] = pick

    def __getattr__(self, name: str) -> Any:
        # only reached for a missing attribute: the matrix of a pick shipped without it
        if (name == "matrix" and "_cache" in self.__dict__
                and (self._cache.get("gather") or "pick32" in self._cache)):
            full, columns = self._pick_columns()
            indptr = np.zeros(full.size + 1, dtype=np.int32)
            np.cumsum(full, dtype=np.int32, out=indptr[1:])
            indices = columns.astype(np.int32)
            m = sp.csr_matrix((np.ones(indices.size, dtype=np.float32), indices, indptr),
                              shape=(full.size, self.n_columns))
            self.__dict__["matrix"] = m
            return m
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __dask_tokenize__(self) -> tuple[str, str]:
        # Tokenizing the matrix would hash hundreds of MB each time the
        # pipeline wraps the operator in ``dask.delayed``; the inputs name it.
        return ("sacla_dask.PolarOperator", self.token or str(id(self)))

    def columns(self, window: np.ndarray, buf: np.ndarray | None = None) -> np.ndarray:
        """One image window as the float32 vector the matrix multiplies (column order).

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


# -- building the operator ------------------------------------------------------
def _sample_points(grid: PolarGrid, geometry: Geometry,
                   rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """Bin-centre positions (x, y) in pixels, for the q rows ``rows``, flattened (q, phi)."""
    r = grid.radius[rows][:, None]
    # cos/sin of the nphi angles once, not of every bin (the same values)
    x = geometry.center_x + r * np.cos(grid.phi)[None, :]
    y = geometry.center_y + r * np.sin(grid.phi)[None, :]
    return x.ravel(), y.ravel()


def _point_entries(grid: PolarGrid, geometry: Geometry, rows: slice,
                   method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Pixel (iy, ix) and weight entries of nearest/bilinear for the q rows ``rows``.

    Returns ``iy, ix, w`` of shape ``(nbins, K)`` (K = 1 or 4 pixels per
    bin, in bin order) and K.
    """
    x, y = _sample_points(grid, geometry, rows)
    nb = x.size
    if method == "nearest":
        iy = np.rint(y).astype(np.int64)[:, None]  # ties to even, as numpy's round
        ix = np.rint(x).astype(np.int64)[:, None]
        return iy, ix, np.ones((nb, 1)), 1
    x0 = np.floor(x)
    y0 = np.floor(y)
    fx = x - x0
    fy = y - y0
    gx = 1 - fx
    gy = 1 - fy
    ix = x0.astype(np.int64)[:, None] + np.array([0, 1, 0, 1])
    iy = y0.astype(np.int64)[:, None] + np.array([0, 0, 1, 1])
    w = np.empty((nb, 4))
    np.multiply(gx, gy, out=w[:, 0])
    np.multiply(fx, gy, out=w[:, 1])
    np.multiply(gx, fy, out=w[:, 2])
    np.multiply(fx, fy, out=w[:, 3])
    return iy, ix, w, 4


def _splitting_entries(grid: PolarGrid, geometry: Geometry, rows: slice, shape: tuple[int, int],
                       subdivision: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bin, pixel (iy, ix) and area-weight entries of pixel splitting for the q rows ``rows``.

    Each bin is sampled on an ``n_r x n_a`` polar sub-grid (midpoints, at
    least ``subdivision`` samples per pixel length in radius and in arc, at
    least one per bin); a sample's weight is its area element ``r dr dphi``
    (up to a constant); the samples falling in the same pixel are summed.
    Bins are local to the chunk; pixels off the image have indices outside
    it. Also returns each bin's total weight.
    """
    ny, nx = shape
    nphi = grid.phi.size
    dr = grid.dr
    dphi = grid.dphi
    radius = grid.radius[rows]
    n_r = max(1, math.ceil(subdivision * dr - 1e-9))
    kbits = max(1, int(n_r).bit_length())
    n_a = np.maximum(1, np.ceil(subdivision * (radius + dr / 2) * dphi - 1e-9)).astype(np.int64)
    wpad = nx + 4  # padded row length: off-image samples clip to a 2-pixel border
    kdtype = np.int32 if (ny + 4) * wpad << kbits < 2**31 else np.int64
    out_b, out_y, out_x, out_w = [], [], [], []
    total = np.empty(radius.size * nphi)
    i = 0
    while i < radius.size:
        na = int(n_a[i])
        s = n_r * na
        j = i + 1  # rows sharing this n_a, in batches of about 2M samples
        while j < radius.size and n_a[j] == na and (j + 1 - i) * nphi * s <= 2_000_000:
            j += 1
        a = (np.arange(na) + 0.5) / na * dphi - dphi / 2
        ang = grid.phi[:, None] + a[None, :]  # (nphi, na)
        rk = radius[i:j, None] - dr / 2 + (np.arange(n_r) + 0.5) * dr / n_r  # (rows, n_r)
        # positions of the samples (rows, nphi, na, n_r), as pixel indices + 2
        rk4 = rk[:, None, None, :]
        px = np.cos(ang)[None, :, :, None] * rk4
        px += geometry.center_x + 2.5
        np.clip(px, 0, nx + 3, out=px)
        py = np.sin(ang)[None, :, :, None] * rk4
        py += geometry.center_y + 2.5
        np.clip(py, 0, ny + 3, out=py)
        key = py.astype(kdtype)
        key *= wpad
        key += px.astype(kdtype)  # padded flat pixel index
        key <<= kbits
        key |= np.arange(n_r, dtype=kdtype)  # the radial sub-sample (its weight) in the low bits
        key = key.reshape(-1, s)
        key.sort(axis=1)
        pix = key >> kbits
        kidx = key & ((1 << kbits) - 1)
        kidx += (np.arange(j - i, dtype=kdtype) * n_r).repeat(nphi)[:, None]
        w = np.take(rk.ravel(), kidx)
        new = np.ones(pix.shape, dtype=bool)
        np.not_equal(pix[:, 1:], pix[:, :-1], out=new[:, 1:])
        newf = new.ravel()
        starts = np.flatnonzero(newf)
        out_w.append(np.add.reduceat(w.ravel(), starts))
        p = pix.ravel()[starts]
        out_y.append(p // wpad - 2)
        out_x.append(p % wpad - 2)
        out_b.append(np.repeat(np.arange(i * nphi, j * nphi), new.sum(axis=1)))
        total[i * nphi:j * nphi] = np.repeat(na * rk.sum(axis=1), nphi)
        i = j
    return (np.concatenate(out_b), np.concatenate(out_y), np.concatenate(out_x),
            np.concatenate(out_w), total)


def _fit_tile(lo: int, hi: int, n: int, t: int) -> tuple[int, int] | None:
    """Grow ``[lo, hi)`` inside ``[0, n)`` to a multiple of ``t``, or None."""
    need = (-(hi - lo)) % t
    hi2 = min(n, hi + need)
    lo2 = lo - (need - (hi2 - hi))
    return None if lo2 < 0 else (lo2, hi2)


#: The operators alive in this process, by the token of their inputs: building one again
#: for the same geometry, grid, mask and method (a notebook planning a run again with
#: other pairing or statistics, or the next run of a session while the last plan is held)
#: returns the one built (operators are not changed once built). Weak references: this
#: keeps no operator alive.
_OPERATORS: weakref.WeakValueDictionary[str, PolarOperator] = weakref.WeakValueDictionary()


def _tokenize(*args: Any) -> str:
    import dask.base  # (the kernels of this module need no Dask)

    return dask.base.tokenize(*args)


def _operator_token(geometry: Geometry, grid: PolarGrid, image_shape: tuple[int, int],
                    good: np.ndarray, *args: Any) -> str:
    return _tokenize(dataclasses.astuple(geometry), grid.radius, grid.phi.size,
                     tuple(image_shape), good, *args)


def build_operator(
    geometry: Geometry,
    grid: PolarGrid,
    image_shape: tuple[int, int],
    mask: np.ndarray | None = None,
    method: Method = "nearest",
    min_coverage: float = 0.5,
    *,
    solid_angle: bool = False,
    polarization: float | None = None,
    subdivision: int = 4,
    tile: bool | None = None,
) -> PolarOperator:
    """Precompute the polar resampling operator for one geometry and mask.

    Parameters
    ----------
    geometry : Geometry
        Beam centre (pixels) and distances.
    grid : PolarGrid
        Output grid from :func:`make_grid`.
    image_shape : (ny, nx)
        Full detector image shape.
    mask : ndarray of bool, optional
        User pixel mask, True/1 = good.
    method : {"nearest", "bilinear", "splitting"}
        Interpolation (see the module docstring).
    min_coverage : float
        A bin is good in the polar mask when at least this fraction of its
        weight lands on good pixels inside the image.
    solid_angle : bool
        Divide by the relative solid angle ``cos^3(2 theta)``.
    polarization : float, optional
        Divide by the polarisation factor with this ``f`` in ``[-1, 1]``.
    subdivision : int
        ``splitting`` only: samples per pixel length (accuracy of the
        overlap areas; the cost of building grows as its square).
    tile : bool, optional
        Number the window's pixels tile by tile (:data:`TILE`), which keeps
        the product's reads in cache when the operator reads its window
        densely. None (default) decides: tiled when the operator has at
        least as many weights as the window has pixels.

    Returns
    -------
    PolarOperator
    """
    if method not in METHODS:
        raise ParameterError(f"method must be one of {METHODS} (got {method!r})")
    if not (0 < float(min_coverage) <= 1):
        raise ParameterError(f"min_coverage must be in (0, 1] (got {min_coverage!r})")
    if polarization is not None and not (-1 <= float(polarization) <= 1):
        raise ParameterError(f"polarization factor must be in [-1, 1] (got {polarization!r})")
    if int(subdivision) < 1:
        raise ParameterError(f"subdivision must be >= 1 (got {subdivision!r})")
    ny, nx = (int(s) for s in image_shape)
    geometry.check_on_detector((ny, nx))
    good = check_mask(mask, (ny, nx))
    key = _operator_token(geometry, grid, (ny, nx), good, method, float(min_coverage),
                          bool(solid_angle), polarization, int(subdivision), tile)
    built = _OPERATORS.get(key)
    if built is not None:
        return built
    op = _build_operator(geometry, grid, (ny, nx), good, method, float(min_coverage),
                         bool(solid_angle), polarization, int(subdivision), tile, key)
    _OPERATORS[key] = op
    return op


def _build_operator(geometry: Geometry, grid: PolarGrid, image_shape: tuple[int, int],
                    good: np.ndarray, method: Method, min_coverage: float, solid_angle: bool,
                    polarization: float | None, subdivision: int, tile: bool | None,
                    key: str) -> PolarOperator:
    """:func:`build_operator` for checked inputs, named ``key`` (their token)."""
    ny, nx = image_shape
    good_flat = good.ravel()
    nq, nphi = grid.shape
    nbins = nq * nphi
    corr = polarization is not None or solid_angle
    rows_per = max(1, _BUILD_CHUNK_BINS // nphi)

    def block(i0: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                tuple[int, int, int, int] | None]:
        rows = slice(i0, min(nq, i0 + rows_per))
        nb = (rows.stop - rows.start) * nphi
        if method == "splitting":
            b, iy, ix, w, total = _splitting_entries(grid, geometry, rows, (ny, nx),
                                                     int(subdivision))
        else:
            iy, ix, w, k = _point_entries(grid, geometry, rows, method)
            iy, ix, w = iy.ravel(), ix.ravel(), w.ravel()
            b = np.repeat(np.arange(nb), k)
            total = None  # the interpolation weights of a bin sum to 1
        ok = (iy >= 0) & (iy < ny) & (ix >= 0) & (ix < nx)
        pix = np.where(ok, iy * nx + ix, 0)
        ok &= good_flat[pix]
        ok &= w > 0
        b, pix, w = b[ok], pix[ok], w[ok]
        goodw = np.bincount(b, weights=w, minlength=nb)
        if total is None:
            cov = np.minimum(goodw, 1.0)
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                cov = np.where(total > 0, goodw / total, 0.0)
        pm = cov >= min_coverage - 1e-12
        keep = pm[b]
        b, pix, w = b[keep], pix[keep], w[keep]
        if corr:
            iy, ix = np.divmod(pix, nx)
            c = correction_factors(geometry, iy, ix, solid_angle, polarization)
            norm = np.bincount(b, weights=w * c, minlength=nb)
        else:
            norm = goodw
        pix = pix.astype(np.int32) if ny * nx < 2**31 else pix
        box = None  # the bounding box of the pixels read (rows, columns)
        if pix.size:
            col = pix % nx
            box = (int(pix.min()) // nx, int(pix.max()) // nx + 1, int(col.min()),
                   int(col.max()) + 1)
        return np.bincount(b, minlength=nb), pix, (w / norm[b]).astype(np.float32), cov, box

    # blocks of q rows on two threads (numpy releases the GIL in most of it): a wide
    # band's operator is built on the client before any worker has work
    parts = _map_threads(block, range(0, nq, rows_per))
    coverage = np.concatenate([part[3] for part in parts])
    polar_mask = coverage >= min_coverage - 1e-12
    sizes = [part[1].size for part in parts]
    nnz = int(sum(sizes))
    if nnz == 0:  # also when a few pixels are touched but no bin reaches min_coverage
        raise GeometryError(
            f"the q band (radius {grid.radius[0]:.1f}..{grid.radius[-1]:.1f} px about "
            f"({geometry.center_x:g}, {geometry.center_y:g})) has no good pixel on the "
            f"{ny}x{nx} detector: it lies outside the image or entirely in the mask"
        )
    # window: the bounding box of the pixels read
    boxes = np.array([part[4] for part in parts if part[4] is not None])
    r0, r1 = int(boxes[:, 0].min()), int(boxes[:, 1].max())
    c0, c1 = int(boxes[:, 2].min()), int(boxes[:, 3].max())
    use_tile = nnz >= (r1 - r0) * (c1 - c0) if tile is None else bool(tile)
    tshape: tuple[int, int] | None = None
    if use_tile:
        fr = _fit_tile(r0, r1, ny, TILE[0])
        fc = _fit_tile(c0, c1, nx, TILE[1])
        if fr is not None and fc is not None:
            (r0, r1), (c0, c1), tshape = fr, fc, TILE
    wy, wx = r1 - r0, c1 - c0
    idx_dtype = np.int32 if max(nnz, wy * wx) < 2**31 - 1 else np.int64
    # the CSR arrays made once and filled block by block (no concatenated copies: fresh
    # memory is slow to fault in on some VMs)
    data = np.empty(nnz, dtype=np.float32)
    indices = np.empty(nnz, dtype=idx_dtype)
    indptr = np.empty(nbins + 1, dtype=idx_dtype)
    indptr[0] = 0
    first = np.cumsum([0] + sizes)
    first_bin = np.cumsum([0] + [part[0].size for part in parts])

    def place(k: int) -> None:
        counts, pix, w = parts[k][:3]
        a, b = int(first[k]), int(first[k + 1])
        data[a:b] = w
        iy, ix = np.divmod(pix.astype(idx_dtype, copy=False), nx)
        u, v = iy - r0, ix - c0
        if tshape is None:
            col = u * wx + v
        else:
            ty, tx = tshape  # powers of two: shifts and masks
            sy, sx = ty.bit_length() - 1, tx.bit_length() - 1
            col = (((u >> sy) * (wx >> sx) + (v >> sx)) << (sy + sx)) + ((u & (ty - 1)) << sx)
            col += v & (tx - 1)
        indices[a:b] = col
        # (the counts cast first: a cumsum cast into a narrower out array is ~10x slower)
        ptr = indptr[int(first_bin[k]) + 1:int(first_bin[k + 1]) + 1]
        np.cumsum(counts.astype(idx_dtype), out=ptr)
        ptr += a

    _map_threads(place, range(len(parts)))
    parts.clear()  # the blocks' arrays, now copied into the CSR ones
    matrix = sp.csr_matrix((data, indices, indptr), shape=(nbins, wy * wx))
    names = []
    if solid_angle:
        names.append("solid_angle")
    if polarization is not None:
        names.append(f"polarization({float(polarization):g})")
    return PolarOperator(
        matrix=matrix,
        window=(slice(r0, r1), slice(c0, c1)),
        shape=grid.shape,
        polar_mask=polar_mask.reshape(grid.shape),
        coverage=coverage.reshape(grid.shape).astype(np.float32),
        method=method,
        tile=tshape,
        corrections=",".join(names) or "none",
        token=_tokenize(key, tshape),
    )


def _map_threads(fn: Callable[[int], Any], items: Sequence[int]) -> list[Any]:
    """``[fn(i) for i in items]``, on :data:`_BUILD_THREADS` threads when there are several."""
    if len(items) < 2 or _BUILD_THREADS < 2:
        return [fn(i) for i in items]
    with concurrent.futures.ThreadPoolExecutor(min(_BUILD_THREADS, len(items))) as ex:
        return list(ex.map(fn, items))


# -- kernels ---------------------------------------------------------------
def _matvec(m: sp.csr_matrix, x: np.ndarray, y: np.ndarray) -> None:
    """``y[:] = m @ x`` without allocating (float32 vectors)."""
    if _csr_matvec is not None:
        y.fill(0)
        try:
            _csr_matvec(m.shape[0], m.shape[1], m.indptr, m.indices, m.data, x, y)
            return
        except (TypeError, ValueError):  # pragma: no cover - unexpected dtypes
            pass
    y[...] = m @ x


def apply_polar(windows: np.ndarray, op: PolarOperator) -> tuple[np.ndarray, np.ndarray]:
    """Resample a block of image windows onto the polar grid.

    One sparse matrix-vector product per image (a plain ``take`` for an
    uncorrected ``nearest`` operator), written in place into the output.
    Non-finite pixels cost nothing unless the operator reads one: the
    (cheap) sum of each polar image is checked, and only an image whose sum
    is not finite is redone with those pixels set aside.

    Parameters
    ----------
    windows : ndarray (ntag, wy, wx)
        Image windows (``image[op.window]``), any real dtype (computed in
        float32).
    op : PolarOperator
        Operator from :func:`build_operator`.

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
    operator, the pixels :func:`sacla_dask.run.read_pixels` fetched. Returns
    the number of non-finite pixels the operator read (their bins are NaN).
    """
    y = out.reshape(-1)
    gather = op.gather
    if gather is None:
        _matvec(op.matrix, x, y)
    else:
        np.take(x, gather[0], out=y, mode="clip")  # (clip: no buffering; all in range)
        y[gather[1]] = 0
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: NaN, caught below
        total = float(y.sum())
    if not math.isfinite(total):
        return _redo_nonfinite(op, x, y)
    return 0


def polar_from_pick(y: np.ndarray, op: PolarOperator) -> int:
    """Finish a polar image read bin by bin at a pick's :meth:`PolarOperator.bin_offsets`.

    ``y`` (float32, ``nq * nphi`` or ``(nq, nphi)``, in place) holds the
    pixel each bin takes; its empty bins (masked, or reading no pixel) are
    set to 0 and bins that read a non-finite pixel to NaN, so that ``y`` is
    what :func:`polar_from_columns` gives from the operator's columns, bit
    for bit. Returns the number of bins that read a non-finite pixel (0 when
    none did).
    """
    if not y.flags.c_contiguous:  # (a reshape would copy, and the work be lost)
        raise ParameterError("polar_from_pick: the polar image must be C-contiguous")
    y = y.reshape(-1)
    y[op.gather[1]] = 0  # type: ignore[index]
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: NaN, caught below
        total = float(y.sum())
    if math.isfinite(total):
        return 0
    bad = ~np.isfinite(y)  # (none: a finite image whose float32 sum overflowed)
    y[bad] = np.nan
    return int(np.count_nonzero(bad))


def _redo_nonfinite(op: PolarOperator, x: np.ndarray, y: np.ndarray) -> int:
    """Recompute ``y`` with non-finite pixels set aside; NaN in the bins that read one."""
    bad = ~np.isfinite(x)
    if not bad.any():  # a finite image whose polar sum overflowed float32: nothing to fix
        return 0
    m = op.matrix
    _matvec(m, np.where(bad, np.float32(0), x), y)
    touched = np.empty_like(y)
    _matvec(m, bad.astype(np.float32), touched)
    y[touched > 0] = np.nan
    return int(np.count_nonzero(bad & op.used_columns))


def normalize_rows(polar: np.ndarray, polar_mask: np.ndarray,
                   out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Divide each polar row by its masked mean.

    One float64 row sum and one float32 multiply per image; rows holding a
    non-finite value are redone one by one, and the masked bins are looked
    at only where the mask has them (they are already 0 when ``polar``
    comes from :func:`apply_polar`).

    Parameters
    ----------
    polar : ndarray (ntag, nq, nphi)
        Polar intensities; NaN marks bins hit by non-finite pixels.
    polar_mask : ndarray bool (nq, nphi)
        True = good bin.
    out : ndarray float32 (ntag, nq, nphi), optional
        Where to write the result; may be ``polar`` itself (in place: no
        new block, which for a wide band saves a few hundred MB and their
        page faults per task).

    Returns
    -------
    normalised : ndarray float32 (ntag, nq, nphi)
        ``polar / row_mean``: 0 in masked bins; NaN in good bins that are not
        finite (hit by a non-finite pixel): masked for that shot only, so
        that every pair it is in leaves the bin out and is normalised by its
        own mask (:func:`sacla_dask.correlation.difference_correlation`).
    row_mean : ndarray float64 (ntag, nq)
        The masked mean of each row (intensity units); NaN for a row with no
        good bin.
    """
    polar = np.asarray(polar)
    pm = np.asarray(polar_mask, dtype=bool)
    k = polar.shape[0]
    nq, nphi = pm.shape
    count = pm.sum(axis=1)
    masked = np.flatnonzero(~pm.ravel())
    total = polar.sum(axis=-1, dtype=np.float64)
    mvals = polar.reshape(k, nq * nphi)[:, masked] if masked.size else None
    dirty = mvals is not None and bool(np.any(mvals))  # masked bins that are not 0
    if dirty:
        mrow = masked // nphi
        with np.errstate(invalid="ignore"):
            for i in range(k):
                total[i] -= np.bincount(mrow, weights=mvals[i].astype(np.float64), minlength=nq)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
    redo = np.argwhere(~np.isfinite(total) & (count > 0))  # a NaN/inf somewhere in the row
    for i, q in redo:
        row = polar[i, q]
        good = pm[q] & np.isfinite(row)
        n = int(good.sum())
        mean[i, q] = row[good].sum(dtype=np.float64) / n if n else np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(np.isfinite(mean) & (mean != 0), 1.0 / mean, 0.0).astype(np.float32)
    fill = [pm[q] & ~np.isfinite(polar[i, q]) for i, q in redo]  # before polar may change
    with np.errstate(invalid="ignore"):  # inf * 0 in a row without a mean: reset below
        out = np.multiply(polar, scale[..., None], out=out, dtype=np.float32)
    for (i, q), f in zip(redo, fill, strict=True):
        out[i, q][f] = np.nan
    if dirty or len(redo):
        out.reshape(k, nq * nphi)[:, masked] = 0
    return out, mean


class PolarTransform:
    """Geometry, grid and operator for one q band: the polar step, precomputed once.

    Parameters
    ----------
    geometry : Geometry
        Beam centre and distances.
    image_shape : (ny, nx)
        Detector image shape in pixels.
    qmin, qmax : float
        Band limits in inverse Angstrom.
    nphi, nq : int, optional
        Grid size; defaults one pixel of arc at the outer radius, one bin
        per pixel of radius.
    mask : ndarray, optional
        User pixel mask (1 = good).
    method : {"nearest", "bilinear", "splitting"}
        Interpolation (see the module docstring).
    fast_nphi : bool
        Round the default nphi up to an FFT-friendly length (default True;
        an ``nphi`` given is used as it is).
    solid_angle : bool
        Correct for the pixels' relative solid angle (pyFAI's convention).
    polarization : float, optional
        Correct for polarisation with this factor in ``[-1, 1]`` (pyFAI's
        ``polarization_factor``; 0.99 or so at an XFEL, horizontal = +x).
    subdivision : int
        Samples per pixel length of ``splitting``.
    min_coverage : float
        Least fraction of a bin's weight on good pixels for it to be good.
    """

    def __init__(
        self,
        geometry: Geometry,
        image_shape: tuple[int, int],
        qmin: float,
        qmax: float,
        *,
        nphi: int | None = None,
        nq: int | None = None,
        mask: np.ndarray | None = None,
        method: Method = "nearest",
        fast_nphi: bool = True,
        solid_angle: bool = False,
        polarization: float | None = None,
        subdivision: int = 4,
        min_coverage: float = 0.5,
    ) -> None:
        self.geometry = geometry
        self.image_shape = tuple(int(s) for s in image_shape)
        self.qmin = float(qmin)
        self.qmax = float(qmax)
        self.method = method
        self.fast_nphi = bool(fast_nphi)
        self.solid_angle = bool(solid_angle)
        self.polarization = None if polarization is None else float(polarization)
        self.grid = make_grid(geometry, qmin, qmax, nphi=nphi, nq=nq, fast_nphi=fast_nphi)
        self.operator = build_operator(geometry, self.grid, self.image_shape, mask, method,
                                       min_coverage, solid_angle=solid_angle,
                                       polarization=polarization, subdivision=subdivision)
        empty = ~self.operator.polar_mask.any(axis=1)
        if empty.any():
            r = self.grid.radius[empty]
            warnings.warn(
                f"{int(empty.sum())} of {empty.size} q rows of the band (radius "
                f"{r.min():.1f}..{r.max():.1f} px) have no good pixel: off the "
                f"{self.image_shape[0]}x{self.image_shape[1]} detector or masked; they stay "
                "0 in the polar images and the correlation", stacklevel=2)

    # convenient views
    @property
    def q(self) -> np.ndarray:
        return self.grid.q

    @property
    def radius(self) -> np.ndarray:
        return self.grid.radius

    @property
    def phi(self) -> np.ndarray:
        return self.grid.phi

    @property
    def shape(self) -> tuple[int, int]:
        return self.grid.shape

    @property
    def nphi(self) -> int:
        return self.grid.phi.size

    @property
    def window(self) -> tuple[slice, slice]:
        return self.operator.window

    @property
    def polar_mask(self) -> np.ndarray:
        return self.operator.polar_mask

    @property
    def coverage(self) -> np.ndarray:
        return self.operator.coverage

    def __call__(self, images: np.ndarray, window: bool = False) -> np.ndarray:
        """Polar intensities (not normalised) of full images, or of windows."""
        imgs = np.asarray(images)
        single = imgs.ndim == 2
        if single:
            imgs = imgs[None]
        if not window:
            imgs = imgs[(slice(None),) + self.window]
        out, _ = apply_polar(imgs, self.operator)
        return out[0] if single else out

    def __repr__(self) -> str:
        r = self.radius
        corr = "" if self.operator.corrections == "none" else f" {self.operator.corrections}"
        return (
            f"<PolarTransform {self.method}{corr} q={self.qmin:g}..{self.qmax:g} 1/A "
            f"(r={r[0]:.1f}..{r[-1]:.1f} px) grid {self.shape[0]}x{self.shape[1]} "
            f"window {self.operator.window_shape} operator {self.operator.nbytes / 2**20:.1f} MiB>"
        )
