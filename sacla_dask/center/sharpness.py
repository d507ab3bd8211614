"""Beam centre that makes the powder ring sharpest in the radial profile.

An independent check of the circle fit (:mod:`sacla_dask.center.circle`):
no peak points, no circle. A wrong centre smears the ring in the azimuthal
average over ``r +/- offset`` and lowers it, so the centre that makes the
ring highest above its local baseline is the beam centre. It is found by a
grid search, then Nelder-Mead.

All lengths are in pixels, ``x`` the fast (column) axis, ``y`` the slow
(row) axis; masks are True/1 = good.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np
import scipy.optimize as opt

from ..errors import GeometryError, NoRingFoundError
from ._common import Guess, _check_image, _check_positive, _good_pixels, _RingCentre
from .profile import _bin_accumulate, _locate_ring, _nan_smooth, _pixels_near, _start

__all__ = ["SharpnessFit", "refine_center_by_sharpness"]


@dataclasses.dataclass(eq=False, repr=False)
class SharpnessFit(_RingCentre):
    """Result of :func:`refine_center_by_sharpness`.

    Attributes
    ----------
    center_x, center_y : float
        Centre in pixels that makes the ring sharpest.
    radius : float
        Ring peak radius in the profile about that centre, in pixels.
    fwhm : float
        Ring full width at half maximum in that profile, in pixels.
    sharpness : float
        Objective at the optimum: ring height above the linear baseline of
        the smoothed profile, in image units.
    sharpness_at_guess : float
        Same objective at the starting centre (final window and smoothing).
    profile_radius, profile_mean : ndarray
        Sub-pixel masked radial profile about the optimum (pixels, image
        units).
    guess : tuple of float
        The starting ``(x, y, r)`` in pixels.
    n_evaluations : int
        Objective evaluations made (grid plus local optimisation).

    Notes
    -----
    No formal uncertainty is given: the objective is not a likelihood. Use
    the distance to the circle fit (:func:`~sacla_dask.center.find_center`) as the check.
    """

    center_x: float
    center_y: float
    radius: float
    fwhm: float
    sharpness: float
    sharpness_at_guess: float
    profile_radius: np.ndarray
    profile_mean: np.ndarray
    guess: tuple[float, float, float]
    n_evaluations: int
    method: str = "sharpness"

    def __repr__(self) -> str:
        return (
            f"SharpnessFit(center=({self.center_x:.3f}, {self.center_y:.3f}) px, "
            f"radius={self.radius:.3f} px, fwhm={self.fwhm:.3f} px, "
            f"sharpness {self.sharpness_at_guess:.4g} -> {self.sharpness:.4g}, "
            f"{self.n_evaluations} evaluations)"
        )


def _peak_of(r: np.ndarray, prof: np.ndarray) -> tuple[float, float, float]:
    """(peak radius, height above linear baseline, FWHM) of a windowed profile."""
    ok = np.isfinite(prof)
    if ok.sum() < 5:
        return math.nan, -math.inf, math.inf
    y = np.interp(r, r[ok], prof[ok])
    n = y.size
    m = max(2, n // 10)
    x1, y1 = float(r[:m].mean()), float(np.median(y[:m]))
    x2, y2 = float(r[-m:].mean()), float(np.median(y[-m:]))
    base = y1 + (y2 - y1) * (r - x1) / (x2 - x1)
    h = y - base
    k = int(np.argmax(h))
    if k < m or k > n - 1 - m:
        # the maximum sits in a baseline region: no ring peak inside the window
        return float(r[k]), -math.inf, math.inf
    hk, rk = float(h[k]), float(r[k])
    den = h[k - 1] - 2 * h[k] + h[k + 1]
    if den < 0:
        off = 0.5 * (h[k - 1] - h[k + 1]) / den
        rk += off * float(r[1] - r[0])
        hk -= 0.25 * (h[k - 1] - h[k + 1]) * off
    half = hk / 2
    if hk <= 0:
        return rk, hk, math.inf
    # half-maximum crossings by linear interpolation
    i = k
    while i > 0 and h[i] > half:
        i -= 1
    j = k
    while j < n - 1 and h[j] > half:
        j += 1
    if h[i] > half or h[j] > half:
        return rk, hk, math.inf
    rl = r[i] + (half - h[i]) * (r[i + 1] - r[i]) / (h[i + 1] - h[i])
    rr = r[j - 1] + (half - h[j - 1]) * (r[j] - r[j - 1]) / (h[j] - h[j - 1])
    return rk, hk, float(rr - rl)


# -- the objective ------------------------------------------------------------------------
class _Window(NamedTuple):
    """Radial window of the sharpness profile."""

    r_lo: float  # inner edge, pixels
    nbins: int
    radius: np.ndarray  # bin centres, pixels
    sigma_bins: float  # Gaussian smoothing, in bins


class _Sharpness:
    """Ring height above its baseline in the profile about a candidate centre.

    Holds the good pixels any candidate window can reach, so that each
    evaluation only bins those. Called as ``objective(centre, window)`` it
    returns minus the height (1e300 when there is no peak in the window),
    for minimisation, and counts its evaluations.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, v: np.ndarray, bin_width: float,
                 half_width: float | None, reach: float, smooth_px: float | None) -> None:
        self.x, self.y, self.v = x, y, v
        self.bin_width = bin_width
        self.half_width = half_width
        self.reach = reach
        self.smooth_px = smooth_px
        self.n_evaluations = 0

    def window(self, r_mid: float, fwhm: float) -> _Window:
        """The window about radius ``r_mid`` for a ring of ``fwhm`` (pixels)."""
        bw = self.bin_width
        hw = self.half_width if self.half_width is not None else min(max(6.0, fwhm), self.reach)
        r_lo = max(0.5, r_mid - hw)
        nb = max(8, int(math.ceil((r_mid + hw - r_lo) / bw)))
        rc = r_lo + (np.arange(nb) + 0.5) * bw
        sm = (self.smooth_px if self.smooth_px is not None
              else float(np.clip(fwhm / 5.0, 0.5, 4.0)))
        return _Window(r_lo, nb, rc, sm / bw)

    def profile(self, c: np.ndarray, win: _Window, smooth: bool = True) -> np.ndarray:
        """Split-binned masked radial profile about centre ``c`` (smoothed unless told)."""
        bw = self.bin_width
        acc = _bin_accumulate(np.hypot(self.x - c[0], self.y - c[1]), self.v, win.r_lo, bw,
                              win.nbins, True)
        with np.errstate(invalid="ignore", divide="ignore"):
            prof = np.where(acc["w"] > 0.25 * bw, acc["wi"] / acc["w"], np.nan)
        return _nan_smooth(prof, win.sigma_bins) if smooth else prof

    def __call__(self, c: np.ndarray, win: _Window) -> float:
        self.n_evaluations += 1
        height = _peak_of(win.radius, self.profile(c, win))[1]
        return -height if np.isfinite(height) else 1e300


