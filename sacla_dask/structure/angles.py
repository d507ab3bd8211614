"""Predicted Bragg-pair angles: the 3-D angle psi between reflections, and its detector dphi."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import xarray as xr

from ..errors import ParameterError
from .kernels import bragg_angle, dphi_of_psi
from .lattice import (
    check_allowed,
    equivalents,
    lattice_name,
    parse_reflections,
    reciprocal_basis,
    reflection_label,
)

__all__ = ["angles_between", "predicted_angles"]


def angles_between(g1: np.ndarray, family2: np.ndarray, decimals: int = 7
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The distinct angles from one vector to the vectors of a family, with multiplicities.

    Parameters
    ----------
    g1 : array (3,)
        One vector (any unit).
    family2 : array (n, 3)
        The symmetry-equivalent vectors of the other reflection; a member
        parallel to ``g1`` (angle 0: the vector itself) is left out.
    decimals : int
        Angles equal to this many decimals (radians) are one.

    Returns
    -------
    psi : ndarray (m,)
        Distinct angles in radians, increasing, in ``(0, pi]``.
    multiplicity : ndarray of int (m,)
        How many members of ``family2`` lie at each angle from ``g1``.
    """
    u = np.asarray(g1, dtype=float)
    f = np.asarray(family2, dtype=float)
    cosines = (f @ u) / (np.linalg.norm(f, axis=1) * np.linalg.norm(u))
    psi = np.round(np.arccos(np.clip(cosines, -1.0, 1.0)), decimals)
    psi = psi[psi > 10.0 ** -decimals * 5]
    values, counts = np.unique(psi, return_counts=True)
    return values, counts.astype(np.int64)


