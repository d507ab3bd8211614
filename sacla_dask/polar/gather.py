"""The gather engine: a polar map in which each bin takes one pixel with weight 1.

A ``nearest`` map without corrections is of that kind: bin ``b`` is the
value of the pixel at column ``index[b]``, or 0 for the bins in ``empty``
(masked, or reading no good pixel). Applying it is one ``take`` that reads
8 bytes per bin instead of the 12 of a CSR product, and it travels to the
workers as its index in int32 (4 bytes per bin).

Only an image with a non-finite pixel in the band needs the CSR form
(:func:`.sparse.redo_nonfinite`); the engine derives that matrix, the same
as a build makes it, on first use.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import scipy.sparse as sp

from .sparse import check_finite

__all__ = ["GatherEngine"]

_INTP = np.dtype(np.intp)


class GatherEngine:
    """A polar map with one pixel of weight 1 per bin, applied as a gather. Immutable.

    Parameters
    ----------
    index : ndarray of int (nq * nphi,)
        The column each bin takes (0 for the empty bins). intp to be
        applied; int32 as unpickled (see :meth:`ready`).
    empty : ndarray of intp
        The bins that take no pixel: they are 0.
    n_columns : int
        The columns of the map (the pixels it may read).
    """

    def __init__(self, index: np.ndarray, empty: np.ndarray, n_columns: int) -> None:
        self._index = index
        self._empty = empty
        self._n_columns = int(n_columns)

    @classmethod
    def from_matrix(cls, m: sp.csr_matrix) -> GatherEngine | None:
        """The gather of a CSR map with at most one weight per row, all 1; else None."""
        counts = np.diff(m.indptr)
        if counts.max(initial=0) > 1 or not np.all(m.data == 1):
            return None
        full = counts == 1
        index = np.zeros(m.shape[0], dtype=np.intp)
        index[full] = m.indices
        return cls(index, np.flatnonzero(~full), m.shape[1])

    @property
    def index(self) -> np.ndarray:
        """The column each bin takes (0 for the empty bins)."""
        return self._index

    @property
    def empty(self) -> np.ndarray:
        """The bins that take no pixel (intp)."""
        return self._empty

    @property
    def n_bins(self) -> int:
        return int(self._index.size)

    @property
    def n_columns(self) -> int:
        return self._n_columns

    @property
    def is_ready(self) -> bool:
        """Whether the index is intp (what ``take`` uses without a conversion per call)."""
        return self._index.dtype == _INTP

    def ready(self) -> GatherEngine:
        """This engine with an intp index: itself, or (as unpickled) a widened copy.

        An unpickled engine keeps its int32 index until it is applied, so
        that a process that only passes it on (Dask's scheduler unpickles a
        graph and pickles each task again) converts nothing.
        """
        if self.is_ready:
            return self
        return GatherEngine(self._index.astype(np.intp), self._empty, self._n_columns)

    @property
    def nbytes(self) -> int:
        """Bytes held once applied: the index as intp, the empty bins, and the CSR
        matrix when it has been derived."""
        n = self._index.size * _INTP.itemsize + self._empty.nbytes
        m = self.__dict__.get("matrix")
        if m is not None:
            n += m.data.nbytes + m.indices.nbytes + m.indptr.nbytes
        return int(n)

    def _full(self) -> np.ndarray:
        """Boolean per bin: the bins that take a pixel."""
        full = np.ones(self._index.size, dtype=bool)
        full[self._empty] = False
        return full

    @functools.cached_property
    def matrix(self) -> sp.csr_matrix:
        """The map as a CSR matrix (derived on first use, not pickled)."""
        full = self._full()
        indptr = np.zeros(full.size + 1, dtype=np.int32)
        np.cumsum(full, dtype=np.int32, out=indptr[1:])
        indices = self._index[full].astype(np.int32)
        return sp.csr_matrix((np.ones(indices.size, dtype=np.float32), indices, indptr),
                             shape=(full.size, self._n_columns))

    @functools.cached_property
    def used_columns(self) -> np.ndarray:
        """Boolean per column: the pixels the map reads (derived once, not pickled)."""
        used = np.zeros(self._n_columns, dtype=bool)
        used[self._index[self._full()]] = True
        return used

    def apply(self, x: np.ndarray, y: np.ndarray) -> int:
        """``y[b] = x[index[b]]``, 0 in the empty bins (float32, in place); NaN in the
        bins that read a non-finite pixel. Returns the number of non-finite pixels read."""
        np.take(x, self._index, out=y, mode="clip")  # (clip: no buffering; all in range)
        y[self._empty] = 0
        return check_finite(self, x, y)

    def finish_gathered(self, y: np.ndarray) -> int:
        """Finish a flat polar image ``y`` whose bins were gathered from the image.

        ``y`` (float32, C-contiguous, in place) holds the pixel each bin
        takes; its empty bins are set to 0 and the bins that read a
        non-finite pixel to NaN: what :meth:`apply` gives, bit for bit.
        Returns the number of bins that read a non-finite pixel.
        """
        y[self._empty] = 0
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: NaN, caught below
            total = float(y.sum())
        if math.isfinite(total):
            return 0
        bad = ~np.isfinite(y)  # (none: a finite image whose float32 sum overflowed)
        y[bad] = np.nan
        return int(np.count_nonzero(bad))

    def compact(self, new_column: np.ndarray, n_columns: int) -> GatherEngine:
        """The same map on renumbered columns: column ``j`` becomes ``new_column[j]``."""
        full = self._full()
        index = np.zeros(self._index.size, dtype=np.intp)
        index[full] = new_column[self._index[full]]
        return GatherEngine(index, self._empty, n_columns)

    def __reduce__(self) -> tuple[Any, ...]:
        # travels as an int32 index (4 bytes per bin instead of 8); an index that came
        # as int32 is sent on as it came
        index = self._index
        if index.dtype != np.int32 and self._n_columns < 2**31:
            index = index.astype(np.int32)
        return (GatherEngine, (index, self._empty, self._n_columns))

    def __repr__(self) -> str:
        return (f"GatherEngine({self.n_bins} bins x {self._n_columns} columns, "
                f"{self._empty.size} empty)")
