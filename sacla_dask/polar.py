"""Polar transform: detector image -> (q, phi) grid inside a q band.

This module owns the precomputed resampling operator that maps a detector
image (or the bounding-box window of it that the band touches) onto a polar
grid, the polar mask derived from the user's pixel mask, and the per-row
masked-mean normalisation. The numerical kernels (:func:`apply_polar`,
:func:`normalize_rows`) act on one numpy block of images; the Dask wrapper
:func:`polar_images` lifts them with ``map_blocks``.

Grid conventions
----------------
* radius bins are evenly spaced in pixels between the band's inner and
  outer radius; ``q`` is given at the bin centres, in inverse Angstrom.
* ``phi_j = 2 pi j / nphi`` (radians), ``phi = atan2(y - cy, x - cx)``,
  from +x (fast axis) toward +y (slow axis).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np
import scipy.sparse as sp

from .errors import GeometryError, MaskError, ParameterError
from .geometry import Geometry, default_nphi

Method = Literal["nearest", "bilinear"]
METHODS: tuple[str, ...] = ("nearest", "bilinear")


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
    vals = np.unique(m)
    if not np.all(np.isin(vals, (0, 1))):
        shown = vals[~np.isin(vals, (0, 1))][:5]
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
    """

    radius: np.ndarray
    q: np.ndarray
    phi: np.ndarray
    nphi_default: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.radius.size, self.phi.size)


