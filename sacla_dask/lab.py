"""Detector pixels in the laboratory frame: tilted detectors and separate panels.

The frame is pyFAI's (``pyFAI.geometry.core.Geometry.calc_pos_zyx``), in
metres, the sample at the origin: ``t3`` along the beam, ``t1`` along the
detector's slow (row, ``y``) axis and ``t2`` along its fast (column, ``x``)
axis when it is not rotated. A pixel at ``(p1, p2)`` metres from the PONI
(``p1`` along rows) sits at ``t = R (p1, p2, L)`` with ``L`` the distance
and ``R = R3 R2 R1`` pyFAI's rotation matrix (:func:`rotation_matrix`).
Its scattering angle is ``2 theta = atan2(hypot(t1, t2), t3)`` and its
azimuth ``phi = atan2(t1, t2)`` (pyFAI's ``chi``), the polar grid's ``phi``
(``atan2(y - cy, x - cx)`` when untilted).

A detector is a set of flat :class:`Panel` s placed in one stacked image
(rows ``row0 ..``, columns ``col0 ..``); a panel's pixel ``(ss, fs)``
(local row, column, pixel centres at integers) sits at ``origin + fs *
fs_vec + ss * ss_vec``. One tilted detector is one panel
(:func:`layout_of_geometry`); a CrystFEL geometry gives several
(:mod:`sacla_dask.crystfel`). The polar operator samples each (q, phi) bin
by rays from the sample (:func:`hit`: ray-plane intersection, per panel)
and corrects each pixel by its own angles (:func:`pixel_angles`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .errors import GeometryError

if TYPE_CHECKING:
    from .geometry import Geometry

__all__ = ["DetectorLayout", "Panel", "beam_center", "hit", "layout_of_geometry",
           "pixel_angles", "rotation_matrix"]


def rotation_matrix(rot1: float, rot2: float, rot3: float) -> np.ndarray:
    """pyFAI's detector rotation matrix ``R3 . R2 . R1`` (``Geometry.rotation_matrix``)."""
    c1, c2, c3 = math.cos(rot1), math.cos(rot2), math.cos(rot3)
    s1, s2, s3 = math.sin(rot1), math.sin(rot2), math.sin(rot3)
    r1 = np.array([[1.0, 0.0, 0.0], [0.0, c1, s1], [0.0, -s1, c1]])
    r2 = np.array([[c2, 0.0, -s2], [0.0, 1.0, 0.0], [s2, 0.0, c2]])
    r3 = np.array([[c3, -s3, 0.0], [s3, c3, 0.0], [0.0, 0.0, 1.0]])
    return np.asarray(r3 @ r2 @ r1)


@dataclasses.dataclass(frozen=True)
class Panel:
    """One flat sensor: its pixels' place in the stacked image and in the lab frame.

    Attributes
    ----------
    name : str
    row0, col0 : int
        First row and column of the panel in the stacked image.
    nss, nfs : int
        Rows (slow scan) and columns (fast scan) of the panel.
    origin : (3,) float
        Lab position (t1, t2, t3) of the centre of the panel's pixel (0, 0), metres.
    fs, ss : (3,) float
        Lab step of one pixel along the fast (column) and slow (row) axis, metres.
    """

    name: str
    row0: int
    col0: int
    nss: int
    nfs: int
    origin: tuple[float, float, float]
    fs: tuple[float, float, float]
    ss: tuple[float, float, float]

    @property
    def normal(self) -> np.ndarray:
        """Unit normal of the panel, pointing away from the sample."""
        n = np.cross(self.fs, self.ss)
        n = n / np.linalg.norm(n)
        return n if float(n @ np.asarray(self.origin)) >= 0 else -n

    @property
    def pixel_area(self) -> float:
        """Area of one pixel, square metres."""
        return float(np.linalg.norm(np.cross(self.fs, self.ss)))

    def positions(self, ss: np.ndarray, fs: np.ndarray) -> np.ndarray:
        """Lab positions ``(..., 3)`` of local pixel coordinates (floats allowed)."""
        o, f, s = (np.asarray(v) for v in (self.origin, self.fs, self.ss))
        return o + np.asarray(fs, float)[..., None] * f + np.asarray(ss, float)[..., None] * s


