"""Pairing of exposures for difference correlations.

This module owns how shot pairs are chosen: consecutive bright shots (the
tutorial's ``zip(tags[50:-1], tags[51:])``, dark shots excluded), or a user
list of ``[tagA, tagB]`` pairs in the tutorial's JSON format. Pairs are
returned as an ``(npair, 2)`` int64 array of SACLA tag numbers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from .errors import PairingError


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
