"""Solid-angle and polarisation corrections of pixel intensities (pyFAI's conventions).

With ``c_p`` the product of the solid angle ``cos^3(2 theta)`` (relative to
the beam centre) and the polarisation factor
``P = (1 + cos^2 2theta - f cos(2 phi) sin^2 2theta) / 2`` of pixel ``p``,
a corrected bin's value is ``sum_p w_p I_p / sum_p w_p c_p``, pyFAI's
signal / normalisation ratio (:func:`sacla_dask.polar.build_operator` folds
it into the operator's weights). Both are off by default, as in the
tutorial.
"""

from __future__ import annotations

import numpy as np

from ..geometry import Geometry

__all__ = ["correction_factors", "corrections_label"]


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


def corrections_label(solid_angle: bool, polarization: float | None) -> str:
    """The corrections' name as operators and stores record it.

    ``"none"``, ``"solid_angle"``, ``"polarization(f)"`` or both, comma-separated.
    """
    names = []
    if solid_angle:
        names.append("solid_angle")
    if polarization is not None:
        names.append(f"polarization({float(polarization):g})")
    return ",".join(names) or "none"
