"""Tests of ``sacla-dask center``: beam centre of a run, geometry YAML, picture, errors.

The runs are written by :func:`sacla_dask.io.synthetic.write_synthetic_run` with a
known beam centre and spotty powder rings (a weak continuous ring under many
random Bragg spots), so the centre, pixel size and wavelength asserted below
are the writer's truth, not values copied from a previous run of the code.
"""

from __future__ import annotations

import contextlib
import math

import h5py
import numpy as np
import pytest
import xarray as xr
import yaml
from click.testing import CliRunner

from sacla_dask.center import BrightMean, center_run
from sacla_dask.cli import main
from sacla_dask.errors import NoRingFoundError
from sacla_dask.io.run import DETECTOR
from sacla_dask.io.synthetic import panel_mask, write_synthetic_run

SHAPE = (256, 256)
CENTER = (124.62, 131.37)
RADII = (45.0, 90.0)
# 5 px off the truth in centre (3, 4), 2 px off in radius
GUESS = (CENTER[0] + 3.0, CENTER[1] + 4.0, RADII[1] - 2.0)


def _images(path: str, run: int) -> tuple[np.ndarray, list[int]]:
    """All detector images of a synthetic run file, read with h5py (tag order)."""
    with h5py.File(path, "r") as fh:
        grp = fh[f"run_{run}/{DETECTOR}"]
        tags = sorted(int(k[4:]) for k in grp if k.startswith("tag_"))
        return np.stack([grp[f"tag_{t}/detector_data"][()] for t in tags]), tags


def invoke(*args: str):
    return CliRunner().invoke(main, ["center", *map(str, args)])


@pytest.fixture(scope="module")
def spotty(tmp_path_factory):
    """20 tags (2 dark) of 256x256 images: weak rings under ~6 Bragg spots per ring and shot."""
    d = tmp_path_factory.mktemp("center_cli")
    truth = write_synthetic_run(d / "spotty.h5", n_tags=20, n_dark=2, shape=SHAPE,
                                center=CENTER, ring_radii=RADII, ring_width=1.5,
                                ring_amplitudes=(10.0, 10.0), spots=6, spot_amplitude=1500.0,
                                seed=12)
    mask_path = d / "mask.npy"
    np.save(mask_path, panel_mask(SHAPE, gap=4, edge=1, center=CENTER, beamstop=12.0))
    return truth, mask_path, d


@pytest.fixture(scope="module")
def centered(spotty):
    """One ``sacla-dask center`` run from a guess 5 px off, with --out and --plot."""
    truth, mask_path, d = spotty
    out, png = d / "geom.yaml", d / "center.png"
    res = invoke(truth.path, "--guess", *GUESS, "--mask", mask_path, "--distance", 0.053,
                 "--out", out, "--plot", png)
    return res, out, png


# -- the synthetic writer's spotty rings -----------------------------------------
def test_spotty_rings_are_spotty_and_on_the_rings(tmp_path):
    """The spots are added on the ring radii of bright shots only, and nowhere else."""
    kw = dict(n_tags=4, n_dark=1, shape=(128, 128), center=(60.4, 66.8), ring_radii=(25.0, 50.0),
              ring_width=1.5, modulation_amplitude=0.0, noise=False, seed=5)
    plain = write_synthetic_run(tmp_path / "plain.h5", **kw)
    write_synthetic_run(tmp_path / "spots.h5", spots=8, spot_amplitude=500.0, spot_width=1.0,
                        **kw)
    a, _ = _images(str(tmp_path / "plain.h5"), plain.run)
    b, _ = _images(str(tmp_path / "spots.h5"), plain.run)
    extra = b.astype(np.float64) - a
    np.testing.assert_array_equal(extra[0], 0)  # the dark shot has no spots
    yy, xx = np.indices((128, 128))
    r = np.hypot(xx - 60.4, yy - 66.8)
    near = np.min([np.abs(r - rk) for rk in (25.0, 50.0)], axis=0)
    for shot in extra[1:]:
        assert shot.min() >= -1e-3  # spots only add intensity
        assert shot.sum() > 8 * 2 * 100  # 16 spots of mean height 500, 2 pi sigma^2 each
        # all of it within the +/- 4 sigma stamp of a spot centred on a ring
        assert np.abs(shot[near > 5.5]).max() < 1e-3
        # the spot intensity is centred on the ring radius
        w = shot * (near < 5.5)
        for rk in (25.0, 50.0):
            on = np.abs(r - rk) < 5.5
            assert abs(np.sum(w[on] * r[on]) / np.sum(w[on]) - rk) < 0.3


