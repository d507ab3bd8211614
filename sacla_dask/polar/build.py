"""Building a polar operator from the geometry, the grid and the pixel mask.

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
of a good bin are renormalised over its good pixels (and divided by the
corrections asked for: :mod:`.corrections`).

The weights are made as a CSR matrix over the band's bounding-box window,
in blocks of q rows on a few threads (the settings ``polar.build-chunk-bins``
and ``polar.build-threads`` of :mod:`sacla_dask.config`); the operator then holds them in the
engine that suits them (:func:`.operator.select_engine`). Operators alive
in the process are reused for the same inputs.
"""

from __future__ import annotations

import concurrent.futures
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from .. import config
from ..errors import GeometryError, ParameterError
from ..geometry import Geometry
from ..lab import DetectorLayout, layout_of_geometry
from .corrections import correction_factors, corrections_label
from .grid import PolarGrid, check_mask
from .operator import PolarOperator, select_engine
from .panels import layout_corrections, layout_point_entries, layout_splitting_entries

__all__ = ["METHODS", "TILE", "Method", "build_operator"]

Method = Literal["nearest", "bilinear", "splitting"]
METHODS: tuple[str, ...] = ("nearest", "bilinear", "splitting")

#: Tile (rows, columns) of the cache-friendly pixel order used when the
#: operator reads its window densely (see :func:`build_operator`).
TILE: tuple[int, int] = (8, 16)

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
    kdtype: type[np.signedinteger[Any]] = np.int32 if (ny + 4) * wpad << kbits < 2**31 else np.int64
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
    import dask.base  # (the polar kernels need no Dask)

    return dask.base.tokenize(*args)


def _operator_token(geometry: Geometry, grid: PolarGrid, image_shape: tuple[int, int],
                    good: np.ndarray, *args: Any) -> str:
    return _tokenize(geometry.key(), grid.radius, grid.phi.size,
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
    layout: DetectorLayout | None = None,
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
        Interpolation (see :mod:`sacla_dask.polar.build`).
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
    layout : DetectorLayout, optional
        Separate panels stacked in the image (:mod:`sacla_dask.lab`); the
        geometry then gives only the grid's distance, pixel size and
        wavelength. Without it a tilted geometry is one tilted panel
        (:mod:`.panels` builds both); an untilted one is built as before.

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
    extra: tuple[Any, ...] = ()
    if layout is None:
        geometry.check_on_detector((ny, nx))
        if geometry.tilted:
            layout = layout_of_geometry(geometry, (ny, nx))
    else:
        if tuple(layout.shape) != (ny, nx):
            raise GeometryError(f"the panel layout is {layout.shape[0]}x{layout.shape[1]} but "
                                f"the images are {ny}x{nx}")
        extra = (layout.key(),)
    good = check_mask(mask, (ny, nx))
    key = _operator_token(geometry, grid, (ny, nx), good, method, float(min_coverage),
                          bool(solid_angle), polarization, int(subdivision), tile, *extra)
    built = _OPERATORS.get(key)
    if built is not None:
        return built
    op = _build_operator(geometry, grid, (ny, nx), good, method, float(min_coverage),
                         bool(solid_angle), polarization, int(subdivision), tile, key,
                         layout)
    _OPERATORS[key] = op
    return op


def _build_operator(geometry: Geometry, grid: PolarGrid, image_shape: tuple[int, int],
                    good: np.ndarray, method: Method, min_coverage: float, solid_angle: bool,
                    polarization: float | None, subdivision: int, tile: bool | None,
                    key: str, layout: DetectorLayout | None = None) -> PolarOperator:
    """:func:`build_operator` for checked inputs, named ``key`` (their token)."""
    ny, nx = image_shape
    good_flat = good.ravel()
    nq, nphi = grid.shape
    nbins = nq * nphi
    corr = polarization is not None or solid_angle
    rows_per = max(1, int(config.get("polar.build-chunk-bins")) // nphi)

    def block(i0: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                tuple[int, int, int, int] | None]:
        rows = slice(i0, min(nq, i0 + rows_per))
        nb = (rows.stop - rows.start) * nphi
        if layout is not None and method == "splitting":
            b, iy, ix, w, total = layout_splitting_entries(layout, grid, geometry, rows,
                                                           int(subdivision))
        elif layout is not None:
            iy, ix, w, k = layout_point_entries(layout, grid, geometry, rows, method)
            iy, ix, w = iy.ravel(), ix.ravel(), w.ravel()
            b = np.repeat(np.arange(nb), k)
            total = None
        elif method == "splitting":
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
            c = (correction_factors(geometry, iy, ix, solid_angle, polarization)
                 if layout is None else
                 layout_corrections(layout, geometry, iy, ix, solid_angle, polarization))
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
    idx_dtype: type[np.signedinteger[Any]] = np.int32 if max(nnz, wy * wx) < 2**31 - 1 else np.int64
    # the CSR arrays made once and filled block by block (no concatenated copies, whose
    # fresh memory would be faulted in once more)
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
        # (the counts cast first: a cumsum cast into a narrower out array is much slower)
        ptr = indptr[int(first_bin[k]) + 1:int(first_bin[k + 1]) + 1]
        np.cumsum(counts.astype(idx_dtype), out=ptr)
        ptr += a

    _map_threads(place, range(len(parts)))
    parts.clear()  # the blocks' arrays, now copied into the CSR ones
    matrix = sp.csr_matrix((data, indices, indptr), shape=(nbins, wy * wx))
    return PolarOperator(
        select_engine(matrix, method),
        window=(slice(r0, r1), slice(c0, c1)),
        shape=grid.shape,
        polar_mask=polar_mask.reshape(grid.shape),
        coverage=coverage.reshape(grid.shape).astype(np.float32),
        method=method,
        tile=tshape,
        corrections=corrections_label(solid_angle, polarization),
        token=_tokenize(key, tshape),
    )


def _map_threads(fn: Callable[[int], Any], items: Sequence[int]) -> list[Any]:
    """``[fn(i) for i in items]``, on the setting ``polar.build-threads`` threads when
    there are several."""
    threads = int(config.get("polar.build-threads"))
    if len(items) < 2 or threads < 2:
        return [fn(i) for i in items]
    with concurrent.futures.ThreadPoolExecutor(min(threads, len(items))) as ex:
        return list(ex.map(fn, items))
