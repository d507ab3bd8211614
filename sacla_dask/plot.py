"""Figures: raw shots, polar images, correlation maps, profiles and pair statistics.

This module owns how sacla_dask data are drawn with matplotlib. Every
function draws on the ``ax`` it is given, or on a new
:class:`matplotlib.figure.Figure` that pyplot does not know about (so the
functions are safe headless, in a CLI or a worker, and nothing has to be
closed), and returns ``(fig, ax)``. pyplot is never imported here; in a
notebook make the axes with ``plt.subplots()`` and pass ``ax=``.

Conventions are those of the result store: ``x`` is the fast (column) axis,
``y`` the slow (row) axis, lengths in pixels, ``q`` in inverse Angstrom,
``phi`` and ``dphi`` in radians over ``[0, 2 pi)``. Masks are True = good.

* :func:`plot_image` -- a detector image with the masked pixels shaded and
  the beam centre, a (fitted) ring, the fit's peak points and the q band.
* :func:`plot_polar` -- a polar image on (phi, q) axes, phi ticks in
  multiples of pi, masked bins grey.
* :func:`plot_correlation` -- the correlation map ``C(q, dphi)`` with the
  self-correlation edge (``dphi`` near 0 and 2 pi) left out.
* :func:`plot_correlation_profile` -- ``C(dphi)`` at one q (or band mean).
* :func:`plot_radial_profile` -- mean intensity against radius or q.
* :func:`plot_pair_statistics` -- the per-pair difference statistic,
  accepted and rejected pairs apart.
* :func:`plot_result` -- all of the above from a result store, as PNGs
  (what ``sacla-dask plot`` writes).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, Literal

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap, LogNorm, Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator, MultipleLocator

from .errors import ParameterError

__all__ = [
    "DEFAULT_CUT",
    "PlotReport",
    "format_pi",
    "kept_dphi",
    "pair_rejection",
    "plot_correlation",
    "plot_correlation_profile",
    "plot_image",
    "plot_pair_statistics",
    "plot_polar",
    "plot_radial_profile",
    "plot_result",
    "ring_q",
    "set_pi_ticks",
]

#: Default fraction of the full circle (2 pi) left out at each end of dphi.
#: The tutorial cut 5 % of the nphi bins at each end: the zero-lag
#: self-correlation (the pair's variance) and its neighbours, smeared by the
#: finite bin width, would otherwise set the colour scale.
DEFAULT_CUT = 0.05

Q_LABEL = "q (1/Å)"
PHI_LABEL = "φ (rad)"
DPHI_LABEL = "Δφ (rad)"
X_LABEL = "x, fast axis (px)"
Y_LABEL = "y, slow axis (px)"


# -- small helpers -----------------------------------------------------------
def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """The given axes and their figure, or a new pyplot-free figure."""
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _array(x: Any, name: str, ndim: int | None = None) -> np.ndarray:
    arr = np.asarray(getattr(x, "values", x))
    if ndim is not None and arr.ndim != ndim:
        raise ParameterError(f"{name} must be {ndim}-D (got shape {arr.shape})")
    return arr


def _coord(da: Any, name: str, given: Any, size: int, what: str) -> np.ndarray:
    """A coordinate from the argument, else from a DataArray's coords."""
    if given is not None:
        c = _array(given, name, 1)
    elif hasattr(da, "coords") and name in da.coords:
        c = np.asarray(da.coords[name].values, dtype=float)
    else:
        raise ParameterError(f"give {name}= ({what}) or pass a labelled xarray.DataArray")
    if c.size != size:
        raise ParameterError(f"{name} has {c.size} values but the data has {size} along it")
    return np.asarray(c, dtype=float)


def _edges(centres: np.ndarray) -> np.ndarray:
    """Bin edges half-way between centres, extended by half a step at the ends."""
    c = np.asarray(centres, dtype=float)
    if c.size == 1:
        return np.array([c[0] - 0.5, c[0] + 0.5])
    mid = 0.5 * (c[1:] + c[:-1])
    return np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])


def _robust_limits(values: np.ndarray, lo: float = 1.0, hi: float = 99.5) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return 0.0, 1.0
    a, b = np.percentile(v, [lo, hi])
    if not b > a:
        a, b = float(v.min()), float(v.max())
        if not b > a:
            a, b = a - 0.5, b + 0.5
    return float(a), float(b)


def format_pi(value: float, step: float = math.pi / 2) -> str:
    """Tick label of an angle as a multiple of pi (mathtext), e.g. ``$3\\pi/2$``.

    ``step`` is the tick spacing; values are rounded to a multiple of it, so
    that the fraction's denominator stays small.
    """
    n = round(value / step)
    frac = Fraction(n) * Fraction(step / math.pi).limit_denominator(12)
    if frac == 0:
        return "0"
    sign = "-" if frac < 0 else ""
    num, den = abs(frac.numerator), frac.denominator
    top = r"\pi" if num == 1 else rf"{num}\pi"
    return f"${sign}{top}$" if den == 1 else f"${sign}{top}/{den}$"


