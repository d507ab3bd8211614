"""The store layer: ``corr_psi`` and ``bl`` from a result's correlation statistics.

:func:`compute_structure` applies the kernels of
:mod:`sacla_dask.structure.kernels` row by row to a result Dataset's
``corr``, ``corr_sem``, ``corr_count`` (and ``corr_cross*``; the bootstrap
bounds when they give the errors) and returns the new variables;
:func:`add_structure` writes them into a complete result store (replacing
those of an earlier call) and consolidates it. Nothing else of the store is
read: no polar image, no raw image.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from ..errors import ParameterError
from .kernels import (
    bragg_angle,
    cos_psi,
    fit_legendre,
    fold_halves,
    legendre_design,
    psi_range,
    resample_row,
)

__all__ = [
    "DEFAULT_LMAX",
    "DEFAULT_MAX_VIF",
    "DEFAULT_SKIP_LAGS",
    "STRUCTURE_ATTRS",
    "add_structure",
    "bl_series",
    "compute_structure",
    "structure_variables",
]

DEFAULT_LMAX = 20
#: a coefficient whose variance inflation factor exceeds this is flagged (bl_flag)
DEFAULT_MAX_VIF = 10.0
#: lags 0 .. DEFAULT_SKIP_LAGS - 1 (and their mirrors) are left out of the fit
DEFAULT_SKIP_LAGS = 2
ERRORS = ("auto", "sem", "bootstrap")
#: root attrs written by add_structure (last: present only once its variables are whole)
STRUCTURE_ATTRS = ("structure_lmax", "structure_odd_l", "structure_skip_lags",
                   "structure_npsi", "structure_max_vif", "structure_errors")
_PER_KIND = ("corr{s}_psi", "corr{s}_psi_sem", "corr{s}_psi_count", "bl{s}", "bl{s}_sem",
             "bl{s}_flag", "bl{s}_vif", "bl{s}_offset", "bl{s}_chi2", "bl{s}_n")


def structure_variables() -> list[str]:
    """Every variable and coordinate name :func:`add_structure` may write."""
    names = [t.format(s=s) for s in ("", "_cross") for t in _PER_KIND]
    return names + ["psi", "l"]


def _check_int(name: str, value: Any, minimum: int) -> int:
    try:
        v = int(value)
        if float(value) != v:
            raise ValueError
    except (TypeError, ValueError):
        raise ParameterError(f"{name} must be an integer (got {value!r})") from None
    if v < minimum:
        raise ParameterError(f"{name} must be >= {minimum} (got {value!r})")
    return v


def _wavelength(ds: xr.Dataset) -> float:
    lam = ds.attrs.get("wavelength")
    if lam is None:
        raise ParameterError("the result has no wavelength attribute (Angstrom): the psi of a "
                             "q needs it; set it (sacla_dask.store.set_attrs(path, "
                             "wavelength=...)) and run again")
    try:
        v = float(lam)
    except (TypeError, ValueError):
        raise ParameterError(f"the result's wavelength attribute is not a number "
                             f"(got {lam!r})") from None
    if not (math.isfinite(v) and v > 0):
        raise ParameterError(f"the result's wavelength attribute must be positive, in Angstrom "
                             f"(got {lam!r})")
    return v


def _errors(ds: xr.Dataset, suffix: str, errors: str) -> tuple[np.ndarray, str]:
    """Per-bin standard errors of ``corr{suffix}`` and where they came from."""
    lo, hi = f"corr{suffix}_ci_low", f"corr{suffix}_ci_high"
    have_boot = lo in ds and hi in ds and float(ds.attrs.get("ci_level", 0) or 0) > 0
    if errors == "bootstrap" and not have_boot:
        raise ParameterError("errors='bootstrap' needs the bootstrap intervals "
                             f"({lo}, {hi}; process with --bootstrap N)")
    if errors == "bootstrap" or (errors == "auto" and have_boot):
        from scipy.stats import norm

        level = float(ds.attrs["ci_level"])
        z = float(norm.ppf(0.5 + level / 2))
        width = np.asarray(ds[hi].values, float) - np.asarray(ds[lo].values, float)
        return width / (2 * z), f"bootstrap ({100 * level:g}% interval half-width / {z:.3f})"
    name = f"corr{suffix}_sem"
    if name not in ds:
        raise ParameterError(f"the result has no {name}: the fit needs the standard errors")
    return np.asarray(ds[name].values, float), "sem"


def compute_structure(ds: xr.Dataset, lmax: int = DEFAULT_LMAX, *, odd: bool = False,
                      skip_lags: int = DEFAULT_SKIP_LAGS, npsi: int | None = None,
                      max_vif: float = DEFAULT_MAX_VIF, errors: str = "auto",
                      cross: bool = True) -> xr.Dataset:
    """``corr_psi`` and the Legendre coefficients ``bl`` of a result's correlations.

    Reads only ``corr``, ``corr_sem``, ``corr_count`` (and the same of
    ``corr_cross``; ``corr_ci_low/high`` when they give the errors), the
    coordinates and the ``wavelength`` attribute.

    Parameters
    ----------
    ds : xarray.Dataset
        A result (:func:`sacla_dask.open_result`).
    lmax : int
        Highest Legendre order fitted (>= 0). The fit needs more usable lags
        (``nphi // 2 + 1 - skip_lags``) than coefficients.
    odd : bool
        Fit every l (a check: odd l should come out consistent with 0);
        default even l only (Friedel's law, see the package docs).
    skip_lags : int
        Lags ``dphi_k``, ``k < skip_lags`` (and their mirrors), are left out
        of the fit: the zero lag holds each pair's variance (shot noise) and
        the polar interpolation smears it onto its neighbour. They stay in
        ``corr_psi``.
    npsi : int, optional
        Points of the psi grid over ``[0, pi]`` (default ``nphi // 2 + 1``,
        the lag spacing).
    max_vif : float
        Flag a coefficient whose variance inflation factor exceeds this.
    errors : {"auto", "sem", "bootstrap"}
        Per-lag standard errors of the fit: ``corr_sem``, or the bootstrap
        interval's half-width over the normal quantile; ``auto``: the
        bootstrap when the result has it.
    cross : bool
        Also the cross-correlations ``corr_cross`` when present.

    Returns
    -------
    xarray.Dataset
        The variables listed in :func:`structure_variables` that apply,
        on the result's ``q`` / ``qpair`` and the new ``psi`` (radians) and
        ``l`` coordinates; its attrs are the ``structure_*`` parameters.
        A grouped result (``corr`` on ``group``, :mod:`sacla_dask.shots.groups`)
        gives every variable a leading ``group`` dimension: each group's
        correlations fitted on their own, with that group's errors.

    Raises
    ------
    ParameterError
        No ``corr``, no wavelength, ``lmax`` < 0 or too large for the
        lags, bad ``skip_lags``, ``npsi``, ``max_vif`` or ``errors``.
    """
    if "corr" not in ds or "dphi" not in ds["corr"].dims:
        raise ParameterError("the result has no corr (q, dphi): nothing to resample; "
                             "process the run first")
    if "group" in ds["corr"].dims:  # a grouped result: each group on its own
        return _per_group(ds, lmax=lmax, odd=odd, skip_lags=skip_lags, npsi=npsi,
                          max_vif=max_vif, errors=errors, cross=cross)
    lmax = _check_int("lmax", lmax, 0)
    skip = _check_int("skip_lags", skip_lags, 0)
    if errors not in ERRORS:
        raise ParameterError(f"errors must be one of {ERRORS} (got {errors!r})")
    try:
        vif_max = float(max_vif)
    except (TypeError, ValueError):
        raise ParameterError(f"max_vif must be a number >= 1 (got {max_vif!r})") from None
    if not vif_max >= 1:
        raise ParameterError(f"max_vif must be a number >= 1 (got {max_vif!r})")
    lam = _wavelength(ds)
    dphi = np.asarray(ds["dphi"].values, dtype=float)
    nphi = dphi.size
    half = nphi // 2 + 1
    n_psi = half if npsi is None else _check_int("npsi", npsi, 2)
    ls = np.arange(0, lmax + 1) if odd else np.arange(0, lmax + 1, 2)
    usable = half - skip
    if ls.size >= usable:
        raise ParameterError(
            f"lmax={lmax} needs {ls.size} coefficients ({'all' if odd else 'even'} l and the "
            f"constant) but only {usable} lags 0..pi are fitted (nphi={nphi}, "
            f"skip_lags={skip}); lmax may be at most {usable - 2 if odd else 2 * usable - 3}")
    psi = np.linspace(0.0, math.pi, n_psi)
    err_src = {}
    out = xr.Dataset(coords={
        "psi": ("psi", psi, {"units": "rad", "long_name": "3-D angle between the two "
                                                          "scattering vectors"}),
        "l": ("l", np.arange(lmax + 1), {"long_name": "Legendre order"})})
    kinds = [("", "q")]
    if cross and "corr_cross" in ds and "qpair" in ds["corr_cross"].dims:
        kinds.append(("_cross", "qpair"))
    for suffix, dim in kinds:
        c = np.asarray(ds[f"corr{suffix}"].values, dtype=float)
        s, err_src[suffix or "auto"] = _errors(ds, suffix, errors)
        cname = f"corr{suffix}_count"
        n = (np.asarray(ds[cname].values) if cname in ds
             else np.where(np.isfinite(c), 1, 0).astype(np.int64))
        if dim == "q":
            q1 = q2 = np.asarray(ds["q"].values, dtype=float)
        else:
            q1 = np.asarray(ds["q1"].values, dtype=float)
            q2 = np.asarray(ds["q2"].values, dtype=float)
        t1, t2 = bragg_angle(q1, lam), bragg_angle(q2, lam)
        if suffix == "":  # an autocorrelation is symmetric: its first half
            c_h, s_h, n_h = c[:, :half], s[:, :half], n[:, :half]
        else:
            c_h, s_h_opt, n_h_opt = fold_halves(c, s, n)
            assert s_h_opt is not None and n_h_opt is not None
            s_h, n_h = s_h_opt, n_h_opt
        rows = _rows(c_h, s_h, n_h, dphi[:half], t1, t2, psi, ls, skip, lmax, vif_max)
        out = out.assign(_variables(rows, suffix, dim, lmax, odd, skip, vif_max,
                                    err_src[suffix or "auto"]))
        out = out.assign_coords({dim: ds[dim].values})
        if dim == "qpair":
            out = out.assign_coords({k: ("qpair", ds[k].values, dict(ds[k].attrs))
                                     for k in ("q1", "q2", "q1_index", "q2_index") if k in ds})
    out["q"].attrs.update(ds["q"].attrs)
    out.attrs.update({
        "structure_lmax": lmax, "structure_odd_l": bool(odd), "structure_skip_lags": skip,
        "structure_npsi": n_psi, "structure_max_vif": vif_max,
        "structure_errors": "; ".join(f"{k}: {v}" for k, v in err_src.items())})
    return out


def _per_group(ds: xr.Dataset, **kw: Any) -> xr.Dataset:
    """:func:`compute_structure` of each group of a grouped result, stacked on ``group``."""
    parts = [compute_structure(ds.isel(group=g), **kw) for g in range(ds.sizes["group"])]
    out = xr.concat(parts, dim="group", data_vars="all", coords="minimal",
                    compat="override", combine_attrs="override")
    return out.assign_coords({k: ("group", ds[k].values, dict(ds[k].attrs))
                              for k in ("group", "group_index", "group_low", "group_high")
                              if k in ds.coords})


def _rows(c: np.ndarray, s: np.ndarray, n: np.ndarray, dphi: np.ndarray, t1: np.ndarray,
          t2: np.ndarray, psi: np.ndarray, ls: np.ndarray, skip: int, lmax: int,
          max_vif: float) -> dict[str, np.ndarray]:
    """Resample and fit every row (the half-lag rows of one correlation kind)."""
    nrow = c.shape[0]
    npsi = psi.size
    res = {
        "cpsi": np.full((nrow, npsi), np.nan), "spsi": np.full((nrow, npsi), np.nan),
        "npsi": np.zeros((nrow, npsi), np.int64),
        "bl": np.full((nrow, lmax + 1), np.nan), "err": np.full((nrow, lmax + 1), np.nan),
        "vif": np.full((nrow, lmax + 1), np.nan), "offset": np.full(nrow, np.nan),
        "chi2": np.full(nrow, np.nan), "nfit": np.zeros(nrow, np.int64),
    }
    for i in range(nrow):
        a, b = float(t1[i]), float(t2[i])
        v, e, k = resample_row(c[i], dphi, psi, a, b, sem=s[i], count=n[i])
        assert e is not None and k is not None
        res["cpsi"][i], res["spsi"][i], res["npsi"][i] = v, e, k
        x = cos_psi(dphi[skip:], a, b)
        try:
            fit = fit_legendre(c[i, skip:], s[i, skip:], x, ls, constant=0)
        except ParameterError:  # too few valid lags in this row: NaN, flagged
            continue
        res["bl"][i, ls[1:]] = fit.coef[1:]
        res["err"][i, ls[1:]] = fit.err[1:]
        res["vif"][i, ls[1:]] = fit.vif[1:]
        res["offset"][i] = fit.coef[0]
        res["chi2"][i] = fit.reduced_chi2
        res["nfit"][i] = fit.n
    return res


def _variables(r: Mapping[str, np.ndarray], suffix: str, dim: str, lmax: int, odd: bool,
               skip: int, max_vif: float, err_src: str) -> dict[str, Any]:
    what = "C(q, q, psi)" if suffix == "" else "C(q1, q2, psi)"
    flag = ~np.isfinite(r["bl"]) | ~(r["vif"] <= max_vif)
    flag[:, 0] = True
    fit_attrs = {"lmax": lmax, "odd_l": int(odd), "skip_lags": skip, "max_vif": max_vif,
                 "errors": err_src}
    return {
        f"corr{suffix}_psi": ((dim, "psi"), r["cpsi"], {
            "long_name": f"mean difference correlation {what} resampled on the 3-D angle psi "
                         "(Ewald curvature undone; NaN where psi is not reached)"}),
        f"corr{suffix}_psi_sem": ((dim, "psi"), r["spsi"], {
            "long_name": "its standard error (interpolated linearly: an upper bound)"}),
        f"corr{suffix}_psi_count": ((dim, "psi"), r["npsi"], {
            "long_name": "pairs with data (the smaller of the two lags interpolated)"}),
        f"bl{suffix}": ((dim, "l"), r["bl"], {
            "long_name": "Legendre coefficients B_l of the correlation over psi "
                         "(weighted least squares; l = 0 and unfitted l NaN)", **fit_attrs}),
        f"bl{suffix}_sem": ((dim, "l"), r["err"], {
            "long_name": "standard error of B_l (from the per-lag errors)", **fit_attrs}),
        f"bl{suffix}_flag": ((dim, "l"), flag, {
            "long_name": f"B_l not determined: l = 0 (removed by the row normalisation), "
                         f"not fitted, or variance inflation factor > {max_vif:g} (the reached "
                         "psi range too short to tell P_l from the other orders)"}),
        f"bl{suffix}_vif": ((dim, "l"), r["vif"], {
            "long_name": "variance inflation factor of B_l (1: as if P_l were orthogonal to "
                         "the other orders on the fitted psi samples)"}),
        f"bl{suffix}_offset": ((dim,), r["offset"], {
            "long_name": "fitted constant: B_0 minus the Delta-phi mean the row "
                         "normalisation removed (not B_0)"}),
        f"bl{suffix}_chi2": ((dim,), r["chi2"], {
            "long_name": "reduced chi-square of the Legendre fit (about 1 when the model and "
                         "the errors fit)"}),
        f"bl{suffix}_n": ((dim,), r["nfit"], {"long_name": "lags used by the fit"}),
    }


def bl_series(ds: xr.Dataset, cross: bool = False) -> xr.DataArray:
    """The Legendre sum ``offset + sum_l B_l P_l(cos psi)`` on the ``psi`` grid.

    NaN where ``psi`` is not reached for the row (outside
    :func:`~sacla_dask.structure.kernels.psi_range`), so it compares with
    ``corr_psi`` (``corr_cross_psi`` with ``cross=True``) point by point.
    """
    s = "_cross" if cross else ""
    if f"bl{s}" not in ds or "psi" not in ds.coords:
        raise ParameterError(f"the result has no bl{s}: run add_structure first")
    lam = _wavelength(ds)
    psi = np.asarray(ds["psi"].values, dtype=float)
    bl = np.asarray(ds[f"bl{s}"].values, dtype=float)
    off = np.asarray(ds[f"bl{s}_offset"].values, dtype=float)
    ls = np.asarray(ds["l"].values, dtype=int)
    if cross:
        dim = "qpair"
        t1 = bragg_angle(np.asarray(ds["q1"].values, float), lam)
        t2 = bragg_angle(np.asarray(ds["q2"].values, float), lam)
    else:
        dim = "q"
        t1 = t2 = bragg_angle(np.asarray(ds["q"].values, float), lam)
    design = legendre_design(np.cos(psi), ls)
    vals = off[:, None] + np.nan_to_num(bl) @ design.T
    for i in range(vals.shape[0]):
        lo, hi = psi_range(float(t1[i]), float(t2[i]))
        vals[i, (psi < lo - 1e-12) | (psi > hi + 1e-12)] = np.nan
    return xr.DataArray(vals, dims=(dim, "psi"), coords={dim: ds[dim].values, "psi": psi},
                        name=f"bl{s}_series",
                        attrs={"long_name": "offset + sum_l B_l P_l(cos psi)"})


def add_structure(path: str | os.PathLike[str], lmax: int = DEFAULT_LMAX, *,
                  odd: bool = False, skip_lags: int = DEFAULT_SKIP_LAGS,
                  npsi: int | None = None, max_vif: float = DEFAULT_MAX_VIF,
                  errors: str = "auto", cross: bool = True) -> xr.Dataset:
    """Compute ``corr_psi`` and ``bl`` of a result store and write them into it.

    Everything is computed (and every parameter checked) before the store
    is touched; then the variables of an earlier call are removed, the new
    ones written, the ``structure_*`` root attrs set (last: a store holding
    them holds whole structure variables) and the metadata consolidated.
    The store stays complete and readable throughout: its other arrays and
    attrs are not changed.

    Parameters
    ----------
    path : path
        A complete result store.
    lmax, odd, skip_lags, npsi, max_vif, errors, cross :
        As :func:`compute_structure`.

    Returns
    -------
    xarray.Dataset
        The store, opened again (:func:`sacla_dask.open_result`).

    Raises
    ------
    OutputError, IncompleteStoreError
        Not a result store, or not complete.
    ParameterError
        As :func:`compute_structure`.
    """
    import zarr

    from ..store import consolidate, open_result, set_attrs, writing

    p = os.fspath(path)
    ds = open_result(p)
    new = compute_structure(ds, lmax, odd=odd, skip_lags=skip_lags, npsi=npsi,
                            max_vif=max_vif, errors=errors, cross=cross)
    params = dict(new.attrs)
    ds.close()
    with writing(p):
        g = zarr.open_group(p, mode="r+")
        for k in STRUCTURE_ATTRS:
            if k in g.attrs:
                del g.attrs[k]
        for name in structure_variables():
            if name in g:
                del g[name]
        keep = dict(g.attrs)  # xarray's append replaces the root attrs: give them back whole
        existing = [k for k in new.coords if str(k) in g]
        new = new.drop_vars(existing)
        new.attrs = keep
        new.to_zarr(p, mode="a", consolidated=False, zarr_format=3)
    set_attrs(p, **params)
    consolidate(p)
    return open_result(p)
