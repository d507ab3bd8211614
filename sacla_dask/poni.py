"""pyFAI PONI files: read one into a geometry, write a geometry as one.

A PONI file (pyFAI's ``pyFAI.io.ponifile``) holds ``Distance``, ``Poni1``,
``Poni2`` (metres), ``Rot1..3`` (radians), ``Wavelength`` (metres) and the
detector (``Detector`` and, from version 2, ``Detector_config`` as JSON:
``pixel1``, ``pixel2`` metres, ``max_shape``, ``orientation``; version 1:
``PixelSize1``, ``PixelSize2``). Index 1 is the slow (row, ``y``) axis, 2
the fast (column, ``x``) one; pyFAI puts pixel centres at ``(i + 1/2) *
pixel``, so ``center_y = poni1 / pixel1 - 1/2``, ``center_x = poni2 /
pixel2 - 1/2`` (:class:`sacla_dask.geometry.Geometry`, whose centre is the
PONI when tilted). What is written is version 2 (a ``Detector`` with
``pixel1``, ``pixel2`` and ``max_shape``), which pyFAI reads back to the
same numbers (floats written with ``repr``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

from .errors import GeometryError, ParameterError
from .geometry import Geometry

__all__ = ["PoniGeometry", "read_poni", "write_poni"]

_REQUIRED = ("distance", "poni1", "poni2")


@dataclasses.dataclass(frozen=True)
class PoniGeometry:
    """What a PONI file says (pyFAI's units: metres, radians).

    ``shape`` is the detector's ``max_shape`` (rows, columns) when the file
    gives one; ``wavelength`` is None when it gives none.
    """

    path: str
    distance: float
    poni1: float
    poni2: float
    rot1: float
    rot2: float
    rot3: float
    pixel1: float
    pixel2: float
    wavelength: float | None
    shape: tuple[int, int] | None
    detector: str

    @property
    def center(self) -> tuple[float, float]:
        """The PONI in pixels, ``(x, y)`` (x: fast/column axis)."""
        return (self.poni2 / self.pixel2 - 0.5, self.poni1 / self.pixel1 - 0.5)

    def geometry(self, wavelength: float | None = None) -> Geometry:
        """The :class:`Geometry` (wavelength in Angstrom: the file's unless given)."""
        wl = wavelength if wavelength is not None else (
            None if self.wavelength is None else self.wavelength * 1e10)
        if wl is None:
            raise ParameterError(f"PONI file {self.path!r} has no Wavelength; give --wavelength")
        cx, cy = self.center
        return Geometry(cx, cy, self.pixel1, self.distance, wl, self.rot1, self.rot2, self.rot3)

    def check_shape(self, shape: tuple[int, int]) -> None:
        """GeometryError unless the file's detector shape (if any) is ``shape``."""
        if self.shape is not None and tuple(self.shape) != tuple(shape):
            raise GeometryError(
                f"PONI file {self.path!r}: Detector_config max_shape {list(self.shape)} is not "
                f"the run's image shape {list(shape)} (a PONI of another detector?)")


def _float(path: str, key: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise GeometryError(f"PONI file {path!r}: {key} must be a number (got {value!r})") from None
    if not math.isfinite(v):
        raise GeometryError(f"PONI file {path!r}: {key} must be finite (got {value!r})")
    return v


def read_poni(path: str | os.PathLike[str]) -> PoniGeometry:
    """Read a PONI file (versions 1, 2, 2.1 and 3 without parallax).

    Raises
    ------
    ParameterError
        The file does not exist.
    GeometryError
        A key missing or not a number, non-square pixels, a detector
        orientation other than pyFAI's default (3), parallax correction on:
        the message names the file and the key.
    """
    p = os.fspath(path)
    try:
        with open(p) as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        raise ParameterError(f"PONI file {p!r} does not exist") from None
    except UnicodeDecodeError:
        raise GeometryError(f"PONI file {p!r} is not a text file") from None
    data: dict[str, str] = {}
    for line in lines:
        if line.lstrip().startswith("#") or ":" not in line:
            continue
        k, v = line.split(":", 1)
        data[k.strip().lower()] = v.strip()
    if "dist" in data and "distance" not in data:
        data["distance"] = data["dist"]
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise GeometryError(f"PONI file {p!r} lacks {', '.join(k.capitalize() for k in missing)}"
                            " (is it a pyFAI PONI file?)")
    vals = {k: _float(p, k.capitalize(), data[k]) for k in _REQUIRED}
    rots = [_float(p, f"Rot{i}", data.get(f"rot{i}", 0.0)) for i in (1, 2, 3)]
    wl = data.get("wavelength")
    wavelength = None if wl in (None, "", "None") else _float(p, "Wavelength", wl)
    if str(data.get("parallax", "false")).lower() == "true":
        raise GeometryError(f"PONI file {p!r}: Parallax: True is not supported (sacla_dask "
                            "uses no parallax correction)")
    detector = data.get("detector", "Detector")
    config: dict[str, Any] = {}
    if "detector_config" in data:
        try:
            config = json.loads(data["detector_config"])
        except json.JSONDecodeError as exc:
            raise GeometryError(f"PONI file {p!r}: Detector_config is not JSON: {exc}") from None
        if not isinstance(config, dict):
            raise GeometryError(f"PONI file {p!r}: Detector_config must be a JSON object")
    pix: dict[str, Any] = {"pixel1": config.get("pixel1", data.get("pixelsize1")),
                           "pixel2": config.get("pixel2", data.get("pixelsize2"))}
    shape = config.get("max_shape")
    if (pix["pixel1"] is None or pix["pixel2"] is None) and detector not in ("Detector", "None"):
        pix, shape = _named_detector(p, detector, config, pix, shape)
    for k in ("pixel1", "pixel2"):
        if pix[k] is None:
            raise GeometryError(f"PONI file {p!r} gives no {k} (Detector_config {k} or "
                                f"PixelSize{k[-1]})")
    p1 = _float(p, "pixel1", pix["pixel1"])
    p2 = _float(p, "pixel2", pix["pixel2"])
    if p1 <= 0 or p2 <= 0:
        raise GeometryError(f"PONI file {p!r}: pixel sizes must be positive (pixel1={p1}, "
                            f"pixel2={p2})")
    if abs(p1 - p2) > 1e-9 * max(p1, p2):
        raise GeometryError(f"PONI file {p!r}: pixel1={p1} and pixel2={p2} differ; sacla_dask "
                            "needs square pixels")
    orientation = int(config.get("orientation", 3))
    if orientation != 3:
        raise GeometryError(f"PONI file {p!r}: Detector_config orientation {orientation} is not "
                            "supported (only pyFAI's default 3: pixel (0, 0) at the origin)")
    if vals["distance"] <= 0:
        raise GeometryError(f"PONI file {p!r}: Distance must be positive (got "
                            f"{vals['distance']})")
    shp: tuple[int, int] | None = None
    if shape is not None:
        try:
            shp = (int(shape[0]), int(shape[1]))
        except (TypeError, ValueError, IndexError):
            raise GeometryError(f"PONI file {p!r}: max_shape must be [rows, columns] (got "
                                f"{shape!r})") from None
    return PoniGeometry(p, vals["distance"], vals["poni1"], vals["poni2"], rots[0], rots[1],
                        rots[2], p1, p2, wavelength, shp, detector)


def _named_detector(path: str, name: str, config: dict[str, Any], pix: dict[str, Any],
                    shape: Any) -> tuple[dict[str, Any], Any]:
    """Pixel sizes and shape of one of pyFAI's named detectors (pyFAI needed)."""
    try:
        from pyFAI.detectors import detector_factory
    except ImportError:
        raise GeometryError(f"PONI file {path!r}: Detector {name!r} gives no pixel1/pixel2; "
                            "install pyFAI to read its named detectors") from None
    try:
        det = detector_factory(name, config or None)
    except Exception as exc:  # pyFAI raises several kinds
        raise GeometryError(f"PONI file {path!r}: unknown Detector {name!r} ({exc})") from None
    return ({"pixel1": det.pixel1, "pixel2": det.pixel2},
            shape if shape is not None else det.max_shape)


def write_poni(path: str | os.PathLike[str], geometry: Geometry,
               shape: tuple[int, int] | None = None, comment: str | None = None) -> None:
    """Write ``geometry`` as a PONI file (version 2; ``shape`` = image rows, columns)."""
    p = geometry.pixel_size
    config: dict[str, Any] = {"pixel1": p, "pixel2": p}
    if shape is not None:
        config["max_shape"] = [int(shape[0]), int(shape[1])]
    lines = ["# Nota: C-Order, 1 refers to the Y axis, 2 to the X axis",
             f"# Written by sacla_dask on {time.ctime()}"]
    if comment:
        lines += [f"# {c}" for c in comment.splitlines()]
    lines += ["poni_version: 2", "Detector: Detector",
              f"Detector_config: {json.dumps(config)}",
              f"Distance: {geometry.distance!r}",
              f"Poni1: {(geometry.center_y + 0.5) * p!r}",
              f"Poni2: {(geometry.center_x + 0.5) * p!r}",
              f"Rot1: {geometry.rot1!r}", f"Rot2: {geometry.rot2!r}", f"Rot3: {geometry.rot3!r}",
              f"Wavelength: {geometry.wavelength * 1e-10!r}"]
    with open(os.fspath(path), "w") as fh:
        fh.write("\n".join(lines) + "\n")
