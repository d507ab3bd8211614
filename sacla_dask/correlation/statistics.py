"""Difference angular correlations along phi and their statistics over pairs.

This module owns the correlation maths. For a pair of normalised polar
images ``A`` and ``B`` (0 in masked bins; NaN in bins masked for that shot
only, such as Bragg spots), the difference ``D = A - B`` on the bins valid
in both shots (``v = m_A m_B``) is correlated along phi by FFT::

    C(q1, q2, dphi) = sum_phi D(q1, phi) D(q2, phi + dphi) / M(q1, q2, dphi)
    M(q1, q2, dphi) = sum_phi v(q1, phi) v(q2, phi + dphi)

``M`` is the number of valid bin pairs at that lag, so ``C`` is the mean
product over the bin pairs that exist; dividing by it removes the
panel-gap pattern. Where ``M = 0`` there is no data and ``C`` is NaN. When
every shot has the plan's mask, ``M`` is precomputed once
(:func:`make_plan`); when a shot carries its own masked bins
(:func:`mask_bragg_spots`), ``M`` is computed for that pair: exact either
way. The autocorrelation (``q1 == q2``) of every q row is always computed
(the first ``nq`` rows of a plan); cross pairs of rows are optional. Note
``C(q2, q1, dphi) = C(q1, q2, -dphi)`` (:func:`cross_matrix`).

Statistics over pairs are sums (:class:`PairSums`: number of pairs, per-bin
sum, sum of squares and count, optional Poisson-bootstrap sums) that merge
by ``+`` and remove pairs by ``-``; :func:`finalize` turns them into the
mean, standard error, count and bootstrap percentile interval per bin.
Overlapping consecutive pairs share shots, so their correlations are
correlated: pairs are summed in :func:`pair_order`, the product of each
pair's correlation with that of the pair before it when they share a shot
(:func:`pair_links`) is summed too, and the standard error is that of a
1-dependent sequence; the bootstrap draws such pairs in blocks
(:func:`bootstrap_blocks`).
:func:`robust_outliers` rejects pairs whose difference statistic (the mean
squared normalised difference) stands out robustly.

:func:`summarize_pairs` is the eager numpy reference; :func:`pair_statistics`
is the Dask wrapper: pairs are grouped by the tag chunk of their later shot
(one task per chunk; of an earlier chunk, only the rows of the group's shots
there are moved, so a pair straddling two chunks is computed like any
other), each group task returns its partial sums, which are folded in chunk
order into one running sum: memory does not grow with the number of pairs.
The kernel (:func:`pair_sums`) correlates in the images' precision (float32
for the pipeline's polar images) and sums in float64, a pair at a time in
cache-sized blocks of rows. Outlier rejection needs the
statistic of every pair before it knows which pairs to drop; rather than
reading the data twice, the sums over *all* pairs are accumulated in the one
pass, the (few) rejected pairs are recomputed afterwards and subtracted
(float64; see :func:`pair_statistics`).
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Callable, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import scipy.fft
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph
from dask.sizeof import sizeof

from ..errors import ParameterError, SaclaDaskError
from ..scheduling import chunk_first

#: bytes of a float64 block of correlation rows processed at once: small enough to
#: stay in the CPU cache
BLOCK_BYTES = 2 * 2**20
#: bytes of partial sums a fold step takes at once (the running sum and at least one more):
#: a wide band's 55 MB sums are folded one at a time (1000 wide tags, 2 workers: peak RSS
#: 867-906 MiB, against 930-949 three at a time, at the same speed)
MERGE_BYTES = 128 * 2**20
#: MAD -> standard deviation of a normal distribution
MAD_TO_SIGMA = 1.4826
#: with outlier rejection, pairs whose difference statistic exceeds this (normalised
#: units: ordinary pairs are of order 1e-3..1) are held out of the partial sums
HOLD_OUT_STAT = 100.0
#: at most this many held-out pairs per group task (beyond, they are summed)
HOLD_OUT_MAX = 16
#: bytes of polar rows read back at once to recompute rejected pairs (and the products
#: of the linked pairs around them)
CORRECT_BYTES = 256 * 2**20
#: linked pairs (overlapping consecutive pairs) are bootstrapped in blocks of this many
#: (:func:`bootstrap_blocks`)
BOOT_BLOCK = 10


# -- plan ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class CorrelationPlan:
    """Small state shipped once to the workers: correlated rows and mask normalisation.

    Attributes
    ----------
    q1, q2 : ndarray int (nqp,)
        Row indices of each correlated pair of rows. The first ``nq`` rows
        are the autocorrelations ``(q, q)`` for ``q = 0 .. nq-1``; the
        others (if any) the requested cross pairs.
    mask_norm : ndarray float32 (nqp, nphi)
        Correlation ``M`` of the polar mask: valid bin pairs at each lag
        (integer counts, exact in float32 up to 2**24).
    ok : ndarray bool (nqp, nphi)
        ``M > 0`` (derived when first used, not pickled).
    inv_norm : ndarray float64 (nqp, nphi)
        ``1 / M`` where ``M > 0``, 0 where no bin pair exists (derived when
        first used, not pickled).
    lag_ok, lag_inv_norm : ndarray (nqp, nlag)
        The same over the lags the pair sums hold (:attr:`nlag`): all that
        a pipeline worker derives (for a wide band's autocorrelations 31 MB
        instead of 62).
    polar_mask : ndarray bool (nq, nphi)
        True = good bin.
    nphi : int
    """

    q1: np.ndarray
    q2: np.ndarray
    mask_norm: np.ndarray
    polar_mask: np.ndarray
    nphi: int

    #: derived arrays, cached in the instance (never pickled)
    _DERIVED = ("ok", "inv_norm", "lag_ok", "lag_inv_norm")

    @staticmethod
    def _inverse(mask_norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ok = mask_norm > 0
        with np.errstate(divide="ignore"):
            return ok, np.where(ok, 1.0 / mask_norm.astype(np.float64), 0.0)

    def _derived(self, name: str) -> np.ndarray:
        if name not in self.__dict__:
            full = name in ("ok", "inv_norm")
            ok, inv = self._inverse(self.mask_norm if full else
                                    self.mask_norm[:, :self.nlag])
            pre = "" if full else "lag_"
            self.__dict__[pre + "ok"], self.__dict__[pre + "inv_norm"] = ok, inv
        return self.__dict__[name]

    @property
    def ok(self) -> np.ndarray:
        """Lags with valid bin pairs (``mask_norm > 0``), (nqp, nphi)."""
        return self._derived("ok")

    @property
    def inv_norm(self) -> np.ndarray:
        """``1 / mask_norm`` where it is positive, 0 where there is no data (float64)."""
        return self._derived("inv_norm")

    @property
    def lag_ok(self) -> np.ndarray:
        """:attr:`ok` over the lags ``0 .. nlag - 1`` the pair sums hold."""
        return self._derived("lag_ok")

    @property
    def lag_inv_norm(self) -> np.ndarray:
        """:attr:`inv_norm` over the lags ``0 .. nlag - 1`` the pair sums hold."""
        return self._derived("lag_inv_norm")

    def __getstate__(self) -> dict[str, Any]:
        # the derived arrays are recomputed where the plan lands, and only those used (a
        # wide band's inverse is 55 MB per worker not shipped). One copy of the dict (C,
        # under the GIL) first: a worker may pickle the plan to send it on while a task
        # adds a derived array on another thread
        state = dict(self.__dict__)
        for k in self._DERIVED:
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def nq(self) -> int:
        return int(self.polar_mask.shape[0])

    @property
    def nqp(self) -> int:
        return int(self.q1.size)

    @property
    def n_cross(self) -> int:
        """Number of cross rows after the ``nq`` autocorrelation rows."""
        return self.nqp - self.nq

    @property
    def auto(self) -> bool:
        """True when only autocorrelations are computed."""
        return self.n_cross == 0

    @property
    def nlag(self) -> int:
        """Lags the pair sums hold: ``0 .. nphi // 2`` when only autocorrelations are
        computed (the circular autocorrelation of a real row, like the mask's, is even:
        ``C(nphi - k) = C(k)``; :func:`full_lags` restores the others), else all ``nphi``."""
        return self.nphi // 2 + 1 if self.auto else self.nphi

    def __dask_tokenize__(self) -> Any:
        return ("CorrelationPlan", self.q1, self.q2, self.polar_mask)


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


def _q_index(tok: str, q: np.ndarray, spec: str) -> int:
    tok = tok.strip()
    nq = q.size
    if re.fullmatch(r"[+-]?\d+", tok):
        i = int(tok)
        if not 0 <= i < nq:
            raise ParameterError(f"q_pairs={spec!r}: row index {i} is outside 0..{nq - 1} "
                                 f"(the band has {nq} q rows)")
        return i
    try:
        v = float(tok)
    except ValueError:
        raise ParameterError(f"q_pairs={spec!r}: {tok!r} is neither a row index nor a q value "
                             "in 1/A") from None
    half = 0.5 * (float(np.abs(np.diff(q)).mean()) if nq > 1 else 0.0)
    lo, hi = float(q.min()) - half, float(q.max()) + half
    if not lo <= v <= hi:
        raise ParameterError(f"q_pairs={spec!r}: q = {v:g} 1/A is outside the band "
                             f"{lo:.4g}..{hi:.4g} 1/A")
    return int(np.argmin(np.abs(q - v)))


def parse_q_pairs(spec: str | Sequence[Sequence[float]] | np.ndarray | None,
                  q: np.ndarray) -> str | np.ndarray | None:
    """Turn a ``--q-pairs`` specification into row-index pairs.

    Parameters
    ----------
    spec : str, (n, 2) array, or None
        ``None``, ``""``, ``"none"`` or ``"auto"``: autocorrelation only;
        ``"all"``: every pair of rows ``q1 <= q2``; ``"A:B,C:D,..."``: the
        listed pairs, each side either an integer row index (``0:3``) or a q
        value in 1/A containing a decimal point (``2.65:2.70``, the nearest
        row). An integer array is row indices, a float array q values.
    q : ndarray (nq,)
        The band's q (1/A).

    Returns
    -------
    None, ``"all"``, or int64 array (n, 2) of row indices.
    """
    q = np.asarray(q, dtype=float)
    if spec is None:
        return None
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s in ("", "none", "auto"):
            return None
        if s == "all":
            return "all"
        out = []
        for tok in spec.split(","):
            if not tok.strip():
                continue
            parts = tok.split(":")
            if len(parts) != 2:
                raise ParameterError(f"q_pairs={spec!r}: {tok.strip()!r} is not 'A:B' (two row "
                                     "indices or two q values in 1/A joined by ':')")
            out.append([_q_index(p, q, spec) for p in parts])
        if not out:
            raise ParameterError(f"q_pairs={spec!r} lists no pair")
        return np.asarray(out, dtype=np.int64)
    arr = np.asarray(spec)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise ParameterError(f"q_pairs must be 'all', 'A:B,...' or an (n, 2) array "
                             f"(got shape {arr.shape})")
    if arr.dtype.kind == "f":
        return np.asarray([[_q_index(repr(float(v)), q, "array") for v in row] for row in arr],
                          dtype=np.int64)
    return np.asarray([[_q_index(str(int(v)), q, "array") for v in row] for row in arr],
                      dtype=np.int64)


def make_plan(polar_mask: np.ndarray,
              q_pairs: str | np.ndarray | None = None) -> CorrelationPlan:
    """Precompute the mask normalisation for the autocorrelations and chosen cross pairs.

    Parameters
    ----------
    polar_mask : ndarray bool (nq, nphi)
    q_pairs : None, "auto", "none", "all" or (n, 2) int array of row indices
        Cross pairs to compute besides the autocorrelations: none
        (default), every ``q1 <= q2`` (``"all"``), or the listed pairs
        (``q1 > q2`` is allowed and kept in the order given).
    """
    pm = np.asarray(polar_mask, dtype=bool)
    if pm.ndim != 2:
        raise ParameterError(f"polar_mask must be 2-D (nq, nphi) (got shape {pm.shape})")
    nq, nphi = pm.shape
    if isinstance(q_pairs, str) or q_pairs is None:
        if q_pairs in (None, "auto", "none"):
            c1 = c2 = np.zeros(0, dtype=np.int64)
        elif q_pairs == "all":
            c1, c2 = np.triu_indices(nq)
        else:
            raise ParameterError(f"q_pairs must be 'auto', 'all' or an (n, 2) array "
                                 f"(got {q_pairs!r})")
    else:
        qp = np.asarray(q_pairs, dtype=np.int64).reshape(-1, 2)
        if qp.size == 0 or qp.min() < 0 or qp.max() >= nq:
            raise ParameterError(f"q_pairs row indices must lie in 0..{nq - 1} (got "
                                 f"{qp.tolist()[:5]})")
        c1, c2 = qp[:, 0], qp[:, 1]
    q1 = np.concatenate([np.arange(nq), c1]).astype(np.int64)
    q2 = np.concatenate([np.arange(nq), c2]).astype(np.int64)
    norm = _lag_counts(pm, nphi, q1, q2)  # counts of valid bin pairs
    return CorrelationPlan(q1=q1, q2=q2, mask_norm=norm.astype(np.float32), polar_mask=pm,
                           nphi=int(nphi))


# -- kernels ------------------------------------------------------------------
def _difference(a: np.ndarray, b: np.ndarray,
                polar_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(D, valid, per_pair)``: the difference on bins valid in both shots.

    ``per_pair`` is True when some pair has fewer valid bins than the mask
    (a shot-specific masked bin): its normalisation must then be its own.
    """
    # in the precision of the images (float32 polar images: float32, whose FFT
    # runs 3-5x faster than float64; float64 images stay float64)
    a, b = np.asarray(a), np.asarray(b)
    d = np.subtract(a, b, dtype=np.result_type(a.dtype, b.dtype, np.float32))
    valid = np.isfinite(d)
    if valid.all():  # the usual case: the valid bins are the mask's
        valid[...] = polar_mask
        # a multiply (finite d) is ~9x faster than a masked copy (a ring pair: 46 vs 416 us)
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
    import warnings

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


