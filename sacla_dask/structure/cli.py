"""Helpers of the ``structure`` and ``plot --lattice`` commands (text, choices); no click here."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import xarray as xr

from ..errors import ParameterError
from .angles import predicted_angles
from .lattice import lattice_name, reflections_in_band

__all__ = ["store_angles", "summary_lines"]


def store_angles(ds: xr.Dataset, lattice: str | None, a: float | None, c: float | None,
                 reflections: str | None) -> tuple[xr.Dataset | None, str]:
    """The predicted angles to mark on a store's figures, and a line saying which.

    Default reflections: the lattice's allowed ones whose q lies in the
    store's q range (``q`` coordinate, widened by 1 %).

    Raises
    ------
    ParameterError
        ``lattice`` without ``a`` (or the reverse), a missing wavelength, or
        what :func:`predicted_angles` refuses.
    """
    if lattice is None:
        raise ParameterError("--a needs --lattice (fcc, bcc, sc, hexagonal or hcp)")
    if a is None:
        raise ParameterError(f"--lattice {lattice} needs --a, the lattice constant in Angstrom")
    lam = ds.attrs.get("wavelength")
    if lam is None:
        raise ParameterError("the store has no wavelength attribute (Angstrom): the predicted "
                             "angles need it")
    name = lattice_name(lattice)
    if reflections is None:
        q = np.asarray(ds["q"].values, dtype=float)
        lo, hi = float(q.min()) * 0.99, float(q.max()) * 1.01
        found = reflections_in_band(name, a, lo, hi, c)
        if not found:
            return None, (f"no {name} reflection (a = {a:g} A) has q in the store's "
                          f"{lo:.4g}..{hi:.4g} 1/A: no angles marked (give --reflections)")
        refl: Any = found
    else:
        refl = reflections
    angles = predicted_angles(name, a, refl, float(lam), c)
    shown = angles.isel(peak=np.flatnonzero(angles["reached"].values))
    marks = ", ".join(f"{r1}-{r2} psi {p:.2f} deg at dphi {d:.2f} deg" for r1, r2, p, d in zip(
        shown["reflection1"].values, shown["reflection2"].values, shown["psi_deg"].values,
        shown["dphi_deg"].values, strict=True))
    return angles, (f"{name} a = {a:g} A, reflections {angles.attrs['reflections']} at "
                    f"{float(lam):.5g} A: {marks or 'no angle reached on the detector'}")


def summary_lines(ds: xr.Dataset, path: str, seconds: float) -> list[str]:
    """What ``sacla-dask structure`` prints after writing."""
    a = ds.attrs
    lmax = int(a.get("structure_lmax", 0))
    lines = [f"wrote corr_psi, bl (l = 0..{lmax}, "
             f"{'all l' if a.get('structure_odd_l') else 'even l'}) to {path} in "
             f"{seconds:.2f} s; errors from {a.get('structure_errors', '?')}"
             + (f"; each of {ds.sizes['group']} groups on its own (a group dimension)"
                if "group" in ds.get("bl", xr.DataArray()).dims else "")]
    for suffix, dim in (("", "q"), ("_cross", "qpair")):
        if f"bl{suffix}" not in ds:
            continue
        flag = np.asarray(ds[f"bl{suffix}_flag"].values, dtype=bool)
        bl = np.asarray(ds[f"bl{suffix}"].values, dtype=float)
        fitted = np.isfinite(bl)
        chi2 = np.asarray(ds[f"bl{suffix}_chi2"].values, dtype=float)
        good = np.isfinite(chi2)
        med = float(np.median(chi2[good])) if good.any() else math.nan
        lines.append(f"  bl{suffix}: {ds.sizes[dim]} {dim} rows, {int(fitted.sum())} "
                     f"coefficients fitted, {int((fitted & flag).sum())} flagged (VIF > "
                     f"{a.get('structure_max_vif', '?')}); median reduced chi2 {med:.3g}")
    if "psi" in ds.coords and "q" in ds.coords:
        lam = float(a["wavelength"])
        q = np.asarray(ds["q"].values, dtype=float)
        t = np.arcsin(np.clip(q * lam / (4 * math.pi), 0, 1))
        lines.append(f"  psi reached: 0..{math.degrees(math.pi - 2 * t.max()):.2f} deg "
                     f"(q = {q.max():.4g} 1/A) to 0..{math.degrees(math.pi - 2 * t.min()):.2f}"
                     f" deg (q = {q.min():.4g} 1/A)")
    return lines

