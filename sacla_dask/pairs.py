"""Pairing of exposures for difference correlations.

This module owns how shot pairs are chosen: consecutive bright shots (the
tutorial's ``zip(tags[50:-1], tags[51:])``, dark shots excluded), a user
list of ``[tagA, tagB]`` pairs in the tutorial's JSON format, or shots that
look alike (:func:`similar_pairs`: nearest in a per-shot feature such as the
band's mean intensity, the pulse energy or the ring profile, as the
original RingData tools paired exposures by the similarity of their
profiles). Pairs are returned as an ``(npair, 2)`` int64 array of SACLA tag
numbers; :func:`pair_indices` maps them onto a run's tag axis, dropping
(and counting) pairs that name tags the run does not have.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from .errors import PairingError

#: pairing strategies understood by :func:`sacla_dask.plan_run`
PAIRINGS = ("consecutive", "intensity", "pulse_energy", "profile", "angular")


def consecutive_pairs(tags: Sequence[int] | np.ndarray, bright: Sequence[bool] | np.ndarray,
                      overlapping: bool = True) -> np.ndarray:
    """Pairs of consecutive bright shots.

    Parameters
    ----------
    tags : array of int
        Tag numbers in run order.
    bright : array of bool
        True for X-ray shots; dark shots are skipped (they neither pair nor
        break the chain: the bright shots on either side of them pair).
    overlapping : bool
        ``(t1, t2), (t2, t3), ...`` (default, as in the tutorial) or
        non-overlapping ``(t1, t2), (t3, t4), ...`` (independent pairs).

    Returns
    -------
    ndarray int64 (npair, 2)
    """
    tags = np.asarray(tags, dtype=np.int64)
    bright = np.asarray(bright, dtype=bool)
    if tags.shape != bright.shape:
        raise PairingError(f"tags ({tags.shape}) and bright ({bright.shape}) differ in length")
    b = np.sort(tags[bright])
    if b.size < 2:
        raise PairingError(
            f"need at least two bright shots to form a pair; the selection has {b.size} "
            f"bright of {tags.size} tags"
        )
    if overlapping:
        return np.stack([b[:-1], b[1:]], axis=1)
    n = b.size // 2 * 2
    return b[:n].reshape(-1, 2)


def read_pairs_file(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a JSON list of ``[tagA, tagB]`` pairs (the tutorial's format).

    Tag numbers may be ints or strings such as ``"tag_166762140"``.
    """
    p = os.fspath(path)
    try:
        with open(p) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise PairingError(f"pairs file {p!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise PairingError(f"pairs file {p!r} is not valid JSON: {exc}") from None
    if not isinstance(data, list) or not data:
        raise PairingError(f"pairs file {p!r} must hold a non-empty list of [tagA, tagB]")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise PairingError(f"pairs file {p!r}: entry {i} is {item!r}, not [tagA, tagB]")
        try:
            out.append([_tag_number(x) for x in item])
        except ValueError:
            raise PairingError(f"pairs file {p!r}: entry {i} {item!r} is not a pair of tag "
                               "numbers") from None
    return np.asarray(out, dtype=np.int64)


def write_pairs_file(path: str | os.PathLike[str], pairs: np.ndarray) -> None:
    """Write pairs as a JSON list of ``[tagA, tagB]``."""
    with open(os.fspath(path), "w") as fh:
        json.dump(np.asarray(pairs, dtype=np.int64).tolist(), fh)


def _tag_number(x: object) -> int:
    if isinstance(x, bool):
        raise ValueError(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, str):
        s = x.removeprefix("tag_")
        return int(s)
    raise ValueError(x)


def pair_indices(pairs: np.ndarray, tags: np.ndarray,
                 strict: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions of paired tags on the tag axis.

    Parameters
    ----------
    pairs : (npair, 2) int
    tags : (ntag,) int
        The tag coordinate (sorted).
    strict : bool
        Raise :class:`PairingError` naming the missing tags instead of
        dropping the pairs that reference them.

    Returns
    -------
    ia, ib : int64 arrays of the kept pairs' positions
    kept : bool array (npair,), False for pairs dropped for missing tags
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    tags = np.asarray(tags, dtype=np.int64)
    order = np.argsort(tags)
    st = tags[order]
    pos = np.searchsorted(st, pairs)
    pos = np.clip(pos, 0, max(st.size - 1, 0))
    found = st[pos] == pairs if st.size else np.zeros(pairs.shape, bool)
    kept = found.all(axis=1) & (pairs[:, 0] != pairs[:, 1])
    if strict and not kept.all():
        bad = np.unique(pairs[~found])
        raise PairingError(f"{int((~kept).sum())} pair(s) name tags not in the run, e.g. "
                           f"{bad[:10].tolist()}")
    idx = order[pos]
    return idx[kept, 0], idx[kept, 1], kept


def similar_pairs(tags: Sequence[int] | np.ndarray, bright: Sequence[bool] | np.ndarray,
                  features: np.ndarray, neighbours: int = 16) -> np.ndarray:
    """Pair bright shots that look alike: nearest in a feature vector, each shot once.

    Parameters
    ----------
    tags : array of int (ntag,)
        Tag numbers.
    bright : array of bool (ntag,)
        Only bright shots are paired.
    features : array (ntag,) or (ntag, k)
        Per-shot feature (e.g. mean intensity, pulse energy, normalised
        ring profile). Shots with a non-finite feature are left unpaired.
    neighbours : int
        Candidate neighbours per shot for vector features.

    Returns
    -------
    ndarray int64 (npair, 2)
        Disjoint pairs (no shot in two pairs), sorted by their first tag;
        with an odd number of shots, one is left out.

    Notes
    -----
    For a scalar feature the shots are sorted by it and paired
    ``(s1, s2), (s3, s4), ...``: this minimises the sum of the pairs'
    feature differences (the optimal matching on a line). For vectors
    (Euclidean distance) pairs are made greedily, closest first, among each
    shot's nearest neighbours (a k-d tree), in rounds until fewer than two
    shots remain. This replaces RingData's pairing (each shot with its
    nearest, then duplicates resolved by the smallest distance) by the
    closest-first greedy matching it approximates.

    Such pairs link shots anywhere in the run. In the pipeline each (chunk
    of a, chunk of b) group of pairs is one task needing both chunks, so the
    normalised polar chunks stay in memory until their last group has run:
    up to the whole run's polar images (``nq * nphi * 4`` bytes per shot),
    unlike consecutive pairs, which only link neighbouring chunks.
    """
    tags = np.asarray(tags, dtype=np.int64)
    bright = np.asarray(bright, dtype=bool)
    f = np.asarray(features, dtype=np.float64)
    if f.ndim == 1:
        f = f[:, None]
    if f.ndim != 2 or f.shape[0] != tags.size or bright.shape != tags.shape:
        raise PairingError(f"features ({np.shape(features)}), tags ({tags.shape}) and bright "
                           f"({bright.shape}) must have one entry per tag")
    use = bright & np.all(np.isfinite(f), axis=1)
    idx = np.flatnonzero(use)
    if idx.size < 2:
        raise PairingError(f"need at least two bright shots with a finite feature to pair by "
                           f"similarity; found {idx.size} of {tags.size} tags")
    if f.shape[1] == 1:
        o = idx[np.argsort(f[idx, 0], kind="stable")]
        n = o.size // 2 * 2
        pairs = o[:n].reshape(-1, 2)
    else:
        pairs = _greedy_matching(f[idx], neighbours)
        pairs = idx[pairs]
    out = np.sort(tags[pairs], axis=1)
    return out[np.argsort(out[:, 0], kind="stable")]


def _greedy_matching(x: np.ndarray, k: int) -> np.ndarray:
    """Closest-first greedy matching of the rows of ``x`` (positions, (npair, 2))."""
    from scipy.spatial import cKDTree

    free = np.arange(x.shape[0])
    out: list[np.ndarray] = []
    while free.size >= 2:
        kk = int(min(max(k, 1) + 1, free.size))
        dist, nb = cKDTree(x[free]).query(x[free], k=kk)
        i = np.repeat(np.arange(free.size), kk - 1)
        j = nb[:, 1:].ravel()
        d = dist[:, 1:].ravel()
        o = np.lexsort((np.maximum(i, j), np.minimum(i, j), d))
        taken = np.zeros(free.size, dtype=bool)
        got = []
        for a, b in zip(i[o], j[o], strict=True):
            if a != b and not taken[a] and not taken[b]:
                taken[a] = taken[b] = True
                got.append((a, b))
        out.append(free[np.asarray(got, dtype=np.int64).reshape(-1, 2)])
        free = free[~taken]
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


def shared_shots(pairs: np.ndarray) -> int:
    """Number of tags that appear in more than one pair.

    0 means the pairs are independent; overlapping consecutive pairs share
    every inner shot, and their correlations are then correlated (which the
    standard error counts for pairs next to each other in
    :func:`sacla_dask.correlation.pair_order`, :func:`sharing_pairs`).
    """
    p = np.asarray(pairs, dtype=np.int64).ravel()
    if p.size == 0:
        return 0
    _, counts = np.unique(p, return_counts=True)
    return int((counts > 1).sum())


def sharing_pairs(pairs: np.ndarray) -> int:
    """Number of pairs of pairs that have a shot in common.

    For ``n`` overlapping consecutive pairs of one run of shots, ``n - 1``.
    """
    p = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if p.shape[0] < 2:
        return 0
    _, deg = np.unique(p.ravel(), return_counts=True)
    # pairs of pairs through each shot, less those counted twice (the same two shots)
    _, dup = np.unique(np.sort(p, axis=1), axis=0, return_counts=True)
    both = dup[dup > 1]
    return int((deg * (deg - 1) // 2).sum() - (both * (both - 1) // 2).sum())
