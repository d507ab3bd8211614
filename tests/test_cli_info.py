"""`sacla-dask info`, `sacla-dask plot` and the --help of every command.

The expected numbers come from how the synthetic runs were written (tags,
dark shots, shape, compression), not from the code under test.
"""

from __future__ import annotations

import re

import click
import dask
import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from sacla_dask import plan_run
from sacla_dask.cli import main
from sacla_dask.io.synthetic import write_synthetic_run
from sacla_dask.store import set_attrs


def invoke(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return res.exit_code, res.output


def field(out: str, name: str) -> str:
    """The text after '<name> :' on its line."""
    m = re.search(rf"^\s*{re.escape(name)}\s*:\s*(.*)$", out, flags=re.M)
    assert m, f"no {name!r} line in:\n{out}"
    return m.group(1)


@pytest.mark.parametrize("compression, expect", [
    ("none", "none (contiguous)"),
    ("gzip", "gzip (level 4) (chunks 48x40)"),
    ("bitshuffle-lz4", "bitshuffle+lz4 (chunks 48x40)"),
    ("zstd", "zstd"),
])
def test_info_run_file(tmp_path, compression, expect):
    path = tmp_path / "run.h5"
    write_synthetic_run(path, n_tags=12, n_dark=3, shape=(48, 40), run=123456,
                        first_tag=1000, tag_step=2, compression=compression,
                        photon_energy=10000.0, extra_event_tags=5, ring_radii=(10.0,))
    code, out = invoke("info", str(path))
    assert code == 0, out
    assert field(out, "run number") == "123456"
    assert field(out, "tags") == "12 with images (1000..1022, step 2)"
    assert field(out, "event_info").startswith("17 tags (1000..1032, step 2): +5")
    shots = field(out, "shots")
    assert shots.startswith("9 bright, 3 dark (from the pulse selector")
    assert "dark tags 1000..1004" in shots
    assert field(out, "images").startswith("48 x 40 px (rows x cols), float32")
    assert field(out, "compression").startswith(expect)
    events = field(out, "event data")
    for name in ("pulse_selector", "photon_energy", "pulse_energy"):
        assert name in events
    # 10 keV: lambda = 12.398 / 10 A (to the 1 eV shot-to-shot jitter)
    lam = float(field(out, "wavelength").split()[0])
    assert lam == pytest.approx(1.23984, abs=2e-4)
    assert "pixel 50 um" in field(out, "detector")


@pytest.mark.parametrize("make, expect", [
    (lambda hp: hp.Bitshuffle(cname="lz4"), "bitshuffle+lz4 (chunks 16x16)"),
    (lambda hp: hp.Bitshuffle(cname="zstd"), "bitshuffle+zstd (chunks 16x16)"),
    (lambda hp: hp.Bitshuffle(cname="none"), "bitshuffle (no LZ4/zstd stage) (chunks 16x16)"),
    (lambda hp: dict(compression="lzf", shuffle=True), "shuffle + lzf (chunks 16x16)"),
])
def test_info_names_the_hdf5_filters(tmp_path, make, expect):
    """Filters set with h5py's high-level API (not the synthetic writer) are named."""
    import hdf5plugin

    path = tmp_path / "run.h5"
    t = write_synthetic_run(path, n_tags=3, n_dark=1, shape=(16, 16), ring_radii=(5.0,))
    with h5py.File(path, "r+") as fh:
        for tag in t.tags:
            name = f"run_{t.run}/detector_2d_assembled_1/tag_{tag}/detector_data"
            data = fh[name][()]
            del fh[name]
            fh.create_dataset(name, data=data, chunks=(16, 16), **make(hdf5plugin))
    code, out = invoke("info", str(path))
    assert code == 0, out
    assert field(out, "compression") == expect


def test_info_run_without_shot_status(tmp_path):
    path = tmp_path / "run.h5"
    t = write_synthetic_run(path, n_tags=6, n_dark=2, shape=(16, 16), ring_radii=(5.0,))
    with h5py.File(path, "r+") as fh:
        del fh[f"run_{t.run}/event_info/bl_3/eh_1/xfel_pulse_selector_status"]
    code, out = invoke("info", str(path))
    assert code == 0, out
    shots = field(out, "shots")
    assert shots.startswith("6 bright, 0 dark") and "no pulse-selector" in shots


def test_info_missing_and_foreign_paths(tmp_path):
    res = CliRunner().invoke(main, ["info", str(tmp_path / "nope.h5")])
    assert res.exit_code == 2 and "does not exist" in res.output
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    res = CliRunner().invoke(main, ["info", str(tmp_path / "junk")])
    assert res.exit_code == 2 and "not a sacla_dask result store" in res.output
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all")
    res = CliRunner().invoke(main, ["info", str(bad)])
    assert res.exit_code == 2 and "bad.h5" in res.output


@pytest.fixture(scope="module")
def store(small_run, small_mask, tmp_path_factory):
    d = tmp_path_factory.mktemp("info")
    np.save(d / "mask.npy", small_mask)
    g = small_run.geometry
    qmin, qmax = float(g.radius_to_q(34.0)), float(g.radius_to_q(46.0))
    with dask.config.set(scheduler="synchronous"):
        plan_run(small_run.path, qmin=qmin, qmax=qmax, nphi=240, nq=6,
                 center=(small_run.center_x, small_run.center_y),
                 pixel_size=small_run.pixel_size, distance=small_run.distance,
                 mask=d / "mask.npy", out=d / "out.zarr").execute()
    return d / "out.zarr", qmin, qmax


def test_info_result_store(store, small_run):
    path, qmin, qmax = store
    code, out = invoke("info", str(path))
    assert code == 0, out
    assert out.splitlines()[0] == f"result store {path}: complete"
    assert "(reachable)" in field(out, "run") and str(small_run.run) in field(out, "run")
    t = small_run.tags
    assert field(out, "tags") == f"40 ({t[0]}..{t[-1]}, step 2), 35 bright"
    q = field(out, "q")
    assert f"band {qmin:.5g}..{qmax:.5g} 1/A" in q and "6 bins" in q
    # bin centres lie inside the band, at radii 35..45 px (1 px bins from 34 to 46)
    lo, hi = (float(v) for v in q.split()[0].split(".."))
    assert qmin < lo < hi < qmax
    assert "r = 35.0..45.0 px" in q
    assert field(out, "nphi").startswith("240 (1.500 deg bins")
    # consecutive bright pairs: 35 bright shots -> 34 overlapping pairs
    assert field(out, "pairs").startswith("34 correlated")
    # ... of which each but the first shares a shot with the one before: counted in the SEM
    assert "33 share a shot with the pair before (counted in corr_sem)" in field(out, "pairs")
    assert "SEM optimistic" not in field(out, "pairs")
    geo = field(out, "geometry")
    assert f"centre ({small_run.center_x:.3f}, {small_run.center_y:.3f}) px" in geo
    assert "pixel 50 um" in geo and "distance 53 mm" in geo
    assert field(out, "mask").endswith("mask.npy")
    assert "polar (tag x q x phi)" in field(out, "arrays")


def test_info_result_store_with_rejected_pairs(store, tmp_path):
    import shutil

    import zarr

    copy = tmp_path / "copy.zarr"
    shutil.copytree(store[0], copy)
    g = zarr.open_group(str(copy), mode="r+")
    if "pair_rejected" not in g:
        pytest.skip("this store layout has no pair_rejected")
    rej = np.zeros(g["pair_rejected"].shape, dtype=bool)
    rej[[0, 5, 7]] = True
    g["pair_rejected"][...] = rej
    g["pair_rejected"].attrs["reject_nsigma"] = 2.5
    code, out = invoke("info", str(copy))
    assert code == 0, out
    assert "34 correlated" in field(out, "pairs")
    assert "3 rejected as outliers (> 2.5 sigma" in field(out, "pairs")


def test_info_incomplete_store(store, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(store[0], copy)
    set_attrs(copy, complete=False)
    code, out = invoke("info", str(copy))
    assert code == 0, out
    assert out.splitlines()[0].startswith(f"result store {copy}: incomplete")
    assert "re-run the same command" in out.splitlines()[0]


def test_plot_command(store, tmp_path):
    out_dir = tmp_path / "figs"
    code, out = invoke("plot", str(store[0]), "--out", str(out_dir), "--dpi", "50",
                       "--cut", "0.1")
    assert code == 0, out
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == sorted(f"{n}.png" for n in ("image", "polar", "correlation",
                                                 "correlation_profile", "radial_profile",
                                                 "pair_statistics"))
    assert all((out_dir / n).stat().st_size > 3000 for n in names)
    assert out.count("wrote ") == 6


def test_plot_command_bad_cut(store, tmp_path):
    res = CliRunner().invoke(main, ["plot", str(store[0]), "--out", str(tmp_path),
                                    "--cut", "0.6"])
    assert res.exit_code == 2 and "cut" in res.output and "[0, 0.5)" in res.output


def test_plot_command_incomplete_store(store, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(store[0], copy)
    set_attrs(copy, complete=False)
    res = CliRunner().invoke(main, ["plot", str(copy), "--out", str(tmp_path / "f")])
    assert res.exit_code == 2 and "not marked complete" in res.output


# -- every command explains itself ------------------------------------------------
#: Option names that carry a physical quantity, and the unit words one of
#: which their help must contain.
UNITS = {
    "center": ("pixel", "px"), "ring": ("pixel", "px"), "ring_width": ("px", "pixel"),
    "pixel_size": ("metre", "meter", " m"), "distance": ("metre", "meter", " m"),
    "energy": ("eV", "keV"), "wavelength": ("Angstrom", "1/A", " A"),
    "qmin": ("1/Angstrom", "1/A"), "qmax": ("1/Angstrom", "1/A"), "q_profile": ("1/Angstrom",),
    "shape": ("pixel", "px"), "cut": ("pi", "rad"), "nphi": ("bins", "pixel"),
    "chunk_size": ("MiB", "bytes", "tags"), "dpi": ("dots per inch", "dpi"),
    "radius": ("pixel", "px"), "search": ("pixel", "px"), "threshold": ("sigma", "times", "x "),
}


def _commands():
    return sorted(main.commands)


@pytest.mark.parametrize("name", _commands())
def test_every_command_has_help_with_an_example(name):
    code, out = invoke(name, "--help")
    assert code == 0
    assert "Example" in out, f"`sacla-dask {name} --help` shows no example"
    assert f"sacla-dask {name}" in out.split("Example", 1)[1]


@pytest.mark.parametrize("name", _commands())
def test_every_physical_option_states_its_unit(name):
    cmd = main.commands[name]
    gaps = []
    for p in cmd.params:
        if p.name in UNITS and getattr(p, "help", None) is not None:
            if not any(u in p.help for u in UNITS[p.name]):
                gaps.append(f"--{p.name.replace('_', '-')}: {p.help!r}")
    assert not gaps, f"`sacla-dask {name}` options without units: {gaps}"


def test_every_option_has_help():
    gaps = [f"{n} {p.opts[0]}" for n, c in main.commands.items() for p in c.params
            if isinstance(p, click.Option) and not p.help and p.name != "help"]
    assert not gaps, gaps
