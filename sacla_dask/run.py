"""Reading SACLA DataConvert run files: tags, event data and lazy images.

This module owns the knowledge of the SACLA "DataConvert" HDF5 layout::

    /file_info/run_number_list
    /run_N/detector_2d_assembled_1/detector_info/...
    /run_N/detector_2d_assembled_1/tag_T/detector_data     (ny, nx) float32
    /run_N/event_info/tag_number_list                      (ntag_event,)
    /run_N/event_info/.../xfel_pulse_selector_status       (ntag_event,)
    /run_N/event_info/.../photon_energy_in_eV               (ntag_event,)
    /run_N/event_info/.../*pulse_energy*                     (ntag_event,)

:func:`open_run` returns a :class:`Run`: the sorted tags that really have an
image (event_info may list more tags than a subset file holds images for),
the per-tag event data as an :class:`xarray.Dataset`, and the images as a
lazy :class:`dask.array.Array` (tag, y, x) chunked by several tags per task.
Each task opens the file itself (h5py objects do not pickle), so the graph
runs on distributed workers. Nothing is read before it is computed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import xarray as xr

from .errors import BadTagError, LayoutError, ParameterError, RunFileError

try:  # registers bitshuffle/LZ4/zstd... HDF5 filters used for compressed exports
    import hdf5plugin  # noqa: F401
except ImportError:  # pragma: no cover - hdf5plugin is a hard dependency
    hdf5plugin = None

import h5py

DETECTOR = "detector_2d_assembled_1"
TAG_RE = re.compile(r"^tag_(\d+)$")
OnBadTag = Literal["fail", "skip"]

#: event_info dataset base names -> standard variable names in ``Run.events``.
EVENT_ALIASES = {
    "xfel_pulse_selector_status": "pulse_selector",
    "shutter_status": "shutter",
    "photon_energy_in_eV": "photon_energy",
}


def _open_h5(path: str) -> h5py.File:
    """Open an HDF5 file read-only, turning every failure into RunFileError."""
    if not os.path.exists(path):
        raise RunFileError(f"run file {path!r} does not exist")
    if os.path.isdir(path):
        raise RunFileError(f"run file {path!r} is a directory, not an HDF5 file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        size = os.path.getsize(path)
        hint = "truncated or not an HDF5 file" if size > 0 else "empty (0 bytes)"
        raise RunFileError(f"cannot open run file {path!r}: {hint} ({exc})") from None


@dataclasses.dataclass(frozen=True)
class TagSource:
    """Where one tag's image lives."""

    path: str
    run: int
    tag: int

    @property
    def dataset(self) -> str:
        return f"/run_{self.run}/{DETECTOR}/tag_{self.tag}/detector_data"


def _event_datasets(group: h5py.Group, n: int) -> dict[str, np.ndarray]:
    """All 1-D datasets under event_info of length ``n``, by standard/base name."""
    found: dict[str, tuple[str, np.ndarray]] = {}

    def visit(name: str, obj: Any) -> None:
        if not isinstance(obj, h5py.Dataset) or obj.ndim != 1 or obj.shape[0] != n:
            return
        base = name.rsplit("/", 1)[-1]
        if base == "tag_number_list":
            return
        if obj.dtype.kind not in "biuf":
            return
        key = EVENT_ALIASES.get(base)
        if key is None and "pulse_energy" in base:
            key = "pulse_energy"
        if key is None:
            key = base
        if key in found:  # two datasets with one base name: use the path
            key = name.replace("/", "__")
        found[key] = (name, obj[()])

    group.visititems(visit)
    return {k: v[1] for k, v in found.items()}