# -- the steps of the refinement ----------------------------------------------------------
def _grid_search(objective: _Sharpness, win: _Window, cx0: float, cy0: float, search: float,
                 grid_step: float) -> np.ndarray:
    """Best centre on the grid of ``grid_step`` over ``+/- search`` px about ``(cx0, cy0)``.

    Raises GeometryError when it is on the edge of the square: the true
    centre is then probably outside it.
    """
    offs = np.arange(-search, search + 0.5 * grid_step, grid_step)
    grid = [(objective(np.array([cx0 + ox, cy0 + oy]), win), ox, oy)
            for oy in offs for ox in offs]
    best = min(grid)
    if max(abs(best[1]), abs(best[2])) >= search - 1e-9:
        raise GeometryError(
            f"the sharpest ring on the grid is at the edge of the search square "
            f"(+/- search={search:g} px about the guess ({cx0:.2f}, {cy0:.2f})): the centre "
            f"is probably farther off; give a better guess or a larger search"
        )
    return np.array([cx0 + best[1], cy0 + best[2]])


def _nelder_mead(objective: _Sharpness, win: _Window, x_start: np.ndarray, grid_step: float,
                 xtol: float) -> np.ndarray:
    """Nelder-Mead from the best grid point; the grid point if it does not improve on it."""
    f_start = objective(x_start, win)
    simplex = np.array([x_start, x_start + [grid_step / 2, 0], x_start + [0, grid_step / 2]])
    sol = opt.minimize(objective, x_start, args=(win,), method="Nelder-Mead",
                       options={"xatol": xtol, "fatol": 1e-12, "initial_simplex": simplex,
                                "maxiter": 400})
    return sol.x if sol.fun <= f_start else x_start


def _check_in_search(c: np.ndarray, cx0: float, cy0: float, search: float,
                     shape: tuple[int, ...]) -> None:
    """Refuse an optimum outside the search square or off the image."""
    if max(abs(c[0] - cx0), abs(c[1] - cy0)) > search:
        raise GeometryError(
            f"the sharpest-ring centre ({c[0]:.2f}, {c[1]:.2f}) px lies outside the search "
            f"square of +/- search={search:g} px about the guess ({cx0:.2f}, {cy0:.2f}); "
            f"give a better guess or a larger search"
        )
    ny, nx = shape
    if not (-0.5 <= c[0] <= nx - 0.5 and -0.5 <= c[1] <= ny - 0.5):
        raise GeometryError(
            f"the sharpest-ring centre ({c[0]:.2f}, {c[1]:.2f}) px lies off the {ny}x{nx} image"
        )