@dataclasses.dataclass(frozen=True)
class DetectorLayout:
    """Panels and the stacked image that holds them (``shape``: rows, columns)."""

    panels: tuple[Panel, ...]
    shape: tuple[int, int]
    #: where the layout comes from (a ``.geom`` file), for messages and the store's attrs
    source: str = dataclasses.field(default="", compare=False)

    def panel_of(self, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
        """Index of the panel holding each stacked pixel (-1: none)."""
        out = np.full(np.shape(iy), -1, dtype=np.int64)
        for k, p in enumerate(self.panels):
            sel = ((iy >= p.row0) & (iy < p.row0 + p.nss) & (ix >= p.col0)
                   & (ix < p.col0 + p.nfs))
            out[sel] = k
        return out

    def positions(self, iy: np.ndarray, ix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lab positions ``(N, 3)`` of stacked pixels and their panel index (NaN, -1: none)."""
        iy = np.asarray(iy).ravel()
        ix = np.asarray(ix).ravel()
        k = self.panel_of(iy, ix)
        pos = np.full((iy.size, 3), np.nan)
        for j, p in enumerate(self.panels):
            sel = k == j
            if sel.any():
                pos[sel] = p.positions(iy[sel] - p.row0, ix[sel] - p.col0)
        return pos, k

    def key(self) -> tuple[object, ...]:
        """Hashable description (for the operator's token)."""
        return (self.shape, tuple(dataclasses.astuple(p) for p in self.panels))


def layout_of_geometry(geometry: Geometry, shape: tuple[int, int]) -> DetectorLayout:
    """One (tilted) flat detector of ``shape`` pixels as a layout of one panel."""
    rot = rotation_matrix(geometry.rot1, geometry.rot2, geometry.rot3)
    p = geometry.pixel_size
    origin = rot @ np.array([-geometry.center_y * p, -geometry.center_x * p, geometry.distance])
    ny, nx = (int(s) for s in shape)
    panel = Panel("detector", 0, 0, ny, nx, _t3(origin), _t3(p * rot[:, 1]), _t3(p * rot[:, 0]))
    return DetectorLayout((panel,), (ny, nx))


def _t3(v: np.ndarray) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))


def hit(panel: Panel, rays: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where rays from the sample cross the panel's plane.

    Parameters
    ----------
    panel : Panel
    rays : (N, 3)
        Ray directions in the lab frame (any length).

    Returns
    -------
    ss, fs : (N,) float
        Local pixel coordinates of the crossing (NaN where the ray does not
        reach the plane going forward).
    inside : (N,) bool
        The crossing lies on the panel (``-1/2 <= fs < nfs - 1/2``, same for ss).
    dist : (N,) float
        Distance sample-crossing in units of the ray's length.
    """
    o = np.asarray(panel.origin)
    n = panel.normal
    un = rays @ n
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(un > 1e-12, float(o @ n) / un, np.nan)
    d = rays * s[:, None] - o
    basis = np.stack([panel.fs, panel.ss], axis=1)  # (3, 2)
    dual = np.linalg.pinv(basis)  # (2, 3)
    ab = d @ dual.T
    fs, ss = ab[:, 0], ab[:, 1]
    with np.errstate(invalid="ignore"):
        inside = ((fs >= -0.5) & (fs < panel.nfs - 0.5) & (ss >= -0.5) & (ss < panel.nss - 0.5))
    return ss, fs, inside, s


def pixel_angles(pos: np.ndarray, normals: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``2 theta``, ``phi`` (radians, phi in ``(-pi, pi]``) of lab positions ``(N, 3)``,
    and the cosine of the incidence angle on panels of unit ``normals`` ``(N, 3)``."""
    t1, t2, t3 = pos[:, 0], pos[:, 1], pos[:, 2]
    rho = np.hypot(t1, t2)
    tth = np.arctan2(rho, t3)
    phi = np.arctan2(t1, t2)
    cosa = None
    if normals is not None:
        cosa = np.abs(np.einsum("ij,ij->i", pos, normals)) / np.linalg.norm(pos, axis=1)
    return tth, phi, cosa


def beam_center(geometry: Geometry) -> tuple[float, float]:
    """Pixel ``(x, y)`` where the direct beam crosses the (tilted) detector plane."""
    panel = layout_of_geometry(geometry, (1, 1)).panels[0]
    ss, fs, _, _ = hit(panel, np.array([[0.0, 0.0, 1.0]]))
    if not np.isfinite(ss[0]):
        raise GeometryError(f"the direct beam does not reach the detector (rotations "
                            f"{geometry.rotations} rad)")
    return float(fs[0]), float(ss[0])


def check_layout(panels: Sequence[Panel], shape: tuple[int, int], source: str) -> None:
    """Refuse panels off the data or overlapping in the stacked image (naming ``source``)."""
    ny, nx = shape
    for p in panels:
        if p.row0 < 0 or p.col0 < 0 or p.row0 + p.nss > ny or p.col0 + p.nfs > nx:
            raise GeometryError(
                f"{source}: panel {p.name!r} (rows {p.row0}..{p.row0 + p.nss - 1}, columns "
                f"{p.col0}..{p.col0 + p.nfs - 1}) lies off the {ny}x{nx} data")
    for i, a in enumerate(panels):
        for b in panels[i + 1:]:
            if (a.row0 < b.row0 + b.nss and b.row0 < a.row0 + a.nss and a.col0 < b.col0 + b.nfs
                    and b.col0 < a.col0 + a.nfs):
                raise GeometryError(f"{source}: panels {a.name!r} and {b.name!r} overlap in the "
                                    "data array")
