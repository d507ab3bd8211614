"""Shot quality over a run: each shot's intensity against its tag, by group or selection."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def shot_quality(ds: Any, ax: Axes | None = None) -> tuple[Figure, Axes]:
    """``shot_intensity`` (band mean of each shot) against the tag.

    Coloured by group (``shot_group``, labels from the ``groups`` attr) when
    the store is grouped, else selected vs not; dark shots grey. Returns
    ``(fig, ax)``.
    """
    if ax is None:
        fig = Figure(figsize=(8, 4), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.get_figure()  # type: ignore[assignment]
    tags = np.asarray(ds["tag"].values)
    y = np.asarray(ds["shot_intensity"].values, dtype=float)
    units = ds["shot_intensity"].attrs.get("units", "detector units")
    bright = np.asarray(ds["bright"].values, bool) if "bright" in ds else np.ones(tags.size, bool)
    selected = (np.asarray(ds["selected"].values, bool) if "selected" in ds else bright)
    x = tags - tags[0]
    ax.plot(x[~bright], y[~bright], "o", ms=3, color="0.6", label="dark")
    if "shot_group" in ds:
        grp = np.asarray(ds["shot_group"].values)
        labels = ds.attrs.get("groups", {}).get("labels", [])
        for g in range(int(grp.max()) + 1):
            m = grp == g
            ax.plot(x[m], y[m], "o", ms=3,
                    label=(labels[g] if g < len(labels) else f"group {g}") + f" ({m.sum()})")
        rest = bright & (grp < 0)
    else:
        ax.plot(x[selected], y[selected], "o", ms=3, color="C0",
                label=f"selected ({selected.sum()})")
        rest = bright & ~selected
    if rest.any():
        ax.plot(x[rest], y[rest], "x", ms=4, color="C3", label=f"not selected ({rest.sum()})")
    ax.set_xlabel(f"tag - {tags[0]}")
    ax.set_ylabel(f"mean intensity over the band ({units})")
    sel = ds.attrs.get("selection", {})
    title = "shot quality over the run"
    if isinstance(sel, dict) and sel.get("select"):
        title += f"  (select: {sel['select']})"
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small", loc="best")
    ax.grid(alpha=0.3)
    return fig, ax


__all__ = ["shot_quality"]


def group_profiles(ds: Any, q: float, cut: float = 0.05) -> Figure:
    """Each group's correlation profile at the row nearest ``q`` with its standard error,
    and their difference (two groups)."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    iq = int(np.argmin(np.abs(np.asarray(ds["q"].values) - q)))
    dphi = np.asarray(ds["dphi"].values)
    keep = (dphi >= cut * 2 * np.pi) & (dphi <= (1 - cut) * 2 * np.pi)
    labels = ds.attrs.get("groups", {}).get("labels", [])
    for g in range(ds.sizes["group"]):
        c = np.asarray(ds["corr"].values[g, iq])[keep]
        s = np.asarray(ds["corr_sem"].values[g, iq])[keep]
        lab = labels[g] if g < len(labels) else f"group {g}"
        ax.plot(dphi[keep], c, label=lab)
        ax.fill_between(dphi[keep], c - s, c + s, alpha=0.25)
    if "corr_diff" in ds:
        c = np.asarray(ds["corr_diff"].values[iq])[keep]
        s = np.asarray(ds["corr_diff_sem"].values[iq])[keep]
        ax.plot(dphi[keep], c, "k", lw=1.2, label=ds["corr_diff"].attrs.get("difference",
                                                                           "difference"))
        ax.fill_between(dphi[keep], c - s, c + s, color="k", alpha=0.15)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel("dphi (rad)")
    ax.set_ylabel("difference correlation C(q, q, dphi)")
    ax.set_title(f"each group at q = {float(ds['q'].values[iq]):.4g} 1/Å (± standard error)",
                 fontsize="medium")
    fig.legend(fontsize="small", loc="outside lower center", ncols=2)
    ax.grid(alpha=0.3)
    return fig


__all__ += ["group_profiles"]