# -- the refinement -----------------------------------------------------------------------
def refine_center_by_sharpness(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    guess: Guess = None,
    *,
    search: float = 8.0,
    grid_step: float = 1.0,
    half_width: float | None = None,
    bin_width: float = 0.5,
    smooth_px: float | None = None,
    ring_min_snr: float = 5.0,
    xtol: float = 0.005,
) -> SharpnessFit:
    """Beam centre that makes the ring sharpest in the masked radial profile.

    Independent of :func:`~sacla_dask.center.fit_center` (no peak points, no circle). For a
    candidate centre the masked radial profile is built with fractional
    (linear split) bins of ``bin_width`` over ``r +/- half_width``, lightly
    smoothed, and the objective is the ring's height above the straight
    baseline through the window ends (parabola-interpolated maximum). A
    wrong centre smears the ring over ``2 x offset`` and lowers it. The
    height is maximised on a grid of step ``grid_step`` over ``+/- search``
    pixels; the ring's radius and width are then re-measured about the best
    grid point to set the final window and smoothing, and Nelder-Mead
    refines the centre.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Detector image.
    mask : ndarray of bool, optional
        True/1 = good pixel; non-finite pixels are masked too.
    guess : (x, y) or (x, y, r), optional
        Starting centre and ring radius in pixels; defaults as in
        :func:`~sacla_dask.center.fit_center`.
    search : float
        Half-size of the square of candidate centres, in pixels.
    grid_step : float
        Coarse grid step in pixels.
    half_width : float, optional
        Half-width of the radial window in pixels; default the larger of
        6 px and the ring's FWHM (measured about the starting centre for the
        grid, about the best grid point for the refinement).
    bin_width : float
        Radial bin width in pixels.
    smooth_px : float, optional
        Gaussian smoothing of the profile, in pixels; default a fifth of the
        ring FWHM, clipped to 0.5 .. 4 px.
    ring_min_snr : float
        Minimum prominence of the ring in the 1-px profile, in units of its
        noise.
    xtol : float
        Nelder-Mead centre tolerance, in pixels.

    Returns
    -------
    SharpnessFit

    Raises
    ------
    GeometryError
        If ``guess`` lies off the detector, or the optimum leaves the search
        square (the guess is too far off).
    NoRingFoundError
        If no ring is found near the guess.
    """
    img = _check_image(image)
    good = _good_pixels(img, mask)
    search = _check_positive("search", search)
    grid_step = _check_positive("grid_step", grid_step)
    bw = _check_positive("bin_width", bin_width)
    if half_width is not None:
        half_width = _check_positive("half_width", half_width)
    if smooth_px is not None:
        smooth_px = _check_positive("smooth_px", smooth_px)
    cx0, cy0, r_guess, ring = _start(img, good, guess, ring_min_snr)
    r0 = ring.radius
    # pixels that any candidate window can reach
    reach = max(6.0, ring.fwhm) if half_width is None else half_width
    margin = reach + 2 * search + 2
    x, y, v = _pixels_near(img, good, cx0, cy0, r0 + margin)
    d0 = np.hypot(x - cx0, y - cy0)
    keep = (d0 >= r0 - margin) & (d0 <= r0 + margin)
    objective = _Sharpness(x[keep], y[keep], v[keep], bw, half_width, reach, smooth_px)

    win = objective.window(r0, ring.fwhm)
    x_start = _grid_search(objective, win, cx0, cy0, search, grid_step)
    # re-measure the ring about the best grid point: narrower window and smoothing
    try:
        ring2, _, _ = _locate_ring(img, good, x_start[0], x_start[1], r0, ring_min_snr, 3.0)
        if abs(ring2.radius - r0) <= search:
            win = objective.window(ring2.radius, ring2.fwhm)
    except NoRingFoundError:
        pass
    at_guess = -objective(np.array([cx0, cy0]), win)
    c = _nelder_mead(objective, win, x_start, grid_step, xtol)
    _check_in_search(c, cx0, cy0, search, img.shape)
    rk, height, width = _peak_of(win.radius, objective.profile(c, win))
    return SharpnessFit(
        center_x=float(c[0]), center_y=float(c[1]), radius=float(rk), fwhm=float(width),
        sharpness=float(height), sharpness_at_guess=float(at_guess), profile_radius=win.radius,
        profile_mean=objective.profile(c, win, smooth=False),
        guess=(float(cx0), float(cy0), float(r0 if r_guess is None else r_guess)),
        n_evaluations=objective.n_evaluations,
    )
