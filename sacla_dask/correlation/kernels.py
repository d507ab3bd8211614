"""Numpy kernels of the difference correlation: one block of pairs or rows at a time.

For a pair of normalised polar images ``A`` and ``B`` (0 in masked bins;
NaN in bins masked for that shot only, such as Bragg spots), the
difference ``D = A - B`` on the bins valid in both shots (``v = m_A m_B``)
is correlated along phi by FFT::

    C(q1, q2, dphi) = sum_phi D(q1, phi) D(q2, phi + dphi) / M(q1, q2, dphi)
    M(q1, q2, dphi) = sum_phi v(q1, phi) v(q2, phi + dphi)

``M`` is the number of valid bin pairs at that lag, so ``C`` is the mean
product over the bin pairs that exist; dividing by it removes the
panel-gap pattern. Where ``M = 0`` there is no data and ``C`` is NaN. When
every shot has the plan's mask, ``M`` is the plan's
(:class:`~sacla_dask.correlation.plan.CorrelationPlan`); when a shot
carries its own masked bins (:func:`mask_bragg_spots`), ``M`` is computed
for that pair: exact either way. Note ``C(q2, q1, dphi) = C(q1, q2,
-dphi)`` (:func:`cross_matrix`).

The FFTs run in the images' precision (float32 for the pipeline's polar
images); results are float64.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import scipy.fft

from ..errors import ParameterError

if TYPE_CHECKING:
    from .plan import CorrelationPlan

#: MAD -> standard deviation of a normal distribution
MAD_TO_SIGMA = 1.4826


def correlate_rows(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Circular correlation along the last axis: ``out[k] = sum_n a[n] b[n + k]``.

    Parameters
    ----------
    a, b : ndarray (..., nphi)
        Real arrays; ``b`` defaults to ``a`` (autocorrelation).

    Returns
    -------
    ndarray float64 (..., nphi)
    """
    n = a.shape[-1]
    fa = scipy.fft.rfft(a, axis=-1)
    fb = fa if b is None else scipy.fft.rfft(b, axis=-1)
    return scipy.fft.irfft(np.conj(fa) * fb, n=n, axis=-1)


