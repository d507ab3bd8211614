"""Reading SACLA DataConvert run files: tags, event data, shot selection, lazy images.

This module owns the knowledge of the SACLA "DataConvert" HDF5 layout::

    /file_info/run_number_list
    /run_N/detector_2d_assembled_1/detector_info/...
    /run_N/detector_2d_assembled_1/tag_T/detector_data     (ny, nx) float32
    /run_N/event_info/tag_number_list                      (ntag_event,)
    /run_N/event_info/.../xfel_pulse_selector_status       (ntag_event,)
    /run_N/event_info/.../photon_energy_in_eV               (ntag_event,)
    /run_N/event_info/.../*pulse_energy*                     (ntag_event,)

:func:`open_run` takes one file or several (files of one run, or several
runs) and returns a :class:`Run`: the sorted tags that really have an image
(event_info may list more tags than a subset file holds images for), the
per-tag event data as an :class:`xarray.Dataset` aligned by tag, where each
tag came from (``run``, ``source``: index into ``Run.paths``), which shots
are dark, and the images as a lazy :class:`dask.array.Array` (tag, y, x)
with several tags per task. :meth:`Run.select_shots` chooses the shots to
correlate (dark shots, a tag range, a pulse-energy threshold) and records
why.

Reading (:mod:`sacla_dask.io.hdf5`). Each task opens the file itself, so
the graph runs on distributed workers; nothing is read before it is
computed. A task reads only the window (bounding box of the q band) of each
of its images, or, for a thin band, only the band's pixels.

Bad tags. A tag group without ``detector_data``, or a dataset of the wrong
shape or type, is found when the run is opened; a tag whose bytes cannot
be decoded (a corrupt compressed chunk) only when it is read. With
``on_bad_tag="fail"`` (default) either raises :class:`BadTagError` naming
the file and tag; with ``"skip"`` the first kind is left out of the run
(listed in ``Run.bad_tags`` and a warning) and the second kind yields an
all-NaN image plus a warning, which the pipeline detects and keeps out of
every pair.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import dask
import dask.array as da
import h5py
import numpy as np
import xarray as xr

from ..chunking import parse_chunk_size
from ..errors import BadTagError, LayoutError, ParameterError, RunFileError
from . import hdf5
from .hdf5 import OnBadTag, _open_h5

DETECTOR = "detector_2d_assembled_1"
TAG_RE = re.compile(r"^tag_(\d+)$")

#: event_info dataset base names -> standard variable names in ``Run.events``.
EVENT_ALIASES = {
    "xfel_pulse_selector_status": "pulse_selector",
    "shutter_status": "shutter",
    "photon_energy_in_eV": "photon_energy",
}
#: event variables that say whether the X-ray pulse reached the sample.
STATUS_VARIABLES = ("pulse_selector", "shutter")


@dataclasses.dataclass(frozen=True)
class TagSource:
    """Where one tag's image lives."""

    path: str
    run: int
    tag: int
    #: the sensor groups of an unassembled run (:mod:`.panels`), read as one stacked image
    sensors: tuple[str, ...] = ()

    @property
    def dataset(self) -> str:
        """The image's dataset (an unassembled run's: its first sensor's)."""
        det = self.sensors[0] if self.sensors else DETECTOR
        return f"/run_{self.run}/{det}/tag_{self.tag}/detector_data"


class BadTag(str):
    """A tag left out of a run: the message (a ``str``) with its parts as attributes.

    Attributes
    ----------
    path : str
        The run file.
    run, tag : int
        SACLA run and tag numbers.
    reason : str
        What is wrong with the tag's ``detector_data``.
    """

    path: str
    run: int
    tag: int
    reason: str

    def __new__(cls, path: str, run: int, tag: int, reason: str) -> BadTag:
        self = super().__new__(cls, f"{path!r} run {run} tag {tag}: {reason}")
        self.path, self.run, self.tag, self.reason = path, int(run), int(tag), reason
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (BadTag, (self.path, self.run, self.tag, self.reason))


