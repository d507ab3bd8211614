"""Dask graphs of pair correlations and of their statistics over pairs.

:func:`correlate_pairs` makes every pair's correlation a lazy array;
:func:`pair_statistics` reduces the pairs to their statistics in one pass
over the polar images, with memory that does not grow with the number of
pairs. Its graph has these stages, each a top-level task function lifting
a numpy kernel of :mod:`~sacla_dask.correlation.statistics`:

groups
    Pairs are grouped by the tag chunk of their later shot, their *home*
    (:func:`_home_groups`): one task per group (:func:`_group_task`) sums
    its pairs (:func:`~sacla_dask.correlation.statistics.pair_sums`) from
    its home block and, of earlier chunks, only the rows of its shots there
    (:func:`_take_rows`, or the block's halo row), so a pair straddling two
    chunks is computed like any other.
fold
    The group sums are folded in chunk order into one running sum, a few
    at a time (:func:`_merge_partials`).
rejection
    Outlier rejection (:func:`~sacla_dask.correlation.statistics.robust_outliers`)
    needs every pair's statistic before it knows which pairs to drop; rather
    than reading the data twice, the sums over *all* pairs are accumulated
    in the one pass, and the few rejected pairs are then recomputed from
    their shots and subtracted (:func:`_correct_task`).
finalize
    Mean, standard error, count and bootstrap interval per bin
    (:func:`~sacla_dask.correlation.statistics.finalize`).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph
from dask.sizeof import sizeof

from .. import config
from ..errors import ParameterError, SaclaDaskError
from ..scheduling import chunk_first
from .kernels import difference_correlation
from .plan import CorrelationPlan
from .statistics import (
    Edge,
    HeldPairs,
    PairSums,
    _Accumulator,
    _in_pair_order,
    _sum_pairs,
    bootstrap_weights,
    finalize,
    pair_order,
    pair_sums,
    robust_outliers,
)


# -- pairs grouped by tag chunk ------------------------------------------------
def _chunk_of(bounds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The tag chunk holding each position, given the chunks' ``bounds`` (cumulative sizes)."""
    return np.searchsorted(bounds, positions, side="right") - 1


def _runs(key: np.ndarray) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of equal values in ``key``."""
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], key.size]
    return [(int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


def _pair_groups(tag_chunks: tuple[int, ...], ia: np.ndarray,
                 ib: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int, int]]]:
    """Sort pairs by (chunk of a, chunk of b); return (order, bounds, groups).

    ``groups`` holds ``(chunk_a, chunk_b, start, end)`` over the sorted
    pairs: each group's task takes one or two whole blocks
    (:func:`correlate_pairs`).
    """
    bounds = np.cumsum((0,) + tuple(tag_chunks))
    ca, cb = _chunk_of(bounds, ia), _chunk_of(bounds, ib)
    order = np.lexsort((ib, ia, cb, ca))
    runs = _runs(ca[order] * len(bounds) + cb[order])
    return order, bounds, [(int(ca[order][s]), int(cb[order][s]), s, e) for s, e in runs]


def _home_groups(tag_chunks: tuple[int, ...], ia: np.ndarray,
                 ib: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int]]]:
    """Sort pairs in :func:`pair_order`, grouped by their home chunk, that of their later
    shot; return (order, bounds, groups).

    ``groups`` holds ``(chunk, start, end)`` over the sorted pairs. The rows
    a group needs from other chunks then lie in earlier chunks, which are
    computed first: a group can run as soon as its home block exists, and
    a block is freed as soon as its own group, its write and the row copies
    taken from it are done (a home at the earlier shot would make each
    block wait for the next chunk's, and blocks pile up on a worker that
    runs ahead).
    """
    bounds = np.cumsum((0,) + tuple(tag_chunks))
    home = _chunk_of(bounds, np.maximum(ia, ib))
    order = pair_order(ia, ib)  # already grouped by home, the chunk of the later shot
    sc = home[order]
    return order, bounds, [(int(sc[s]), s, e) for s, e in _runs(sc)]


# -- every pair's correlation -------------------------------------------------
def _check_polar(polar: da.Array, ia: np.ndarray, ib: np.ndarray) -> da.Array:
    """Refuse bad pair positions; ``polar`` with whole (q, phi) chunks."""
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
    deps: list[Any] = [polar]
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=deps)
    chunks = (tuple(e - s for _, _, s, e in groups), (plan.nqp,), (plan.nphi,))
    return da.Array(graph, name, chunks, meta=np.empty((0, 0, 0), np.float64)), order


def _corr_group(plan: CorrelationPlan, la: np.ndarray, lb: np.ndarray, block_a: np.ndarray,
                block_b: np.ndarray | None = None) -> np.ndarray:
    block_b = block_a if block_b is None else block_b
    return difference_correlation(block_a[la], block_b[lb], plan)


# -- the tasks of pair_statistics (run on the workers) ------------------------
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
    # Dask sizes task results to place tasks and to manage worker memory: a partial is
    # its arrays (a wide band's partial sums are ~110 MB), not a small Python object
    edges = sum(e.x.nbytes + e.ok.nbytes for e in (p.first, p.last) if e is not None)
    return sizeof(p.sums) + p.stat.nbytes + sizeof(p.held) + edges


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
        c = _chunk_of(self.bounds, positions)
        return np.stack([self.blocks[ci][p - self.bounds[ci]]
                         for ci, p in zip(c, positions, strict=True)])


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
                  links: np.ndarray | None, batch_bytes: int) -> PairSums:
    """Final sums: add the held-out pairs that are kept, subtract the other rejected
    pairs; and the products of linked pairs (:func:`_relinked`).

    The pairs to recompute are taken a batch at a time, in pair order, so
    that a batch's polar rows take about ``batch_bytes`` (a wide band's
    polar image is 28 MB, and a long run may reject a hundred pairs;
    the graph passes the setting ``correlation.correct-bytes``).
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


