"""Beam centre from a robust circle fit to the ring's peak positions.

:func:`fit_center` measures the ring's sub-pixel radial peak position in
many angular sectors about the current centre (sectors that are masked, off
the detector, in a panel gap or have no significant peak are skipped) and
fits a circle to those ``(x, y)`` points by robust least squares: a RANSAC
start, a ``soft_l1`` loss, then sigma clipping and a final ordinary
least-squares step whose Jacobian gives 1-sigma uncertainties. The sectors
are re-measured about the new centre until it stops moving. An ellipse
(detector tilt) is fitted to the same points and reported beside the circle.

All lengths are in pixels, ``x`` the fast (column) axis, ``y`` the slow
(row) axis, angles in radians from +x toward +y; masks are True/1 = good.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import scipy.optimize as opt

from ..errors import GeometryError, NoRingFoundError, ParameterError
from ._common import Guess, _check_image, _check_positive, _good_pixels, _RingCentre, log
from .profile import _REASONS, _locate_ring, _sector_peaks, _Sectors, _start, radial_profile

__all__ = ["CenterFit", "EllipseFit", "fit_center"]


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


# -- the steps of the circle fit ---------------------------------------------------------
def _check_fit_options(
    loss: str,
    bin_width: float,
    reject_sigma: float,
    min_points: int,
    max_iter: int,
    search_width: float | None,
    n_sectors: int | None,
) -> tuple[float, float | None]:
    """Validate :func:`fit_center`'s options; return ``bin_width`` and ``search_width`` (px)."""
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
    return bw, search_width


@dataclasses.dataclass
class _CirclePass:
    """One pass of the circle fit: sector peak points and the circle through them."""

    params: np.ndarray  # (x, y, r) in pixels
    cov: np.ndarray  # (3, 3) covariance of params, pixels^2
    inliers: np.ndarray  # bool per point
    x: np.ndarray  # peak points (pixels)
    y: np.ndarray
    residuals: np.ndarray  # radial residual of the inliers (pixels)
    rms: float  # RMS of ``residuals`` (pixels)
    n_sectors: int
    n_skipped: int  # sectors without a peak point


def _circle_pass(
    img: np.ndarray,
    good: np.ndarray,
    p: np.ndarray,
    r0: float,
    hw: float,
    fwhm: float,
    n_sectors: int,
    bin_width: float,
    min_snr: float,
    min_points: int,
    loss: str,
    reject_sigma: float,
    first: bool,
) -> _CirclePass:
    """Peak points in ``r0 +/- hw`` about centre ``p[:2]`` and a robust circle through them.

    Smoothing and the peak's fitted span follow the ring's ``fwhm`` (pixels).
    The first pass starts from a RANSAC circle, later ones from ``p``.
    """
    r_lo = max(0.5, r0 - hw)
    r_hi = r0 + hw
    smooth_px = float(np.clip(fwhm / 5.0, 0.5, 4.0))
    half_span = float(np.clip(fwhm / 2.0, 1.0, hw / 2.0))
    secs = _sector_peaks(img, good, p[0], p[1], r_lo, r_hi, n_sectors, bin_width, smooth_px,
                         half_span, min_snr)
    ok = np.isfinite(secs.x)
    if ok.sum() < max(int(min_points), 4):
        counts = {name: int((secs.reason == i).sum()) for i, name in enumerate(_REASONS)
                  if i and (secs.reason == i).any()}
        raise NoRingFoundError(
            f"no powder ring found: only {int(ok.sum())} of {n_sectors} angular sectors show a "
            f"ring peak between "
            f"r={r_lo:.1f} and {r_hi:.1f} px about ({p[0]:.2f}, {p[1]:.2f}) px "
            f"(need min_points={min_points}); sectors skipped as {counts}"
        )
    pts_x, pts_y = secs.x[ok], secs.y[ok]
    start_p: np.ndarray = p
    inl0: np.ndarray | None = None
    if first:
        start_p, inl0 = _ransac_start(secs, pts_x, pts_y, p, r0, fwhm)
    new_p, cov, inl = _robust_fit(_circle_residuals, _circle_jac, start_p, pts_x, pts_y,
                                  loss, reject_sigma, 0.02, 3, inl0)
    ny, nx = img.shape
    if (not np.all(np.isfinite(new_p)) or new_p[2] <= 0
            or not (-0.5 - new_p[2] <= new_p[0] <= nx - 0.5 + new_p[2])
            or not (-0.5 - new_p[2] <= new_p[1] <= ny - 0.5 + new_p[2])):
        raise NoRingFoundError(
            f"no powder ring found: the circle fit to {int(ok.sum())} peak points diverged "
            f"(centre {new_p[0]:.1f}, {new_p[1]:.1f}; radius {new_p[2]:.1f} px)"
        )
    res = _circle_residuals(new_p, pts_x[inl], pts_y[inl])
    return _CirclePass(params=new_p, cov=cov, inliers=inl, x=pts_x, y=pts_y, residuals=res,
                       rms=float(np.sqrt(np.mean(res**2))), n_sectors=n_sectors,
                       n_skipped=int((~ok).sum()))


