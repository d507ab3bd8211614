"""``sacla-dask center --tilt / --ring-q`` on a synthetic tilted run.

The run's images are drawn by pyFAI (independent of the code under test):
a ring Gaussian in 2-theta at a known q, times each pixel's solid angle
(pyFAI's ``solidAngleArray``), on a flat background, with Gaussian noise.
The truth is the geometry they were drawn with.
"""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from sacla_dask.center.poni import geometry_at_beam_center
from sacla_dask.cli import main
from sacla_dask.io.run import DETECTOR
from sacla_dask.io.synthetic import write_synthetic_run

pyFAI = pytest.importorskip("pyFAI")

SHAPE = (256, 256)
WAVELENGTH = 1.2
Q_RING = 1.15  # 1/A: 2theta = 12.61 deg, r ~ 89 px at 20 mm
#: the truth: 7.9 deg of tilt, the beam near the image centre
TRUTH = geometry_at_beam_center((128.4, 127.6), 5e-5, 0.02, WAVELENGTH, (0.11, -0.08, 0.0))


@pytest.fixture(scope="module")
def tilted_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ctilt")
    path = d / "tilted.h5"
    truth = write_synthetic_run(path, n_tags=6, n_dark=2, shape=SHAPE, noise=False,
                                ring_radii=(60.0,), photon_energy=12398.42 / WAVELENGTH,
                                seed=5)
    ai = TRUTH.to_pyfai(SHAPE)
    tth = ai.twoThetaArray(SHAPE)
    tth0 = 2 * math.asin(Q_RING * WAVELENGTH / (4 * math.pi))
    clean = 20 + 400 * np.exp(-0.5 * ((tth - tth0) / 0.004) ** 2) * ai.solidAngleArray()
    rng = np.random.default_rng(0)
    with h5py.File(path, "r+") as fh:
        grp = fh[f"run_{truth.run}/{DETECTOR}"]
        for name in grp:
            if name.startswith("tag_"):
                img = clean + rng.normal(0, 4.0, SHAPE)
                grp[f"{name}/detector_data"][...] = img.astype(np.float32)
    return path


def run(*args: str):
    return CliRunner().invoke(main, ["center", *map(str, args), "--skip-first", "2"])


def test_without_tilt_options_nothing_about_tilt(tilted_run):
    res = run(tilted_run, "--distance", "0.02")
    assert res.exit_code == 0, res.output
    assert "tilt" not in res.output and "refined" not in res.output


def test_tilt_prints_and_writes_the_ellipse_estimate(tilted_run, tmp_path):
    out = tmp_path / "t.yaml"
    res = run(tilted_run, "--distance", "0.02", "--tilt", "--out", out)
    assert res.exit_code == 0, res.output
    assert "ellipse implies rot1 = " in res.output and "or its mirror" in res.output
    geo = yaml.safe_load(out.read_text())
    # the estimate from the circle fit's ellipse: rotations to 0.01 rad, PONI to 5 px
    assert geo["rot1"] == pytest.approx(TRUTH.rot1, abs=0.01)
    assert geo["rot2"] == pytest.approx(TRUTH.rot2, abs=0.01)
    assert geo["rot3"] == 0.0 and geo["distance"] == 0.02
    assert geo["center_x"] == pytest.approx(TRUTH.center_x, abs=5)
    assert geo["center_y"] == pytest.approx(TRUTH.center_y, abs=5)


def test_ring_q_recovers_the_geometry_and_pyfai_agrees(tilted_run, tmp_path):
    out = tmp_path / "t.poni"
    res = run(tilted_run, "--distance", "0.021", "--ring-q", Q_RING, "--out", out)
    assert res.exit_code == 0, res.output
    assert "refined     : q = 1.15 1/A" in res.output
    ai = pyFAI.load(str(out))
    # tolerances (docs/geometry.md): measured errors 0.01 mm, 0.003 rad, 1.1 px, 0.06 px
    # (beam) -- above the printed statistical errors: the sector peaks of a tilted ring
    # carry a small systematic bias; the bounds are about twice the measured errors
    assert ai.dist == pytest.approx(TRUTH.distance, abs=5e-5)
    assert ai.rot1 == pytest.approx(TRUTH.rot1, abs=0.006)
    assert ai.rot2 == pytest.approx(TRUTH.rot2, abs=0.006)
    assert ai.rot3 == 0.0
    assert ai.poni2 / 5e-5 - 0.5 == pytest.approx(TRUTH.center_x, abs=2.5)
    assert ai.poni1 / 5e-5 - 0.5 == pytest.approx(TRUTH.center_y, abs=2.5)
    f2d = ai.getFit2D()  # the direct beam (pixel centres at i + 1/2)
    assert f2d["centerX"] - 0.5 == pytest.approx(128.4, abs=0.2)
    assert f2d["centerY"] - 0.5 == pytest.approx(127.6, abs=0.2)
    # pyFAI's own 2-theta of the ring's brightest pixels under the written geometry
    truth_tth = TRUTH.to_pyfai(SHAPE).twoThetaArray(SHAPE)
    tth0 = 2 * math.asin(Q_RING * WAVELENGTH / (4 * math.pi))
    ring = np.abs(truth_tth - tth0) < 0.0005
    q = 4 * np.pi / (ai.wavelength * 1e10) * np.sin(ai.twoThetaArray(SHAPE)[ring] / 2)
    print(np.abs(q - Q_RING).max(), np.median(q) - Q_RING)
    assert np.abs(q - Q_RING).max() < 4e-3 and abs(np.median(q) - Q_RING) < 1e-3


def test_bad_input(tilted_run, tmp_path):
    res = run(tilted_run, "--tilt")
    assert res.exit_code == 2 and "--tilt needs the distance" in res.output
    res = run(tilted_run, "--distance", "0.02", "--ring-q", "9.0")
    assert res.exit_code == 2 and "beyond the detector" in res.output
    res = run(tilted_run, "--ring-q", "20.0")
    assert res.exit_code == 2 and "not reachable" in res.output
    assert "Traceback" not in res.output


def test_ring_too_weak_and_no_wavelength(tilted_run, tmp_path):
    import shutil
    from types import SimpleNamespace

    from sacla_dask.cli import _center_tilt
    from sacla_dask.errors import ParameterError

    weak = tmp_path / "weak.h5"
    shutil.copy(tilted_run, weak)
    rng = np.random.default_rng(1)
    with h5py.File(weak, "r+") as fh:
        run_group = next(k for k in fh if k.startswith("run_"))
        grp = fh[f"{run_group}/{DETECTOR}"]
        for name in grp:
            if name.startswith("tag_"):
                grp[f"{name}/detector_data"][...] = (20 + rng.normal(0, 4.0, SHAPE)).astype(
                    np.float32)
    res = run(weak, "--distance", "0.02", "--ring-q", Q_RING)
    assert res.exit_code == 2 and "no powder ring found" in res.output
    assert "Traceback" not in res.output
    # the wavelength unknown (no --wavelength, no photon energy in the file)
    fake = SimpleNamespace(pixel_size=5e-5, wavelength=None, distance=0.02,
                           wavelength_error="no photon energy",
                           circle=SimpleNamespace(ellipse=object(), n_used=100))
    with pytest.raises(ParameterError, match="--ring-q needs the wavelength"):
        _center_tilt(fake, Q_RING)
