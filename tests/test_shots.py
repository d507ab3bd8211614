"""Shots as SACLA records them: selection by event data, groups (pump-probe), photon units.

A synthetic pump-probe run (laser alternating; laser-on shots 6-fold,
laser-off 4-fold) is grouped by the laser status; selections are checked
against numpy masks over the same event arrays read with h5py; photon
units against known photon counts.
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sacla_dask as sd
from sacla_dask.cli import main
from sacla_dask.errors import ParameterError
from sacla_dask.io.synthetic import write_synthetic_run
from sacla_dask.shots.select import parse_selection, select_by_events
from sacla_dask.shots.units import photon_factors, to_photons

AMPLITUDE = 0.3
LASER = "/run_178884/event_info/bl_3/lh_1/laser_pulse_selector_status"


@pytest.fixture(scope="module")
def pump_probe(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("pp") / "pp.h5"
    truth = write_synthetic_run(path, n_tags=200, n_dark=2, shape=(128, 128),
                                ring_radii=(40.0,), laser="alternate", laser_on_order=6,
                                laser_off_order=4, modulation_amplitude=AMPLITUDE,
                                delays=(0.5, 1.0, 2.0), seed=3)
    return truth


def _geometry(truth):
    g = truth.geometry
    q = truth.ring_q()[0]
    return dict(center=(g.center_x, g.center_y), pixel_size=g.pixel_size,
                distance=g.distance, qmin=0.96 * q, qmax=1.04 * q)


@pytest.fixture(scope="module")
def grouped(pump_probe, tmp_path_factory: pytest.TempPathFactory):
    """The pump-probe run grouped by laser status, and the tags each chunk task read."""
    import sacla_dask.graph as graph

    read: list[int] = []
    real = graph.polar_chunk_from_run

    def counting(sources, *args):
        read.extend(s.tag for s in sources)
        return real(sources, *args)

    out = tmp_path_factory.mktemp("ppz") / "pp.zarr"
    plan = sd.plan_run(pump_probe.path, **_geometry(pump_probe), out=out, chunks=25,
                       group_by="laser_pulse_selector_status")
    graph.polar_chunk_from_run = counting
    try:
        ds = plan.execute()
    finally:
        graph.polar_chunk_from_run = real
    return plan, ds, read


def test_groups_have_their_own_symmetry_and_no_mixed_pair(pump_probe, grouped):
    plan, ds, read = grouped
    assert ds.sizes["group"] == 2 and list(ds["group"].values) == [0.0, 1.0]
    power = np.abs(ds["corr_fourier"].mean("q").values[:, 1:13])
    assert int(np.argmax(power[0])) + 1 == 4  # laser off
    assert int(np.argmax(power[1])) + 1 == 6  # laser on
    # no pair mixes groups: both shots of every pair carry the pair's group
    label = dict(zip(ds["tag"].values, ds["shot_group"].values, strict=True))
    ga = np.array([label[t] for t in ds["pair_tag_a"].values])
    gb = np.array([label[t] for t in ds["pair_tag_b"].values])
    assert np.array_equal(ga, gb) and np.array_equal(ga, ds["pair_group"].values)
    assert list(ds["n_pairs"].values) == [int((ga == 0).sum()), int((ga == 1).sum())]
    # one pass: each tag read once, by one chunk task
    assert sorted(read) == sorted(ds["tag"].values.tolist())
    assert "laser_pulse_selector_status = 1 minus" in ds["corr_diff"].attrs["difference"]


def test_difference_error_bars_cover_the_truth(grouped):
    _, ds, _ = grouped
    dphi = ds["dphi"].values
    # random phases: a pair's difference correlation averages to a^2 cos(n dphi)
    truth = AMPLITUDE**2 * (np.cos(6 * dphi) - np.cos(4 * dphi))
    inner = (dphi > 0.1) & (dphi < 2 * np.pi - 0.1)
    diff = ds["corr_diff"].values[:, inner]
    sem = ds["corr_diff_sem"].values[:, inner]
    z = (diff - truth[inner]) / sem
    assert np.all(np.isfinite(z))
    assert np.all(np.abs(z) < 3), np.abs(z).max()  # (within 2 sigma for seeds 0..7)
    assert np.allclose(sem, np.hypot(*ds["corr_sem"].values[:, :, inner]))


def test_group_bins_pair_within_each_bin(pump_probe):
    plan = sd.plan_run(pump_probe.path, **_geometry(pump_probe), group_by="delay_mm",
                       group_bins=[0, 0.75, 1.5, 2.5])
    g = plan.groups
    assert g is not None and g.n == 3
    np.testing.assert_allclose(g.low, [0, 0.75, 1.5])
    delay = pump_probe.delay
    pos = {t: i for i, t in enumerate(plan.run.tags)}
    for a, b, grp in zip(plan.ia, plan.ib, g.pair_group, strict=True):
        assert g.low[grp] <= delay[a] < g.high[grp] and g.low[grp] <= delay[b] < g.high[grp]
    assert len(pos) == 200


# -- selection ---------------------------------------------------------------------
_NAMES = {  # a field by each of its names -> the dataset read with h5py
    "laser_pulse_selector_status": "bl_3/lh_1/laser_pulse_selector_status",
    "bl_3/lh_1/laser_pulse_selector_status": "bl_3/lh_1/laser_pulse_selector_status",
    "delay_mm": "bl_3/lh_1/delay_mm",
    "/run_178884/event_info/bl_3/lh_1/delay_mm": "bl_3/lh_1/delay_mm",
    "pulse_energy": "bl_3/oh_2/bm_1_pulse_energy_in_joule",
    "photon_energy_in_eV": "bl_3/oh_2/photon_energy_in_eV",
}
_OPS = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal,
        "==": np.equal, "!=": np.not_equal}


def _leaf(arrays):
    def make(name, op, value):
        return f"{name} {op} {value!r}", _OPS[op](arrays[_NAMES[name]], value)

    values = st.sampled_from([0, 1, 0.5, 1.0, 2.0, 1e-3, 8600.0, -1])
    compare = st.builds(make, st.sampled_from(sorted(_NAMES)), st.sampled_from(sorted(_OPS)),
                        values)

    def chained(name, lo, hi):
        v = arrays[_NAMES[name]]
        return f"{lo!r} < {name} <= {hi!r}", (lo < v) & (v <= hi)

    chain = st.builds(chained, st.sampled_from(sorted(_NAMES)), st.sampled_from([0, 0.5, 1e-3]),
                      st.sampled_from([1, 2.0, 8700.0]))
    bare = st.sampled_from(["laser_pulse_selector_status"]).map(
        lambda n: (n, arrays[_NAMES[n]] != 0))
    return st.one_of(compare, chain, bare)


def _expressions(arrays):
    def extend(children):
        both = st.tuples(children, children)
        return st.one_of(
            both.map(lambda p: (f"({p[0][0]}) and ({p[1][0]})", p[0][1] & p[1][1])),
            both.map(lambda p: (f"({p[0][0]}) or ({p[1][0]})", p[0][1] | p[1][1])),
            children.map(lambda c: (f"not ({c[0]})", ~c[1])))

    return st.recursive(_leaf(arrays), extend, max_leaves=6)


def test_select_equals_a_numpy_mask(pump_probe):
    run = sd.open_run(pump_probe.path)
    with h5py.File(pump_probe.path) as fh:
        ev = fh["run_178884/event_info"]
        arrays = {p: np.asarray(ev[p][()], dtype=np.float64) for p in set(_NAMES.values())}

    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_expressions(arrays))
    def check(case):
        text, expected = case
        assert np.array_equal(parse_selection(text).mask(run), expected), text
        sel = select_by_events(run, text)
        assert np.array_equal(sel.selected, run.bright & expected)

    check()


def test_select_in_the_plan_and_drop_unselected(pump_probe):
    geo = _geometry(pump_probe)
    plan = sd.plan_run(pump_probe.path, **geo, select="laser_pulse_selector_status == 1")
    on = pump_probe.laser_on & pump_probe.bright
    assert np.array_equal(plan.run.selected, on)
    assert plan.run.selection["select_fields"] == ["laser_pulse_selector_status"]
    assert all(plan.run.selected[plan.ia]) and all(plan.run.selected[plan.ib])
    dropped = sd.plan_run(pump_probe.path, **geo, select=f"{LASER} == 1", drop_unselected=True)
    assert np.array_equal(dropped.run.tags, pump_probe.tags[on])


@pytest.mark.parametrize("kwargs, message", [
    ({"select": "delay_mm >"}, "select: 'delay_mm >' is not a valid expression"),
    ({"select": "nosuch > 1"}, "select: no event field 'nosuch' in the run; its fields are: "
                               "tag, run, pulse_selector"),
    ({"select": "__import__('os').system('true') == 0"}, "select: a function call is not "
                                                         "allowed"),
    ({"select": "delay_mm.real > 1"}, "select: an attribute access is not allowed"),
    ({"group_by": "nosuch"}, "group_by: no event field 'nosuch'"),
    ({"group_by": "run"}, "group_by 'run': a grouping needs at least two groups, but every "
                          "selected shot has run = 178884"),
    ({"group_by": "delay_mm", "group_bins": [0, 0.75]}, "a grouping needs at least two"),
    ({"group_by": "delay_mm", "group_bins": [1, 0]}, "group_bins must be at least two "
                                                     "increasing"),
])
def test_bad_selection_or_grouping_is_refused_before_any_store(pump_probe, tmp_path, kwargs,
                                                               message):
    out = tmp_path / "never.zarr"
    with pytest.raises(ParameterError) as err:
        sd.plan_run(pump_probe.path, **_geometry(pump_probe), out=out, **kwargs)
    assert message in str(err.value)
    assert not out.exists()


def test_cli_select_error_and_info_lists_event_fields(pump_probe, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["info", pump_probe.path])
    assert res.exit_code == 0, res.output
    assert (f"laser_pulse_selector_status [{LASER}] int32: values 0 (x100), 1 (x100)"
            in res.output)
    assert "delay_mm [/run_178884/event_info/bl_3/lh_1/delay_mm] float64: values 0.5" \
        in res.output
    g = _geometry(pump_probe)
    out = tmp_path / "r.zarr"
    res = runner.invoke(main, ["process", pump_probe.path, "--out", str(out), "--center",
                               *map(str, g["center"]), "--qmin", str(g["qmin"]), "--qmax",
                               str(g["qmax"]), "--pixel-size", "5e-5", "--distance", "0.053",
                               "--select", "open('x') == 1"])
    assert res.exit_code == 2
    assert "error: select: a function call is not allowed" in res.output
    assert not out.exists()


# -- photon units ------------------------------------------------------------------
def test_photon_units_recover_known_counts(tmp_path):
    bg = 6.0
    truth = write_synthetic_run(tmp_path / "ph.h5", n_tags=30, n_dark=24, shape=(96, 96),
                                ring_radii=(30.0,), background=bg, absolute_gain=2.5, seed=5)
    run = sd.open_run(truth.path)
    np.testing.assert_allclose(photon_factors(run), 1 / truth.adu_per_photon, rtol=1e-12)
    dark = ~truth.bright
    photons = to_photons(run.images(chunks=8), run).compute()[dark]
    assert not np.allclose(photons, np.round(run.images().compute()[dark]))  # really converted
    # Poisson counts of mean bg: mean and variance bg
    assert abs(photons.mean() / bg - 1) < 0.01
    assert abs(photons.var() / bg - 1) < 0.01
    g = truth.geometry
    q = truth.ring_q()[0]
    ds = sd.plan_run(truth.path, center=(g.center_x, g.center_y), pixel_size=g.pixel_size,
                     distance=g.distance, qmin=0.9 * q, qmax=1.1 * q, units="photons",
                     out=tmp_path / "ph.zarr").execute()
    assert ds["row_mean"].attrs["units"] == "photon/pixel"
    assert ds["shot_intensity"].attrs["units"] == "photon/pixel"
    assert ds.attrs["units"]["w_eV"] == 3.65
    assert abs(float(ds["row_mean"].values[dark].mean()) / bg - 1) < 0.01


def test_photon_units_without_gain_are_refused(pump_probe, tmp_path):
    with pytest.raises(ParameterError, match="absolute_gain but"):
        sd.plan_run(pump_probe.path, **_geometry(pump_probe), units="photons",
                    out=tmp_path / "x.zarr")
    assert not os.path.exists(tmp_path / "x.zarr")


def test_plot_draws_shot_quality_and_groups(grouped, tmp_path):
    from sacla_dask.plot import plot_result

    _, ds, _ = grouped
    report = plot_result(ds, tmp_path)
    assert {"shots", "groups", "correlation", "correlation_profile"} <= set(report.written)
