"""Where a followed run's data comes from: the :class:`Source` interface and its sources.

A source answers one question, again and again: *what arrived since I last
asked?* :meth:`Source.poll` returns the new :class:`Block` objects (tags in
increasing order within a block). A block knows its tags, their event data
and its image shape, and can read its images' windows
(:meth:`Block.read`); the follower turns them into polar images with
:meth:`Block.polar` (by default :func:`sacla_dask.blocks.polar_chunk` of
:meth:`Block.read`; a file block uses the pipeline's own reader, which reads
only the q band's pixels). Nothing else of the follower depends on where the
data comes from: a source reading SACLA's online API at the beamline is a
subclass of :class:`Source` whose blocks implement :attr:`Block.tags`,
:attr:`Block.events`, :attr:`Block.image_shape` and :meth:`Block.read`.

The follower never asks a source for a tag twice: after a restart it drops
the tags it has already folded (those up to the store's last tag) from the
blocks a fresh source returns. Blocks must arrive in tag order (a block's
tags after those of every earlier block), as SACLA's conversion writes them.

Sources here:

:class:`DirectorySource`
    DataConvert files arriving in a folder (or matching a glob), each a
    complete file holding some tags of the run with their event data,
    written under a temporary name and renamed: only names ending in
    ``.h5`` are looked at, each once.
:class:`SWMRFileSource`
    One HDF5 file that a writer appends tags to with SWMR (single writer,
    multiple readers); see its docstring for the layout.
"""

from __future__ import annotations

import abc
import glob
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from ..blocks import polar_chunk, polar_chunk_from_run
from ..errors import LayoutError, RunFileError, SaclaDaskError
from ..io.run import Run, open_run
from ..polar import PolarOperator


