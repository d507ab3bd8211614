"""The store a follower grows: appends along ``tag`` and ``pair``, the running state, reads.

Layout. The store is a result store (:mod:`sacla_dask.store`; the variables
of :mod:`sacla_dask.dataset`) whose per-tag arrays (``tag``, ``polar``,
``row_mean``, ``bright``, ...) and per-pair arrays (``pair_tag_a``,
``pair_stat``, ...) grow: each block is appended by resizing them and
writing the new region (Zarr v3; zarr writes each chunk and metadata file
to a temporary name and renames it, so a reader or a kill never sees half
a file). The root attrs ``live_tags`` and ``live_pairs`` say how many tags
and pairs are committed; they are set after the arrays are written.

Running state. After a block's arrays are written, the running pair sums
(:class:`~sacla_dask.correlation.PairSums`), the last pair's correlation
(for its product with the next pair when they share a shot), the shot
waiting for its pair, and the counts of tags and pairs folded are saved
in one file, ``_live/state.npz`` (a Zarr group ``_live`` holds it),
written under a temporary name and renamed: the commit point. A follower
started again on the store truncates the arrays to the committed counts
(a kill after the arrays grew and before the state was replaced leaves a
block written but not folded) and goes on from the tag after the last
committed one: nothing is lost, nothing counted twice.

Reading. :func:`open_live` (what :func:`sacla_dask.open_result` with
``allow_incomplete=True`` calls for such a store) opens it and cuts it to
the committed tags and pairs, trying again when it caught arrays in the
middle of an append (lengths that disagree).
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr
import zarr

from ..correlation import PairSums
from ..correlation.statistics import Edge
from ..store import writing

#: the group holding the running state, and its file
STATE_GROUP = "_live"
STATE_FILE = "state.npz"
#: root attrs: committed tags and pairs
TAGS_ATTR, PAIRS_ATTR = "live_tags", "live_pairs"
GROWING_DIMS = ("tag", "pair")


class GrowingStore:
    """A live store opened for writing (arrays opened once and kept)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._arrays: dict[str, zarr.Array] = {}
        g = zarr.open_group(self.path, mode="r+")
        self.growing: dict[str, list[str]] = {d: [] for d in GROWING_DIMS}
        for name, arr in g.arrays():
            dims = arr.metadata.dimension_names or ()  # type: ignore[union-attr]
            if dims and dims[0] in GROWING_DIMS:
                self.growing[str(dims[0])].append(name)

    def array(self, name: str) -> zarr.Array:
        a = self._arrays.get(name)
        if a is None:
            a = zarr.open_array(store=self.path, path=name, mode="r+")
            self._arrays[name] = a
        return a

    def append(self, dim: str, start: int, values: Mapping[str, np.ndarray]) -> int:
        """Write ``values`` (each with ``k`` rows along ``dim``) at ``start``; return ``k``."""
        ks = {np.asarray(v).shape[0] for v in values.values()}
        if len(ks) != 1:
            raise ValueError(f"appends along {dim} of different lengths {ks}")
        k = ks.pop()
        missing = set(self.growing[dim]) - set(values)
        if missing:
            raise ValueError(f"append along {dim} lacks {sorted(missing)}")
        if k == 0:
            return 0
        with writing(self.path):
            for name, v in values.items():
                a = self.array(name)
                if a.shape[0] != start + k:
                    a.resize((start + k,) + tuple(a.shape[1:]))
                a[start:start + k] = np.asarray(v)
        return k

    def truncate(self, dim: str, n: int) -> None:
        """Cut the arrays along ``dim`` to ``n`` rows (what a killed block left beyond)."""
        with writing(self.path):
            for name in self.growing[dim]:
                a = self.array(name)
                if a.shape[0] != n:
                    a.resize((n,) + tuple(a.shape[1:]))

    def write(self, values: Mapping[str, Any]) -> None:
        """Replace whole (fixed-shape) arrays."""
        with writing(self.path):
            for name, v in values.items():
                a = self.array(name)
                a[...] = np.asarray(v, dtype=a.dtype).reshape(a.shape)

    def set_attrs(self, **attrs: Any) -> None:
        with writing(self.path):
            zarr.open_group(self.path, mode="r+").attrs.update(attrs)


