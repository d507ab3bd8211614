"""From correlations to structure: psi mapping, Legendre fit, predicted angles, store layer.

References are independent of the code under test: explicit 3-D vectors
built from the scattering geometry for the Ewald mapping, Legendre
polynomials from scipy, textbook interplanar angles (cubic 111-111: arccos
1/3), correlations generated from known B_l through the exact mapping
(with the constant the row normalisation removes taken out) and an honest
simulation of randomly oriented gold nanocrystals through the whole
pipeline.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr
import zarr
from click.testing import CliRunner
from scipy.special import eval_legendre

from sacla_dask import IncompleteStoreError, OutputError, ParameterError, open_result, plan_run
from sacla_dask.cli import main
from sacla_dask.io.synthetic import Nanocrystals, random_rotations, write_synthetic_run
from sacla_dask.store import MARKER, consolidate
from sacla_dask.structure import (
    add_structure,
    bl_series,
    bragg_angle,
    compute_structure,
    cos_psi,
    dphi_of_psi,
    equivalents,
    fit_legendre,
    fold_halves,
    legendre_design,
    predicted_angles,
    psi_of_dphi,
    psi_range,
    resample_row,
    structure_variables,
)
from sacla_dask.structure.lattice import allowed, reflections_in_band

GOLD_A = 4.078
LAM = 1.24  # Angstrom
Q111 = 2 * math.pi * math.sqrt(3) / GOLD_A
DEG = math.pi / 180


def qhat(theta: float, phi: float) -> np.ndarray:
    """Unit scattering vector at Bragg angle theta, detector azimuth phi (beam along +z)."""
    return np.array([math.cos(theta) * math.cos(phi), math.cos(theta) * math.sin(phi),
                     -math.sin(theta)])


# -- the Ewald mapping ------------------------------------------------------------
def test_cos_psi_is_the_angle_between_the_3d_vectors():
    rng = np.random.default_rng(0)
    for _ in range(50):
        t1, t2 = rng.uniform(0, math.pi / 4, 2)
        p1, p2 = rng.uniform(0, 2 * math.pi, 2)
        ref = float(np.dot(qhat(t1, p1), qhat(t2, p2)))
        assert cos_psi(p2 - p1, t1, t2) == pytest.approx(ref, abs=1e-12)
        assert psi_of_dphi(p2 - p1, t1, t2) == pytest.approx(math.acos(np.clip(ref, -1, 1)),
                                                             abs=1e-7)


def test_psi_equals_dphi_without_curvature_and_range_edges():
    d = np.linspace(0, math.pi, 7)
    np.testing.assert_allclose(psi_of_dphi(d, 0.0), d, atol=1e-7)
    t1, t2 = 0.3, 0.2
    assert psi_of_dphi(0.0, t1, t2) == pytest.approx(abs(t1 - t2))
    assert psi_of_dphi(math.pi, t1, t2) == pytest.approx(math.pi - t1 - t2)
    assert psi_range(t1, t2) == pytest.approx((0.1, math.pi - 0.5))


def test_dphi_of_psi_inverts_and_is_nan_where_not_reached():
    t = float(bragg_angle(Q111, LAM))
    d = np.linspace(0, math.pi, 101)
    np.testing.assert_allclose(dphi_of_psi(psi_of_dphi(d, t), t), d, atol=1e-6)
    beyond = dphi_of_psi(np.array([math.pi - 2 * t + 0.01, math.pi]), t)
    assert np.isnan(beyond).all()
    # gold 111 at 1.24 A: the interplanar angles are seen 3 and 6 degrees further out
    got = np.degrees(dphi_of_psi(np.arccos([1 / 3, -1 / 3]), t))
    np.testing.assert_allclose(got, [73.52, 115.64], atol=0.01)


def test_bragg_angle_checks_its_input():
    assert bragg_angle(4 * math.pi / LAM * math.sin(0.25), LAM) == pytest.approx(0.25)
    with pytest.raises(ParameterError, match="wavelength"):
        bragg_angle(1.0, 0.0)
    with pytest.raises(ParameterError, match="q must lie"):
        bragg_angle(20.0, LAM)


def test_resample_row_reproduces_a_function_of_psi():
    t = float(bragg_angle(3.0, LAM))
    nphi = 720
    d = 2 * math.pi * np.arange(nphi // 2 + 1) / nphi
    f = lambda p: np.cos(3 * p) + 0.5 * p  # noqa: E731 - any smooth function of psi
    row = f(psi_of_dphi(d, t))
    psi = np.linspace(0, math.pi, 181)
    sem = np.full(d.size, 0.1)
    count = np.full(d.size, 7)
    count[100] = 3
    v, s, n = resample_row(row, d, psi, t, sem=sem, count=count)
    lo, hi = psi_range(t)
    inside = (psi >= lo) & (psi <= hi)
    np.testing.assert_allclose(v[inside], f(psi[inside]), atol=2e-3)
    assert np.isnan(v[~inside]).all() and (n[~inside] == 0).all() and np.isnan(s[~inside]).all()
    np.testing.assert_allclose(s[inside], 0.1)
    assert n[inside].min() == 3 and n[inside].max() == 7


def test_fold_halves_averages_mirror_lags():
    nphi = 8
    v = np.arange(nphi, dtype=float)
    out, s, n = fold_halves(v, np.full(nphi, 2.0), np.arange(nphi) + 10)
    # lag k and nphi - k averaged; 0 and nphi/2 are their own mirrors
    np.testing.assert_allclose(out, [0, 4, 4, 4, 4])
    np.testing.assert_allclose(s, [2, math.sqrt(2), math.sqrt(2), math.sqrt(2), 2])
    np.testing.assert_array_equal(n, [10, 11, 12, 13, 14])
    v[3] = np.nan
    out, _, _ = fold_halves(v)
    assert out[3] == 5.0  # the finite mirror is kept


# -- the Legendre fit ---------------------------------------------------------------
def test_design_matrix_is_scipy_legendre():
    x = np.linspace(-1, 1, 33)
    a = legendre_design(x, [0, 3, 8, 20])
    for j, order in enumerate([0, 3, 8, 20]):
        np.testing.assert_allclose(a[:, j], eval_legendre(order, x), atol=1e-12)


def test_fit_recovers_an_exact_series_and_its_vif():
    x = np.cos(np.linspace(0.05, math.pi - 0.05, 400))
    ls = np.arange(0, 21, 2)
    coef = np.random.default_rng(1).normal(size=ls.size)
    y = legendre_design(x, ls) @ coef
    fit = fit_legendre(y, np.full(x.size, 0.01), x, ls)
    np.testing.assert_allclose(fit.coef, coef, atol=1e-9)
    assert fit.chi2 < 1e-12 and fit.dof == 400 - ls.size
    assert np.isnan(fit.vif[0]) and np.all(fit.vif[1:] < 4)  # near-complete coverage
    short = np.cos(np.linspace(0.6, math.pi - 0.6, 400))  # 0.6 rad missing at each end
    fit = fit_legendre(legendre_design(short, ls) @ coef, None, short, ls)
    assert fit.vif[-1] > 100  # P_20 cannot be told from the others there


def test_fit_refuses_more_coefficients_than_samples():
    x = np.cos(np.linspace(0, 3, 5))
    with pytest.raises(ParameterError, match="5 usable psi samples cannot determine 6"):
        fit_legendre(np.ones(5), np.ones(5), x, np.arange(6))


# -- lattices and predicted angles ---------------------------------------------------
def test_gold_111_predicted_angles():
    t = predicted_angles("fcc", GOLD_A, "111", LAM)
    r = t.isel(peak=np.flatnonzero(t.reached.values))
    np.testing.assert_allclose(r.psi_deg, np.degrees(np.arccos([1 / 3, -1 / 3])), atol=1e-4)
    np.testing.assert_allclose(r.psi_deg, [70.53, 109.47], atol=0.01)
    np.testing.assert_allclose(r.dphi_deg, [73.5, 115.6], atol=0.05)
    np.testing.assert_array_equal(r.multiplicity, [3, 3])
    # the Friedel mate (180 deg) is listed, never reached
    assert not t.reached.values[-1] and t.psi_deg.values[-1] == pytest.approx(180)
    assert (t.q1.values == pytest.approx(Q111))


def test_predicted_angles_other_lattices():
    # short wavelength: dphi -> psi
    t = predicted_angles("bcc", 3.3, "110", 1e-4)
    np.testing.assert_allclose(t.psi_deg[t.reached], [60, 90, 120], atol=1e-4)
    np.testing.assert_allclose(t.dphi_deg[t.reached], t.psi_deg[t.reached], atol=1e-3)
    np.testing.assert_array_equal(t.multiplicity[t.reached], [4, 2, 4])
    t = predicted_angles("sc", 3.0, "100", 1.0)
    np.testing.assert_allclose(t.psi_deg[t.reached], [90], atol=1e-6)
    # hexagonal 100-100: 60 and 120 deg whatever c; 100-002: 90 deg
    t = predicted_angles("hexagonal", 2.95, "100,002", 1.0, c=4.68)
    same = t.isel(peak=np.flatnonzero((t.reflection2 == "100").values & t.reached.values))
    np.testing.assert_allclose(same.psi_deg, [60, 120], atol=1e-6)
    cross = t.isel(peak=np.flatnonzero((t.reflection2 == "002").values
                                       & (t.reflection1 == "100").values))
    np.testing.assert_allclose(cross.psi_deg, [90], atol=1e-6)
    assert len(equivalents("hcp", (1, 0, 1))) == 12 and len(equivalents("fcc", (2, 2, 0))) == 12
    assert len(equivalents("fcc", (1, 1, 1))) == 8 and len(equivalents("hexagonal", (1, 0, 0))) == 6


def test_allowed_reflections_and_bad_input():
    assert allowed("fcc", (1, 1, 1)) and allowed("fcc", (2, 0, 0))
    assert not allowed("fcc", (1, 0, 0)) and not allowed("fcc", (1, 1, 0))
    assert allowed("bcc", (1, 1, 0)) and not allowed("bcc", (1, 0, 0))
    assert not allowed("hcp", (0, 0, 1)) and allowed("hcp", (0, 0, 2))
    with pytest.raises(ParameterError, match="reflection 110 is forbidden for the fcc"):
        predicted_angles("fcc", GOLD_A, "110", LAM)
    with pytest.raises(ParameterError, match="lattice must be one of"):
        predicted_angles("diamond-ish", GOLD_A, "111", LAM)
    with pytest.raises(ParameterError, match="needs c"):
        predicted_angles("hexagonal", 2.9, "100", LAM)
    with pytest.raises(ParameterError, match="a must be a positive"):
        predicted_angles("fcc", -1, "111", LAM)
    with pytest.raises(ParameterError, match="wavelength must be positive"):
        predicted_angles("fcc", GOLD_A, "111", None)
    with pytest.raises(ParameterError, match="cannot diffract"):
        predicted_angles("fcc", GOLD_A, "111", 5.0)
    with pytest.raises(ParameterError, match="three integers"):
        predicted_angles("fcc", GOLD_A, "11", LAM)
    assert reflections_in_band("fcc", GOLD_A, 2.6, 3.2) == [(1, 1, 1), (2, 0, 0)]


# -- correlations from known B_l (the statistics level) ------------------------------
NPHI = 720
B_EVEN = {n: math.exp(-n / 15) * (1 + 0.3 * (-1) ** (n // 2)) for n in range(2, 21, 2)}


def known_row(theta1: float, theta2: float, scale: float, nphi: int = NPHI) -> np.ndarray:
    """sum_l B_l P_l(cos psi(dphi)) on the lag grid, minus its dphi mean (row normalisation)."""
    d = 2 * math.pi * np.arange(nphi) / nphi
    x = cos_psi(d, theta1, theta2)
    c = sum(scale * b * eval_legendre(n, x) for n, b in B_EVEN.items())
    return c - c.mean()


def known_dataset(seed: int, sem: float = 2e-3, qs=(2.4, 2.9, 3.4), ntag: int = 20,
                  nphi: int = NPHI, cross: bool = True, bootstrap: bool = False) -> xr.Dataset:
    """A result Dataset whose corr follows known B_l through the exact Ewald mapping, plus noise."""
    rng = np.random.default_rng(seed)
    qs = np.asarray(qs, dtype=float)
    t = bragg_angle(qs, LAM)
    half = nphi // 2 + 1
    corr = np.empty((qs.size, nphi))
    for i in range(qs.size):
        noise = rng.normal(0, sem, half)  # an autocorrelation is symmetric: so is its noise
        full = np.concatenate([noise, noise[1:nphi - half + 1][::-1]])
        corr[i] = known_row(t[i], t[i], 1 + 0.1 * i, nphi) + full
    data = {
        "corr": (("q", "dphi"), corr),
        "corr_sem": (("q", "dphi"), np.full(corr.shape, sem)),
        "corr_count": (("q", "dphi"), np.full(corr.shape, 50, np.int64)),
        "row_mean": (("tag", "q"), np.ones((ntag, qs.size))),
    }
    coords = {"q": qs, "dphi": 2 * math.pi * np.arange(nphi) / nphi, "tag": np.arange(ntag)}
    attrs = {MARKER: "test", "complete": True, "wavelength": LAM, "nphi": nphi, "ci_level": 0.0}
    if cross:
        i1, i2 = np.array([0, 1]), np.array([1, 2])
        cc = np.stack([known_row(t[a], t[b], 0.5, nphi) for a, b in zip(i1, i2, strict=True)])
        cc = cc + rng.normal(0, sem, cc.shape)
        data.update({"corr_cross": (("qpair", "dphi"), cc),
                     "corr_cross_sem": (("qpair", "dphi"), np.full(cc.shape, sem)),
                     "corr_cross_count": (("qpair", "dphi"), np.full(cc.shape, 50, np.int64))})
        coords.update({"qpair": np.arange(2), "q1": ("qpair", qs[i1]), "q2": ("qpair", qs[i2]),
                       "q1_index": ("qpair", i1), "q2_index": ("qpair", i2)})
    if bootstrap:
        z = 1.959963984540054
        data["corr_ci_low"] = (("q", "dphi"), corr - 2 * z * sem)   # twice as wide as the sem
        data["corr_ci_high"] = (("q", "dphi"), corr + 2 * z * sem)
        attrs["ci_level"] = 0.95
    return xr.Dataset(data, coords=coords, attrs=attrs)


def write_store(ds: xr.Dataset, path: Path) -> Path:
    ds.to_zarr(path, mode="w", zarr_format=3, consolidated=False)
    consolidate(path)
    return path


def truth(row_scale: float) -> np.ndarray:
    return np.array([row_scale * B_EVEN[n] for n in range(2, 21, 2)])


def test_bl_recovered_within_2_percent_auto_and_cross():
    ds = known_dataset(seed=0)
    out = compute_structure(ds, lmax=20)
    even = list(range(2, 21, 2))
    for i in range(3):
        got = out.bl.isel(q=i).sel(l=even).values
        np.testing.assert_allclose(got, truth(1 + 0.1 * i), rtol=0.02)
        assert not out.bl_flag.isel(q=i).sel(l=even).any()
        assert 0.7 < float(out.bl_chi2[i]) < 1.3
    for k in range(2):
        np.testing.assert_allclose(out.bl_cross.isel(qpair=k).sel(l=even).values, truth(0.5),
                                   rtol=0.02)
    # l = 0 is not observable after the row normalisation; odd l are not fitted
    assert np.isnan(out.bl.sel(l=0)).all() and out.bl_flag.sel(l=0).all()
    assert np.isnan(out.bl.sel(l=list(range(1, 21, 2)))).all()


def test_bl_error_bars_cover_the_truth_at_the_stated_rate():
    z = []
    for seed in range(60):
        out = compute_structure(known_dataset(seed=seed, sem=0.02), lmax=20)
        for i, scale in enumerate((1.0, 1.1, 1.2)):
            b = out.bl.isel(q=i).sel(l=list(range(2, 21, 2)))
            e = out.bl_sem.isel(q=i).sel(l=list(range(2, 21, 2)))
            z.append((b.values - truth(scale)) / e.values)
        for k in range(2):
            b = out.bl_cross.isel(qpair=k).sel(l=list(range(2, 21, 2)))
            e = out.bl_cross_sem.isel(qpair=k).sel(l=list(range(2, 21, 2)))
            z.append((b.values - truth(0.5)) / e.values)
    z = np.abs(np.concatenate(z))  # 3000 coefficients
    assert 0.64 < np.mean(z < 1) < 0.72, np.mean(z < 1)   # 68.3 %
    assert 0.935 < np.mean(z < 2) < 0.97, np.mean(z < 2)  # 95.4 %


def test_odd_l_check_comes_out_zero_or_flagged():
    ds = known_dataset(seed=3)
    out = compute_structure(ds, lmax=12, odd=True)
    even = compute_structure(ds, lmax=12)
    odd = out.bl.sel(l=[1, 3, 5, 7, 9, 11])
    z = np.abs(odd / out.bl_sem.sel(l=odd.l))
    # the reached psi range stops at pi - 2 theta: without Friedel's symmetry to lean
    # on, odd and even l are nearly collinear there. Odd l come out consistent with zero
    # or flagged, and fitting them inflates the even ones' errors many times over
    assert ((z < 4) | out.bl_flag.sel(l=odd.l)).all()
    assert out.bl_flag.sel(l=odd.l).any()
    ratio = (out.bl_sem / even.bl_sem).sel(l=[2, 4, 6, 8, 10, 12])
    assert float(ratio.min()) > 1.5 and float(ratio.max()) > 5
    assert not even.bl_flag.sel(l=[2, 4, 6, 8, 10, 12]).any()
    assert out.attrs["structure_odd_l"] is True


def test_legendre_sum_follows_corr_psi(tmp_path):
    path = write_store(known_dataset(seed=4), tmp_path / "k.zarr")
    ds = add_structure(path, lmax=20)
    for cross in (False, True):
        c = ds.corr_cross_psi if cross else ds.corr_psi
        s = ds.corr_cross_psi_sem if cross else ds.corr_psi_sem
        series = bl_series(ds, cross=cross)
        reached = np.isfinite(c.values)
        assert reached.sum() > 0.7 * c.size
        np.testing.assert_array_equal(np.isfinite(series.values), reached)
        z = ((c - series) / s).values[reached]
        assert np.sqrt(np.mean(z**2)) < 1.3  # residuals at the noise level
    # and where psi is not reached (near pi - 2 theta .. pi) both are NaN
    t = float(bragg_angle(ds.q.values[-1], LAM))
    assert np.isnan(ds.corr_psi.isel(q=-1).sel(psi=slice(math.pi - 2 * t + 0.01, None))).all()


def test_bootstrap_errors_used_when_present():
    ds = known_dataset(seed=5, cross=False, bootstrap=True)
    auto = compute_structure(ds, lmax=10)
    sem = compute_structure(ds, lmax=10, errors="sem")
    # the intervals are twice as wide as corr_sem: so are the errors of B_l
    ratio = (auto.bl_sem / sem.bl_sem).sel(l=[2, 4, 6, 8, 10]).values
    np.testing.assert_allclose(ratio, 2.0, rtol=1e-6)
    assert "bootstrap" in auto.attrs["structure_errors"]
    with pytest.raises(ParameterError, match="errors='bootstrap' needs"):
        compute_structure(known_dataset(seed=5, cross=False), errors="bootstrap")


# -- the store layer -----------------------------------------------------------------
def test_add_structure_writes_replaces_and_keeps_the_store_complete(tmp_path):
    path = write_store(known_dataset(seed=6), tmp_path / "r.zarr")
    before = dict(zarr.open_group(path).attrs)
    ds = add_structure(path, lmax=10)
    assert ds.sizes["l"] == 11 and ds.attrs["structure_lmax"] == 10
    ds = add_structure(path, lmax=6, npsi=91)   # again: replaced, not appended
    assert ds.sizes["l"] == 7 and ds.sizes["psi"] == 91 and ds.attrs["structure_lmax"] == 6
    for k, v in before.items():
        assert ds.attrs[k] == v
    assert ds.attrs["complete"] is True
    plain = xr.open_zarr(path)   # the consolidated metadata is up to date
    assert plain.sizes["l"] == 7 and "bl_cross" in plain and "corr" in plain
    assert set(structure_variables()) - {"psi", "l"} <= set(plain.data_vars)
    np.testing.assert_allclose(plain.corr.values, known_dataset(seed=6).corr.values)


def bad_inputs(tmp_path):
    nocorr = known_dataset(seed=0, cross=False).drop_vars(["corr"])
    nowave = known_dataset(seed=0, cross=False)
    del nowave.attrs["wavelength"]
    return {"nocorr": nocorr, "nowave": nowave}


@pytest.mark.parametrize("case, kwargs, match", [
    ("nocorr", {}, "the result has no corr"),
    ("nowave", {}, "no wavelength attribute"),
    ("ok", {"lmax": -2}, "lmax must be >= 0"),
    ("ok", {"lmax": 800}, "lmax=800 needs 401 coefficients"),
    ("ok", {"odd": True, "lmax": 400}, "lmax may be at most 357"),
    ("ok", {"skip_lags": -1}, "skip_lags must be >= 0"),
    ("ok", {"errors": "guess"}, "errors must be one of"),
    ("ok", {"max_vif": 0.5}, "max_vif must be a number >= 1"),
])
def test_bad_input_is_a_clear_error_and_leaves_the_store_untouched(tmp_path, case, kwargs,
                                                                   match):
    ds = bad_inputs(tmp_path).get(case, known_dataset(seed=0, cross=False))
    path = write_store(ds, tmp_path / "bad.zarr")
    listing = sorted(p.name for p in path.iterdir())
    with pytest.raises(ParameterError, match=match):
        add_structure(path, **kwargs)
    assert sorted(p.name for p in path.iterdir()) == listing
    assert "bl" not in open_result(path)


def test_not_a_store_or_incomplete(tmp_path):
    with pytest.raises(OutputError, match="not a sacla_dask result store"):
        add_structure(tmp_path / "nothing.zarr")
    ds = known_dataset(seed=0, cross=False)
    ds.attrs["complete"] = False
    path = write_store(ds, tmp_path / "half.zarr")
    with pytest.raises(IncompleteStoreError):
        add_structure(path)


def test_reads_only_the_statistics_of_a_5050_tag_store(tmp_path):
    """A store of 5050 tags (nphi 5000, 30 q): seconds, and no polar image needed."""
    qs = np.linspace(2.6, 2.75, 30)
    ds = known_dataset(seed=7, qs=qs, ntag=5050, nphi=5000, cross=False)
    ds["polar"] = (("tag", "q", "phi"),
                   dask.array.zeros((5050, qs.size, 5000), dtype=np.float32,
                                    chunks=(64, qs.size, 5000)))
    ds = ds.assign_coords(phi=ds.dphi.values)
    path = tmp_path / "big.zarr"
    ds.to_zarr(path, mode="w", zarr_format=3, consolidated=False, compute=False)
    zarr.open_array(str(path), path="corr", mode="r+")[...] = ds.corr.values  # the statistics
    zarr.open_array(str(path), path="corr_sem", mode="r+")[...] = ds.corr_sem.values
    zarr.open_array(str(path), path="corr_count", mode="r+")[...] = ds.corr_count.values
    del zarr.open_group(str(path), mode="r+")["polar"]   # no polar image to read
    consolidate(path)
    assert "polar" not in open_result(path)
    t0 = time.perf_counter()
    out = add_structure(path, lmax=20)
    seconds = time.perf_counter() - t0
    assert seconds < 10, seconds
    assert out.sizes["tag"] == 5050 and out.bl.shape == (30, 21)
    np.testing.assert_allclose(out.bl.isel(q=0).sel(l=list(range(2, 21, 2))), truth(1.0),
                               rtol=0.02)


def test_cli_structure_and_its_errors(tmp_path):
    path = write_store(known_dataset(seed=8), tmp_path / "c.zarr")
    res = CliRunner().invoke(main, ["structure", str(path), "--lmax", "12"])
    assert res.exit_code == 0, res.output
    assert "bl: 3 q rows" in res.output and "bl_cross: 2 qpair rows" in res.output
    assert open_result(path).attrs["structure_lmax"] == 12
    res = CliRunner().invoke(main, ["structure", str(path), "--lmax", "-3"])
    assert res.exit_code == 2 and "error: lmax must be >= 0" in res.output


# -- figures -------------------------------------------------------------------------
def test_plot_result_draws_corr_psi_and_bl_with_angles(tmp_path):
    from matplotlib.image import imread

    from sacla_dask.plot import plot_result

    path = write_store(known_dataset(seed=9), tmp_path / "p.zarr")
    ds = add_structure(path, lmax=20)
    angles = predicted_angles("fcc", GOLD_A, "111", LAM)
    rep = plot_result(ds, tmp_path / "figs", dpi=50, angles=angles)
    assert {"correlation", "correlation_profile", "correlation_psi", "bl"} <= set(rep.written)
    for name in ("correlation_psi", "bl"):
        assert np.ptp(imread(rep.written[name])[..., :3]) > 0.5
    res = CliRunner().invoke(main, ["plot", str(path), "-o", str(tmp_path / "cli"), "--dpi",
                                    "40", "--lattice", "fcc", "--a", "4.078", "--reflections",
                                    "111"])
    assert res.exit_code == 0, res.output
    assert "111-111 psi 70.53 deg at dphi 73.52 deg" in res.output
    assert (tmp_path / "cli" / "bl.png").exists()
    res = CliRunner().invoke(main, ["plot", str(path), "-o", str(tmp_path / "cli"),
                                    "--lattice", "fcc", "--a", "4.078", "--reflections", "100"])
    assert res.exit_code == 2 and "reflection 100 is forbidden for the fcc" in res.output


def test_angle_marks_are_labelled():
    from matplotlib.figure import Figure

    from sacla_dask.structure.plot import mark_angles

    ax = Figure().add_subplot()
    ax.set_xlim(0, 2 * math.pi)
    xs = mark_angles(ax, predicted_angles("fcc", GOLD_A, "111", LAM))
    np.testing.assert_allclose(sorted(xs), sorted(np.radians([73.52, 115.64, 244.36, 286.48])),
                               atol=1e-3)
    assert any("111–111 ψ=70.5° at Δφ=73.5°" in t.get_text() for t in ax.texts)
    ax = Figure().add_subplot()
    ax.set_xlim(0, 180)
    xs = mark_angles(ax, predicted_angles("fcc", GOLD_A, "111", LAM), kind="psi", degrees=True)
    np.testing.assert_allclose(xs, [70.53, 109.47], atol=0.01)
    assert [t.get_text().strip() for t in ax.texts] == ["111–111 70.5°", "111–111 109.5°"]


# -- the synthetic nanocrystals --------------------------------------------------------
def test_random_rotations_are_uniform_on_so3():
    r = random_rotations(np.random.default_rng(0), 20000)
    np.testing.assert_allclose(r @ r.transpose(0, 2, 1), np.broadcast_to(np.eye(3), r.shape),
                               atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(r), 1, atol=1e-12)
    z = r[:, :, 2]  # the image of a fixed axis: uniform on the sphere
    assert np.abs(z.mean(axis=0)).max() < 0.02
    np.testing.assert_allclose(np.histogram(z[:, 2], bins=4, range=(-1, 1))[0] / 20000, 0.25,
                               atol=0.015)
    # and the trace: uniform rotations have P(angle) ~ (1 - cos w), mean trace 0
    assert abs(np.trace(r, axis1=1, axis2=2).mean()) < 0.03


@pytest.fixture(scope="module")
def gold(tmp_path_factory):
    """A gold nanocrystal run (random orientations, Ewald sphere, Poisson counts) processed
    over the 111 ring, with the structure variables added."""
    d = tmp_path_factory.mktemp("gold")
    truth_ = write_synthetic_run(
        d / "gold.h5", n_tags=300, n_dark=0, shape=(256, 256), ring_radii=(),
        modulation_amplitude=0.0, background=1.0, photon_energy=12398.419843320026 / LAM,
        pixel_size=400e-6, distance=0.054,
        nanocrystals=Nanocrystals(per_shot=15, lattice="fcc", a=GOLD_A, reflections=((1, 1, 1),),
                                  amplitudes=(200.0,), rocking_width=0.05, spot_width=1.0),
        seed=5)
    g = truth_.geometry
    r = float(g.q_to_radius(Q111))
    with dask.config.set(scheduler="threads"):
        plan_run(truth_.path, qmin=float(g.radius_to_q(r - 2)), qmax=float(g.radius_to_q(r + 2)),
                 center=(truth_.center_x, truth_.center_y), pixel_size=truth_.pixel_size,
                 distance=truth_.distance, out=d / "gold.zarr", chunks=50).execute()
    return truth_, add_structure(d / "gold.zarr", lmax=20)


def test_gold_spots_land_on_the_111_ring(gold):
    truth_, ds = gold
    assert 5 < truth_.spots_per_shot.mean() < 100
    prof = ds.row_mean.mean("tag")
    assert abs(float(prof.q[int(np.argmax(prof.values))]) - Q111) < 0.02


def test_gold_corr_psi_peaks_at_the_fcc_interplanar_angles(gold):
    truth_, ds = gold
    row = ds.corr_psi.sel(q=Q111, method="nearest")
    sem = ds.corr_psi_sem.sel(q=Q111, method="nearest")
    psi = np.degrees(ds.psi.values)
    predicted = predicted_angles("fcc", GOLD_A, "111", ds.attrs["wavelength"])
    reached = predicted.isel(peak=np.flatnonzero(predicted.reached.values))
    np.testing.assert_allclose(reached.psi_deg, [70.53, 109.47], atol=0.01)
    np.testing.assert_allclose(reached.dphi_deg, [73.5, 115.6], atol=0.05)
    off = (psi > 20) & (psi < 145) & (np.abs(psi - 70.5) > 6) & (np.abs(psi - 109.5) > 6)
    noise = float(np.nanstd(row.values[off]))
    for want, dphi_want in zip(reached.psi_deg.values, reached.dphi_deg.values, strict=True):
        near = np.abs(psi - want) < 8
        i = np.flatnonzero(near)[np.nanargmax(row.values[near])]
        assert abs(psi[i] - want) < 1.5, (psi[i], want)
        assert row.values[i] > 5 * sem.values[i]                      # above its error
        assert row.values[i] - np.nanmean(row.values[off]) > 5 * noise  # and the background
        # on the detector the same peak sits at the predicted dphi, not at psi
        c = ds.corr.sel(q=Q111, method="nearest")
        dphi = np.degrees(ds.dphi.values)
        near = np.abs(dphi - dphi_want) < 8
        j = np.flatnonzero(near)[np.nanargmax(c.values[near])]
        assert abs(dphi[j] - dphi_want) < 1.5 and abs(dphi[j] - want) > 2