class Block(abc.ABC):
    """Tags that arrived together, with their event data, and how to read their images.

    Subclasses implement :attr:`tags`, :attr:`events`, :attr:`image_shape`,
    :meth:`read` and :meth:`subset`; :attr:`name` says where the block came
    from (recorded in the store's ``sources`` attr) and :attr:`arrived`
    when it was seen (``time.time()``).
    """

    name: str = ""
    arrived: float = 0.0

    @property
    @abc.abstractmethod
    def tags(self) -> np.ndarray:
        """The block's SACLA tags, int64, increasing."""

    @property
    @abc.abstractmethod
    def events(self) -> xr.Dataset:
        """Per-tag event data on ``tag``: at least ``run`` (int64) and ``bright``
        (bool: the X-ray pulse reached the sample), then whatever the facility
        records (``photon_energy`` in eV, ``pulse_energy`` in J, ``pulse_selector``...)."""

    @property
    @abc.abstractmethod
    def image_shape(self) -> tuple[int, int]:
        """Detector image shape (ny, nx)."""

    @abc.abstractmethod
    def read(self, window: tuple[slice, slice]) -> np.ndarray:
        """The images' ``window`` (rows, cols), float32 ``(ntag, wy, wx)``."""

    @abc.abstractmethod
    def subset(self, keep: np.ndarray) -> Block:
        """The block with only the tags where ``keep`` (bool per tag) is True."""

    def known_tags(self) -> dict[int, np.ndarray]:
        """Every exposure each run's event data lists (for ``skip_first``); default the tags."""
        ev = self.events
        runs = ev["run"].values
        return {int(r): self.tags[runs == r] for r in np.unique(runs)}

    def polar(self, window: tuple[slice, slice], operator: PolarOperator,
              polar_mask: np.ndarray, on_bad_tag: str,
              rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(normalised polar images, row means, non-finite bin counts) of the tags ``rows``
        (:func:`sacla_dask.blocks.polar_chunk` of :meth:`read`)."""
        return polar_chunk(self.read(window)[rows], operator, polar_mask)

    def __len__(self) -> int:
        return int(self.tags.size)

    def __repr__(self) -> str:
        t = self.tags
        span = f"{t[0]}..{t[-1]}" if t.size else "none"
        return f"<{type(self).__name__} {self.name}: {t.size} tags ({span})>"


class FileBlock(Block):
    """The tags of one DataConvert file (an opened :class:`~sacla_dask.io.run.Run`)."""

    def __init__(self, run: Run, name: str, arrived: float | None = None) -> None:
        self.run = run
        self.name = name
        self.arrived = time.time() if arrived is None else arrived

    @property
    def tags(self) -> np.ndarray:
        return self.run.tags

    @property
    def events(self) -> xr.Dataset:
        return self.run.events

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.run.image_shape

    def known_tags(self) -> dict[int, np.ndarray]:
        return {int(k): np.asarray(v) for k, v in self.run._run_tags.items()}

    def read(self, window: tuple[slice, slice]) -> np.ndarray:
        return np.asarray(self.run.images(chunks=max(1, len(self)), window=window)
                          .compute(scheduler="sync"))

    def subset(self, keep: np.ndarray) -> FileBlock:
        return FileBlock(self.run.select(keep), self.name, self.arrived)

    def polar(self, window: tuple[slice, slice], operator: PolarOperator,
              polar_mask: np.ndarray, on_bad_tag: str,
              rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # the pipeline's task itself: only the band's pixels read, one image at a time
        out = polar_chunk_from_run(self.run.sources[rows], window, on_bad_tag, operator,
                                   polar_mask)
        return out[0], out[1], out[2]


class Source(abc.ABC):
    """Where a followed run comes from: :meth:`poll` returns what arrived since the last call.

    Attributes
    ----------
    description : str
        What is followed, for the user and the store's ``live_source`` attr.
    """

    description: str = ""

    @abc.abstractmethod
    def poll(self) -> list[Block]:
        """The blocks that arrived since the last call (possibly none), in tag order."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release what the source holds open."""


class DirectorySource(Source):
    """DataConvert files arriving in a folder, or matching a glob pattern.

    Only names ending in ``.h5`` count (a file being written under a
    temporary name is not looked at until it is renamed); each file is
    opened once, when first seen. A file that cannot be opened yet (still
    being copied in place by a tool that does not rename) is tried again at
    the next polls, and given up with an error after ``retry_seconds``.
    New files are returned sorted by their first tag. A folder that does not
    exist yet is waited for (the conversion may not have started).
    """

    def __init__(self, where: str | os.PathLike[str], on_bad_tag: str = "fail",
                 retry_seconds: float = 60.0) -> None:
        w = os.fspath(where)
        self.pattern = w if glob.has_magic(w) else os.path.join(w, "*.h5")
        self.description = w
        self.on_bad_tag = on_bad_tag
        self.retry_seconds = retry_seconds
        self._seen: set[str] = set()
        self._failing: dict[str, float] = {}

    def poll(self) -> list[Block]:
        names = sorted(p for p in glob.glob(self.pattern) if p.endswith(".h5"))
        new: list[Block] = []
        for p in names:
            ap = os.path.abspath(p)
            if ap in self._seen:
                continue
            now = time.time()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # (the follower says what it leaves out)
                    run = open_run(ap, on_bad_tag=self.on_bad_tag)  # type: ignore[arg-type]
            except (RunFileError, LayoutError, OSError) as exc:
                first = self._failing.setdefault(ap, now)
                if now - first > self.retry_seconds:
                    raise RunFileError(f"{ap!r} arrived but cannot be read after "
                                       f"{now - first:.0f} s: {exc}") from None
                continue
            self._failing.pop(ap, None)
            self._seen.add(ap)
            new.append(FileBlock(run, ap, now))
        new.sort(key=lambda b: int(b.tags[0]) if len(b) else 0)
        return new


class _ArrayBlock(Block):
    """Tags of an :class:`SWMRFileSource`: rows of its stacked ``detector_data``."""

    def __init__(self, source: SWMRFileSource, rows: np.ndarray, tags: np.ndarray,
                 events: xr.Dataset, shape: tuple[int, int], arrived: float) -> None:
        self._source, self._rows, self._tags = source, rows, tags
        self._events, self._shape = events, shape
        self.name = source.path
        self.arrived = arrived

    @property
    def tags(self) -> np.ndarray:
        return self._tags

    @property
    def events(self) -> xr.Dataset:
        return self._events

    @property
    def image_shape(self) -> tuple[int, int]:
        return self._shape

    def read(self, window: tuple[slice, slice]) -> np.ndarray:
        return self._source._read(self._rows, window)

    def subset(self, keep: np.ndarray) -> Block:
        k = np.asarray(keep, dtype=bool)
        return _ArrayBlock(self._source, self._rows[k], self._tags[k],
                           self._events.isel(tag=np.flatnonzero(k)), self._shape, self.arrived)


class SWMRFileSource(Source):
    """One HDF5 file that a writer appends tags to while it is read (SWMR).

    HDF5's SWMR mode lets a writer only grow existing datasets, not create
    groups, so the file cannot hold DataConvert's one group per tag while it
    grows. Its layout, under ``/run_N``::

        detector_data                    (ntag, ny, nx) float32, grown along axis 0
        event_info/tag_number_list       (ntag,) int64, grown in step
        event_info/<name>                (ntag,) per-tag event data (optional:
                                          xfel_pulse_selector_status,
                                          photon_energy_in_eV, *pulse_energy*...)

    The writer grows the event datasets first and ``tag_number_list`` last;
    a tag is new once ``tag_number_list`` lists it and ``detector_data`` holds
    its row. :func:`sacla_dask.live.synth.write_swmr_run` writes one.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.description = self.path
        self._fh: Any = None
        self._run: int | None = None
        self._done = 0

    def _open(self) -> Any:
        import h5py

        if self._fh is None:
            if not os.path.exists(self.path):
                return None
            self._fh = h5py.File(self.path, "r", libver="latest", swmr=True)
            runs = [k for k in self._fh if k.startswith("run_")]
            if not runs:
                raise LayoutError(f"{self.path!r}: no /run_N group for an SWMR source")
            self._run = int(runs[0][4:])
        return self._fh

    def poll(self) -> list[Block]:
        from ..io.run import EVENT_ALIASES

        fh = self._open()
        if fh is None:
            return []
        g = fh[f"run_{self._run}"]
        tl = g["event_info/tag_number_list"]
        tl.refresh()
        det = g["detector_data"]
        det.refresh()
        n = min(int(tl.shape[0]), int(det.shape[0]))
        if n <= self._done:
            return []
        rows = np.arange(self._done, n)
        tags = np.asarray(tl[self._done:n], dtype=np.int64)
        data: dict[str, Any] = {}
        for name, ds in g["event_info"].items():
            if name == "tag_number_list" or not hasattr(ds, "refresh"):
                continue
            ds.refresh()
            v = np.asarray(ds[self._done:n])
            if v.shape[0] != rows.size:
                v = np.full(rows.size, np.nan)
            key = EVENT_ALIASES.get(name, "pulse_energy" if "pulse_energy" in name else name)
            data[key] = ("tag", v, {"hdf5_path": ds.name})
        ev = xr.Dataset(data, coords={"tag": tags})
        ev["run"] = ("tag", np.full(rows.size, self._run, dtype=np.int64))
        bright = np.ones(rows.size, dtype=bool)
        for key in ("pulse_selector", "shutter"):
            if key in ev:
                bright &= np.nan_to_num(ev[key].values.astype(np.float64), nan=0) != 0
        ev["bright"] = ("tag", bright)
        self._done = n
        shape = (int(det.shape[1]), int(det.shape[2]))
        return [_ArrayBlock(self, rows, tags, ev, shape, time.time())]

    def _read(self, rows: np.ndarray, window: tuple[slice, slice]) -> np.ndarray:
        fh = self._open()
        det = fh[f"run_{self._run}/detector_data"]
        out = np.empty((rows.size, window[0].stop - window[0].start,
                        window[1].stop - window[1].start), np.float32)
        for i, r in enumerate(rows.tolist()):
            out[i] = det[r, window[0], window[1]]
        return out

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def open_source(where: str | os.PathLike[str], on_bad_tag: str = "fail") -> Source:
    """The source for ``where``: a folder or glob (:class:`DirectorySource`), or one
    ``.h5`` file being appended to (:class:`SWMRFileSource`)."""
    w = os.fspath(where)
    if os.path.isfile(w) or (w.endswith(".h5") and not glob.has_magic(w)):
        return SWMRFileSource(w)  # (waits for the file to appear)
    if os.path.isdir(w) or glob.has_magic(w) or not os.path.exists(w):
        return DirectorySource(w, on_bad_tag=on_bad_tag)  # (waits for the folder too)
    raise SaclaDaskError(f"source {w!r} is neither a folder, a glob pattern nor an HDF5 file")


def sort_blocks(blocks: Sequence[Block]) -> list[Block]:
    """Blocks sorted by their first tag (empty ones dropped)."""
    return sorted((b for b in blocks if len(b)), key=lambda b: int(b.tags[0]))


__all__ = ["Block", "DirectorySource", "FileBlock", "SWMRFileSource", "Source",
           "open_source", "sort_blocks"]
