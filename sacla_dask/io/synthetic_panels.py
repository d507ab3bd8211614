"""Synthetic unassembled runs: the assembled image cut into sensors, and their ``.geom``.

:class:`Panels` (a group of :func:`sacla_dask.io.synthetic.write_synthetic_run`)
writes the same physics as the assembled run, pixel for pixel, as separate
sensor datasets ``detector_2d_1 .. N`` (:mod:`sacla_dask.io.panels`) with a
CrystFEL geometry saying where each sensor's pixels are. The sensors tile
the assembled image in 2 columns of ``N / 2`` rows with ``gap`` pixels
between them (as the MPCCD octal's); each takes its pixels exactly where
they are on the assembled grid, so that a sensor's pixel and the assembled
pixel at the same place hold the same value. The right column's sensors
are stored turned by 180 degrees (``fs = -x``, ``ss = -y``), as the
octal's two columns face each other.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

__all__ = ["Panels", "SensorRect", "sensor_mask", "sensor_rects", "write_panels_geom"]


@dataclasses.dataclass(frozen=True)
class Panels:
    """Write the detector as separate sensors plus a CrystFEL ``.geom`` (default: assembled).

    Attributes
    ----------
    sensors : int
        0 (default): one assembled image (``detector_2d_assembled_1``); an
        even number N: N sensor datasets in 2 columns of N / 2 (8: the
        MPCCD octal).
    gap : int
        Pixels of the assembled grid between neighbouring sensors (not written).
    geom : str, optional
        Where to write the ``.geom`` (default: the run file's name with ``.geom``).
    per_sensor_data : bool
        Give each panel the ``data`` path of its sensor, ``min_ss`` within it
        (True, default); or no ``data``, ``min_ss`` in the stacked image
        (Cheetah's SACLA geometry files).
    flip : bool
        Store the right column's sensors turned by 180 degrees (default True).
    """

    sensors: int = 0
    gap: int = 6
    geom: str | None = None
    per_sensor_data: bool = True
    flip: bool = True

    def __post_init__(self) -> None:
        if self.sensors < 0 or self.sensors % 2:
            raise ValueError(f"sensors must be 0 or an even number (got {self.sensors})")
        if self.gap < 0:
            raise ValueError(f"gap must be >= 0 (got {self.gap})")


@dataclasses.dataclass(frozen=True)
class SensorRect:
    """Where sensor ``index`` (from 0) takes its pixels on the assembled grid."""

    index: int
    y0: int
    x0: int
    h: int
    w: int
    flipped: bool

    def take(self, image: np.ndarray) -> np.ndarray:
        """The sensor's dataset (C-contiguous) cut from an assembled ``image``."""
        part = image[self.y0:self.y0 + self.h, self.x0:self.x0 + self.w]
        return np.ascontiguousarray(part[::-1, ::-1] if self.flipped else part)


def sensor_rects(shape: tuple[int, int], panels: Panels) -> list[SensorRect]:
    """The sensors' rectangles on an assembled grid of ``shape``."""
    ny, nx = shape
    rows = panels.sensors // 2
    h = (ny - (rows - 1) * panels.gap) // rows
    w = (nx - panels.gap) // 2
    if h < 1 or w < 1:
        raise ValueError(f"{panels.sensors} sensors with gaps of {panels.gap} px do not fit "
                         f"a {ny}x{nx} image")
    out = []
    for k in range(panels.sensors):
        i, j = k % rows, k // rows
        out.append(SensorRect(k, i * (h + panels.gap), j * (w + panels.gap), h, w,
                              panels.flip and j == 1))
    return out


def sensor_mask(shape: tuple[int, int], panels: Panels) -> np.ndarray:
    """The assembled pixels that lie on a sensor (bool, True = on a sensor)."""
    m = np.zeros(shape, dtype=bool)
    for r in sensor_rects(shape, panels):
        m[r.y0:r.y0 + r.h, r.x0:r.x0 + r.w] = True
    return m


def write_panels_geom(path: str | os.PathLike[str], shape: tuple[int, int], panels: Panels,
                      center: tuple[float, float], pixel_size: float, distance: float) -> str:
    """Write the ``.geom`` of the sensors of :func:`sensor_rects` (beam at ``center``)."""
    from ..crystfel import write_geom

    cx, cy = center
    out = []
    for r in sensor_rects(shape, panels):
        if r.flipped:  # local (0, 0) is the assembled (y0 + h - 1, x0 + w - 1)
            corner = (r.x0 + r.w - 0.5 - cx, r.y0 + r.h - 0.5 - cy)
            fs, ss = (-1.0, 0.0), (0.0, -1.0)
        else:
            corner = (r.x0 - 0.5 - cx, r.y0 - 0.5 - cy)
            fs, ss = (1.0, 0.0), (0.0, 1.0)
        row0 = 0 if panels.per_sensor_data else r.index * r.h
        out.append(dict(name=f"q{r.index + 1}", min_fs=0, max_fs=r.w - 1, min_ss=row0,
                        max_ss=row0 + r.h - 1, fs=fs, ss=ss, corner_x=corner[0],
                        corner_y=corner[1],
                        data=(f"/%/detector_2d_{r.index + 1}/%/detector_data"
                              if panels.per_sensor_data else None)))
    p = os.fspath(path)
    write_geom(p, out, res=1.0 / pixel_size, clen=distance,
               header=f"synthetic {panels.sensors}-sensor detector written by sacla_dask")
    return p