def _ransac_start(
    secs: _Sectors, pts_x: np.ndarray, pts_y: np.ndarray, p: np.ndarray, r0: float, fwhm: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """Starting circle and inlier set for the first pass (``p`` and None if RANSAC fails).

    The RANSAC threshold is 4 times the scatter of the peak radii about
    ``p`` (0.25 to 3 px), or half the ring FWHM when that is unknown.
    """
    scatter = _point_scatter(np.hypot(secs.x - p[0], secs.y - p[1]))
    thr = float(np.clip(4.0 * scatter, 0.25, 3.0)) if math.isfinite(scatter) else \
        float(np.clip(fwhm / 2, 1.0, 3.0))
    ransac = _ransac_circle(pts_x, pts_y, thr, (0.25 * r0, 4.0 * r0 + 10.0))
    if ransac is None:
        return p, None
    # drop only gross outliers here: an elliptical ring deviates
    # smoothly from any circle and must keep all its points
    res0 = _circle_residuals(ransac, pts_x, pts_y)
    return ransac, np.abs(res0) < max(3.0, 5.0 * _robust_scale(res0))


def _check_fitted_centre(
    fit: _CirclePass, ring_seen: bool, ring_min_snr: float, shape: tuple[int, ...]
) -> None:
    """Refuse a final circle with no significant ring about it, or a centre off the image."""
    p = fit.params
    if not ring_seen:
        # the azimuthal average about a right centre shows the ring sharply
        raise NoRingFoundError(
            f"no powder ring found: the circle fitted to {int(fit.inliers.sum())} sector peaks "
            f"(centre ({p[0]:.2f}, {p[1]:.2f}), r={p[2]:.1f} px) has no significant ring "
            f"(min_snr={ring_min_snr:g}) in the radial profile about it"
        )
    ny, nx = shape
    if not (-0.5 <= p[0] <= nx - 0.5 and -0.5 <= p[1] <= ny - 0.5):
        raise GeometryError(
            f"the fitted beam centre ({p[0]:.2f}, {p[1]:.2f}) px lies off the {ny}x{nx} "
            f"detector image: the ring peak points do not constrain it"
        )


# -- the circle fit ---------------------------------------------------------------------
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
        (:func:`~sacla_dask.center.mean_image`).
    mask : ndarray of bool (ny, nx), optional
        True/1 = good pixel. Non-finite pixels are masked too.
    guess : (x, y) or (x, y, r), optional
        Starting centre and ring radius in pixels. Without ``r`` the
        strongest ring of the profile about ``(x, y)`` is used; with ``r``
        the strongest significant ring within ``max(5, 0.2 r)`` px of it,
        or ``r`` itself if the profile about a poor ``(x, y)`` smears the
        ring below significance. Without a guess, the masked
        intensity-weighted centre and its strongest ring
        (:func:`~sacla_dask.center.initial_guess`).
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
    bw, search_width = _check_fit_options(loss, bin_width, reject_sigma, min_points, max_iter,
                                          search_width, n_sectors)
    cx, cy, r_guess, ring = _start(img, good, guess, ring_min_snr)
    start = (cx, cy, ring.radius if r_guess is None else float(r_guess))
    r0, fwhm = ring.radius, ring.fwhm
    # first pass: wide enough for a centre error of ~ r/4 (a wrong centre
    # smears the ring over r +/- error; fwhm about it already includes that)
    hw = search_width if search_width is not None else max(6.0, fwhm, 0.3 * r0)

    p = np.array([cx, cy, r0])
    ring_seen = False
    for it in range(1, int(max_iter) + 1):
        ns = int(n_sectors) if n_sectors is not None else int(
            np.clip(round(2 * math.pi * r0 / 3.0), 24, 720))
        fit = _circle_pass(img, good, p, r0, hw, fwhm, ns, bw, min_snr, min_points, loss,
                           reject_sigma, first=it == 1)
        shift = float(np.hypot(*(fit.params[:2] - p[:2])))
        log.debug("pass %d: centre (%.4f, %.4f) r=%.4f shift %.4f px, %d points",
                  it, fit.params[0], fit.params[1], fit.params[2], shift, fit.x.size)
        p = fit.params
        # re-measure the ring about the new centre to set the next window
        try:
            ring, _, _ = _locate_ring(img, good, p[0], p[1], p[2], ring_min_snr, 3.0)
            fwhm = ring.fwhm
            ring_seen = True
        except NoRingFoundError:
            ring_seen = False
        r0 = float(p[2])
        if search_width is None:
            hw = float(max(4.0, 0.75 * fwhm, 6.0 * fit.rms))
        # re-sampling about a new centre changes which pixels fall in which
        # sector, so successive passes scatter by about the fit's own sigma
        sigma_c = math.hypot(math.sqrt(abs(fit.cov[0, 0])), math.sqrt(abs(fit.cov[1, 1])))
        if it >= 3 and shift < max(tol, 2.0 * sigma_c):
            break

    _check_fitted_centre(fit, ring_seen, ring_min_snr, img.shape)
    ellipse = _fit_ellipse(fit.x, fit.y, p, loss, reject_sigma) if fit_ellipse else None
    prof_r, prof_m = radial_profile(img, good, (p[0], p[1]), bin_width=1.0)
    sig_ = np.sqrt(np.abs(np.diag(fit.cov)))
    inl = fit.inliers
    return CenterFit(
        center_x=float(p[0]), center_y=float(p[1]), radius=float(p[2]),
        sigma_x=float(sig_[0]), sigma_y=float(sig_[1]), sigma_radius=float(sig_[2]),
        n_used=int(inl.sum()), n_rejected=int((~inl).sum()), n_skipped=fit.n_skipped,
        n_sectors=fit.n_sectors, rms_px=fit.rms,
        points=np.column_stack([fit.x[inl], fit.y[inl]]),
        rejected_points=np.column_stack([fit.x[~inl], fit.y[~inl]]),
        residuals=fit.residuals, profile_radius=prof_r, profile_mean=prof_m,
        ring_fwhm=float(fwhm), ellipse=ellipse,
        guess=(float(start[0]), float(start[1]), float(start[2])), n_iterations=it,
    )
