"""Beam-centre and ring-geometry finding on a (mean) detector image.

This module owns the ``sacla-dask center`` numerics:

* :func:`radial_profile` -- the masked mean intensity per radius bin about a
  centre, with optional fractional (linear split) binning so that it varies
  smoothly with the centre.
* :func:`initial_guess` -- a starting ``(x, y, r)`` from the masked,
  background-subtracted intensity-weighted centre and the strongest ring
  (largest prominence) of the radial profile about it.
* :func:`fit_center` -- the main method: the ring's sub-pixel radial *peak
  position* is measured in many angular sectors about the current centre
  (sectors that are masked, off the detector, in a panel gap or have no
  significant peak are skipped), and a circle is fitted to those ``(x, y)``
  points by robust least squares (a RANSAC start, ``soft_l1`` loss, then
  sigma-clipping and a final ordinary least-squares step whose Jacobian
  gives 1-sigma uncertainties). The sector measurement is repeated about the new centre
  until it stops moving. An ellipse (detector tilt) is fitted to the same
  points and reported beside the circle.
* :func:`refine_center_by_sharpness` -- an independent second method: the
  centre that makes the ring in the sub-pixel masked radial profile
  highest above its local baseline, by a grid search then Nelder-Mead.
* :func:`find_center` -- runs both from the same starting guess and reports
  their disagreement in pixels.
* :func:`mean_image` -- the mean of the (bright) shots of a run from a lazy
  ``(tag, y, x)`` Dask array, by tree reduction on the active scheduler.

Conventions are those of :mod:`sacla_dask.geometry`: ``x`` is the fast
(column) axis, ``y`` the slow (row) axis, pixel centres at integer
coordinates, all lengths in pixels, angles in radians measured from +x toward
+y. Masks are True/1 = good pixel; non-finite pixel values are always treated
as masked.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.ndimage as ndi
import scipy.optimize as opt
import scipy.signal as sig

from ..errors import GeometryError, MaskError, NoRingFoundError, ParameterError
from ..geometry import check_positive
from ..polar import check_mask

__all__ = [
    "CenterFit",
    "CenterComparison",
    "EllipseFit",
    "SharpnessFit",
    "find_center",
    "fit_center",
    "initial_guess",
    "mean_image",
    "radial_profile",
    "refine_center_by_sharpness",
]

log = logging.getLogger(__name__)

Guess = Sequence[float] | None


# -- result objects ----------------------------------------------------------
@dataclasses.dataclass(eq=False, repr=False)
class EllipseFit:
    """An ellipse fitted to ring peak points (first-order detector tilt).

    For a tilted detector a powder cone cuts the detector in an ellipse whose
    centre is *not* exactly the direct-beam position; the circle fit's centre
    is what the polar transform uses. The ellipse tells whether the tilt is
    large enough to matter (``semi_major - semi_minor`` in pixels).

    Attributes
    ----------
    center_x, center_y : float
        Ellipse centre in pixels.
    semi_major, semi_minor : float
        Semi-axes in pixels, ``semi_major >= semi_minor``.
    angle : float
        Direction of the major axis in radians, from +x toward +y, in
        ``[0, pi)``. Ill-defined (large ``sigma_angle``) for a near circle.
    sigma_center_x, sigma_center_y, sigma_semi_major, sigma_semi_minor, sigma_angle : float
        1-sigma uncertainties (pixels, radians) from the Jacobian of the final
        least-squares step, scaled by the residual variance.
    rms_px : float
        RMS radial residual of the points used, in pixels.
    n_used, n_rejected : int
        Peak points used and rejected as outliers.
    """

    center_x: float
    center_y: float
    semi_major: float
    semi_minor: float
    angle: float
    sigma_center_x: float
    sigma_center_y: float
    sigma_semi_major: float
    sigma_semi_minor: float
    sigma_angle: float
    rms_px: float
    n_used: int
    n_rejected: int

    @property
    def axis_ratio(self) -> float:
        """``semi_minor / semi_major`` (1 for a circle)."""
        return self.semi_minor / self.semi_major

    def __repr__(self) -> str:
        return (
            f"EllipseFit(center=({self.center_x:.3f}, {self.center_y:.3f}) px, "
            f"semi-axes={self.semi_major:.3f} +/- {self.sigma_semi_major:.3f}, "
            f"{self.semi_minor:.3f} +/- {self.sigma_semi_minor:.3f} px, "
            f"angle={math.degrees(self.angle):.1f} deg, rms={self.rms_px:.3f} px, "
            f"{self.n_used} points)"
        )


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


@dataclasses.dataclass(eq=False, repr=False)
class CenterFit(_RingCentre):
    """Result of :func:`fit_center`: a circle through the ring's peak points.

    Attributes
    ----------
    center_x, center_y : float
        Fitted beam centre in pixels (x = fast/column axis, y = slow/row axis).
    radius : float
        Fitted ring radius in pixels.
    sigma_x, sigma_y, sigma_radius : float
        1-sigma uncertainties in pixels, from the Jacobian of the final
        (ordinary) least-squares step on the inlier points, scaled by their
        residual variance.
    n_used, n_rejected : int
        Peak points used in the fit and rejected as outliers.
    n_skipped : int
        Angular sectors with no usable peak (masked, gap, off the detector,
        no significant peak).
    n_sectors : int
        Number of angular sectors sampled.
    rms_px : float
        RMS geometric residual of the used points, in pixels.
    points : ndarray (n_used, 2)
        ``(x, y)`` peak points used, in pixels.
    rejected_points : ndarray (n_rejected, 2)
        ``(x, y)`` peak points rejected as outliers, in pixels.
    residuals : ndarray (n_used,)
        Radial residual of each used point, in pixels.
    profile_radius, profile_mean : ndarray
        Masked radial profile about the fitted centre (bin centres in pixels,
        mean intensity in image units; NaN where no good pixel).
    ring_fwhm : float
        Full width at half maximum of the ring in that profile, in pixels.
    ellipse : EllipseFit or None
        Ellipse through the same points, or None if it could not be fitted.
    guess : tuple of float
        The starting ``(x, y, r)`` in pixels.
    n_iterations : int
        Sector-sampling passes made.
    method : str
        ``"circle"``.
    """

    center_x: float
    center_y: float
    radius: float
    sigma_x: float
    sigma_y: float
    sigma_radius: float
    n_used: int
    n_rejected: int
    n_skipped: int
    n_sectors: int
    rms_px: float
    points: np.ndarray
    rejected_points: np.ndarray
    residuals: np.ndarray
    profile_radius: np.ndarray
    profile_mean: np.ndarray
    ring_fwhm: float
    ellipse: EllipseFit | None
    guess: tuple[float, float, float]
    n_iterations: int
    method: str = "circle"

    def __repr__(self) -> str:
        text = (
            f"CenterFit(center=({self.center_x:.3f} +/- {self.sigma_x:.3f}, "
            f"{self.center_y:.3f} +/- {self.sigma_y:.3f}) px, "
            f"radius={self.radius:.3f} +/- {self.sigma_radius:.3f} px, "
            f"points used={self.n_used} rejected={self.n_rejected} "
            f"skipped sectors={self.n_skipped}/{self.n_sectors}, rms={self.rms_px:.3f} px"
        )
        if self.ellipse is not None:
            e = self.ellipse
            text += (
                f"; ellipse a={e.semi_major:.3f} b={e.semi_minor:.3f} px "
                f"angle={math.degrees(e.angle):.1f} deg"
            )
        return text + ")"


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
    the distance to the circle fit (:func:`find_center`) as the check.
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


# -- input checking ----------------------------------------------------------
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
    """Validate ``guess`` = ``(x, y)`` or ``(x, y, r)`` pixels against the image."""
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


# -- radial profiles -----------------------------------------------------------
def _bin_accumulate(
    r: np.ndarray,
    values: np.ndarray,
    r_min: float,
    bin_width: float,
    nbins: int,
    split: bool,
    group: np.ndarray | None = None,
    ngroups: int = 1,
    extra: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Weighted sums per (group, radius bin): W, W*I, W*I^2, W^2 (and W*extra)."""
    size = ngroups * nbins
    if split:
        t = (r - r_min) / bin_width - 0.5
        k0 = np.floor(t).astype(np.int64)
        f = t - k0
        parts = ((k0, 1.0 - f), (k0 + 1, f))
    else:
        parts = ((np.floor((r - r_min) / bin_width).astype(np.int64), np.ones_like(r)),)
    out = {k: np.zeros(size) for k in ("w", "wi", "wi2", "w2", "wx")}
    for k, w in parts:
        ok = (k >= 0) & (k < nbins)
        idx = k[ok] if group is None else group[ok] * nbins + k[ok]
        ww, vv = w[ok], values[ok]
        out["w"] += np.bincount(idx, ww, size)
        out["wi"] += np.bincount(idx, ww * vv, size)
        out["wi2"] += np.bincount(idx, ww * vv * vv, size)
        out["w2"] += np.bincount(idx, ww * ww, size)
        if extra is not None:
            out["wx"] += np.bincount(idx, ww * extra[ok], size)
    if ngroups > 1 or group is not None:
        out = {k: v.reshape(ngroups, nbins) for k, v in out.items()}
    return out


