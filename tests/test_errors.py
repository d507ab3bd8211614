"""Bad input and faults: a clear error naming the file, tag or parameter, nothing half-written.

Each test here backs one row of the README table "When something is wrong". The API
raises a class from :mod:`sacla_dask.errors`; the CLI exits with code 2 and prints one
``error: ...`` line on stderr, with no traceback unless ``--debug``.

Faults during the write (disk full, a killed process) are simulated: the Zarr store's
``set`` is patched to raise ``OSError(ENOSPC)`` (or to SIGKILL the process) after a
given number of writes, and, where the machine allows it (root and ``mount``), a
really full tmpfs is used.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

import sacla_dask as sd
from sacla_dask.cli import main
from sacla_dask.errors import (
    BadTagError,
    GeometryError,
    IncompleteStoreError,
    LayoutError,
    MaskError,
    OutputError,
    PairingError,
    ParameterError,
    RunFileError,
    SaclaDaskError,
)
from sacla_dask.io.run import DETECTOR, open_run
from sacla_dask.io.synthetic import write_synthetic_run
from sacla_dask.plan import plan_run
from sacla_dask.store import store_state

SHAPE = (64, 64)
CENTER = (33.0, 30.0)
N_TAGS = 10


# -- fixtures and helpers ------------------------------------------------------
@pytest.fixture(scope="module")
def run64(tmp_path_factory):
    """10 tags (2 dark) of 64x64 images, rings at r = 10 and 20 px."""
    path = tmp_path_factory.mktemp("errors") / "run64.h5"
    return write_synthetic_run(path, n_tags=N_TAGS, n_dark=2, shape=SHAPE, center=CENTER,
                               ring_radii=(10.0, 20.0), ring_width=1.5, seed=4)


@pytest.fixture(scope="module")
def geo(run64):
    """plan_run geometry keywords for ``run64``; a band at r = 15..25 px."""
    g = run64.geometry
    return dict(qmin=float(g.radius_to_q(15.0)), qmax=float(g.radius_to_q(25.0)),
                center=CENTER, pixel_size=run64.pixel_size, distance=run64.distance)


def cli_args(geo: dict, *extra: str) -> list[str]:
    """``sacla-dask process`` geometry flags for ``geo``."""
    return ["--qmin", repr(geo["qmin"]), "--qmax", repr(geo["qmax"]),
            "--center", str(geo["center"][0]), str(geo["center"][1]),
            "--pixel-size", repr(geo["pixel_size"]), "--distance", repr(geo["distance"]),
            *extra]


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_cli_error(result, *needles: str) -> str:
    """Exit code 2, one ``error: ...`` line naming ``needles``, no traceback."""
    err = result.stderr
    assert result.exit_code == 2, (result.exit_code, result.output, err, result.exception)
    assert "Traceback" not in err and "Traceback" not in result.stdout
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    # the error is the last thing printed, on one line
    assert err.rstrip("\n").splitlines()[-1] == lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def edited_copy(src: str, dst: Path, edit) -> str:
    """A copy of the run file ``src`` with ``edit(h5file, run_group)`` applied."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as fh:
        run = int(fh["file_info/run_number_list"][0])
        edit(fh, fh[f"run_{run}"])
    return str(dst)


def replace_image(tag: int, data: np.ndarray):
    def edit(fh, g):
        grp = g[f"{DETECTOR}/tag_{tag}"]
        del grp["detector_data"]
        grp["detector_data"] = data
    return edit


# -- the run file ----------------------------------------------------------------
def test_file_missing(tmp_path):
    p = tmp_path / "run_1.h5"
    with pytest.raises(RunFileError, match=r"run_1\.h5.* does not exist"):
        open_run(p)
    assert_cli_error(run_cli("info", str(p)), "run_1.h5", "does not exist")


def test_file_not_hdf5(tmp_path):
    p = tmp_path / "notes.h5"
    p.write_text("tag,intensity\n1,2\n" * 50)
    with pytest.raises(RunFileError, match=r"notes\.h5.*not an HDF5 file"):
        open_run(p)
    assert_cli_error(run_cli("info", str(p)), "notes.h5", "not an HDF5 file")


def test_file_empty(tmp_path):
    p = tmp_path / "empty.h5"
    p.write_bytes(b"")
    with pytest.raises(RunFileError, match=r"empty\.h5.*empty \(0 bytes\)"):
        open_run(p)