def _scan_file(path: str, on_bad_tag: OnBadTag) -> tuple[list[dict[str, Any]], list[str]]:
    """Read the layout of one file: per-run tags, events, image shape/dtype."""
    runs: list[dict[str, Any]] = []
    bad: list[str] = []
    with _open_h5(path) as fh:
        if "file_info" not in fh or "run_number_list" not in fh["file_info"]:
            raise LayoutError(
                f"{path!r} is HDF5 but not a SACLA DataConvert file: "
                "no /file_info/run_number_list"
            )
        run_numbers = [int(r) for r in np.atleast_1d(fh["file_info/run_number_list"][()])]
        if not run_numbers:
            raise LayoutError(f"{path!r}: /file_info/run_number_list is empty")
        for rn in run_numbers:
            rgrp = f"run_{rn}"
            if rgrp not in fh:
                raise LayoutError(f"{path!r}: run {rn} is listed but /{rgrp} is missing")
            g = fh[rgrp]
            if DETECTOR not in g:
                raise LayoutError(f"{path!r}: /{rgrp}/{DETECTOR} is missing")
            if "event_info" not in g or "tag_number_list" not in g["event_info"]:
                raise LayoutError(f"{path!r}: /{rgrp}/event_info/tag_number_list is missing")
            event_tags = np.asarray(g["event_info/tag_number_list"][()], dtype=np.int64).ravel()
            events = _event_datasets(g["event_info"], event_tags.size)
            det = g[DETECTOR]
            image_tags = []
            shape = dtype = None
            for name in det:
                m = TAG_RE.match(name)
                if not m:
                    continue
                tag = int(m.group(1))
                try:
                    grp = det[name]
                    ds = grp.get("detector_data")
                    if not isinstance(ds, h5py.Dataset):
                        raise BadTagError(
                            f"{path!r}: tag {tag} has no detector_data dataset "
                            f"(/{rgrp}/{DETECTOR}/{name})"
                        )
                    if ds.ndim != 2:
                        raise BadTagError(
                            f"{path!r}: tag {tag} detector_data has shape {ds.shape}, "
                            "expected a 2-D image"
                        )
                    if ds.dtype.kind not in "iuf":
                        raise BadTagError(
                            f"{path!r}: tag {tag} detector_data has dtype {ds.dtype}, "
                            "expected numbers"
                        )
                    if shape is None:
                        shape, dtype = ds.shape, ds.dtype
                    elif ds.shape != shape:
                        raise BadTagError(
                            f"{path!r}: tag {tag} detector_data has shape {ds.shape}, "
                            f"but other tags have {shape}"
                        )
                except BadTagError as exc:
                    if on_bad_tag == "fail":
                        raise
                    bad.append(str(exc))
                    continue
                except (OSError, KeyError, RuntimeError) as exc:
                    msg = f"{path!r}: tag {tag} cannot be read ({exc})"
                    if on_bad_tag == "fail":
                        raise BadTagError(msg) from None
                    bad.append(msg)
                    continue
                image_tags.append(tag)
            runs.append(
                dict(run=rn, event_tags=event_tags, events=events,
                     image_tags=np.array(sorted(image_tags), dtype=np.int64),
                     shape=shape, dtype=dtype)
            )
    return runs, bad


def _read_block(
    sources: Sequence[TagSource],
    window: tuple[slice, slice],
    on_bad_tag: OnBadTag,
) -> np.ndarray:
    """Read the window of each tag's image into one float32 block (the task kernel)."""
    wy = window[0].stop - window[0].start
    wx = window[1].stop - window[1].start
    out = np.empty((len(sources), wy, wx), dtype=np.float32)
    fh = None
    cur = None
    try:
        for i, src in enumerate(sources):
            if src.path != cur:
                if fh is not None:
                    fh.close()
                fh = _open_h5(src.path)
                cur = src.path
            try:
                ds = fh[src.dataset]
                if ds.dtype == np.float32:
                    ds.read_direct(out, source_sel=window, dest_sel=np.s_[i])
                else:
                    out[i] = ds[window]
            except (OSError, KeyError, ValueError, TypeError) as exc:
                if on_bad_tag == "fail":
                    raise BadTagError(
                        f"{src.path!r}: tag {src.tag} cannot be read ({exc}); "
                        "use on_bad_tag='skip' (--on-bad-tag skip) to go on without it"
                    ) from None
                warnings.warn(f"{src.path!r}: skipping unreadable tag {src.tag} ({exc})",
                              stacklevel=2)
                out[i] = np.nan
    finally:
        if fh is not None:
            fh.close()
    return out


class _TagReader:
    """Array-like over (tag, y, x) that dask's ``from_array`` slices per block.

    Holds only file paths and tag numbers, so it pickles to workers cheaply.
    """

    def __init__(self, sources: Sequence[TagSource], shape: tuple[int, int],
                 window: tuple[slice, slice], on_bad_tag: OnBadTag) -> None:
        self.sources = list(sources)
        self.window = window
        self.on_bad_tag = on_bad_tag
        wy = window[0].stop - window[0].start
        wx = window[1].stop - window[1].start
        self.shape = (len(self.sources), wy, wx)
        self.dtype = np.dtype(np.float32)
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        tsel, ysel, xsel = key
        idx = range(len(self.sources))[tsel]
        y = range(self.window[0].start, self.window[0].stop)[ysel]
        x = range(self.window[1].start, self.window[1].stop)[xsel]
        if y.step != 1 or x.step != 1:
            block = _read_block([self.sources[i] for i in idx], self.window, self.on_bad_tag)
            return block[:, ysel, xsel]
        win = (slice(y.start, y.stop), slice(x.start, x.stop))
        return _read_block([self.sources[i] for i in idx], win, self.on_bad_tag)