def set_pi_ticks(axis: Any, step: float = math.pi / 2) -> None:
    """Put ticks every ``step`` radians on a matplotlib axis, labelled in pi."""
    axis.set_major_locator(MultipleLocator(step))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: format_pi(v, step)))


def _check_cut(cut: float) -> float:
    try:
        c = float(cut)
    except (TypeError, ValueError):
        raise ParameterError(f"cut must be a number (got {cut!r})") from None
    if not (0.0 <= c < 0.5):
        raise ParameterError(
            f"cut is the fraction of the full circle (2 pi) left out at each end of dphi "
            f"and must lie in [0, 0.5) (got cut={cut})")
    return c


def kept_dphi(dphi: np.ndarray, cut: float = DEFAULT_CUT) -> tuple[np.ndarray, float, float]:
    """Which lags survive the self-correlation cut.

    Parameters
    ----------
    dphi : ndarray (nphi,)
        Lags in radians over ``[0, 2 pi)``.
    cut : float
        Fraction of the full circle left out at *each* end: lags with
        ``dphi < 2 pi cut`` or ``dphi > 2 pi (1 - cut)`` are dropped.

    Returns
    -------
    keep : ndarray of bool (nphi,)
    lo, hi : float
        The kept interval in radians.
    """
    c = _check_cut(cut)
    lo, hi = 2 * math.pi * c, 2 * math.pi * (1 - c)
    d = np.asarray(dphi, dtype=float)
    eps = 1e-9
    keep = (d >= lo - eps) & (d <= hi + eps)
    if not keep.any():
        raise ParameterError(f"cut={cut} leaves no dphi bin of the {d.size} to show")
    return keep, lo, hi


def _auto_rows(corr: Any) -> tuple[np.ndarray, np.ndarray, str]:
    """(values (ny, nphi), y coordinate, y label) of a correlation array."""
    c = _array(corr, "corr", 2)
    dims = getattr(corr, "dims", ("q", "dphi"))
    if dims[0] == "qpair" and hasattr(corr, "coords") and "q1" in corr.coords:
        q1 = np.asarray(corr.coords["q1"].values, dtype=float)
        q2 = np.asarray(corr.coords["q2"].values, dtype=float)
        auto = np.isclose(q1, q2)
        if auto.any():  # the autocorrelation rows of an all-pairs store
            order = np.argsort(q1[auto])
            return c[auto][order], q1[auto][order], Q_LABEL
        return c, np.arange(c.shape[0], dtype=float), "q pair index"
    return c, np.array([]), Q_LABEL