def test_file_truncated(run64, tmp_path, geo):
    """A real run file cut in half (an interrupted copy)."""
    p = tmp_path / "cut.h5"
    data = Path(run64.path).read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(RunFileError, match=r"cut\.h5.*truncated"):
        open_run(p)
    with pytest.raises(RunFileError, match=r"cut\.h5.*truncated"):
        plan_run(p, **geo)
    assert_cli_error(run_cli("process", str(p), "--out", str(tmp_path / "o.zarr"),
                             *cli_args(geo)), "cut.h5", "truncated")
    assert not (tmp_path / "o.zarr").exists()


def test_hdf5_without_sacla_layout(tmp_path):
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as fh:
        fh["entry/data"] = np.zeros((4, 4))
    with pytest.raises(LayoutError, match=r"other\.h5.*not a SACLA DataConvert file"):
        open_run(p)
    assert_cli_error(run_cli("info", str(p)), "other.h5", "/file_info/run_number_list")


def test_debug_shows_the_traceback(tmp_path):
    p = tmp_path / "nope.h5"
    res = run_cli("--debug", "info", str(p))
    assert res.exit_code != 0
    assert isinstance(res.exception, RunFileError)   # propagated, not turned into a line


def test_cli_error_in_a_real_process(tmp_path):
    """The installed entry point, not the test runner: one line on stderr, exit code 2."""
    p = tmp_path / "nope.h5"
    proc = subprocess.run([sys.executable, "-m", "sacla_dask.cli", "info", str(p)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: run file {str(p)!r} does not exist"]


# -- shots and pairs ---------------------------------------------------------------
@pytest.mark.parametrize("n_bright", [0, 1])
def test_too_few_bright_shots(tmp_path, geo, n_bright):
    t = write_synthetic_run(tmp_path / "dark.h5", n_tags=6, n_dark=6 - n_bright, shape=SHAPE,
                            center=CENTER, ring_radii=(20.0,))
    msg = f"at least two bright shots.* has {n_bright} bright of 6 tags"
    with pytest.raises(PairingError, match=msg):
        plan_run(t.path, wavelength=1.44, **geo)
    # without a wavelength (taken from the photon energy of the shots) the message must
    # still be about the missing bright shots
    with pytest.raises(PairingError, match=msg):
        plan_run(t.path, **geo)
    assert_cli_error(run_cli("process", t.path, "--out", str(tmp_path / "o.zarr"),
                             "--wavelength", "1.44", *cli_args(geo)), "bright")


def test_pairs_file_not_json(run64, tmp_path, geo):
    p = tmp_path / "pairs.json"
    p.write_text("[[166762150, 166762152], [166762154")
    with pytest.raises(PairingError, match=r"pairs\.json.* not valid JSON"):
        plan_run(run64.path, pairs=p, **geo)
    assert_cli_error(run_cli("process", run64.path, "--out", str(tmp_path / "o.zarr"),
                             "--pairs", str(p), *cli_args(geo)), "pairs.json", "not valid JSON")


def test_pairs_file_wrong_structure(run64, tmp_path, geo):
    p = tmp_path / "pairs.json"
    p.write_text(json.dumps({"pairs": [[1, 2]]}))
    with pytest.raises(PairingError, match=r"pairs\.json.* list of \[tagA, tagB\]"):
        plan_run(run64.path, pairs=p, **geo)
    p.write_text(json.dumps([[1, 2, 3]]))
    with pytest.raises(PairingError, match=r"pairs\.json.*entry 0"):
        plan_run(run64.path, pairs=p, **geo)


def test_pairs_naming_missing_tags_are_skipped_and_counted(run64, tmp_path, geo):
    t = run64.tags
    p = tmp_path / "pairs.json"
    p.write_text(json.dumps([[int(t[3]), int(t[4])], [1, 2], [f"tag_{t[5]}", 99]]))
    plan = plan_run(run64.path, pairs=p, **geo)
    assert plan.ia.size == 1 and plan.n_pairs_dropped == 2
    assert "2 dropped" in repr(plan)
    ds = plan.dataset()
    assert int(ds["n_pairs"]) == 1 and ds.attrs["n_pairs_dropped"] == 2
    assert ds["pair_tag_a"].values.tolist() == [t[3]]


def test_pairs_all_missing(run64, tmp_path, geo):
    p = tmp_path / "pairs.json"
    p.write_text(json.dumps([[1, 2], [3, 4]]))
    with pytest.raises(PairingError, match=r"none of the 2 pairs in .*pairs\.json.*in the run"):
        plan_run(run64.path, pairs=p, **geo)
    assert_cli_error(run_cli("process", run64.path, "--out", str(tmp_path / "o.zarr"),
                             "--pairs", str(p), *cli_args(geo)), "pairs.json", "none of the 2")


# -- tags and pixels -----------------------------------------------------------------
def test_tag_without_detector_data(run64, tmp_path, geo):
    tag = int(run64.tags[4])
    p = edited_copy(run64.path, tmp_path / "nodata.h5",
                    lambda fh, g: g[f"{DETECTOR}/tag_{tag}"].__delitem__("detector_data"))
    with pytest.raises(BadTagError, match=rf"nodata\.h5.* tag {tag}\b.*no detector_data"):
        open_run(p)
    assert_cli_error(run_cli("process", p, "--out", str(tmp_path / "o.zarr"), *cli_args(geo)),
                     "nodata.h5", f"tag {tag}", "detector_data")
    # on_bad_tag="skip": the run goes on without it, the tag is listed
    with pytest.warns(UserWarning, match=f"tag {tag}"):
        run = open_run(p, on_bad_tag="skip")
    assert tag not in run.tags and len(run) == N_TAGS - 1
    assert any(str(tag) in m for m in run.bad_tags)


@pytest.mark.parametrize("what,data,msg", [
    ("3-D", np.zeros((2,) + SHAPE, np.float32), r"shape \(2, 64, 64\), expected a 2-D image"),
    ("strings", np.full(SHAPE, b"x", dtype="S1"), r"type \|S1, expected numbers"),
    ("other shape", np.zeros((32, 64), np.float32), r"shape \(32, 64\), but other tags have"),
])
def test_tag_dataset_wrong_shape_or_dtype(run64, tmp_path, what, data, msg):
    tag = int(run64.tags[6])
    p = edited_copy(run64.path, tmp_path / "bad.h5", replace_image(tag, data))
    with pytest.raises(BadTagError, match=rf"bad\.h5.* tag {tag}\b.*detector_data has {msg}"):
        open_run(p)
    with pytest.warns(UserWarning, match=f"tag {tag}"):
        run = open_run(p, on_bad_tag="skip")
    assert tag not in run.tags and len(run) == N_TAGS - 1


def test_nonfinite_pixels_masked_counted_not_propagated(run64, tmp_path, geo):
    """NaN/inf pixels: their polar bins are counted in ``nonfinite_bins`` and left out of
    the row mean; nothing else changes and the correlation stays finite."""
    i = 5                                              # a bright shot
    tag = int(run64.tags[i])
    bad_pixels = [(30, 33 + 20), (30 + 18, 33), (10, 10)]   # on the band, on the band, off it
    with h5py.File(run64.path) as fh:
        img = fh[f"run_{run64.run}/{DETECTOR}/tag_{tag}/detector_data"][()]
    dirty = img.copy()
    for (y, x), v in zip(bad_pixels, (np.nan, np.inf, -np.inf), strict=True):
        dirty[y, x] = v
    p = edited_copy(run64.path, tmp_path / "nan.h5", replace_image(tag, dirty))
    clean = plan_run(run64.path, **geo).dataset().compute()
    ds = plan_run(p, **geo).dataset().compute()

    # independent expectation: which good nearest-neighbour bins sample a bad pixel
    r, phi = np.meshgrid(ds["radius"].values, ds["phi"].values, indexing="ij")
    ix = np.rint(CENTER[0] + r * np.cos(phi)).astype(int)
    iy = np.rint(CENTER[1] + r * np.sin(phi)).astype(int)
    pm = ds["polar_mask"].values
    hit = np.zeros(pm.shape, bool)
    for y, x in bad_pixels:
        hit |= (iy == y) & (ix == x)
    hit &= pm
    assert hit.sum() >= 2
    expected = np.zeros(N_TAGS, np.int64)
    expected[i] = hit.sum()
    np.testing.assert_array_equal(ds["nonfinite_bins"].values, expected)

    # the row mean ignores the bad bins: mean of the other good bins of the raw polar row
    raw = img[iy, ix].astype(np.float64)
    keep = pm & ~hit
    ref_mean = np.array([row[k].mean() for row, k in zip(raw, keep, strict=True)])
    np.testing.assert_allclose(ds["row_mean"].values[i], ref_mean, rtol=1e-6)
    # nothing is NaN or inf but the bad bins of that shot's polar image; the other shots
    # are untouched
    for name in ("row_mean", "corr", "corr_sem", "pair_stat"):
        assert np.all(np.isfinite(ds[name].values)), name
    others = np.arange(N_TAGS) != i
    np.testing.assert_array_equal(ds["polar"].values[others], clean["polar"].values[others])
    # that shot: its raw polar row over the row mean, NaN in the bad bins (masked for this
    # shot only), 0 in masked bins
    want = np.where(pm, raw / ref_mean[:, None], 0.0)
    want[hit] = np.nan
    np.testing.assert_allclose(ds["polar"].values[i], want, rtol=1e-5, equal_nan=True)

    # the correlation, by brute force over phi (no FFT): each pair's difference on the
    # bins valid in both shots, its products at each lag over the bin pairs valid at that
    # lag, averaged over the pairs with such a bin pair
    pol = ds["polar"].values.astype(np.float64)
    tags = list(ds["tag"].values)
    nphi = pm.shape[1]
    total = np.zeros(pm.shape)
    count = np.zeros(pm.shape, np.int64)
    for ta, tb in zip(ds["pair_tag_a"].values, ds["pair_tag_b"].values, strict=True):
        d = pol[tags.index(ta)] - pol[tags.index(tb)]
        valid = np.isfinite(d) & pm
        d = np.where(valid, d, 0.0)
        for lag in range(nphi):
            n = (valid & np.roll(valid, -lag, axis=1)).sum(axis=1)
            c = (d * np.roll(d, -lag, axis=1)).sum(axis=1)
            ok = n > 0
            total[ok, lag] += c[ok] / n[ok]
            count[ok, lag] += 1
    np.testing.assert_array_equal(ds["corr_count"].values, count)
    np.testing.assert_allclose(ds["corr"].values, np.where(count, total / np.maximum(count, 1),
                                                           np.nan),
                               rtol=2e-4, atol=1e-7, equal_nan=True)
    # and it differs from the clean run's only through that shot's pairs
    assert not np.allclose(ds["corr"].values, clean["corr"].values, equal_nan=True)


# -- the mask --------------------------------------------------------------------------
@pytest.mark.parametrize("mask,msg", [
    (np.ones((32, 64), bool), r"has shape \(32, 64\) but the detector images are \(64, 64\)"),
    (np.full(SHAPE, 255, np.uint8), r"must hold only 0 \(masked\) and 1 \(good\).* \[255\]"),
    (np.full(SHAPE, 0.5), r"must hold only 0 \(masked\) and 1 \(good\).* \[0\.5\]"),
    (np.full(SHAPE, "1"), r"must be boolean or 0/1 numbers \(got dtype <U1\)"),
])
def test_bad_mask(run64, tmp_path, geo, mask, msg):
    with pytest.raises(MaskError, match="mask " + msg):
        plan_run(run64.path, mask=mask, **geo)
    path = tmp_path / "mask.npy"
    np.save(path, mask)
    with pytest.raises(MaskError, match=rf"mask file .*mask\.npy.* {msg}"):
        plan_run(run64.path, mask=path, **geo)
    assert_cli_error(run_cli("process", run64.path, "--out", str(tmp_path / "o.zarr"),
                             "--mask", str(path), *cli_args(geo)), "mask.npy")


def test_mask_file_missing_or_not_npy(run64, tmp_path, geo):
    with pytest.raises(MaskError, match=r"mask file .*nomask\.npy.* does not exist"):
        plan_run(run64.path, mask=tmp_path / "nomask.npy", **geo)
    p = tmp_path / "mask.txt"
    p.write_text("1 1 1\n")
    with pytest.raises(MaskError, match=r"mask file .*mask\.txt.* not a \.npy array"):
        plan_run(run64.path, mask=p, **geo)


def test_mask_hiding_the_whole_band(run64, geo):
    with pytest.raises(GeometryError, match="no good pixel.*entirely in the mask"):
        plan_run(run64.path, mask=np.zeros(SHAPE, bool), **geo)


# -- geometry and grid parameters ------------------------------------------------------
def test_centre_off_the_detector(run64, tmp_path, geo):
    with pytest.raises(GeometryError, match=r"centre \(center_x=500, center_y=30\).*off the "
                                            r"64x64 detector"):
        plan_run(run64.path, **{**geo, "center": (500.0, 30.0)})
    args = cli_args(geo)
    args[args.index("--center") + 1] = "500"
    assert_cli_error(run_cli("process", run64.path, "--out", str(tmp_path / "o.zarr"), *args),
                     "center_x=500", "off the 64x64 detector")


def test_q_band_outside_the_image(run64, tmp_path, geo):
    g = run64.geometry
    corner = float(np.hypot(*CENTER) + 64)      # beyond every corner of the 64x64 image
    qmin, qmax = float(g.radius_to_q(corner)), float(g.radius_to_q(corner + 10))
    with pytest.raises(GeometryError, match=r"q band \(radius .* px.* lies outside the image"):
        plan_run(run64.path, **{**geo, "qmin": qmin, "qmax": qmax})
    assert_cli_error(run_cli("process", run64.path, "--out", str(tmp_path / "o.zarr"),
                             *cli_args({**geo, "qmin": qmin, "qmax": qmax})),
                     "q band", "outside the image")
    # beyond what a flat detector can reach at all (2 theta >= 90 degrees)
    with pytest.raises(GeometryError, match=r"q = 9\.0 1/A is not reachable"):
        plan_run(run64.path, **{**geo, "qmin": 0.1, "qmax": 9.0})


def test_q_band_partly_outside_the_image_warns(run64, geo):
    g = run64.geometry
    qmin, qmax = float(g.radius_to_q(30.0)), float(g.radius_to_q(60.0))
    with pytest.warns(UserWarning, match=r"q rows .*no good pixel"):
        plan = plan_run(run64.path, **{**geo, "qmin": qmin, "qmax": qmax})
    empty = ~plan.transform.polar_mask.any(axis=1)
    assert empty.any() and not empty.all()
    # the empty rows cannot be on the detector: their radius exceeds the farthest pixel
    far = np.hypot(max(CENTER[0], 63 - CENTER[0]), max(CENTER[1], 63 - CENTER[1]))
    assert np.all(plan.transform.radius[empty] > 0.5 * far)


@pytest.mark.parametrize("change,msg", [
    (dict(qmin=0.1, qmax=0.1), r"qmin must be smaller than qmax \(got qmin=0\.1, qmax=0\.1"),
    (dict(qmin=0.2, qmax=0.1), r"qmin must be smaller than qmax \(got qmin=0\.2, qmax=0\.1"),
    (dict(qmin=-0.1), r"qmin must be >= 0"),
    (dict(qmax=float("nan")), r"qmax must be a finite number"),
    (dict(nphi=1), r"nphi must be >= 2 \(got 1\)"),
    (dict(nphi=0), r"nphi must be >= 2 \(got 0\)"),
    (dict(nq=0), r"nq must be >= 1 \(got 0\)"),
    (dict(wavelength=0.0), r"wavelength must be positive and finite, in Angstrom \(got 0\.0\)"),
    (dict(wavelength=-1.4), r"wavelength must be positive .*\(got -1\.4\)"),
    (dict(distance=0.0), r"distance must be positive .* metres"),
    (dict(pixel_size=-5e-5), r"pixel_size must be positive .* metres"),
])
def test_bad_parameter(run64, geo, change, msg):
    with pytest.raises(ParameterError, match=msg):
        plan_run(run64.path, **{**geo, **change})


@pytest.mark.parametrize("flags,needles", [
    (["--qmin", "0.1", "--qmax", "0.1"], ["qmin must be smaller than qmax"]),
    (["--nphi", "1"], ["nphi must be >= 2"]),
    (["--wavelength", "0"], ["wavelength must be positive"]),
    (["--wavelength", "-1.4"], ["wavelength must be positive", "-1.4"]),
])
def test_bad_parameter_cli(run64, tmp_path, geo, flags, needles):
    args = cli_args(geo)
    for k in range(0, len(flags), 2):          # a later flag overrides: drop the original
        if flags[k] in args:
            j = args.index(flags[k])
            del args[j: j + 2]
    assert_cli_error(run_cli("process", run64.path, "--out", str(tmp_path / "o.zarr"),
                             *args, *flags), *needles)


@pytest.mark.parametrize("energy", [0.0, -8600.0])
def test_photon_energy_in_file_not_positive(run64, tmp_path, geo, energy):
    def edit(fh, g):
        g["event_info/bl_3/oh_2/photon_energy_in_eV"][...] = energy
    p = edited_copy(run64.path, tmp_path / "energy.h5", edit)
    with pytest.raises(ParameterError, match=r"photon energy in .*energy\.h5.* not positive.*"
                                             r"--wavelength"):
        plan_run(p, **geo)
    assert_cli_error(run_cli("process", p, "--out", str(tmp_path / "o.zarr"), *cli_args(geo)),
                     "energy.h5", "photon energy")
    # an explicit wavelength gets around it
    assert plan_run(p, wavelength=1.44, **geo).geometry.wavelength == 1.44


# -- the output --------------------------------------------------------------------------
def test_output_holds_something_else(run64, tmp_path, geo):
    out = tmp_path / "results"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError, match=r"results.* not a sacla_dask result store.*"
                                          r"--overwrite"):
        plan_run(run64.path, out=out, **geo).execute()
    assert os.listdir(out) == ["thesis.tex"]          # untouched
    afile = tmp_path / "results.txt"
    afile.write_text("precious")
    with pytest.raises(OutputError, match=r"results\.txt.* not a sacla_dask result store"):
        plan_run(run64.path, out=afile, **geo).execute()
    assert afile.read_text() == "precious"
    ds = plan_run(run64.path, out=afile, **geo).execute(overwrite=True)
    assert ds.attrs["complete"] is True and afile.is_dir()


def test_output_holds_a_complete_result(run64, tmp_path, geo):
    out = tmp_path / "r.zarr"
    first = plan_run(run64.path, out=out, **geo).execute()
    # another q band into the same store: refused, naming what differs
    other = {**geo, "qmax": geo["qmax"] * 1.01}
    with pytest.raises(OutputError, match=r"r\.zarr.* different parameters.*qmax.*--overwrite"):
        plan_run(run64.path, out=out, **other).execute()
    with pytest.raises(OutputError, match=r"r\.zarr.* already holds a complete result"):
        plan_run(run64.path, out=out, **geo).execute(resume=False)
    assert store_state(out) == "complete"
    xr.testing.assert_identical(sd.open_result(out).load(), first.load())


def test_output_parent_is_a_file(run64, tmp_path, geo):
    """Not writable, as root too: the output's folder is a regular file."""
    f = tmp_path / "file.txt"
    f.write_text("x")
    out = f / "out.zarr"
    with pytest.raises(OutputError, match=r"file\.txt.* is a file, not a folder"):
        plan_run(run64.path, out=out, **geo).execute()
    with pytest.raises(OutputError, match=r"nodir.* does not exist"):
        plan_run(run64.path, out=tmp_path / "nodir" / "out.zarr", **geo).execute()
    assert f.read_text() == "x"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="permission bits do not stop root")
