"""The beam centre of a run of separate panels (a CrystFEL ``.geom``).

The centre fit works on a picture of the detector; a ``.geom``'s panels
are shown as one (:func:`render`): a grid of the geometry's pixel size on
the plane normal to the beam at its distance, each grid pixel taking the
value of the panel pixel its ray reaches (nearest; pixels between panels
masked), so that the lab position of grid pixel ``(row, col)`` is ``(x, y)
= (origin_x + col, origin_y + row)`` pixels from where the ``.geom`` puts
the beam. A centre fitted there at ``(cx, cy)`` says the beam is really at
``(origin_x + cx, origin_y + cy)``: shifting every panel's ``corner_x``,
``corner_y`` by minus that (:func:`shift_geom`) puts it at (0, 0).
This picture is only for the fit; processing reads the panels' pixels
where they are.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from ..crystfel import CrystfelGeometry
from ..lab import DetectorLayout

__all__ = ["PanelView", "render", "shift_geom"]


@dataclasses.dataclass(frozen=True, eq=False)
class PanelView:
    """The panels drawn on a lab grid: ``image``, ``good`` and the grid's ``origin``.

    ``origin`` is the lab position ``(x, y)``, in pixels from the ``.geom``'s
    beam, of grid pixel (0, 0); the grid's pixel centres are those of the
    first panel's pixels (projected).
    """

    image: np.ndarray
    good: np.ndarray
    origin: tuple[float, float]
    geom: CrystfelGeometry

    def beam_offset(self, center: tuple[float, float]) -> tuple[float, float]:
        """Where a centre fitted on the grid puts the beam in the ``.geom``'s frame (px)."""
        return (self.origin[0] + center[0], self.origin[1] + center[1])


def render(geom: CrystfelGeometry, layout: DetectorLayout, image: np.ndarray,
           good: np.ndarray | None = None) -> PanelView:
    """Draw the stacked ``image`` of ``layout``'s panels on a lab grid (see the module)."""
    from ..polar.panels import _locate

    pixel, dist = geom.pixel_size, geom.distance
    corners = []
    for p in layout.panels:
        ss = np.array([0, 0, p.nss - 1, p.nss - 1])
        fs = np.array([0, p.nfs - 1, 0, p.nfs - 1])
        pos = p.positions(ss, fs)
        corners.append(pos[:, :2] * (dist / pos[:, 2:3]) / pixel)  # (t1, t2) on the plane, px
    c = np.concatenate(corners)
    # grid pixels on the first panel's pixel centres (exact for panels on one grid)
    ref = corners[0][0]
    y0, x0 = ref - np.ceil(ref - c.min(axis=0)) - 1
    ny, nx = (int(v) for v in np.ceil(c.max(axis=0) - (y0, x0)) + 2)
    yy, xx = np.mgrid[:ny, :nx]
    rays = np.stack([(yy.ravel() + y0) * pixel, (xx.ravel() + x0) * pixel,
                     np.full(yy.size, dist)], axis=1)
    k, ss_f, fs_f, _ = _locate(layout, rays)
    ok = k >= 0
    row0 = np.array([p.row0 for p in layout.panels] + [0])[k]
    col0 = np.array([p.col0 for p in layout.panels] + [0])[k]
    nss = np.array([p.nss for p in layout.panels] + [1])[k]
    nfs = np.array([p.nfs for p in layout.panels] + [1])[k]
    iy = np.clip(np.rint(ss_f).astype(np.int64), 0, nss - 1) + row0
    ix = np.clip(np.rint(fs_f).astype(np.int64), 0, nfs - 1) + col0
    iy, ix = np.where(ok, iy, 0), np.where(ok, ix, 0)
    src = np.asarray(image, dtype=np.float64)
    out = np.where(ok, src[iy, ix], 0.0).reshape(ny, nx)
    g = ok if good is None else ok & np.asarray(good, bool)[iy, ix]
    return PanelView(out, g.reshape(ny, nx), (float(x0), float(y0)), geom)


def shift_geom(path: str | os.PathLike[str], out: str | os.PathLike[str],
               offset: tuple[float, float]) -> int:
    """Copy a ``.geom`` with every ``corner_x``, ``corner_y`` shifted by ``-offset``.

    Returns the number of corners changed. Everything else is copied as it is.
    """
    dx, dy = offset
    pat = re.compile(r"^(\s*(?:[^;=\s]+/)?corner_([xy])\s*=\s*)([^;\s]+)(.*)$")
    n = 0
    lines = []
    with open(os.fspath(path)) as fh:
        for line in fh.read().splitlines():
            m = pat.match(line)
            if m:
                v = float(m.group(3)) - (dx if m.group(2) == "x" else dy)
                line = f"{m.group(1)}{v!r}{m.group(4)}"
                n += 1
            lines.append(line)
    with open(os.fspath(out), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return n
