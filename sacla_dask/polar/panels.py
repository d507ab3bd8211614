"""Operator entries for a tilted detector or separate panels (:mod:`sacla_dask.lab`).

Each bin ``(i, j)`` of the grid is a cone of rays: 2-theta from the bin's
radius on an untilted detector at the geometry's distance
(``tan(2 theta) = radius * pixel_size / distance``, the grid's own
labelling) and azimuth ``phi_j``, the ray ``(r p sin phi, r p cos phi, L)``
in pyFAI's lab frame. ``nearest`` and ``bilinear`` follow the ray of the bin
centre to the panel it crosses (:func:`sacla_dask.lab.hit`) and read the
pixel(s) there; ``splitting`` follows the rays of the bin's polar sub-grid
(the same sub-grid as untilted) and weights each by the area it stands for
on the panel, ``r dr dphi * (|P|^2 / cos alpha) / (|P0|^2 / cos 2theta)``
in the panel's pixels (``P`` the crossing, ``alpha`` the incidence angle,
``P0`` the crossing with the untilted plane): the pixel's overlap area with
the bin, as pyFAI's pixel splitting weighs it. Rays that cross no panel (gaps,
off the detector) land nowhere: they lower the bin's coverage. Corrections
take each pixel's own 2-theta, azimuth and incidence (:func:`layout_corrections`).
"""

from __future__ import annotations

import math

import numpy as np

from ..geometry import Geometry
from ..lab import DetectorLayout, hit, pixel_angles
from .grid import PolarGrid

__all__ = ["layout_corrections", "layout_point_entries", "layout_splitting_entries"]