def test_output_folder_read_only(run64, tmp_path, geo):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError, match=r"ro.* is not writable"):
            plan_run(run64.path, out=ro / "out.zarr", **geo).execute()
    finally:
        ro.chmod(0o700)


# -- faults during the write -------------------------------------------------------------
class FailingWrites:
    """Patch zarr's LocalStore.set: after ``after`` writes (chunks only if ``chunks_only``)
    raise ``OSError(err)``."""

    def __init__(self, monkeypatch, after: int, err: int = errno.ENOSPC,
                 chunks_only: bool = True) -> None:
        import zarr.storage

        self.after, self.err, self.chunks_only = after, err, chunks_only
        self.n = 0
        orig = zarr.storage.LocalStore.set
        outer = self

        async def set_(store, key, value):
            if not outer.chunks_only or "/c/" in key or key.endswith("/c"):
                outer.n += 1
                if outer.n > outer.after:
                    raise OSError(outer.err, os.strerror(outer.err), key)
            return await orig(store, key, value)

        monkeypatch.setattr(zarr.storage.LocalStore, "set", set_)


def _execute_threaded(plan, **kw):
    import dask

    with dask.config.set(scheduler="threads"):
        return plan.execute(**kw)


@pytest.fixture(scope="module")
def clean_result(run64, geo, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "clean.zarr"
    return _execute_threaded(plan_run(run64.path, out=out, chunks=3, **geo)).load()


@pytest.mark.parametrize("after,chunks_only", [(0, False), (1, False),
                                               (2, False), (3, True), (12, True)])
def test_disk_full_store_not_marked_complete(run64, tmp_path, geo, monkeypatch, after,
                                             chunks_only):
    """Whatever write hits the full disk (the first metadata file, a chunk...), the store
    is never left looking complete."""
    out = tmp_path / "r.zarr"
    FailingWrites(monkeypatch, after, chunks_only=chunks_only)
    with pytest.raises((OSError, SaclaDaskError)):
        _execute_threaded(plan_run(run64.path, out=out, chunks=3, **geo))
    monkeypatch.undo()
    assert store_state(out) in ("absent", "incomplete")
    if store_state(out) == "incomplete":
        with pytest.raises(IncompleteStoreError, match=r"r\.zarr.* not marked complete"):
            sd.open_result(out)
        assert xr.open_zarr(out, consolidated=False).attrs["complete"] is False


def test_disk_full_when_marking_complete(run64, tmp_path, geo, monkeypatch):
    """The very last write (the ``complete`` flag itself) fails: still not complete."""
    import zarr.storage

    out = tmp_path / "r.zarr"
    orig = zarr.storage.LocalStore.set

    async def set_(store, key, value):
        if key == "zarr.json" and b'"complete": true' in value.to_bytes():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), key)
        return await orig(store, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", set_)
    with pytest.raises((OSError, SaclaDaskError)):
        _execute_threaded(plan_run(run64.path, out=out, chunks=3, **geo))
    monkeypatch.undo()
    assert store_state(out) == "incomplete"
    with pytest.raises(IncompleteStoreError):
        sd.open_result(out)


def test_disk_full_error_names_the_store(run64, tmp_path, geo, monkeypatch):
    out = tmp_path / "r.zarr"
    FailingWrites(monkeypatch, 3)
    with pytest.raises(OutputError, match=r"r\.zarr.*No space left on device"):
        _execute_threaded(plan_run(run64.path, out=out, chunks=3, **geo))


def test_rerun_after_disk_full_repairs_the_store(run64, tmp_path, geo, monkeypatch,
                                                 clean_result):
    out = tmp_path / "r.zarr"
    FailingWrites(monkeypatch, 3)
    with pytest.raises((OSError, SaclaDaskError)):
        _execute_threaded(plan_run(run64.path, out=out, chunks=3, **geo))
    monkeypatch.undo()
    assert store_state(out) == "incomplete"
    ds = _execute_threaded(plan_run(run64.path, out=out, chunks=3, **geo))   # same command
    assert ds.attrs["complete"] is True
    xr.testing.assert_identical(ds.drop_attrs(), clean_result.drop_attrs())


@pytest.fixture(scope="module")
def inprocess_scheduler():
    """A LocalCluster whose workers are threads of this process (so a patched zarr store
    reaches them), for ``sacla-dask process --scheduler``."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def test_cli_output_refused(run64, tmp_path, geo, inprocess_scheduler):
    out = tmp_path / "results"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["process", run64.path, "--out", str(out), "--no-progress",
            "--scheduler", inprocess_scheduler, *cli_args(geo)]
    assert_cli_error(run_cli(*args), "results", "not a sacla_dask result store", "--overwrite")
    assert os.listdir(out) == ["keep.txt"]
    # a folder of other files is never deleted, not even with --overwrite
    assert_cli_error(run_cli(*args, "--overwrite"), "results", "not a Zarr store",
                     "does not delete it")
    assert os.listdir(out) == ["keep.txt"]
    # a foreign Zarr store is replaced with --overwrite
    os.remove(out / "keep.txt")
    import zarr

    zarr.open_group(str(out), mode="w").attrs["other"] = "tool"
    assert_cli_error(run_cli(*args), "results", "not a sacla_dask result store")
    res = run_cli(*args, "--overwrite")
    assert res.exit_code == 0, res.output + res.stderr
    assert sd.open_result(out).attrs["complete"] is True


def test_cli_disk_full(run64, tmp_path, geo, inprocess_scheduler, monkeypatch):
    out = tmp_path / "r.zarr"
    FailingWrites(monkeypatch, 3)
    args = ["process", run64.path, "--out", str(out), "--no-progress", "--chunk-size", "3",
            "--scheduler", inprocess_scheduler, *cli_args(geo)]
    res = run_cli(*args)
    monkeypatch.undo()
    assert store_state(out) == "incomplete"
    assert_cli_error(res, "r.zarr", "No space left on device")
    res = run_cli(*args)                    # the same command again finishes the job
    assert res.exit_code == 0, res.output + res.stderr
    assert sd.open_result(out).attrs["complete"] is True


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import dask, zarr.storage
    from sacla_dask.plan import plan_run

    run, out, qmin, qmax, cx, cy, px, dist, after = sys.argv[1:]
    orig = zarr.storage.LocalStore.set
    n = [0]

    async def set_(store, key, value):
        if key.startswith("polar/c/"):
            n[0] += 1
            if n[0] > int(after):
                os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no finally, no atexit
        return await orig(store, key, value)

    zarr.storage.LocalStore.set = set_
    with dask.config.set(scheduler="synchronous"):
        plan_run(run, out=out, chunks=3, qmin=float(qmin), qmax=float(qmax),
                 center=(float(cx), float(cy)), pixel_size=float(px),
                 distance=float(dist)).execute()
""")


