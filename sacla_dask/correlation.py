"""Difference angular correlations along phi.

This module owns the correlation maths: for a pair of normalised polar
images ``A`` and ``B`` (0 in masked bins), the difference ``D = A - B`` is
correlated along phi by FFT,

    C(q1, q2, dphi) = sum_phi D(q1, phi) D(q2, phi + dphi) / M(q1, q2, dphi)

where ``M`` is the same correlation of the polar mask: the number of valid
bin pairs at that lag. Dividing by ``M`` removes the panel-gap pattern. The
autocorrelation is the case ``q1 == q2``.

:func:`difference_correlation` is the numpy kernel on one block of pairs;
:func:`correlate_pairs` is the Dask wrapper: pairs are grouped by the tag
chunks of their two shots, one task per group, so a pair straddling two
chunks is computed like any other and the number of tasks grows with chunks,
not with pairs. Means and variances over pairs are Dask tree reductions.
"""

from __future__ import annotations

import dataclasses

import dask
import dask.array as da
import numpy as np
import scipy.fft
from dask.highlevelgraph import HighLevelGraph

from .errors import ParameterError


@dataclasses.dataclass(frozen=True)
class CorrelationPlan:
    """Small state shipped once to the workers: q pairs and mask normalisation.

    Attributes
    ----------
    q1, q2 : ndarray int (nqp,)
        Row indices of each correlated q pair (``q1 == q2``: autocorrelation).
    mask_norm : ndarray float64 (nqp, nphi)
        Mask correlation ``M``: number of valid bin pairs at each lag.
    nphi : int
    """

    q1: np.ndarray
    q2: np.ndarray
    mask_norm: np.ndarray
    nphi: int

    @property
    def auto(self) -> bool:
        return bool(np.array_equal(self.q1, self.q2))

    @property
    def nqp(self) -> int:
        return int(self.q1.size)


def correlate_rows(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Circular correlation along the last axis: ``sum_n a[n] b[n + k]``.

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


def make_plan(polar_mask: np.ndarray, q_pairs: str | np.ndarray | None = "auto") -> CorrelationPlan:
    """Precompute the mask normalisation for the chosen q pairs.

    Parameters
    ----------
    polar_mask : ndarray bool (nq, nphi)
    q_pairs : "auto", "all", or (nqp, 2) int array of row indices
        ``"auto"``: every row with itself; ``"all"``: every (q1 <= q2).
    """
    pm = np.asarray(polar_mask, dtype=bool)
    nq, nphi = pm.shape
    if isinstance(q_pairs, str) or q_pairs is None:
        if q_pairs in (None, "auto"):
            q1 = q2 = np.arange(nq)
        elif q_pairs == "all":
            q1, q2 = np.triu_indices(nq)
        else:
            raise ParameterError(f"q_pairs must be 'auto', 'all' or an (n, 2) array (got {q_pairs!r})")
    else:
        qp = np.asarray(q_pairs, dtype=np.int64).reshape(-1, 2)
        if qp.size == 0 or qp.min() < 0 or qp.max() >= nq:
            raise ParameterError(f"q_pairs indices must lie in 0..{nq - 1}")
        q1, q2 = qp[:, 0], qp[:, 1]
    m = pm.astype(np.float64)
    fm = scipy.fft.rfft(m, axis=-1)
    norm = scipy.fft.irfft(np.conj(fm[q1]) * fm[q2], n=nphi, axis=-1)
    norm = np.rint(norm)  # counts of valid bin pairs: integers up to round-off
    return CorrelationPlan(q1=np.asarray(q1), q2=np.asarray(q2), mask_norm=norm, nphi=nphi)


def difference_correlation(a: np.ndarray, b: np.ndarray, plan: CorrelationPlan) -> np.ndarray:
    """Mask-normalised difference correlation of pairs of polar images.

    Parameters
    ----------
    a, b : ndarray (npair, nq, nphi)
        Normalised polar images of the pairs' first and second shots
        (0 in masked bins).
    plan : CorrelationPlan

    Returns
    -------
    ndarray float64 (npair, nqp, nphi)
        ``C(q1, q2, dphi)``; 0 where the mask leaves no valid bin pair.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = plan.nphi
    f = scipy.fft.rfft(d, axis=-1)
    if plan.auto:
        prod = f.real**2 + f.imag**2
    else:
        prod = np.conj(f[:, plan.q1]) * f[:, plan.q2]
    c = scipy.fft.irfft(prod, n=n, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(plan.mask_norm > 0, c / plan.mask_norm, 0.0)
    return out


# -- dask wrapper ------------------------------------------------------------
def _group_kernel(plan: CorrelationPlan, ia: np.ndarray, ib: np.ndarray,
                  block_a: np.ndarray, block_b: np.ndarray | None = None) -> np.ndarray:
    if block_b is None:
        block_b = block_a
    return difference_correlation(block_a[ia], block_b[ib], plan)


def correlate_pairs(polar: da.Array, ia: np.ndarray, ib: np.ndarray,
                    plan: CorrelationPlan) -> tuple[da.Array, np.ndarray]:
    """Difference correlation of every pair, lazily, grouped by tag chunks.

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
    if ia.size == 0:
        raise ParameterError("no pair to correlate")
    if polar.ndim != 3 or len(polar.chunks[1]) != 1 or len(polar.chunks[2]) != 1:
        polar = polar.rechunk({1: -1, 2: -1})
    bounds = np.cumsum((0,) + polar.chunks[0])
    ca = np.searchsorted(bounds, ia, side="right") - 1
    cb = np.searchsorted(bounds, ib, side="right") - 1
    order = np.lexsort((ib, ia, cb, ca))
    ca, cb, sa, sb = ca[order], cb[order], ia[order], ib[order]
    key = ca * (len(bounds)) + cb
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], key.size]
    token = dask.base.tokenize(polar.name, ia, ib, plan.q1, plan.q2, plan.mask_norm)
    name = "difference-correlation-" + token
    plan_key = "correlation-plan-" + token
    dsk: dict = {plan_key: plan}
    for g, (s, e) in enumerate(zip(starts, ends)):
        a, b = int(ca[s]), int(cb[s])
        la = sa[s:e] - bounds[a]
        lb = sb[s:e] - bounds[b]
        if a == b:
            dsk[(name, g, 0, 0)] = (_group_kernel, plan_key, la, lb, (polar.name, a, 0, 0))
        else:
            dsk[(name, g, 0, 0)] = (_group_kernel, plan_key, la, lb, (polar.name, a, 0, 0),
                                    (polar.name, b, 0, 0))
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[polar])
    chunks = (tuple(int(e - s) for s, e in zip(starts, ends)), (plan.nqp,), (plan.nphi,))
    corr = da.Array(graph, name, chunks, meta=np.empty((0, 0, 0), dtype=np.float64))
    return corr, order


def pair_statistic(corr: da.Array | np.ndarray) -> da.Array | np.ndarray:
    """Per-pair size of the difference: the zero-lag correlation averaged over q.

    This is the mean squared normalised difference of the two shots, the
    statistic used for outlier rejection of pairs.
    """
    return corr[:, :, 0].mean(axis=1)
