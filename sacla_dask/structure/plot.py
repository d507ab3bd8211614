"""Figures of the structure variables, and predicted Bragg-pair angles marked on correlations.

Same conventions as :mod:`sacla_dask.plot`: each function draws on the
``ax`` given or on a new pyplot-free Figure, and returns ``(fig, ax)``.
``psi`` is stored in radians but drawn in degrees (interplanar angles are
quoted in degrees: 70.53, 109.47); ``dphi`` figures keep radians with
ticks in multiples of pi.

* :func:`mark_angles` -- predicted angles (:func:`~sacla_dask.structure.
  predicted_angles`) as labelled vertical lines on a ``dphi`` or ``psi`` axis.
* :func:`plot_correlation_psi` -- ``C(psi)`` at one q with its standard
  error, the Legendre sum of ``bl`` and the predicted angles.
* :func:`plot_correlation_psi_map` -- ``C(q, psi)``.
* :func:`plot_bl` -- ``B_l`` against ``l`` at one q, flagged ones apart.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MultipleLocator

from ..errors import ParameterError

__all__ = ["mark_angles", "plot_bl", "plot_correlation_psi", "plot_correlation_psi_map"]

PSI_LABEL = "ψ, angle between the scattering vectors (deg)"


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _row(da: Any, at: float | None, dim: str = "q") -> tuple[int, float]:
    """Index and q of the row nearest ``at`` (default the middle row)."""
    q = np.asarray(da[dim].values, dtype=float) if dim in da.coords else np.arange(da.shape[0])
    if at is None:
        i = q.size // 2
    else:
        i = int(np.argmin(np.abs(q - float(at))))
    return i, float(q[i])


def mark_angles(ax: Axes, angles: Any, *, kind: str = "dphi", degrees: bool = False,
                mirror: bool = True, color: str = "k", label: bool = True,
                fontsize: float = 7.5, headroom: float = 0.0) -> list[float]:
    """Mark predicted angles as dotted vertical lines with their labels.

    Parameters
    ----------
    ax : Axes
        Its x axis is ``dphi`` or ``psi``.
    angles : xarray.Dataset
        From :func:`~sacla_dask.structure.predicted_angles` (rows not
        reached on the detector are skipped).
    kind : {"dphi", "psi"}
        Which angle the x axis holds.
    degrees : bool
        The x axis is in degrees (else radians).
    mirror : bool
        Also mark ``2 pi - dphi`` (``kind="dphi"`` only): the detector shows both.
    label : bool
        Write ``"111-111 70.5°"`` (``psi``) or ``"111-111 ψ=70.5° at
        Δφ=73.5°"`` (``dphi``) along each line, at the top of the axes.
    headroom : float
        Raise the top of the y axis by this fraction of its range first, so
        that the labels sit above a line plot's data (0 for a map).

    Returns
    -------
    list of float
        The x positions marked.
    """
    if kind not in ("dphi", "psi"):
        raise ParameterError(f"kind must be 'dphi' or 'psi' (got {kind!r})")
    xs: list[float] = []
    if angles is None or "peak" not in getattr(angles, "dims", {}):
        return xs
    if headroom > 0:
        y0, y1 = ax.get_ylim()
        ax.set_ylim(y0, y1 + headroom * (y1 - y0))
    lo, hi = ax.get_xlim()
    trans = ax.get_xaxis_transform()
    for k in range(angles.sizes["peak"]):
        row = angles.isel(peak=k)
        if not bool(row["reached"]):
            continue
        value = float(row[kind])
        name = f"{row['reflection1'].item()}–{row['reflection2'].item()}"
        psi_deg = math.degrees(float(row["psi"]))
        text = (f"{name} {psi_deg:.1f}°" if kind == "psi" else
                f"{name} ψ={psi_deg:.1f}° at Δφ={math.degrees(value):.1f}°")
        positions = [value]
        if kind == "dphi" and mirror:
            positions.append(2 * math.pi - value)
        for v in positions:
            x = math.degrees(v) if degrees else v
            if not (min(lo, hi) <= x <= max(lo, hi)):
                continue
            ax.axvline(x, color=color, ls=":", lw=1.1, zorder=4)
            if label:
                ax.text(x, 0.98, " " + text, transform=trans, rotation=90, va="top",
                        ha="right", fontsize=fontsize, color=color, zorder=5,
                        bbox=dict(facecolor="white", alpha=0.7, lw=0, pad=0.5))
            xs.append(x)
    return xs


def plot_correlation_psi(corr_psi: Any, *, at: float | None = None, sem: Any = None,
                         series: Any = None, angles: Any = None, min_psi: float = 0.0,
                         ax: Axes | None = None, title: str | None = None
                         ) -> tuple[Figure, Axes]:
    """``C(psi)`` at one q: the resampled correlation, its error, the ``B_l`` sum, the angles.

    Parameters
    ----------
    corr_psi : xarray.DataArray (q, psi)
        ``ds.corr_psi`` (or a ``qpair`` row set: ``corr_cross_psi``).
    at : float, optional
        q in 1/A (nearest row); default the middle row.
    sem : DataArray (q, psi), optional
        ``ds.corr_psi_sem``, drawn as a +/- 1 band.
    series : DataArray (q, psi), optional
        :func:`~sacla_dask.structure.bl_series`: drawn as a line.
    angles : xarray.Dataset, optional
        :func:`~sacla_dask.structure.predicted_angles`: psi marked.
    min_psi : float
        Leave out ``psi`` below this (radians): the self-correlation peak
        at 0 would set the scale.
    """
    dim = corr_psi.dims[0]
    i, qv = _row(corr_psi, at, dim)
    psi = np.asarray(corr_psi["psi"].values, dtype=float)
    keep = psi >= min_psi
    x = np.degrees(psi[keep])
    y = np.asarray(corr_psi.values, dtype=float)[i, keep]
    fig, ax = _axes(ax, (7.5, 3.8))
    where = (f"q = {qv:.4g} 1/Å" if dim == "q" else
             f"q1 = {float(corr_psi['q1'][i]):.4g}, q2 = {float(corr_psi['q2'][i]):.4g} 1/Å")
    line = ax.plot(x, y, lw=1.2, label=f"C(ψ) at {where}")[0]
    if sem is not None:
        s = np.asarray(sem.values, dtype=float)[i, keep]
        ax.fill_between(x, y - s, y + s, color=line.get_color(), alpha=0.25, lw=0,
                        label="± 1 s.e.m.")
    if series is not None:
        ys = np.asarray(series.values, dtype=float)[i, keep]
        lmax = series.attrs.get("lmax")
        ax.plot(x, ys, color="C3", lw=1.2,
                label="Legendre sum of B_l" + (f" (l ≤ {lmax})" if lmax is not None else ""))
    ax.axhline(0.0, color="0.5", lw=0.8)
    finite = x[np.isfinite(y)]
    if finite.size:
        ax.set_xlim(max(0.0, float(finite.min()) - 2), min(180.0, float(finite.max()) + 2))
    ax.xaxis.set_major_locator(MultipleLocator(30))
    ax.xaxis.set_minor_locator(MultipleLocator(10))
    ax.set_xlabel(PSI_LABEL)
    ax.set_ylabel("C(ψ) (normalised intensity²)")
    if angles is not None:
        mark_angles(ax, angles, kind="psi", degrees=True, headroom=0.45)
    ax.legend(fontsize="small", loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=3,
              frameon=False)
    ax.set_title(title if title is not None else
                 "correlation on the 3-D angle ψ (Ewald curvature undone)",
                 fontsize="medium", pad=24)
    return fig, ax


def plot_correlation_psi_map(corr_psi: Any, *, min_psi: float = 0.0, ax: Axes | None = None,
                             angles: Any = None, mark_q: float | None = None,
                             cmap: str = "RdBu_r", title: str | None = None
                             ) -> tuple[Figure, Axes]:
    """The map ``C(q, psi)``, psi in degrees, NaN (not reached) grey."""
    from ..plot import _colormap, _edges

    if corr_psi.dims[0] != "q":
        raise ParameterError("plot_correlation_psi_map draws corr_psi (q, psi)")
    psi = np.asarray(corr_psi["psi"].values, dtype=float)
    q = np.asarray(corr_psi["q"].values, dtype=float)
    keep = psi >= min_psi
    c = np.asarray(corr_psi.values, dtype=float)[:, keep]
    fig, ax = _axes(ax, (8.0, 4.0))
    finite = np.abs(c[np.isfinite(c)])
    vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    mesh = ax.pcolormesh(np.degrees(_edges(psi[keep])), _edges(q), np.ma.masked_invalid(c),
                         cmap=_colormap(cmap, "0.75"),
                         norm=TwoSlopeNorm(vcenter=0.0, vmin=-vmax, vmax=vmax),
                         shading="flat", rasterized=True)
    fig.colorbar(mesh, ax=ax, label="C(q, ψ)")
    ax.set_xlim(math.degrees(psi[keep][0]), math.degrees(psi[keep][-1]))
    ax.xaxis.set_major_locator(MultipleLocator(30))
    ax.set_xlabel(PSI_LABEL)
    ax.set_ylabel("q (1/Å)")
    if mark_q is not None:
        ax.axhline(float(mark_q), color="k", ls="--", lw=1)
    if angles is not None:
        mark_angles(ax, angles, kind="psi", degrees=True)
    ax.set_title(title if title is not None else
                 "C(q, ψ): grey where the detector does not reach ψ", fontsize="medium")
    return fig, ax


def plot_bl(bl: Any, *, at: float | None = None, sem: Any = None, flag: Any = None,
            ax: Axes | None = None, title: str | None = None) -> tuple[Figure, Axes]:
    """``B_l`` against ``l`` at one q, with +/- 1 standard error; flagged coefficients apart.

    Parameters
    ----------
    bl : xarray.DataArray (q, l)
        ``ds.bl`` (or ``ds.bl_cross``, rows ``qpair``).
    at : float, optional
        q in 1/A (nearest row); default the middle row.
    sem, flag : DataArray (q, l), optional
        ``ds.bl_sem`` and ``ds.bl_flag``: flagged coefficients (coverage
        too short, VIF above the threshold) are drawn hollow and grey.
    """
    dim = bl.dims[0]
    i, qv = _row(bl, at, dim)
    ls = np.asarray(bl["l"].values, dtype=int)
    b = np.asarray(bl.values, dtype=float)[i]
    e = np.zeros_like(b) if sem is None else np.asarray(sem.values, dtype=float)[i]
    f = np.zeros(b.shape, bool) if flag is None else np.asarray(flag.values, dtype=bool)[i]
    fitted = np.isfinite(b)
    ok = fitted & ~f
    bad = fitted & f
    fig, ax = _axes(ax, (7.0, 3.8))
    ax.errorbar(ls[ok], b[ok], yerr=e[ok], fmt="o", ms=4, capsize=2, color="C0",
                label="B_l ± 1 s.e.")
    if bad.any():
        vmax = bl.attrs.get("max_vif", "")
        ax.errorbar(ls[bad], b[bad], yerr=e[bad], fmt="o", ms=4, capsize=2, color="0.6",
                    mfc="none", label=f"flagged: ψ coverage too short (VIF > {vmax:g})"
                    if isinstance(vmax, (int, float)) else "flagged")
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_xlabel("Legendre order l")
    ax.set_ylabel("B_l (normalised intensity²)")
    ax.xaxis.set_major_locator(MultipleLocator(max(2, 2 * round(ls.size / 20))))
    where = (f"q = {qv:.4g} 1/Å" if dim == "q" else f"q pair {i}")
    odd = bool(bl.attrs.get("odd_l", 0))
    ax.legend(fontsize="small", frameon=False)
    ax.set_title(title if title is not None else
                 f"Legendre coefficients B_l at {where}\n"
                 f"({'all l fitted' if odd else 'even l: odd l vanish by Friedel'}; l = 0 "
                 "not observable after the row normalisation)", fontsize="medium")
    return fig, ax


def structure_figures(ds: Any, q: float | None = None, angles: Any = None,
                      min_psi: float | None = None) -> dict[str, Figure]:
    """The figures of a result's structure variables, by PNG name.

    ``correlation_psi``: the map ``C(q, psi)`` and the profile at ``q``
    with its error, the Legendre sum of ``bl`` and the ``angles`` marked
    (needs ``corr_psi``); ``bl``: ``B_l`` at ``q`` (needs ``bl``). ``min_psi``
    (radians) hides the self-correlation peak at small psi: default the lags
    the fit skipped plus 2 % of pi.
    """
    figs: dict[str, Figure] = {}
    if "corr_psi" not in ds:
        return figs
    skip = int(ds.attrs.get("structure_skip_lags", 2) or 0)
    nphi = ds.sizes.get("dphi", 0)
    if min_psi is None:
        min_psi = (2 * math.pi * skip / nphi if nphi else 0.0) + 0.02 * math.pi
    corr_psi = ds["corr_psi"].load()
    fig = Figure(figsize=(8.5, 7.5), layout="constrained")
    ax1, ax2 = fig.subplots(2, 1)
    plot_correlation_psi_map(corr_psi, min_psi=min_psi, ax=ax1, angles=angles, mark_q=q)
    series = None
    if "bl" in ds:
        from .compute import bl_series

        series = bl_series(ds)
        series.attrs["lmax"] = ds.attrs.get("structure_lmax")
    plot_correlation_psi(corr_psi, at=q, sem=ds["corr_psi_sem"] if "corr_psi_sem" in ds
                         else None, series=series, angles=angles, min_psi=min_psi, ax=ax2)
    figs["correlation_psi"] = fig
    if "bl" in ds:
        fig, _ = plot_bl(ds["bl"].load(), at=q, sem=ds.get("bl_sem"), flag=ds.get("bl_flag"))
        figs["bl"] = fig
    return figs