# -- statistics over pairs ----------------------------------------------------
def pair_order(ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """The order in which pairs are summed: by later shot, then earlier shot (stable).

    Consecutive pairs ``(t1, t2), (t2, t3), ...`` keep their order. The
    order does not depend on how the tags are chunked (the tasks group
    pairs by the chunk of their later shot, which this order respects), so
    neither do the products of linked pairs (:func:`pair_links`).
    """
    ia = np.asarray(ia, dtype=np.int64)
    ib = np.asarray(ib, dtype=np.int64)
    return np.lexsort((np.minimum(ia, ib), np.maximum(ia, ib)))


def pair_links(ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """Whether each pair shares a shot with the pair before it (bool (npair,)).

    Overlapping consecutive pairs ``(t1, t2), (t2, t3)`` are linked; disjoint
    pairs are not. Two linked pairs' correlations are correlated (both hold
    the shared shot's own angular structure), which a standard error over
    pairs must count (:func:`finalize`).
    """
    ia = np.asarray(ia, dtype=np.int64)
    ib = np.asarray(ib, dtype=np.int64)
    out = np.zeros(ia.size, dtype=bool)
    if ia.size > 1:
        a0, b0, a1, b1 = ia[:-1], ib[:-1], ia[1:], ib[1:]
        out[1:] = (a1 == a0) | (a1 == b0) | (b1 == a0) | (b1 == b0)
    return out


@dataclasses.dataclass
class Edge:
    """One pair's correlation kept for its product with a linked pair.

    ``x``: float64 (nqp, nlag), 0 where the pair has no data; ``ok``: its
    bins with data (bool); ``common``: ``ok`` is the plan's (``lag_ok``).
    """

    x: np.ndarray
    ok: np.ndarray
    common: bool


@dataclasses.dataclass
class PairSums:
    """Sums over a set of pairs, per correlation bin (mergeable, subtractable).

    Most pairs have data exactly in the bins where the plan's mask has valid
    bin pairs (``mask_norm > 0``): those are only counted (``shared``), not
    added bin by bin; ``own_count`` holds the per-bin counts of the other
    pairs (a shot-specific masked bin), if any. ``count`` is the total.

    Autocorrelations are even in the lag, so their sums hold only the lags
    ``0 .. nphi // 2`` (``nlag`` below; ``nphi`` then says how many the
    full correlation has, :func:`full_lags`): half the memory, the adds and
    the bytes moved between workers (a wide band's pair of sums: 55 MB, not
    110). :func:`finalize` returns every lag.

    Attributes
    ----------
    n : int
        Pairs summed that have data in at least one bin.
    s1, s2 : ndarray float64 (nqp, nlag)
        Sum and sum of squares of the pairs' correlations where defined.
    own_count : ndarray int32 (nqp, nlag) or None
        Pairs with data in each bin, among those not counted in ``shared``.
    boot_s1, boot_w : ndarray float64 (nboot, nqp, nlag) or None
        Poisson-bootstrap weighted sums and weight totals.
    shared : int
        Pairs whose bins with data are exactly ``shared_ok``.
    shared_ok : ndarray bool (nqp, nlag) or None
        The plan's bins with valid bin pairs (``mask_norm > 0``).
    nphi : int or None
        Lags of the full correlation when the sums hold only ``0 .. nphi //
        2`` of them; None when they hold every lag.
    s12 : ndarray float64 (nqp, nlag) or None
        Sum of the products ``C_k C_(k-1)`` of each pair's correlation with
        that of the pair before it (in :func:`pair_order`) when the two
        share a shot (:func:`pair_links`), where both have data: the lag-1
        covariance that makes the standard error honest for overlapping
        consecutive pairs (:func:`finalize`). None: no such products.
    own_count12, shared12 : ndarray int32 (nqp, nlag) or None, int
        Their count per bin, as ``own_count`` and ``shared`` count the pairs.
    """

    n: int
    s1: np.ndarray
    s2: np.ndarray
    own_count: np.ndarray | None = None
    boot_s1: np.ndarray | None = None
    boot_w: np.ndarray | None = None
    shared: int = 0
    shared_ok: np.ndarray | None = None
    nphi: int | None = None
    s12: np.ndarray | None = None
    own_count12: np.ndarray | None = None
    shared12: int = 0

    @classmethod
    def zeros(cls, shape: tuple[int, int], n_boot: int = 0,
              nphi: int | None = None, linked: bool = False) -> PairSums:
        b = (n_boot,) + tuple(shape)
        nphi = None if nphi == shape[-1] else nphi
        return cls(0, np.zeros(shape), np.zeros(shape), None,
                   np.zeros(b) if n_boot else None, np.zeros(b) if n_boot else None,
                   nphi=nphi, s12=np.zeros(shape) if linked else None)

    @classmethod
    def for_plan(cls, plan: CorrelationPlan, n_boot: int = 0, linked: bool = False) -> PairSums:
        """Zero sums over the plan's rows and lags (``(nqp, plan.nlag)``);
        ``linked``: with the sum of products of linked pairs (``s12``)."""
        return cls.zeros((plan.nqp, plan.nlag), n_boot, plan.nphi, linked)

    def full(self, x: np.ndarray) -> np.ndarray:
        """An array over these sums' lags (last axis) over every lag (:func:`full_lags`)."""
        return x if self.nphi is None else full_lags(x, self.nphi)

    def _per_bin(self, own: np.ndarray | None, shared: int) -> np.ndarray:
        c = np.zeros(self.s1.shape, dtype=np.int64)
        if own is not None:
            c += own
        if shared:
            c += shared * self.shared_ok  # type: ignore[operator]
        return c

    @property
    def count(self) -> np.ndarray:
        """Pairs with data in each bin, int64 (nqp, nlag)."""
        return self._per_bin(self.own_count, self.shared)

    @property
    def count12(self) -> np.ndarray:
        """Products of linked pairs in each bin (``s12``'s count), int64 (nqp, nlag)."""
        return self._per_bin(self.own_count12, self.shared12)

    def add_count(self, ok: np.ndarray, rows: slice = slice(None)) -> None:
        """Count the bins ``ok`` (bool, rows ``rows``) of one or more pairs, in place."""
        if self.own_count is None:
            self.own_count = np.zeros(self.s1.shape, dtype=np.int32)
        self.own_count[rows] += ok

    def add_product(self, a: Edge, b: Edge, sign: int = 1) -> None:
        """Add (``sign`` -1: remove) the product of two linked pairs' correlations.

        The product is formed as the pair kernel forms it, so that a
        removal cancels an addition exactly. Into writable sums (those
        :meth:`absorb` and :meth:`total` return).
        """
        prod = np.multiply(a.x, b.x)
        if self.s12 is None:
            self.s12 = np.zeros(self.s1.shape)
        if sign > 0:
            self.s12 += prod
        else:
            self.s12 -= prod
        self.count_product(a, b, sign)

    def count_product(self, a: Edge, b: Edge, sign: int = 1) -> None:
        """Count (``sign`` -1: uncount) the product of two linked pairs in their bins
        with data: once for two pairs with the plan's bins, else bin by bin."""
        if a.common and b.common:
            self.shared12 += sign
            if self.shared_ok is None:
                self.shared_ok = a.ok
            return
        if self.own_count12 is None:
            self.own_count12 = np.zeros(self.s1.shape, dtype=np.int32)
        if sign > 0:
            self.own_count12 += a.ok & b.ok
        else:
            self.own_count12 -= a.ok & b.ok

    def add(self, corr: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Add per-pair correlations ``(k, nqp, nlag)`` (NaN = no data) in place."""
        ok = np.isfinite(corr)
        x = np.where(ok, corr, 0.0)
        self.n += int(ok.any(axis=(1, 2)).sum()) if ok.size else 0
        self.s1 += x.sum(axis=0)
        self.s2 += np.einsum("ijk,ijk->jk", x, x)
        self.add_count(ok.sum(axis=0, dtype=np.int32))
        if self.boot_s1 is not None:
            if weights is None:
                raise ParameterError("bootstrap sums need the pairs' bootstrap weights")
            k = corr.shape[0]
            w = np.asarray(weights, dtype=np.float64).reshape(-1, k)
            self.boot_s1 += (w @ x.reshape(k, -1)).reshape(self.boot_s1.shape)
            self.boot_w += (w @ ok.reshape(k, -1).astype(np.float64)).reshape(  # type: ignore
                self.boot_w.shape)  # type: ignore[union-attr]

    @staticmethod
    def total(parts: Sequence[PairSums], signs: Sequence[int] | None = None) -> PairSums:
        """The sum (or with ``signs`` -1, the difference) of several sums, in new arrays."""
        signs = [1] * len(parts) if signs is None else list(signs)
        first, sg = parts[0], signs[0]

        def start(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else (a.copy() if sg > 0 else -a)

        out = PairSums(sg * first.n, start(first.s1), start(first.s2),  # type: ignore[arg-type]
                       start(first.own_count), start(first.boot_s1), start(first.boot_w),
                       sg * first.shared, first.shared_ok, first.nphi, start(first.s12),
                       start(first.own_count12), sg * first.shared12)
        return out.absorb(parts[1:], signs[1:])

    def absorb(self, others: Sequence[PairSums],
               signs: Sequence[int] | None = None) -> PairSums:
        """Add ``others`` (or with ``signs`` -1, subtract them) into this sum, in place.

        Its arrays are reused (returns it). For reductions whose partial
        sums have one consumer each: a merge then allocates nothing (a wide
        band's pair of float64 sums is ~110 MB, and fresh memory costs page
        faults). A read-only array (one that arrived in a message buffer) is
        copied first.
        """
        signs = [1] * len(others) if signs is None else list(signs)
        if any((o.boot_s1 is None) != (self.boot_s1 is None) for o in others):
            raise ParameterError("cannot combine sums with and without bootstrap")
        if any(o.s1.shape != self.s1.shape or o.nphi != self.nphi for o in others):
            raise ParameterError("cannot combine sums over different rows or lags")

        def own(a: np.ndarray | None) -> np.ndarray | None:
            return a if a is None or a.flags.writeable else a.copy()

        def add(a: np.ndarray, b: np.ndarray, sg: int) -> None:
            if sg > 0:
                a += b
            else:
                a -= b

        self.s1, self.s2 = own(self.s1), own(self.s2)  # type: ignore[assignment]
        self.own_count = own(self.own_count)
        self.boot_s1, self.boot_w = own(self.boot_s1), own(self.boot_w)
        self.s12, self.own_count12 = own(self.s12), own(self.own_count12)

        def merge(mine: np.ndarray | None, theirs: np.ndarray | None,
                  sg: int) -> np.ndarray | None:
            # for the arrays a part may lack (no such bins or products in it)
            if theirs is None:
                return mine
            if mine is None:
                return theirs.copy() if sg > 0 else -theirs
            add(mine, theirs, sg)
            return mine

        for o, sg in zip(others, signs, strict=True):
            self.n += sg * o.n
            add(self.s1, o.s1, sg)
            add(self.s2, o.s2, sg)
            self.own_count = merge(self.own_count, o.own_count, sg)
            if o.boot_s1 is not None:
                add(self.boot_s1, o.boot_s1, sg)  # type: ignore[arg-type]
                add(self.boot_w, o.boot_w, sg)  # type: ignore[arg-type]
            self.shared += sg * o.shared
            self.s12 = merge(self.s12, o.s12, sg)
            self.own_count12 = merge(self.own_count12, o.own_count12, sg)
            self.shared12 += sg * o.shared12
            if self.shared_ok is None:
                self.shared_ok = o.shared_ok
        return self

    def __add__(self, other: PairSums) -> PairSums:
        return PairSums.total([self, other])

    def __sub__(self, other: PairSums) -> PairSums:
        return PairSums.total([self, other], [1, -1])


def bootstrap_blocks(links: np.ndarray, length: int = BOOT_BLOCK) -> np.ndarray:
    """The first pair of each pair's bootstrap block (indices, in the order of ``links``).

    Pairs linked to the pair before them (:func:`pair_links`) are
    correlated, which a bootstrap drawing pairs independently ignores: its
    intervals would be too narrow. Each chain of linked pairs is cut into
    blocks of ``length`` consecutive pairs, which are drawn together (a
    block bootstrap; pairs not linked are blocks of their own): the
    resampled variance of the mean then holds the covariance of linked
    pairs but for a fraction ``1 / length`` of it (a 1-dependent sequence).
    Give each pair the key of its block's first pair in
    :func:`bootstrap_weights`.
    """
    links = np.asarray(links, dtype=bool)
    if length < 1:
        raise ParameterError(f"bootstrap block length must be >= 1 (got {length})")
    n = links.size
    idx = np.arange(n)
    start = ~links
    if n:
        start[0] = True
    chain_start = np.maximum.accumulate(np.where(start, idx, 0))
    return idx - (idx - chain_start) % int(length)


def bootstrap_weights(keys: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """Poisson(1) bootstrap weights of pairs, reproducible from each pair's identity.

    Each pair's ``n_boot`` weights are drawn from a generator seeded by
    ``(seed, key_a, key_b)``, so they do not depend on chunking, on the
    order in which pairs are processed or on the other pairs: the
    bootstrap can be accumulated in partial sums and a pair's contribution
    recomputed and removed. The Poisson bootstrap is the streaming form of
    the multinomial bootstrap (each of n pairs drawn Poisson(1) times).

    Parameters
    ----------
    keys : int array (npair, 2)
        Non-negative pair identities (tag numbers).
    n_boot : int
    seed : int

    Returns
    -------
    ndarray float64 (n_boot, npair)
    """
    keys = np.asarray(keys, dtype=np.int64).reshape(-1, 2)
    if keys.size and keys.min() < 0:
        raise ParameterError("bootstrap pair keys must be non-negative integers")
    out = np.empty((int(n_boot), keys.shape[0]))
    for i, (ka, kb) in enumerate(keys):
        out[:, i] = np.random.default_rng([int(seed), int(ka), int(kb)]).poisson(1.0, n_boot)
    return out


@dataclasses.dataclass
class HeldPairs:
    """Pairs kept apart from the sums: positions, correlations, bootstrap weights."""

    index: np.ndarray
    corr: np.ndarray
    weights: np.ndarray | None = None

    @classmethod
    def concat(cls, parts: Sequence[HeldPairs], shape: tuple[int, int],
               n_boot: int) -> HeldPairs:
        parts = [p for p in parts if p.index.size]
        if not parts:
            return cls(np.zeros(0, np.int64), np.zeros((0,) + tuple(shape)),
                       np.zeros((n_boot, 0)) if n_boot else None)
        w = np.concatenate([p.weights for p in parts], axis=1) if n_boot else None
        return cls(np.concatenate([p.index for p in parts]),
                   np.concatenate([p.corr for p in parts]), w)


def _row_blocks(n: int, nphi: int, block_bytes: int) -> list[slice]:
    """Slices of ``n`` rows whose float64 ``(rows, nphi)`` arrays take about ``block_bytes``."""
    per = max(1, int(block_bytes) // max(8 * int(nphi), 1))
    return [slice(r, min(n, r + per)) for r in range(0, n, per)]


def pair_sums(a: np.ndarray, b: np.ndarray, plan: CorrelationPlan, *,
              ia: np.ndarray | None = None, ib: np.ndarray | None = None,
              weights: np.ndarray | None = None, keep: bool = False,
              hold_above: float | None = None, hold_max: int = HOLD_OUT_MAX,
              block_bytes: int = BLOCK_BYTES, links: np.ndarray | None = None
              ) -> tuple[PairSums, np.ndarray, np.ndarray | None, HeldPairs]:
    """Correlate pairs one by one and accumulate their sums (the group kernel).

    Each pair is processed in blocks of rows of about ``block_bytes``
    (float64) so that every temporary stays in the CPU cache, and is added into the sums in
    place: the memory is that of the sums, whatever the number of pairs.
    The FFTs run in the images' precision (float32 for the pipeline's polar
    images), the sums in float64.

    Parameters
    ----------
    a, b : ndarray (n, nq, nphi)
        Normalised polar images; pair ``i`` is ``(a[ia[i]], b[ib[i]])``
        (``ia``/``ib`` default to ``arange``: ``a`` and ``b`` hold the pairs).
    plan : CorrelationPlan
    weights : ndarray (n_boot, npair), optional
        Bootstrap weights (:func:`bootstrap_weights`).
    keep : bool
        Also return the per-pair correlations (float32).
    hold_above : float, optional
        Pairs whose statistic exceeds this (the ``hold_max`` largest of
        them) are not summed but returned in ``held`` (float64
        correlations).
    block_bytes : int
        Approximate size of the float64 work arrays of a block of rows.
    links : bool array (npair,), optional
        Pair ``k`` shares a shot with pair ``k - 1`` (:func:`pair_links`):
        the product of their correlations is summed (``sums.s12``; not for
        a held-out pair). Default: from ``ia``/``ib`` in the order given
        when ``a is b``, else no pair is linked.

    Returns
    -------
    sums : PairSums
        Over every pair not held out (lags ``0 .. plan.nlag - 1``).
    stat : ndarray (npair,)
        :func:`difference_statistic` of each pair.
    corr : ndarray float32 (npair, nqp, nphi) or None
    held : HeldPairs
        Held-out pairs (index into the pairs given), over the sums' lags.
    """
    sums, stat, kept, held, _ = _sum_pairs(a, b, plan, ia=ia, ib=ib, weights=weights,
                                           keep=keep, hold_above=hold_above,
                                           hold_max=hold_max, block_bytes=block_bytes,
                                           links=links)
    return sums, stat, kept, held


def _sum_pairs(a: np.ndarray, b: np.ndarray, plan: CorrelationPlan, *,
               ia: np.ndarray | None = None, ib: np.ndarray | None = None,
               weights: np.ndarray | None = None, keep: bool = False,
               hold_above: float | None = None, hold_max: int = HOLD_OUT_MAX,
               block_bytes: int = BLOCK_BYTES, links: np.ndarray | None = None,
               linked: bool | None = None
               ) -> tuple[PairSums, np.ndarray, np.ndarray | None, HeldPairs,
                          tuple[Edge | None, Edge | None]]:
    """:func:`pair_sums`, and the edges a fold links to its neighbours' pairs:
    the first pair's correlation when ``links[0]`` (it shares a shot with the
    pair before these) and the last pair's (None for a held-out pair).
    ``linked``: allocate ``s12`` (default: some pair is linked)."""
    npair = a.shape[0] if ia is None else int(np.size(ia))
    if links is None and a is b and ia is not None and ib is not None:
        links = pair_links(ia, ib)
    ia = np.arange(npair) if ia is None else np.asarray(ia, dtype=np.int64)
    ib = np.arange(npair) if ib is None else np.asarray(ib, dtype=np.int64)
    if links is not None:
        links = np.asarray(links, dtype=bool)
        if links.shape != (npair,):
            raise ParameterError(f"links must be one bool per pair ({npair}), "
                                 f"got shape {links.shape}")
    n_boot = 0 if weights is None else int(weights.shape[0])
    shape = (plan.nqp, plan.nlag)  # the sums' (and held-out pairs') lags
    if linked is None:
        linked = links is not None and bool(links.any())
    sums = PairSums.for_plan(plan, n_boot, linked)
    kept = np.empty((npair, plan.nqp, plan.nphi), np.float32) if keep else None
    pm = plan.polar_mask
    hold = np.zeros(npair, dtype=bool)
    stat = np.full(npair, np.nan)
    if hold_above is not None and npair:
        stat[:] = [_stat(*_difference(a[i][None], b[j][None], pm)[:2])[0]
                   for i, j in zip(ia, ib, strict=True)]
        with np.errstate(invalid="ignore"):
            big = np.flatnonzero(stat > hold_above)
        hold[big[np.argsort(-stat[big], kind="stable")][:max(0, int(hold_max))]] = True
    held_corr = np.empty((int(hold.sum()),) + shape) if hold.any() else None
    acc = _Accumulator(plan, sums, weights, block_bytes, links if linked else None)
    for k in range(npair):
        dest = None
        if hold[k]:
            dest = held_corr[int(hold[:k].sum())]  # type: ignore[index]
        sq, nv = acc.pair(a[ia[k]], b[ib[k]], k, None if kept is None else kept[k],
                          held=dest)
        if hold_above is None:
            with np.errstate(invalid="ignore", divide="ignore"):
                stat[k] = sq / nv if nv else np.nan
    acc.finish()
    idx = np.flatnonzero(hold)
    held = HeldPairs(idx, held_corr if held_corr is not None else np.zeros((0,) + shape),
                     None if weights is None else weights[:, idx])
    return sums, stat, kept, held, (acc.first, acc.last)


class _Accumulator:
    """Adds pairs' correlations into :class:`PairSums`, block of rows by block of rows.

    Pairs whose valid bins are exactly the plan's mask (the usual case)
    share its lag counts: they are counted once at the end
    (:meth:`finish`) instead of bin by bin.

    With ``links`` (:func:`pair_links`), the previous summed pair's
    correlation is kept (``prev``, one (nqp, nlag) float64 array, reused)
    and a linked pair's product with it is added into ``sums.s12`` block
    by block; ``first`` and ``last`` are the :class:`Edge` of the first
    pair (when linked to a pair before these) and of the last one, for the
    fold to link its neighbours. A held-out pair breaks the chain.
    """

    def __init__(self, plan: CorrelationPlan, sums: PairSums, weights: np.ndarray | None,
                 block_bytes: int, links: np.ndarray | None = None) -> None:
        self.plan = plan
        self.sums = sums
        self.weights = weights
        nrow = plan.nq if plan.auto else plan.nqp
        self.blocks = _row_blocks(nrow, plan.nphi, block_bytes)
        self.nlag = plan.nlag  # the lags summed (half of them for autocorrelations)
        self.inv0 = plan.lag_inv_norm  # 0 where no bin pair
        self.ok = plan.lag_ok
        self.any_ok = bool(self.ok.any())
        self.n_common = 0
        self.w_common = None if weights is None else np.zeros(weights.shape[0])
        self.x = np.empty((self.blocks[0].stop - self.blocks[0].start, self.nlag))
        # linked pairs (sharing a shot with the pair before): the previous pair's
        # correlation is kept, and each block's product with it summed (``s12``)
        self.links = links
        self.prev: np.ndarray | None = None
        if links is not None:
            self.prev = np.empty((plan.nqp, self.nlag))
            self.p = np.empty_like(self.x)
        self.prev_edge: Edge | None = None  # the previous pair's, if summed
        self.first: Edge | None = None
        self.last: Edge | None = None
        self._track = self._link = False
        self._own_ok: list[tuple[slice, np.ndarray]] = []

    def pair(self, a: np.ndarray, b: np.ndarray, k: int, kept: np.ndarray | None,
             held: np.ndarray | None = None) -> tuple[float, int]:
        """Add pair ``k`` (images ``a``, ``b`` (nq, nphi)); return (sum of D^2, valid bins)."""
        plan = self.plan
        pm = plan.polar_mask
        sq, nv = 0.0, 0
        own = False  # some bin masked for this pair only
        self._track = self.prev is not None and held is None
        self._link = (self._track and k > 0 and bool(self.links[k])  # type: ignore[index]
                      and self.prev_edge is not None)
        self._own_ok = []
        if not plan.auto:  # cross rows need every q row's transform
            d, valid, own = _difference(a[None], b[None], pm)
            d, valid = d[0], valid[0]
            sq = float(np.square(d).sum(dtype=np.float64))
            nv = int(np.count_nonzero(valid))
            f = scipy.fft.rfft(d, axis=-1)
            fv_rows = valid if own else None
        has_data = False
        shared_blocks = []  # blocks of rows whose valid bins were the mask's (auto)
        for blk in self.blocks:
            if plan.auto:
                d, valid, own_b = _difference(a[None, blk], b[None, blk], pm[blk])
                d, valid = d[0], valid[0]
                sq += float(np.square(d).sum(dtype=np.float64))
                nv += int(np.count_nonzero(valid))
                prod = _lag_products(scipy.fft.rfft(d, axis=-1))
                m = _lag_counts(valid, plan.nphi) if own_b else None
                own = own or own_b
                if not own_b:
                    shared_blocks.append(blk)
            else:
                q1, q2 = plan.q1[blk], plan.q2[blk]
                prod = _lag_products(f, q1, q2)
                m = _lag_counts(fv_rows, plan.nphi, q1, q2) if fv_rows is not None else None
            c = scipy.fft.irfft(prod, n=plan.nphi, axis=-1)[:, :self.nlag]
            del prod
            has_data |= self._add_block(c, None if m is None else m[:, :self.nlag], blk, k,
                                        kept, held)
        if own and held is None:
            # a pair with a bin of its own masked in some block of rows is counted bin by
            # bin, so also in its other blocks, whose lag counts are the plan's
            for blk in shared_blocks:
                has_data |= self._count(self.ok[blk], blk, k)
        if not own:
            has_data = self.any_ok
            if held is None:
                self.n_common += 1
                if self.w_common is not None:
                    self.w_common += self.weights[:, k]  # type: ignore[index]
        if has_data and held is None:
            self.sums.n += 1
        if self.prev is not None:
            self._linked_pair(k)
        return sq, nv

    def _linked_pair(self, k: int) -> None:
        """Count pair ``k``'s product with the pair before it; keep its edge."""
        if not self._track:  # a held-out pair: not summed, so no product with it
            self.prev_edge = None
            return
        if self._own_ok:
            ok = self.ok.copy()
            for blk, o in self._own_ok:
                ok[blk] = o
            edge = Edge(self.prev, ok, False)  # type: ignore[arg-type]
        else:
            edge = Edge(self.prev, self.ok, True)  # type: ignore[arg-type]
        if self._link:  # its product was added block by block (_add_block)
            self.sums.count_product(self.prev_edge, edge)  # type: ignore[arg-type]
        if k == 0 and self.links[0]:  # type: ignore[index]
            self.first = Edge(edge.x.copy(), edge.ok, edge.common)
        self.prev_edge = edge

    def _add_block(self, c: np.ndarray, m: np.ndarray | None, blk: slice, k: int,
                   kept: np.ndarray | None, held: np.ndarray | None) -> bool:
        x = self.x[:c.shape[0]]
        if m is None:
            inv, ok = self.inv0[blk], None
        else:
            ok = m > 0
            inv = np.where(ok, 1.0 / np.maximum(m, 1.0), 0.0)
        np.multiply(c, inv, out=x)
        if self._track:
            # product with the previous (linked) pair, then this pair becomes the previous
            prev = self.prev[blk]  # type: ignore[index]
            if self._link:
                p = self.p[:c.shape[0]]
                np.multiply(prev, x, out=p)
                self.sums.s12[blk] += p  # type: ignore[index]
            prev[...] = x
            if ok is not None:
                self._own_ok.append((blk, ok))
        okb = self.ok[blk] if ok is None else ok
        if kept is not None or held is not None:
            part = np.where(okb, x, np.nan)
            if kept is not None:
                kept[blk] = full_lags(part, self.plan.nphi)
            if held is not None:
                held[blk] = part
                return bool(okb.any())
        s = self.sums
        s1, s2 = s.s1[blk], s.s2[blk]
        if s.boot_s1 is not None:
            s.boot_s1[:, blk] += self.weights[:, k][:, None, None] * x  # type: ignore[index]
        s1 += x
        np.multiply(x, x, out=x)
        s2 += x
        return self._count(ok, blk, k) if ok is not None else False

    def _count(self, ok: np.ndarray, blk: slice, k: int) -> bool:
        """Count pair ``k`` (and its bootstrap weights) in the bins ``ok`` of rows ``blk``;
        whether it has data there."""
        s = self.sums
        s.add_count(ok, blk)
        if s.boot_w is not None:
            s.boot_w[:, blk] += self.weights[:, k][:, None, None] * ok  # type: ignore[index]
        return bool(ok.any())

    def finish(self) -> None:
        """Count the pairs that share the plan's lag counts; the last pair's edge."""
        self.last = self.prev_edge
        s = self.sums
        if self.n_common:
            s.shared += self.n_common
            s.shared_ok = self.ok
            if s.boot_w is not None:
                s.boot_w += self.w_common[:, None, None] * self.ok  # type: ignore[index]


def robust_outliers(stat: np.ndarray, nsigma: float) -> tuple[np.ndarray, float]:
    """Pairs whose difference statistic stands out robustly (high side).

    The test is done on ``log(stat)``: the statistic is a positive mean of
    squares with a skewed distribution, multiplicative fluctuations (pulse
    energy, sample thickness) become additive, and the log is close to
    symmetric. A pair is rejected when ``(log s - median) / (1.4826 MAD) >
    nsigma`` (when the MAD is 0, 1.2533 times the mean absolute deviation
    is used, the usual fallback). Low values are kept: two shots that look
    alike do not bias the mean. Non-finite or zero statistics (pairs
    without a valid bin) are never rejected; with fewer than 3 usable pairs
    nothing is.

    Returns
    -------
    rejected : ndarray bool (npair,)
    threshold : float
        The statistic above which pairs are rejected (``inf`` if none can be).
    """
    if not nsigma > 0:
        raise ParameterError(f"outlier threshold must be > 0 robust sigmas (got {nsigma})")
    s = np.asarray(stat, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(s) & (s > 0)
    rej = np.zeros(s.shape, dtype=bool)
    if ok.sum() < 3:
        return rej, float("inf")
    x = np.log(s[ok])
    med = float(np.median(x))
    sigma = MAD_TO_SIGMA * float(np.median(np.abs(x - med)))
    if sigma == 0:
        sigma = 1.2533 * float(np.mean(np.abs(x - med)))
    if sigma == 0:
        return rej, float("inf")
    thr = float(np.exp(med + nsigma * sigma))
    rej[ok] = s[ok] > thr
    return rej, thr


def finalize(sums: PairSums, ci: float = 0.95) -> dict[str, np.ndarray]:
    """Mean, standard error, count and bootstrap interval per bin.

    ``mean = s1 / count`` (NaN where ``count == 0``); ``sem = sqrt(var /
    count)`` with the unbiased variance over pairs (NaN where ``count <
    2``); with bootstrap sums, ``ci_low``/``ci_high`` are the percentile
    interval at level ``ci`` of the bootstrap means, and
    ``fourier_ci_low``/``fourier_ci_high`` the same for the real part of
    :func:`fourier_coefficients` of the bootstrap means.

    Pairs that share a shot are not independent: overlapping consecutive
    pairs ``(t1, t2), (t2, t3)`` both carry ``t2``'s own angular structure,
    so their correlations are positively correlated (for white noise the
    lag-1 correlation is 1/4; with a strong shot-to-shot signal, up to 1/2)
    and ``var / count`` would underestimate the error of the mean by up to
    ~30 %. With the products of linked pairs in the sums (``s12``,
    :func:`pair_links`), the variance of the mean is that of a 1-dependent
    sequence, ``(gamma0 + 2 gamma1 n12 / n) / n``, with ``gamma0 = var``,
    ``gamma1 = s12 / n12 - mean**2`` the lag-1 autocovariance over the
    ``n12`` linked pairs (per bin) and ``n`` the count (clipped at 0). A
    shot shared by pairs that are not next to each other in
    :func:`pair_order` (a user's pair list) is not counted. Being
    computed from sums of squares (so that partial sums merge),
    its absolute round-off is about ``sqrt(eps) ~ 1e-8`` times the rms pair
    correlation: negligible unless the pairs are (nearly) identical.

    Every lag is returned (``(nqp, nphi)``), also from sums that hold half
    of them (:class:`PairSums`).
    """
    full = sums.full
    n = sums.count
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, sums.s1 / n, np.nan)
        var = np.where(n > 1, (sums.s2 - sums.s1 * mean) / (n - 1), np.nan)
        if sums.s12 is not None:
            # pairs sharing a shot with the pair before are correlated: the variance of
            # the mean of a 1-dependent sequence, (gamma0 + 2 gamma1 n12 / n) / n
            n12 = sums.count12
            gamma1 = np.where(n12 > 0, sums.s12 / np.maximum(n12, 1) - mean * mean, 0.0)
            var = var + 2.0 * gamma1 * n12 / np.maximum(n, 1)
        sem = np.sqrt(np.clip(var, 0, None) / n)
    out = {"mean": full(mean), "sem": full(sem), "count": full(n.astype(np.int64))}
    if sums.boot_s1 is not None and sums.boot_w is not None:
        if not 0 < ci < 1:
            raise ParameterError(f"confidence level must be in (0, 1) (got {ci})")
        with np.errstate(invalid="ignore", divide="ignore"):
            bm = np.where(sums.boot_w > 0, sums.boot_s1 / sums.boot_w, np.nan)
        pct = [50 * (1 - ci), 50 * (1 + ci)]
        out["ci_low"], out["ci_high"] = (full(x) for x in _nanpercentile0(bm, pct))
        fr = fourier_coefficients(full(bm)).real
        out["fourier_ci_low"], out["fourier_ci_high"] = _nanpercentile0(fr, pct)
    return out


def _nanpercentile0(x: np.ndarray, pct: Sequence[float]) -> list[np.ndarray]:
    """``np.nanpercentile(x, pct, axis=0)`` (linear method), vectorised (no per-bin loop)."""
    s = np.sort(x, axis=0)  # NaN last
    n = np.isfinite(x).sum(axis=0)
    out = []
    for p in pct:
        pos = (n - 1) * (p / 100.0)
        lo = np.clip(np.floor(pos).astype(np.int64), 0, None)
        hi = np.clip(np.minimum(lo + 1, n - 1), 0, None)
        frac = pos - np.floor(pos)
        vlo = np.take_along_axis(s, lo[None], axis=0)[0]
        vhi = np.take_along_axis(s, hi[None], axis=0)[0]
        r = vlo + frac * (vhi - vlo)
        out.append(np.where(n > 0, r, np.nan))
    return out


def summarize_pairs(polar: np.ndarray, ia: np.ndarray, ib: np.ndarray, plan: CorrelationPlan,
                    *, reject: float | None = None, n_boot: int = 0, ci: float = 0.95,
                    seed: int = 0, keys: np.ndarray | None = None,
                    keep_pairs: bool = False) -> dict[str, Any]:
    """Eager statistics of pair correlations (the numpy reference of :func:`pair_statistics`).

    With ``reject``, the kept pairs are summed directly (no subtraction).

    Returns
    -------
    dict with ``mean``, ``sem``, ``count`` (nqp, nphi), optional ``ci_low``,
    ``ci_high``, ``fourier_ci_low``, ``fourier_ci_high``; ``stat``,
    ``rejected`` (npair,), ``threshold``, ``n_pairs`` (kept) and ``pairs``
    (npair, nqp, nphi) float32 or None.
    """
    polar = np.asarray(polar)
    ia = np.asarray(ia, dtype=np.int64)
    ib = np.asarray(ib, dtype=np.int64)
    keys = np.stack([ia, ib], axis=1) if keys is None else np.asarray(keys, np.int64)
    # summed in pair_order, in which linked pairs follow each other (as pair_statistics)
    order = pair_order(ia, ib)
    inv = np.argsort(order)
    sa, sb, links, wkeys = _in_pair_order(ia, ib, keys, order)
    w = bootstrap_weights(wkeys, n_boot, seed) if n_boot else None
    sums, stat, kept, _ = pair_sums(polar, polar, plan, ia=sa, ib=sb, weights=w,
                                    keep=keep_pairs, links=links)
    rej = np.zeros(ia.size, dtype=bool)
    thr = float("inf")
    if reject:
        rej, thr = robust_outliers(stat, reject)
        good = ~rej
        # a kept pair's product with the pair before it, if that one is kept too
        linked_kept = links & np.r_[False, good[:-1]]
        sums, _, _, _ = pair_sums(polar, polar, plan, ia=sa[good], ib=sb[good],
                                  weights=None if w is None else w[:, good],
                                  links=linked_kept[good])
    out: dict[str, Any] = finalize(sums, ci)
    out.update(stat=stat[inv], rejected=rej[inv], threshold=thr, n_pairs=sums.n,
               pairs=None if kept is None else kept[inv])
    return out


# -- dask wrappers ------------------------------------------------------------
def _pair_groups(tag_chunks: tuple[int, ...], ia: np.ndarray,
                 ib: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int, int]]]:
    """Sort pairs by (chunk of a, chunk of b); return (order, bounds, groups).

    ``groups`` holds ``(chunk_a, chunk_b, start, end)`` over the sorted pairs.
    """
    bounds = np.cumsum((0,) + tuple(tag_chunks))
    ca = np.searchsorted(bounds, ia, side="right") - 1
    cb = np.searchsorted(bounds, ib, side="right") - 1
    order = np.lexsort((ib, ia, cb, ca))
    key = ca[order] * len(bounds) + cb[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], key.size]
    groups = [(int(ca[order][s]), int(cb[order][s]), int(s), int(e))
              for s, e in zip(starts, ends, strict=True)]
    return order, bounds, groups