def test_fixture_mean_image_is_spotty(spotty):
    """Guard of the test's meaning: the mean ring is far from uniform in azimuth."""
    truth, _, _ = spotty
    imgs, _ = _images(truth.path, truth.run)
    mean = imgs[2:].mean(axis=0)
    phi = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    x = np.rint(CENTER[0] + RADII[1] * np.cos(phi)).astype(int)
    y = np.rint(CENTER[1] + RADII[1] * np.sin(phi)).astype(int)
    ring = mean[y, x] - 5.0  # minus the writer's background
    assert ring.max() > 5 * np.median(ring)


# -- the command -----------------------------------------------------------------
def test_center_recovers_known_centre_from_guess_5px_off(centered, spotty):
    truth, mask_path, _ = spotty
    res, out, _ = centered
    assert res.exit_code == 0, res.output
    assert math.hypot(GUESS[0] - truth.center_x, GUESS[1] - truth.center_y) == pytest.approx(5)
    geo = yaml.safe_load(out.read_text())
    assert abs(geo["center_x"] - truth.center_x) < 0.2
    assert abs(geo["center_y"] - truth.center_y) < 0.2
    assert geo["radius"] == pytest.approx(RADII[1], abs=0.2)
    # the rest of the geometry: pixel size from the file's detector_info, the
    # distance as given, the wavelength from the bright shots' photon energy
    assert geo["pixel_size"] == pytest.approx(truth.pixel_size, rel=1e-9)
    assert geo["distance"] == 0.053
    assert geo["wavelength"] == pytest.approx(truth.wavelength, rel=1e-3)
    assert geo["mask"] == str(mask_path.resolve())
    # both methods are reported, with their disagreement
    out_text = res.output
    for key in ("circle fit", "ellipse", "sharpness", "disagreement"):
        assert key in out_text
    assert "mean of 18 of 18 bright shots" in out_text
    fit = geo["fit"]
    assert math.hypot(fit["sharpness_center_x"] - truth.center_x,
                      fit["sharpness_center_y"] - truth.center_y) < 0.2
    assert fit["disagreement_px"] == pytest.approx(
        math.hypot(fit["sharpness_center_x"] - geo["center_x"],
                   fit["sharpness_center_y"] - geo["center_y"]), abs=1e-9)
    assert f"{geo['center_x']:.3f}" in out_text and f"{geo['center_y']:.3f}" in out_text