# -- raw image ---------------------------------------------------------------
def plot_image(
    image: Any,
    mask: Any = None,
    *,
    center: Sequence[float] | None = None,
    radius: float | None = None,
    band: Sequence[float] | None = None,
    fit: Any = None,
    ax: Axes | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    log: bool = False,
    cmap: str = "viridis",
    mask_color: str = "red",
    mask_alpha: float = 0.35,
    title: str | None = None,
    colorbar: bool = True,
) -> tuple[Figure, Axes]:
    """A detector image with the mask, the beam centre and rings drawn on it.

    Parameters
    ----------
    image : array (ny, nx)
        Detector image (detector units), row 0 at the top as on screen.
    mask : array of bool (ny, nx), optional
        True/1 = good; masked pixels are shaded in ``mask_color``.
    center : (x, y), optional
        Beam centre in pixels (marked with a cross).
    radius : float, optional
        A ring radius in pixels (drawn as a circle about ``center``).
    band : (r_in, r_out), optional
        Inner and outer radius of the q band in pixels (dashed circles).
    fit : CenterFit-like, optional
        Anything with ``center_x``, ``center_y``, ``radius`` (e.g.
        :class:`sacla_dask.center.CenterFit`); its ``points`` and
        ``rejected_points`` (``(n, 2)`` x, y) are drawn when present.
        Overrides ``center`` and ``radius``.
    ax : matplotlib Axes, optional
    vmin, vmax : float, optional
        Colour limits; default the 1st and 99.5th percentiles of the good
        pixels.
    log : bool
        Logarithmic colour scale.

    Returns
    -------
    (fig, ax)
    """
    img = _array(image, "image", 2).astype(float, copy=False)
    ny, nx = img.shape
    good = np.isfinite(img)
    m = None
    if mask is not None:
        m = _array(mask, "mask", 2).astype(bool)
        if m.shape != img.shape:
            raise ParameterError(f"mask has shape {m.shape} but the image is {img.shape}")
        good &= m
    fig, ax = _axes(ax, (6.4, 5.6))
    lo, hi = _robust_limits(img[good])
    vmin = lo if vmin is None else vmin
    vmax = hi if vmax is None else vmax
    norm: Normalize
    if log:
        pos = img[good & (img > 0)]
        floor = float(np.percentile(pos, 1)) if pos.size else 1.0
        norm = LogNorm(vmin=max(vmin, floor), vmax=max(vmax, 2 * floor))
    else:
        norm = Normalize(vmin=vmin, vmax=vmax)
    import matplotlib

    base = matplotlib.colormaps[cmap]
    # pixels <= 0 have no colour on a log scale: draw them like the lowest value
    cm = base.with_extremes(bad=base(0.0)) if log else base
    im = ax.imshow(img, origin="upper", cmap=cm, norm=norm, interpolation="nearest")
    if colorbar:
        fig.colorbar(im, ax=ax, label="intensity (detector units)", shrink=0.85)
    handles: list[Any] = []
    if m is not None and not m.all():
        shade = np.ma.masked_where(m, np.ones(img.shape))
        ax.imshow(shade, origin="upper", cmap=ListedColormap([mask_color]), vmin=0, vmax=1,
                  alpha=mask_alpha, interpolation="nearest")
        handles.append(Patch(color=mask_color, alpha=mask_alpha,
                             label=f"masked ({int((~m).sum())} px)"))
    if fit is not None:
        center = (float(fit.center_x), float(fit.center_y))
        radius = float(fit.radius)
        pts = np.asarray(getattr(fit, "points", np.empty((0, 2))), dtype=float).reshape(-1, 2)
        bad = np.asarray(getattr(fit, "rejected_points", np.empty((0, 2))),
                         dtype=float).reshape(-1, 2)
        if pts.size:
            handles.append(ax.scatter(pts[:, 0], pts[:, 1], s=4, c="white", edgecolors="k",
                                      linewidths=0.3, zorder=4,
                                      label=f"ring peak points ({len(pts)})"))
        if bad.size:
            handles.append(ax.scatter(bad[:, 0], bad[:, 1], s=20, marker="x", c="red",
                                      zorder=4, label=f"rejected points ({len(bad)})"))
    if center is not None:
        cx, cy = float(center[0]), float(center[1])
        handles.append(ax.plot([cx], [cy], "+", color="white", mec="k", ms=12, mew=2,
                               zorder=5, label=f"centre ({cx:.2f}, {cy:.2f}) px")[0])
        if radius is not None:
            ring = Circle((cx, cy), float(radius), fill=False, ec="cyan", lw=1.2, zorder=3,
                          label=f"ring r = {float(radius):.2f} px")
            ax.add_patch(ring)
            handles.append(ring)
        if band is not None:
            r_in, r_out = (float(b) for b in band)
            for k, r in enumerate((r_in, r_out)):
                c = Circle((cx, cy), r, fill=False, ec="orange", lw=1.2, ls="--", zorder=3,
                           label=f"q band r = {r_in:.1f}..{r_out:.1f} px" if k == 0 else None)
                ax.add_patch(c)
                if k == 0:
                    handles.append(c)
    elif radius is not None or band is not None:
        raise ParameterError("radius= and band= need center= (or fit=)")
    ax.set_xlim(-0.5, nx - 0.5)
    ax.set_ylim(ny - 0.5, -0.5)
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(Y_LABEL)
    if handles:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=2,
                  fontsize="small", frameon=False)
    if title:
        ax.set_title(title)
    return fig, ax


# -- polar image -------------------------------------------------------------
def plot_polar(
    polar: Any,
    q: Any = None,
    phi: Any = None,
    mask: Any = None,
    *,
    ax: Axes | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
    phi_step: float = math.pi / 2,
    label: str = "normalised intensity",
    title: str | None = None,
    colorbar: bool = True,
) -> tuple[Figure, Axes]:
    """A polar image: phi (radians, ticks in multiples of pi) against q (1/A).

    Parameters
    ----------
    polar : array (nq, nphi)
        One polar image (e.g. ``ds.polar.sel(tag=t)``); a labelled
        DataArray supplies ``q`` and ``phi``.
    q : array (nq,), optional
        Bin-centre q in inverse Angstrom (may be non-uniform).
    phi : array (nphi,), optional
        Bin-centre azimuth in radians.
    mask : array of bool (nq, nphi), optional
        Polar mask (True = good); masked bins are drawn grey.
    phi_step : float
        Tick spacing on the phi axis in radians (multiple of pi).

    Returns
    -------
    (fig, ax)
    """
    p = getattr(polar, "squeeze", lambda: polar)()
    data = _array(p, "polar", 2).astype(float)
    nq, nphi = data.shape
    qv = _coord(p, "q", q, nq, "bin-centre q in 1/A")
    ph = _coord(p, "phi", phi, nphi, "bin-centre azimuth in rad")
    bad = ~np.isfinite(data)
    if mask is not None:
        m = _array(mask, "mask", 2).astype(bool)
        if m.shape != data.shape:
            raise ParameterError(f"mask has shape {m.shape} but the polar image is {data.shape}")
        bad |= ~m
    fig, ax = _axes(ax, (8.0, 4.0))
    lo, hi = _robust_limits(data[~bad], 1.0, 99.0)
    cm = _colormap(cmap, bad="0.75")
    mesh = ax.pcolormesh(_edges(ph), _edges(qv), np.ma.masked_array(data, bad), cmap=cm,
                         vmin=lo if vmin is None else vmin, vmax=hi if vmax is None else vmax,
                         shading="flat", rasterized=True)
    if colorbar:
        fig.colorbar(mesh, ax=ax, label=label)
    pe, qe = _edges(ph), _edges(qv)
    ax.set_xlim(pe[0], pe[-1])
    ax.set_ylim(qe[0], qe[-1])
    set_pi_ticks(ax.xaxis, phi_step)
    ax.set_xlabel(PHI_LABEL)
    ax.set_ylabel(Q_LABEL)
    if title:
        ax.set_title(title)
    return fig, ax