def _killed_run(run64, geo, out):
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, run64.path, str(out), repr(geo["qmin"]),
         repr(geo["qmax"]), str(CENTER[0]), str(CENTER[1]), repr(geo["pixel_size"]),
         repr(geo["distance"]), "2"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_killed_during_write_not_complete(run64, tmp_path, geo):
    out = tmp_path / "r.zarr"
    _killed_run(run64, geo, out)
    assert len(os.listdir(out / "polar" / "c")) >= 1       # it really was half-way
    assert store_state(out) == "incomplete"
    with pytest.raises(IncompleteStoreError, match=r"r\.zarr.* not marked complete"):
        sd.open_result(out)
    res = run_cli("info", str(out))
    assert res.exit_code == 0 and "incomplete" in res.output


def test_rerun_after_kill_repairs_the_store(run64, tmp_path, geo, clean_result):
    out = tmp_path / "r.zarr"
    _killed_run(run64, geo, out)
    ds = _execute_threaded(plan_run(run64.path, out=out, chunks=3, **geo))   # same command
    assert ds.attrs["complete"] is True
    xr.testing.assert_identical(ds.drop_attrs(), clean_result.drop_attrs())


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs: a disk that really fills up (needs root and mount; else skipped)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_really_full_disk(small_run, tiny_tmpfs):
    """40 uncompressed 128x128 shots' polar images (~3 MB) into a 1 MiB filesystem."""
    g = small_run.geometry
    kw = dict(qmin=float(g.radius_to_q(10.0)), qmax=float(g.radius_to_q(60.0)),
              center=(small_run.center_x, small_run.center_y), pixel_size=small_run.pixel_size,
              distance=small_run.distance, chunks=8, compression="none")
    out = tiny_tmpfs / "r.zarr"
    with pytest.raises((OSError, SaclaDaskError)) as exc:
        _execute_threaded(plan_run(small_run.path, out=out, **kw))
    assert "No space left on device" in str(exc.value)
    assert store_state(out) in ("absent", "incomplete")
    if store_state(out) == "incomplete":
        with pytest.raises(IncompleteStoreError):
            sd.open_result(out)
    # space is freed (the filesystem grown) and the same call is made again: it finishes
    grow = subprocess.run(["mount", "-o", "remount,size=16m", str(tiny_tmpfs)],
                          capture_output=True, text=True)
    if grow.returncode != 0:
        pytest.skip(f"cannot grow the tmpfs: {grow.stderr.strip()}")
    plan = plan_run(small_run.path, out=out, **kw)
    ds = _execute_threaded(plan)
    assert ds.attrs["complete"] is True and store_state(out) == "complete"
    ref = plan.dataset()
    np.testing.assert_array_equal(ds["polar"].values, ref["polar"].values)
    np.testing.assert_allclose(ds["corr"].values, ref["corr"].values, rtol=1e-12)


def test_cli_refuses_bad_output_before_starting_a_cluster(run64, tmp_path, geo, monkeypatch):
    """A foreign --out is refused before any LocalCluster starts, and check_only removes
    nothing even with --overwrite (a Zarr store of another tool stays until execute)."""
    import sacla_dask.cluster

    def no_cluster(*a, **k):
        raise AssertionError("a cluster was started before the output was checked")

    monkeypatch.setattr(sacla_dask.cluster, "dask_client", no_cluster)
    out = tmp_path / "results"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    res = run_cli("process", run64.path, "--out", str(out), "--no-progress", "--workers", "1",
                  *cli_args(geo))
    assert_cli_error(res, "results", "not a sacla_dask result store")
    assert os.listdir(out) == ["keep.txt"]
    import zarr

    zstore = tmp_path / "other.zarr"
    zarr.open_group(str(zstore), mode="w").attrs["other"] = "tool"
    plan = plan_run(run64.path, out=zstore, **geo)
    assert plan.check_output(overwrite=True) == "absent"
    assert store_state(zstore) == "foreign"          # not removed by the check