# -- scanning a file -------------------------------------------------------------
def _event_datasets(group: h5py.Group, n: int) -> dict[str, tuple[str, np.ndarray]]:
    """All numeric 1-D datasets under event_info of length ``n``.

    Returns ``{standard or base name: (HDF5 path, values)}``.
    """
    found: dict[str, tuple[str, np.ndarray]] = {}

    def visit(name: str, obj: Any) -> None:
        if not isinstance(obj, h5py.Dataset) or obj.ndim != 1 or obj.shape[0] != n:
            return
        base = name.rsplit("/", 1)[-1]
        if base == "tag_number_list" or obj.dtype.kind not in "biuf":
            return
        key = EVENT_ALIASES.get(base)
        if key is None and "pulse_energy" in base:
            key = "pulse_energy"
        if key is None:
            key = base
        if key in found:  # two datasets with one base name: use the path
            key = name.replace("/", "__")
        found[key] = (f"{group.name}/{name}", obj[()])

    group.visititems(visit)
    return found


def _check_tag(det: h5py.Group, name: str) -> tuple[tuple[int, ...], h5py.h5d.DatasetID]:
    """Shape and dataset id of ``det/name/detector_data``; ValueError saying what is wrong.

    Uses h5py's low-level API, much cheaper per tag than the high-level one:
    a run has thousands of tags, all checked when it is opened.
    """
    try:
        dsid = h5py.h5d.open(det.id, f"{name}/detector_data".encode())
    except KeyError as exc:
        why = str(exc).strip("'\"").rsplit("(", 1)[-1].rstrip(")")
        raise ValueError(f"no detector_data dataset in the tag group ({why})") from None
    shape = dsid.shape
    if dsid.get_type().get_class() not in (h5py.h5t.INTEGER, h5py.h5t.FLOAT):
        raise ValueError(f"detector_data has type {dsid.dtype}, expected numbers")
    if len(shape) != 2:
        raise ValueError(f"detector_data has shape {shape}, expected a 2-D image")
    return shape, dsid


def _scan_file(path: str, on_bad_tag: OnBadTag) -> tuple[list[dict[str, Any]], list[BadTag]]:
    """Read the layout of one file: per-run tags, events, image shape/dtype."""
    runs: list[dict[str, Any]] = []
    bad: list[BadTag] = []
    with _open_h5(path) as fh:
        try:
            _scan_open_file(fh, path, on_bad_tag, runs, bad)
        except (OSError, RuntimeError) as exc:
            raise RunFileError(f"cannot read the layout of run file {path!r}: damaged or "
                               f"truncated ({exc})") from None
    return runs, bad


def _scan_open_file(fh: h5py.File, path: str, on_bad_tag: OnBadTag,
                    runs: list[dict[str, Any]], bad: list[BadTag]) -> None:
    if "file_info" not in fh or "run_number_list" not in fh["file_info"]:
        raise LayoutError(f"{path!r} is HDF5 but not a SACLA DataConvert file: "
                          "no /file_info/run_number_list")
    run_numbers = [int(r) for r in np.atleast_1d(fh["file_info/run_number_list"][()])]
    if not run_numbers:
        raise LayoutError(f"{path!r}: /file_info/run_number_list is empty")
    for rn in run_numbers:
        rgrp = f"run_{rn}"
        if rgrp not in fh:
            raise LayoutError(f"{path!r}: run {rn} is listed but /{rgrp} is missing")
        g = fh[rgrp]
        sensors = _sensors(g, path, rgrp) if DETECTOR not in g else ()
        if "event_info" not in g or "tag_number_list" not in g["event_info"]:
            raise LayoutError(f"{path!r}: /{rgrp}/event_info/tag_number_list is missing")
        event_tags = np.asarray(g["event_info/tag_number_list"][()], dtype=np.int64).ravel()
        uniq, counts = np.unique(event_tags, return_counts=True)
        if (counts > 1).any():
            raise LayoutError(f"{path!r}: /{rgrp}/event_info/tag_number_list repeats tags "
                              f"{uniq[counts > 1][:5].tolist()}")
        events = _event_datasets(g["event_info"], event_tags.size)
        if sensors:  # an unassembled run (io.panels)
            image_tags, shape, dtype = _scan_sensors(g, sensors, path, rn, on_bad_tag, bad)
        det = g[DETECTOR] if not sensors else {}
        if not sensors:
            image_tags = []
            shape = dtype = None
        for name in det:
            m = TAG_RE.match(name)
            if not m:
                continue
            tag = int(m.group(1))
            try:
                try:
                    tshape, dsid = _check_tag(det, name)
                except (OSError, RuntimeError) as exc:
                    raise ValueError(f"detector_data cannot be opened ({exc})") from None
                if shape is None:
                    shape, dtype = tshape, dsid.dtype
                elif tshape != shape:
                    raise ValueError(f"detector_data has shape {tshape}, but other tags "
                                     f"have {shape}")
            except ValueError as exc:
                bt = BadTag(path, rn, tag, f"{exc} (/{rgrp}/{DETECTOR}/{name})")
                if on_bad_tag == "fail":
                    raise BadTagError(f"{bt}; use on_bad_tag='skip' (--on-bad-tag skip) to "
                                      "go on without it") from None
                bad.append(bt)
                continue
            image_tags.append(tag)
        runs.append(dict(run=rn, event_tags=event_tags, events=events,
                         image_tags=np.array(sorted(image_tags), dtype=np.int64),
                         shape=shape, dtype=dtype, sensors=sensors))