def _colormap(name: str, bad: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=bad)


# -- correlation -------------------------------------------------------------
def plot_correlation(
    corr: Any,
    q: Any = None,
    dphi: Any = None,
    *,
    cut: float = DEFAULT_CUT,
    ax: Axes | None = None,
    vmax: float | None = None,
    cmap: str = "RdBu_r",
    phi_step: float = math.pi / 2,
    mark_q: float | None = None,
    title: str | None = None,
    colorbar: bool = True,
) -> tuple[Figure, Axes]:
    """The correlation map ``C(q, dphi)`` without the self-correlation edge.

    Lags within ``2 pi cut`` of 0 and of 2 pi are left out of the picture
    and of the colour scale (the zero-lag peak is the pairs' variance, not
    a structural correlation). The colour scale is symmetric about 0.

    Parameters
    ----------
    corr : array (nq, nphi)
        E.g. ``ds.corr``; a labelled DataArray supplies ``q`` and ``dphi``.
        For a store of q pairs (``qpair`` dimension) the autocorrelation
        rows (``q1 == q2``) are shown when there are any.
    q : array (nq,), optional
        q of each row, inverse Angstrom.
    dphi : array (nphi,), optional
        Lags in radians over ``[0, 2 pi)``.
    cut : float
        Fraction of the full circle left out at each end (default 0.05:
        ``|dphi| < 0.1 pi`` and ``dphi > 1.9 pi``).
    vmax : float, optional
        Colour limit (symmetric); default the 99th percentile of ``|C|``
        over the kept lags.
    mark_q : float, optional
        Draw a dashed line at this q (e.g. where a profile is taken).

    Returns
    -------
    (fig, ax)
    """
    c, yq, ylabel = _auto_rows(corr)
    ny, nphi = c.shape
    if yq.size == 0:
        yq = _coord(corr, "q", q, ny, "q of each row in 1/A")
    dp = _coord(corr, "dphi", dphi, nphi, "lags in rad")
    keep, lo, hi = kept_dphi(dp, cut)
    shown = c[:, keep].astype(float)
    fig, ax = _axes(ax, (8.0, 4.0))
    if vmax is None:
        finite = np.abs(shown[np.isfinite(shown)])
        vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
        vmax = vmax if vmax > 0 else 1.0
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-vmax, vmax=vmax)
    mesh = ax.pcolormesh(_edges(dp)[np.r_[keep, False] | np.r_[False, keep]], _edges(yq),
                         np.ma.masked_invalid(shown), cmap=_colormap(cmap, "0.75"), norm=norm,
                         shading="flat", rasterized=True)
    if colorbar:
        fig.colorbar(mesh, ax=ax, label="C(q, Δφ)")
    ax.set_xlim(lo, hi)
    ye = _edges(yq)
    ax.set_ylim(ye[0], ye[-1])
    set_pi_ticks(ax.xaxis, phi_step)
    ax.set_xlabel(DPHI_LABEL)
    ax.set_ylabel(ylabel)
    if mark_q is not None:
        ax.axhline(float(mark_q), color="k", ls="--", lw=1)
    cut_txt = format_pi(lo, math.pi / _den(cut))
    ax.set_title(title if title is not None
                 else f"difference correlation (Δφ within {cut_txt} of 0 and 2π left out)",
                 fontsize="medium")
    return fig, ax


def _den(cut: float) -> int:
    """A denominator that writes ``2 pi cut`` as a small fraction of pi."""
    return Fraction(2 * cut).limit_denominator(100).denominator or 1


