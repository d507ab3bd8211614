"""Unassembled MPCCD runs with a CrystFEL ``.geom`` (docs/geometry.md, "CrystFEL geometry").

The reference is the assembled run of the same physics: the synthetic writer
cuts the very same pixel values into 8 sensors placed exactly on the
assembled grid (two columns, the right one stored turned by 180 degrees),
so that an assembled run masked to the sensors and the 8-sensor run with its
``.geom`` must give the same polar images and correlation bin for bin
(tolerances derived in :func:`test_assembled_and_panels_give_the_same_correlation`).
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from sacla_dask.cli import main
from sacla_dask.crystfel import read_geom
from sacla_dask.errors import BadTagError, GeometryError, ParameterError
from sacla_dask.geometry import resolve_geometry, write_geometry_file
from sacla_dask.io.run import open_run
from sacla_dask.io.synthetic import write_synthetic_run
from sacla_dask.io.synthetic_panels import Panels, sensor_mask, sensor_rects
from sacla_dask.plan import plan_run, process_run

SHAPE = (130, 100)
KW = dict(n_tags=10, n_dark=2, shape=SHAPE, seed=5, ring_radii=(25.0, 40.0), ring_width=2.5)
BAND = dict(qmin=0.08, qmax=0.19)  # radius 20..47 px: both rings, across gaps and edges
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("panels")
    ta = write_synthetic_run(d / "assembled.h5", **KW)
    tp = write_synthetic_run(d / "panels.h5", panels=Panels(8), **KW)
    ts = write_synthetic_run(d / "stacked.h5", panels=Panels(8, per_sensor_data=False), **KW)
    mask = d / "sensors.npy"
    np.save(mask, sensor_mask(SHAPE, Panels(8)))
    return {"a": ta, "p": tp, "s": ts, "mask": str(mask), "dir": d}


def _geom(tmp_path, text: str, name: str = "bad.geom") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


GOOD = """; two panels in one stacked image
res = 20000
clen = 0.05
q1/min_fs = 0
q1/max_fs = 9
q1/min_ss = 0
q1/max_ss = 4
q1/fs = +1.0x +0.0y
q1/ss = +0.0x +1.0y
q1/corner_x = -5.0
q1/corner_y = -6.0
q2/min_fs = 0
q2/max_fs = 9
q2/min_ss = 5
q2/max_ss = 9
q2/fs = -1.0x +0.0y +0.1z
q2/ss = 0x -1y
q2/corner_x = 5.0
q2/corner_y = 6.0
q2/coffset = 0.001
"""


# -- reading unassembled runs --------------------------------------------------------
def test_stacked_image_holds_the_sensors(runs: dict) -> None:
    """The stacked image is the 8 sensors' datasets one below the other, each the very
    pixels of the assembled image (turned for the right column); windows read the same."""
    ra, rp = open_run(runs["a"].path), open_run(runs["p"].path)
    rects = sensor_rects(SHAPE, Panels(8))
    h, w = rects[0].h, rects[0].w
    assert rp.image_shape == (8 * h, w)
    assert rp.sources[0].sensors == tuple(f"detector_2d_{k}" for k in range(1, 9))
    a, p = ra.images().compute(), rp.images().compute()
    for r in rects:
        np.testing.assert_array_equal(p[:, r.index * h:(r.index + 1) * h],
                                      np.stack([r.take(x) for x in a]))
    win = rp.images(window=(slice(h - 3, 3 * h + 2), slice(4, w - 1))).compute()
    np.testing.assert_array_equal(win, p[:, h - 3:3 * h + 2, 4:w - 1])


def test_a_tag_missing_from_one_sensor_is_a_bad_tag(tmp_path) -> None:
    t = write_synthetic_run(tmp_path / "r.h5", n_tags=4, n_dark=0, shape=(40, 30),
                            panels=Panels(4), seed=1)
    with h5py.File(t.path, "a") as fh:
        del fh[f"run_{t.run}/detector_2d_3/tag_{t.tags[1]}/detector_data"]
    with pytest.raises(BadTagError, match=r"detector_2d_3/tag_\d+"):
        open_run(t.path)
    with pytest.warns(UserWarning, match="bad tag"):
        run = open_run(t.path, on_bad_tag="skip")
    assert len(run) == 3 and t.tags[1] not in run.tags


# -- the layout ---------------------------------------------------------------------
def test_geom_places_each_pixel_where_the_assembled_image_has_it(runs: dict) -> None:
    """Lab position / pixel of every stacked pixel = (row - cy, col - cx) of the assembled
    pixel it was cut from: corners, half pixels, flipped sensors and stacking all right."""
    t = runs["p"]
    cg = read_geom(t.geom)
    layout = cg.layout(open_run(t.path).image_shape, 8)
    for r, panel in zip(sensor_rects(SHAPE, Panels(8)), layout.panels, strict=True):
        ss, fs = np.mgrid[:r.h, :r.w]
        pos = panel.positions(ss, fs) / t.pixel_size
        rows = r.y0 + (r.h - 1 - ss if r.flipped else ss)
        cols = r.x0 + (r.w - 1 - fs if r.flipped else fs)
        np.testing.assert_allclose(pos[..., 0], rows - t.center_y, atol=1e-9)
        np.testing.assert_allclose(pos[..., 1], cols - t.center_x, atol=1e-9)
        np.testing.assert_allclose(pos[..., 2] * t.pixel_size, t.distance, rtol=1e-12)
    # Cheetah's convention (no data paths, min_ss in the stacked image): the same panels
    stacked = read_geom(runs["s"].geom).layout(layout.shape, 8)
    assert stacked.key() == layout.key()


def test_geom_keys_defaults_z_and_masks(tmp_path) -> None:
    """Global keys are defaults, z components and coffset count, bad regions (lab x/y and
    fs/ss), no_index and HDF5 masks (mask_good/mask_bad bits) mask the right pixels."""
    mfile = tmp_path / "m.h5"
    bits = np.zeros((10, 10), np.uint16)
    bits[7, 2] = 4  # bad bit in q2
    with h5py.File(mfile, "w") as fh:
        fh["mask"] = bits
    text = GOOD + ("q2/mask_file = m.h5\nq2/mask = /mask\nq2/mask_bad = 0x4\n"
                   "badregionA/min_x = -5.6\nbadregionA/max_x = -3.4\n"
                   "badregionA/min_y = -6\nbadregionA/max_y = -5\n"
                   "badregionB/panel = q2\nbadregionB/min_fs = 8\nbadregionB/max_fs = 20\n"
                   "badregionB/min_ss = 9\nbadregionB/max_ss = 9\n")
    cg = read_geom(_geom(tmp_path, text, "good.geom"))
    assert cg.pixel_size == 5e-5 and cg.distance == pytest.approx(0.0505)
    layout = cg.layout((10, 10))
    q1, q2 = layout.panels
    assert (q2.row0, q2.col0, q2.nss, q2.nfs) == (5, 0, 5, 10)
    np.testing.assert_allclose(q1.origin, [-5.5 * 5e-5, -4.5 * 5e-5, 0.05])
    np.testing.assert_allclose(q2.fs, [0, -5e-5, 0.1 * 5e-5])
    np.testing.assert_allclose(q2.origin, [5.5 * 5e-5, 4.5 * 5e-5, 0.051 + 0.05 * 5e-5])
    good = cg.mask(layout)
    assert good is not None
    bad = set(zip(*np.nonzero(~good), strict=True))
    # region A: pixel centres x in -4.5.. (fs 0, 1), y = -5.5 (ss 0) of q1
    assert {(0, 0), (0, 1)} <= bad
    assert {(9, 8), (9, 9), (7, 2)} <= bad  # region B (q2 ss 9 -> row 9), the HDF5 mask
    assert len(bad) == 5
    cg2 = read_geom(_geom(tmp_path, GOOD + "q1/no_index = 1\n", "noindex.geom"))
    g2 = cg2.mask(cg2.layout((10, 10)))
    assert g2 is not None and not g2[:5].any() and g2[5:].all()


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: t.replace("q1/corner_x = -5.0\n", ""), r"lacks q1/corner_x"),
    (lambda t: t.replace("clen = 0.05", ""), r"lacks clen \(or q1/clen\)"),
    (lambda t: t.replace("q1/max_fs = 9", "q1/max_fs = nine"), r"q1/max_fs must be a number"),
    (lambda t: t.replace("q1/max_fs = 9", "q1/max_fs = 9.5"), r"q1/max_fs must be a whole"),
    (lambda t: t.replace("q2/fs = -1.0x +0.0y +0.1z", "q2/fs = -1.0q"),
     r"q2/fs must be a vector"),
    (lambda t: t.replace("clen = 0.05", "clen = /LCLS/detector0-EncoderValue"),
     r"clen must be a number of metres"),
    (lambda t: t.replace("q1/min_ss = 0", "q1/min_ss = 7"), r"min_ss 7, max_ss 4"),
    (lambda t: "res = 1\nclen = 1\n", r"defines no panel"),
    (lambda t: t + "oops\n", r"line \d+: 'oops' is not 'key = value'"),
    (lambda t: t + "q2/mask = /m\n", r"q2/mask '/m' is in the data files"),
])
def test_bad_geom_files_are_refused_naming_file_and_key(tmp_path, change, message) -> None:
    path = _geom(tmp_path, change(GOOD))
    with pytest.raises(GeometryError, match=message) as info:
        read_geom(path)
    assert "bad.geom" in str(info.value)


@pytest.mark.parametrize(("change", "shape", "sensors", "message"), [
    (lambda t: t.replace("q2/min_ss = 5", "q2/min_ss = 3"), (10, 10), None, "overlap"),
    (lambda t: t.replace("q2/max_ss = 9", "q2/max_ss = 10"), (10, 10), None,
     r"panel 'q2' \(rows 5..10.*lies off the 10x10 data"),
    (lambda t: t.replace("q1/max_ss = 4", "q1/max_ss = 5").replace("q2/min_ss = 5",
                                                                  "q2/min_ss = 6"),
     (10, 10), 2, r"panel 'q1' \(min_ss 0, max_ss 5\) spans two sensor datasets"),
    (lambda t: t + "q2/data = /%/detector_2d_2/%/detector_data\n", (10, 10), 2,
     r"panel 'q2' \(max_ss 9, max_fs 9\) is larger than its dataset detector_2d_2 \(5x10\)"),
    (lambda t: t + "q2/data = /%/detector_2d_3/%/detector_data\n", (10, 10), 2,
     r"q2/data names sensor detector_2d_3; the run has detector_2d_1..2"),
    (lambda t: t + "q2/data = /%/detector_2d_2/%/detector_data\n", (10, 10), None,
     r"the run's images are assembled"),
])
def test_geom_not_fitting_the_run_is_refused(tmp_path, change, shape, sensors, message) -> None:
    cg = read_geom(_geom(tmp_path, change(GOOD)))
    with pytest.raises(GeometryError, match=message) as info:
        cg.layout(shape, sensors)
    assert "bad.geom" in str(info.value)


def test_geom_with_other_geometry_and_missing_file(tmp_path, runs: dict) -> None:
    geom = runs["p"].geom
    with pytest.raises(ParameterError, match=r"--center cannot be used with the CrystFEL"):
        resolve_geometry(geom=geom, center=(1.0, 2.0))
    yml = tmp_path / "g.yaml"
    write_geometry_file(yml, {"geom": os.path.relpath(geom, tmp_path), "distance": 0.1})
    with pytest.raises(ParameterError, match=r"distance cannot be used .*\(from geometry file"):
        resolve_geometry(yml)
    write_geometry_file(yml, {"geom": geom, "wavelength": 1.5})
    spec, _ = resolve_geometry(yml)
    assert spec.panels is not None and spec.wavelength == 1.5
    assert spec.pixel_size == runs["p"].pixel_size and spec.distance == runs["p"].distance
    with pytest.raises(ParameterError, match="does not exist"):
        resolve_geometry(geom=tmp_path / "nope.geom")
    with pytest.raises(GeometryError, match=r"is unassembled \(8 sensors .*--geom"):
        plan_run(runs["p"].path, center=(50, 60), pixel_size=5e-5, distance=0.05, **BAND)


# -- the same physics, assembled and in panels ------------------------------------------------
@pytest.mark.parametrize("method", ["nearest", "bilinear", "splitting"])
def test_assembled_and_panels_give_the_same_correlation(runs: dict, tmp_path,
                                                        method: str) -> None:
    """The 8-sensor run with its .geom gives the assembled run's polar images and
    correlation (the assembled run masked to the sensors).

    Tolerance. The panels lie exactly on the assembled grid, so both operators
    sample every bin at the same points: untilted ``x = cx + r cos phi``, the
    panels a ray-plane intersection, equal to ~1e-13 px. ``nearest`` therefore
    takes the same pixel for every bin (a sample would need to fall within
    1e-13 px of a pixel edge to differ) with weight 1: bit-identical polar
    images and correlation. ``bilinear`` and ``splitting`` take the same pixels
    with weights equal to ~1e-13 relative, but build them in another order; each
    polar value is a float32 sum of at most a few tens of weighted pixels, so
    it may differ by a few float32 roundings: we allow 8 eps32 of the band's
    largest value (|diff| <= 8 * 1.19e-7 * max). The correlation adds the FFT's
    rounding (~log2(nphi) eps) on normalised values: 32 eps32 of its largest
    value. Polar masks must agree, and coverage where the bins are valid (a
    ``bilinear`` bin centre in a gap within a pixel of a sensor keeps part of the
    edge pixel's weight on the assembled grid, none off a panel: below 1/2 either
    way, so such bins are invalid in both).
    """
    a, p = runs["a"], runs["p"]
    da_ = process_run(a.path, tmp_path / "a.zarr", center=(a.center_x, a.center_y),
                      pixel_size=a.pixel_size, distance=a.distance, mask=runs["mask"],
                      method=method, **BAND)
    spec, _ = resolve_geometry(geom=p.geom)
    dp = process_run(p.path, tmp_path / "p.zarr", geometry=spec, method=method, **BAND)
    assert dp.attrs["geom"] == p.geom and dp.attrs["n_panels"] == 8
    np.testing.assert_array_equal(da_["polar_mask"].values, dp["polar_mask"].values)
    pm = dp["polar_mask"].values
    cov_a, cov_p = da_["coverage"].values, dp["coverage"].values
    np.testing.assert_allclose(cov_a[pm], cov_p[pm], atol=1e-12)
    # (bilinear: a bin centre in a gap, within a pixel of a sensor, keeps the edge pixel's
    # weight < 1/2 on the assembled grid and none off a panel: invalid either way)
    assert (cov_a[~pm] < 0.5).all() and (cov_p[~pm] < 0.5).all()
    assert 0.5 < pm.mean() < 0.9  # gaps and edges do cut the band (77 % valid)
    pa, pp = da_["polar"].values, dp["polar"].values
    ca, cp = da_["corr"].values, dp["corr"].values
    assert np.isfinite(ca).sum() > 0.5 * ca.size
    if method == "nearest":
        np.testing.assert_array_equal(pa, pp)
        np.testing.assert_array_equal(ca, cp)
    else:
        assert np.nanmax(np.abs(pa - pp)) <= 8 * EPS32 * np.nanmax(np.abs(pa))
        both = np.isfinite(ca) & np.isfinite(cp)
        np.testing.assert_array_equal(np.isfinite(ca), np.isfinite(cp))
        assert np.max(np.abs(ca - cp)[both]) <= 32 * EPS32 * np.max(np.abs(ca[both]))


# -- info and center ----------------------------------------------------------------
def invoke(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return res.exit_code, res.output


def test_info_describes_the_layout(runs: dict) -> None:
    code, out = invoke("info", runs["p"].path)
    assert code == 0
    assert ("layout     : unassembled: 8 sensors of 28 x 47 px (detector_2d_1..detector_2d_8), "
            "read as one 224 x 47 stacked image") in out
    code, out = invoke("info", runs["a"].path)
    assert "layout     : assembled (detector_2d_assembled_1)" in out


def test_center_on_panels_finds_the_beam_and_shifts_the_geom(runs: dict, tmp_path) -> None:
    """The centre fitted on the panels drawn on a lab grid is the assembled run's fit,
    expressed as the beam's offset in the .geom's frame; --out x.geom shifts the corners
    by it, and processing with the shifted .geom matches the geometry file's centre."""
    a, p = runs["a"], runs["p"]
    code, out_a = invoke("center", a.path, "--mask", runs["mask"])
    assert code == 0
    fixed = tmp_path / "fixed.geom"
    code, out = invoke("center", p.path, "--geom", p.geom, "--out", str(fixed))
    assert code == 0, out
    line = next(s for s in out_a.splitlines() if s.startswith("circle fit"))
    cx = float(line.split("x = ")[1].split()[0])
    cy = float(line.split("y = ")[1].split()[0])
    off = next(s for s in out.splitlines() if s.startswith("panels"))
    bx, by = (float(v) for v in off.split("(")[1].split(")")[0].split(","))
    assert bx == pytest.approx(cx - a.center_x, abs=2e-3)
    assert by == pytest.approx(cy - a.center_y, abs=2e-3)
    assert "16 corners shifted" in out
    g0, g1 = read_geom(p.geom), read_geom(fixed)
    for q0, q1 in zip(g0.panels, g1.panels, strict=True):
        assert q1.corner_x == pytest.approx(q0.corner_x - bx, abs=1e-3)
        assert q1.corner_y == pytest.approx(q0.corner_y - by, abs=1e-3)
    code, out = invoke("center", p.path)
    assert code != 0 and "--geom" in out
    code, out = invoke("center", p.path, "--geom", p.geom, "--out", str(tmp_path / "g.yaml"))
    assert code != 0 and "give a name ending in .geom" in out


def test_process_cli_with_geom(runs: dict, tmp_path) -> None:
    p = runs["p"]
    code, out = invoke("process", p.path, "--geom", p.geom, "--qmin", "0.08", "--qmax", "0.19",
                       "--out", str(tmp_path / "o.zarr"), "--no-progress")
    assert code == 0, out
    assert f"8 panels of {p.geom}" in out
    ds = xr.open_zarr(tmp_path / "o.zarr")
    assert ds.attrs["geom"] == p.geom