# -- the running state --------------------------------------------------------------
_SUM_ARRAYS = ("s1", "s2", "own_count", "boot_s1", "boot_w", "shared_ok", "s12", "own_count12")


def state_path(path: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(path), STATE_GROUP, STATE_FILE)


def save_state(path: str | os.PathLike[str], meta: Mapping[str, Any], sums: PairSums,
               edge: Edge | None, arrays: Mapping[str, np.ndarray]) -> None:
    """Replace the running state atomically (a new file renamed over the old one)."""
    out: dict[str, np.ndarray] = {"meta": np.frombuffer(json.dumps(dict(meta)).encode(),
                                                        dtype=np.uint8)}
    for name in _SUM_ARRAYS:
        v = getattr(sums, name)
        if v is not None:
            out[f"sums_{name}"] = v
    out["sums_scalars"] = np.array([sums.n, sums.shared, sums.shared12,
                                    -1 if sums.nphi is None else sums.nphi], dtype=np.int64)
    if edge is not None:
        out["edge_x"], out["edge_ok"] = edge.x, edge.ok
        out["edge_common"] = np.array(edge.common)
    out.update({f"a_{k}": v for k, v in arrays.items()})
    final = state_path(path)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = final + f".{os.getpid()}.tmp"
    buf = io.BytesIO()
    np.savez(buf, **out)  # type: ignore[arg-type]
    with writing(path):
        with open(tmp, "wb") as fh:
            fh.write(buf.getbuffer())
        os.replace(tmp, final)


def load_state(path: str | os.PathLike[str]
               ) -> tuple[dict[str, Any], PairSums, Edge | None, dict[str, np.ndarray]] | None:
    """The running state saved by :func:`save_state` (None when there is none)."""
    p = state_path(path)
    if not os.path.exists(p):
        return None
    with np.load(p, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    meta = json.loads(d["meta"].tobytes().decode())
    n, shared, shared12, nphi = (int(x) for x in d["sums_scalars"])
    kw = {name: d.get(f"sums_{name}") for name in _SUM_ARRAYS}
    sums = PairSums(n=n, shared=shared, shared12=shared12, nphi=None if nphi < 0 else nphi,
                    **kw)  # type: ignore[arg-type]
    edge = None
    if "edge_x" in d:
        edge = Edge(d["edge_x"], d["edge_ok"], bool(d["edge_common"]))
    arrays = {k[2:]: v for k, v in d.items() if k.startswith("a_")}
    return meta, sums, edge, arrays


# -- reading ------------------------------------------------------------------------
def is_live(attrs: Mapping[str, Any]) -> bool:
    """Whether a store's root attrs are those of a growing (followed) store."""
    return TAGS_ATTR in attrs


def open_live(path: str | os.PathLike[str], tries: int = 50, **kwargs: Any) -> xr.Dataset:
    """Open a growing store as it is now: the committed tags and pairs, the current ``corr``.

    Tries again (``tries`` times, 20 ms apart) when it caught an append in
    progress (arrays of different lengths along ``tag`` or ``pair``).
    """
    p = os.fspath(path)
    err: Exception | None = None
    for _ in range(max(1, tries)):
        try:
            ds = xr.open_zarr(p, consolidated=False, **kwargs)
            nt, npair = int(ds.attrs.get(TAGS_ATTR, 0)), int(ds.attrs.get(PAIRS_ATTR, 0))
            cut = {d: slice(0, n) for d, n in (("tag", nt), ("pair", npair)) if d in ds.dims}
            return ds.isel(cut)
        except (ValueError, KeyError, OSError) as exc:
            err = exc
            time.sleep(0.02)
    raise OSError(f"could not open the growing store {p!r}: {err}")


__all__ = ["GrowingStore", "PAIRS_ATTR", "STATE_GROUP", "TAGS_ATTR", "is_live", "load_state",
           "open_live", "save_state", "state_path"]