def plot_correlation_profile(
    corr: Any,
    q: Any = None,
    dphi: Any = None,
    *,
    at: float | None = None,
    sem: Any = None,
    cut: float = DEFAULT_CUT,
    order: int | None = None,
    ax: Axes | None = None,
    phi_step: float = math.pi / 2,
    label: str | None = None,
    title: str | None = None,
) -> tuple[Figure, Axes]:
    """A line profile ``C(dphi)`` of the correlation at one q (or the band mean).

    Parameters
    ----------
    corr : array (nq, nphi)
        As for :func:`plot_correlation`.
    at : float, optional
        q in inverse Angstrom; the nearest row is shown. Default: the
        mean over all rows.
    sem : array (nq, nphi), optional
        Standard error (e.g. ``ds.corr_sem``), drawn as a +/- 1 band.
    cut : float
        Fraction of the full circle left out at each end of dphi.
    order : int, optional
        Mark the lags ``k 2 pi / order`` expected for an ``order``-fold
        symmetry.

    Returns
    -------
    (fig, ax)
    """
    c, yq, _ = _auto_rows(corr)
    ny, nphi = c.shape
    if yq.size == 0:
        yq = _coord(corr, "q", q, ny, "q of each row in 1/A")
    dp = _coord(corr, "dphi", dphi, nphi, "lags in rad")
    keep, lo, hi = kept_dphi(dp, cut)
    s = None
    if sem is not None:
        s = _auto_rows(sem)[0]
        if s.shape != c.shape:
            raise ParameterError(f"sem has shape {s.shape} but corr is {c.shape}")
    if at is None and ny == 1:
        at = float(yq[0])
    if at is None:
        y = np.nanmean(c, axis=0)
        err = None if s is None else np.sqrt(np.nansum(s**2, axis=0)) / ny
        where = f"mean over q = {yq.min():.4g}..{yq.max():.4g} 1/Å"
    else:
        i = int(np.argmin(np.abs(yq - float(at))))
        y = c[i]
        err = None if s is None else s[i]
        where = f"q = {yq[i]:.4g} 1/Å"
    fig, ax = _axes(ax, (7.0, 3.6))
    x = dp[keep]
    line = ax.plot(x, y[keep], lw=1.3, label=label or where)[0]
    if err is not None:
        ax.fill_between(x, (y - err)[keep], (y + err)[keep], color=line.get_color(), alpha=0.25,
                        lw=0, label="± 1 s.e.m. over pairs")
    ax.axhline(0.0, color="0.5", lw=0.8)
    if order:
        for k in range(1, int(order)):
            v = 2 * math.pi * k / int(order)
            if lo <= v <= hi:
                ax.axvline(v, color="0.4", ls=":", lw=1,
                           label=f"k·2π/{int(order)}" if k == 1 else None)
    ax.set_xlim(lo, hi)
    set_pi_ticks(ax.xaxis, phi_step)
    ax.set_xlabel(DPHI_LABEL)
    ax.set_ylabel("C(Δφ)")
    ax.legend(fontsize="small", loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=3,
              frameon=False)
    if title:
        ax.set_title(title, fontsize="medium", pad=22)
    return fig, ax


# -- radial profile ----------------------------------------------------------
def plot_radial_profile(
    x: Any,
    profile: Any = None,
    *,
    kind: Literal["radius", "q"] = "radius",
    ring: float | None = None,
    band: Sequence[float] | None = None,
    radius: Any = None,
    ax: Axes | None = None,
    label: str | None = None,
    ylabel: str = "mean intensity (detector units)",
    title: str | None = None,
) -> tuple[Figure, Axes]:
    """Mean intensity against radius (pixels) or q (inverse Angstrom).

    Parameters
    ----------
    x : array (n,)
        Radius in pixels (``kind="radius"``) or q in 1/A (``kind="q"``).
        With a labelled 1-D DataArray as the only argument, its coordinate
        is used and ``kind`` follows its name.
    profile : array (n,)
        Mean intensity per bin; NaN bins are left as gaps.
    ring : float, optional
        Mark this position (same unit as ``x``), e.g. a fitted ring radius.
    band : (lo, hi), optional
        Shade this interval (same unit as ``x``), e.g. the q band.
    radius : array (n,), optional
        With ``kind="q"``: the radius in pixels of each q, to add a
        secondary "radius (px)" axis on top.
    label : str, optional
        Legend entry (call again with the same ``ax`` to overlay profiles).

    Returns
    -------
    (fig, ax)
    """
    if profile is None:
        da = x
        if not hasattr(da, "dims") or len(da.dims) != 1:
            raise ParameterError("give x and profile, or one labelled 1-D DataArray")
        dim = da.dims[0]
        xv = np.asarray(da.coords[dim].values, dtype=float)
        kind = "q" if dim == "q" else "radius"
        if radius is None and "radius" in da.coords and dim == "q":
            radius = da.coords["radius"].values
        yv = _array(da, "profile", 1).astype(float)
    else:
        xv = _array(x, "x", 1).astype(float)
        yv = _array(profile, "profile", 1).astype(float)
    if xv.shape != yv.shape:
        raise ParameterError(f"x has {xv.size} values but the profile has {yv.size}")
    if kind not in ("radius", "q"):
        raise ParameterError(f"kind must be 'radius' or 'q' (got {kind!r})")
    fig, ax = _axes(ax, (7.0, 3.8))
    unit = "px" if kind == "radius" else "1/Å"
    ax.plot(xv, yv, ".-", lw=1.3, ms=4, label=label)
    if band is not None:
        ax.axvspan(float(band[0]), float(band[1]), color="orange", alpha=0.2,
                   label=f"band {float(band[0]):.4g}..{float(band[1]):.4g} {unit}")
    if ring is not None:
        ax.axvline(float(ring), color="k", ls="--", lw=1, label=f"ring {float(ring):.4g} {unit}")
    ax.set_xlabel("radius (px)" if kind == "radius" else Q_LABEL)
    ax.set_ylabel(ylabel)
    if radius is not None and kind == "q":
        r = _array(radius, "radius", 1).astype(float)
        if r.shape != xv.shape:
            raise ParameterError(f"radius has {r.size} values but q has {xv.size}")
        o = np.argsort(xv)
        qs, rs = xv[o], r[o]
        # (np.interp reads its x as float64 anyway; asarray says so to the type checker)
        sec = ax.secondary_xaxis("top", functions=(
            lambda v: np.interp(np.asarray(v, dtype=float), qs, rs),
            lambda v: np.interp(np.asarray(v, dtype=float), rs, qs)))
        sec.set_xlabel("radius (px)")
    if label or band is not None or ring is not None:
        ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return fig, ax