def _rays(grid_radius: np.ndarray, phi: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Ray directions ``(N, 3)`` for radii (untilted pixels) x angles, flattened (r, phi)."""
    rp = np.asarray(grid_radius, float)[:, None] * geometry.pixel_size
    t1 = rp * np.sin(phi)[None, :] if phi.ndim == 1 else rp * np.sin(phi)
    t2 = rp * np.cos(phi)[None, :] if phi.ndim == 1 else rp * np.cos(phi)
    t3 = np.broadcast_to(geometry.distance, t1.shape)
    return np.stack([t1.ravel(), t2.ravel(), np.ravel(t3)], axis=1)


def _locate(layout: DetectorLayout, rays: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Panel (-1: none), local ss, fs and the crossing's distance factor of each ray."""
    n = rays.shape[0]
    k = np.full(n, -1, dtype=np.int64)
    ss = np.zeros(n)
    fs = np.zeros(n)
    s = np.full(n, np.nan)
    for j, p in enumerate(layout.panels):
        todo = k < 0
        if not todo.any():
            break
        pss, pfs, inside, ps = hit(p, rays[todo])
        idx = np.flatnonzero(todo)[inside]
        k[idx] = j
        ss[idx] = pss[inside]
        fs[idx] = pfs[inside]
        s[idx] = ps[inside]
    return k, ss, fs, s


def layout_point_entries(layout: DetectorLayout, grid: PolarGrid, geometry: Geometry,
                         rows: slice, method: str
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Stacked-image pixel (iy, ix) and weights ``(nbins, K)`` of nearest/bilinear.

    Pixels that do not exist (no panel, or a bilinear neighbour across a
    panel's edge) get index -1.
    """
    rays = _rays(grid.radius[rows], grid.phi, geometry)
    k, ss, fs, _ = _locate(layout, rays)
    nb = k.size
    row0 = np.array([p.row0 for p in layout.panels] + [0])[k]
    col0 = np.array([p.col0 for p in layout.panels] + [0])[k]
    nss = np.array([p.nss for p in layout.panels] + [0])[k]
    nfs = np.array([p.nfs for p in layout.panels] + [0])[k]
    if method == "nearest":
        ly = np.rint(ss).astype(np.int64)
        lx = np.rint(fs).astype(np.int64)
        ok = (k >= 0) & (ly >= 0) & (ly < nss) & (lx >= 0) & (lx < nfs)
        iy = np.where(ok, ly + row0, -1)[:, None]
        ix = np.where(ok, lx + col0, -1)[:, None]
        return iy, ix, np.ones((nb, 1)), 1
    y0 = np.floor(ss)
    x0 = np.floor(fs)
    fy = ss - y0
    fx = fs - x0
    ly = y0.astype(np.int64)[:, None] + np.array([0, 0, 1, 1])
    lx = x0.astype(np.int64)[:, None] + np.array([0, 1, 0, 1])
    ok = ((k >= 0)[:, None] & (ly >= 0) & (ly < nss[:, None]) & (lx >= 0)
          & (lx < nfs[:, None]))
    iy = np.where(ok, ly + row0[:, None], -1)
    ix = np.where(ok, lx + col0[:, None], -1)
    gx, gy = 1 - fx, 1 - fy
    w = np.stack([gx * gy, fx * gy, gx * fy, fx * fy], axis=1)
    return iy, ix, w, 4


def layout_splitting_entries(layout: DetectorLayout, grid: PolarGrid, geometry: Geometry,
                             rows: slice, subdivision: int
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                        np.ndarray]:
    """Bin, stacked pixel (iy, ix), area weight entries and each bin's total weight.

    Bins are local to the chunk of rows (as :func:`.build._splitting_entries`).
    """
    nphi = grid.phi.size
    dr = grid.dr
    dphi = grid.dphi
    radius = grid.radius[rows]
    n_r = max(1, math.ceil(subdivision * dr - 1e-9))
    n_a = np.maximum(1, np.ceil(subdivision * (radius + dr / 2) * dphi - 1e-9)).astype(np.int64)
    ny, nx = layout.shape
    npix = ny * nx
    pref2 = geometry.pixel_size ** 2
    areas = np.array([p.pixel_area for p in layout.panels])
    normals = np.array([p.normal for p in layout.panels])
    ref = layout.panels[0]
    out_b, out_y, out_x, out_w = [], [], [], []
    total = np.empty(radius.size * nphi)
    for i in range(radius.size):
        na = int(n_a[i])
        a = (np.arange(na) + 0.5) / na * dphi - dphi / 2
        ang = (grid.phi[:, None] + a[None, :]).ravel()  # (nphi * na)
        rk = radius[i] - dr / 2 + (np.arange(n_r) + 0.5) * dr / n_r  # (n_r,)
        rays = _rays(rk, ang, geometry)  # (n_r * nphi * na, 3), order (r, phi, a)
        k, ss, fs, s = _locate(layout, rays)
        # area on the panel per area on the untilted plane, in the panel's pixels
        hitk = np.where(k >= 0, k, 0)
        un = np.abs(np.einsum("ij,ij->i", rays, normals[hitk]))
        norm = np.linalg.norm(rays, axis=1)
        miss = k < 0
        if miss.any():  # (the area they would have on the first panel's plane)
            _, _, _, s0 = hit(ref, rays[miss])
            s[miss] = s0
            un[miss] = np.abs(rays[miss] @ ref.normal)
        cos_a = un / norm
        cos_t = geometry.distance / norm
        dist = s * norm
        dist0 = norm  # the untilted crossing: the ray itself (t3 = distance)
        scale = (dist ** 2 / cos_a) / (dist0 ** 2 / cos_t) * pref2 / areas[hitk]
        scale = np.where(np.isfinite(scale), scale, 0.0)
        w = (np.repeat(rk, nphi * na) * scale).reshape(n_r, nphi, na)
        binj = np.broadcast_to(np.arange(nphi)[None, :, None], w.shape).ravel()
        total[i * nphi:(i + 1) * nphi] = np.bincount(binj, weights=w.ravel(), minlength=nphi)
        hitm = ~miss
        row0 = np.array([p.row0 for p in layout.panels])[k[hitm]]
        col0 = np.array([p.col0 for p in layout.panels])[k[hitm]]
        nss = np.array([p.nss for p in layout.panels])[k[hitm]]
        nfs = np.array([p.nfs for p in layout.panels])[k[hitm]]
        ly = np.minimum(np.floor(ss[hitm] + 0.5).astype(np.int64), nss - 1)
        lx = np.minimum(np.floor(fs[hitm] + 0.5).astype(np.int64), nfs - 1)
        pix = (ly + row0) * nx + (lx + col0)
        key = (binj[hitm] + i * nphi).astype(np.int64) * npix + pix
        uk, inv = np.unique(key, return_inverse=True)
        out_w.append(np.bincount(inv.ravel(), weights=w.ravel()[hitm], minlength=uk.size))
        out_b.append(uk // npix)
        p = uk % npix
        out_y.append(p // nx)
        out_x.append(p % nx)
    return (np.concatenate(out_b), np.concatenate(out_y), np.concatenate(out_x),
            np.concatenate(out_w), total)


def layout_corrections(layout: DetectorLayout, geometry: Geometry, iy: np.ndarray,
                       ix: np.ndarray, solid_angle: bool = False,
                       polarization: float | None = None) -> np.ndarray:
    """Per-pixel correction ``c`` in the full geometry (pyFAI's conventions).

    Solid angle relative to a pixel of the geometry's size at normal incidence
    at its distance: ``(A / A_ref) cos(alpha) (L / |P|)^2``, which is
    pyFAI's ``cos^3(alpha)`` on one flat detector; polarisation
    ``(1 + cos^2 2theta - f cos(2 phi) sin^2 2theta) / 2`` with the pixel's
    2-theta and azimuth.
    """
    pos, k = layout.positions(iy, ix)
    normals = np.array([p.normal for p in layout.panels])[np.maximum(k, 0)]
    tth, phi, cosa = pixel_angles(pos, normals)
    c = np.ones(pos.shape[0])
    if solid_angle:
        assert cosa is not None
        areas = np.array([p.pixel_area for p in layout.panels])[np.maximum(k, 0)]
        r2 = np.einsum("ij,ij->i", pos, pos)
        c = c * (areas / geometry.pixel_size ** 2) * cosa * geometry.distance ** 2 / r2
    if polarization is not None:
        cos2 = np.cos(tth) ** 2
        c = c * 0.5 * (1.0 + cos2 - polarization * np.cos(2 * phi) * (1.0 - cos2))
    return c