def test_geometry_yaml_round_trips_into_process(centered, spotty, tmp_path):
    truth, _, _ = spotty
    _, geom, _ = centered
    geo = yaml.safe_load(geom.read_text())
    g = truth.geometry
    band = ["--qmin", repr(float(g.radius_to_q(80.0))), "--qmax", repr(float(g.radius_to_q(100.0)))]
    store = tmp_path / "from_geom.zarr"
    res = CliRunner().invoke(main, ["process", truth.path, "--geometry", str(geom), *band,
                                    "--out", str(store), "--workers", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    attrs = xr.open_zarr(store, consolidated=False).attrs
    assert attrs["complete"] is True
    for key in ("center_x", "center_y", "pixel_size", "distance", "wavelength"):
        assert attrs[key] == pytest.approx(geo[key], rel=1e-12), key
    assert attrs["mask"] == geo["mask"]
    # flags override the file (dry run: the plan's geometry line)
    res = CliRunner().invoke(main, ["process", truth.path, "--geometry", str(geom), *band,
                                    "--center", "100.25", "110.75", "--distance", "0.06",
                                    "--out", str(tmp_path / "unused.zarr"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "centre (100.25, 110.75) px" in res.output and "distance 60 mm" in res.output
    assert f"wavelength {geo['wavelength']:.4f} A" in res.output


def test_plot_writes_a_png(centered):
    res, _, png = centered
    assert res.exit_code == 0, res.output
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
    import matplotlib.image

    img = matplotlib.image.imread(str(png))
    assert img.shape[1] > 1.5 * img.shape[0]  # two panels side by side
    assert img[..., :3].std() > 0.05  # not blank


def test_max_shots_spreads_over_the_run_and_a_cluster_computes_the_same(spotty, tmp_path):
    truth, mask_path, _ = spotty
    out = tmp_path / "g4.yaml"
    res = invoke(truth.path, "--guess", *GUESS, "--mask", mask_path, "--max-shots", 4,
                 "--out", out, "--workers", 1)
    assert res.exit_code == 0, res.output
    assert "mean of 4 of 18 bright shots" in res.output
    assert "dask dashboard" in res.output  # the cluster path was taken
    geo = yaml.safe_load(out.read_text())
    assert geo["fit"]["shots"] == 4
    assert "distance" not in geo and "--distance" in res.output  # not known: not written
    assert math.hypot(geo["center_x"] - truth.center_x, geo["center_y"] - truth.center_y) < 0.3


# -- the library call the command makes ------------------------------------------
def test_center_run_returns_what_the_command_writes(centered, spotty):
    """center_run's result holds the truth, and the command writes exactly its geometry."""
    truth, mask_path, _ = spotty
    _, out, _ = centered
    entered = []

    @contextlib.contextmanager
    def scheduler():
        entered.append("in")
        yield
        entered.append("out")

    result = center_run(truth.path, guess=GUESS, mask=str(mask_path), distance=0.053,
                        compute_context=scheduler)
    assert entered == ["in", "out"]  # the mean, and only it, ran in the given context
    # the mean of the bright shots, recomputed here with h5py from the file
    imgs, tags = _images(truth.path, truth.run)
    bright_tags = truth.tags[truth.bright]
    assert result.mean.n_shots == result.mean.n_bright == bright_tags.size == 18
    np.testing.assert_array_equal(result.mean.tags, bright_tags)
    expected = imgs[np.isin(tags, bright_tags)].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(result.mean.image, expected, rtol=1e-12)
    assert math.hypot(result.circle.center_x - truth.center_x,
                      result.circle.center_y - truth.center_y) < 0.2
    assert result.pixel_size == pytest.approx(truth.pixel_size, rel=1e-9)
    assert result.wavelength == pytest.approx(truth.wavelength, rel=1e-3)
    assert result.wavelength_error is None and result.missing_geometry == []
    assert result.q_ring == pytest.approx(float(truth.geometry.radius_to_q(RADII[1])), rel=1e-3)
    assert result.mask_path == str(mask_path.resolve())
    assert yaml.safe_load(out.read_text()) == result.geometry_values()


def test_center_run_reports_the_mean_before_a_failing_fit(tmp_path):
    flat = write_synthetic_run(tmp_path / "flat.h5", n_tags=8, n_dark=2, shape=SHAPE,
                               center=CENTER, ring_radii=RADII, ring_amplitudes=(0.0, 0.0),
                               seed=3)
    seen: list[BrightMean] = []
    with pytest.raises(NoRingFoundError, match="no powder ring"):
        center_run(flat.path, on_mean=seen.append)
    assert len(seen) == 1 and seen[0].n_shots == 6 and seen[0].image.shape == SHAPE


def test_center_run_with_a_mask_array_records_no_mask_path(spotty, tmp_path):
    truth, mask_path, _ = spotty
    result = center_run([truth.path], guess=GUESS, mask=np.load(mask_path), max_shots=4,
                        wavelength=1.5)
    assert result.mask_path is None and result.mask is not None
    assert result.wavelength == 1.5 and result.missing_geometry == ["distance"]
    assert result.geometry is None and result.q_ring is None
    values = result.geometry_values()
    assert values["mask"] is None and values["distance"] is None
    assert values["fit"]["shots"] == 4 and values["fit"]["runs"] == [truth.path]
    out = tmp_path / "g.yaml"
    result.write_geometry(out)
    written = yaml.safe_load(out.read_text())
    assert "mask" not in written and "distance" not in written  # None is left out
    assert written["center_x"] == values["center_x"] and written["wavelength"] == 1.5


# -- errors ----------------------------------------------------------------------
def test_guess_off_the_detector_is_exit_2_naming_the_guess(spotty, tmp_path):
    truth, _, _ = spotty
    out = tmp_path / "never.yaml"
    res = invoke(truth.path, "--guess", 300, -20, 40, "--out", out)
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "x=300" in lines[0] and "y=-20" in lines[0] and "off the 256x256 detector" in lines[0]
    assert not out.exists()


def test_run_without_a_ring_is_exit_2_no_powder_ring(tmp_path):
    flat = write_synthetic_run(tmp_path / "flat.h5", n_tags=8, n_dark=2, shape=SHAPE,
                               center=CENTER, ring_radii=RADII, ring_amplitudes=(0.0, 0.0),
                               seed=3)
    out = tmp_path / "never.yaml"
    for guess in (["--guess", *GUESS], []):
        res = invoke(flat.path, *guess, "--out", out)
        assert res.exit_code == 2, res.output
        last = res.output.strip().splitlines()[-1]
        assert last.startswith("error: no powder ring")
        assert "Traceback" not in res.output
    assert not out.exists()


def test_bad_options_are_refused(spotty, tmp_path):
    truth, _, _ = spotty
    bad_mask = tmp_path / "bad_mask.npy"
    np.save(bad_mask, np.ones((10, 10), bool))
    res = invoke(truth.path, "--mask", bad_mask)
    assert res.exit_code == 2 and "mask" in res.output and "(10, 10)" in res.output
    res = invoke(truth.path, "--max-shots", 0)
    assert res.exit_code == 2 and "--max-shots" in res.output
    res = invoke(truth.path, "--distance", -1)
    assert res.exit_code == 2 and "--distance" in res.output


def test_help_has_units_and_an_example():
    res = CliRunner().invoke(main, ["center", "--help"])
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    for word in ("pixels", "metres", "Angstrom", "Example:", "sacla-dask center",
                 "--geometry", "--guess X Y R", "threaded"):
        assert word in text, word