# -- pair statistics ---------------------------------------------------------
def plot_pair_statistics(
    stat: Any,
    rejected: Any = None,
    *,
    tags: Any = None,
    threshold: float | None = None,
    ax: Axes | None = None,
    log: bool | None = None,
    title: str | None = None,
) -> tuple[Figure, Axes]:
    """The per-pair difference statistic, accepted and rejected pairs apart.

    Parameters
    ----------
    stat : array (npair,)
        ``pair_stat``: mean squared normalised difference of each pair.
    rejected : array of bool (npair,), optional
        True for pairs left out of the average (``pair_rejected``); when
        None every pair counts as accepted and the legend says so.
    tags : array (npair,), optional
        Tag of each pair's first shot, used as the x axis (default: pair
        index).
    threshold : float, optional
        The rejection threshold, drawn as a dashed line.
    log : bool, optional
        Logarithmic y axis; default when the positive values span more than
        a factor 100.

    Returns
    -------
    (fig, ax)
    """
    s = _array(stat, "stat", 1).astype(float)
    n = s.size
    rej = np.zeros(n, dtype=bool) if rejected is None else _array(rejected, "rejected", 1)
    if rej.shape != s.shape:
        raise ParameterError(f"rejected has {rej.size} values but there are {n} pairs")
    rej = rej.astype(bool)
    if tags is not None:
        xv = _array(tags, "tags", 1)
        if xv.shape != s.shape:
            raise ParameterError(f"tags has {xv.size} values but there are {n} pairs")
        xlabel = "tag of the pair's first shot"
    else:
        xv = np.arange(n)
        xlabel = "pair index"
    fig, ax = _axes(ax, (7.0, 3.8))
    acc_label = (f"accepted ({int((~rej).sum())})" if rejected is not None
                 else f"all pairs ({n}; no rejection recorded)")
    ax.plot(xv[~rej], s[~rej], "o", ms=3.5, color="C0", label=acc_label)
    if rejected is not None:
        ax.plot(xv[rej], s[rej], "x", ms=6, mew=1.5, color="C3",
                label=f"rejected ({int(rej.sum())})")
    if threshold is not None and np.isfinite(threshold):
        ax.axhline(float(threshold), color="C3", ls="--", lw=1,
                   label=f"threshold {float(threshold):.3g}")
    pos = s[np.isfinite(s) & (s > 0)]
    if log is None:
        log = bool(pos.size == s.size and pos.size and pos.max() > 100 * pos.min())
    if log:
        ax.set_yscale("log")
    if tags is not None:
        ax.ticklabel_format(axis="x", style="plain", useOffset=False)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("pair statistic ⟨ΔI²⟩ (normalised units)")
    ax.legend(fontsize="small")
    ax.set_title(title if title is not None
                 else "pairs: mean squared normalised difference", fontsize="medium")
    return fig, ax


# -- everything from a result store -------------------------------------------
@dataclasses.dataclass
class PlotReport:
    """What :func:`plot_result` wrote and what it skipped, and why."""

    written: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        lines = [f"wrote {k}: {v}" for k, v in self.written.items()]
        lines += [f"skipped {k}: {v}" for k, v in self.skipped.items()]
        return "\n".join(lines)


def _sources(attrs: dict[str, Any]) -> list[str]:
    src = attrs.get("source") or []
    return [src] if isinstance(src, str) else [str(s) for s in src]