def make_grid(
    geometry: Geometry,
    qmin: float,
    qmax: float,
    nphi: int | None = None,
    nq: int | None = None,
    fast_nphi: bool = False,
) -> PolarGrid:
    """Build the polar grid for the band ``qmin <= q < qmax`` (inverse Angstrom).

    ``nq`` defaults to one bin per pixel of radius; ``nphi`` to one pixel of
    arc at the band's outer radius (in pixels), optionally rounded up to an
    FFT-friendly length.
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
    n_default = default_nphi(r_out)
    if nphi is None:
        nphi = default_nphi(r_out, fast=fast_nphi)
    elif fast_nphi:
        import scipy.fft

        nphi = int(scipy.fft.next_fast_len(int(nphi), real=True))
    if int(nphi) < 2:
        raise ParameterError(f"nphi must be >= 2 (got {nphi})")
    nphi = int(nphi)
    dr = (r_out - r_in) / nq
    radius = r_in + (np.arange(nq) + 0.5) * dr
    q = np.asarray(geometry.radius_to_q(radius), dtype=float)
    phi = 2 * np.pi * np.arange(nphi) / nphi
    return PolarGrid(radius=radius, q=q, phi=phi, nphi_default=n_default)


@dataclasses.dataclass
class PolarOperator:
    """Sparse resampling operator from an image window to the polar grid.

    Attributes
    ----------
    matrix : scipy.sparse.csr_matrix, shape (nq * nphi, window pixels)
        Row-normalised weights over good pixels only (masked pixels carry
        zero weight).
    window : tuple of slice
        ``(rows, cols)`` bounding box of the image the operator reads.
    shape : tuple
        ``(nq, nphi)``.
    polar_mask : ndarray of bool (nq, nphi)
        True where the bin has enough good-pixel coverage.
    coverage : ndarray of float (nq, nphi)
        Fraction of the interpolation weight that falls on good pixels.
    """

    matrix: sp.csr_matrix
    window: tuple[slice, slice]
    shape: tuple[int, int]
    polar_mask: np.ndarray
    coverage: np.ndarray
    method: str

    @property
    def window_shape(self) -> tuple[int, int]:
        return (self.window[0].stop - self.window[0].start, self.window[1].stop - self.window[1].start)

    @property
    def nbytes(self) -> int:
        """Memory of the operator in bytes (what each worker holds once)."""
        m = self.matrix
        return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes + self.polar_mask.nbytes
                   + self.coverage.nbytes)


def _sample_points(grid: PolarGrid, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    rr, pp = np.meshgrid(grid.radius, grid.phi, indexing="ij")
    x = geometry.center_x + rr * np.cos(pp)
    y = geometry.center_y + rr * np.sin(pp)
    return x.ravel(), y.ravel()


def build_operator(
    geometry: Geometry,
    grid: PolarGrid,
    image_shape: tuple[int, int],
    mask: np.ndarray | None = None,
    method: Method = "nearest",
    min_coverage: float = 0.5,
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
    method : {"nearest", "bilinear"}
        Interpolation.
    min_coverage : float
        A bin is good in the polar mask when at least this fraction of its
        interpolation weight lands on good pixels inside the image.
    """
    if method not in METHODS:
        raise ParameterError(f"method must be one of {METHODS} (got {method!r})")
    ny, nx = image_shape
    geometry.check_on_detector(image_shape)
    good = check_mask(mask, image_shape)
    x, y = _sample_points(grid, geometry)
    nbins = x.size
    if method == "nearest":
        ix = np.rint(x).astype(np.int64)
        iy = np.rint(y).astype(np.int64)
        cols = [(iy, ix)]
        weights = [np.ones(nbins)]
    else:
        x0 = np.floor(x).astype(np.int64)
        y0 = np.floor(y).astype(np.int64)
        fx = x - x0
        fy = y - y0
        cols = [(y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)]
        weights = [(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy]
    rows_l, iy_l, ix_l, w_l = [], [], [], []
    total = np.zeros(nbins)
    for (iy, ix), w in zip(cols, weights):
        total += w
        inside = (iy >= 0) & (iy < ny) & (ix >= 0) & (ix < nx)
        ok = inside.copy()
        ok[inside] = good[iy[inside], ix[inside]]
        ok &= w > 0
        idx = np.nonzero(ok)[0]
        rows_l.append(idx)
        iy_l.append(iy[idx])
        ix_l.append(ix[idx])
        w_l.append(w[idx])
    rows = np.concatenate(rows_l)
    iy = np.concatenate(iy_l)
    ix = np.concatenate(ix_l)
    w = np.concatenate(w_l)
    if rows.size == 0:
        raise GeometryError(
            f"the q band (radius {grid.radius[0]:.1f}..{grid.radius[-1]:.1f} px about "
            f"({geometry.center_x:g}, {geometry.center_y:g})) has no good pixel on the "
            f"{ny}x{nx} detector: it lies outside the image or entirely in the mask"
        )
    good_w = np.bincount(rows, weights=w, minlength=nbins)
    coverage = good_w / total
    polar_mask = coverage >= min_coverage - 1e-12
    # Drop the bins that are masked: they are 0 in the output.
    keep = polar_mask[rows]
    rows, iy, ix, w = rows[keep], iy[keep], ix[keep], w[keep]
    w = w / good_w[rows]
    r0, r1 = int(iy.min()), int(iy.max()) + 1
    c0, c1 = int(ix.min()), int(ix.max()) + 1
    wcols = (iy - r0) * (c1 - c0) + (ix - c0)
    matrix = sp.csr_matrix(
        (w.astype(np.float32), (rows, wcols)), shape=(nbins, (r1 - r0) * (c1 - c0))
    )
    matrix.sum_duplicates()
    matrix.sort_indices()
    return PolarOperator(
        matrix=matrix,
        window=(slice(r0, r1), slice(c0, c1)),
        shape=grid.shape,
        polar_mask=polar_mask.reshape(grid.shape),
        coverage=coverage.reshape(grid.shape).astype(np.float32),
        method=method,
    )


# -- kernels ---------------------------------------------------------------
def apply_polar(windows: np.ndarray, op: PolarOperator) -> tuple[np.ndarray, np.ndarray]:
    """Resample a block of image windows onto the polar grid.

    Parameters
    ----------
    windows : ndarray (ntag, wy, wx)
        Image windows (``image[op.window]``), any real dtype.
    op : PolarOperator
        Operator from :func:`build_operator`.

    Returns
    -------
    polar : ndarray float32 (ntag, nq, nphi)
        Polar intensities; 0 in masked bins, NaN in bins touched by a
        non-finite pixel of that image.
    nonfinite : ndarray int64 (ntag,)
        Number of non-finite pixels in each image window.
    """
    k = windows.shape[0]
    if windows.shape[1:] != op.window_shape:
        raise ParameterError(
            f"image window shape {windows.shape[1:]} does not match the operator's "
            f"{op.window_shape}"
        )
    nq, nphi = op.shape
    out = np.empty((k, nq * nphi), dtype=np.float32)
    nonfinite = np.zeros(k, dtype=np.int64)
    m = op.matrix
    for i in range(k):
        img = np.asarray(windows[i], dtype=np.float32).reshape(-1)
        bad = ~np.isfinite(img)
        nb = int(np.count_nonzero(bad))
        if nb:
            img = np.where(bad, np.float32(0), img)
            touched = (m @ bad.astype(np.float32)) > 0
            out[i] = m @ img
            out[i][touched] = np.nan
        else:
            out[i] = m @ img
        nonfinite[i] = nb
    return out.reshape(k, nq, nphi), nonfinite


def normalize_rows(polar: np.ndarray, polar_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Divide each polar row by its masked mean.

    Parameters
    ----------
    polar : ndarray (ntag, nq, nphi)
        Polar intensities; NaN marks bins hit by non-finite pixels.
    polar_mask : ndarray bool (nq, nphi)
        True = good bin.

    Returns
    -------
    normalised : ndarray float32 (ntag, nq, nphi)
        ``polar / row_mean``: 0 in masked bins; NaN bins are filled with 1
        (the row mean) so that they carry no signal.
    row_mean : ndarray float64 (ntag, nq)
        The masked mean of each row (intensity units); NaN for a row with no
        good bin.
    """
    m = polar_mask[None, :, :] & np.isfinite(polar)
    vals = np.where(m, polar, 0).astype(np.float64)
    count = m.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = vals.sum(axis=-1) / count
        scale = np.where(np.isfinite(mean) & (mean != 0), 1.0 / mean, 0.0)
    out = (vals * scale[..., None]).astype(np.float32)
    out[~np.isfinite(polar) & polar_mask[None]] = 1.0
    out[:, ~polar_mask] = 0
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
    method : {"nearest", "bilinear"}
        Interpolation.
    fast_nphi : bool
        Round nphi up to an FFT-friendly length.
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
        fast_nphi: bool = False,
    ) -> None:
        self.geometry = geometry
        self.image_shape = tuple(int(s) for s in image_shape)
        self.qmin = float(qmin)
        self.qmax = float(qmax)
        self.method = method
        self.fast_nphi = bool(fast_nphi)
        self.grid = make_grid(geometry, qmin, qmax, nphi=nphi, nq=nq, fast_nphi=fast_nphi)
        self.operator = build_operator(geometry, self.grid, self.image_shape, mask, method)

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
        return (
            f"<PolarTransform {self.method} q={self.qmin:g}..{self.qmax:g} 1/A "
            f"(r={r[0]:.1f}..{r[-1]:.1f} px) grid {self.shape[0]}x{self.shape[1]} "
            f"window {self.operator.window_shape} operator {self.operator.nbytes / 2**20:.1f} MiB>"
        )
