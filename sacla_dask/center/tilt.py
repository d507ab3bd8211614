"""Detector tilt from the ring's ellipse, and its refinement against a ring of known q.

A powder ring is a cone of half-angle ``alpha = 2 theta`` about the beam. A
flat detector whose normal makes the angle ``tau`` with the beam, at the
perpendicular distance ``L`` (pyFAI's ``dist``, sample to PONI), cuts it in
an ellipse (the classic conic-section relations, as used by FIT2D and by
Hart et al., J. Appl. Cryst. 46 (2013) 1249):

* eccentricity ``e = sin(tau) / cos(alpha)``, i.e. ``b/a = sqrt(1 - e^2)``;
* semi-axes ``a = L sin(alpha) cos(alpha) / (cos^2 tau - sin^2 alpha)`` and
  ``b = L sin(alpha) / sqrt(cos^2 tau - sin^2 alpha)``, hence
  ``tan(alpha) = b^2 / (a L)``;
* the major axis lies along the in-plane direction ``u`` of the beam
  (seen from the detector), and measured from the PONI along ``u`` the
  direct beam hits at ``L tan(tau)``, the ellipse centre at
  ``L sin(2 tau) / (2 (cos^2 tau - sin^2 alpha))``.

So ``a``, ``b``, the major axis and the centre give ``tau``, ``alpha`` (with
the distance) and the PONI -- up to one sign: tilting by ``tau`` with the
PONI on one side of the ellipse's centre, or by ``-tau`` with it on the
other, gives the *same* ellipse. One ring cannot tell the two apart from its
shape (:func:`tilt_from_ellipse` returns both); :func:`choose_tilt_sign`
tells them apart by the ring's brightness, since the side of the ring
nearer the detector (nearer the PONI) sees each pixel under a larger solid
angle (``cos(incidence) / |P|^2``).

:func:`refine_tilt` then adjusts ``(distance, PONI x, y, rot1, rot2)`` so
that every peak point of the ring has the 2-theta of a given q under the
full geometry (:mod:`sacla_dask.lab`), by :func:`scipy.optimize.least_squares`.

Lengths are pixels unless named metres; rotations are pyFAI's, radians,
``rot3 = 0``; ``x`` the fast (column) axis, ``y`` the slow (row) axis.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import scipy.optimize as opt

from ..errors import GeometryError, NoRingFoundError, ParameterError
from ..lab import rotation_matrix

__all__ = ["TiltEstimate", "TiltRefinement", "choose_tilt_sign", "ring_two_theta",
           "refine_tilt", "tilt_from_ellipse"]


@dataclasses.dataclass(frozen=True)
class TiltEstimate:
    """A detector tilt implied by a ring's ellipse (one of the two mirror solutions).

    Attributes
    ----------
    rot1, rot2 : float
        pyFAI's rotations, radians (``rot3 = 0``).
    center_x, center_y : float
        The PONI, pixels.
    distance : float
        Sample-PONI distance, metres.
    tilt : float
        Angle between the detector normal and the beam, radians (>= 0).
    direction : float
        Direction (from +x toward +y, radians) in which the direct beam lies
        from the PONI; the tilt axis is perpendicular to it, in the plane.
    two_theta : float
        The ring's scattering angle these imply, radians.
    beam_x, beam_y : float
        Where the direct beam hits, pixels.
    """

    rot1: float
    rot2: float
    center_x: float
    center_y: float
    distance: float
    tilt: float
    direction: float
    two_theta: float
    beam_x: float
    beam_y: float

    @property
    def axis_angle(self) -> float:
        """Direction of the tilt axis in the detector plane, degrees in [0, 180)."""
        return math.degrees(self.direction + math.pi / 2) % 180.0


def _rotations_towards(tau: float, ux: float, uy: float) -> tuple[float, float]:
    """pyFAI (rot1, rot2), rot3 = 0, whose beam seen from the detector is tilted by
    ``tau`` toward the pixel direction ``(ux, uy)``.

    With ``R = R2 R1`` the beam ``(0, 0, 1)`` in detector coordinates
    ``(p1 = y, p2 = x, normal)`` is ``R[2, :] = (sin rot2, -cos rot2 sin rot1,
    cos rot1 cos rot2)``.
    """
    d1 = math.sin(tau) * uy
    d2 = math.sin(tau) * ux
    rot2 = math.asin(d1)
    rot1 = math.asin(-d2 / math.cos(rot2))
    return rot1, rot2


def tilt_from_ellipse(center: tuple[float, float], semi_major: float, semi_minor: float,
                      angle: float, pixel_size: float, distance: float | None = None,
                      two_theta: float | None = None) -> tuple[TiltEstimate, TiltEstimate]:
    """The two detector tilts (mirror images) that cut a powder cone in this ellipse.

    Parameters
    ----------
    center : (x, y)
        Ellipse centre, pixels.
    semi_major, semi_minor : float
        Semi-axes ``a >= b``, pixels.
    angle : float
        Direction of the major axis, radians from +x toward +y.
    pixel_size : float
        Metres.
    distance : float, optional
        Sample-PONI distance in metres (pyFAI's ``dist``); with it the ring's
        2-theta follows from ``tan(2 theta) = b^2 / (a L)``.
    two_theta : float, optional
        The ring's 2-theta in radians; with it (and no distance) the distance
        follows from the same relation. One of the two must be given.

    Returns
    -------
    (TiltEstimate, TiltEstimate)
        The solution whose beam lies from the PONI along ``+u`` (the major
        axis direction ``angle``), then its mirror (along ``-u``). For a
        circle both are the untilted detector centred on it.
    """
    a, b = float(semi_major), float(semi_minor)
    if not (math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0):
        raise ParameterError(f"semi-axes must be positive (got {semi_major!r}, {semi_minor!r})")
    if b > a:
        a, b, angle = b, a, angle + math.pi / 2
    p = float(pixel_size)
    am, bm = a * p, b * p
    if distance is not None:
        L = float(distance)
        alpha = math.atan(bm * bm / (am * L))
    elif two_theta is not None:
        alpha = float(two_theta)
        L = bm * bm / (am * math.tan(alpha))
    else:
        raise ParameterError("tilt_from_ellipse needs the distance or the ring's 2-theta")
    e = math.sqrt(max(0.0, 1.0 - (b / a) ** 2))
    s = e * math.cos(alpha)
    if s >= 1.0:
        raise GeometryError(f"an ellipse of b/a = {b / a:.4f} needs a tilt beyond 90 degrees")
    tau = math.asin(s)
    ux, uy = math.cos(angle), math.sin(angle)
    off_centre = L * math.sin(2 * tau) / (2 * (math.cos(tau) ** 2 - math.sin(alpha) ** 2)) / p
    off_beam = L * math.tan(tau) / p
    out = []
    for sign in (1.0, -1.0):
        rot1, rot2 = _rotations_towards(tau, sign * ux, sign * uy)
        px = center[0] - sign * off_centre * ux
        py = center[1] - sign * off_centre * uy
        direction = math.atan2(sign * uy, sign * ux)
        out.append(TiltEstimate(rot1=rot1, rot2=rot2, center_x=px, center_y=py, distance=L,
                                tilt=tau, direction=direction, two_theta=alpha,
                                beam_x=px + sign * off_beam * ux,
                                beam_y=py + sign * off_beam * uy))
    return out[0], out[1]


# -- the full geometry at pixel points ---------------------------------------------------
def _lab(params: np.ndarray, x: np.ndarray, y: np.ndarray, pixel_size: float) -> np.ndarray:
    """Lab positions (N, 3), metres, of pixel points under (L, cx, cy, rot1, rot2)."""
    L, cx, cy, r1, r2 = params
    rot = rotation_matrix(r1, r2, 0.0)
    d = np.stack([(y - cy) * pixel_size, (x - cx) * pixel_size, np.full(x.shape, L)], axis=1)
    return np.asarray(d @ rot.T)


def _two_theta(params: np.ndarray, x: np.ndarray, y: np.ndarray,
               pixel_size: float) -> np.ndarray:
    t = _lab(params, x, y, pixel_size)
    return np.asarray(np.arctan2(np.hypot(t[:, 0], t[:, 1]), t[:, 2]))


def _solid_angle(params: np.ndarray, x: np.ndarray, y: np.ndarray,
                 pixel_size: float) -> np.ndarray:
    """Relative solid angle of pixels, ``L / |P|^3`` (``cos(incidence) / |P|^2``)."""
    t = _lab(params, x, y, pixel_size)
    return np.asarray(params[0] / np.linalg.norm(t, axis=1) ** 3)


def ring_two_theta(q: float, wavelength: float) -> float:
    """``2 arcsin(q lambda / 4 pi)``, radians (q in 1/A, lambda in A); GeometryError if
    unreachable."""
    s = float(q) * float(wavelength) / (4 * math.pi)
    if not (math.isfinite(s) and 0 < s < 1):
        raise GeometryError(f"q = {q:g} 1/A is not reachable at wavelength {wavelength:g} A "
                            f"(q must lie in 0 .. {4 * math.pi / wavelength:.4g} 1/A)")
    return 2 * math.asin(s)


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    ny, nx = image.shape
    x0 = np.clip(np.floor(x).astype(int), 0, nx - 2)
    y0 = np.clip(np.floor(y).astype(int), 0, ny - 2)
    fx, fy = np.clip(x - x0, 0, 1), np.clip(y - y0, 0, 1)
    return np.asarray(image[y0, x0] * (1 - fx) * (1 - fy) + image[y0, x0 + 1] * fx * (1 - fy)
                       + image[y0 + 1, x0] * (1 - fx) * fy + image[y0 + 1, x0 + 1] * fx * fy)


def choose_tilt_sign(candidates: tuple[TiltEstimate, TiltEstimate], image: np.ndarray,
                     points: np.ndarray, pixel_size: float) -> tuple[int, float]:
    """Which of the two mirror tilts the ring's brightness favours, and how strongly.

    The peak height at each ring point is regressed on the difference of the
    two candidates' relative solid angles (their first harmonics along the
    ring have opposite signs). Returns ``(index, t)``: the candidate whose
    nearer side is the brighter, and the absolute t statistic of the slope
    (about 0 when the brightness does not tell; ``t < 3`` is not conclusive).
    """
    x, y = points[:, 0], points[:, 1]
    h = _bilinear(np.nan_to_num(np.asarray(image, float)), x, y)
    omega = [_solid_angle(np.array([c.distance, c.center_x, c.center_y, c.rot1, c.rot2]),
                          x, y, pixel_size) for c in candidates]
    d = omega[0] - omega[1]
    d = (d - d.mean()) / (d.std() or 1.0)
    hc = h - h.mean()
    n = h.size
    slope = float(d @ hc) / n
    resid = hc - slope * d
    se = math.sqrt(float(resid @ resid) / max(n - 2, 1) / n) or 1e-300
    t = slope / se
    return (0 if t >= 0 else 1), abs(t)


# -- refinement against a ring of known q -------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TiltRefinement:
    """Result of :func:`refine_tilt`.

    Attributes
    ----------
    distance : float
        Metres.
    center_x, center_y : float
        The PONI, pixels.
    rot1, rot2 : float
        Radians (``rot3 = 0``).
    sigma : dict
        1-sigma standard errors of the five (metres, pixels, radians), from
        the Jacobian at the solution scaled by the residual variance.
    rms_px : float
        RMS residual of the ring points, pixels (2-theta residual times the
        local ``d r / d(2 theta) = L / (pixel cos^2 2 theta)``).
    n_points : int
    two_theta : float
        The ring's 2-theta, radians.
    """

    distance: float
    center_x: float
    center_y: float
    rot1: float
    rot2: float
    sigma: dict[str, float]
    rms_px: float
    n_points: int
    two_theta: float

    @property
    def tilt(self) -> float:
        """Angle between the detector normal and the beam, radians."""
        return math.acos(max(-1.0, min(1.0, math.cos(self.rot1) * math.cos(self.rot2))))


_NAMES = ("distance", "center_x", "center_y", "rot1", "rot2")


def refine_tilt(points: np.ndarray, start: TiltEstimate, two_theta: float,
                pixel_size: float) -> TiltRefinement:
    """Least-squares (distance, PONI, rot1, rot2) putting every ring point at ``two_theta``.

    Parameters
    ----------
    points : (N, 2)
        The ring's peak points ``(x, y)``, pixels (N >= 8).
    start : TiltEstimate
        Starting geometry (e.g. :func:`tilt_from_ellipse`'s).
    two_theta : float
        The ring's known scattering angle, radians.
    pixel_size : float
        Metres.

    Raises
    ------
    NoRingFoundError
        With fewer than 8 points.
    GeometryError
        If the fit does not converge to a detector facing the sample.
    """
    pts = np.asarray(points, float)
    if pts.ndim != 2 or pts.shape[0] < 8:
        raise NoRingFoundError(f"refining the tilt needs at least 8 ring peak points (got "
                               f"{0 if pts.ndim != 2 else pts.shape[0]})")
    x, y = pts[:, 0], pts[:, 1]
    scale = start.distance / (pixel_size * math.cos(two_theta) ** 2)  # px per radian of 2theta
    p0 = np.array([start.distance, start.center_x, start.center_y, start.rot1, start.rot2])
    # work in comparable units: distance in pixels, rotations in pixels at the distance
    unit = np.array([pixel_size, 1.0, 1.0, pixel_size / start.distance,
                     pixel_size / start.distance])

    def resid(u: np.ndarray) -> np.ndarray:
        return (_two_theta(u * unit, x, y, pixel_size) - two_theta) * scale

    sol = opt.least_squares(resid, p0 / unit, method="lm", x_scale=1.0)
    par = sol.x * unit
    if not (np.all(np.isfinite(par)) and par[0] > 0 and abs(par[3]) < 1.2
            and abs(par[4]) < 1.2):
        raise GeometryError(f"the tilt refinement did not converge ({sol.message}); "
                            f"parameters {dict(zip(_NAMES, par.tolist(), strict=True))}")
    r = sol.fun
    n = r.size
    dof = max(n - 5, 1)
    s2 = float(r @ r) / dof
    try:
        cov = np.linalg.inv(sol.jac.T @ sol.jac) * s2
        sig = np.sqrt(np.abs(np.diag(cov))) * unit
    except np.linalg.LinAlgError:
        sig = np.full(5, np.inf)
    return TiltRefinement(distance=float(par[0]), center_x=float(par[1]),
                          center_y=float(par[2]), rot1=float(par[3]), rot2=float(par[4]),
                          sigma={k: float(v) for k, v in zip(_NAMES, sig, strict=True)},
                          rms_px=float(np.sqrt(np.mean(r**2))), n_points=int(n),
                          two_theta=float(two_theta))