def _sensors(g: h5py.Group, path: str, rgrp: str) -> tuple[str, ...]:
    """The sensor groups of a run without ``DETECTOR`` (LayoutError if none)."""
    from .panels import sensor_groups

    try:
        sensors = sensor_groups(g)
    except ValueError as exc:
        raise LayoutError(f"{path!r}: /{rgrp}: {exc}") from None
    if not sensors:
        raise LayoutError(f"{path!r}: /{rgrp}/{DETECTOR} is missing (and no per-sensor "
                          "detector_2d_1.. groups)")
    return sensors


def _scan_sensors(g: h5py.Group, sensors: tuple[str, ...], path: str, rn: int,
                  on_bad_tag: OnBadTag, bad: list[BadTag]) -> tuple[list[int], Any, Any]:
    """:func:`.panels.scan_sensor_tags` with bad tags handled as the assembled scan does."""
    from .panels import scan_sensor_tags

    tags, bad_tags, shape, dtype = scan_sensor_tags(g, sensors, _check_tag)
    for tag, why in bad_tags:
        bt = BadTag(path, rn, tag, why)
        if on_bad_tag == "fail":
            raise BadTagError(f"{bt}; use on_bad_tag='skip' (--on-bad-tag skip) to go on "
                              "without it") from None
        bad.append(bt)
    return tags, shape, dtype


