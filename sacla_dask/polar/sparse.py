"""The sparse-matrix engine: a polar map held as a CSR matrix, applied as a product.

Every method's map can be held this way: row ``b`` of the matrix holds the
weights of the pixels (columns) that bin ``b`` reads, already divided by
the bin's good weight (and by its corrections). Applying it to one image's
column vector is one matrix-vector product, made in place by scipy's own
CSR kernel. An image with a non-finite pixel the map reads is redone with
those pixels set aside, and the bins that read one are NaN
(:func:`redo_nonfinite`); the gather engine (:mod:`.gather`) shares that
path.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

try:  # the in-place y += A @ x of scipy's own CSR product (no allocation, no copy)
    from scipy.sparse._sparsetools import csr_matvec as _csr_matvec
except ImportError:  # pragma: no cover - private API moved: fall back to ``A @ x``
    _csr_matvec = None

if TYPE_CHECKING:
    from .gather import GatherEngine

__all__ = ["SparseEngine", "check_finite", "matvec", "redo_nonfinite"]


def matvec(m: sp.csr_matrix, x: np.ndarray, y: np.ndarray) -> None:
    """``y[:] = m @ x`` without allocating (float32 vectors)."""
    if _csr_matvec is not None:
        y.fill(0)
        try:
            _csr_matvec(m.shape[0], m.shape[1], m.indptr, m.indices, m.data, x, y)
            return
        except (TypeError, ValueError):  # pragma: no cover - unexpected dtypes
            pass
    y[...] = m @ x


def redo_nonfinite(engine: SparseEngine | GatherEngine, x: np.ndarray, y: np.ndarray) -> int:
    """Recompute ``y`` (``engine`` applied to ``x``) with the non-finite pixels set aside.

    The bins that read one are NaN. Returns the number of non-finite pixels
    the engine reads (0 for a finite image whose float32 polar sum
    overflowed: ``y`` is then left as it is).
    """
    bad = ~np.isfinite(x)
    if not bad.any():
        return 0
    m = engine.matrix
    matvec(m, np.where(bad, np.float32(0), x), y)
    touched = np.empty_like(y)
    matvec(m, bad.astype(np.float32), touched)
    y[touched > 0] = np.nan
    return int(np.count_nonzero(bad & engine.used_columns))


def check_finite(engine: SparseEngine | GatherEngine, x: np.ndarray, y: np.ndarray) -> int:
    """Of a polar image ``y`` just made from ``x``: redo it if it is not all finite.

    Non-finite pixels cost nothing unless the engine reads one: the (cheap)
    sum of ``y`` is checked, and only an image whose sum is not finite is
    redone (:func:`redo_nonfinite`). Returns the number of non-finite
    pixels the engine read.
    """
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: NaN, caught below
        total = float(y.sum())
    if math.isfinite(total):
        return 0
    return redo_nonfinite(engine, x, y)


class SparseEngine:
    """A polar map as a CSR matrix (any method, any corrections). Immutable.

    Parameters
    ----------
    matrix : scipy.sparse.csr_matrix float32, shape (nq * nphi, columns)
        Weights over good pixels only; rows of masked bins are empty.
    """

    def __init__(self, matrix: sp.csr_matrix) -> None:
        self._matrix = matrix

    @property
    def matrix(self) -> sp.csr_matrix:
        """The map's CSR matrix (float32 weights)."""
        return self._matrix

    @property
    def n_bins(self) -> int:
        return int(self._matrix.shape[0])

    @property
    def n_columns(self) -> int:
        return int(self._matrix.shape[1])

    @property
    def is_ready(self) -> bool:
        """Always: a CSR map is applied as it is held (see :meth:`GatherEngine.ready`)."""
        return True

    def ready(self) -> SparseEngine:
        return self

    @property
    def nbytes(self) -> int:
        """Bytes held: the CSR arrays."""
        m = self._matrix
        return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)

    @functools.cached_property
    def used_columns(self) -> np.ndarray:
        """Boolean per column: the pixels the map reads (derived once, not pickled)."""
        used = np.zeros(self.n_columns, dtype=bool)
        used[self._matrix.indices] = True
        return used

    def apply(self, x: np.ndarray, y: np.ndarray) -> int:
        """``y[:] = matrix @ x`` (float32, in place); NaN in the bins that read a
        non-finite pixel. Returns the number of non-finite pixels read."""
        matvec(self._matrix, x, y)
        return check_finite(self, x, y)

    def compact(self, new_column: np.ndarray, n_columns: int) -> SparseEngine:
        """The same map on renumbered columns: column ``j`` becomes ``new_column[j]``."""
        m = self._matrix
        return SparseEngine(sp.csr_matrix((m.data, new_column[m.indices], m.indptr),
                                          shape=(m.shape[0], n_columns)))

    def __reduce__(self) -> tuple[Any, ...]:
        return (SparseEngine, (self._matrix,))

    def __repr__(self) -> str:
        return (f"SparseEngine({self.n_bins} bins x {self.n_columns} columns, "
                f"nnz {self._matrix.nnz})")
