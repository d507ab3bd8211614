"""Grouped processing (``group_by``) against independent references.

The reference for each group is a plain plan over the same run restricted
to that group's shots (``select="laser_pulse_selector_status == v"``),
or over an explicit pairs list: per-group outlier rejection, bootstrap
intervals, similarity pairings and listed pairs must give what that plan
gives. Then the command line end to end (``process --group-by``, ``info``,
``plot``, ``structure``, ``center --select``) and the Fourier difference.
"""

from __future__ import annotations

import json
import re
import shutil

import h5py
import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

import sacla_dask as sd
from sacla_dask.cli import main
from sacla_dask.io.run import DETECTOR
from sacla_dask.io.synthetic import write_synthetic_run
from sacla_dask.structure.compute import compute_structure

AMPLITUDE = 0.3
FIELD = "laser_pulse_selector_status"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """A pump-probe run (laser alternating: on 6-fold, off 4-fold) and a copy of it whose
    one laser-on shot is wild (a streak across the ring 1000 times brighter)."""
    d = tmp_path_factory.mktemp("groups")
    truth = write_synthetic_run(d / "pp.h5", n_tags=80, n_dark=2, shape=(96, 96),
                                center=(47.5, 48.5), ring_radii=(30.0,), laser="alternate",
                                laser_on_order=6, laser_off_order=4,
                                modulation_amplitude=AMPLITUDE, seed=7)
    wild_path = d / "wild.h5"
    shutil.copy(truth.path, wild_path)
    on = np.flatnonzero(truth.laser_on & truth.bright)
    wild = int(truth.tags[on[on.size // 2]])
    with h5py.File(wild_path, "r+") as fh:
        img = fh[f"run_{truth.run}/{DETECTOR}/tag_{wild}/detector_data"]
        a = img[()].astype(np.float64)
        a[48:, 44:52] *= 1000  # a hot streak across the ring
        img[...] = a.astype(img.dtype)
    return truth, str(wild_path), wild


def _geometry(truth):
    q = truth.ring_q()[0]
    return dict(center=(truth.center_x, truth.center_y), pixel_size=truth.pixel_size,
                distance=truth.distance, qmin=0.94 * q, qmax=1.06 * q, nphi=96)


def _pairs_of(ds, mine=slice(None)):
    return [tuple(p) for p in np.stack([ds["pair_tag_a"].values[mine],
                                        ds["pair_tag_b"].values[mine]], axis=1).tolist()]


def _check_group_equals(grouped, g, ref, names, ref_group=None):
    """Group ``g`` of ``grouped`` equals the per-group result ``ref`` (or its group
    ``ref_group``): its statistics and, pair by pair, its pairs, pair_stat and rejections."""
    one = grouped.isel(group=g)
    other = ref if ref_group is None else ref.isel(group=ref_group)
    for name in names:
        np.testing.assert_allclose(one[name].values, other[name].values, rtol=1e-9,
                                   atol=1e-14, equal_nan=True, err_msg=name)
    mine = grouped["pair_group"].values == g
    theirs = slice(None) if ref_group is None else ref["pair_group"].values == ref_group
    assert _pairs_of(grouped, mine) == _pairs_of(ref, theirs)
    for name in ("pair_stat", "pair_rejected"):
        np.testing.assert_allclose(grouped[name].values[mine], ref[name].values[theirs],
                                   rtol=1e-9, equal_nan=True, err_msg=name)


def _per_group(path, truth, **kw):
    return [sd.plan_run(path, **_geometry(truth), select=f"{FIELD} == {v}", **kw)
            .dataset().compute() for v in (0, 1)]


def test_outliers_are_rejected_within_their_group(runs):
    truth, wild_path, wild = runs
    grouped = sd.plan_run(wild_path, **_geometry(truth), group_by=FIELD,
                          reject_outliers=3.0).dataset().compute()
    refs = _per_group(wild_path, truth, reject_outliers=3.0)
    for g in (0, 1):
        _check_group_equals(grouped, g, refs[g], ("corr", "corr_sem", "corr_count",
                                                  "corr_fourier", "n_pairs",
                                                  "pair_stat_threshold"))
    # the wild shot's pairs (laser on: group 1) are rejected there
    rej = grouped["pair_rejected"].values
    has_wild = (grouped["pair_tag_a"].values == wild) | (grouped["pair_tag_b"].values == wild)
    pg = grouped["pair_group"].values
    assert has_wild.sum() == 2 and np.all(pg[has_wild] == 1) and np.all(rej[has_wild])
    # the laser-off group is untouched: as in the grouped run of the clean file
    clean = sd.plan_run(truth.path, **_geometry(truth), group_by=FIELD,
                        reject_outliers=3.0).dataset().compute()
    _check_group_equals(grouped, 0, clean, ("corr", "corr_sem", "n_pairs",
                                            "pair_stat_threshold"), ref_group=0)
    # ...while the laser-on group lost exactly the wild pairs more than in the clean file
    on_clean = clean["pair_rejected"].values[clean["pair_group"].values == 1]
    assert int(rej[pg == 1].sum()) == int(on_clean.sum()) + 2


def test_bootstrap_intervals_per_group_equal_the_group_alone(runs):
    truth, _, _ = runs
    grouped = sd.plan_run(truth.path, **_geometry(truth), group_by=FIELD,
                          bootstrap=40).dataset().compute()
    refs = _per_group(truth.path, truth, bootstrap=40)
    # the Poisson weights are drawn from the pair's two tags and the seed: the same pairs
    # get the same weights in the grouped and in the per-group run
    for g in (0, 1):
        _check_group_equals(grouped, g, refs[g], ("corr", "corr_ci_low", "corr_ci_high",
                                                  "corr_fourier_ci_low",
                                                  "corr_fourier_ci_high"))
    assert float((grouped["corr_ci_high"] - grouped["corr_ci_low"]).min()) >= 0


@pytest.mark.parametrize("pairing", ["intensity", "pulse_energy", "profile", "angular"])
def test_similarity_pairing_stays_within_each_group(runs, pairing):
    truth, _, _ = runs
    geo = _geometry(truth)
    plan = sd.plan_run(truth.path, **geo, group_by=FIELD, pairing=pairing)
    tags, g = plan.run.tags, plan.groups
    assert g is not None
    labels = g.labels
    assert np.array_equal(labels[plan.ia], g.pair_group)
    assert np.array_equal(labels[plan.ib], g.pair_group)  # no pair crosses groups
    for grp, v in enumerate((0, 1)):
        ref = sd.plan_run(truth.path, **geo, select=f"{FIELD} == {v}", pairing=pairing)
        mine = g.pair_group == grp
        assert np.array_equal(tags[plan.ia[mine]], ref.run.tags[ref.ia])
        assert np.array_equal(tags[plan.ib[mine]], ref.run.tags[ref.ib])
        assert mine.sum() == ref.ia.size >= 15


def test_pairs_file_with_groups_drops_and_counts_pairs_across(runs, tmp_path):
    truth, _, _ = runs
    geo = _geometry(truth)
    tags = truth.tags
    on = tags[truth.laser_on & truth.bright]
    off = tags[~truth.laser_on & truth.bright]
    dark = tags[~truth.bright]
    within_on = [[int(a), int(b)] for a, b in zip(on[0:20:2], on[1:20:2], strict=True)]
    within_off = [[int(a), int(b)] for a, b in zip(off[0:16:2], off[1:16:2], strict=True)]
    across = [[int(a), int(b)] for a, b in zip(on[20:25], off[20:25], strict=True)]
    other = [[int(dark[0]), int(on[30])], [int(off[30]), int(tags[-1]) + 1000]]
    listed = within_on + across + within_off + other
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(listed))
    out = tmp_path / "g.zarr"
    plan = sd.plan_run(truth.path, **geo, pairs=path, group_by=FIELD, out=out)
    g = plan.groups
    assert g is not None
    assert g.n_pairs_across == 5
    assert plan.n_pairs_dropped == 5 + 2  # across, plus a dark shot and a missing tag
    assert "5 listed pairs across groups dropped" in plan.summary()["groups"]
    ds = plan.execute()
    assert ds.attrs["groups"]["n_pairs_across"] == 5
    assert ds.attrs["groups"]["n_pairs"] == [len(within_off), len(within_on)]
    for grp, (v, pairs) in enumerate(((0, within_off), (1, within_on))):
        assert _pairs_of(ds, ds["pair_group"].values == grp) == [tuple(p) for p in pairs]
        ref = sd.plan_run(truth.path, **geo, pairs=pairs).dataset().compute()
        _check_group_equals(ds, grp, ref, ("corr", "corr_sem", "corr_count", "n_pairs"))
        del v
    res = CliRunner().invoke(main, ["info", str(out)])
    assert res.exit_code == 0, res.output
    assert "5 listed pairs across groups dropped" in res.output


# -- the command line, end to end --------------------------------------------------
@pytest.fixture(scope="module")
def cli_store(runs, tmp_path_factory):
    truth, _, _ = runs
    geo = _geometry(truth)
    out = tmp_path_factory.mktemp("cli") / "pp.zarr"
    res = CliRunner().invoke(main, [
        "process", truth.path, "--out", str(out), "--center", *map(str, geo["center"]),
        "--pixel-size", str(truth.pixel_size), "--distance", str(truth.distance),
        "--qmin", str(geo["qmin"]), "--qmax", str(geo["qmax"]), "--nphi", "96",
        "--group-by", FIELD])
    assert res.exit_code == 0, res.output
    return str(out), res.output


def test_cli_process_group_by_writes_the_grouped_store(runs, cli_store):
    truth, _, _ = runs
    out, _ = cli_store
    ds = sd.open_result(out)
    assert ds.sizes["group"] == 2 and list(ds["group"].values) == [0.0, 1.0]
    refs = _per_group(truth.path, truth)
    for g in (0, 1):
        _check_group_equals(ds, g, refs[g], ("corr", "corr_sem", "corr_fourier", "n_pairs"))
    on = truth.laser_on & truth.bright
    expected = np.where(truth.bright, on.astype(int), -1)
    assert np.array_equal(ds["shot_group"].values, expected)
    assert ds.attrs["groups"]["n_shots"] == [int((expected == 0).sum()), int(on.sum())]
    np.testing.assert_allclose(ds["corr_diff"].values,
                               refs[1]["corr"].values - refs[0]["corr"].values, rtol=1e-9)


def test_cli_info_describes_the_groups(cli_store):
    out, _ = cli_store
    ds = sd.open_result(out)
    n = ds.attrs["groups"]["n_pairs"]
    res = CliRunner().invoke(main, ["info", out])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.strip().startswith("groups"))
    assert (f"2 by {FIELD} ({FIELD} = 0: 39 shots, {n[0]} pairs; {FIELD} = 1: 39 shots, "
            f"{n[1]} pairs); corr_diff = {FIELD} = 1 minus {FIELD} = 0") in line


def test_cli_plot_draws_the_groups_figure(cli_store, tmp_path):
    out, _ = cli_store
    res = CliRunner().invoke(main, ["plot", out, "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "groups.png").stat().st_size > 10_000
    assert (tmp_path / "shots.png").exists()


def test_fourier_difference_and_its_bound(cli_store):
    out, _ = cli_store
    ds = sd.open_result(out)
    f = ds["corr_fourier"].values
    diff = ds["corr_fourier_diff"].values
    np.testing.assert_allclose(diff, f[1] - f[0], rtol=1e-12, atol=1e-15)
    # linear: the coefficients of corr_diff
    cd = ds["corr_diff"].values
    nphi = cd.shape[1]
    np.testing.assert_allclose(diff, np.fft.rfft(cd, axis=1).real / nphi, atol=1e-12)
    bound = ds["corr_fourier_diff_sem"].values
    sem = ds["corr_sem"].values
    dphi = ds["dphi"].values
    n = np.arange(diff.shape[1])
    each = (sem[:, :, :, None] * np.abs(np.cos(np.multiply.outer(dphi, n)))).sum(2) / nphi
    np.testing.assert_allclose(bound, np.hypot(each[0], each[1]), rtol=1e-10)
    # at least the independent-lag value, and the truth within 3 bounds:
    # c_6 = a^2/2 (laser on), c_4 = -a^2/2 (laser off, subtracted)
    indep = np.sqrt((sem**2 @ np.cos(np.multiply.outer(dphi, n)) ** 2).sum(0)) / nphi
    assert np.all(bound >= indep - 1e-15)
    truth = np.zeros(diff.shape[1])
    truth[6], truth[4] = AMPLITUDE**2 / 2, -(AMPLITUDE**2) / 2
    z = (diff[:, 1:13] - truth[1:13]) / bound[:, 1:13]
    assert np.all(np.abs(z) < 3), np.abs(z).max()


def test_structure_on_a_grouped_store_fits_each_group(runs, cli_store, tmp_path):
    truth, _, _ = runs
    out = str(tmp_path / "copy.zarr")
    shutil.copytree(cli_store[0], out)
    res = CliRunner().invoke(main, ["structure", out, "--lmax", "8"])
    assert res.exit_code == 0, res.output
    assert "each of 2 groups on its own" in res.output
    ds = sd.open_result(out)
    assert ds["bl"].dims == ("group", "q", "l")
    assert ds["corr_psi"].dims == ("group", "q", "psi")
    for g, ref in enumerate(_per_group(truth.path, truth)):
        # (the per-group run's wavelength is its shots' mean photon energy; the grouped
        # store has one, of all the selected shots: the fit of each group uses that)
        alone = compute_structure(ref.assign_attrs(wavelength=ds.attrs["wavelength"]), 8)
        for name in ("corr_psi", "corr_psi_sem", "bl", "bl_sem", "bl_chi2"):
            np.testing.assert_allclose(ds[name].isel(group=g).values, alone[name].values,
                                       rtol=1e-6, atol=1e-12, equal_nan=True, err_msg=name)
    xr.testing.assert_equal(ds["group"], sd.open_result(cli_store[0])["group"])
    res = CliRunner().invoke(main, ["plot", out, "--out", str(tmp_path / "fig")])
    assert res.exit_code == 0, res.output
    drawn = {p.name for p in (tmp_path / "fig").iterdir()}
    assert {"correlation_psi_group0.png", "correlation_psi_group1.png"} <= drawn, drawn


def test_cli_center_select_averages_only_the_selected_shots(runs):
    from sacla_dask.center import center_run

    truth, _, _ = runs
    guess = [str(truth.center_x + 1), str(truth.center_y - 1), "30"]
    args = ["center", truth.path, "--guess", *guess, "--distance", str(truth.distance),
            "--max-shots", "1000", "--select", f"{FIELD} == 1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    on = truth.laser_on & truth.bright
    m = re.search(r"mean of (\d+) of (\d+) bright shots", res.output)
    assert m is not None, res.output
    assert int(m.group(1)) == int(on.sum()) == 39
    seen = []
    center_run(truth.path, guess=(truth.center_x + 1, truth.center_y - 1, 30.0),
               distance=truth.distance, max_shots=1000, select=f"{FIELD} == 1",
               on_mean=seen.append)
    with h5py.File(truth.path) as fh:
        grp = fh[f"run_{truth.run}/{DETECTOR}"]
        ref = np.mean([grp[f"tag_{t}/detector_data"][()] for t in truth.tags[on]], axis=0,
                      dtype=np.float64)
    assert np.array_equal(seen[0].shots.tags, truth.tags[on])
    np.testing.assert_allclose(seen[0].image, ref, rtol=1e-10)