def _check_polar(polar: da.Array, ia: np.ndarray, ib: np.ndarray) -> da.Array:
    if polar.ndim != 3:
        raise ParameterError(f"polar must be (tag, q, phi) (got {polar.ndim} dims)")
    if ia.size == 0:
        raise ParameterError("no pair to correlate")
    if ia.shape != ib.shape:
        raise ParameterError("ia and ib differ in length")
    n = polar.shape[0]
    if min(ia.min(), ib.min()) < 0 or max(ia.max(), ib.max()) >= n:
        raise ParameterError(f"pair positions must lie in 0..{n - 1}")
    if len(polar.chunks[1]) != 1 or len(polar.chunks[2]) != 1:
        polar = polar.rechunk({1: -1, 2: -1})
    return polar


def correlate_pairs(polar: da.Array, ia: np.ndarray, ib: np.ndarray,
                    plan: CorrelationPlan) -> tuple[da.Array, np.ndarray]:
    """Difference correlation of every pair, lazily, grouped by tag chunks.

    Materialises one array per pair; for statistics use
    :func:`pair_statistics`, whose memory does not grow with pairs.

    Parameters
    ----------
    polar : dask array (tag, nq, nphi)
        Normalised polar images, chunked along tag only.
    ia, ib : int arrays (npair,)
        Positions of each pair's shots on the tag axis.
    plan : CorrelationPlan
        From :func:`make_plan`; embedded once in the graph.

    Returns
    -------
    corr : dask array float64 (pair, nqp, nphi)
        Per-pair correlations in the order given by ``order``.
    order : int array (npair,)
        ``corr[i]`` is the pair ``(ia[order[i]], ib[order[i]])``.
    """
    ia = np.asarray(ia, dtype=np.int64)
    ib = np.asarray(ib, dtype=np.int64)
    polar = _check_polar(polar, ia, ib)
    order, bounds, groups = _pair_groups(polar.chunks[0], ia, ib)
    sa, sb = ia[order], ib[order]
    token = dask.base.tokenize(polar.name, ia, ib, plan)
    name = "difference-correlation-" + token
    plan_key = "correlation-plan-" + token
    dsk: dict = {plan_key: plan}
    for g, (a, b, s, e) in enumerate(groups):
        la = sa[s:e] - bounds[a]
        lb = sb[s:e] - bounds[b]
        blocks = [(polar.name, a, 0, 0)] + ([] if a == b else [(polar.name, b, 0, 0)])
        dsk[(name, g, 0, 0)] = (_corr_group, plan_key, la, lb, *blocks)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[polar])
    chunks = (tuple(e - s for _, _, s, e in groups), (plan.nqp,), (plan.nphi,))
    return da.Array(graph, name, chunks, meta=np.empty((0, 0, 0), np.float64)), order


