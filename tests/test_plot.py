"""Figures render headless (Agg) with the right labels, ranges and overlays.

References are independent of the plotting code: analytic angles for the
pi tick labels, the synthetic run's known centre and ring radius, the q band
that was asked for, and the self-correlation cut defined as a fraction of
2 pi.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import dask
import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread
from matplotlib.patches import Circle

from sacla_dask import ParameterError, open_result, plan_run
from sacla_dask.io.synthetic import panel_mask, ring_image
from sacla_dask.plot import (
    format_pi,
    kept_dphi,
    plot_correlation,
    plot_correlation_profile,
    plot_image,
    plot_pair_statistics,
    plot_polar,
    plot_radial_profile,
    plot_result,
)
from sacla_dask.store import set_attrs

PI = math.pi


def render(fig: Figure, path: Path) -> np.ndarray:
    """Save as PNG, check the file is a real, non-blank image, return its pixels."""
    fig.savefig(path, dpi=60)
    assert path.stat().st_size > 2000
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert np.ptp(img[..., :3]) > 0.5, "the PNG is blank"
    return img


@pytest.fixture(scope="module")
def result(small_run, small_mask, tmp_path_factory):
    """The small synthetic run processed into a store (synchronous scheduler)."""
    d = tmp_path_factory.mktemp("plot")
    np.save(d / "mask.npy", small_mask)
    g = small_run.geometry
    with dask.config.set(scheduler="synchronous"):
        plan = plan_run(small_run.path, qmin=float(g.radius_to_q(34.0)),
                        qmax=float(g.radius_to_q(46.0)),
                        center=(small_run.center_x, small_run.center_y),
                        pixel_size=small_run.pixel_size, distance=small_run.distance,
                        mask=d / "mask.npy", out=d / "out.zarr")
        plan.execute()
    return d / "out.zarr"


def test_backend_is_headless():
    assert matplotlib.get_backend().lower() == "agg"


@pytest.mark.parametrize("value, label", [
    (0.0, "0"), (PI / 2, r"$\pi/2$"), (PI, r"$\pi$"), (3 * PI / 2, r"$3\pi/2$"),
    (2 * PI, r"$2\pi$"), (-PI / 2, r"$-\pi/2$"), (PI / 2 + 1e-9, r"$\pi/2$"),
])
def test_format_pi(value, label):
    assert format_pi(value) == label


def test_format_pi_other_step():
    assert format_pi(PI / 3, PI / 3) == r"$\pi/3$"
    assert format_pi(4 * PI / 3, PI / 3) == r"$4\pi/3$"


@pytest.mark.parametrize("cut", [0.0, 0.05, 0.1, 0.25])
def test_kept_dphi(cut):
    nphi = 360
    dphi = 2 * PI * np.arange(nphi) / nphi
    keep, lo, hi = kept_dphi(dphi, cut)
    assert lo == pytest.approx(2 * PI * cut) and hi == pytest.approx(2 * PI * (1 - cut))
    # one bin per degree: the cut drops 360*cut bins at the start, and those
    # above 360*(1-cut) degrees at the end
    k = round(360 * cut)
    expect = (np.arange(nphi) >= k) & (np.arange(nphi) <= nphi - k)
    np.testing.assert_array_equal(keep, expect)


@pytest.mark.parametrize("cut", [-0.1, 0.5, 0.7, "x"])
def test_bad_cut_is_a_clear_error(cut):
    with pytest.raises(ParameterError, match="cut"):
        kept_dphi(np.linspace(0, 2 * PI, 10, endpoint=False), cut)


def test_image_with_mask_centre_and_ring(small_run, small_mask, tmp_path):
    cx, cy = small_run.center_x, small_run.center_y
    img = ring_image(small_run.shape, (cx, cy), small_run.ring_radii, 1.5)
    fig, ax = plot_image(img, small_mask, center=(cx, cy), radius=40.0, band=(34.0, 46.0))
    render(fig, tmp_path / "image.png")
    ny, nx = small_run.shape
    assert ax.get_xlim() == (-0.5, nx - 0.5)
    assert ax.get_ylim() == (ny - 0.5, -0.5)  # row 0 on top, as on screen
    assert "px" in ax.get_xlabel() and "fast" in ax.get_xlabel()
    assert "px" in ax.get_ylabel() and "slow" in ax.get_ylabel()
    circles = sorted((p for p in ax.patches if isinstance(p, Circle)), key=lambda c: c.radius)
    assert [c.radius for c in circles] == [34.0, 40.0, 46.0]
    for c in circles:
        assert c.center == pytest.approx((cx, cy))
    centre = [ln for ln in ax.lines if ln.get_marker() == "+"]
    assert centre and centre[0].get_xydata()[0] == pytest.approx([cx, cy])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(f"masked ({int((~small_mask).sum())} px)" in t for t in labels)
    # the mask overlay: the second image is masked exactly where the mask is good
    overlay = ax.get_images()[1].get_array()
    np.testing.assert_array_equal(np.ma.getmaskarray(overlay), small_mask)


def test_image_from_a_center_fit(small_run, tmp_path):
    class Fit:  # the CenterFit interface: centre, radius and peak points
        center_x, center_y, radius = 60.0, 64.0, 20.0
        points = np.array([[80.0, 64.0], [60.0, 84.0], [40.0, 64.0]])
        rejected_points = np.array([[60.0, 30.0]])

    img = ring_image((128, 128), (60.0, 64.0), [20.0], 1.5)
    fig, ax = plot_image(img, fit=Fit(), log=True)
    render(fig, tmp_path / "fit.png")
    ring = [p for p in ax.patches if isinstance(p, Circle)]
    assert len(ring) == 1 and ring[0].radius == 20.0 and ring[0].center == (60.0, 64.0)
    offsets = [c.get_offsets() for c in ax.collections]
    assert any(np.allclose(o, Fit.points) for o in offsets)
    assert any(np.allclose(o, Fit.rejected_points) for o in offsets)


def test_image_bad_input():
    with pytest.raises(ParameterError, match="mask has shape"):
        plot_image(np.ones((8, 8)), np.ones((4, 4), bool))
    with pytest.raises(ParameterError, match="center"):
        plot_image(np.ones((8, 8)), radius=3.0)
    with pytest.raises(ParameterError, match="2-D"):
        plot_image(np.ones(8))


def test_polar_axes_in_pi_and_inverse_angstrom(result, tmp_path):
    ds = open_result(result)
    tag = int(ds.tag[ds.bright.values][0])
    fig, ax = plot_polar(ds.polar.sel(tag=tag), mask=ds.polar_mask.values)
    render(fig, tmp_path / "polar.png")
    assert "1/Å" in ax.get_ylabel() and ax.get_ylabel().startswith("q")
    assert "φ" in ax.get_xlabel() and "rad" in ax.get_xlabel()
    nphi = ds.sizes["phi"]
    half = PI / nphi
    assert ax.get_xlim() == pytest.approx((-half, 2 * PI - half))
    q = ds.q.values
    lo, hi = ax.get_ylim()
    assert lo < q[0] < q[1] and q[-2] < q[-1] < hi
    assert hi - lo == pytest.approx((q[-1] - q[0]) * len(q) / (len(q) - 1), rel=0.02)
    ticks = ax.get_xticks()
    ticks = ticks[(ticks >= ax.get_xlim()[0]) & (ticks <= ax.get_xlim()[1])]
    np.testing.assert_allclose(ticks, [0, PI / 2, PI, 3 * PI / 2])
    fig.canvas.draw()
    texts = [t.get_text() for t in ax.get_xticklabels()]
    assert r"$\pi$" in texts and r"$3\pi/2$" in texts
    # masked bins are masked in the drawn mesh (grey), good bins are not
    mesh = ax.collections[0]
    shown = np.ma.getmaskarray(mesh.get_array()).reshape(ds.polar_mask.shape)
    np.testing.assert_array_equal(shown, ~ds.polar_mask.values)


def test_polar_needs_coordinates_for_plain_arrays():
    with pytest.raises(ParameterError, match="q="):
        plot_polar(np.ones((3, 8)))
    fig, ax = plot_polar(np.ones((3, 8)), q=[1.0, 1.1, 1.2],
                         phi=2 * PI * np.arange(8) / 8)
    assert ax.get_ylim() == pytest.approx((0.95, 1.25))


@pytest.mark.parametrize("cut", [0.05, 0.1])
def test_correlation_map_leaves_out_the_self_correlation_edge(result, tmp_path, cut):
    ds = open_result(result)
    corr = ds.corr.load()
    fig, ax = plot_correlation(corr, cut=cut, mark_q=float(ds.q[5]))
    render(fig, tmp_path / "corr.png")
    assert ax.get_xlim() == pytest.approx((2 * PI * cut, 2 * PI * (1 - cut)))
    assert "1/Å" in ax.get_ylabel() and "Δφ" in ax.get_xlabel()
    # the mesh holds only the kept lags
    dphi = ds.dphi.values
    kept = (dphi >= 2 * PI * cut - 1e-9) & (dphi <= 2 * PI * (1 - cut) + 1e-9)
    mesh = ax.collections[0]
    assert mesh.get_array().size == ds.sizes["q"] * kept.sum()
    # symmetric colour scale set by the kept lags, far below the zero-lag
    # self-correlation that the cut removes
    vmin, vmax = mesh.get_clim()
    assert vmin == pytest.approx(-vmax)
    assert vmax <= np.abs(corr.values[:, kept]).max()
    assert vmax < 0.5 * corr.values[:, 0].max()
    assert any(ln.get_ydata()[0] == pytest.approx(float(ds.q[5])) for ln in ax.lines)


def test_correlation_profile_at_the_ring(result, small_run, tmp_path):
    ds = open_result(result)
    q_ring = float(small_run.ring_q()[1])
    fig, ax = plot_correlation_profile(ds.corr.load(), at=q_ring, sem=ds.corr_sem.load(),
                                       order=small_run.modulation_order)
    render(fig, tmp_path / "profile.png")
    line = ax.lines[0]
    x, y = line.get_xdata(), line.get_ydata()
    assert x.min() >= 2 * PI * 0.05 - 1e-9 and x.max() <= 2 * PI * 0.95 + 1e-9
    assert ax.get_xlim() == pytest.approx((0.1 * PI, 1.9 * PI))
    # the row shown is the store's row nearest the requested q
    i = int(np.argmin(np.abs(ds.q.values - q_ring)))
    np.testing.assert_allclose(y, ds.corr.values[i][np.isin(ds.dphi.values, x)])
    assert f"{ds.q.values[i]:.4g}" in line.get_label()
    # a 6-fold modulation: maxima at k 2pi/6, marked by the order lines
    marks = sorted(ln.get_xdata()[0] for ln in ax.lines[1:] if ln.get_linestyle() == ":")
    np.testing.assert_allclose(marks, [2 * PI * k / 6 for k in range(1, 6)])
    peak = x[np.argmax(y)]
    assert min(abs(peak - m) for m in marks) < 0.1
    assert "s.e.m." in " ".join(t.get_text() for t in ax.get_legend().get_texts())


def test_correlation_profile_band_mean():
    dphi = 2 * PI * np.arange(100) / 100
    corr = np.vstack([np.cos(3 * dphi), 3 * np.cos(3 * dphi)])
    fig, ax = plot_correlation_profile(corr, q=[1.0, 2.0], dphi=dphi, cut=0.1)
    x, y = ax.lines[0].get_xdata(), ax.lines[0].get_ydata()
    np.testing.assert_allclose(y, 2 * np.cos(3 * x))
    assert "mean over q" in ax.lines[0].get_label()


def test_radial_profile_in_pixels_with_ring(small_run, tmp_path):
    from sacla_dask.center import radial_profile

    cx, cy = small_run.center_x, small_run.center_y
    img = ring_image(small_run.shape, (cx, cy), small_run.ring_radii, 1.5,
                     amplitudes=[300.0, 1000.0])
    r, mean = radial_profile(img, panel_mask(small_run.shape), (cx, cy), r_max=60)
    fig, ax = plot_radial_profile(r, mean, ring=40.0, band=(34.0, 46.0), label="ideal rings")
    render(fig, tmp_path / "radial.png")
    assert ax.get_xlabel() == "radius (px)"
    x, y = ax.lines[0].get_xdata(), ax.lines[0].get_ydata()
    assert abs(x[np.nanargmax(y)] - 40.0) <= 1.0  # the bright ring where it was put
    ring = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    assert ring and ring[0].get_xdata()[0] == 40.0


def test_radial_profile_in_q_with_radius_axis(result, tmp_path):
    ds = open_result(result)
    prof = ds.row_mean.isel(tag=ds.bright.values).mean("tag").load()
    fig, ax = plot_radial_profile(prof)  # labelled: q and radius come from the coords
    render(fig, tmp_path / "radial_q.png")
    assert "1/Å" in ax.get_xlabel()
    sec = [c for c in ax.child_axes]
    assert sec and sec[0].get_xlabel() == "radius (px)"
    np.testing.assert_allclose(ax.lines[0].get_xdata(), ds.q.values)


def test_pair_statistics_accepted_and_rejected(tmp_path):
    stat = np.array([1.0, 1.1, 0.9, 5.0, 1.2, 7.0])
    rej = stat > 3
    tags = 1000 + 2 * np.arange(6)
    fig, ax = plot_pair_statistics(stat, rej, tags=tags, threshold=3.0)
    render(fig, tmp_path / "pairs.png")
    acc, bad = ax.lines[0], ax.lines[1]
    np.testing.assert_array_equal(acc.get_xdata(), tags[~rej])
    np.testing.assert_array_equal(bad.get_ydata(), stat[rej])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "accepted (4)" in labels and "rejected (2)" in labels
    assert any("threshold 3" in t for t in labels)
    assert "tag" in ax.get_xlabel()


def test_pair_statistics_without_rejection():
    fig, ax = plot_pair_statistics(np.array([0.1, 0.2, 0.15]))
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["all pairs (3; no rejection recorded)"]
    assert ax.get_xlabel() == "pair index"


def test_pair_statistics_log_scale_for_outliers():
    _, ax = plot_pair_statistics(np.array([1.0, 1.1, 500.0]))
    assert ax.get_yscale() == "log"


def test_draws_on_given_axes_without_pyplot():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    fig = Figure()
    a1, a2 = fig.subplots(1, 2)
    f, ax = plot_pair_statistics(np.ones(3), ax=a2)
    assert f is fig and ax is a2 and not a1.lines
    f, ax = plot_image(np.ones((4, 4)))  # a new figure, unknown to pyplot
    assert plt.get_fignums() == before


def test_plot_result_writes_every_png(result, tmp_path):
    ds = open_result(result)
    rep = plot_result(ds, tmp_path / "figs", dpi=60)
    assert set(rep.written) == {"image", "polar", "correlation", "correlation_profile",
                                "radial_profile", "pair_statistics"}
    assert not rep.skipped
    for path in rep.written.values():
        assert Path(path).stat().st_size > 5000
        assert np.ptp(imread(path)[..., :3]) > 0.5


def test_plot_result_skips_raw_image_when_the_run_is_gone(result, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(result, copy)
    set_attrs(copy, source=str(tmp_path / "moved_away.h5"))
    rep = plot_result(open_result(copy), tmp_path / "figs", dpi=60)
    assert "image" not in rep.written and "moved_away.h5" in rep.skipped["image"]
    assert "correlation" in rep.written


def test_plot_result_rejects_unknown_tag(result, tmp_path):
    with pytest.raises(ParameterError, match="tag 12 is not in the store"):
        plot_result(open_result(result), tmp_path, tag=12)


def test_pair_rejection_read_from_a_store_layout():
    import xarray as xr

    from sacla_dask.plot import pair_rejection

    stat = np.array([1.0, 1.2, 9.0, 0.9])
    rej = stat > 5
    ds = xr.Dataset({"pair_stat": ("pair", stat),
                     "pair_rejected": ("pair", rej, {"reject_nsigma": 3.0}),
                     "pair_stat_threshold": ((), 5.0)})
    got, thr = pair_rejection(ds)
    np.testing.assert_array_equal(got, rej)
    assert thr == 5.0
    # recorded as "no rejection applied": every pair is plotted as plain pairs
    ds2 = xr.Dataset({"pair_stat": ("pair", stat),
                      "pair_rejected": ("pair", np.zeros(4, bool), {"reject_nsigma": 0.0})})
    assert pair_rejection(ds2) == (None, None)
    # older stores without the variable
    assert pair_rejection(xr.Dataset({"pair_stat": ("pair", stat)})) == (None, None)


def test_plot_result_correlation_only_store(result, tmp_path):
    ds = open_result(result).drop_vars("polar")
    rep = plot_result(ds, tmp_path / "figs", dpi=40)
    assert "polar" not in rep.written and "no polar images" in rep.skipped["polar"]
    assert {"correlation", "correlation_profile", "pair_statistics"} <= set(rep.written)
