"""Shots grouped by an event field: pairs within each group, statistics per group.

``group_by`` names an event field (:mod:`~sacla_dask.shots.fields`); each
distinct value of it among the selected shots is a group (a laser on/off
status), or, with ``bins`` (increasing edges), each bin ``[e_i, e_i+1)``
holding a selected shot is one (a delay scan; the last bin is closed).
Selected shots outside every bin, or without a value (NaN), are in no
group and not paired.

Planning (:func:`shot_groups`, :func:`grouped_pairs`): each group is paired
on its own, with the plan's pairing (consecutive shots of the group,
similarity pairs among them, or the pairs of a list whose two tags are in
the group): no pair mixes groups. The plan's pairs are ordered group by
group (``ProcessingPlan.groups.pair_group``).

The graph (:func:`grouped_statistics`): the polar images are made once
(one graph); :func:`sacla_dask.correlation.pair_statistics` is called once
per group on that same lazy array, with the group's pairs, so each tag is
read once whatever the number of groups. The dataset
(:func:`grouped_variables`) stacks each group's correlation family along a
``group`` dimension; with exactly two groups it adds their difference
``corr_diff`` (the second group minus the first, as the attr
``difference`` says) and its standard error ``corr_diff_sem`` (the groups
share no shot: independent, ``sqrt(sem_a^2 + sem_b^2)``), and ``corr_fourier_diff``
with an upper bound of its standard error (:func:`fourier_sem_bound`). With more
groups the user takes the differences wanted (``docs/shots.md``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np

from ..errors import ParameterError
from ..io.run import Run
from .fields import event_fields, field_values, resolve_field

if TYPE_CHECKING:
    from ..correlation import LazyPairStatistics
    from ..graph import PolarArrays
    from ..plan import ProcessingPlan

#: the per-tag variable holding each shot's group (-1: none)
GROUP_VARIABLE = "shot_group"


@dataclasses.dataclass(frozen=True, eq=False)
class ShotGroups:
    """The groups of a run's shots.

    Attributes
    ----------
    field : str
        The event field's variable name; ``path`` its HDF5 path.
    values : ndarray float64 (ngroup,)
        Each group's value (distinct values) or bin centre.
    low, high : ndarray float64 (ngroup,) or None
        Each bin's edges (None for distinct values).
    labels : ndarray int64 (ntag,)
        The group of each tag (-1: none, or not selected).
    pair_group : ndarray int64 (npair,)
        The group of each of the plan's pairs (set by :func:`grouped_pairs`).
    n_pairs_across : int
        Pairs of a list (``pairs=``, a pairs file) whose two shots are in
        different groups: dropped (counted in ``n_pairs_dropped`` too).
    """

    field: str
    path: str
    values: np.ndarray
    low: np.ndarray | None
    high: np.ndarray | None
    labels: np.ndarray
    pair_group: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros(0, np.int64))
    n_pairs_across: int = 0

    @property
    def n(self) -> int:
        return int(self.values.size)

    def label(self, g: int) -> str:
        """What group ``g`` is, for people."""
        if self.low is None or self.high is None:
            return f"{self.field} = {self.values[g]:g}"
        close = "]" if g == self.n - 1 else ")"
        return f"{self.field} in [{self.low[g]:g}, {self.high[g]:g}{close}"

    def describe(self) -> dict[str, Any]:
        """The grouping as plain JSON values (the store's ``groups`` attr)."""
        out: dict[str, Any] = {
            "field": self.field, "path": self.path,
            "values": [float(v) for v in self.values],
            "labels": [self.label(g) for g in range(self.n)],
            "n_shots": [int((self.labels == g).sum()) for g in range(self.n)],
            "n_pairs": [int((self.pair_group == g).sum()) for g in range(self.n)],
            "n_pairs_across": int(self.n_pairs_across),
        }
        if self.low is not None and self.high is not None:
            out["edges"] = [float(v) for v in self.low] + [float(self.high[-1])]
        return out


def shot_groups(run: Run, group_by: str, bins: Sequence[float] | None = None) -> ShotGroups:
    """Group the selected shots of ``run`` by the event field ``group_by``.

    Raises
    ------
    ParameterError
        Naming ``group_by`` (or ``group_bins``): an unknown or ambiguous
        field, edges not increasing, or fewer than two groups with a shot.
    """
    field = resolve_field(event_fields(run), group_by, "group_by")
    v = np.asarray(field_values(run, field), dtype=np.float64)
    sel = np.asarray(run.selected, dtype=bool) & np.isfinite(v)
    labels = np.full(len(run), -1, dtype=np.int64)
    low = high = None
    if bins is None:
        values = np.unique(v[sel])
        labels[sel] = np.searchsorted(values, v[sel])
    else:
        edges = np.asarray(bins, dtype=np.float64).ravel()
        if edges.size < 2 or not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
            raise ParameterError(f"group_bins must be at least two increasing, finite edges "
                                 f"(got {list(bins)})")
        idx = np.searchsorted(edges, v, side="right") - 1
        idx[v == edges[-1]] = edges.size - 2  # the last bin is closed
        inside = sel & (idx >= 0) & (idx < edges.size - 1)
        used = np.unique(idx[inside])
        labels[inside] = np.searchsorted(used, idx[inside])
        low, high = edges[used], edges[used + 1]
        values = (low + high) / 2
    if values.size < 2:
        found = ("no selected shot has a value" if values.size == 0 else
                 f"every selected shot has {field.name} "
                 + (f"= {values[0]:g}" if bins is None else
                    f"in [{low[0]:g}, {high[0]:g}]"))  # type: ignore[index]
        raise ParameterError(f"group_by {group_by!r}: a grouping needs at least two groups, "
                             f"but {found} ({int(sel.sum())} selected shots); choose another "
                             "field" + ("" if bins is None else " or other group_bins"))
    return ShotGroups(field.name, field.path, values, low, high, labels)


def with_group_labels(run: Run, groups: ShotGroups) -> Run:
    """``run`` with its shots' groups as the per-tag variable ``shot_group``
    (written to the store with the event data) and the grouping in ``selection``."""
    ev = run.events.copy()
    ev[GROUP_VARIABLE] = ("tag", groups.labels.copy(),
                          {"long_name": f"group of the shot by {groups.field} (-1: none: "
                                        "not selected or outside every group)"})
    info = dict(run.selection)
    info["group_by"] = groups.field
    return run._replace(events=ev, selection=info)


PairsOf = Callable[[Run], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


def grouped_pairs(run: Run, groups: ShotGroups, pairs_of: PairsOf
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, ShotGroups]:
    """Pair each group on its own: ``pairs_of(run with only the group selected)``.

    Returns the pairs asked for, the positions of those kept (group by
    group), which were kept (in any group), and ``groups`` with
    ``pair_group`` (and, for a list of pairs, ``n_pairs_across``: listed
    pairs whose two selected shots are in different groups, dropped).

    Raises
    ------
    ParameterError
        When a group has fewer than two shots (no pair).
    """
    from ..errors import PairingError

    ias, ibs, gs = [], [], []
    arrs: list[np.ndarray] = []
    kepts: list[np.ndarray] = []
    for g in range(groups.n):
        member = groups.labels == g
        n = int(member.sum())
        if n < 2:
            raise ParameterError(f"group_by {groups.field!r}: the group {groups.label(g)} "
                                 f"has {n} selected shot(s): at least two are needed for a "
                                 "pair; choose other group_bins or another field")
        ev = run.events.copy()
        ev["selected"] = ("tag", np.asarray(run.selected, bool) & member,
                          ev["selected"].attrs)
        try:
            arr, ia, ib, kept = pairs_of(run._replace(events=ev))
        except PairingError as exc:
            raise PairingError(f"group {groups.label(g)}: {exc}") from None
        arrs.append(arr)
        kepts.append(kept)
        ias.append(ia)
        ibs.append(ib)
        gs.append(np.full(ia.size, g, np.int64))
    if all(a.shape == arrs[0].shape and np.array_equal(a, arrs[0]) for a in arrs):
        # one list of pairs asked for (a pairs file): kept when kept in any group
        pair_arr, kept_any = arrs[0], np.logical_or.reduce(kepts)
        across = _pairs_across(run, groups, pair_arr)
    else:  # pairs made for each group
        pair_arr, kept_any = np.concatenate(arrs), np.concatenate(kepts)
        across = 0
    out = dataclasses.replace(groups, pair_group=np.concatenate(gs), n_pairs_across=across)
    return pair_arr, np.concatenate(ias), np.concatenate(ibs), kept_any, out


def _pairs_across(run: Run, groups: ShotGroups, pair_arr: np.ndarray) -> int:
    """Listed pairs whose two tags are in the run, in a group, but not the same one."""
    from ..pairs import pair_indices

    ia, ib, _ = pair_indices(pair_arr, run.tags)
    ga, gb = groups.labels[ia], groups.labels[ib]
    return int(((ga >= 0) & (gb >= 0) & (ga != gb)).sum())


def group_plans(plan: ProcessingPlan) -> list[ProcessingPlan]:
    """One plan per group, holding only that group's pairs (the same run and transform)."""
    groups = plan.groups
    assert groups is not None
    return [dataclasses.replace(plan, ia=plan.ia[groups.pair_group == g],
                                ib=plan.ib[groups.pair_group == g], groups=None)
            for g in range(groups.n)]


def grouped_statistics(plan: ProcessingPlan, polar: PolarArrays, src: da.Array
                       ) -> tuple[LazyPairStatistics, list[LazyPairStatistics]]:
    """Each group's lazy pair statistics over the same polar images, and their per-pair
    results joined in the plan's pair order (for the per-pair variables)."""
    from ..correlation import LazyPairStatistics
    from ..graph import pair_statistics_of

    per = [pair_statistics_of(p, polar, src) for p in group_plans(plan)]
    joined = LazyPairStatistics(
        mean=per[0].mean, sem=per[0].sem, count=per[0].count,
        stat=da.concatenate([s.stat for s in per]),
        rejected=da.concatenate([s.rejected for s in per]),
        threshold=da.stack([s.threshold for s in per]),
        n_pairs=da.stack([s.n_pairs for s in per]),
        pairs=(da.concatenate([s.pairs for s in per]) if per[0].pairs is not None
               else None))
    return joined, per


def grouped_variables(plan: ProcessingPlan, per: list[LazyPairStatistics],
                      coords: dict[str, Any], data: dict[str, Any],
                      correlation_variables: Callable[..., dict[str, Any]]) -> None:
    """Add the correlation family of every group, stacked on ``group``, to ``data``
    (and the ``group`` coordinates to ``coords``); the difference of two groups."""
    groups = plan.groups
    assert groups is not None
    each = [correlation_variables(plan, st, coords) for st in per]
    for name in each[0]:
        dims, _, attrs = each[0][name]
        if dims[0] == "pair":  # every pair's correlation: the groups' pairs one after another
            data[name] = (dims, da.concatenate([e[name][1] for e in each]), attrs)
        else:
            data[name] = (("group",) + tuple(dims), da.stack([e[name][1] for e in each]),
                          attrs)
    data["n_pairs"] = (("group",), da.stack([st.n_pairs for st in per]),
                       {"long_name": "pairs averaged in each group (after outlier rejection)"})
    if "pair_stat_threshold" in data:
        dims, _, attrs = data["pair_stat_threshold"]
        data["pair_stat_threshold"] = (("group",), da.stack([st.threshold for st in per]),
                                       attrs)
    data["pair_group"] = (("pair",), groups.pair_group.copy(),
                          {"long_name": "group of each pair (index on group)"})
    what = f"{groups.field} ({groups.path})" if groups.path else groups.field
    coords["group"] = (("group",), groups.values.copy(),
                       {"long_name": f"value of {what} of the group" + (
                           "" if groups.low is None else " (bin centre)")})
    coords["group_index"] = (("group",), np.arange(groups.n),
                             {"long_name": "index of the group (shot_group, pair_group)"})
    if groups.low is not None and groups.high is not None:
        coords["group_low"] = (("group",), groups.low.copy(),
                               {"long_name": f"lower edge of the bin of {groups.field}"})
        coords["group_high"] = (("group",), groups.high.copy(),
                                {"long_name": f"upper edge of the bin of {groups.field} "
                                              "(excluded, except for the last bin)"})
    if groups.n == 2:
        diff = f"{groups.label(1)} minus {groups.label(0)}"
        for stem in ("corr", "corr_cross"):
            if stem not in data:
                continue
            dims, mean, _ = data[stem]
            sem = data[f"{stem}_sem"][1]
            data[f"{stem}_diff"] = (dims[1:], mean[1] - mean[0], {
                "long_name": f"difference of the groups' mean correlations: {diff}",
                "difference": diff})
            data[f"{stem}_diff_sem"] = (dims[1:], da.sqrt(sem[0] ** 2 + sem[1] ** 2), {
                "long_name": "standard error of the difference (the groups share no shot: "
                             "independent)", "difference": diff})
        if "corr_fourier" in data:
            dims, four, _ = data["corr_fourier"]
            bound = fourier_sem_bound(data["corr_sem"][1], np.asarray(coords["dphi"][1]),
                                      four.shape[-1])
            data["corr_fourier_diff"] = (dims[1:], four[1] - four[0], {
                "long_name": f"difference of the groups' Fourier coefficients Re c_n: {diff}",
                "difference": diff})
            data["corr_fourier_diff_sem"] = (dims[1:], da.sqrt(bound[0] ** 2 + bound[1] ** 2),
                                             {"long_name": "upper bound of the standard error "
                                                           "of corr_fourier_diff (each group's "
                                                           "(1/nphi) sum_k corr_sem_k |cos(n "
                                                           "dphi_k)|: lags taken as fully "
                                                           "correlated), groups independent",
                                              "difference": diff})


def fourier_sem_bound(sem: Any, dphi: np.ndarray, nn: int) -> Any:
    """An upper bound of the standard error of ``Re c_n`` from the per-lag ``sem``
    (``(..., dphi)``): ``(1/nphi) sum_k sem_k |cos(n dphi_k)|``, n = 0..nn-1.

    ``Re c_n`` is a fixed linear combination of the lags; the lags of a mean
    correlation are correlated with each other (every pair contributes to
    all of them), in an unknown way, and the standard deviation of a sum is
    at most the sum of the standard deviations (Minkowski): a bound, exact
    when the lags are fully correlated. NaN where any lag's sem is NaN.
    """
    weights = np.abs(np.cos(np.outer(dphi, np.arange(nn)))) / dphi.size
    return sem @ weights


def group_attrs(plan: ProcessingPlan) -> dict[str, Any]:
    """Root attrs of a grouping (``groups``: field, values, labels, counts)."""
    return {} if plan.groups is None else {"groups": plan.groups.describe()}


__all__ = ["GROUP_VARIABLE", "ShotGroups", "fourier_sem_bound", "group_attrs", "group_plans",
           "grouped_pairs", "grouped_statistics", "grouped_variables", "shot_groups",
           "with_group_labels"]