def _corr_group(plan: CorrelationPlan, la: np.ndarray, lb: np.ndarray, block_a: np.ndarray,
                block_b: np.ndarray | None = None) -> np.ndarray:
    block_b = block_a if block_b is None else block_b
    return difference_correlation(block_a[la], block_b[lb], plan)


@dataclasses.dataclass
class _Partial:
    """What a group task passes to the fold of the sums.

    Sums over its pairs, and the small per-pair values (statistics in the
    sorted pair order, held-out pairs) carried along, so that every task's
    output has one consumer and is freed as soon as it is merged.
    """

    sums: PairSums
    stat: np.ndarray
    held: HeldPairs
    #: the correlations of its first pair, if linked to the pair before it, and
    #: of its last pair (:meth:`_Accumulator._linked_pair`): the fold sums their
    #: products with the neighbouring partials' pairs
    first: Edge | None = None
    last: Edge | None = None


@sizeof.register(CorrelationPlan)
def _sizeof_plan(p: CorrelationPlan) -> int:
    # what a worker holds once it has correlated pairs: the shipped arrays and the
    # derived ones over the summed lags (``lag_ok``, ``lag_inv_norm``: 9 bytes per bin)
    shipped = sum(a.nbytes for a in (p.q1, p.q2, p.mask_norm, p.polar_mask))
    return 64 + shipped + 9 * p.nqp * p.nlag