def _pixels_near(
    img: np.ndarray, good: np.ndarray, cx: float, cy: float, r_max: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Good pixels in the bounding box of a circle: (x, y, value) 1-D arrays."""
    ny, nx = img.shape
    x0 = max(0, int(math.floor(cx - r_max - 1)))
    x1 = min(nx, int(math.ceil(cx + r_max + 2)))
    y0 = max(0, int(math.floor(cy - r_max - 1)))
    y1 = min(ny, int(math.ceil(cy + r_max + 2)))
    if x0 >= x1 or y0 >= y1:
        empty = np.zeros(0)
        return empty, empty, empty
    yy, xx = np.nonzero(good[y0:y1, x0:x1])
    vals = img[y0:y1, x0:x1][yy, xx]
    return (xx + x0).astype(np.float64), (yy + y0).astype(np.float64), vals


def radial_profile(
    image: np.ndarray,
    mask: np.ndarray | None,
    center: Sequence[float],
    *,
    bin_width: float = 1.0,
    r_min: float = 0.0,
    r_max: float | None = None,
    split: bool = True,
    return_weight: bool = False,
) -> tuple[np.ndarray, ...]:
    """Masked mean intensity per radius bin about a centre.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Detector image (any real dtype, image units).
    mask : ndarray of bool (ny, nx) or None
        True/1 = good pixel. Non-finite pixels are always excluded.
    center : (x, y)
        Centre in pixels (x = fast/column axis).
    bin_width : float
        Bin width in pixels (fractional widths allowed).
    r_min, r_max : float
        Radius range in pixels; ``r_max`` defaults to the farthest image
        corner.
    split : bool
        If True (default) each pixel's intensity is shared linearly between
        the two bins whose centres bracket its radius (fractional binning),
        which makes the profile a continuous function of the centre; if
        False each pixel goes whole into the bin containing its radius.
    return_weight : bool
        Also return the summed pixel weight per bin (number of pixels).

    Returns
    -------
    radius : ndarray (nbins,)
        Bin centres in pixels, ``r_min + (k + 0.5) * bin_width``.
    mean : ndarray (nbins,)
        Masked mean intensity per bin (image units); NaN for an empty bin.
    weight : ndarray (nbins,)
        Only if ``return_weight``: pixels per bin (fractional with ``split``).
    """
    img = _check_image(image)
    good = _good_pixels(img, mask)
    try:
        cx, cy = (float(v) for v in center)
    except (TypeError, ValueError):
        raise ParameterError(f"center must be (x, y) in pixels (got {center!r})") from None
    bw = _check_positive("bin_width", bin_width)
    ny, nx = img.shape
    if r_max is None:
        r_max = math.hypot(max(cx, nx - 1 - cx), max(cy, ny - 1 - cy)) + bw
    r_min = float(r_min)
    if not (math.isfinite(r_min) and r_min >= 0):
        raise ParameterError(f"r_min must be >= 0 px (got {r_min!r})")
    if not (math.isfinite(float(r_max)) and float(r_max) > r_min):
        raise ParameterError(f"r_max must be larger than r_min={r_min:g} px (got {r_max!r})")
    nbins = max(1, int(math.ceil((float(r_max) - r_min) / bw)))
    x, y, v = _pixels_near(img, good, cx, cy, r_min + nbins * bw)
    r = np.hypot(x - cx, y - cy)
    acc = _bin_accumulate(r, v, r_min, bw, nbins, split)
    radius = r_min + (np.arange(nbins) + 0.5) * bw
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(acc["w"] > 0, acc["wi"] / acc["w"], np.nan)
    if return_weight:
        return radius, mean, acc["w"]
    return radius, mean


# -- ring location in a 1-D profile --------------------------------------------
def _nan_smooth(y: np.ndarray, sigma_bins: float) -> np.ndarray:
    """Gaussian smoothing that ignores NaNs (NaN where no valid neighbour)."""
    valid = np.isfinite(y)
    if sigma_bins <= 0:
        return np.where(valid, y, np.nan)
    num = ndi.gaussian_filter1d(np.where(valid, y, 0.0), sigma_bins, axis=-1, mode="nearest")
    den = ndi.gaussian_filter1d(valid.astype(float), sigma_bins, axis=-1, mode="nearest")
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    out[den < 1e-3] = np.nan
    return out


@dataclasses.dataclass
class _Ring:
    radius: float
    fwhm: float
    prominence: float
    snr: float


def _find_rings(
    radius: np.ndarray, mean: np.ndarray, weight: np.ndarray, var: np.ndarray, smooth_px: float
) -> list[_Ring]:
    """Significant peaks of a radial profile, strongest (prominence) first."""
    bw = float(radius[1] - radius[0]) if radius.size > 1 else 1.0
    ok = np.isfinite(mean) & (weight >= 4)
    if ok.sum() < 5:
        return []
    idx = np.nonzero(ok)[0]
    lo, hi = idx[0], idx[-1] + 1
    r = radius[lo:hi]
    y = np.interp(r, radius[ok], mean[ok])  # bridge masked radii
    sm = _nan_smooth(y, smooth_px / bw)
    peaks, _ = sig.find_peaks(sm)
    if peaks.size == 0:
        return []
    # prominence and width judged locally (+/- max(10 px, r/2)), so that a broad
    # ring sitting on the shoulder of a beam-stop edge is measured against its
    # own surroundings, not against the shadow
    proms = np.empty(peaks.size)
    widths = np.empty(peaks.size)
    for i, p in enumerate(peaks):
        wlen = 2 * int(math.ceil(max(10.0, 0.5 * float(r[p])) / bw)) + 1
        pr = sig.peak_prominences(sm, [p], wlen=wlen)
        proms[i] = pr[0][0]
        widths[i] = sig.peak_widths(sm, [p], rel_height=0.5, prominence_data=pr)[0][0]
    # noise of one bin of the profile: pixel scatter / sqrt(pixels per bin)
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma_bin = np.sqrt(np.interp(r, radius[ok], var[ok])
                            / np.interp(r, radius[ok], weight[ok]))
    rings = []
    for p, prom, wid in zip(peaks, proms, widths, strict=True):
        noise = float(np.nanmedian(sigma_bin[max(0, p - 2):p + 3]))
        snr = prom / noise if noise > 0 else (np.inf if prom > 0 else 0.0)
        a = p - 1 if p > 0 else p
        b = p + 1 if p < sm.size - 1 else p
        rp = float(r[p])
        if a < p < b:
            den = sm[a] - 2 * sm[p] + sm[b]
            if den < 0:
                rp += 0.5 * bw * (sm[a] - sm[b]) / den
        rings.append(_Ring(radius=rp, fwhm=float(wid * bw), prominence=float(prom), snr=float(snr)))
    rings.sort(key=lambda g: -g.prominence)
    return rings


def _profile_stats(
    img: np.ndarray, good: np.ndarray, cx: float, cy: float, r_max: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """1-px split radial profile with per-bin weight and pixel variance."""
    ny, nx = img.shape
    if r_max is None:
        r_max = math.hypot(max(cx, nx - 1 - cx), max(cy, ny - 1 - cy)) + 1.0
    nbins = max(1, int(math.ceil(r_max)))
    x, y, v = _pixels_near(img, good, cx, cy, nbins)
    r = np.hypot(x - cx, y - cy)
    acc = _bin_accumulate(r, v, 0.0, 1.0, nbins, True)
    radius = np.arange(nbins) + 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(acc["w"] > 0, acc["wi"] / acc["w"], np.nan)
        var = np.where(acc["w"] > 0, acc["wi2"] / acc["w"] - mean**2, np.nan)
    return radius, mean, acc["w"], np.clip(var, 0, None)


def _locate_ring(
    img: np.ndarray,
    good: np.ndarray,
    cx: float,
    cy: float,
    near: float | None,
    min_snr: float,
    r_min: float,
    smooth_px: float = 1.0,
) -> tuple[_Ring, np.ndarray, np.ndarray]:
    """Strongest significant ring about (cx, cy), or the one nearest ``near``."""
    radius, mean, weight, var = _profile_stats(img, good, cx, cy)
    sel = radius >= r_min
    rings = _find_rings(radius[sel], mean[sel], weight[sel], var[sel], smooth_px)
    strong = [g for g in rings if g.snr >= min_snr]
    if near is not None:
        tol = max(5.0, 0.2 * near)
        close = [g for g in strong if abs(g.radius - near) <= tol]
        if not close:
            raise NoRingFoundError(
                f"no powder ring found: no ring with signal-to-noise >= min_snr={min_snr:g} in "
                f"the radial profile within {tol:.1f} px of r={near:.1f} px about "
                f"({cx:.1f}, {cy:.1f}); significant rings are at "
                f"{[round(float(g.radius), 1) for g in strong[:5]]} px"
            )
        # prefer the strongest among those near the guessed radius
        return close[0], radius, mean
    if not strong:
        best = (f" (best peak at r={rings[0].radius:.1f} px has S/N {rings[0].snr:.1f})"
                if rings else "")
        raise NoRingFoundError(
            f"no powder ring found: the masked radial profile about ({cx:.1f}, {cy:.1f}) px has "
            f"no peak with signal-to-noise >= min_snr={min_snr:g}{best}"
        )
    return strong[0], radius, mean


def _start_ring(
    img: np.ndarray, good: np.ndarray, cx: float, cy: float, r_guess: float | None,
    min_snr: float,
) -> _Ring:
    """The ring to start from: the strongest one, or the one near the guessed radius.

    A user's radius is trusted when the profile about a wrong centre smears
    the ring below significance (it splits into two caustics at ``r +/-
    offset``): the ring is then sought in a wide window (+/- 0.3 r to 0.5 r)
    around it.
    """
    try:
        return _locate_ring(img, good, cx, cy, r_guess, min_snr, 3.0)[0]
    except NoRingFoundError:
        if r_guess is None:
            raise
        log.info("no significant ring near r=%.1f px about the guess; searching around it",
                 r_guess)
        width = min(0.5 * r_guess, max(0.3 * r_guess, 12.0))
        return _Ring(radius=float(r_guess), fwhm=width, prominence=math.nan, snr=math.nan)


def _weighted_centroid(img: np.ndarray, good: np.ndarray) -> tuple[float, float]:
    vals = img[good]
    w = np.clip(img - np.median(vals), 0, None)
    w[~good] = 0
    total = w.sum()
    if not np.isfinite(total) or total <= 0:
        raise NoRingFoundError(
            "no powder ring found: the image has no intensity above its median in the "
            "good pixels (a blank or constant image?)"
        )
    yy, xx = np.indices(img.shape)
    return float((w * xx).sum() / total), float((w * yy).sum() / total)


def initial_guess(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    min_snr: float = 5.0,
    r_min: float = 3.0,
) -> tuple[float, float, float]:
    """Starting ``(x, y, r)`` with no user guess.

    The centre is the intensity-weighted centroid of the good pixels after
    subtracting the median (so that the flat background does not pull it to
    the middle of the detector); ``r`` is the radius of the most prominent
    significant peak of the masked radial profile about that centre.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Detector image.
    mask : ndarray of bool, optional
        True/1 = good pixel.
    min_snr : float
        A profile peak counts as a ring when its prominence exceeds this many
        times the noise of one 1-px bin (pixel scatter / sqrt(pixels)).
    r_min : float
        Ignore peaks closer than this to the centre, in pixels.

    Returns
    -------
    (x, y, r) : tuple of float
        Pixels.

    Raises
    ------
    NoRingFoundError
        If the image is blank or its profile has no significant peak.
    """
    img = _check_image(image)
    good = _good_pixels(img, mask)
    cx, cy = _weighted_centroid(img, good)
    ring, _, _ = _locate_ring(img, good, cx, cy, None, min_snr, r_min)
    return cx, cy, ring.radius


# -- sector peak points ----------------------------------------------------------
_REASONS = ("ok", "masked", "edge", "gap", "weak", "flat")


@dataclasses.dataclass
class _Sectors:
    x: np.ndarray  # peak points (pixels), NaN where no peak
    y: np.ndarray
    reason: np.ndarray  # index into _REASONS


def _sector_peaks(
    img: np.ndarray,
    good: np.ndarray,
    cx: float,
    cy: float,
    r_lo: float,
    r_hi: float,
    n_sectors: int,
    bin_width: float,
    smooth_px: float,
    half_span_px: float,
    min_snr: float,
    min_coverage: float = 0.8,
) -> _Sectors:
    """Sub-pixel radial peak of the ring in each angular sector about (cx, cy)."""
    bw = bin_width
    nb = max(5, int(math.ceil((r_hi - r_lo) / bw)))
    x, y, v = _pixels_near(img, good, cx, cy, r_lo + nb * bw + bw)
    dx, dy = x - cx, y - cy
    r = np.hypot(dx, dy)
    keep = (r >= r_lo - bw) & (r < r_lo + (nb + 1) * bw)
    dx, dy, r, v = dx[keep], dy[keep], r[keep], v[keep]
    dphi = 2 * math.pi / n_sectors
    phi = np.mod(np.arctan2(dy, dx), 2 * math.pi)
    sec = np.minimum((phi / dphi).astype(np.int64), n_sectors - 1)
    acc = _bin_accumulate(r, v, r_lo, bw, nb, True, group=sec, ngroups=n_sectors,
                          extra=phi - sec * dphi)
    rc = r_lo + (np.arange(nb) + 0.5) * bw
    expected = rc * dphi * bw  # pixel weight of a fully covered bin
    W = acc["w"]
    valid = W >= 0.3 * expected[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        prof = np.where(valid, acc["wi"] / W, np.nan)
        var = np.where(valid, acc["wi2"] / W - prof**2, np.nan)
        mean_var_factor = np.where(valid, acc["w2"] / W**2, np.nan)  # Var(mean) / pixel var
        dphi_mean = np.where(W > 0, acc["wx"] / W, np.nan)
    sm = _nan_smooth(prof, smooth_px / bw)
    span = max(2, int(round(half_span_px / bw)))
    sigma_b = smooth_px / bw
    kern = np.exp(-0.5 * (np.arange(-3 * int(math.ceil(sigma_b)) - 1,
                                    3 * int(math.ceil(sigma_b)) + 2) / max(sigma_b, 1e-6)) ** 2)
    kh = kern.size // 2

    px = np.full(n_sectors, np.nan)
    py = np.full(n_sectors, np.nan)
    reason = np.zeros(n_sectors, dtype=np.int64)
    for s in range(n_sectors):
        vs = valid[s]
        if vs.mean() < min_coverage:
            reason[s] = 1
            continue
        row = np.where(vs, sm[s], -np.inf)
        k = int(np.argmax(row))
        if k < span or k > nb - 1 - span:
            reason[s] = 2
            continue
        win = slice(k - span, k + span + 1)
        core = max(2, span // 3)
        if not vs[k - core:k + core + 1].all() or vs[win].mean() < 0.75:
            reason[s] = 3
            continue
        left = sm[s, : k - span][vs[: k - span]]
        right = sm[s, k + span + 1:][vs[k + span + 1:]]
        if left.size == 0 or right.size == 0:
            reason[s] = 2
            continue
        prominence = sm[s, k] - max(left.min(), right.min())
        # noise of the smoothed profile at the peak (bins treated as independent)
        g = kern.copy()
        lo, hi = k - kh, k + kh + 1
        ga = g[max(0, -lo): g.size - max(0, hi - nb)]
        sl = slice(max(0, lo), min(nb, hi))
        vv = vs[sl]
        ga = np.where(vv, ga, 0.0)
        ga = ga / ga.sum()
        pix_var = float(np.nanmedian(var[s][vs]))
        noise = math.sqrt(2 * pix_var * float(np.nansum(ga**2 * mean_var_factor[s, sl])))
        if not prominence > min_snr * noise:
            reason[s] = 4
            continue
        # sub-pixel peak: weighted quadratic fit of the raw profile over the top
        fit_ok = vs[win]
        rr = rc[win][fit_ok] - rc[k]
        coef = np.polyfit(rr, prof[s, win][fit_ok], 2, w=np.sqrt(W[s, win][fit_ok]))
        if not coef[0] < 0:
            reason[s] = 5
            continue
        vertex = -coef[1] / (2 * coef[0])
        if abs(vertex) > span * bw:
            reason[s] = 5
            continue
        rpk = rc[k] + vertex
        ang = s * dphi + float(np.nanmean(dphi_mean[s, win]))
        px[s] = cx + rpk * math.cos(ang)
        py[s] = cy + rpk * math.sin(ang)
    return _Sectors(px, py, reason)


# -- circle and ellipse fits -------------------------------------------------------
def _robust_scale(res: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(res - np.median(res))))


def _circle_residuals(p: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.hypot(x - p[0], y - p[1]) - p[2]


def _circle_jac(p: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = np.hypot(x - p[0], y - p[1])
    d = np.where(d > 0, d, 1e-12)
    return np.column_stack([-(x - p[0]) / d, -(y - p[1]) / d, -np.ones_like(d)])


def _covariance(jac: np.ndarray, res: np.ndarray) -> np.ndarray:
    n, k = jac.shape
    dof = max(1, n - k)
    s2 = float(res @ res) / dof
    try:
        return np.linalg.inv(jac.T @ jac) * s2
    except np.linalg.LinAlgError:
        return np.full((k, k), np.nan)


def _robust_fit(
    fun: Any,
    jac: Any,
    p0: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    loss: str,
    reject_sigma: float,
    min_scale: float,
    nparam: int,
    inliers: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Robust-loss fit, sigma clipping, then an ordinary LSQ step on the inliers.

    ``inliers`` is an optional starting inlier set (e.g. RANSAC's); clipped
    points are re-admitted when a later fit brings them back within range.
    Returns (params, covariance, inlier boolean mask).
    """
    inl = np.ones(x.size, dtype=bool)
    if inliers is not None and inliers.sum() >= nparam + 2:
        inl = inliers.copy()
    p = np.asarray(p0, dtype=float)
    scale = max(_robust_scale(fun(p, x[inl], y[inl])), min_scale)
    for _ in range(10):
        sol = opt.least_squares(fun, p, jac=jac, args=(x[inl], y[inl]), loss=loss,
                                f_scale=scale, method="trf", x_scale="jac")
        p = sol.x
        res = fun(p, x, y)
        scale = max(_robust_scale(res[inl]), min_scale)
        new = np.abs(res - np.median(res[inl])) <= reject_sigma * scale
        if new.sum() < nparam + 2 or np.array_equal(new, inl):
            break
        inl = new
    sol = opt.least_squares(fun, p, jac=jac, args=(x[inl], y[inl]), loss="linear",
                            method="trf", x_scale="jac")
    cov = _covariance(sol.jac, sol.fun)
    return sol.x, cov, inl


def _ransac_circle(
    x: np.ndarray, y: np.ndarray, threshold: float, r_range: tuple[float, float],
    n_trials: int = 400, seed: int = 0,
) -> np.ndarray | None:
    """Circle through 3 peak points that best explains the others (MSAC).

    A robust starting point when some sectors picked a feature that is not
    the ring (a beam-stop edge, another ring): least squares started from an
    algebraic fit to all points can settle on a circle through the outliers.
    Deterministic (fixed seed). Returns ``(cx, cy, r)`` or None.
    """
    n = x.size
    if n < 3:
        return None
    rng = np.random.default_rng(seed)
    if n <= 16:
        trip = np.array([(i, j, k) for i in range(n) for j in range(i + 1, n)
                         for k in range(j + 1, n)])
    else:
        trip = np.sort(np.array([rng.choice(n, 3, replace=False) for _ in range(n_trials)]), axis=1)
    x1, x2, x3 = x[trip[:, 0]], x[trip[:, 1]], x[trip[:, 2]]
    y1, y2, y3 = y[trip[:, 0]], y[trip[:, 1]], y[trip[:, 2]]
    d = 2 * (x1 * (y2 - y3) + x2 * (y3 - y1) + x3 * (y1 - y2))
    ok = np.abs(d) > 1e-9
    s1, s2, s3 = x1**2 + y1**2, x2**2 + y2**2, x3**2 + y3**2
    with np.errstate(invalid="ignore", divide="ignore"):
        ux = (s1 * (y2 - y3) + s2 * (y3 - y1) + s3 * (y1 - y2)) / d
        uy = (s1 * (x3 - x2) + s2 * (x1 - x3) + s3 * (x2 - x1)) / d
    rr = np.hypot(x1 - ux, y1 - uy)
    ok &= np.isfinite(rr) & (rr >= r_range[0]) & (rr <= r_range[1])
    if not ok.any():
        return None
    ux, uy, rr = ux[ok], uy[ok], rr[ok]
    res = np.abs(np.hypot(x[None, :] - ux[:, None], y[None, :] - uy[:, None]) - rr[:, None])
    # MSAC score: truncated squared residuals (precise inliers beat loose ones)
    cost = np.minimum(res, threshold) ** 2
    b = int(np.argmin(cost.sum(axis=1)))
    if (res[b] < threshold).sum() < 3:
        return None
    return np.array([ux[b], uy[b], rr[b]])


def _point_scatter(radius: np.ndarray) -> float:
    """Noise of sector peak radii from second differences of neighbours (px); NaN if unknown.

    ``radius`` is per sector in angular order, NaN where a sector has no peak.
    A smooth ring (circle seen from a nearby centre) has tiny second
    differences, so what remains is the scatter of the peak positions.
    """
    d2 = radius[:-2] - 2 * radius[1:-1] + radius[2:]
    d2 = d2[np.isfinite(d2)]
    if d2.size < 5:
        return math.nan
    return float(1.4826 * np.median(np.abs(d2)) / math.sqrt(6.0))


def _ellipse_residuals(p: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Radial distance from the ellipse along the ray from its centre (pixels)."""
    cx, cy, a, b, th = p
    dx, dy = x - cx, y - cy
    c, s = math.cos(th), math.sin(th)
    u = c * dx + s * dy
    v = -s * dx + c * dy
    rho = np.hypot(u, v)
    rho_safe = np.where(rho > 0, rho, 1e-12)
    cu, sv = u / rho_safe, v / rho_safe
    r_ell = a * b / np.sqrt((b * cu) ** 2 + (a * sv) ** 2)
    return rho - r_ell


def _ellipse_start(x: np.ndarray, y: np.ndarray, circle: np.ndarray) -> np.ndarray:
    """Algebraic conic fit (Halir-Flusser) as the ellipse starting point."""
    try:
        xm, ym = x.mean(), y.mean()
        sc = max(float(np.std(x - xm) + np.std(y - ym)), 1e-6)
        xs, ys = (x - xm) / sc, (y - ym) / sc
        d1 = np.column_stack([xs * xs, xs * ys, ys * ys])
        d2 = np.column_stack([xs, ys, np.ones_like(xs)])
        s1, s2, s3 = d1.T @ d1, d1.T @ d2, d2.T @ d2
        t = -np.linalg.solve(s3, s2.T)
        m = s1 + s2 @ t
        m = np.array([m[2] / 2, -m[1], m[0] / 2])
        w, vecs = np.linalg.eig(m)
        vecs = np.real(vecs)
        cond = 4 * vecs[0] * vecs[2] - vecs[1] ** 2
        a1 = vecs[:, np.nonzero(cond > 0)[0][0]]
        A, B, C = a1
        D, E, F = t @ a1
        den = B * B - 4 * A * C
        x0 = (2 * C * D - B * E) / den
        y0 = (2 * A * E - B * D) / den
        num = 2 * (A * E * E + C * D * D - B * D * E + den * F)
        root = math.sqrt((A - C) ** 2 + B * B)
        ax1 = -math.sqrt(num * (A + C + root)) / den
        ax2 = -math.sqrt(num * (A + C - root)) / den
        th = 0.5 * math.atan2(-B, C - A)
        p = np.array([x0 * sc + xm, y0 * sc + ym, ax1 * sc, ax2 * sc, th])
        if not np.all(np.isfinite(p)) or p[2] <= 0 or p[3] <= 0:
            raise ValueError
        return p
    except (ValueError, IndexError, np.linalg.LinAlgError, ZeroDivisionError):
        return np.array([circle[0], circle[1], circle[2] * 1.001, circle[2] * 0.999, 0.0])


def _fit_ellipse(
    x: np.ndarray, y: np.ndarray, circle: np.ndarray, loss: str, reject_sigma: float
) -> EllipseFit | None:
    if x.size < 8:
        return None
    p0 = _ellipse_start(x, y, circle)
    # keep the start sane: an algebraic fit on a short arc can run away
    if (np.hypot(p0[0] - circle[0], p0[1] - circle[1]) > 0.5 * circle[2]
            or not 0.5 < p0[2] / circle[2] < 2 or not 0.5 < p0[3] / circle[2] < 2):
        p0 = np.array([circle[0], circle[1], circle[2] * 1.001, circle[2] * 0.999, 0.0])
    try:
        p, cov, inl = _robust_fit(_ellipse_residuals, "2-point", p0, x, y, loss,
                                  reject_sigma, 0.02, 5)
    except (ValueError, np.linalg.LinAlgError):
        return None
    cx, cy, a, b, th = p
    sig_ = np.sqrt(np.abs(np.diag(cov)))
    sa, sb = sig_[2], sig_[3]
    a, b = abs(a), abs(b)
    if b > a:
        a, b, sa, sb = b, a, sb, sa
        th += math.pi / 2
    th = float(np.mod(th, math.pi))
    res = _ellipse_residuals(p, x[inl], y[inl])
    return EllipseFit(
        center_x=float(cx), center_y=float(cy), semi_major=float(a), semi_minor=float(b),
        angle=th, sigma_center_x=float(sig_[0]), sigma_center_y=float(sig_[1]),
        sigma_semi_major=float(sa), sigma_semi_minor=float(sb), sigma_angle=float(sig_[4]),
        rms_px=float(np.sqrt(np.mean(res**2))), n_used=int(inl.sum()),
        n_rejected=int((~inl).sum()),
    )


# -- method 1: circle through the ring's peak points ----------------------------------
def fit_center(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    guess: Guess = None,
    *,
    n_sectors: int | None = None,
    search_width: float | None = None,
    bin_width: float = 0.5,
    min_snr: float = 3.0,
    ring_min_snr: float = 5.0,
    loss: str = "soft_l1",
    reject_sigma: float = 3.5,
    min_points: int = 8,
    max_iter: int = 6,
    tol: float = 0.01,
    fit_ellipse: bool = True,
) -> CenterFit:
    """Beam centre from a robust circle fit to the ring's radial peak positions.

    The ring is sampled in ``n_sectors`` angular sectors about the current
    centre; in each, the masked radial profile (fractional bins of
    ``bin_width``) is lightly smoothed, its maximum in the search window
    located and refined to sub-pixel precision by a weighted parabola over
    the top of the peak, and turned into an ``(x, y)`` point at the sector's
    mean pixel angle. Sectors are skipped when they are mostly masked or off
    the detector, when a gap cuts the peak, when the maximum is at the window
    edge (no peak), or when the peak's prominence is below ``min_snr`` times
    its noise. A circle is fitted to the points by
    :func:`scipy.optimize.least_squares` with a robust loss, points beyond
    ``reject_sigma`` robust standard deviations are rejected, and a final
    ordinary least-squares step gives the covariance. The sectors are
    re-measured about the new centre until it moves by less than ``tol``.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Detector image, ideally the mean of many bright shots
        (:func:`mean_image`).
    mask : ndarray of bool (ny, nx), optional
        True/1 = good pixel. Non-finite pixels are masked too.
    guess : (x, y) or (x, y, r), optional
        Starting centre and ring radius in pixels. Without ``r`` the
        strongest ring of the profile about ``(x, y)`` is used; with ``r``
        the strongest significant ring within ``max(5, 0.2 r)`` px of it,
        or ``r`` itself if the profile about a poor ``(x, y)`` smears the
        ring below significance. Without a guess, the masked
        intensity-weighted centre and its strongest ring
        (:func:`initial_guess`).
    n_sectors : int, optional
        Angular sectors; default about one per 3 px of arc at the ring,
        between 24 and 720.
    search_width : float, optional
        Half-width in pixels of the radial window searched in each sector;
        default on the first pass the largest of 6 px, the ring's FWHM about
        the starting centre (which grows with the centre error) and 0.3 r.
    bin_width : float
        Radial bin width of the sector profiles, in pixels.
    min_snr : float
        Minimum peak prominence per sector, in units of its noise.
    ring_min_snr : float
        Minimum prominence of the ring in the full radial profile, in units
        of the noise of a 1-px bin.
    loss : str
        Robust loss of :func:`scipy.optimize.least_squares` (``"soft_l1"``,
        ``"huber"``, ``"cauchy"``, ``"arctan"`` or ``"linear"``).
    reject_sigma : float
        Outlier threshold in robust standard deviations of the residuals.
    min_points : int
        Fewest peak points accepted for a fit.
    max_iter : int
        Most sector-sampling passes (at least 3 are made when allowed).
    tol : float
        Convergence: centre shift between passes, in pixels (passes also stop
        once the shift is below twice the centre's 1-sigma uncertainty).
    fit_ellipse : bool
        Also fit an ellipse to the same peak points.

    Returns
    -------
    CenterFit
        Centre, radius and 1-sigma uncertainties in pixels, the points used
        and rejected, the radial profile about the centre and the ellipse.

    Raises
    ------
    GeometryError
        If ``guess`` lies off the detector or its radius is impossible.
    NoRingFoundError
        If no significant ring is found, too few sectors give a peak, or the
        ring is not significant in the radial profile about the fitted
        centre.
    ParameterError, MaskError
        For a bad image, mask or option.
    """
    img = _check_image(image)
    good = _good_pixels(img, mask)
    ny, nx = img.shape
    if loss not in ("linear", "soft_l1", "huber", "cauchy", "arctan"):
        raise ParameterError(
            f"loss must be one of linear, soft_l1, huber, cauchy, arctan (got {loss!r})"
        )
    bw = _check_positive("bin_width", bin_width)
    _check_positive("reject_sigma", reject_sigma, "robust standard deviations")
    if int(min_points) < 4:
        raise ParameterError(f"min_points must be >= 4 (got {min_points})")
    if int(max_iter) < 1:
        raise ParameterError(f"max_iter must be >= 1 (got {max_iter})")
    if search_width is not None:
        search_width = _check_positive("search_width", search_width)
    if n_sectors is not None and int(n_sectors) < 8:
        raise ParameterError(f"n_sectors must be >= 8 (got {n_sectors})")

    if guess is None:
        cx, cy = _weighted_centroid(img, good)
        r_guess = None
    else:
        cx, cy, r_guess = _check_guess(guess, img.shape)
    ring = _start_ring(img, good, cx, cy, r_guess, ring_min_snr)
    start = (cx, cy, ring.radius if r_guess is None else float(r_guess))
    r0, fwhm = ring.radius, ring.fwhm
    # first pass: wide enough for a centre error of ~ r/4 (a wrong centre
    # smears the ring over r +/- error; fwhm about it already includes that)
    hw = search_width if search_width is not None else max(6.0, fwhm, 0.3 * r0)

    p = np.array([cx, cy, r0])
    cov = np.full((3, 3), np.nan)
    inl = np.zeros(0, dtype=bool)
    pts_x = pts_y = np.zeros(0)
    n_skip = 0
    ns = 0
    it = 0
    ring_seen = False
    for it in range(1, int(max_iter) + 1):
        ns = int(n_sectors) if n_sectors is not None else int(
            np.clip(round(2 * math.pi * r0 / 3.0), 24, 720))
        r_lo = max(0.5, r0 - hw)
        r_hi = r0 + hw
        smooth_px = float(np.clip(fwhm / 5.0, 0.5, 4.0))
        half_span = float(np.clip(fwhm / 2.0, 1.0, hw / 2.0))
        secs = _sector_peaks(img, good, p[0], p[1], r_lo, r_hi, ns, bw, smooth_px,
                             half_span, min_snr)
        ok = np.isfinite(secs.x)
        n_skip = int((~ok).sum())
        if ok.sum() < max(int(min_points), 4):
            counts = {name: int((secs.reason == i).sum()) for i, name in enumerate(_REASONS)
                      if i and (secs.reason == i).any()}
            raise NoRingFoundError(
                f"no powder ring found: only {int(ok.sum())} of {ns} angular sectors show a "
                f"ring peak between "
                f"r={r_lo:.1f} and {r_hi:.1f} px about ({p[0]:.2f}, {p[1]:.2f}) px "
                f"(need min_points={min_points}); sectors skipped as {counts}"
            )
        pts_x, pts_y = secs.x[ok], secs.y[ok]
        start_p, inl0 = p, None
        if it == 1:
            scatter = _point_scatter(np.hypot(secs.x - p[0], secs.y - p[1]))
            thr = float(np.clip(4.0 * scatter, 0.25, 3.0)) if math.isfinite(scatter) else \
                float(np.clip(fwhm / 2, 1.0, 3.0))
            ransac = _ransac_circle(pts_x, pts_y, thr, (0.25 * r0, 4.0 * r0 + 10.0))
            if ransac is not None:
                # drop only gross outliers here: an elliptical ring deviates
                # smoothly from any circle and must keep all its points
                res0 = _circle_residuals(ransac, pts_x, pts_y)
                start_p = ransac
                inl0 = np.abs(res0) < max(3.0, 5.0 * _robust_scale(res0))
        new_p, cov, inl = _robust_fit(_circle_residuals, _circle_jac, start_p, pts_x, pts_y,
                                      loss, reject_sigma, 0.02, 3, inl0)
        if (not np.all(np.isfinite(new_p)) or new_p[2] <= 0
                or not (-0.5 - new_p[2] <= new_p[0] <= nx - 0.5 + new_p[2])
                or not (-0.5 - new_p[2] <= new_p[1] <= ny - 0.5 + new_p[2])):
            raise NoRingFoundError(
                f"no powder ring found: the circle fit to {int(ok.sum())} peak points diverged "
                f"(centre {new_p[0]:.1f}, {new_p[1]:.1f}; radius {new_p[2]:.1f} px)"
            )
        shift = float(np.hypot(*(new_p[:2] - p[:2])))
        log.debug("pass %d: centre (%.4f, %.4f) r=%.4f shift %.4f px, %d points",
                  it, new_p[0], new_p[1], new_p[2], shift, int(ok.sum()))
        p = new_p
        res = _circle_residuals(p, pts_x[inl], pts_y[inl])
        rms = float(np.sqrt(np.mean(res**2)))
        # re-measure the ring about the new centre to set the next window
        try:
            ring, _, _ = _locate_ring(img, good, p[0], p[1], p[2], ring_min_snr, 3.0)
            fwhm = ring.fwhm
            ring_seen = True
        except NoRingFoundError:
            ring_seen = False
        r0 = float(p[2])
        if search_width is None:
            hw = float(max(4.0, 0.75 * fwhm, 6.0 * rms))
        # re-sampling about a new centre changes which pixels fall in which
        # sector, so successive passes scatter by about the fit's own sigma
        sigma_c = math.hypot(math.sqrt(abs(cov[0, 0])), math.sqrt(abs(cov[1, 1])))
        if it >= 3 and shift < max(tol, 2.0 * sigma_c):
            break

    if not ring_seen:
        # the azimuthal average about a right centre shows the ring sharply
        raise NoRingFoundError(
            f"no powder ring found: the circle fitted to {int(inl.sum())} sector peaks "
            f"(centre ({p[0]:.2f}, {p[1]:.2f}), r={p[2]:.1f} px) has no significant ring "
            f"(min_snr={ring_min_snr:g}) in the radial profile about it"
        )
    if not (-0.5 <= p[0] <= nx - 0.5 and -0.5 <= p[1] <= ny - 0.5):
        raise GeometryError(
            f"the fitted beam centre ({p[0]:.2f}, {p[1]:.2f}) px lies off the {ny}x{nx} "
            f"detector image: the ring peak points do not constrain it"
        )
    sig_ = np.sqrt(np.abs(np.diag(cov)))
    res = _circle_residuals(p, pts_x[inl], pts_y[inl])
    prof_r, prof_m = radial_profile(img, good, (p[0], p[1]), bin_width=1.0)
    ellipse = None
    if fit_ellipse:
        ellipse = _fit_ellipse(pts_x, pts_y, p, loss, reject_sigma)
    return CenterFit(
        center_x=float(p[0]), center_y=float(p[1]), radius=float(p[2]),
        sigma_x=float(sig_[0]), sigma_y=float(sig_[1]), sigma_radius=float(sig_[2]),
        n_used=int(inl.sum()), n_rejected=int((~inl).sum()), n_skipped=n_skip, n_sectors=ns,
        rms_px=float(np.sqrt(np.mean(res**2))),
        points=np.column_stack([pts_x[inl], pts_y[inl]]),
        rejected_points=np.column_stack([pts_x[~inl], pts_y[~inl]]),
        residuals=res, profile_radius=prof_r, profile_mean=prof_m, ring_fwhm=float(fwhm),
        ellipse=ellipse, guess=(float(start[0]), float(start[1]), float(start[2])),
        n_iterations=it,
    )


# -- method 2: sharpest ring in the radial profile ---------------------------------------
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

    Independent of :func:`fit_center` (no peak points, no circle). For a
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
        :func:`fit_center`.
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
    if guess is None:
        cx0, cy0 = _weighted_centroid(img, good)
        r_guess = None
    else:
        cx0, cy0, r_guess = _check_guess(guess, img.shape)
    ring = _start_ring(img, good, cx0, cy0, r_guess, ring_min_snr)
    r0 = ring.radius
    n_eval = 0
    # pixels that any candidate window can reach
    reach = max(6.0, ring.fwhm) if half_width is None else half_width
    margin = reach + 2 * search + 2
    x, y, v = _pixels_near(img, good, cx0, cy0, r0 + margin)
    d0 = np.hypot(x - cx0, y - cy0)
    keep = (d0 >= r0 - margin) & (d0 <= r0 + margin)
    x, y, v = x[keep], y[keep], v[keep]

    def setup(r_mid: float, fwhm: float) -> tuple[float, int, np.ndarray, float]:
        hw = half_width if half_width is not None else min(max(6.0, fwhm), reach)
        r_lo = max(0.5, r_mid - hw)
        nb = max(8, int(math.ceil((r_mid + hw - r_lo) / bw)))
        rc = r_lo + (np.arange(nb) + 0.5) * bw
        sm = smooth_px if smooth_px is not None else float(np.clip(fwhm / 5.0, 0.5, 4.0))
        return r_lo, nb, rc, sm / bw

    def profile(c: np.ndarray, cfg: tuple[float, int, np.ndarray, float],
                smooth: bool = True) -> np.ndarray:
        r_lo, nb, _, sigma_b = cfg
        acc = _bin_accumulate(np.hypot(x - c[0], y - c[1]), v, r_lo, bw, nb, True)
        with np.errstate(invalid="ignore", divide="ignore"):
            prof = np.where(acc["w"] > 0.25 * bw, acc["wi"] / acc["w"], np.nan)
        return _nan_smooth(prof, sigma_b) if smooth else prof

    def objective(c: np.ndarray, cfg: tuple[float, int, np.ndarray, float]) -> float:
        nonlocal n_eval
        n_eval += 1
        height = _peak_of(cfg[2], profile(c, cfg))[1]
        return -height if np.isfinite(height) else 1e300

    cfg = setup(r0, ring.fwhm)
    offs = np.arange(-search, search + 0.5 * grid_step, grid_step)
    grid = [(objective(np.array([cx0 + ox, cy0 + oy]), cfg), ox, oy)
            for oy in offs for ox in offs]
    best = min(grid)
    if max(abs(best[1]), abs(best[2])) >= search - 1e-9:
        raise GeometryError(
            f"the sharpest ring on the grid is at the edge of the search square "
            f"(+/- search={search:g} px about the guess ({cx0:.2f}, {cy0:.2f})): the centre "
            f"is probably farther off; give a better guess or a larger search"
        )
    x_start = np.array([cx0 + best[1], cy0 + best[2]])
    # re-measure the ring about the best grid point: narrower window and smoothing
    try:
        ring2, _, _ = _locate_ring(img, good, x_start[0], x_start[1], r0, ring_min_snr, 3.0)
        if abs(ring2.radius - r0) <= search:
            cfg = setup(ring2.radius, ring2.fwhm)
    except NoRingFoundError:
        pass
    at_guess = -objective(np.array([cx0, cy0]), cfg)
    f_start = objective(x_start, cfg)
    simplex = np.array([x_start, x_start + [grid_step / 2, 0], x_start + [0, grid_step / 2]])
    sol = opt.minimize(objective, x_start, args=(cfg,), method="Nelder-Mead",
                       options={"xatol": xtol, "fatol": 1e-12, "initial_simplex": simplex,
                                "maxiter": 400})
    c = sol.x if sol.fun <= f_start else x_start
    if max(abs(c[0] - cx0), abs(c[1] - cy0)) > search:
        raise GeometryError(
            f"the sharpest-ring centre ({c[0]:.2f}, {c[1]:.2f}) px lies outside the search "
            f"square of +/- search={search:g} px about the guess ({cx0:.2f}, {cy0:.2f}); "
            f"give a better guess or a larger search"
        )
    ny, nx = img.shape
    if not (-0.5 <= c[0] <= nx - 0.5 and -0.5 <= c[1] <= ny - 0.5):
        raise GeometryError(
            f"the sharpest-ring centre ({c[0]:.2f}, {c[1]:.2f}) px lies off the {ny}x{nx} image"
        )
    rc = cfg[2]
    rk, height, width = _peak_of(rc, profile(c, cfg))
    return SharpnessFit(
        center_x=float(c[0]), center_y=float(c[1]), radius=float(rk), fwhm=float(width),
        sharpness=float(height), sharpness_at_guess=float(at_guess), profile_radius=rc,
        profile_mean=profile(c, cfg, smooth=False),
        guess=(float(cx0), float(cy0), float(r0 if r_guess is None else r_guess)),
        n_evaluations=n_eval,
    )


# -- both ---------------------------------------------------------------------------------
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

    Both start from the same guess (:func:`initial_guess` when none is
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
        sharp: SharpnessFit | None = refine_center_by_sharpness(
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


# -- mean of the bright shots ------------------------------------------------------------
def mean_image(
    images: Any,
    bright: np.ndarray | Sequence[bool] | None = None,
    *,
    split_every: int | None = None,
) -> np.ndarray:
    """Mean detector image over (the bright) shots, computed with Dask.

    Parameters
    ----------
    images : dask.array.Array (ntag, ny, nx), or anything ``dask.array.asarray`` takes
        Lazy stack of detector images.
    bright : ndarray of bool (ntag,), optional
        Selector of the shots to average (e.g. the bright shots); all when
        None.
    split_every : int, optional
        Fan-in of the tree reduction over the tag axis (Dask's default when
        None).

    Returns
    -------
    ndarray float64 (ny, nx)
        Mean image, computed on whatever Dask scheduler is active.

    Raises
    ------
    ParameterError
        If ``images`` is not 3-D or ``bright`` does not match it or selects
        nothing.
    """
    import dask.array as da

    arr = images if isinstance(images, da.Array) else da.asarray(images)
    if arr.ndim != 3:
        raise ParameterError(f"images must be a (tag, y, x) stack (got shape {arr.shape})")
    if bright is not None:
        sel = np.asarray(bright)
        if sel.dtype != bool or sel.shape != (arr.shape[0],):
            raise ParameterError(
                f"bright must be a boolean array of shape ({arr.shape[0]},) selecting tags "
                f"(got dtype {sel.dtype}, shape {sel.shape})"
            )
        if not sel.any():
            raise ParameterError("bright selects no shot: cannot average zero images")
        arr = arr[sel]
    elif arr.shape[0] == 0:
        raise ParameterError("images holds no shot: cannot average zero images")
    mean = arr.mean(axis=0, dtype=np.float64, split_every=split_every)
    return np.asarray(mean.compute())
