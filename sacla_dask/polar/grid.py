"""The (q, phi) grid of a band, and the check of a user's pixel mask.

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
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..errors import MaskError, ParameterError
from ..geometry import Geometry, default_nphi

__all__ = ["PolarGrid", "check_mask", "make_grid"]


def check_mask(mask: np.ndarray | None, shape: tuple[int, int], name: str = "mask") -> np.ndarray:
    """Validate a user pixel mask (1/True = good) against an image shape.

    Parameters
    ----------
    mask : ndarray, optional
        Boolean, or numbers that are all 0 (masked) or 1 (good); None means
        every pixel is good.
    shape : (ny, nx)
        The detector image shape in pixels.
    name : str
        What the mask is called in the error messages.

    Returns
    -------
    ndarray of bool, C-contiguous, ``shape``

    Raises
    ------
    MaskError
        Naming the shapes, or the offending values.
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
    bad = (m != 0) & (m != 1)  # (NaN included); two comparisons, not a sort of the mask
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
        """``(nq, nphi)``."""
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
