"""The fitted centre as a PONI geometry (``sacla-dask center --poni ... --out geom.poni``).

The circle fit finds where the direct beam hits the detector (the rings'
centre, to first order in the tilt). Untilted, that is the PONI. With the
rotations of a PONI file given, the written PONI is placed so that the
direct beam of the rotated detector hits the fitted centre at the same
distance (``Geometry.beam_center``).
"""

from __future__ import annotations

import os

from ..errors import OutputError, ParameterError
from ..geometry import Geometry

__all__ = ["geometry_at_beam_center", "write_center_poni"]


def geometry_at_beam_center(center: tuple[float, float], pixel_size: float, distance: float,
                            wavelength: float,
                            rotations: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Geometry:
    """The geometry with these rotations whose direct beam hits ``center`` (x, y pixels)."""
    g0 = Geometry(0.0, 0.0, pixel_size, distance, wavelength, *rotations)
    bx, by = g0.beam_center()
    return g0.replace(center_x=center[0] - bx, center_y=center[1] - by)


def write_center_poni(path: str | os.PathLike[str], center: tuple[float, float],
                      pixel_size: float | None, distance: float | None,
                      wavelength: float | None, shape: tuple[int, int],
                      rotations: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Geometry:
    """Write the PONI of the fitted centre; ParameterError naming what is missing."""
    from ..poni import write_poni

    missing = [f"--{n}" for n, v in (("pixel-size", pixel_size), ("distance", distance),
                                      ("wavelength", wavelength)) if v is None]
    if missing or pixel_size is None or distance is None or wavelength is None:
        raise ParameterError(f"a PONI file needs {', '.join(missing)} (give them, or --poni)")
    g = geometry_at_beam_center(center, pixel_size, distance, wavelength, rotations)
    try:
        write_poni(path, g, shape, comment="beam centre fitted by sacla-dask center")
    except OSError as exc:
        raise OutputError(f"cannot write the PONI file {os.fspath(path)!r}: {exc}") from None
    return g