def parse_chunk_size(chunk_size: int | str, image_nbytes: int) -> int:
    """Tags per chunk for a chunk size in tags (int) or bytes (``"256MiB"``)."""
    if isinstance(chunk_size, str):
        try:
            nbytes = dask.utils.parse_bytes(chunk_size)
        except (ValueError, TypeError):
            raise ParameterError(
                f"chunk size {chunk_size!r} is not a size such as '256MiB' or a number of tags"
            ) from None
        return max(1, int(nbytes // max(1, image_nbytes)))
    n = int(chunk_size)
    if n < 1:
        raise ParameterError(f"chunk size must be >= 1 tag (got {chunk_size})")
    return n


class Run:
    """One SACLA run (or several files/runs merged by tag).

    Attributes
    ----------
    paths : list of str
        The files read.
    runs : list of int
        SACLA run numbers.
    tags : ndarray of int64
        Sorted tags that have an image.
    events : xarray.Dataset
        Per-tag event data on the ``tag`` dimension (image tags only):
        ``bright`` (bool), ``run``, ``source`` (file index), and whatever
        event_info holds (``pulse_selector``, ``photon_energy`` in eV,
        ``pulse_energy``...).
    image_shape : (ny, nx)
        Detector image shape.
    bad_tags : list of str
        Messages for tags left out at open time (``on_bad_tag="skip"``).
    """

    def __init__(self, paths: list[str], sources: list[TagSource], events: xr.Dataset,
                 image_shape: tuple[int, int], image_dtype: np.dtype, bad_tags: list[str],
                 on_bad_tag: OnBadTag, all_events: xr.Dataset | None = None) -> None:
        self.paths = paths
        self._sources = sources
        self.events = events
        self.all_events = all_events if all_events is not None else events
        self.image_shape = image_shape
        self.image_dtype = image_dtype
        self.bad_tags = bad_tags
        self.on_bad_tag = on_bad_tag

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
    def sources(self) -> list[TagSource]:
        return list(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    def __repr__(self) -> str:
        t = self.tags
        rng = f"{t[0]}..{t[-1]}" if t.size else "none"
        return (f"<Run {','.join(map(str, self.runs))}: {len(self)} tags ({rng}), "
                f"{int(self.bright.sum())} bright, images {self.image_shape} "
                f"{self.image_dtype} from {len(self.paths)} file(s)>")

    # -- selection -----------------------------------------------------
    def select(self, keep: np.ndarray | Sequence[bool]) -> Run:
        """A new Run holding only the tags where ``keep`` is True."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (len(self),):
            raise ParameterError(f"selection must have one boolean per tag ({len(self)})")
        idx = np.nonzero(keep)[0]
        return Run(self.paths, [self._sources[i] for i in idx], self.events.isel(tag=idx),
                   self.image_shape, self.image_dtype, self.bad_tags, self.on_bad_tag,
                   self.all_events)

    def sel_tags(self, tags: Iterable[int]) -> Run:
        """A new Run with the given tags (all must exist)."""
        tags = np.asarray(list(tags), dtype=np.int64)
        missing = np.setdiff1d(tags, self.tags)
        if missing.size:
            raise ParameterError(f"tags not in the run: {missing[:10].tolist()}")
        return self.select(np.isin(self.tags, tags))

    # -- images --------------------------------------------------------
    def images(self, chunks: int | str = "128MiB",
               window: tuple[slice, slice] | None = None) -> da.Array:
        """The images as a lazy dask array (tag, y, x) of float32.

        Parameters
        ----------
        chunks : int or str
            Tags per chunk, or a byte size per chunk such as ``"256MiB"``.
        window : (slice, slice), optional
            Read only this (rows, cols) bounding box of each image (a
            hyperslab read: only those bytes leave the disk).
        """
        ny, nx = self.image_shape
        if window is None:
            window = (slice(0, ny), slice(0, nx))
        window = tuple(slice(*s.indices(n)[:2]) for s, n in zip(window, (ny, nx)))  # type: ignore
        wy = window[0].stop - window[0].start
        wx = window[1].stop - window[1].start
        per = parse_chunk_size(chunks, wy * wx * 4)
        reader = _TagReader(self._sources, self.image_shape, window, self.on_bad_tag)
        n = len(self._sources)
        tchunks = tuple([per] * (n // per) + ([n % per] if n % per else [])) or (0,)
        name = "sacla-images-" + dask.base.tokenize(
            [(s.path, s.run, s.tag) for s in self._sources], window,
            [os.path.getmtime(p) for p in self.paths])
        return da.from_array(reader, chunks=(tchunks, wy, wx), name=name, asarray=False,
                             fancy=False, meta=np.empty((0, 0, 0), np.float32))


def open_run(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    on_bad_tag: OnBadTag = "fail",
    skip_first: int | None = None,
) -> Run:
    """Open one or several SACLA run files.

    Parameters
    ----------
    paths : path or list of paths
        DataConvert HDF5 files (several files of a run, or several runs).
    on_bad_tag : {"fail", "skip"}
        What to do with a tag whose detector dataset is missing or damaged.
    skip_first : int, optional
        Treat the first N tags as dark when the file has no pulse-selector
        status (ignored when it has one).

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
    sources: list[TagSource] = []
    ev_tables = []
    all_ev_tables = []
    bad_all: list[str] = []
    shape = dtype = None
    seen: dict[int, str] = {}
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
            ev = xr.Dataset({k: ("tag", v) for k, v in r["events"].items()},
                            coords={"tag": r["event_tags"]})
            ev["run"] = ("tag", np.full(r["event_tags"].size, r["run"], dtype=np.int64))
            all_ev_tables.append(ev)
            tags = r["image_tags"]
            missing = np.setdiff1d(tags, r["event_tags"])
            if missing.size:
                warnings.warn(f"{p!r}: {missing.size} image tags are not in event_info "
                              f"(e.g. {missing[:3].tolist()}); their event data is NaN",
                              stacklevel=2)
            for t in tags:
                t = int(t)
                if t in seen:
                    raise LayoutError(f"tag {t} appears twice: in {seen[t]!r} and {p!r}")
                seen[t] = p
                sources.append(TagSource(p, r["run"], t))
            sub = ev.reindex(tag=tags)
            sub["source"] = ("tag", np.full(tags.size, fi, dtype=np.int64))
            sub["run"] = ("tag", np.full(tags.size, r["run"], dtype=np.int64))
            ev_tables.append(sub)
    if not sources:
        raise LayoutError(f"no tag with a detector image in {plist}")
    order = np.argsort([s.tag for s in sources], kind="stable")
    sources = [sources[i] for i in order]
    events = xr.concat(ev_tables, dim="tag", join="outer") if len(ev_tables) > 1 else ev_tables[0]
    events = events.sortby("tag")
    all_events = (xr.concat(all_ev_tables, dim="tag", join="outer")
                  if len(all_ev_tables) > 1 else all_ev_tables[0])
    events["bright"] = ("tag", _bright(events, skip_first))
    events["tag"].attrs["long_name"] = "SACLA tag number"
    if "photon_energy" in events:
        events["photon_energy"].attrs["units"] = "eV"
    events.attrs["sources"] = list(plist)
    if bad_all:
        warnings.warn(f"{len(bad_all)} bad tag(s) left out: " + "; ".join(bad_all[:5]),
                      stacklevel=2)
    return Run(plist, sources, events, tuple(shape), np.dtype(dtype), bad_all, on_bad_tag,
               all_events)


def _bright(events: xr.Dataset, skip_first: int | None) -> np.ndarray:
    n = events.sizes["tag"]
    bright = np.ones(n, dtype=bool)
    have_status = False
    for key in ("pulse_selector", "shutter"):
        if key in events:
            v = events[key].values
            bright &= np.nan_to_num(v, nan=0) != 0
            have_status = True
    if not have_status and skip_first:
        bright[: int(skip_first)] = False
    return bright


def mean_wavelength(run: Run) -> float:
    """Mean wavelength (Angstrom) of the bright shots from the photon energy in eV."""
    from .geometry import energy_to_wavelength

    if "photon_energy" not in run.events:
        raise ParameterError(
            f"no photon energy in the event data of {run.paths}; give the wavelength "
            "(--wavelength, Angstrom)")
    e = run.events["photon_energy"].values[run.bright]
    e = e[np.isfinite(e)]
    if e.size == 0 or not np.all(e > 0):
        raise ParameterError(f"the photon energy in {run.paths} is missing or not positive; "
                             "give the wavelength (--wavelength, Angstrom)")
    return float(energy_to_wavelength(float(np.mean(e))))


__all__ = ["Run", "TagSource", "open_run", "parse_chunk_size", "mean_wavelength", "DETECTOR"]
_ = math