# -- the graph of pair_statistics ----------------------------------------------
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


@dataclasses.dataclass(frozen=True)
class PairStatisticsOptions:
    """How :func:`pair_statistics` summarises the pairs.

    Attributes
    ----------
    reject : float or None
        Reject pairs whose difference statistic is this many robust sigmas
        high (:func:`~sacla_dask.correlation.statistics.robust_outliers`);
        None or 0: keep every pair.
    n_boot : int
        Poisson-bootstrap resamples (0: none). Memory: each partial sum
        holds ``2 n_boot nqp nlag`` float64 (``nlag``:
        :attr:`CorrelationPlan.nlag`); time: ``2 n_boot nqp nlag`` flops per
        pair (a matrix product), several times the correlation itself for
        ``n_boot = 100``.
    ci : float
        Level of the bootstrap percentile interval, in (0, 1).
    seed : int
        Bootstrap seed.
    keep_pairs : bool
        Also return the per-pair correlations (float32).
    split_every : int or None
        Group sums added to the running sum per fold step (default: 8,
        fewer for large partial sums, so that a step takes about the
        setting ``correlation.merge-bytes``; at least 1).
    block_bytes : int or None
        Bytes of the float64 work arrays of a block of q rows in the pair
        kernel (:func:`~sacla_dask.correlation.statistics.pair_sums`;
        default: the setting ``correlation.block-bytes``).
    hold_out_max : int or None
        Pairs held out of the sums per group task (0 = always subtract;
        :func:`pair_statistics`; default: the setting
        ``correlation.hold-out-max``).

    The defaults (None) are read from :mod:`sacla_dask.config` when
    :func:`pair_statistics` builds its graph.
    """

    reject: float | None = None
    n_boot: int = 0
    ci: float = 0.95
    seed: int = 0
    keep_pairs: bool = False
    split_every: int | None = None
    block_bytes: int | None = None
    hold_out_max: int | None = None

    def check(self) -> None:
        """Raise :class:`ParameterError` for a value out of range."""
        if self.n_boot < 0:
            raise ParameterError(f"bootstrap resamples must be >= 0 (got {self.n_boot})")
        if self.n_boot and not 0 < self.ci < 1:
            raise ParameterError(f"confidence level must be in (0, 1) (got {self.ci})")
        if self.reject is not None and not self.reject > 0:
            raise ParameterError(
                f"outlier threshold must be > 0 robust sigmas (got {self.reject})")

    def fold_width(self, plan: CorrelationPlan, linked: bool,
                   merge_bytes: int | None = None) -> int:
        """Group sums per fold step: :attr:`split_every`, or by default as many as fit
        in ``merge_bytes`` (default: the setting ``correlation.merge-bytes``) with the
        running sum (1 to 8)."""
        split_every = self.split_every
        if split_every is None:
            if merge_bytes is None:
                merge_bytes = config.get_bytes("correlation.merge-bytes")
            # a fold step holds the running sum and its inputs: a pair of float64 (nqp,
            # nlag) arrays each (a wide band's is ~55 MB), the bootstrap sums, and with
            # linked pairs their products and the first and last pairs' correlations and
            # bins (26 bytes per bin more)
            part = (16 * (1 + int(self.n_boot)) + (26 if linked else 0)) * plan.nqp * plan.nlag
            split_every = int(min(8, max(1, merge_bytes // max(part, 1) - 1)))
        if split_every < 1:
            raise ParameterError(f"split_every must be >= 1 (got {split_every})")
        return split_every


@dataclasses.dataclass(frozen=True)
class _Tunables:
    """The ``correlation.*`` settings a graph of :func:`pair_statistics` uses.

    Read once, where the graph is built, and passed into its tasks: a
    worker's own configuration cannot change the result, and the graph's
    token holds them.
    """

    block_bytes: int
    hold_out_max: int
    hold_out_stat: float
    merge_bytes: int
    correct_bytes: int
    bootstrap_block: int

    @classmethod
    def read(cls, opts: PairStatisticsOptions) -> _Tunables:
        """The settings now (:mod:`sacla_dask.config`), ``opts``' sizes where given."""
        return cls(
            block_bytes=(config.get_bytes("correlation.block-bytes")
                         if opts.block_bytes is None else int(opts.block_bytes)),
            hold_out_max=(int(config.get("correlation.hold-out-max"))
                          if opts.hold_out_max is None else int(opts.hold_out_max)),
            hold_out_stat=float(config.get("correlation.hold-out-stat")),
            merge_bytes=config.get_bytes("correlation.merge-bytes"),
            correct_bytes=config.get_bytes("correlation.correct-bytes"),
            bootstrap_block=int(config.get("correlation.bootstrap-block")),
        )


def _with_settings(options: PairStatisticsOptions | None,
                   settings: Mapping[str, Any]) -> PairStatisticsOptions:
    """``options`` (default :class:`PairStatisticsOptions()`) with the keywords ``settings``."""
    opts = PairStatisticsOptions() if options is None else options
    known = {f.name for f in dataclasses.fields(PairStatisticsOptions)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"pair_statistics() got unexpected keyword arguments {unknown}")
    return dataclasses.replace(opts, **settings) if settings else opts


@dataclasses.dataclass(frozen=True)
class _SortedPairs:
    """The pairs in :func:`pair_order`, grouped by home chunk (:func:`_home_groups`).

    ``a``, ``b``: tag positions of their shots; ``keys``: those of their
    bootstrap weights (:func:`~sacla_dask.correlation.statistics._in_pair_order`);
    ``links``: :func:`~sacla_dask.correlation.statistics.pair_links`, None
    when no pair is linked; ``inv``: the input order (None: the same).
    """

    a: np.ndarray
    b: np.ndarray
    keys: np.ndarray
    links: np.ndarray | None
    bounds: np.ndarray
    groups: list[tuple[int, int, int]]
    inv: np.ndarray | None

    @classmethod
    def of(cls, tag_chunks: tuple[int, ...], ia: np.ndarray, ib: np.ndarray,
           keys: np.ndarray, boot_block: int) -> _SortedPairs:
        order, bounds, groups = _home_groups(tag_chunks, ia, ib)
        sa, sb, links, sk = _in_pair_order(ia, ib, keys, order, boot_block)
        inv = None if np.array_equal(order, np.arange(order.size)) else np.argsort(order)
        return cls(sa, sb, sk, links if links.any() else None, bounds, groups, inv)


def _group_sources(dsk: dict[Any, Any], internal: str, g: int, polar: da.Array,
                   halo: da.Array | None, bounds: np.ndarray, home: int, sa: np.ndarray,
                   sb: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[Any], bool]:
    """The blocks group ``g`` reads and its pairs' rows in them: ``(la, lb, blocks, halo
    used)``.

    The group runs on its home chunk's block; of other (earlier) chunks it
    needs, and so moves between workers, only the rows of its pairs' shots
    there: a row-copy task per chunk (added to ``dsk``), or the halo row
    made with the home block when that is the one row needed. ``la``/``lb``
    index the home block, then those rows in turn.
    """
    pos_ab = np.concatenate([sa, sb])
    local = np.empty(pos_ab.size, dtype=np.int64)
    cab = _chunk_of(bounds, pos_ab)
    at_home = cab == home
    local[at_home] = pos_ab[at_home] - bounds[home]
    blocks: list[Any] = [(polar.name, home, 0, 0)]
    halo_used = False
    offset = int(polar.chunks[0][home])
    for c in np.unique(cab[~at_home]):
        sel = cab == c
        pos, li = np.unique(pos_ab[sel] - bounds[c], return_inverse=True)
        if halo is not None and c == home - 1 and pos.tolist() == [polar.chunks[0][c] - 1]:
            blocks.append((halo.name, int(home), 0, 0))  # made with the home block
            halo_used = True
        else:
            rk = (internal, "rows", g, int(c))
            dsk[rk] = (_take_rows, (polar.name, int(c), 0, 0), pos)
            blocks.append(rk)
        local[sel] = offset + li
        offset += pos.size
    return local[:sa.size], local[sa.size:], blocks, halo_used


def _add_group_tasks(dsk: dict[Any, Any], internal: str, plan_key: Any, polar: da.Array,
                     halo: da.Array | None, pairs: _SortedPairs, n_boot: int,
                     opts: PairStatisticsOptions,
                     settings: _Tunables) -> tuple[list[Any], list[Any], bool]:
    """One :func:`_group_task` per home chunk.

    Returns the keys of the groups' partial sums, those of the tasks that
    also return the pairs' correlations (with ``keep_pairs``), and whether
    some group takes a row from the halo.
    """
    hold = settings.hold_out_stat if opts.reject else None
    halo_used = False
    part_keys, pair_keys = [], []
    for g, (h, s, e) in enumerate(pairs.groups):
        la, lb, blocks, used = _group_sources(dsk, internal, g, polar, halo, pairs.bounds, h,
                                              pairs.a[s:e], pairs.b[s:e])
        halo_used |= used
        gk = (internal, "group", g)
        dsk[gk] = (_group_task, plan_key, la, lb, pairs.keys[s:e], s, n_boot, opts.seed,
                   opts.keep_pairs, hold, settings.hold_out_max, settings.block_bytes,
                   None if pairs.links is None else pairs.links[s:e], *blocks)
        if opts.keep_pairs:
            dsk[(internal, "partial", g)] = (operator.getitem, gk, 0)
            part_keys.append((internal, "partial", g))
            pair_keys.append(gk)
        else:
            part_keys.append(gk)
    return part_keys, pair_keys, halo_used


def _add_fold_tasks(dsk: dict[Any, Any], internal: str, part_keys: list[Any],
                    split_every: int) -> Any:
    """Fold the group sums, in chunk order, into one running sum, ``split_every`` at a
    time (:func:`_merge_partials`); return the key of the total.

    The workers then hold the running sum and the few newest group results,
    however long the run (a tree would hold a partial per level waiting for
    its sibling, log2(groups) of them).
    """
    acc = part_keys[0]
    for j, i in enumerate(range(1, len(part_keys), split_every)):
        k = (internal, "fold", j)
        dsk[k] = (_merge_partials, [acc, *part_keys[i:i + split_every]])
        acc = k
    return acc


def _add_rejection_tasks(dsk: dict[Any, Any], internal: str, root: Any, plan_key: Any,
                         polar: da.Array, pairs: _SortedPairs, npair: int, n_boot: int,
                         opts: PairStatisticsOptions, settings: _Tunables, reload: Any,
                         reload_key: Any) -> tuple[Any, Any]:
    """The outlier rejection (:func:`_reject_task`) and the correction of the sums
    (:func:`_correct_task`); return the keys of the rejection and of the final sums.

    Without ``reject`` no pair is rejected and the sums are the fold's.
    The rejected pairs are recomputed from ``reload`` (a callable, or the
    key of a Delayed one), else from the blocks of ``polar``.
    """
    rej_key = (internal, "rejection")
    if not opts.reject:
        dsk[rej_key] = (tuple, [np.zeros(npair, dtype=bool), float("inf")])
        return rej_key, root
    dsk[rej_key] = (_reject_task, root, float(opts.reject))
    if reload is None:
        source: Any = (_BlockRows, pairs.bounds,
                       [(polar.name, c, 0, 0) for c in range(len(polar.chunks[0]))])
    elif reload_key is not None:
        source = reload_key
    else:
        source = reload
    corrected = (internal, "corrected")
    dsk[corrected] = (_correct_task, root, rej_key, plan_key, pairs.a, pairs.b, pairs.keys,
                      n_boot, opts.seed, settings.block_bytes, source, pairs.links,
                      settings.correct_bytes)
    return rej_key, corrected


def _task_chunk(home_of: dict[int, int], key: Any) -> int:
    """The tag chunk in whose turn a task runs (:func:`chunk_first`).

    A group runs in its home chunk's turn, a row copy in its source
    chunk's (so that block is freed early); merges and the rest keep
    priority 0: they run as soon as they can and free partial sums early.
    """
    if isinstance(key, tuple) and len(key) > 2:
        if key[1] == "rows":
            return int(key[3])
        if key[1] in ("group", "partial"):
            return home_of[key[2]]
    return 0


def _output(hlg: HighLevelGraph, internal: str, name: str, layer: dict[Any, Any],
            chunks: tuple[tuple[int, ...], ...], dtype: Any) -> da.Array:
    """A dask array of the tasks ``layer`` (named ``name``) over the internal graph."""
    layers: dict[str, Any] = dict(hlg.layers)
    layers[name] = layer
    dependencies = dict(hlg.dependencies)
    dependencies[name] = {internal}
    meta = np.empty((0,) * len(chunks), dtype=dtype)
    return da.Array(HighLevelGraph(layers, dependencies), name, chunks, meta=meta)


def _lazy_results(hlg: HighLevelGraph, internal: str, token: str, final: Any, root: Any,
                  rej_key: Any, plan: CorrelationPlan, pairs: _SortedPairs, npair: int,
                  n_boot: int, pair_keys: list[Any]) -> LazyPairStatistics:
    """The arrays of :class:`LazyPairStatistics`, each one task over the internal graph
    (the per-pair correlations one per group)."""

    def out(label: str, task: Any, chunks: tuple[tuple[int, ...], ...], dtype: Any) -> da.Array:
        name = f"{label}-{token}"
        return _output(hlg, internal, name, {(name,) + (0,) * len(chunks): task}, chunks, dtype)

    def pick(label: str, field: str, chunks: tuple[tuple[int, ...], ...],
             dtype: Any) -> da.Array:
        return out(label, (operator.getitem, final, field), chunks, dtype)

    rows = ((plan.nqp,), (plan.nphi,))
    harmonics = ((plan.nqp,), (plan.nphi // 2 + 1,))
    res = LazyPairStatistics(
        mean=pick("pair-mean", "mean", rows, np.float64),
        sem=pick("pair-sem", "sem", rows, np.float64),
        count=pick("pair-count", "count", rows, np.int64),
        stat=out("pair-stat", (_stat_in_order, root, pairs.inv), ((npair,),), np.float64),
        rejected=out("pair-rejected", (_rejected_in_order, rej_key, pairs.inv), ((npair,),),
                     bool),
        threshold=out("pair-threshold", (np.float64, (operator.getitem, rej_key, 1)), (),
                      np.float64),
        n_pairs=pick("pair-count-total", "n_pairs", (), np.int64),
    )
    if n_boot:
        res.ci_low = pick("pair-ci-low", "ci_low", rows, np.float64)
        res.ci_high = pick("pair-ci-high", "ci_high", rows, np.float64)
        res.fourier_ci_low = pick("pair-fourier-ci-low", "fourier_ci_low", harmonics,
                                  np.float64)
        res.fourier_ci_high = pick("pair-fourier-ci-high", "fourier_ci_high", harmonics,
                                   np.float64)
    if pair_keys:
        name = "pair-correlations-" + token
        layer = {(name, g, 0, 0): (operator.getitem, k, 1) for g, k in enumerate(pair_keys)}
        chunks = (tuple(e - s for _, s, e in pairs.groups), (plan.nqp,), (plan.nphi,))
        arr = _output(hlg, internal, name, layer, chunks, np.float32)
        res.pairs = arr if pairs.inv is None else arr[pairs.inv]
    return res


def pair_statistics(polar: da.Array, ia: np.ndarray, ib: np.ndarray, plan: CorrelationPlan,
                    options: PairStatisticsOptions | None = None, *,
                    keys: np.ndarray | None = None, reload: Any = None,
                    halo: da.Array | None = None, **settings: Any) -> LazyPairStatistics:
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
    the setting ``correlation.hold-out-stat`` (100, where ordinary pairs
    are 1e-3..1) are never mixed into the sums: each group task returns
    them apart (at most ``hold_out_max`` per group), and they are added
    back only if kept.
    The recomputed pairs' statistics are checked against the first pass.

    Parameters
    ----------
    polar : dask array (tag, nq, nphi)
        Normalised polar images (NaN marks shot-specific masked bins).
    ia, ib : int arrays (npair,)
        Positions of the pairs' shots on the tag axis.
    plan : CorrelationPlan
    options : PairStatisticsOptions, optional
        Rejection, bootstrap, kept pairs and the graph's sizes (default:
        none of them, default sizes).
    keys : int array (npair, 2), optional
        Non-negative pair identities that seed each pair's bootstrap
        weights (default the positions; tag numbers make the resamples
        independent of the selection). Linked pairs (overlapping
        consecutive pairs) are drawn in blocks of the setting
        ``correlation.bootstrap-block`` (:func:`bootstrap_blocks`).
    reload : callable or dask Delayed, optional
        ``reload(positions) -> (k, nq, nphi)`` rows of ``polar`` at sorted
        tag positions, used to recompute rejected pairs without holding
        ``polar`` in memory (the pipeline re-reads those shots' raw images).
        Default: the correction depends on every chunk of ``polar``, which
        dask then keeps until the end (fine for in-memory arrays).
    halo : dask array (tag, nq, nphi), optional
        For each block of ``polar`` after the first, the last row of the
        block before it, made by the same task as the block (chunks
        ``(0, 1, 1, ...)``): a group that needs only that row of the
        previous block (consecutive pairs across a chunk boundary) takes it
        from there, so it neither waits for nor copies from the task of the
        previous block, which may run on another worker (the pipeline makes
        it for large polar images, :func:`sacla_dask.graph.polar_arrays`).
        Its rows must equal those of ``polar``.
    **settings
        Fields of :class:`PairStatisticsOptions` as keywords (``reject=3,
        n_boot=100, ...``), replacing those of ``options``.

    Returns
    -------
    LazyPairStatistics

    Notes
    -----
    The ``correlation.*`` settings (:mod:`sacla_dask.config`) are read here,
    when the graph is built, and passed into its tasks.
    """
    opts = _with_settings(options, settings)
    ia = np.asarray(ia, dtype=np.int64)
    ib = np.asarray(ib, dtype=np.int64)
    polar = _check_polar(polar, ia, ib)
    opts.check()
    conf = _Tunables.read(opts)
    keys = np.stack([ia, ib], axis=1) if keys is None else np.asarray(keys, np.int64)
    pairs = _SortedPairs.of(polar.chunks[0], ia, ib, keys, conf.bootstrap_block)
    split_every = opts.fold_width(plan, pairs.links is not None, conf.merge_bytes)
    n_boot = int(opts.n_boot)
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
    token = dask.base.tokenize(polar.name, ia, ib, keys, plan, opts.reject, n_boot, opts.ci,
                               opts.seed, opts.keep_pairs, split_every,
                               dataclasses.astuple(conf), reload_key, type(reload).__name__,
                               None if halo is None else halo.name)
    internal = "pair-statistics-" + token
    plan_key = (internal, "plan")
    dsk: dict[Any, Any] = {plan_key: plan}
    part_keys, pair_keys, halo_used = _add_group_tasks(dsk, internal, plan_key, polar, halo,
                                                       pairs, n_boot, opts, conf)
    if halo_used:  # (a halo no group takes from is no dependency)
        deps.append(halo)
    root = _add_fold_tasks(dsk, internal, part_keys, split_every)
    rej_key, total = _add_rejection_tasks(dsk, internal, root, plan_key, polar, pairs, ia.size,
                                          n_boot, opts, conf, reload, reload_key)
    final = (internal, "final")
    dsk[final] = (_finalize_task, total, float(opts.ci))
    home_of = {g: h for g, (h, _, _) in enumerate(pairs.groups)}
    with chunk_first(functools.partial(_task_chunk, home_of)):
        hlg = HighLevelGraph.from_collections(internal, dsk, dependencies=deps)
    return _lazy_results(hlg, internal, token, final, root, rej_key, plan, pairs, ia.size,
                         n_boot, pair_keys)
