"""The correlation plan: which rows are correlated, and the mask normalisation.

For a pair of normalised polar images the difference ``D`` is correlated
along phi (:mod:`sacla_dask.correlation.kernels`) and divided by the
correlation ``M`` of the bins valid in both shots::

    M(q1, q2, dphi) = sum_phi v(q1, phi) v(q2, phi + dphi)

the number of valid bin pairs at that lag. When every shot has the polar
mask, ``M`` is the same for all pairs: :func:`make_plan` computes it once
and :class:`CorrelationPlan` carries it to the workers. The autocorrelation
(``q1 == q2``) of every q row is always computed (the first ``nq`` rows of
a plan); cross pairs of rows are optional (:func:`parse_q_pairs`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ParameterError
from .kernels import _lag_counts


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
