"""Both centre methods from the same start, and how far apart they land.

:func:`find_center` runs the circle fit (:func:`~sacla_dask.center.fit_center`)
and the sharpness refinement
(:func:`~sacla_dask.center.refine_center_by_sharpness`) from one starting
guess and reports their disagreement in pixels: two independent methods
agreeing is the check of the centre.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ..errors import GeometryError, NoRingFoundError
from ._common import Guess, _check_image, _check_positive, log
from .circle import CenterFit, fit_center
from .profile import initial_guess
from .sharpness import SharpnessFit, refine_center_by_sharpness

__all__ = ["CenterComparison", "find_center"]


@dataclasses.dataclass(eq=False, repr=False)
class CenterComparison:
    """Both centre methods side by side (:func:`find_center`).

    Attributes
    ----------
    circle : CenterFit
        Robust circle fit to the ring peak points (the adopted result).
    sharpness : SharpnessFit or None
        Profile-sharpness refinement from the same starting guess; None if
        it failed (see ``sharpness_error``).
    disagreement_px : float
        Distance between the two centres, in pixels (NaN if the sharpness
        refinement failed).
    dx, dy : float
        ``sharpness - circle`` centre difference along x and y, in pixels.
    tolerance_px : float
        Disagreement above which :attr:`agree` is False.
    sharpness_error : str or None
        Why the sharpness refinement failed, if it did.
    """

    circle: CenterFit
    sharpness: SharpnessFit | None
    disagreement_px: float
    dx: float
    dy: float
    tolerance_px: float
    sharpness_error: str | None = None

    @property
    def agree(self) -> bool:
        """True when both methods ran and their centres are within ``tolerance_px``."""
        return bool(self.sharpness is not None and self.disagreement_px <= self.tolerance_px)

    @property
    def center(self) -> tuple[float, float]:
        """The adopted centre (the circle fit's), in pixels."""
        return self.circle.center

    def to_geometry_dict(self) -> dict[str, float]:
        """The circle fit's ``{"center_x", "center_y", "radius"}`` in pixels."""
        return self.circle.to_geometry_dict()

    def __repr__(self) -> str:
        if self.sharpness is None:
            return (
                f"CenterComparison(circle=({self.circle.center_x:.3f}, "
                f"{self.circle.center_y:.3f}) r={self.circle.radius:.3f} px, "
                f"sharpness FAILED: {self.sharpness_error})"
            )
        verdict = "agree" if self.agree else "DISAGREE"
        return (
            f"CenterComparison(circle=({self.circle.center_x:.3f}, {self.circle.center_y:.3f}) "
            f"r={self.circle.radius:.3f} px, sharpness=({self.sharpness.center_x:.3f}, "
            f"{self.sharpness.center_y:.3f}) r={self.sharpness.radius:.3f} px, "
            f"disagreement={self.disagreement_px:.3f} px (dx={self.dx:+.3f}, dy={self.dy:+.3f}) "
            f"{verdict} at tolerance {self.tolerance_px:g} px)"
        )


def find_center(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    guess: Guess = None,
    *,
    tolerance: float = 1.0,
    circle_options: dict[str, Any] | None = None,
    sharpness_options: dict[str, Any] | None = None,
) -> CenterComparison:
    """Run :func:`fit_center` and :func:`refine_center_by_sharpness` and compare.

    Both start from the same guess (:func:`~sacla_dask.center.initial_guess` when none is
    given), so their agreement is a check of the centre, not of a shared
    first step.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Detector image.
    mask : ndarray of bool, optional
        True/1 = good pixel.
    guess : (x, y) or (x, y, r), optional
        Starting centre and ring radius in pixels.
    tolerance : float
        Disagreement in pixels above which the result says the methods
        disagree (and a warning is logged).
    circle_options, sharpness_options : dict, optional
        Keyword options passed to the two methods.

    Returns
    -------
    CenterComparison
        Both results, their distance ``disagreement_px`` and ``dx``, ``dy``
        (sharpness minus circle) in pixels. If the sharpness refinement
        fails (e.g. the guess is farther off than its search square), the
        circle fit is still returned, with ``sharpness=None``, NaN
        disagreement, ``agree`` False and the reason in ``sharpness_error``.

    Raises
    ------
    GeometryError, NoRingFoundError, ParameterError
        As :func:`fit_center`.
    """
    tol = _check_positive("tolerance", tolerance)
    img = _check_image(image)
    if guess is None:
        guess = initial_guess(img, mask)
    circle = fit_center(img, mask, guess, **(circle_options or {}))
    try:
        sharp = refine_center_by_sharpness(
            img, mask, guess, **(sharpness_options or {}))
    except (GeometryError, NoRingFoundError) as exc:
        log.warning("sharpness refinement failed, the circle fit is unchecked: %s", exc)
        return CenterComparison(circle=circle, sharpness=None, disagreement_px=math.nan,
                                dx=math.nan, dy=math.nan, tolerance_px=tol,
                                sharpness_error=str(exc))
    dx = sharp.center_x - circle.center_x
    dy = sharp.center_y - circle.center_y
    out = CenterComparison(circle=circle, sharpness=sharp,
                           disagreement_px=float(math.hypot(dx, dy)), dx=float(dx), dy=float(dy),
                           tolerance_px=tol)
    if not out.agree:
        log.warning(
            "centre methods disagree by %.2f px (circle fit (%.2f, %.2f), sharpness (%.2f, %.2f));"
            " check the mask and the ring", out.disagreement_px, circle.center_x,
            circle.center_y, sharp.center_x, sharp.center_y,
        )
    return out
