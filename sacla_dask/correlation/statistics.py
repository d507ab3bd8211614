"""Statistics over pairs of difference correlations: sums, bootstrap, outliers.

Statistics over pairs are sums (:class:`PairSums`: number of pairs, per-bin
sum, sum of squares and count, optional Poisson-bootstrap sums) that merge
by ``+`` and remove pairs by ``-``; :func:`finalize` turns them into the
mean, standard error, count and bootstrap percentile interval per bin.
Overlapping consecutive pairs share shots, so their correlations are
correlated: pairs are summed in :func:`pair_order`, the product of each
pair's correlation with that of the pair before it when they share a shot
(:func:`pair_links`) is summed too, and the standard error is that of a
1-dependent sequence; the bootstrap draws such pairs in blocks
(:func:`bootstrap_blocks`). :func:`robust_outliers` rejects pairs whose
difference statistic (the mean squared normalised difference) stands out
robustly.

The kernel :func:`pair_sums` correlates in the images' precision (float32
for the pipeline's polar images) and sums in float64, a pair at a time in
cache-sized blocks of rows, so its memory is that of the sums whatever the
number of pairs. :func:`summarize_pairs` is the eager numpy reference of
the Dask graph :func:`sacla_dask.correlation.graph.pair_statistics`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.fft

from .. import config
from ..errors import ParameterError
from .kernels import (
    MAD_TO_SIGMA,
    _difference,
    _lag_counts,
    _lag_products,
    _stat,
    fourier_coefficients,
    full_lags,
)
from .plan import CorrelationPlan


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
        if self.boot_s1 is not None and corr.shape[0]:  # (no pair: no weight to apply)
            if weights is None:
                raise ParameterError("bootstrap sums need the pairs' bootstrap weights")
            k = corr.shape[0]
            w = np.asarray(weights, dtype=np.float64).reshape(-1, k)
            self.boot_s1 += (w @ x.reshape(k, -1)).reshape(self.boot_s1.shape)
            self.boot_w += (w @ ok.reshape(k, -1).astype(np.float64)).reshape(
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


def bootstrap_blocks(links: np.ndarray, length: int | None = None) -> np.ndarray:
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

    Parameters
    ----------
    links : bool array (npair,)
        :func:`pair_links` of the pairs, in the order they are summed.
    length : int, optional
        Pairs per block (default: the setting ``correlation.bootstrap-block``,
        :mod:`sacla_dask.config`).

    Returns
    -------
    int array (npair,)
    """
    links = np.asarray(links, dtype=bool)
    if length is None:
        length = int(config.get("correlation.bootstrap-block"))
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
              hold_above: float | None = None, hold_max: int | None = None,
              block_bytes: int | None = None, links: np.ndarray | None = None
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
    hold_max : int, optional
        Default: the setting ``correlation.hold-out-max``
        (:mod:`sacla_dask.config`).
    block_bytes : int, optional
        Approximate size of the float64 work arrays of a block of rows
        (default: the setting ``correlation.block-bytes``).
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
               hold_above: float | None = None, hold_max: int | None = None,
               block_bytes: int | None = None, links: np.ndarray | None = None,
               linked: bool | None = None
               ) -> tuple[PairSums, np.ndarray, np.ndarray | None, HeldPairs,
                          tuple[Edge | None, Edge | None]]:
    """:func:`pair_sums`, and the edges a fold links to its neighbours' pairs:
    the first pair's correlation when ``links[0]`` (it shares a shot with the
    pair before these) and the last pair's (None for a held-out pair).
    ``linked``: allocate ``s12`` (default: some pair is linked)."""
    if hold_max is None:
        hold_max = int(config.get("correlation.hold-out-max"))
    if block_bytes is None:
        block_bytes = config.get_bytes("correlation.block-bytes")
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


def _in_pair_order(ia: np.ndarray, ib: np.ndarray, keys: np.ndarray, order: np.ndarray,
                   block: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The pairs in ``order`` (:func:`pair_order`): their shots, :func:`pair_links`, and
    the keys of their bootstrap weights (each pair its block's first pair's,
    :func:`bootstrap_blocks` of ``block`` pairs)."""
    sa, sb = ia[order], ib[order]
    links = pair_links(sa, sb)
    return sa, sb, links, keys[order][bootstrap_blocks(links, block)]


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
