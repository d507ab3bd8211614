"""Unassembled runs: one dataset per sensor, read as one stacked image per tag.

DataConvert can write each sensor of a multi-sensor detector (the MPCCD
octal's eight) on its own::

    /run_N/detector_2d_1/tag_T/detector_data    (nss, nfs)
    ...
    /run_N/detector_2d_8/tag_T/detector_data

instead of ``detector_2d_assembled_1``. Such a run's image is the *stacked
image*: the sensors' datasets one below the other, sensor ``k`` (from 1) in
rows ``(k - 1) * nss .. k * nss - 1``, ``(n * nss, nfs)`` in all. Nothing
is assembled or interpolated: a CrystFEL geometry (:mod:`sacla_dask.crystfel`)
says where each of these pixels is, and the polar operator reads them
where they are (:mod:`sacla_dask.polar.panels`). The run's graph and
readers are those of assembled runs; a tag's window of the stacked image
is read sensor by sensor (:func:`read_stacked`, one HDF5 hyperslab read per
sensor the window meets, straight into its rows of the output).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

if TYPE_CHECKING:
    from .run import TagSource

__all__ = ["SENSOR_RE", "read_stacked", "scan_sensor_tags", "sensor_groups"]

SENSOR_RE = re.compile(r"^detector_2d_(\d+)$")
_TAG_RE = re.compile(r"^tag_(\d+)$")


def sensor_groups(run_group: h5py.Group) -> tuple[str, ...]:
    """The run's sensor groups ``detector_2d_1 .. N`` in order (empty if none).

    Raises ValueError when they are not numbered 1..N without a hole.
    """
    found = sorted((int(m.group(1)), name) for name in run_group
                   if (m := SENSOR_RE.match(name)))
    if not found:
        return ()
    nums = [n for n, _ in found]
    if nums != list(range(1, len(nums) + 1)):
        raise ValueError(f"the sensor groups are {[name for _, name in found]}: expected "
                         f"detector_2d_1..{len(nums)} without a hole")
    return tuple(name for _, name in found)


def scan_sensor_tags(g: h5py.Group, sensors: tuple[str, ...],
                     check: Callable[[h5py.Group, str], tuple[tuple[int, ...], Any]]
                     ) -> tuple[list[int], list[tuple[int, str]], tuple[int, int] | None,
                                np.dtype | None]:
    """Tags with all sensors' images, bad tags ``(tag, reason)``, stacked shape, dtype.

    A tag is listed from the sensors' tag groups (their union); one that a
    sensor lacks, or whose image there is malformed or of another shape
    than the others, is bad. ``check(group, "tag_T")`` is the assembled
    reader's per-tag check (shape, dataset id; ValueError saying what is wrong).
    """
    tags: set[int] = set()
    for s in sensors:
        tags.update(int(m.group(1)) for name in g[s] if (m := _TAG_RE.match(name)))
    good: list[int] = []
    bad: list[tuple[int, str]] = []
    shape: tuple[int, ...] | None = None
    dtype = None
    groups = [g[s] for s in sensors]
    for tag in sorted(tags):
        name = f"tag_{tag}"
        try:
            for s, det in zip(sensors, groups, strict=True):
                try:
                    tshape, dsid = check(det, name)
                except ValueError as exc:
                    raise ValueError(f"{exc} (/{g.name.strip('/')}/{s}/{name})") from None
                except (OSError, RuntimeError) as exc:
                    raise ValueError(f"detector_data cannot be opened ({exc}) "
                                     f"(/{g.name.strip('/')}/{s}/{name})") from None
                if shape is None:
                    shape, dtype = tshape, dsid.dtype
                elif tshape != shape:
                    raise ValueError(f"detector_data has shape {tshape}, but other sensors or "
                                     f"tags have {shape} (/{g.name.strip('/')}/{s}/{name})")
        except ValueError as exc:
            bad.append((tag, str(exc)))
            continue
        good.append(tag)
    stacked = None if shape is None else (len(sensors) * int(shape[0]), int(shape[1]))
    return good, bad, stacked, dtype


def read_stacked(fid: h5py.h5f.FileID, src: TagSource, window: tuple[slice, slice],
                 out: np.ndarray) -> None:
    """Read the window of one tag's stacked image into ``out`` (float32, window shape).

    Each sensor the window's rows meet is read with one hyperslab read into
    its rows of ``out``; HDF5 converts integer pixels to float32.
    """
    (y0, y1), (x0, x1) = (window[0].start, window[0].stop), (window[1].start, window[1].stop)
    row = 0
    for s in src.sensors:
        dsid = h5py.h5d.open(fid, f"/run_{src.run}/{s}/tag_{src.tag}/detector_data".encode())
        fspace = dsid.get_space()
        h, w = fspace.shape
        if x1 > w:
            raise ValueError(f"sensor {s} image shape {(h, w)} does not hold the window {window}")
        a, b = max(y0, row), min(y1, row + h)
        if a < b:
            dest = out[a - y0:b - y0]
            fspace.select_hyperslab((a - row, x0), (b - a, x1 - x0))
            if dest.flags.c_contiguous:
                dsid.read(h5py.h5s.create_simple(dest.shape), fspace, dest)
            else:  # pragma: no cover - out is a C-contiguous window
                buf = np.empty(dest.shape, np.float32)
                dsid.read(h5py.h5s.create_simple(buf.shape), fspace, buf)
                dest[...] = buf
        row += h
    if row < y1:
        raise ValueError(f"the {len(src.sensors)} sensors hold {row} rows, not the window "
                         f"{window}")