def ring_q(ds: Any) -> float:
    """q (1/A) of the brightest row of the mean bright-shot intensity (the ring)."""
    q = np.asarray(ds["q"].values, dtype=float)
    if "row_mean" not in ds:
        return float(q[q.size // 2])
    rm = ds["row_mean"]
    if "bright" in ds and bool(np.asarray(ds["bright"].values).any()):
        rm = rm.isel(tag=np.asarray(ds["bright"].values, dtype=bool))
    prof = np.asarray(rm.mean("tag").values, dtype=float)
    if not np.isfinite(prof).any():
        return float(q[q.size // 2])
    return float(q[int(np.nanargmax(prof))])


def plot_result(
    ds: Any,
    out_dir: str | os.PathLike[str],
    *,
    cut: float = DEFAULT_CUT,
    q: float | None = None,
    tag: int | None = None,
    shots: int = 10,
    dpi: int = 120,
    angles: Any = None,
) -> PlotReport:
    """Write the standard figures of a result store as PNG files.

    Files (in ``out_dir``): ``image.png`` (mean of the first ``shots``
    bright raw images with the mask, centre and q band; only when the run
    file named in the store's ``source`` attribute is reachable),
    ``polar.png`` (one tag's polar image; only when the store keeps polar
    images), ``correlation.png``, ``correlation_profile.png``,
    ``radial_profile.png`` and ``pair_statistics.png``; with the structure
    variables (``sacla-dask structure``) also ``correlation_psi.png``
    (``C(q, psi)`` and its profile with the Legendre sum) and ``bl.png``.

    Parameters
    ----------
    ds : xarray.Dataset
        An opened result store (:func:`sacla_dask.open_result`).
    out_dir : path
        Folder for the PNGs (created when missing).
    cut : float
        Fraction of 2 pi left out at each end of dphi.
    q : float, optional
        q of the correlation profile in 1/A (default: the ring, i.e. the
        brightest q row of the mean bright shot).
    tag : int, optional
        Tag of the polar image (default: the first bright tag).
    shots : int
        Bright raw shots averaged for ``image.png``.
    dpi : int
        Resolution of the PNGs.
    angles : xarray.Dataset, optional
        Predicted Bragg-pair angles
        (:func:`sacla_dask.structure.predicted_angles`), marked on the
        correlation figures (``dphi``) and on ``correlation_psi.png`` (``psi``).

    Returns
    -------
    PlotReport
    """
    _check_cut(cut)
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    report = PlotReport()
    attrs = dict(ds.attrs)

    def save(name: str, fig: Figure) -> None:
        path = os.path.join(out, f"{name}.png")
        fig.savefig(path, dpi=dpi)
        report.written[name] = path

    tags = np.asarray(ds["tag"].values)
    bright = (np.asarray(ds["bright"].values, dtype=bool) if "bright" in ds
              else np.ones(tags.size, dtype=bool))
    radius = np.asarray(ds["radius"].values, dtype=float) if "radius" in ds.coords else None
    center = (attrs.get("center_x"), attrs.get("center_y"))
    have_center = all(isinstance(v, (int, float)) for v in center)

    # raw image: needs the run file
    srcs = _sources(attrs)
    missing = [s for s in srcs if not os.path.exists(s)]
    if not srcs:
        report.skipped["image"] = "the store names no run file (attrs 'source')"
    elif missing:
        report.skipped["image"] = (f"run file {missing[0]!r} (attrs 'source') is not reachable "
                                   "from here")
    else:
        _plot_raw(ds, srcs, shots, center if have_center else None, radius, attrs, save, report)

    # polar image of one tag
    if "polar" in ds:
        if tag is None:
            idx = np.flatnonzero(bright)
            i = int(idx[0]) if idx.size else 0
        else:
            hits = np.flatnonzero(tags == int(tag))
            if not hits.size:
                raise ParameterError(f"tag {tag} is not in the store (tags {tags[0]}..{tags[-1]})")
            i = int(hits[0])
        pm = ds["polar_mask"].values if "polar_mask" in ds else None
        fig, _ = plot_polar(ds["polar"].isel(tag=i), mask=pm,
                            title=f"tag {int(tags[i])} ({'bright' if bright[i] else 'dark'}), "
                                  "row-normalised")
        save("polar", fig)
    else:
        report.skipped["polar"] = "the store keeps no polar images (processed correlation-only)"

    # correlation map and profile
    q_prof = ring_q(ds) if q is None else float(q)
    corr = ds["corr"].load()
    if "group" in corr.dims:  # grouped (sacla_dask.shots.groups): the difference of two
        # groups, else the first group, on the map and profile; each group in groups.png
        from .shots.figure import group_profiles

        save("groups", group_profiles(ds, q_prof, cut))
        corr = ds["corr_diff"].load() if "corr_diff" in ds else corr.isel(group=0)
    has_q = "q" in corr.dims or "q1" in corr.coords
    fig, ax = plot_correlation(corr, cut=cut, mark_q=q_prof if has_q else None)
    if angles is not None:
        from .structure.plot import mark_angles

        mark_angles(ax, angles, kind="dphi", color="0.15")
    save("correlation", fig)
    sem = ds["corr_sem"].load() if "corr_sem" in ds else None
    if sem is not None and "group" in sem.dims:
        sem = ds["corr_diff_sem"].load() if "corr_diff_sem" in ds else sem.isel(group=0)
    fig, ax = plot_correlation_profile(corr, at=q_prof if has_q else None, sem=sem, cut=cut,
                                       title="difference correlation profile")
    if angles is not None:
        mark_angles(ax, angles, kind="dphi", headroom=0.45)
    save("correlation_profile", fig)

    # on the 3-D angle psi, and the Legendre coefficients (only after sacla-dask structure)
    if "corr_psi" in ds:
        from .structure.plot import structure_figures

        if "group" in ds["corr_psi"].dims:  # a grouped store: each group's figures
            for g in range(ds.sizes["group"]):
                for name, fig in structure_figures(ds.isel(group=g), q_prof, angles).items():
                    save(f"{name}_group{g}", fig)
        else:
            for name, fig in structure_figures(ds, q_prof, angles).items():
                save(name, fig)

    # radial profile over the band (row means before normalisation)
    if "row_mean" in ds:
        rm = ds["row_mean"].load()
        fig, ax = plot_radial_profile(ds["q"].values, rm.isel(tag=bright).mean("tag").values,
                                      kind="q", radius=radius,
                                      label=f"bright shots ({int(bright.sum())})",
                                      ylabel="mean polar row intensity (detector units)")
        if (~bright).any():
            plot_radial_profile(ds["q"].values, rm.isel(tag=~bright).mean("tag").values,
                                kind="q", ax=ax, label=f"dark shots ({int((~bright).sum())})",
                                ylabel="mean polar row intensity (detector units)")
        ax.axvline(q_prof, color="k", ls="--", lw=1, label=f"profile q = {q_prof:.4g} 1/Å")
        ax.legend(fontsize="small")
        if "units" in rm.attrs:
            ax.set_ylabel(f"mean polar row intensity ({rm.attrs['units']})")
        save("radial_profile", fig)
    else:
        report.skipped["radial_profile"] = "the store has no row_mean"

    # pair statistics
    if "pair_stat" in ds:
        rej, thr = pair_rejection(ds)
        fig, _ = plot_pair_statistics(ds["pair_stat"].values, rej,
                                      tags=ds["pair_tag_a"].values if "pair_tag_a" in ds
                                      else None, threshold=thr)
        save("pair_statistics", fig)
    else:
        report.skipped["pair_statistics"] = "the store has no pair_stat"
    if "shot_intensity" in ds:  # selected, grouped or in photons (sacla_dask.shots)
        from .shots.figure import shot_quality

        save("shots", shot_quality(ds)[0])
    return report


def pair_rejection(ds: Any) -> tuple[np.ndarray | None, float | None]:
    """The pairs rejected as outliers and the threshold, as recorded in a store.

    Returns ``(rejected, threshold)``: ``rejected`` is the boolean
    ``pair_rejected`` variable, or None when the store has none or records
    that no rejection was applied (``reject_nsigma`` 0 and nothing
    rejected); ``threshold`` is ``pair_stat_threshold`` (a variable or an
    attribute), or None.
    """
    rejected = None
    if "pair_rejected" in ds:
        rej = np.asarray(ds["pair_rejected"].values, dtype=bool)
        applied = ds["pair_rejected"].attrs.get("reject_nsigma", None)
        if rej.any() or applied is None or float(applied) > 0:
            rejected = rej
    threshold = None
    if "pair_stat_threshold" in ds:
        threshold = float(np.asarray(ds["pair_stat_threshold"].values))
    else:
        for holder in ((ds["pair_rejected"].attrs if "pair_rejected" in ds else {}), ds.attrs):
            for k, v in holder.items():
                if "threshold" in k and isinstance(v, (int, float)) and not isinstance(v, bool):
                    threshold = float(v)
    if threshold is not None and not np.isfinite(threshold):
        threshold = None
    return rejected, threshold


def _plot_raw(ds: Any, srcs: list[str], shots: int, center: Any, radius: Any,
              attrs: dict[str, Any], save: Any, report: PlotReport) -> None:
    from .io.run import open_run

    run = open_run(srcs)
    tags = np.asarray(ds["tag"].values)
    bright_run = run.bright & np.isin(run.tags, tags)
    idx = np.flatnonzero(bright_run)[: max(1, int(shots))]
    if idx.size == 0:
        idx = np.arange(min(len(run), max(1, int(shots))))
    imgs = run.select(np.isin(np.arange(len(run)), idx)).images(chunks=int(idx.size))
    img = np.asarray(imgs.mean(axis=0).compute())
    mask = None
    mpath = attrs.get("mask") or ""
    note = ""
    if mpath:
        if os.path.exists(mpath):
            try:
                m = np.load(mpath, allow_pickle=False)
                mask = m.astype(bool) if m.shape == img.shape else None
            except (OSError, ValueError):
                mask = None
            if mask is None:
                note = f" (mask {mpath!r} unreadable or of another shape: not drawn)"
        else:
            note = f" (mask {mpath!r} not reachable: not drawn)"
    band = (radius[0], radius[-1]) if radius is not None and center is not None else None
    fig, _ = plot_image(img, mask, center=center, band=band,
                        title=f"run {attrs.get('run')}: mean of {idx.size} bright shot(s)")
    save("image", fig)
    if note:
        report.skipped["image mask"] = note.strip(" ()")