# -- the run -----------------------------------------------------------------------
class Run:
    """One SACLA run (or several files/runs merged by tag).

    Attributes
    ----------
    paths : list of str
        The files read; ``events["source"]`` indexes this list.
    runs : list of int
        SACLA run numbers.
    tags : ndarray of int64
        Sorted tags that have an image.
    events : xarray.Dataset
        Per-tag event data on the ``tag`` dimension (image tags only):
        ``bright`` (bool: the X-ray pulse reached the sample), ``selected``
        (bool: used for pairs), ``run``, ``source`` (index into ``paths``),
        and whatever event_info holds (``pulse_selector``,
        ``photon_energy`` in eV, ``pulse_energy`` in J...), NaN for tags
        that event_info does not list. Each event variable's ``hdf5_path``
        attr says where it came from.
    selection : dict
        How ``bright`` and ``selected`` were decided, and the counts (plain
        JSON values, written to the output's attrs).
    image_shape : (ny, nx)
        Detector image shape.
    bad_tags : list of BadTag
        Tags left out when the run was opened (``on_bad_tag="skip"``).
    """

    def __init__(self, paths: list[str], sources: list[TagSource], events: xr.Dataset,
                 image_shape: tuple[int, int], image_dtype: np.dtype, bad_tags: list[BadTag],
                 on_bad_tag: OnBadTag, all_events: xr.Dataset | None = None,
                 selection: dict[str, Any] | None = None,
                 run_tags: dict[int, np.ndarray] | None = None) -> None:
        self.paths = paths
        self._sources = sources
        self.events = events
        self.all_events = all_events if all_events is not None else events
        self.image_shape = image_shape
        self.image_dtype = image_dtype
        self.bad_tags = bad_tags
        self.on_bad_tag = on_bad_tag
        self.selection = dict(selection or {})
        self._run_tags = run_tags or {}

    # -- description ---------------------------------------------------
    @property
    def tags(self) -> np.ndarray:
        return self.events["tag"].values

    @property
    def runs(self) -> list[int]:
        return sorted({s.run for s in self._sources})

    @property
    def run_number(self) -> int:
        """The run number (the first one when several runs are merged)."""
        return self.runs[0]

    @property
    def bright(self) -> np.ndarray:
        """Boolean per tag: True for X-ray (bright) shots."""
        return self.events["bright"].values

    @property
    def selected(self) -> np.ndarray:
        """Boolean per tag: True for the shots to pair (bright and passing the selection)."""
        if "selected" in self.events:
            return self.events["selected"].values
        return self.bright

    @property
    def sources(self) -> list[TagSource]:
        return list(self._sources)

    def tag_paths(self) -> list[str]:
        """The file of each tag (same order as ``tags``)."""
        return [s.path for s in self._sources]

    def __len__(self) -> int:
        return len(self._sources)

    def __repr__(self) -> str:
        t = self.tags
        rng = f"{t[0]}..{t[-1]}" if t.size else "none"
        bad = f", {len(self.bad_tags)} bad tag(s) left out" if self.bad_tags else ""
        return (f"<Run {','.join(map(str, self.runs))}: {len(self)} tags ({rng}), "
                f"{int(self.bright.sum())} bright, {int(self.selected.sum())} selected, "
                f"images {self.image_shape} {self.image_dtype} from {len(self.paths)} "
                f"file(s){bad}>")

    def _replace(self, keep: np.ndarray | None = None, events: xr.Dataset | None = None,
                 selection: dict[str, Any] | None = None) -> Run:
        ev = self.events if events is None else events
        sources = self._sources
        if keep is not None:
            idx = np.nonzero(keep)[0]
            ev = ev.isel(tag=idx)
            sources = [sources[i] for i in idx]
        return Run(self.paths, sources, ev, self.image_shape, self.image_dtype,
                   self.bad_tags, self.on_bad_tag, self.all_events,
                   self.selection if selection is None else selection, self._run_tags)

    # -- selection -----------------------------------------------------
    def select(self, keep: np.ndarray | Sequence[bool]) -> Run:
        """A new Run holding only the tags where ``keep`` is True."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (len(self),):
            raise ParameterError(f"selection must have one boolean per tag ({len(self)})")
        return self._replace(keep=keep)

    def sel_tags(self, tags: Iterable[int]) -> Run:
        """A new Run with the given tags (all must exist)."""
        tags = np.asarray(list(tags), dtype=np.int64)
        missing = np.setdiff1d(tags, self.tags)
        if missing.size:
            raise ParameterError(f"tags not in the run: {missing[:10].tolist()}")
        return self.select(np.isin(self.tags, tags))

    def select_shots(
        self,
        tag_range: tuple[int, int] | None = None,
        min_pulse_energy: float | None = None,
        skip_first: int | None = None,
        drop_unselected: bool = False,
    ) -> Run:
        """Choose the shots to correlate; the choice is recorded.

        Dark shots (pulse selector / shutter closed, from event_info) are
        never selected. The criteria add up: calling this twice applies both.

        Parameters
        ----------
        tag_range : (first, last), optional
            Keep only tags ``first <= tag <= last`` (the others are not read).
        min_pulse_energy : float, optional
            Select only shots whose pulse energy (event_info ``*pulse_energy*``,
            joules) is at least this; a shot without a pulse energy is not
            selected.
        skip_first : int, optional
            Treat the first N exposures of each run as dark (for files
            without a pulse-selector status; applied in addition to the
            status when there is one). Counted from the run's first
            exposure known to event_info, not from the file's first image.
        drop_unselected : bool
            Leave unselected shots out of the run altogether (not read).
            By default they stay (read, transformed, stored) but are not
            paired, so that the output shows what was left out.

        Returns
        -------
        Run
            ``events["bright"]`` and ``events["selected"]`` updated and
            ``selection`` describing the criteria and counts.
        """
        sel = dict(self.selection)
        run = self
        if tag_range is not None:
            try:
                first, last = (int(t) for t in tag_range)
            except (TypeError, ValueError):
                raise ParameterError(f"tag_range must be (first, last) tag numbers (got "
                                     f"{tag_range!r})") from None
            if first > last:
                raise ParameterError(f"tag_range first {first} > last {last}")
            inside = (self.tags >= first) & (self.tags <= last)
            if not inside.any():
                t = self.tags
                raise ParameterError(
                    f"no tag of the run lies in the tag range {first}..{last} (the run has "
                    f"{t.size} tags {t[0]}..{t[-1]})" if t.size else "the run has no tag")
            prev = sel.get("tag_range")
            if prev:
                first, last = max(first, prev[0]), min(last, prev[1])
            sel["tag_range"] = [first, last]
            sel["n_out_of_range"] = int(sel.get("n_out_of_range", 0) + (~inside).sum())
            run = run._replace(keep=inside)
        ev = run.events.copy()
        bright = ev["bright"].values.copy()
        if skip_first:
            n = int(skip_first)
            if n < 0:
                raise ParameterError(f"skip_first must be >= 0 (got {skip_first})")
            bright &= ~_first_exposures(ev, run._run_tags, n)
            sel["skip_first"] = max(n, int(sel.get("skip_first") or 0))
        selected = bright & (ev["selected"].values if "selected" in ev else True)
        if min_pulse_energy is not None:
            e_min = float(min_pulse_energy)
            if not np.isfinite(e_min):
                raise ParameterError(f"min_pulse_energy must be a finite number of joules "
                                     f"(got {min_pulse_energy!r})")
            if "pulse_energy" not in ev:
                raise ParameterError(
                    f"a pulse-energy threshold needs the pulse energy in event_info, but "
                    f"{self.paths} has none (event data: {sorted(map(str, ev.data_vars))})")
            e = ev["pulse_energy"].values.astype(np.float64)
            with np.errstate(invalid="ignore"):
                ok = np.isfinite(e) & (e >= e_min)
            selected &= ok
            prev_e = sel.get("min_pulse_energy")
            sel["min_pulse_energy"] = e_min if prev_e is None else max(e_min, prev_e)
            sel["pulse_energy_dataset"] = ev["pulse_energy"].attrs.get("hdf5_path", "")
        ev["bright"] = ("tag", bright, ev["bright"].attrs)
        ev["selected"] = ("tag", selected, ev["selected"].attrs if "selected" in ev else {})
        if min_pulse_energy is not None:
            sel["n_low_pulse_energy"] = int((bright & ~ok).sum())
        sel["n_dark"] = int((~bright).sum())
        sel["n_selected"] = int(selected.sum())
        sel["n_tags"] = int(selected.size)
        out = run._replace(events=ev, selection=sel)
        if drop_unselected:
            sel["dropped_unselected"] = True
            sel["n_tags"] = int(selected.sum())
            out = out._replace(keep=selected, selection=sel)
        return out

    # -- images --------------------------------------------------------
    def images(self, chunks: int | str = "128MiB",
               window: tuple[slice, slice] | None = None) -> da.Array:
        """The images as a lazy dask array (tag, y, x) of float32.

        Parameters
        ----------
        chunks : int or str
            Tags per chunk, or a byte size of window data per chunk such as
            ``"256MiB"``. One task per chunk reads its tags.
        window : (slice, slice), optional
            Read only this (rows, cols) bounding box of each image (a
            hyperslab read). Steps are not allowed.
        """
        ny, nx = self.image_shape
        if window is None:
            window = (slice(0, ny), slice(0, nx))
        if len(window) != 2 or not all(isinstance(s, slice) for s in window):
            raise ParameterError(f"window must be (rows, cols) slices (got {window!r})")
        if any(s.step not in (None, 1) for s in window):
            raise ParameterError(f"window slices must have step 1 (got {window})")
        win = tuple(slice(*s.indices(n)[:2]) for s, n in zip(window, (ny, nx), strict=True))
        wy = win[0].stop - win[0].start
        wx = win[1].stop - win[1].start
        if wy <= 0 or wx <= 0:
            raise ParameterError(f"window {window} is empty for images of shape {(ny, nx)}")
        per = parse_chunk_size(chunks, wy * wx * 4)
        reader = hdf5._TagReader(self._sources, win, self.on_bad_tag)  # type: ignore[arg-type]
        n = len(self._sources)
        tchunks = tuple([per] * (n // per) + ([n % per] if n % per else [])) or (0,)
        name = "sacla-images-" + dask.base.tokenize(
            [(s.path, s.run, s.tag) for s in self._sources], win, self.on_bad_tag,
            [os.path.getmtime(p) for p in self.paths])
        return da.from_array(reader, chunks=(tchunks, wy, wx), name=name, asarray=False,
                             fancy=False, meta=np.empty((0, 0, 0), np.float32))


def _first_exposures(events: xr.Dataset, run_tags: dict[int, np.ndarray], n: int) -> np.ndarray:
    """True for tags among the first ``n`` exposures of their run."""
    tags = events["tag"].values
    runs = events["run"].values
    out = np.zeros(tags.size, dtype=bool)
    for rn in np.unique(runs):
        known = run_tags.get(int(rn))
        on = runs == rn
        if known is None:
            known = np.sort(tags[on])
        rank = np.searchsorted(known, tags[on])
        out[on] = rank < n
    return out


def _status_bright(events: xr.Dataset) -> tuple[np.ndarray, list[str]]:
    """Bright from the pulse-selector/shutter status; the variables used."""
    bright = np.ones(events.sizes["tag"], dtype=bool)
    used = []
    for key in STATUS_VARIABLES:
        if key in events:
            v = events[key].values.astype(np.float64)
            bright &= np.nan_to_num(v, nan=0) != 0
            used.append(events[key].attrs.get("hdf5_path", key))
    return bright, used


def open_run(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    on_bad_tag: OnBadTag = "fail",
    skip_first: int | None = None,
) -> Run:
    """Open one or several SACLA run files.

    Parameters
    ----------
    paths : path or list of paths
        DataConvert HDF5 files: several files of one run, or several runs.
        Tags are merged in order; a tag present in two files is refused.
    on_bad_tag : {"fail", "skip"}
        What to do with a tag whose detector dataset is missing or damaged.
    skip_first : int, optional
        Treat the first N exposures of each run as dark (see
        :meth:`Run.select_shots`).

    Returns
    -------
    Run

    Raises
    ------
    RunFileError, LayoutError, BadTagError
        With the file (and tag) at fault named.
    """
    if on_bad_tag not in ("fail", "skip"):
        raise ParameterError(f"on_bad_tag must be 'fail' or 'skip' (got {on_bad_tag!r})")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    plist = [os.fspath(p) for p in paths]
    if not plist:
        raise ParameterError("no run file given")
    real: dict[str, str] = {}
    for p in plist:
        rp = os.path.realpath(p)
        if rp in real:
            raise ParameterError(f"run file {p!r} is given twice (also as {real[rp]!r})")
        real[rp] = p
    sources: list[TagSource] = []
    ev_tables = []
    all_ev_tables = []
    bad_all: list[BadTag] = []
    shape = dtype = None
    seen: dict[int, str] = {}
    run_tags: dict[int, list[np.ndarray]] = {}
    for fi, p in enumerate(plist):
        runs, bad = _scan_file(p, on_bad_tag)
        bad_all += bad
        for r in runs:
            if r["shape"] is not None:
                if shape is None:
                    shape, dtype = r["shape"], r["dtype"]
                elif r["shape"] != shape:
                    raise LayoutError(f"{p!r} run {r['run']}: images are {r['shape']} but "
                                      f"earlier files have {shape}")
            ev = xr.Dataset({k: ("tag", v, {"hdf5_path": h5})
                             for k, (h5, v) in r["events"].items()},
                            coords={"tag": r["event_tags"]})
            ev["run"] = ("tag", np.full(r["event_tags"].size, r["run"], dtype=np.int64))
            all_ev_tables.append(ev)
            tags = r["image_tags"]
            run_tags.setdefault(r["run"], []).extend([r["event_tags"], tags])
            missing = np.setdiff1d(tags, r["event_tags"])
            if missing.size:
                warnings.warn(f"{p!r}: {missing.size} image tags are not in event_info "
                              f"(e.g. {missing[:3].tolist()}); their event data is NaN"
                              + (" and they count as dark"
                                 if any(k in r["events"] for k in STATUS_VARIABLES) else ""),
                              stacklevel=2)
            for t in tags.tolist():
                if t in seen:
                    raise LayoutError(f"tag {t} appears twice: in {seen[t]!r} and {p!r}; "
                                      "give each tag's file once")
                seen[t] = p
                sources.append(TagSource(p, r["run"], t, r["sensors"]))
            sub = ev.reindex(tag=tags)
            sub["source"] = ("tag", np.full(tags.size, fi, dtype=np.int64))
            sub["run"] = ("tag", np.full(tags.size, r["run"], dtype=np.int64))
            ev_tables.append(sub)
    if not sources:
        raise LayoutError(f"no tag with a detector image in {plist}"
                          + (f" ({len(bad_all)} bad tag(s) left out)" if bad_all else ""))
    sources.sort(key=lambda s: s.tag)
    events = xr.concat(ev_tables, dim="tag", join="outer") if len(ev_tables) > 1 else ev_tables[0]
    events = events.sortby("tag")
    all_events = (xr.concat(all_ev_tables, dim="tag", join="outer")
                  if len(all_ev_tables) > 1 else all_ev_tables[0])
    _, first = np.unique(all_events["tag"].values, return_index=True)
    all_events = all_events.isel(tag=first)  # files of one run may repeat its event data
    for tab in ev_tables + all_ev_tables:  # concat keeps only the first table's attrs
        for k, v in tab.data_vars.items():
            if k in events and "hdf5_path" in v.attrs:
                events[k].attrs.setdefault("hdf5_path", v.attrs["hdf5_path"])
    bright, status = _status_bright(events)
    events["tag"].attrs["long_name"] = "SACLA tag number"
    events["run"].attrs["long_name"] = "SACLA run number"
    abspaths = [os.path.abspath(p) for p in plist]
    events["source"].attrs.update(long_name="index of the tag's run file in the 'sources' "
                                            "attribute", sources=abspaths)
    if "photon_energy" in events:
        events["photon_energy"].attrs["units"] = "eV"
    if "pulse_energy" in events:
        events["pulse_energy"].attrs["units"] = "J"
    events["bright"] = ("tag", bright, {"long_name": "X-ray shot (pulse selector/shutter "
                                                     "open, not skipped)"})
    events["selected"] = ("tag", bright.copy(), {"long_name": "used for pairs"})
    events.attrs["sources"] = abspaths
    selection = {"dark_from": status or "none", "skip_first": 0, "tag_range": None,
                 "min_pulse_energy": None, "n_tags": int(bright.size),
                 "n_dark": int((~bright).sum()), "n_selected": int(bright.sum())}
    if bad_all:
        warnings.warn(f"{len(bad_all)} bad tag(s) left out: "
                      + "; ".join(map(str, bad_all[:5])) + ("..." if len(bad_all) > 5 else ""),
                      stacklevel=2)
    rt = {k: np.unique(np.concatenate(v)) for k, v in run_tags.items()}
    run = Run(plist, sources, events, tuple(shape), np.dtype(dtype), bad_all,  # type: ignore
              on_bad_tag, all_events, selection, rt)
    if skip_first:
        run = run.select_shots(skip_first=skip_first)
    return run


def mean_wavelength(run: Run) -> float:
    """Mean wavelength (Angstrom) of the selected shots from the photon energy in eV."""
    from ..geometry import energy_to_wavelength

    if "photon_energy" not in run.events:
        raise ParameterError(
            f"no photon energy in the event data of {run.paths}; give the wavelength "
            "(--wavelength, Angstrom)")
    use = run.selected if run.selected.any() else np.ones(len(run), dtype=bool)
    e = run.events["photon_energy"].values[use]
    e = e[np.isfinite(e)]
    if e.size == 0 or not np.all(e > 0):
        raise ParameterError(f"the photon energy in {run.paths} is missing or not positive; "
                             "give the wavelength (--wavelength, Angstrom)")
    return float(energy_to_wavelength(float(np.mean(e))))


__all__ = ["Run", "TagSource", "BadTag", "open_run", "parse_chunk_size", "mean_wavelength",
           "DETECTOR"]