def predicted_angles(lattice: str, a: float, reflections: Any, wavelength: float,
                     c: float | None = None, *, cross: bool = True) -> xr.Dataset:
    """The angles between a lattice's reflections, in 3-D and on the detector.

    For each pair of reflection families (``hkl1``, ``hkl2``) among
    ``reflections`` (each with itself, and with every other when ``cross``):
    the distinct angles ``psi`` between a vector of the first and the
    vectors of the second, how many vectors of the second lie at that
    angle from one of the first (the multiplicity), and the azimuth
    difference ``dphi`` at which the two spots of a crystallite reflecting
    both appear on a detector normal to the beam (:func:`~sacla_dask.
    structure.kernels.dphi_of_psi`: ``cos(psi) = sin(t1) sin(t2) +
    cos(t1) cos(t2) cos(dphi)``, ``t`` the Bragg angles at ``wavelength``).
    Angles the detector cannot show (e.g. ``psi = 180 deg`` between a
    vector and its Friedel mate, or any ``psi > 180 deg - t1 - t2``) have
    ``dphi`` NaN and ``reached`` False.

    Parameters
    ----------
    lattice : {"fcc", "bcc", "sc", "hexagonal", "hcp"}
        The Bravais lattice (see :mod:`sacla_dask.structure.lattice`).
    a : float
        Lattice constant in Angstrom (cubic cell edge; hexagonal ``a``).
    reflections : hkl or sequence of hkl or str
        ``(1, 1, 1)``, ``[(1, 1, 1), (2, 0, 0)]``, ``"111"``, ``"111,200"``.
        Each must be allowed by the lattice (fcc: unmixed h, k, l; bcc:
        ``h + k + l`` even; hcp: not ``l`` odd with ``h + 2k = 3n``).
    wavelength : float
        Wavelength in Angstrom.
    c : float, optional
        c axis in Angstrom (hexagonal lattices only; required there).
    cross : bool
        Also the pairs of two different families (default True).

    Returns
    -------
    xarray.Dataset
        Dimension ``peak``; variables ``reflection1``, ``reflection2``
        (labels such as ``"111"``), ``q1``, ``q2`` (1/A), ``psi``, ``dphi``
        (radians; ``dphi`` in ``[0, pi]``, the detector also shows
        ``2 pi - dphi``), ``psi_deg``, ``dphi_deg`` (degrees),
        ``multiplicity`` (int) and ``reached`` (bool); attrs ``lattice``,
        ``a``, ``c``, ``wavelength``. ``.to_dataframe()`` gives a table.

    Raises
    ------
    ParameterError
        Unknown lattice, a constant missing or not positive, a reflection
        forbidden for the lattice, a wavelength not positive, or a
        reflection beyond backscattering at that wavelength.

    Examples
    --------
    Gold, 111 at 1.24 A: psi = 70.53 and 109.47 deg, seen at dphi = 73.5
    and 115.6 deg::

        predicted_angles("fcc", 4.078, "111", 1.24).to_dataframe()
    """
    name = lattice_name(lattice)
    basis = reciprocal_basis(name, a, c)
    refl = parse_reflections(reflections)
    for hkl in refl:
        check_allowed(name, hkl)
    # one representative per family, in the order given
    fams: list[tuple[int, int, int]] = []
    keys: list[frozenset[tuple[int, ...]]] = []
    for hkl in refl:
        key = frozenset(tuple(int(v) for v in row) for row in equivalents(name, hkl))
        if key not in keys:
            keys.append(key)
            fams.append(hkl)
    qs = [float(np.linalg.norm(np.asarray(h, dtype=float) @ basis)) for h in fams]
    lam = _check_wavelength(wavelength)
    far = [reflection_label(h) for h, q in zip(fams, qs, strict=True)
           if q * lam / (4 * math.pi) > 1]
    if far:
        raise ParameterError(f"reflection(s) {', '.join(far)} cannot diffract at wavelength "
                             f"{lam} A (q > 4 pi / lambda); check reflections and wavelength")
    thetas = [float(bragg_angle(q, lam)) for q in qs]
    rows: list[dict[str, Any]] = []
    for i, j in _pairs(len(fams), cross):
        g1 = np.asarray(fams[i], dtype=float) @ basis
        fam2 = equivalents(name, fams[j]).astype(float) @ basis
        psi, mult = angles_between(g1, fam2)
        dphi = dphi_of_psi(psi, thetas[i], thetas[j])
        for p, m, d in zip(psi, mult, dphi, strict=True):
            rows.append(dict(reflection1=reflection_label(fams[i]),
                             reflection2=reflection_label(fams[j]), q1=qs[i], q2=qs[j],
                             psi=float(p), dphi=float(d), multiplicity=int(m)))
    n = len(rows)

    def col(key: str, dtype: Any) -> np.ndarray:
        return np.array([r[key] for r in rows], dtype=dtype)

    psi_all, dphi_all = col("psi", float), col("dphi", float)
    return xr.Dataset(
        {
            "reflection1": ("peak", col("reflection1", str)),
            "reflection2": ("peak", col("reflection2", str)),
            "q1": ("peak", col("q1", float), {"units": "1/angstrom"}),
            "q2": ("peak", col("q2", float), {"units": "1/angstrom"}),
            "psi": ("peak", psi_all, {"units": "rad",
                                      "long_name": "3-D angle between the two reflections"}),
            "dphi": ("peak", dphi_all, {
                "units": "rad", "long_name": "azimuth difference on the detector (0..pi; "
                                             "also seen at 2 pi - dphi); NaN: not reached"}),
            "psi_deg": ("peak", np.degrees(psi_all), {"units": "degree"}),
            "dphi_deg": ("peak", np.degrees(dphi_all), {"units": "degree"}),
            "multiplicity": ("peak", col("multiplicity", np.int64), {
                "long_name": "vectors of reflection2 at this angle from one of reflection1"}),
            "reached": ("peak", np.isfinite(dphi_all) if n else np.zeros(0, bool)),
        },
        coords={"peak": np.arange(n)},
        attrs={"lattice": name, "a": float(a), "c": float(c) if c is not None else math.nan,
               "wavelength": lam,
               "reflections": ",".join(reflection_label(h) for h in fams)},
    )


def _check_wavelength(wavelength: Any) -> float:
    try:
        lam = float(wavelength)
    except (TypeError, ValueError):
        lam = math.nan
    if not (math.isfinite(lam) and lam > 0):
        raise ParameterError(f"wavelength must be positive and finite, in Angstrom "
                             f"(got {wavelength!r})")
    return lam


def _pairs(n: int, cross: bool) -> list[tuple[int, int]]:
    if cross:
        return [(i, j) for i in range(n) for j in range(i, n)]
    return [(i, i) for i in range(n)]


def angles_for(angles: xr.Dataset, q1: float, q2: float | None = None,
               tol: float = 0.02) -> xr.Dataset:
    """The rows of a :func:`predicted_angles` table whose reflections sit at ``q1`` (and ``q2``).

    ``tol`` is a relative tolerance on q. Pairs match in either order.
    """
    if "peak" not in angles.dims or angles.sizes["peak"] == 0:
        return angles
    q2v = q1 if q2 is None else q2
    a1, a2 = angles["q1"].values, angles["q2"].values

    def near(x: np.ndarray, q: float) -> np.ndarray:
        return np.abs(x - q) <= tol * abs(q)

    sel = (near(a1, q1) & near(a2, q2v)) | (near(a1, q2v) & near(a2, q1))
    return angles.isel(peak=np.flatnonzero(sel))

