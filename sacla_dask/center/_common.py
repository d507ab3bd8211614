"""What the centre methods share: input checks, the result base and the logger.

Conventions are those of :mod:`sacla_dask.geometry`: ``x`` is the fast
(column) axis, ``y`` the slow (row) axis, pixel centres at integer
coordinates, all lengths in pixels. Masks are True/1 = good pixel;
non-finite pixel values are always treated as masked.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import GeometryError, MaskError, ParameterError
from ..geometry import check_positive
from ..polar import check_mask

#: One logger for the whole package, so that log lines name ``sacla_dask.center``.
log = logging.getLogger("sacla_dask.center")

#: A starting ``(x, y)`` or ``(x, y, r)`` in pixels, or None for an automatic start.
Guess = Sequence[float] | None


class _RingCentre:
    """What every centre result offers: ``center`` and the geometry-file keys."""

    center_x: float
    center_y: float
    radius: float

    @property
    def center(self) -> tuple[float, float]:
        """``(center_x, center_y)`` in pixels."""
        return (self.center_x, self.center_y)

    def to_geometry_dict(self) -> dict[str, float]:
        """``{"center_x", "center_y", "radius"}`` in pixels, as plain floats."""
        return {
            "center_x": float(self.center_x),
            "center_y": float(self.center_y),
            "radius": float(self.radius),
        }


def _check_image(image: Any, name: str = "image") -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 2:
        raise ParameterError(f"{name} must be a 2-D detector image (got shape {img.shape})")
    if not np.issubdtype(img.dtype, np.number) or np.iscomplexobj(img):
        raise ParameterError(f"{name} must hold real numbers (got dtype {img.dtype})")
    if min(img.shape) < 3:
        raise ParameterError(f"{name} is too small to hold a ring (shape {img.shape})")
    return img.astype(np.float64, copy=False)


def _good_pixels(img: np.ndarray, mask: Any) -> np.ndarray:
    good = check_mask(mask, img.shape) & np.isfinite(img)
    if not good.any():
        raise MaskError("mask leaves no good (unmasked, finite) pixel in the image")
    return good


def _check_guess(guess: Guess, shape: tuple[int, int]) -> tuple[float, float, float | None]:
    """Validate a starting guess against the detector image.

    Parameters
    ----------
    guess : (x, y) or (x, y, r)
        Centre and, optionally, ring radius in pixels.
    shape : (ny, nx)
        Detector image shape in pixels.

    Returns
    -------
    (x, y, r) : tuple
        Pixels; ``r`` is None when not given.

    Raises
    ------
    ParameterError
        If ``guess`` is not 2 or 3 finite numbers.
    GeometryError
        If the centre lies off the image, or the radius is not positive or
        reaches beyond the farthest image corner.
    """
    try:
        vals = [float(v) for v in guess]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ParameterError(
            f"guess must be (x, y) or (x, y, r) in pixels (got {guess!r})"
        ) from None
    if len(vals) not in (2, 3) or not all(math.isfinite(v) for v in vals):
        raise ParameterError(
            f"guess must be 2 or 3 finite numbers (x, y[, r]) in pixels (got {guess!r})"
        )
    ny, nx = shape
    x, y = vals[0], vals[1]
    if not (-0.5 <= x <= nx - 0.5 and -0.5 <= y <= ny - 0.5):
        raise GeometryError(
            f"guess centre (x={x:g}, y={y:g}) px lies off the {ny}x{nx} detector image "
            f"(x must be in [-0.5, {nx - 0.5}], y in [-0.5, {ny - 0.5}])"
        )
    r = vals[2] if len(vals) == 3 else None
    if r is not None:
        r_far = math.hypot(max(x, nx - 1 - x), max(y, ny - 1 - y))
        if not 0 < r < r_far:
            raise GeometryError(
                f"guess radius r={r:g} px must be positive and smaller than the farthest "
                f"image corner from the guess centre ({r_far:.1f} px)"
            )
    return x, y, r


def _check_positive(name: str, value: float, unit: str = "px") -> float:
    return check_positive(name, value, unit)
