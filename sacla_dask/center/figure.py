"""The picture of a run's centre fit: the mean image with the ring, and its profile."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .run import CenterResult

__all__ = ["center_figure"]


def center_figure(result: CenterResult) -> Figure:
    """Two panels: the mean image with the fitted ring, and the radial profile.

    The left panel shows the mean bright image (masked pixels marked) with
    the circle fit's ring and centre, and the sharpness centre as a magenta
    circle; the right panel the masked radial profile about the fitted
    centre (intensity against radius in pixels) with the ring marked.

    Parameters
    ----------
    result : CenterResult
        From :func:`~sacla_dask.center.center_run`.

    Returns
    -------
    matplotlib.figure.Figure
        Not attached to pyplot (no window is opened); save it with
        ``savefig``.
    """
    from matplotlib.figure import Figure

    from ..plot import plot_image, plot_radial_profile

    c = result.circle
    fig = Figure(figsize=(13.0, 6.0), layout="constrained")
    ax_img, ax_prof = fig.subplots(1, 2, width_ratios=[1.0, 1.1])
    plot_image(result.mean.image, result.mask, fit=c, ax=ax_img,
               title=f"circle fit: centre ({c.center_x:.2f}, {c.center_y:.2f}) px, "
                     f"r = {c.radius:.2f} px")
    s = result.sharpness
    if s is not None:
        mark = ax_img.plot([s.center_x], [s.center_y], "o", mfc="none", mec="magenta", ms=14,
                           mew=1.5, zorder=6,
                           label=f"sharpness centre ({s.center_x:.2f}, {s.center_y:.2f}) px")
        old = ax_img.get_legend()  # plot_image's (with the masked-pixel patch)
        handles = [*(old.legend_handles if old is not None else []), *mark]
        ax_img.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.1),
                      ncols=2, fontsize="small", frameon=False)
    plot_radial_profile(c.profile_radius, c.profile_mean, ring=c.radius, ax=ax_prof,
                        label="masked mean about the fitted centre",
                        title=f"radial profile (ring FWHM {c.ring_fwhm:.2f} px)")
    mean = result.mean
    fig.suptitle(f"mean of {mean.n_shots} bright shots, run {', '.join(map(str, mean.run.runs))}")
    return fig