def _difference(a: np.ndarray, b: np.ndarray,
                polar_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(D, valid, per_pair)``: the difference on bins valid in both shots.

    ``per_pair`` is True when some pair has fewer valid bins than the mask
    (a shot-specific masked bin): its normalisation must then be its own.
    """
    # in the precision of the images: float32 polar images stay float32 (a faster FFT,
    # half the memory), float64 images float64
    a, b = np.asarray(a), np.asarray(b)
    d = np.subtract(a, b, dtype=np.result_type(a.dtype, b.dtype, np.float32))
    valid = np.isfinite(d)
    if valid.all():  # the usual case: the valid bins are the mask's
        valid[...] = polar_mask
        # a multiply (finite d) is much faster than a masked copy
        np.multiply(d, valid, out=d)
        return d, valid, False
    valid &= polar_mask
    per_pair = int(np.count_nonzero(valid)) != d.shape[0] * int(np.count_nonzero(polar_mask))
    np.copyto(d, np.float32(0), where=~valid)
    return d, valid, per_pair


def _lag_products(f: np.ndarray, q1: np.ndarray | None = None,
                  q2: np.ndarray | None = None) -> np.ndarray:
    """``conj(F[q1]) F[q2]`` over the q rows (axis -2); ``|F|^2`` of every row without q1/q2."""
    if q1 is None or q2 is None:
        prod = np.conj(f)
        prod *= f
        return prod
    return np.conj(f[..., q1, :]) * f[..., q2, :]


def _lag_counts(valid: np.ndarray, nphi: int, q1: np.ndarray | None = None,
                q2: np.ndarray | None = None) -> np.ndarray:
    """Valid bin pairs at each lag (float64 integers) of the rows of ``valid`` (bool).

    Even float32 FFT round-off of these counts (<= nphi, ~1e-3) is far
    below the 0.5 that ``rint`` forgives.
    """
    fv = scipy.fft.rfft(valid.astype(np.float32), axis=-1)
    return np.rint(scipy.fft.irfft(_lag_products(fv, q1, q2), n=nphi, axis=-1)).astype(
        np.float64)


def _rows(plan: CorrelationPlan) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The plan's (q1, q2) rows, or (None, None) when it correlates each row with itself."""
    return (None, None) if plan.auto else (plan.q1, plan.q2)


def _correlate(d: np.ndarray, valid: np.ndarray, per_pair: bool,
               plan: CorrelationPlan) -> np.ndarray:
    """Mask-normalised correlation of differences (float32 FFT, float64 result)."""
    n = plan.nphi
    f = scipy.fft.rfft(d, axis=-1)  # complex64 for float32 d
    c = scipy.fft.irfft(_lag_products(f, *_rows(plan)), n=n, axis=-1)
    del f
    if per_pair:
        m = _lag_counts(valid, n, *_rows(plan))
        ok = m > 0
        inv = np.where(ok, 1.0 / np.maximum(m, 1.0), 0.0)
    else:
        ok, inv = plan.ok[None], plan.inv_norm[None]
    out = np.multiply(c, inv, dtype=np.float64)
    out[~np.broadcast_to(ok, out.shape)] = np.nan
    return out


def _stat(d: np.ndarray, valid: np.ndarray) -> np.ndarray:
    nv = np.count_nonzero(valid.reshape(valid.shape[0], -1), axis=1)
    sq = np.square(d).reshape(d.shape[0], -1).sum(axis=1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(nv > 0, sq / nv, np.nan)


def difference_correlation(a: np.ndarray, b: np.ndarray, plan: CorrelationPlan) -> np.ndarray:
    """Mask-normalised difference correlation of pairs of polar images.

    Parameters
    ----------
    a, b : ndarray (npair, nq, nphi)
        Normalised polar images of the pairs' first and second shots (0 in
        masked bins; NaN in bins masked for that shot only).
    plan : CorrelationPlan

    Returns
    -------
    ndarray float64 (npair, nqp, nphi)
        ``C(q1, q2, dphi)`` (dimensionless: products of normalised
        intensities); NaN where no valid bin pair exists at that lag.
    """
    d, valid, per_pair = _difference(a, b, plan.polar_mask)
    return _correlate(d, valid, per_pair, plan)


def difference_statistic(a: np.ndarray, b: np.ndarray, polar_mask: np.ndarray) -> np.ndarray:
    """Per-pair mean squared normalised difference over the bins valid in both shots.

    This is the statistic of :func:`robust_outliers`. By Cauchy-Schwarz a
    pair's correlation at any lag is bounded by its zero-lag values, which
    this statistic averages: a pair whose statistic is ordinary cannot
    dominate the mean correlation anywhere, and a wild shot (a hit, a
    detector glitch, a missed pulse) shows up here in both of its pairs.

    Returns
    -------
    ndarray float64 (npair,), NaN for a pair without a valid bin.
    """
    d, valid, _ = _difference(a, b, np.asarray(polar_mask, dtype=bool))
    return _stat(d, valid)


def fourier_coefficients(corr: np.ndarray) -> np.ndarray:
    """Angular Fourier coefficients of correlations along their last (dphi) axis.

    ``c_n = (1/nphi) sum_k C(dphi_k) exp(-i n dphi_k)`` for ``n = 0 ..
    nphi // 2``, so that ``C(dphi) = sum_{n=-N..N} c_n exp(i n dphi)`` with
    ``c_{-n} = conj(c_n)``. For full rows this is ``conj(D_n(q1)) D_n(q2)``
    with ``D_n = (1/nphi) sum_phi D(phi) exp(-i n phi)``: the products of the
    difference's angular Fourier components that structure determination
    uses. Autocorrelations give real coefficients. A row with a NaN (a lag
    without data) gives NaN coefficients.

    Returns
    -------
    ndarray complex128 (..., nphi // 2 + 1)
    """
    c = np.asarray(corr, dtype=np.float64)
    return scipy.fft.rfft(c, axis=-1) / c.shape[-1]


def full_lags(x: np.ndarray, nphi: int) -> np.ndarray:
    """Lags ``0 .. nphi - 1`` along the last axis from the lags ``0 .. nphi // 2`` of an
    even correlation (``C(nphi - k) = C(k)``: autocorrelations); ``x`` itself if complete.

    Parameters
    ----------
    x : ndarray (..., nphi // 2 + 1) or (..., nphi)
    nphi : int
        Azimuthal bins (lags) of the full correlation.
    """
    n = x.shape[-1]
    if n == nphi:
        return x
    if n != nphi // 2 + 1:
        raise ValueError(f"{n} lags are neither all {nphi} nor the first {nphi // 2 + 1}")
    return np.concatenate([x, x[..., nphi - n:0:-1]], axis=-1)


def cross_matrix(corr_cross: np.ndarray, q1: np.ndarray, q2: np.ndarray, nq: int) -> np.ndarray:
    """Unfold cross-correlation rows into a full ``(nq, nq, nphi)`` array.

    Uses ``C(q2, q1, dphi) = C(q1, q2, -dphi)``; entries not computed are NaN.

    Parameters
    ----------
    corr_cross : ndarray (nqp, nphi)
    q1, q2 : int arrays (nqp,)
        Row indices of each entry (``q1_index``, ``q2_index`` in a store).
    nq : int
    """
    c = np.asarray(corr_cross, dtype=np.float64)
    n = c.shape[-1]
    out = np.full((nq, nq, n), np.nan)
    neg = (-np.arange(n)) % n
    q1 = np.asarray(q1, dtype=np.int64)
    q2 = np.asarray(q2, dtype=np.int64)
    out[q2, q1] = c[:, neg]
    out[q1, q2] = c
    return out


def mask_bragg_spots(polar: np.ndarray, polar_mask: np.ndarray, nsigma: float,
                     grow: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Mask polar bins that stand out robustly above their row, and renormalise.

    A bin is a spot when ``x - median > nsigma * 1.4826 * MAD`` over its
    row's valid bins (one-sided: Bragg spots are bright); spots are grown by
    ``grow`` bins on each side along phi (their wings). A row whose MAD is 0
    is left alone (no robust spread to compare with). The remaining bins of
    each row are rescaled to mean 1, so the normalisation is the one the row
    would have had with the spots masked, and the spots are set to NaN: the
    shot-specific mask that :func:`difference_correlation` honours exactly.
    The test is scale-free, so it acts on normalised or raw rows alike.

    Parameters
    ----------
    polar : ndarray (ntag, nq, nphi)
        Normalised polar images (0 where masked).
    polar_mask : ndarray bool (nq, nphi)
    nsigma : float
        Threshold in robust standard deviations (> 0).
    grow : int
        Bins masked on each side of a spot along phi.

    Returns
    -------
    cleaned : ndarray float32 (ntag, nq, nphi)
        NaN at spots, 0 where masked, rows of mean 1 elsewhere.
    n_spots : ndarray int32 (ntag, nq)
        Bins masked as spots per row.
    """
    if not nsigma > 0:
        raise ParameterError(f"Bragg-spot threshold must be > 0 robust sigmas (got {nsigma})")
    x = np.asarray(polar, dtype=np.float64)
    pm = np.asarray(polar_mask, dtype=bool)
    valid = np.isfinite(x) & pm[None]
    xm = np.where(valid, x, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rows without a valid bin
        med = np.nanmedian(xm, axis=-1, keepdims=True)
        mad = np.nanmedian(np.abs(xm - med), axis=-1, keepdims=True)
    sigma = MAD_TO_SIGMA * mad
    with np.errstate(invalid="ignore"):
        spot = valid & (sigma > 0) & (x - med > nsigma * sigma)
    if grow > 0 and spot.any():
        g = spot.copy()
        for s in range(1, int(grow) + 1):
            g |= np.roll(spot, s, axis=-1) | np.roll(spot, -s, axis=-1)
        spot = g & valid
    keep = valid & ~spot
    cnt = keep.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(keep, x, 0.0).sum(axis=-1, keepdims=True) / cnt
        scale = np.where(np.isfinite(mean) & (mean != 0), 1.0 / mean, 0.0)
    out = np.where(keep, x * scale, 0.0).astype(np.float32)
    out[spot] = np.nan
    return out, spot.sum(axis=-1).astype(np.int32)
