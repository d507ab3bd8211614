"""Numpy kernels: the Ewald mapping dphi <-> psi, resampling one row, the Legendre fit.

Geometry (beam along +z, the detector's azimuth ``phi`` from +x toward +y):
a scattering vector of magnitude ``q`` at Bragg angle ``theta`` (``q = 4 pi
sin(theta) / lambda``) seen at azimuth ``phi`` points along::

    q_hat = (cos(theta) cos(phi), cos(theta) sin(phi), -sin(theta))

so two of them, at Bragg angles ``theta1``, ``theta2`` and an azimuth
difference ``dphi`` on the detector, make the 3-D angle ``psi`` with::

    cos(psi) = sin(theta1) sin(theta2) + cos(theta1) cos(theta2) cos(dphi)

(for one q, ``cos(psi) = sin^2(theta) + cos^2(theta) cos(dphi)``). As
``dphi`` runs over ``[0, pi]``, ``psi`` runs monotonically over
``[|theta1 - theta2|, pi - theta1 - theta2]``: angles outside that range are
never seen on the detector (the Ewald sphere's curvature).

Every function here is a pure function of numpy arrays (no xarray, no
store); angles in radians.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from numpy.polynomial import legendre as npleg

from ..errors import ParameterError

__all__ = [
    "LegendreFit",
    "bragg_angle",
    "cos_psi",
    "dphi_of_psi",
    "fit_legendre",
    "fold_halves",
    "legendre_design",
    "legendre_sum",
    "psi_of_dphi",
    "psi_range",
    "resample_row",
    "variance_inflation",
]


def bragg_angle(q: float | np.ndarray, wavelength: float) -> np.ndarray:
    """Bragg angle ``theta`` (half the scattering angle) in radians.

    Parameters
    ----------
    q : float or array
        Momentum transfer in inverse Angstrom, ``q = 4 pi sin(theta) / lambda``.
    wavelength : float
        Wavelength in Angstrom.

    Returns
    -------
    ndarray
        ``arcsin(q lambda / 4 pi)`` in radians.

    Raises
    ------
    ParameterError
        If the wavelength is not positive, or a q is beyond backscattering
        (``q lambda / 4 pi > 1``) or negative.
    """
    lam = float(wavelength)
    if not (math.isfinite(lam) and lam > 0):
        raise ParameterError(f"wavelength must be positive and finite, in Angstrom "
                             f"(got {wavelength!r})")
    s = np.asarray(q, dtype=float) * lam / (4 * math.pi)
    if np.any(~np.isfinite(s)) or np.any(s < 0) or np.any(s > 1):
        raise ParameterError(f"q must lie in 0..{4 * math.pi / lam:.4g} 1/A at wavelength "
                             f"{lam} A (got {q!r})")
    return np.arcsin(s)


def cos_psi(dphi: np.ndarray | float, theta1: float, theta2: float | None = None) -> np.ndarray:
    """``cos(psi)`` of two scattering vectors ``dphi`` apart on the detector.

    Parameters
    ----------
    dphi : array
        Azimuth difference on the detector, radians.
    theta1, theta2 : float
        Bragg angles of the two vectors, radians (``theta2`` defaults to
        ``theta1``: the same q).

    Returns
    -------
    ndarray
        ``sin(theta1) sin(theta2) + cos(theta1) cos(theta2) cos(dphi)``,
        clipped to [-1, 1].
    """
    t2 = theta1 if theta2 is None else theta2
    c = (math.sin(theta1) * math.sin(t2)
         + math.cos(theta1) * math.cos(t2) * np.cos(np.asarray(dphi, dtype=float)))
    return np.clip(c, -1.0, 1.0)


def psi_of_dphi(dphi: np.ndarray | float, theta1: float,
                theta2: float | None = None) -> np.ndarray:
    """The 3-D angle ``psi`` (radians, 0..pi) between two vectors ``dphi`` apart.

    See :func:`cos_psi`; ``psi`` depends on ``dphi`` only through
    ``cos(dphi)`` (``dphi`` and ``2 pi - dphi`` give the same ``psi``).
    """
    return np.arccos(cos_psi(dphi, theta1, theta2))


def psi_range(theta1: float, theta2: float | None = None) -> tuple[float, float]:
    """The ``psi`` reached on the detector: ``(|theta1 - theta2|, pi - theta1 - theta2)``."""
    t2 = theta1 if theta2 is None else theta2
    return abs(theta1 - t2), math.pi - theta1 - t2


def dphi_of_psi(psi: np.ndarray | float, theta1: float,
                theta2: float | None = None) -> np.ndarray:
    """The detector azimuth difference (radians, 0..pi) at which ``psi`` is seen.

    Inverse of :func:`psi_of_dphi` on ``dphi`` in ``[0, pi]``; NaN where
    ``psi`` lies outside :func:`psi_range` (not reached on the detector).
    """
    t2 = theta1 if theta2 is None else theta2
    s12 = math.sin(theta1) * math.sin(t2)
    c12 = math.cos(theta1) * math.cos(t2)
    p = np.asarray(psi, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        x = (np.cos(p) - s12) / c12
    lo, hi = psi_range(theta1, t2)
    eps = 1e-12
    ok = (p >= lo - eps) & (p <= hi + eps)
    return np.where(ok, np.arccos(np.clip(x, -1.0, 1.0)), np.nan)


def fold_halves(values: np.ndarray, sem: np.ndarray | None = None,
                count: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Average a row over ``dphi`` and ``2 pi - dphi``: lags ``0 .. nphi // 2``.

    For an ensemble of randomly oriented particles the correlation depends
    on ``dphi`` only through ``psi``, i.e. through ``cos(dphi)``, so the two
    halves of a cross-correlation ``C(q1, q2, dphi)`` estimate the same
    thing. They are averaged where both are finite (else the finite one is
    kept), their standard errors combined as independent,
    ``sqrt(s1^2 + s2^2) / 2`` (true for noise-dominated differences, where
    ``D(q1, phi) D(q2, phi + dphi)`` and ``D(q1, phi) D(q2, phi - dphi)``
    share no bin; optimistic by up to ``sqrt(2)`` when a shot-to-shot signal
    dominates), and the count is the smaller of the two. (An
    autocorrelation is exactly symmetric, ``C(dphi) = C(-dphi)``: take its
    first half instead; averaging would halve nothing.)

    Parameters
    ----------
    values, sem, count : array (..., nphi)
        A row (or rows) on the lags ``dphi_k = 2 pi k / nphi``.

    Returns
    -------
    values, sem, count : array (..., nphi // 2 + 1)
        On the lags ``k = 0 .. nphi // 2``.
    """
    v = np.asarray(values, dtype=float)
    nphi = v.shape[-1]
    k = np.arange(nphi // 2 + 1)
    mirror = (-k) % nphi
    a, b = v[..., k], v[..., mirror]
    fa, fb = np.isfinite(a), np.isfinite(b)
    both = fa & fb
    with np.errstate(invalid="ignore"):
        out = np.where(both, 0.5 * (a + b), np.where(fa, a, b))
    s_out = None
    if sem is not None:
        s = np.asarray(sem, dtype=float)
        sa, sb = s[..., k], s[..., mirror]
        with np.errstate(invalid="ignore"):
            s_out = np.where(both, 0.5 * np.hypot(sa, sb), np.where(fa, sa, sb))
        same = k == mirror  # dphi = 0 and pi: one bin, not two
        s_out[..., same] = sa[..., same]
    n_out = None
    if count is not None:
        n = np.asarray(count)
        na, nb = n[..., k], n[..., mirror]
        n_out = np.where(both, np.minimum(na, nb), np.where(fa, na, nb))
    return out, s_out, n_out


def resample_row(values: np.ndarray, dphi: np.ndarray, psi: np.ndarray, theta1: float,
                 theta2: float | None = None, sem: np.ndarray | None = None,
                 count: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Resample one correlation row from the detector's ``dphi`` onto ``psi``.

    Each ``psi`` is mapped back to the ``dphi`` (in ``[0, pi]``) where the
    detector sees it (:func:`dphi_of_psi`, the Ewald curvature undone) and
    the row is interpolated linearly there.

    Parameters
    ----------
    values : array (n,)
        The correlation on the lags ``dphi`` (one half, ``0 .. pi``,
        increasing: see :func:`fold_halves`).
    dphi : array (n,)
        Its lags, radians, increasing.
    psi : array (m,)
        Where to resample, radians in ``[0, pi]``.
    theta1, theta2 : float
        Bragg angles of the two q, radians.
    sem, count : array (n,), optional
        Standard error and pair count of ``values``: the standard error is
        interpolated linearly too (an upper bound: it takes the two
        neighbouring lags as fully correlated), the count is the smaller of
        the two neighbours'.

    Returns
    -------
    values, sem, count : array (m,)
        NaN (count 0) where ``psi`` is not reached on the detector, or
        beyond the lags given, or where a neighbouring lag is NaN.
    """
    v = np.asarray(values, dtype=float)
    d = np.asarray(dphi, dtype=float)
    if v.shape != d.shape or v.ndim != 1:
        raise ParameterError(f"values {v.shape} and dphi {d.shape} must be 1-D of one length")
    if d.size < 2 or np.any(np.diff(d) <= 0):
        raise ParameterError("dphi must hold at least 2 increasing lags")
    x = dphi_of_psi(psi, theta1, theta2)
    ok = np.isfinite(x) & (x >= d[0] - 1e-12) & (x <= d[-1] + 1e-12)
    xi = np.clip(np.where(ok, x, d[0]), d[0], d[-1])
    j = np.clip(np.searchsorted(d, xi, side="right") - 1, 0, d.size - 2)
    w = (xi - d[j]) / (d[j + 1] - d[j])
    w = np.clip(w, 0.0, 1.0)

    def interp(a: np.ndarray) -> np.ndarray:
        lo, hi = a[j], a[j + 1]
        # a weight of exactly 0 or 1 does not need the other neighbour
        with np.errstate(invalid="ignore"):
            out = np.where(w == 0, lo, np.where(w == 1, hi, (1 - w) * lo + w * hi))
        return np.where(ok, out, np.nan)

    out = interp(v)
    s_out = None if sem is None else interp(np.asarray(sem, dtype=float))
    n_out = None
    if count is not None:
        n = np.asarray(count)
        lo_n, hi_n = n[j], n[j + 1]
        n_out = np.where(w == 0, lo_n, np.where(w == 1, hi_n, np.minimum(lo_n, hi_n)))
        n_out = np.where(ok & np.isfinite(out), n_out, 0).astype(n.dtype)
    if s_out is not None:
        s_out = np.where(np.isfinite(out), s_out, np.nan)
    return out, s_out, n_out


def legendre_design(cospsi: np.ndarray, ls: np.ndarray | list[int]) -> np.ndarray:
    """The design matrix ``A[k, j] = P_{l_j}(cos psi_k)``.

    Parameters
    ----------
    cospsi : array (n,)
        ``cos(psi)`` of the samples, in [-1, 1].
    ls : sequence of int (m,)
        Legendre orders, >= 0.

    Returns
    -------
    ndarray (n, m)
    """
    x = np.asarray(cospsi, dtype=float)
    orders = np.asarray(ls, dtype=int)
    if orders.size and orders.min() < 0:
        raise ParameterError(f"Legendre orders must be >= 0 (got {orders.min()})")
    if orders.size == 0:
        return np.zeros((x.size, 0))
    return npleg.legvander(x, int(orders.max()))[:, orders]


def legendre_sum(coef: np.ndarray, ls: np.ndarray | list[int], cospsi: np.ndarray,
                 offset: float = 0.0) -> np.ndarray:
    """``offset + sum_j coef_j P_{l_j}(cos psi)`` (NaN coefficients count as 0)."""
    c = np.nan_to_num(np.asarray(coef, dtype=float), nan=0.0)
    return offset + legendre_design(cospsi, ls) @ c


def variance_inflation(design: np.ndarray, weights: np.ndarray, cov: np.ndarray,
                       constant: int | None = 0) -> np.ndarray:
    """Variance inflation factor of each fitted coefficient.

    ``VIF_j = Var(b_j) / Var_orth(b_j) = 1 / (1 - R_j^2)``: the variance of
    coefficient ``j`` in the fit over its variance if its column were
    orthogonal to all the others, ``R_j^2`` being the (weighted) fraction of
    column ``j`` explained by the other columns. 1 for an orthogonal design;
    large where the sampled range cannot tell ``P_l`` from a combination of
    the other polynomials (too short a ``psi`` coverage).

    Parameters
    ----------
    design : array (n, m)
        The design matrix.
    weights : array (n,)
        Sample weights (``1 / sigma^2``).
    cov : array (m, m)
        ``(A^T W A)^-1``.
    constant : int, optional
        Index of the constant column: the other columns are centred
        (weighted mean removed), the usual VIF of a regression with an
        intercept; its own VIF is NaN. None: no constant, uncentred.

    Returns
    -------
    ndarray (m,)
    """
    a = np.asarray(design, dtype=float)
    w = np.asarray(weights, dtype=float)
    if constant is not None:
        mean = (w @ a) / w.sum()
        a = a - mean
    ss = w @ (a * a)
    out = np.diag(cov) * ss
    if constant is not None:
        out[constant] = np.nan
    return out


@dataclasses.dataclass(frozen=True)
class LegendreFit:
    """A weighted least-squares Legendre fit of one correlation row.

    Attributes
    ----------
    ls : ndarray of int (m,)
        The orders fitted.
    coef, err : ndarray (m,)
        Coefficients and standard errors (same unit as the data).
    cov : ndarray (m, m)
        Their covariance, ``(A^T W A)^-1`` with ``W = 1 / sigma^2``.
    vif : ndarray (m,)
        Variance inflation factors (:func:`variance_inflation`).
    chi2 : float
        ``sum ((y - A b) / sigma)^2``.
    dof : int
        Samples minus coefficients.
    n : int
        Samples used.
    """

    ls: np.ndarray
    coef: np.ndarray
    err: np.ndarray
    cov: np.ndarray
    vif: np.ndarray
    chi2: float
    dof: int
    n: int

    @property
    def reduced_chi2(self) -> float:
        """``chi2 / dof`` (NaN when ``dof`` is 0): about 1 when the errors are right."""
        return self.chi2 / self.dof if self.dof > 0 else math.nan


def fit_legendre(y: np.ndarray, sigma: np.ndarray | None, cospsi: np.ndarray,
                 ls: np.ndarray | list[int], constant: int | None = 0) -> LegendreFit:
    """Weighted least squares ``y_k ~ sum_j b_j P_{l_j}(cos psi_k)``.

    Samples with a non-finite ``y``, ``sigma`` or ``cospsi``, or
    ``sigma <= 0``, are left out. Solved by SVD of the weighted design
    (stable where the coverage makes it ill-conditioned; the VIF says so).

    Parameters
    ----------
    y : array (n,)
        The data (a correlation row on its ``psi`` samples).
    sigma : array (n,), optional
        Standard errors of ``y`` (weights ``1 / sigma^2``); None:
        unweighted, errors from the residual scatter.
    cospsi : array (n,)
        ``cos(psi)`` of each sample.
    ls : sequence of int (m,)
        The orders to fit (include 0 for a free constant).
    constant : int, optional
        Index in ``ls`` of the constant column (for the VIF), None if none.

    Returns
    -------
    LegendreFit

    Raises
    ------
    ParameterError
        If fewer usable samples than coefficients remain.
    """
    yv = np.asarray(y, dtype=float)
    x = np.asarray(cospsi, dtype=float)
    s = np.ones_like(yv) if sigma is None else np.asarray(sigma, dtype=float)
    good = np.isfinite(yv) & np.isfinite(x) & np.isfinite(s) & (s > 0)
    orders = np.asarray(ls, dtype=int)
    m = orders.size
    n = int(good.sum())
    if n < m:
        raise ParameterError(f"{n} usable psi samples cannot determine {m} Legendre "
                             f"coefficients (l = {orders.min()}..{orders.max()}): lower lmax")
    a = legendre_design(x[good], orders)
    w = 1.0 / s[good] ** 2
    sw = np.sqrt(w)
    aw = a * sw[:, None]
    u, sv, vt = np.linalg.svd(aw, full_matrices=False)
    tiny = sv.max() * max(aw.shape) * np.finfo(float).eps if sv.size else 0.0
    inv = np.where(sv > tiny, 1.0 / np.where(sv > tiny, sv, 1.0), 0.0)
    coef = vt.T @ (inv * (u.T @ (yv[good] * sw)))
    cov = (vt.T * inv**2) @ vt
    resid = (yv[good] - a @ coef) * sw
    chi2 = float(resid @ resid)
    dof = n - m
    if sigma is None:  # errors from the scatter
        cov = cov * (chi2 / dof if dof > 0 else math.nan)
    vif = variance_inflation(a, w, cov if sigma is not None else (vt.T * inv**2) @ vt,
                             constant)
    if np.any(sv <= tiny):  # a combination the samples cannot see at all
        vif = np.where(np.isnan(vif), vif, np.inf)
    err = np.sqrt(np.diag(cov))
    return LegendreFit(ls=orders, coef=coef, err=err, cov=cov, vif=vif, chi2=chi2, dof=dof,
                       n=n)