@sizeof.register(PairSums)
def _sizeof_pair_sums(s: PairSums) -> int:
    arrays = (s.s1, s.s2, s.own_count, s.boot_s1, s.boot_w, s.s12, s.own_count12)
    return 64 + sum(a.nbytes for a in arrays if a is not None)


@sizeof.register(HeldPairs)
def _sizeof_held(h: HeldPairs) -> int:
    return 64 + h.index.nbytes + h.corr.nbytes + (0 if h.weights is None else h.weights.nbytes)


@sizeof.register(_Partial)
def _sizeof_partial(p: _Partial) -> int:
    # Dask sizes task results to place tasks and to manage worker memory: without
    # this a wide band's 110 MB partial sums counted as 56 bytes
    edges = sum(e.x.nbytes + e.ok.nbytes for e in (p.first, p.last) if e is not None)
    return sizeof(p.sums) + p.stat.nbytes + sizeof(p.held) + edges


def _home_groups(tag_chunks: tuple[int, ...], ia: np.ndarray,
                 ib: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int]]]:
    """Sort pairs by their home chunk, that of their later shot; return (order, bounds, groups).

    ``groups`` holds ``(chunk, start, end)`` over the sorted pairs. The rows
    a group needs from other chunks then lie in earlier chunks, which are
    computed first: a group can run as soon as its home block exists, and
    a block is freed as soon as its own group, its write and the row copies
    taken from it are done (with the home at the earlier shot, each block
    waited for the next chunk's, and blocks piled up on a worker that ran
    ahead).
    """
    bounds = np.cumsum((0,) + tuple(tag_chunks))
    home = np.searchsorted(bounds, np.maximum(ia, ib), side="right") - 1
    order = pair_order(ia, ib)  # already grouped by home, the chunk of the later shot
    sc = home[order]
    starts = np.flatnonzero(np.r_[True, sc[1:] != sc[:-1]])
    ends = np.r_[starts[1:], sc.size]
    return order, bounds, [(int(sc[s]), int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


def _take_rows(block: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The tag rows ``rows`` of a block (a copy: the block itself can be freed)."""
    return block[rows]


class _StackedRows:
    """Rows of several blocks addressed as one stack along the tag axis (no copy)."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.parts = list(parts)
        self.bounds = np.cumsum([0] + [p.shape[0] for p in self.parts])

    def __getitem__(self, i: int) -> np.ndarray:
        c = int(np.searchsorted(self.bounds, i, side="right")) - 1
        return self.parts[c][int(i) - int(self.bounds[c])]


def _group_task(plan: CorrelationPlan, la: np.ndarray, lb: np.ndarray, keys: np.ndarray,
                start: int, n_boot: int, seed: int, keep: bool, hold: float | None,
                hold_max: int, block_bytes: int, links: np.ndarray | None, block: np.ndarray,
                *others: np.ndarray) -> Any:
    """Sums over a group's pairs; ``la``/``lb`` index ``block`` then the ``others`` rows."""
    rows: Any = _StackedRows([block, *others]) if others else block
    w = bootstrap_weights(keys, n_boot, seed) if n_boot else None
    sums, stat, kept, held, (first, last) = _sum_pairs(
        rows, rows, plan, ia=la, ib=lb, weights=w, keep=keep, hold_above=hold,
        hold_max=hold_max, block_bytes=block_bytes,
        links=np.zeros(la.size, bool) if links is None else links, linked=links is not None)
    held.index = held.index + start  # position among all (sorted) pairs
    part = _Partial(sums, stat, held, first, last)
    return (part, kept) if keep else part


def _merge_partials(parts: list[_Partial]) -> _Partial:
    # every partial has one consumer (this merge): add into the running sum's arrays (the
    # first part), or for two parts into whichever is writable (a part that arrived from
    # another worker may be a read-only message buffer; a + b == b + a, bit for bit)
    base = 1 if len(parts) == 2 and not parts[0].sums.s1.flags.writeable else 0
    sums = parts[base].sums.absorb([p.sums for i, p in enumerate(parts) if i != base])
    # the parts are consecutive runs of pairs: a part's first pair, if linked to the
    # pair before it, is linked to the last pair of the part before
    for left, right in zip(parts[:-1], parts[1:], strict=True):
        if left.last is not None and right.first is not None:
            sums.add_product(left.last, right.first)
    n_boot = 0 if sums.boot_s1 is None else sums.boot_s1.shape[0]
    return _Partial(sums, np.concatenate([p.stat for p in parts]),
                    HeldPairs.concat([p.held for p in parts], sums.s1.shape, n_boot),
                    parts[0].first, parts[-1].last)


def _reject_task(root: _Partial, nsigma: float) -> tuple[np.ndarray, float]:
    return robust_outliers(root.stat, nsigma)


class _BlockRows:
    """Rows of a chunked tag axis from in-memory blocks (fallback source)."""

    def __init__(self, bounds: np.ndarray, blocks: list[np.ndarray]) -> None:
        self.bounds = bounds
        self.blocks = blocks

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        c = np.searchsorted(self.bounds, positions, side="right") - 1
        return np.stack([self.blocks[ci][p - self.bounds[ci]]
                         for ci, p in zip(c, positions, strict=True)])


def _in_pair_order(ia: np.ndarray, ib: np.ndarray, keys: np.ndarray,
                   order: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The pairs in ``order`` (:func:`pair_order`): their shots, :func:`pair_links`, and
    the keys of their bootstrap weights (each pair its block's first pair's,
    :func:`bootstrap_blocks`)."""
    sa, sb = ia[order], ib[order]
    links = pair_links(sa, sb)
    return sa, sb, links, keys[order][bootstrap_blocks(links)]


def _relinked(links: np.ndarray, rejected: np.ndarray,
              held: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Products of linked pairs ``(k - 1, k)`` to remove and to add, as positions ``k``.

    The one pass summed the products of linked pairs of which neither was
    held out; the result wants those of which neither is rejected.
    """
    inline = links[1:] & ~held[:-1] & ~held[1:]
    wanted = links[1:] & ~rejected[:-1] & ~rejected[1:]
    return np.flatnonzero(inline & ~wanted) + 1, np.flatnonzero(wanted & ~inline) + 1


def _pair_edges(rows: Any, plan: CorrelationPlan, la: np.ndarray, lb: np.ndarray,
                block_bytes: int) -> list[Edge]:
    """Each pair's correlation as :class:`Edge` (computed as the pair kernel does)."""
    acc = _Accumulator(plan, PairSums.for_plan(plan), None, block_bytes)
    corr = np.empty((la.size, plan.nqp, plan.nlag))
    edges = []
    for j in range(la.size):
        acc.pair(rows[la[j]], rows[lb[j]], j, None, held=corr[j])
        ok = np.isfinite(corr[j])
        common = bool(np.array_equal(ok, plan.lag_ok))
        edges.append(Edge(np.where(ok, corr[j], 0.0), plan.lag_ok if common else ok, common))
    return edges


def _correct_task(root: _Partial, rejection: tuple[np.ndarray, float],
                  plan: CorrelationPlan, sa: np.ndarray, sb: np.ndarray,
                  keys: np.ndarray, n_boot: int, seed: int, block_bytes: int,
                  source: Callable[[np.ndarray], np.ndarray],
                  links: np.ndarray | None = None,
                  batch_bytes: int | None = None) -> PairSums:
    """Final sums: add the held-out pairs that are kept, subtract the other rejected
    pairs; and the products of linked pairs (:func:`_relinked`).

    The pairs to recompute are taken a batch at a time, in pair order, so
    that a batch's polar rows take about ``batch_bytes`` (a wide band's
    polar image is 28 MB, and a long run may reject a hundred pairs;
    default ``CORRECT_BYTES``).
    """
    rej, _ = rejection
    total, h = root.sums, root.held
    if h.index.size:
        ok = ~rej[h.index]
        add = PairSums.for_plan(plan, n_boot)
        add.add(h.corr[ok], None if h.weights is None else h.weights[:, ok])
        total = total + add
    was_held = np.zeros(rej.size, dtype=bool)
    was_held[h.index] = True
    idx = np.flatnonzero(rej & ~was_held)
    unlink, link = ((np.zeros(0, np.int64),) * 2 if links is None
                    else _relinked(links, rej, was_held))
    if idx.size == 0 and unlink.size == 0 and link.size == 0:
        return total
    if total is root.sums:
        total = PairSums.total([total])  # a task's input is not changed in place
    sign = dict.fromkeys(unlink.tolist(), -1) | dict.fromkeys(link.tolist(), 1)
    # every pair whose correlation is needed, in pair order: a product's pairs k - 1
    # and k are next to each other here, in one batch or across two
    need = np.unique(np.concatenate([idx, unlink - 1, unlink, link - 1, link]))
    batch_bytes = CORRECT_BYTES if batch_bytes is None else batch_bytes
    per = max(1, int(batch_bytes) // max(1, 2 * plan.nq * plan.nphi * 4))
    subtract = np.zeros(rej.size, dtype=bool)
    subtract[idx] = True
    before: tuple[int, Edge] | None = None  # the last pair of the previous batch
    for lo in range(0, need.size, per):
        batch = need[lo:lo + per]
        pos = np.unique(np.concatenate([sa[batch], sb[batch]]))
        rows = np.asarray(source(pos))
        la, lb = np.searchsorted(pos, sa[batch]), np.searchsorted(pos, sb[batch])
        sub_here = subtract[batch]
        if sub_here.any():
            kk = batch[sub_here]
            w = bootstrap_weights(keys[kk], n_boot, seed) if n_boot else None
            sub, stat, _, _ = pair_sums(rows, rows, plan, ia=la[sub_here], ib=lb[sub_here],
                                        weights=w, block_bytes=block_bytes,
                                        links=np.zeros(kk.size, bool))
            first = root.stat[kk]
            if not np.allclose(stat, first, rtol=1e-6, atol=0, equal_nan=True):
                raise SaclaDaskError(
                    "the shots of rejected pairs read back differently from the first pass "
                    f"(difference statistic {first[:3].tolist()} then {stat[:3].tolist()}): "
                    "did the run files change while processing?")
            total = total.absorb([sub], [-1])
        linked_here = [j for j, k in enumerate(batch.tolist()) if k in sign or k + 1 in sign]
        if not linked_here:
            before = None
            continue
        sel = np.asarray(linked_here)
        edges = dict(zip(batch[sel].tolist(),
                         _pair_edges(rows, plan, la[sel], lb[sel], block_bytes), strict=True))
        del rows
        if before is not None:
            edges[before[0]] = before[1]
        for k in batch[sel].tolist():
            if k in sign:
                total.add_product(edges[k - 1], edges[k], sign[k])
        last = int(batch[-1])
        before = (last, edges[last]) if last in edges else None
    return total


def _finalize_task(sums: PairSums | _Partial, ci: float) -> dict[str, Any]:
    if isinstance(sums, _Partial):
        sums = sums.sums
    out: dict[str, Any] = finalize(sums, ci)
    out["n_pairs"] = np.int64(sums.n)
    return out


def _stat_in_order(root: _Partial, inv: np.ndarray | None) -> np.ndarray:
    return root.stat if inv is None else root.stat[inv]


def _rejected_in_order(rejection: tuple[np.ndarray, float], inv: np.ndarray | None) -> np.ndarray:
    r = rejection[0]
    return r if inv is None else r[inv]


@dataclasses.dataclass
class LazyPairStatistics:
    """Lazy results of :func:`pair_statistics` (dask arrays).

    ``mean``, ``sem``, ``count`` (and ``ci_low``/``ci_high``) are
    (nqp, nphi) over the plan's rows; ``fourier_ci_low``/``fourier_ci_high``
    (nqp, nphi // 2 + 1); ``stat``, ``rejected`` (npair,) and ``pairs``
    (npair, nqp, nphi, float32) are in the order of the input pairs;
    ``threshold`` (pair statistic above which pairs were rejected) and
    ``n_pairs`` (pairs averaged) are 0-d.
    """

    mean: da.Array
    sem: da.Array
    count: da.Array
    stat: da.Array
    rejected: da.Array
    threshold: da.Array
    n_pairs: da.Array
    ci_low: da.Array | None = None
    ci_high: da.Array | None = None
    fourier_ci_low: da.Array | None = None
    fourier_ci_high: da.Array | None = None
    pairs: da.Array | None = None


def pair_statistics(polar: da.Array, ia: np.ndarray, ib: np.ndarray, plan: CorrelationPlan,
                    *, reject: float | None = None, n_boot: int = 0, ci: float = 0.95,
                    seed: int = 0, keys: np.ndarray | None = None, keep_pairs: bool = False,
                    reload: Any = None, split_every: int | None = None,
                    block_bytes: int = BLOCK_BYTES,
                    hold_out_max: int = HOLD_OUT_MAX,
                    halo: da.Array | None = None) -> LazyPairStatistics:
    """Statistics over pairs of the difference correlations, lazily, in one pass.

    One task per tag chunk holding the pairs' later shots computes the
    :class:`PairSums` and per-pair statistics of those pairs, from its
    chunk's block and, for shots in other (earlier) chunks, small tasks
    taking just those rows; the group sums are folded into one running sum
    ``split_every`` at a time, in chunk order, so memory holds a few partial
    sums, never all pairs, however long the run.

    Outlier rejection (``reject`` robust sigmas, :func:`robust_outliers`)
    cannot know which pairs to drop before every pair's statistic exists.
    Holding the polar data until then would keep the whole run in memory,
    and a second pass would read it twice; instead the sums over *all* pairs
    are accumulated in the one pass and, once the rejected pairs are known,
    those few are recomputed from their shots and subtracted. The sums are
    float64: subtracting a pair leaves a rounding error of about 1e-16 of
    its own contribution (its correlation for the mean, its square for the
    variance). That is negligible unless the pair is enormous compared
    with the rest (a shot labelled bright that has almost no signal gives
    normalised values in the thousands); so pairs whose statistic exceeds
    ``HOLD_OUT_STAT`` (100, where ordinary pairs are 1e-3..1) are never
    mixed into the sums: each group task returns them apart (at most
    ``HOLD_OUT_MAX`` per group), and they are added back only if kept.
    The recomputed pairs' statistics are checked against the first pass.

    Parameters
    ----------
    polar : dask array (tag, nq, nphi)
        Normalised polar images (NaN marks shot-specific masked bins).
    ia, ib : int arrays (npair,)
        Positions of the pairs' shots on the tag axis.
    plan : CorrelationPlan
    reject : float, optional
        Reject pairs whose statistic is this many robust sigmas high.
    n_boot : int
        Poisson-bootstrap resamples (0: none); ``ci`` is the interval level.
        Memory: each partial sum holds ``2 n_boot nqp nlag`` float64 (``nlag``:
        :attr:`CorrelationPlan.nlag`); time: ``2 n_boot nqp nlag`` flops per pair
        (a matrix product), measured about 5x the correlation itself for ``n_boot = 100``.
    seed : int
        Bootstrap seed; ``keys`` (npair, 2) non-negative pair identities
        (default the positions; tag numbers make the resamples independent
        of the selection). Linked pairs (overlapping consecutive pairs) are
        drawn in blocks of ``BOOT_BLOCK`` (:func:`bootstrap_blocks`).
    keep_pairs : bool
        Also return the per-pair correlations (float32).
    reload : callable or dask Delayed, optional
        ``reload(positions) -> (k, nq, nphi)`` rows of ``polar`` at sorted
        tag positions, used to recompute rejected pairs without holding
        ``polar`` in memory (the pipeline re-reads those shots' raw images).
        Default: the correction depends on every chunk of ``polar``, which
        dask then keeps until the end (fine for in-memory arrays).
    split_every : int, optional
        Group sums added to the running sum per fold step (default: 8,
        fewer for large partial sums, so that a step takes about
        ``MERGE_BYTES`` (128 MiB); at least 1).
    hold_out_max : int
        Held-out pairs per group task (see above; 0 = always subtract).
    halo : dask array (tag, nq, nphi), optional
        For each block of ``polar`` after the first, the last row of the
        block before it, made by the same task as the block (chunks
        ``(0, 1, 1, ...)``): a group that needs only that row of the
        previous block (consecutive pairs across a chunk boundary) takes it
        from there, so it neither waits for nor copies from the task of the
        previous block, which may run on another worker (the pipeline makes
        it for large polar images, :meth:`sacla_dask.pipeline.ProcessingPlan.polar`).
        Its rows must equal those of ``polar``.
    """
    ia = np.asarray(ia, dtype=np.int64)
    ib = np.asarray(ib, dtype=np.int64)
    polar = _check_polar(polar, ia, ib)
    if n_boot < 0:
        raise ParameterError(f"bootstrap resamples must be >= 0 (got {n_boot})")
    if n_boot and not 0 < ci < 1:
        raise ParameterError(f"confidence level must be in (0, 1) (got {ci})")
    if reject is not None and not reject > 0:
        raise ParameterError(f"outlier threshold must be > 0 robust sigmas (got {reject})")
    keys = np.stack([ia, ib], axis=1) if keys is None else np.asarray(keys, np.int64)
    order, bounds, groups = _home_groups(polar.chunks[0], ia, ib)
    sa, sb, links, sk = _in_pair_order(ia, ib, keys, order)
    linked = bool(links.any())
    if split_every is None:
        # fold few group sums at a time when they are large (a wide band's pair of float64
        # nq x nlag arrays is ~55 MB; with linked pairs, their products and the first and
        # last pairs' correlations and bins: 26 bytes per bin more): a fold step holds the
        # running sum and its inputs
        part = (16 * (1 + int(n_boot)) + (26 if linked else 0)) * plan.nqp * plan.nlag
        split_every = int(min(8, max(1, MERGE_BYTES // max(part, 1) - 1)))
    if split_every < 1:
        raise ParameterError(f"split_every must be >= 1 (got {split_every})")
    inv: np.ndarray | None = np.argsort(order)
    if np.array_equal(order, np.arange(order.size)):
        inv = None
    n_boot = int(n_boot)
    deps: list[Any] = [polar]
    if halo is not None:
        want = ((0,) + (1,) * (len(polar.chunks[0]) - 1),) + polar.chunks[1:]
        if halo.chunks != want:
            raise ParameterError(f"halo chunks {halo.chunks} are not one row per block of "
                                 f"polar after the first {want}")
    reload_key = None
    if isinstance(reload, Delayed):
        deps.append(reload)
        reload_key = reload.key
    token = dask.base.tokenize(polar.name, ia, ib, keys, plan, reject, n_boot, ci, seed,
                               keep_pairs, split_every, block_bytes, hold_out_max, reload_key,
                               type(reload).__name__, None if halo is None else halo.name)
    internal = "pair-statistics-" + token
    plan_key = (internal, "plan")
    dsk: dict[Any, Any] = {plan_key: plan}
    halo_used = False
    part_keys, pair_keys = [], []
    for g, (h, s, e) in enumerate(groups):
        # the group runs on its home chunk's block (that of its pairs' later shots); of
        # other (earlier) chunks it needs, and so moves between workers, only the rows
        # of its pairs' shots there: ``la``/``lb`` index the home block, then those rows
        pos_ab = np.concatenate([sa[s:e], sb[s:e]])
        local = np.empty(pos_ab.size, dtype=np.int64)
        cab = np.searchsorted(bounds, pos_ab, side="right") - 1
        at_home = cab == h
        local[at_home] = pos_ab[at_home] - bounds[h]
        blocks: list[Any] = [(polar.name, h, 0, 0)]
        offset = int(polar.chunks[0][h])
        for c in np.unique(cab[~at_home]):
            sel = cab == c
            pos, li = np.unique(pos_ab[sel] - bounds[c], return_inverse=True)
            if halo is not None and c == h - 1 and pos.tolist() == [polar.chunks[0][c] - 1]:
                blocks.append((halo.name, int(h), 0, 0))  # made with the home block
                halo_used = True
            else:
                rk = (internal, "rows", g, int(c))
                dsk[rk] = (_take_rows, (polar.name, int(c), 0, 0), pos)
                blocks.append(rk)
            local[sel] = offset + li
            offset += pos.size
        la, lb = local[:e - s], local[e - s:]
        gk = (internal, "group", g)
        dsk[gk] = (_group_task, plan_key, la, lb, sk[s:e], s, n_boot, seed, keep_pairs,
                   HOLD_OUT_STAT if reject else None, hold_out_max, block_bytes,
                   links[s:e] if linked else None, *blocks)
        if keep_pairs:
            dsk[(internal, "partial", g)] = (operator.getitem, gk, 0)
            part_keys.append((internal, "partial", g))
            pair_keys.append(gk)
        else:
            part_keys.append(gk)
    if halo_used:  # (a halo no group takes from is no dependency)
        deps.append(halo)
    # the group sums are folded, in chunk order, into one running sum, ``split_every``
    # at a time: the workers hold the running sum and the few newest group results,
    # however long the run (a tree would hold a partial per level waiting for its
    # sibling, log2(groups) of them: each 55 MB for a wide band)
    acc = part_keys[0]
    for j, i in enumerate(range(1, len(part_keys), split_every)):
        k = (internal, "fold", j)
        dsk[k] = (_merge_partials, [acc, *part_keys[i:i + split_every]])
        acc = k
    root = total = acc
    rej_key = (internal, "rejection")
    if reject:
        dsk[rej_key] = (_reject_task, root, float(reject))
        if reload is None:
            source: Any = (_BlockRows, bounds,
                           [(polar.name, c, 0, 0) for c in range(len(polar.chunks[0]))])
        elif reload_key is not None:
            source = reload_key
        else:
            source = reload
        corrected = (internal, "corrected")
        dsk[corrected] = (_correct_task, root, rej_key, plan_key, sa, sb, sk, n_boot, seed,
                          block_bytes, source, links if linked else None)
        total = corrected
    else:
        dsk[rej_key] = (tuple, [np.zeros(ia.size, dtype=bool), float("inf")])
    fin = (internal, "final")
    dsk[fin] = (_finalize_task, total, float(ci))
    # a group runs in its home chunk's turn, a row copy in its source chunk's (so that
    # block is freed early); merges and the rest keep priority 0: they run as soon as
    # they can and free partial sums early
    home_of = {g: h for g, (h, _, _) in enumerate(groups)}

    def home(key: Any) -> int:
        if isinstance(key, tuple) and len(key) > 2:
            if key[1] == "rows":
                return int(key[3])
            if key[1] in ("group", "partial"):
                return home_of[key[2]]
        return 0

    with chunk_first(home):
        hlg = HighLevelGraph.from_collections(internal, dsk, dependencies=deps)

    def out(label: str, task: Any, chunks: tuple[tuple[int, ...], ...], dtype: Any) -> da.Array:
        name = f"{label}-{token}"
        key = (name,) + (0,) * len(chunks)
        layers = dict(hlg.layers)
        layers[name] = {key: task}
        dependencies = dict(hlg.dependencies)
        dependencies[name] = {internal}
        meta = np.empty((0,) * len(chunks), dtype=dtype)
        return da.Array(HighLevelGraph(layers, dependencies), name, chunks, meta=meta)

    shape2 = ((plan.nqp,), (plan.nphi,))
    nf = plan.nphi // 2 + 1
    res = LazyPairStatistics(
        mean=out("pair-mean", (operator.getitem, fin, "mean"), shape2, np.float64),
        sem=out("pair-sem", (operator.getitem, fin, "sem"), shape2, np.float64),
        count=out("pair-count", (operator.getitem, fin, "count"), shape2, np.int64),
        stat=out("pair-stat", (_stat_in_order, root, inv), ((ia.size,),), np.float64),
        rejected=out("pair-rejected", (_rejected_in_order, rej_key, inv), ((ia.size,),), bool),
        threshold=out("pair-threshold", (np.float64, (operator.getitem, rej_key, 1)), (),
                      np.float64),
        n_pairs=out("pair-count-total", (operator.getitem, fin, "n_pairs"), (), np.int64),
    )
    if n_boot:
        res.ci_low = out("pair-ci-low", (operator.getitem, fin, "ci_low"), shape2, np.float64)
        res.ci_high = out("pair-ci-high", (operator.getitem, fin, "ci_high"), shape2, np.float64)
        res.fourier_ci_low = out("pair-fourier-ci-low", (operator.getitem, fin, "fourier_ci_low"),
                                 ((plan.nqp,), (nf,)), np.float64)
        res.fourier_ci_high = out("pair-fourier-ci-high",
                                  (operator.getitem, fin, "fourier_ci_high"),
                                  ((plan.nqp,), (nf,)), np.float64)
    if keep_pairs:
        name = "pair-correlations-" + token
        pdsk = {(name, g, 0, 0): (operator.getitem, k, 1) for g, k in enumerate(pair_keys)}
        layers = dict(hlg.layers)
        layers[name] = pdsk
        dependencies = dict(hlg.dependencies)
        dependencies[name] = {internal}
        chunks = (tuple(e - s for _, s, e in groups), (plan.nqp,), (plan.nphi,))
        arr = da.Array(HighLevelGraph(layers, dependencies), name, chunks,
                       meta=np.empty((0, 0, 0), np.float32))
        res.pairs = arr if inv is None else arr[inv]
    return res


__all__ = [
    "CorrelationPlan", "LazyPairStatistics", "PairSums", "bootstrap_weights", "correlate_pairs",
    "correlate_rows", "cross_matrix", "difference_correlation", "difference_statistic",
    "finalize", "fourier_coefficients", "full_lags", "make_plan", "mask_bragg_spots",
    "pair_statistics", "pair_sums", "parse_q_pairs", "robust_outliers", "summarize_pairs",
]
