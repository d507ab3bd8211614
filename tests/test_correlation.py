"""Correlation maths against known truth: brute force, analytic answers, synthetic runs.

The references here are independent of the module: explicit loops over valid bin
pairs for the mask normalisation, closed forms for pure cosines, synthetic runs whose
modulation (order, ring, phase offset) is known, and direct numpy means over pairs.
"""

from __future__ import annotations

import os
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from dask.array.utils import assert_eq
from helpers import raise_if_dask_computes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sacla_dask.correlation import (
    CorrelationPlan,
    PairSums,
    bootstrap_weights,
    cross_matrix,
    difference_correlation,
    difference_statistic,
    finalize,
    fourier_coefficients,
    make_plan,
    mask_bragg_spots,
    pair_statistics,
    pair_sums,
    parse_q_pairs,
    robust_outliers,
    summarize_pairs,
)
from sacla_dask.errors import ParameterError
from sacla_dask.io.synthetic import panel_mask, write_synthetic_run
from sacla_dask.plan import plan_run


# -- independent references ----------------------------------------------------
def brute_correlation(a, b, polar_mask, q1, q2):
    """Mean of D(q1, phi) D(q2, phi + k) over the bin pairs valid in both shots, by loops."""
    nphi = a.shape[-1]
    va = np.isfinite(a) & polar_mask
    vb = np.isfinite(b) & polar_mask
    v = va & vb
    d = np.where(v, np.nan_to_num(a) - np.nan_to_num(b), 0.0)
    out = np.full((len(q1), nphi), np.nan)
    for r, (i, j) in enumerate(zip(q1, q2, strict=True)):
        for k in range(nphi):
            tot, cnt = 0.0, 0
            for p in range(nphi):
                if v[i, p] and v[j, (p + k) % nphi]:
                    tot += d[i, p] * d[j, (p + k) % nphi]
                    cnt += 1
            if cnt:
                out[r, k] = tot / cnt
    return out


def random_polar(rng, ntag, nq, nphi, pm, spots=0.0):
    x = (1 + 0.2 * rng.standard_normal((ntag, nq, nphi))) * pm
    if spots:
        x[(rng.random(x.shape) < spots) & pm] = np.nan  # shot-specific masked bins
    return x


def linked_sem(per, links):
    """Standard error of the mean over pairs ``per`` (npair, ...; NaN = no data) when pair
    ``k`` is correlated with pair ``k - 1`` where ``links[k]`` (a 1-dependent sequence):
    ``(gamma0 + 2 gamma1 n12 / n) / n``, gamma1 the lag-1 autocovariance over the linked
    pairs with data in the bin."""
    n = np.isfinite(per).sum(0)
    m = np.nanmean(per, 0)
    gamma0 = np.nanvar(per, 0, ddof=1)
    prod = np.where(np.reshape(links[1:], (-1,) + (1,) * (per.ndim - 1)),
                    per[1:] * per[:-1], np.nan)
    n12 = np.isfinite(prod).sum(0)
    gamma1 = np.where(n12 > 0, np.nansum(prod, 0) / np.maximum(n12, 1) - m * m, 0.0)
    return np.sqrt(np.clip(gamma0 + 2 * gamma1 * n12 / n, 0, None) / n)


# -- mask normalisation --------------------------------------------------------
@pytest.mark.parametrize("spots", [0.0, 0.15])
def test_mask_normalisation_equals_brute_force(spots):
    rng = np.random.default_rng(3)
    nq, nphi = 3, 17
    pm = rng.random((nq, nphi)) > 0.3
    pol = random_polar(rng, 6, nq, nphi, pm, spots)
    plan = make_plan(pm, "all")
    got = difference_correlation(pol[:3], pol[3:], plan)
    for i in range(3):
        ref = brute_correlation(pol[i], pol[3 + i], pm, plan.q1, plan.q2)
        np.testing.assert_allclose(got[i], ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(np.isnan(got[i]), np.isnan(ref))


@pytest.mark.parametrize("spots", [0.0, 0.02])
def test_float32_images_correlate_in_float32_to_float32_accuracy(spots):
    """The pipeline's float32 polar images take float32 FFTs: against the float64 loops."""
    rng = np.random.default_rng(8)
    nq, nphi = 3, 250       # 2 x 5^3: a fast FFT length, as the default nphi
    pm = rng.random((nq, nphi)) > 0.2
    pol = random_polar(rng, 4, nq, nphi, pm, spots)
    plan = make_plan(pm, "all")
    got = difference_correlation(pol[:2].astype(np.float32), pol[2:].astype(np.float32), plan)
    assert got.dtype == np.float64
    for i in range(2):
        ref = brute_correlation(pol[i].astype(np.float32).astype(np.float64),
                                pol[2 + i].astype(np.float32).astype(np.float64), pm,
                                plan.q1, plan.q2)
        scale = np.nanmax(np.abs(ref))  # the zero-lag value: float32 round-off is relative to it
        np.testing.assert_allclose(got[i], ref, rtol=0, atol=1e-5 * scale)
        np.testing.assert_array_equal(np.isnan(got[i]), np.isnan(ref))
    stat = difference_statistic(pol[:2].astype(np.float32), pol[2:].astype(np.float32), pm)
    np.testing.assert_allclose(stat, difference_statistic(pol[:2], pol[2:], pm), rtol=1e-5)


def test_mask_norm_counts_valid_bin_pairs():
    pm = np.zeros((2, 8), bool)
    pm[0, [0, 1, 2]] = True
    pm[1, [4]] = True
    plan = make_plan(pm, np.array([[0, 1]]))
    # autocorrelation of row 0: lags 0 (3 pairs), 1 and 7 (2), 2 and 6 (1), else 0
    np.testing.assert_array_equal(plan.mask_norm[0], [3, 2, 1, 0, 0, 0, 1, 2])
    # cross 0 -> 1: bins 0,1,2 with bin 4 at lags 4, 3, 2
    np.testing.assert_array_equal(plan.mask_norm[2], [0, 0, 1, 1, 1, 0, 0, 0])


@pytest.mark.parametrize("bad", [None, np.nan, np.inf])
def test_difference_is_zero_outside_bins_valid_in_both_shots(bad):
    """The pair difference against a plain masked reference, with and without
    non-finite bins (finite images take a faster path), masked bins not zero."""
    from sacla_dask.correlation import _difference

    rng = np.random.default_rng(3)
    pm = rng.random((3, 16)) > 0.3
    a = rng.normal(size=(2, 3, 16)).astype(np.float32)
    b = rng.normal(size=(2, 3, 16)).astype(np.float32)  # masked bins hold data too
    if bad is not None:
        a[1, 0, 2] = bad
        b[1, 2, 5] = bad
        pm[0, 2] = pm[2, 5] = True
    ref_valid = np.isfinite(a) & np.isfinite(b) & pm
    ref = np.where(ref_valid, a.astype(np.float64) - b, 0.0)
    d, valid, per_pair = _difference(a, b, pm)
    assert d.dtype == np.float32
    np.testing.assert_array_equal(valid, ref_valid)
    np.testing.assert_array_equal(d, ref.astype(np.float32))
    assert per_pair == (bad is not None)


def test_bins_without_valid_pair_have_count_zero_and_nan_mean():
    pm = np.ones((2, 8), bool)
    pm[1] = False
    pm[1, 0] = True               # one valid bin: only lag 0 has data in row 1
    rng = np.random.default_rng(0)
    pol = random_polar(rng, 5, 2, 8, pm)
    plan = make_plan(pm)
    res = summarize_pairs(pol, np.arange(4), np.arange(1, 5), plan)
    assert res["count"][1, 0] == 4 and np.all(res["count"][1, 1:] == 0)
    assert np.all(np.isnan(res["mean"][1, 1:])) and np.isfinite(res["mean"][1, 0])
    assert np.all(res["count"][0] == 4)


def test_statistics_equal_direct_numpy_over_pairs():
    rng = np.random.default_rng(1)
    pm = rng.random((3, 20)) > 0.2
    pol = random_polar(rng, 12, 3, 20, pm, spots=0.05)
    ia, ib = np.arange(11), np.arange(1, 12)
    plan = make_plan(pm, "all")
    res = summarize_pairs(pol, ia, ib, plan, keep_pairs=True)
    per = np.stack([brute_correlation(pol[a], pol[b], pm, plan.q1, plan.q2)
                    for a, b in zip(ia, ib, strict=True)])
    cnt = np.isfinite(per).sum(0)
    np.testing.assert_array_equal(res["count"], cnt)
    np.testing.assert_allclose(res["mean"], np.nanmean(per, 0), rtol=1e-10)
    # consecutive pairs share a shot: each is linked to the one before
    np.testing.assert_allclose(res["sem"], linked_sem(per, np.r_[False, [True] * 10]),
                               rtol=1e-8)
    np.testing.assert_allclose(res["pairs"], per, rtol=1e-5, atol=1e-7)
    d = pol[ia] - pol[ib]
    stat = [np.nanmean(x[pm & np.isfinite(x)] ** 2) for x in d]
    np.testing.assert_allclose(res["stat"], stat, rtol=1e-12)
    np.testing.assert_allclose(difference_statistic(pol[ia], pol[ib], pm), stat, rtol=1e-12)


def test_sem_of_pairs_sharing_shots_and_of_disjoint_pairs():
    """The standard error counts the correlation of pairs that share a shot with the pair
    before them (in pair_order), also with shot-specific masked bins; pairs given out of
    order are summed in that order; disjoint pairs keep the independent-pairs formula."""
    from sacla_dask.correlation import pair_links, pair_order

    rng = np.random.default_rng(21)
    pm = rng.random((2, 16)) > 0.2
    pol = random_polar(rng, 14, 2, 16, pm, spots=0.08)
    # chains t0..t6 and t8..t13 (a dark shot t7 between), given shuffled; and a pair
    # (t3, t10) whose shots are also in other pairs but that is next to none of them
    ia = np.r_[np.arange(6), np.arange(8, 13), 3]
    ib = np.r_[np.arange(1, 7), np.arange(9, 14), 10]
    shuffle = rng.permutation(ia.size)
    order = pair_order(ia[shuffle], ib[shuffle])
    sa, sb = ia[shuffle][order], ib[shuffle][order]
    links = pair_links(sa, sb)
    # sorted by later then earlier shot, (t3, t10) falls between (t8, t9) and (t9, t10):
    # linked to (t9, t10) by t10; (t8, t9) - (t9, t10) and the pairs holding t3 are not
    # next to each other, so those shared shots are not counted
    assert [(int(a), int(b)) for a, b in zip(sa, sb, strict=True)][6:9] == [(8, 9), (3, 10),
                                                                           (9, 10)]
    assert links.tolist() == [False] + [True] * 5 + [False] * 2 + [True] * 4
    plan = make_plan(pm)
    res = summarize_pairs(pol, ia[shuffle], ib[shuffle], plan)
    per = np.stack([brute_correlation(pol[a], pol[b], pm, plan.q1, plan.q2)
                    for a, b in zip(sa, sb, strict=True)])
    np.testing.assert_allclose(res["mean"], np.nanmean(per, 0), rtol=1e-10)
    np.testing.assert_allclose(res["sem"], linked_sem(per, links), rtol=1e-8)
    naive = np.nanstd(per, 0, ddof=1) / np.sqrt(np.isfinite(per).sum(0))
    assert not np.allclose(res["sem"], naive, rtol=1e-3)
    # disjoint pairs: nothing linked, the independent-pairs standard error
    ia, ib = np.arange(0, 14, 2), np.arange(1, 14, 2)
    res = summarize_pairs(pol, ia, ib, plan)
    per = np.stack([brute_correlation(pol[a], pol[b], pm, plan.q1, plan.q2)
                    for a, b in zip(ia, ib, strict=True)])
    np.testing.assert_allclose(res["sem"], np.nanstd(per, 0, ddof=1)
                               / np.sqrt(np.isfinite(per).sum(0)), rtol=1e-8)


@pytest.mark.parametrize("amplitude", [0.0, 0.3])
def test_sem_of_overlapping_pairs_is_the_spread_of_the_mean(amplitude):
    """Monte Carlo truth: over many independent runs, the spread of the mean correlation of
    overlapping consecutive pairs equals the standard error each run reports; the
    independent-pairs formula underestimates it (white noise: by sqrt(1.5); with a
    shot-to-shot angular signal, more)."""
    rng = np.random.default_rng(22)
    nq, nphi, nshot, nrun = 2, 32, 41, 300
    pm = np.ones((nq, nphi), bool)
    plan = make_plan(pm)
    phi = np.linspace(0, 2 * np.pi, nphi, endpoint=False)
    ia = np.arange(nshot - 1)
    means, sems, naive = [], [], []
    for _ in range(nrun):
        pol = 1 + 0.1 * rng.standard_normal((nshot, nq, nphi))
        amp = amplitude * rng.standard_normal((nshot, nq, 1))
        pol += amp * np.cos(6 * phi + rng.uniform(0, 2 * np.pi, (nshot, nq, 1)))
        res = summarize_pairs(pol, ia, ia + 1, plan, keep_pairs=True)
        means.append(res["mean"])
        sems.append(res["sem"])
        per = np.asarray(res["pairs"], np.float64)
        naive.append(per.std(0, ddof=1) / np.sqrt(per.shape[0]))
    lags = slice(1, nphi // 2)  # lag 0 and the mirrored lags add nothing new
    spread = np.var(np.stack(means), 0, ddof=1)[:, lags].mean()
    reported = np.mean(np.square(sems), 0)[:, lags].mean()
    independent = np.mean(np.square(naive), 0)[:, lags].mean()
    assert 0.85 < spread / reported < 1.15, spread / reported
    assert spread / independent > 1.3, spread / independent


@pytest.mark.parametrize("nphi", [24, 25])
def test_autocorrelation_sums_hold_half_the_lags(nphi):
    """Autocorrelations are even in the lag: their sums hold lags 0 .. nphi // 2 (cross
    rows: all), and the statistics of every lag (mean, sem, count, bootstrap bounds, kept
    pairs, a held-out wild pair added back) equal the brute-force loops over all lags."""
    rng = np.random.default_rng(nphi)
    nq = 3
    pm = rng.random((nq, nphi)) > 0.2
    pol = random_polar(rng, 9, nq, nphi, pm, spots=0.05)
    pol[4] *= 50.0  # a wild shot: its pairs are held out of the sums, then added back
    ia, ib = np.arange(8), np.arange(1, 9)
    plan = make_plan(pm)
    assert plan.nlag == nphi // 2 + 1 and make_plan(pm, "all").nlag == nphi
    sums, _, _, _ = pair_sums(pol, pol, plan, ia=ia, ib=ib)
    assert sums.s1.shape == sums.count.shape == (nq, nphi // 2 + 1) and sums.nphi == nphi
    cross, _, _, _ = pair_sums(pol, pol, make_plan(pm, "all"), ia=ia, ib=ib)
    assert cross.s1.shape[1] == nphi and cross.nphi is None
    per = np.stack([brute_correlation(pol[a], pol[b], pm, plan.q1, plan.q2)
                    for a, b in zip(ia, ib, strict=True)])
    res = summarize_pairs(pol, ia, ib, plan, keep_pairs=True, n_boot=5)
    cnt = np.isfinite(per).sum(0)
    np.testing.assert_array_equal(res["count"], cnt)
    np.testing.assert_allclose(res["mean"], np.nanmean(per, 0), rtol=1e-10)
    np.testing.assert_allclose(res["sem"], linked_sem(per, np.r_[False, [True] * 7]), rtol=1e-8)
    np.testing.assert_allclose(res["pairs"], per, rtol=1e-5, atol=1e-7)
    # the bootstrap bounds of every lag: those of the mirrored lag
    for key in ("ci_low", "ci_high"):
        assert res[key].shape == (nq, nphi)
        np.testing.assert_array_equal(res[key][:, 1:], res[key][:, :0:-1])
    lazy = pair_statistics(da.from_array(pol, chunks=(3, -1, -1)), ia, ib, plan, reject=3)
    kept = ~np.asarray(lazy.rejected)
    assert not kept.all()  # the wild pairs were held out, then rejected
    assert_eq(lazy.mean, np.nanmean(per[kept], 0), rtol=1e-10)
    assert_eq(lazy.count, np.isfinite(per[kept]).sum(0))


def test_full_lags_mirrors_an_even_correlation():
    """full_lags restores lags nphi//2+1 .. nphi-1 of circular autocorrelations (numpy FFT
    reference), for even and odd nphi; a complete array is returned as it is."""
    from sacla_dask.correlation import full_lags

    rng = np.random.default_rng(3)
    for nphi in (1, 2, 7, 8):
        x = rng.standard_normal((4, nphi))
        auto = np.fft.irfft(np.abs(np.fft.rfft(x)) ** 2, n=nphi)  # even in the lag
        np.testing.assert_allclose(full_lags(auto[:, :nphi // 2 + 1], nphi), auto,
                                   rtol=1e-12, atol=1e-12)
        assert full_lags(auto, nphi) is auto
    with pytest.raises(ValueError, match="lags"):
        full_lags(np.zeros((2, 3)), 8)


def test_pairs_masked_in_some_rows_only_are_counted_in_every_row_block():
    """A pair with shot-specific masked bins (Bragg spots, NaN) in a few q rows only,
    correlated in several blocks of rows (a wide band): its count, mean and bootstrap
    weights in the other rows are those of one block, and the brute-force mean."""
    rng = np.random.default_rng(7)
    nq, nphi = 9, 24
    pm = rng.random((nq, nphi)) > 0.15
    pol = random_polar(rng, 6, nq, nphi, pm)
    pol[2, 1, 3] = np.nan  # pairs (1, 2) and (2, 3): one bin of their own in row 1
    pol[4, 7, 10] = np.nan  # pairs (3, 4) and (4, 5): in row 7
    ia, ib = np.arange(5), np.arange(1, 6)
    plan = make_plan(pm)
    w = bootstrap_weights(np.stack([ia, ib], 1), 7, seed=3)
    blocks = pair_sums(pol, pol, plan, ia=ia, ib=ib, weights=w,
                       block_bytes=3 * 8 * nphi)  # blocks of 3 rows
    whole = pair_sums(pol, pol, plan, ia=ia, ib=ib, weights=w)
    per = np.stack([brute_correlation(pol[a], pol[b], pm, plan.q1, plan.q2)
                    for a, b in zip(ia, ib, strict=True)])
    cnt = np.isfinite(per).sum(0)
    for got, _, _, _ in (blocks, whole):
        # the sums hold the lags 0 .. nphi // 2 of the (even) autocorrelations
        np.testing.assert_array_equal(got.count, cnt[:, :plan.nlag])
        np.testing.assert_array_equal(got.full(got.count), cnt)
        assert got.n == 5
        with np.errstate(invalid="ignore"):
            np.testing.assert_allclose(got.full(got.s1 / got.count), np.nanmean(per, 0),
                                       rtol=1e-10)
        np.testing.assert_array_equal(got.full(got.boot_w),
                                      (w[:, :, None, None] * np.isfinite(per)).sum(1))
    np.testing.assert_allclose(blocks[0].s2, whole[0].s2, rtol=1e-12)
    np.testing.assert_allclose(blocks[0].boot_s1, whole[0].boot_s1, rtol=1e-12)
    lazy = pair_statistics(da.from_array(pol, chunks=(2, -1, -1)), ia, ib, plan,
                           block_bytes=3 * 8 * nphi)
    assert_eq(lazy.count, cnt)
    assert_eq(lazy.mean, np.nanmean(per, 0), rtol=1e-10)


def test_pairs_without_data_are_not_counted():
    """A shot with no valid bin (an unreadable image: NaN) leaves its pairs out entirely."""
    rng = np.random.default_rng(9)
    pm = np.ones((2, 10), bool)
    pol = random_polar(rng, 8, 2, 10, pm)
    pol[3] = np.nan
    ia = np.arange(7)
    res = summarize_pairs(pol, ia, ia + 1, make_plan(pm))
    assert res["n_pairs"] == 5 and np.all(res["count"] == 5)
    assert np.isnan(res["stat"][[2, 3]]).all()
    good = np.array([0, 1, 4, 5, 6])
    ref = summarize_pairs(pol, ia[good], ia[good] + 1, make_plan(pm))
    np.testing.assert_allclose(res["mean"], ref["mean"], rtol=1e-12)
    lazy = pair_statistics(da.from_array(pol, chunks=(3, -1, -1)), ia, ia + 1, make_plan(pm),
                           reject=3)
    assert int(lazy.n_pairs.compute()) == 5


# -- analytic answers ------------------------------------------------------------
def test_fourier_coefficients_of_a_pure_cosine():
    """D = A cos(n phi): C(k) = A^2/2 cos(n k), so c_n = A^2 / 4 and every other c_m = 0."""
    nphi, n, amp = 64, 5, 0.3
    phi = 2 * np.pi * np.arange(nphi) / nphi
    a = (1 + amp * np.cos(n * phi))[None, None, :]
    b = np.ones_like(a)
    plan = make_plan(np.ones((1, nphi), bool))
    c = difference_correlation(a, b, plan)[0, 0]
    np.testing.assert_allclose(c, amp**2 / 2 * np.cos(n * phi), atol=1e-12)
    f = fourier_coefficients(c)
    assert f.shape == (nphi // 2 + 1,)
    np.testing.assert_allclose(f[n], amp**2 / 4, atol=1e-12)
    np.testing.assert_allclose(np.delete(f, n), 0, atol=1e-12)
    # C(dphi) = sum over n in -N..N of c_n exp(i n dphi)
    np.testing.assert_allclose(np.fft.irfft(f * nphi, n=nphi), c, atol=1e-12)


def test_cross_correlation_of_phase_shifted_rows_peaks_at_the_offset():
    nphi, n, delta = 360, 3, 0.5
    phi = 2 * np.pi * np.arange(nphi) / nphi
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 2 * np.pi, 20)
    pol = np.stack([np.stack([1 + 0.2 * np.cos(n * (phi - pi)),
                              1 + 0.2 * np.cos(n * (phi - pi - delta))]) for pi in p])
    plan = make_plan(np.ones((2, nphi), bool), np.array([[0, 1]]))
    res = summarize_pairs(pol, np.arange(19), np.arange(1, 20), plan)
    c = res["mean"][2]
    k = int(np.argmax(c[: nphi // n]))
    assert abs(phi[k] - delta) <= 2 * np.pi / nphi
    assert abs(-np.angle(fourier_coefficients(c)[n]) / n - delta) < 1e-9
    # C(q2, q1, dphi) = C(q1, q2, -dphi): the unfolded matrix holds the mirror
    full = cross_matrix(res["mean"][2:], [0], [1], 2)
    ref = brute_correlation(pol[0], pol[1], np.ones((2, nphi), bool), [1], [0])
    one = summarize_pairs(pol, [0], [1], plan)["mean"][2:]
    np.testing.assert_allclose(cross_matrix(one, [0], [1], 2)[1, 0], ref[0], atol=1e-12)
    assert np.isnan(full[0, 0]).all()


# -- outlier rejection -----------------------------------------------------------
def test_robust_outliers_on_log_statistic():
    rng = np.random.default_rng(0)
    s = np.exp(rng.normal(0, 0.1, 200))
    s[[3, 50]] = [5.0, 20.0]
    rej, thr = robust_outliers(s, 5)
    assert set(np.flatnonzero(rej)) == {3, 50}
    assert 1.2 < thr < 5.0
    s[7] = 1e-6  # a pair of near-identical shots is harmless: kept
    assert not robust_outliers(s, 5)[0][7]
    assert not robust_outliers([1.0, 100.0], 3)[0].any()  # too few pairs to judge
    flat = np.ones(20)
    flat[4] = 10
    assert np.flatnonzero(robust_outliers(flat, 3)[0]).tolist() == [4]  # MAD = 0 fallback
    with pytest.raises(ParameterError, match="robust sigmas"):
        robust_outliers(s, 0)


def test_subtracting_a_wild_pair_keeps_float64_precision():
    rng = np.random.default_rng(2)
    pm = np.ones((2, 32), bool)
    pol = random_polar(rng, 30, 2, 32, pm)
    pol[11] *= 1 + 1e3 * rng.random((2, 32))   # differences ~1e3: products ~1e6 times larger
    ia, ib = np.arange(29), np.arange(1, 30)
    plan = make_plan(pm)
    eager = summarize_pairs(pol, ia, ib, plan, reject=5)
    assert np.flatnonzero(eager["rejected"]).tolist() == [10, 11]
    lazy = pair_statistics(da.from_array(pol, chunks=(4, -1, -1)), ia, ib, plan, reject=5)
    assert_eq(lazy.mean, eager["mean"], rtol=1e-10, atol=0)
    assert_eq(lazy.sem, eager["sem"], rtol=1e-10, atol=0)
    assert int(lazy.n_pairs.compute()) == 27
    # without the hold-out, subtraction only: its float64 rounding (1e-16 of the wild
    # pairs' squares, here 1e11 times the rest) shows in the variance, not in the mean
    sub = pair_statistics(da.from_array(pol, chunks=(4, -1, -1)), ia, ib, plan, reject=5,
                          hold_out_max=0)
    assert_eq(sub.mean, eager["mean"], rtol=1e-6, atol=0)


def correct_bytes(batch):
    """The setting correlation.correct-bytes = ``batch`` (None: the default), while a
    graph is built (it is read then)."""
    return dask.config.set({} if batch is None
                           else {"sacla_dask.correlation.correct-bytes": batch})


def count_reads(monkeypatch):
    """The number of tag positions of each read of polar rows by the correction."""
    import sacla_dask.correlation.graph as corrmod

    sizes = []
    read = corrmod._BlockRows.__call__
    monkeypatch.setattr(corrmod._BlockRows, "__call__",
                        lambda self, pos: sizes.append(pos.size) or read(self, pos))
    return sizes


@pytest.mark.parametrize("chunks", [1, 3, 5])
@pytest.mark.parametrize("batch", [None, 1])
def test_held_out_linked_pairs_that_are_kept_count_in_the_sem(chunks, batch, monkeypatch):
    """Pairs held out of the one pass (enormous statistic) and then kept: their products
    with the linked pairs around them are added afterwards, so the lazy standard error is
    the eager one and the 1-dependent reference, whatever the chunking and the batches
    in which the pairs are recomputed."""
    rng = np.random.default_rng(30)
    pm = rng.random((2, 16)) > 0.1
    pol = 100.0 * random_polar(rng, 13, 2, 16, pm)  # every pair's statistic > 100: held
    ia = np.arange(12)
    plan = make_plan(pm)
    eager = summarize_pairs(pol, ia, ia + 1, plan, reject=8)
    assert not eager["rejected"].any()
    per = np.stack([brute_correlation(pol[a], pol[a + 1], pm, plan.q1, plan.q2) for a in ia])
    np.testing.assert_allclose(eager["sem"], linked_sem(per, np.r_[False, [True] * 11]),
                               rtol=1e-8)
    reads = count_reads(monkeypatch)
    for hold in (2, 16):  # some held and some summed in the pass, or all held
        with correct_bytes(batch):
            lazy = pair_statistics(da.from_array(pol, chunks=(chunks, -1, -1)), ia, ia + 1,
                                   plan, reject=8, hold_out_max=hold, split_every=2)
        assert_eq(lazy.mean, eager["mean"], rtol=1e-10, atol=0)
        assert_eq(lazy.sem, eager["sem"], rtol=1e-9, atol=0)
    assert (max(reads) <= 2) == (batch == 1)  # a batch of one pair: its two shots


@pytest.mark.parametrize("chunks", [1, 4, 7])
@pytest.mark.parametrize("batch", [None, 1])
def test_rejected_linked_pairs_leave_the_sem(chunks, batch, monkeypatch):
    """A rejected pair summed in the one pass is subtracted with its products with the
    linked pairs on either side: the lazy standard error is that of the kept pairs (also
    when the pairs are recomputed one per batch, a product across two batches)."""
    rng = np.random.default_rng(31)
    pm = rng.random((2, 16)) > 0.1
    pol = random_polar(rng, 20, 2, 16, pm)
    pol[9] = 1 + 4 * (pol[9] - 1)  # a wild shot: its two pairs are rejected (not held)
    ia = np.arange(19)
    plan = make_plan(pm)
    eager = summarize_pairs(pol, ia, ia + 1, plan, reject=5)
    assert np.flatnonzero(eager["rejected"]).tolist() == [8, 9]
    assert np.nanmax(eager["stat"]) < 100  # not held out: summed, then subtracted
    kept = ia[~eager["rejected"]]
    per = np.stack([brute_correlation(pol[a], pol[a + 1], pm, plan.q1, plan.q2) for a in kept])
    links = np.r_[False, np.diff(kept) == 1]  # (t7, t8) and (t10, t11) are not linked
    np.testing.assert_allclose(eager["sem"], linked_sem(per, links), rtol=1e-8)
    reads = count_reads(monkeypatch)
    with correct_bytes(batch):
        lazy = pair_statistics(da.from_array(pol, chunks=(chunks, -1, -1)), ia, ia + 1, plan,
                               reject=5)
    assert_eq(lazy.sem, eager["sem"], rtol=1e-9, atol=0)
    assert (max(reads) <= 2) == (batch == 1)  # a batch of one pair: its two shots


# -- lazy == eager over chunkings --------------------------------------------------
@st.composite
def problems(draw):
    ntag = draw(st.integers(4, 24))
    cuts = sorted(draw(st.sets(st.integers(1, ntag - 1), max_size=6)))
    chunks = tuple(np.diff([0, *cuts, ntag]).tolist())
    npair = draw(st.integers(1, 20))
    a = draw(st.lists(st.integers(0, ntag - 1), min_size=npair, max_size=npair))
    shift = draw(st.lists(st.integers(1, ntag - 1), min_size=npair, max_size=npair))
    ib = (np.array(a) + np.array(shift)) % ntag
    return dict(ntag=ntag, chunks=chunks, ia=np.array(a), ib=ib,
                reject=draw(st.sampled_from([None, 3.0])), n_boot=draw(st.sampled_from([0, 4])),
                spots=draw(st.sampled_from([0.0, 0.1])), split_every=draw(st.integers(2, 4)),
                keep=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
                # autocorrelations only (sums over half the lags) or with cross rows
                q_pairs=draw(st.sampled_from([None, "all"])),
                nphi=draw(st.sampled_from([12, 13])), halo=draw(st.booleans()))


def halo_of(pol: np.ndarray, chunks: Any) -> da.Array:
    """The halo of ``pol`` chunked by ``chunks`` tags: the last row of each block before
    another, one row per block after the first (chunks (0, 1, 1, ...))."""
    starts = np.cumsum(da.from_array(pol, chunks=(chunks, -1, -1)).chunks[0])[:-1]
    return da.from_array(pol[starts - 1], chunks=((0,) + (1,) * starts.size, -1, -1))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_pair_statistics_lazy_equals_eager(pb):
    rng = np.random.default_rng(pb["seed"])
    nq, nphi = 2, pb["nphi"]
    pm = rng.random((nq, nphi)) > 0.25
    pol = random_polar(rng, pb["ntag"], nq, nphi, pm, pb["spots"])
    pol[rng.integers(pb["ntag"])] *= 4.0  # a wild shot for the rejection to find
    plan = make_plan(pm, pb["q_pairs"])
    kw = dict(reject=pb["reject"], n_boot=pb["n_boot"], seed=7, keep_pairs=pb["keep"])
    eager = summarize_pairs(pol, pb["ia"], pb["ib"], plan, **kw)
    halo = halo_of(pol, pb["chunks"]) if pb["halo"] else None
    lazy = pair_statistics(da.from_array(pol, chunks=(pb["chunks"], -1, -1)), pb["ia"],
                           pb["ib"], plan, split_every=pb["split_every"], halo=halo, **kw)
    assert_eq(lazy.mean, eager["mean"], rtol=1e-9, atol=1e-12)
    # sem comes from sums of squares, from which the lazy path subtracts the rejected
    # pairs: its absolute round-off is ~sqrt(eps) times the largest pair correlation,
    # rejected pairs included (it shows when pairs are duplicated and the true spread is
    # 0 while a wild pair was summed and taken out again)
    every = np.asarray(summarize_pairs(pol, pb["ia"], pb["ib"], plan, keep_pairs=True)["pairs"])
    rms = max(np.sqrt(np.nanmax(np.abs(np.asarray(eager["mean"])) ** 2
                                + np.nan_to_num(np.asarray(eager["sem"])) ** 2
                                * len(pb["ia"]))),
              float(np.nanmax(np.abs(every), initial=0.0)))
    assert_eq(lazy.sem, eager["sem"], rtol=1e-6, atol=max(1e-12, 1e-7 * rms))
    assert_eq(lazy.count, eager["count"])
    assert_eq(lazy.stat, eager["stat"], rtol=1e-12)
    assert_eq(lazy.rejected, eager["rejected"])
    assert int(lazy.n_pairs.compute()) == eager["n_pairs"]
    if pb["n_boot"]:
        assert_eq(lazy.ci_low, eager["ci_low"], rtol=1e-8, atol=1e-12)
        assert_eq(lazy.ci_high, eager["ci_high"], rtol=1e-8, atol=1e-12)
        assert_eq(lazy.fourier_ci_low, eager["fourier_ci_low"], rtol=1e-8, atol=1e-12)
    if pb["keep"]:
        assert_eq(lazy.pairs, eager["pairs"])


def test_pair_statistics_takes_the_boundary_row_from_the_halo():
    """Consecutive pairs with a halo: no row-copy task, no group depending on the block
    before its own, the very same numbers; rows of other blocks still copied; a halo of
    the wrong chunks refused."""
    rng = np.random.default_rng(3)
    nq, nphi, ntag, per = 3, 16, 23, 5
    pm = rng.random((nq, nphi)) > 0.2
    pol = random_polar(rng, ntag, nq, nphi, pm, 0.0)
    plan = make_plan(pm, "all")
    polar = da.from_array(pol, chunks=(per, -1, -1))
    ia = np.arange(ntag - 1)
    ib = ia + 1
    plain = pair_statistics(polar, ia, ib, plan, n_boot=3)
    halo = pair_statistics(polar, ia, ib, plan, n_boot=3, halo=halo_of(pol, per))

    def kinds(x):
        return [k[1] for k in x.mean.__dask_graph__() if isinstance(k, tuple)
                and str(k[0]).startswith("pair-statistics")]

    assert kinds(plain).count("rows") == 4 and "rows" not in kinds(halo)
    from dask.core import get_dependencies

    dsk = dict(halo.mean.__dask_graph__())
    groups = [k for k in dsk if isinstance(k, tuple) and k[1:2] == ("group",)]
    assert len(groups) == 5
    for k in groups:
        blocks = {d[1] for d in get_dependencies(dsk, k) if str(d[0]).startswith("array-")
                  and d[0] == polar.name}
        assert blocks == {k[2]}, f"group {k[2]} depends on blocks {blocks}"
    for name in ("mean", "sem", "count", "ci_low", "ci_high", "stat"):
        np.testing.assert_array_equal(getattr(halo, name).compute(scheduler="sync"),
                                      getattr(plain, name).compute(scheduler="sync"))
    # pairs two apart need a row that is not the previous block's last: copied as before
    two = pair_statistics(polar, ia[:-1], ia[:-1] + 2, plan, halo=halo_of(pol, per))
    assert "rows" in kinds(two)
    assert_eq(two.mean, pair_statistics(polar, ia[:-1], ia[:-1] + 2, plan).mean)
    with pytest.raises(ParameterError, match="halo chunks"):
        pair_statistics(polar, ia, ib, plan, halo=halo_of(pol, per + 1))


def test_pair_statistics_builds_a_graph_without_computing():
    rng = np.random.default_rng(0)
    pm = np.ones((2, 8), bool)
    x = da.from_array(random_polar(rng, 10, 2, 8, pm), chunks=(3, -1, -1))
    with raise_if_dask_computes():
        res = pair_statistics(x, np.arange(9), np.arange(1, 10), make_plan(pm), reject=3,
                              n_boot=3, keep_pairs=True)
    assert res.mean.shape == (2, 8) and res.pairs.shape == (9, 2, 8)


def test_fold_fan_in_and_groups():
    """One task per chunk of later shots; of an earlier chunk only the rows needed move.

    The group sums are folded in chunk order into one running sum, split_every
    groups per step: a chain, so that no partial waits for a sibling (a tree
    holds one per level).
    """
    pm = np.ones((1, 4), bool)
    x = da.zeros((40, 1, 4), chunks=(4, -1, -1))
    ia = np.arange(39)
    res = pair_statistics(x, ia, ia + 1, make_plan(pm), split_every=3)
    dsk = dict(res.mean.__dask_graph__())
    groups = [k for k in dsk if isinstance(k, tuple) and len(k) > 1 and k[1] == "group"]
    assert len(groups) == 10          # one per chunk holding the pairs' later shots
    rows = [k for k in dsk if isinstance(k, tuple) and len(k) > 1 and k[1] == "rows"]
    assert len(rows) == 9             # the last tag of each previous chunk (straddling pair)
    for k in rows:
        assert dsk[k][2].tolist() == [3]
        assert k[3] == k[2] - 1       # taken from the chunk before the group's own
    folds = sorted(k for k in dsk if isinstance(k, tuple) and len(k) > 1 and k[1] == "fold")
    assert len(folds) == 3            # groups 1-3, 4-6, 7-9 into the running sum
    expect_prev = [k for k in groups if k[2] == 0]
    for j, k in enumerate(folds):
        deps = dask.core.get_dependencies(dsk, k)
        prev = [d for d in deps if d[1] == "fold"] or [d for d in deps if d[2] == 0]
        assert prev == expect_prev    # a chain: each step takes the previous one
        assert sorted(d[2] for d in deps if d[1] == "group" and d[2] != 0) == \
            list(range(1 + 3 * j, 4 + 3 * j))
        expect_prev = [k]
    pairs_tasks = [k for k in dsk if isinstance(k, tuple) and "difference-correlation" in k[0]]
    assert not pairs_tasks


def _consecutive_pairs(seed: int, n_tags: int) -> tuple[np.ndarray, CorrelationPlan, np.ndarray]:
    """Random polar images (n_tags, 2, 16), their plan and the first shots of consecutive pairs."""
    pm = np.ones((2, 16), bool)
    pol = random_polar(np.random.default_rng(seed), n_tags, 2, 16, pm)
    return pol, make_plan(pm), np.arange(n_tags - 1)


def test_fold_of_one_at_a_time_equals_eager():
    """split_every=1 (a wide band's default) gives the eager statistics."""
    pol, plan, ia = _consecutive_pairs(21, 13)
    x = da.from_array(pol, chunks=(3, -1, -1))
    res = pair_statistics(x, ia, ia + 1, plan, split_every=1)
    ref = summarize_pairs(pol, ia, ia + 1, plan)
    assert_eq(res.mean, ref["mean"])
    assert_eq(res.sem, ref["sem"])
    with pytest.raises(ParameterError, match="split_every"):
        pair_statistics(x, ia, ia + 1, plan, split_every=0)


def test_pair_statistics_takes_an_options_object_or_keywords():
    """PairStatisticsOptions and the keywords build the same graph (keywords replace the
    object's fields); a misspelt keyword or a bad value is refused."""
    from sacla_dask.correlation import PairStatisticsOptions

    pol, plan, ia = _consecutive_pairs(23, 11)
    x = da.from_array(pol, chunks=(3, -1, -1))
    kw = dict(reject=3, n_boot=2, seed=1, split_every=2)
    by_keywords = pair_statistics(x, ia, ia + 1, plan, **kw)
    by_options = pair_statistics(x, ia, ia + 1, plan, PairStatisticsOptions(**kw))
    mixed = pair_statistics(x, ia, ia + 1, plan, PairStatisticsOptions(reject=3, n_boot=7),
                            n_boot=2, seed=1, split_every=2)
    assert by_options.mean.name == by_keywords.mean.name == mixed.mean.name
    assert pair_statistics(x, ia, ia + 1, plan).mean.name != by_keywords.mean.name
    with pytest.raises(TypeError, match="nboot"):
        pair_statistics(x, ia, ia + 1, plan, nboot=2)
    with pytest.raises(ParameterError, match="bootstrap resamples"):
        pair_statistics(x, ia, ia + 1, plan, PairStatisticsOptions(n_boot=-1))


def test_plan_ships_without_its_derived_arrays():
    """The plan pickles its mask correlation (float32 counts, exact) and not the arrays
    derived from it: the worker's copy recomputes the same flags and float64 inverse."""
    import pickle

    pm = np.ones((3, 64), bool)
    pm[:, 10:17] = False
    pm[1, 40:41] = False
    plan = make_plan(pm, "all")
    assert plan.mask_norm.dtype == np.float32
    np.testing.assert_array_equal(plan.mask_norm, np.rint(plan.mask_norm))
    assert plan.lag_ok.shape == plan.inv_norm.shape == (plan.nqp, 64)  # now cached
    state = plan.__getstate__()
    assert not {"ok", "inv_norm", "lag_ok", "lag_inv_norm"} & set(state)
    back = pickle.loads(pickle.dumps(plan))
    for name in ("q1", "q2", "mask_norm", "polar_mask", "ok", "inv_norm"):
        np.testing.assert_array_equal(getattr(back, name), getattr(plan, name))
    assert back.inv_norm.dtype == np.float64 and back.nphi == plan.nphi
    ok = plan.mask_norm > 0
    np.testing.assert_array_equal(back.inv_norm[ok], 1.0 / plan.mask_norm[ok].astype(float))
    # an autocorrelation plan's worker derives only the lags its sums hold
    auto = pickle.loads(pickle.dumps(make_plan(pm)))
    sums, _, _, _ = pair_sums(np.ones((2, 3, 64)) * pm, np.zeros((2, 3, 64)), auto)
    assert "lag_inv_norm" in auto.__dict__ and "inv_norm" not in auto.__dict__
    assert auto.lag_inv_norm.shape == (3, 33) == sums.s1.shape
    np.testing.assert_array_equal(auto.lag_inv_norm, auto.inv_norm[:, :33])


def test_partial_sums_report_their_size_to_dask():
    """Dask places tasks and manages worker memory by result sizes: a partial is its arrays."""
    from dask.sizeof import sizeof

    from sacla_dask.correlation import HeldPairs, _Partial

    s = PairSums.zeros((100, 50), n_boot=2)
    held = HeldPairs(np.arange(3), np.zeros((3, 100, 50)))
    part = _Partial(s, np.zeros(7), held)
    arrays = 2 * 100 * 50 * 8 + 2 * 2 * 100 * 50 * 8
    assert arrays <= sizeof(s) < arrays + 1000
    assert sizeof(part) >= arrays + 7 * 8 + 3 * 100 * 50 * 8
    pm = np.ones((100, 50), bool)
    plan = make_plan(pm)
    # what a worker holds: the shipped arrays and the inverse over the summed lags
    assert sizeof(plan) >= plan.lag_inv_norm.nbytes + plan.mask_norm.nbytes + pm.nbytes


def test_pair_straddling_a_chunk_boundary_is_included():
    rng = np.random.default_rng(5)
    pm = np.ones((2, 16), bool)
    pol = random_polar(rng, 10, 2, 16, pm)
    plan = make_plan(pm)
    ia, ib = np.array([4, 1]), np.array([5, 2])   # (4, 5) straddles chunks (0..4), (5..9)
    lazy = pair_statistics(da.from_array(pol, chunks=(5, -1, -1)), ia, ib, plan,
                           keep_pairs=True)
    ref = brute_correlation(pol[4], pol[5], pm, plan.q1, plan.q2)
    np.testing.assert_allclose(lazy.pairs.compute()[0], ref, rtol=1e-5)
    assert int(lazy.n_pairs.compute()) == 2
    both = (ref + brute_correlation(pol[1], pol[2], pm, plan.q1, plan.q2)) / 2
    np.testing.assert_allclose(lazy.mean.compute(), both, rtol=1e-10)


# -- bootstrap ------------------------------------------------------------------------
def test_bootstrap_weights_depend_only_on_the_pair():
    keys = np.array([[10, 12], [12, 14], [14, 16]])
    w = bootstrap_weights(keys, 50, seed=3)
    np.testing.assert_array_equal(w[:, 1:], bootstrap_weights(keys[1:], 50, seed=3))
    assert not np.array_equal(w, bootstrap_weights(keys, 50, seed=4))
    assert abs(bootstrap_weights(np.arange(4000).reshape(-1, 2), 40).mean() - 1) < 0.05


def test_bootstrap_interval_brackets_mean_and_matches_standard_error():
    rng = np.random.default_rng(4)
    pm = np.ones((2, 24), bool)
    pol = random_polar(rng, 401, 2, 24, pm)
    ia = np.arange(0, 400, 2)                  # 200 independent pairs
    res = summarize_pairs(pol, ia, ia + 1, make_plan(pm), n_boot=400, ci=0.95)
    assert np.all(res["ci_low"] < res["mean"]) and np.all(res["mean"] < res["ci_high"])
    ratio = (res["ci_high"] - res["ci_low"]) / (2 * 1.96 * res["sem"])
    assert 0.8 < np.median(ratio) < 1.2, np.median(ratio)


def test_bootstrap_blocks_cut_chains_of_linked_pairs():
    from sacla_dask.correlation import bootstrap_blocks

    links = np.array([0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1], bool)
    assert bootstrap_blocks(links, 2).tolist() == [0, 0, 2, 2, 4, 5, 6, 6, 8, 8, 10, 10, 12]
    assert bootstrap_blocks(links, 1).tolist() == list(range(13))
    assert bootstrap_blocks(links, 10).tolist() == [0] * 5 + [5] + [6] * 7
    assert bootstrap_blocks(np.ones(3, bool), 2).tolist() == [0, 0, 2]  # first: a start
    assert bootstrap_blocks(np.zeros(0, bool)).size == 0
    with pytest.raises(ParameterError, match="block length"):
        bootstrap_blocks(links, 0)


def test_bootstrap_interval_of_overlapping_pairs_agrees_with_the_sem():
    """Overlapping consecutive pairs are drawn in blocks: the bootstrap interval's width
    is that of the standard error that counts linked pairs (drawing pairs one by one, it
    would be sqrt(1 / (1 + 2 rho1)) ~ 0.7-0.8 of it)."""
    rng = np.random.default_rng(23)
    nq, nphi, nshot = 2, 24, 401
    pm = np.ones((nq, nphi), bool)
    phi = np.linspace(0, 2 * np.pi, nphi, endpoint=False)
    pol = 1 + 0.1 * rng.standard_normal((nshot, nq, nphi))
    pol += 0.3 * rng.standard_normal((nshot, nq, 1)) * np.cos(
        6 * phi + rng.uniform(0, 2 * np.pi, (nshot, nq, 1)))
    ia = np.arange(nshot - 1)
    res = summarize_pairs(pol, ia, ia + 1, make_plan(pm), n_boot=400, ci=0.95)
    per = np.asarray(summarize_pairs(pol, ia, ia + 1, make_plan(pm), keep_pairs=True)["pairs"],
                     np.float64)
    naive = per.std(0, ddof=1) / np.sqrt(per.shape[0])
    lags = slice(1, nphi // 2)
    inflation = np.median((res["sem"] / naive)[:, lags])
    assert inflation > 1.15, inflation  # the pairs are correlated
    ratio = ((res["ci_high"] - res["ci_low"]) / (2 * 1.96 * res["sem"]))[:, lags]
    assert 0.86 < np.median(ratio) < 1.12, np.median(ratio)  # seeds 20-29: 0.90-1.01


def test_vectorised_nan_percentile_matches_numpy():
    import warnings

    from sacla_dask.correlation import _nanpercentile0

    rng = np.random.default_rng(8)
    x = rng.random((37, 4, 9))
    x[rng.random(x.shape) < 0.3] = np.nan
    x[:, 0, 0] = np.nan
    x[1:, 0, 1] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = np.nanpercentile(x, [2.5, 50, 97.5], axis=0)
    for r, g in zip(ref, _nanpercentile0(x, [2.5, 50, 97.5]), strict=True):
        np.testing.assert_allclose(g, r, equal_nan=True, rtol=1e-12)


def test_pair_sums_merge_and_remove():
    rng = np.random.default_rng(6)
    pm = np.ones((1, 8), bool)
    pol = random_polar(rng, 9, 1, 8, pm)
    plan = make_plan(pm)
    ia, ib = np.arange(8), np.arange(1, 9)
    w = bootstrap_weights(np.stack([ia, ib], 1), 5)
    whole, _, _, _ = pair_sums(pol, pol, plan, ia=ia, ib=ib, weights=w)
    part1, _, _, _ = pair_sums(pol, pol, plan, ia=ia[:3], ib=ib[:3], weights=w[:, :3])
    part2, _, _, _ = pair_sums(pol, pol, plan, ia=ia[3:], ib=ib[3:], weights=w[:, 3:])
    merged = part1 + part2
    for f in ("s1", "s2", "count", "boot_s1", "boot_w"):
        np.testing.assert_allclose(getattr(merged, f), getattr(whole, f), rtol=1e-12)
    back = whole - part2
    assert back.n == 3
    np.testing.assert_allclose(finalize(back)["mean"], finalize(part1)["mean"], rtol=1e-12)
    with pytest.raises(ParameterError, match="bootstrap"):
        PairSums.zeros((1, 8)) + part1


def test_pair_sums_absorb_in_place_equals_total():
    """The reduction tree's in-place merge gives the sums of all pairs, reusing one part."""
    rng = np.random.default_rng(16)
    pm = np.ones((2, 16), bool)
    pm[:, 3:5] = False
    pol = random_polar(rng, 13, 2, 16, pm)
    pol[6, 1, 9] = np.nan  # a shot-specific masked bin: per-bin counts in one part only
    plan = make_plan(pm)
    ia, ib = np.arange(12), np.arange(1, 13)
    w = bootstrap_weights(np.stack([ia, ib], 1), 4)
    whole, _, _, _ = pair_sums(pol, pol, plan, ia=ia, ib=ib, weights=w)
    cuts = [(0, 3), (3, 8), (8, 12)]
    parts = [pair_sums(pol, pol, plan, ia=ia[a:b], ib=ib[a:b], weights=w[:, a:b])[0]
             for a, b in cuts]
    assert parts[0].own_count is None and parts[1].own_count is not None
    for p in parts[1:]:  # as if received in a message buffer
        p.s1.flags.writeable = False
    first_s1 = parts[0].s1
    merged = parts[0].absorb(parts[1:])
    assert merged is parts[0] and merged.s1 is first_s1  # no new array for the sums
    assert merged.n == whole.n == 12 and merged.shared == whole.shared
    for f in ("s1", "s2", "count", "boot_s1", "boot_w"):
        np.testing.assert_allclose(getattr(merged, f), getattr(whole, f), rtol=1e-12)
    ro = pair_sums(pol, pol, plan, ia=ia[:2], ib=ib[:2])[0]
    ro.s1.flags.writeable = False
    before = ro.s1.copy()
    ro.absorb([pair_sums(pol, pol, plan, ia=ia[2:4], ib=ib[2:4])[0]])
    assert ro.s1.flags.writeable and not np.array_equal(ro.s1, before)  # copied, then added
    with pytest.raises(ParameterError, match="bootstrap"):
        PairSums.zeros((2, 16)).absorb([parts[1]])


# -- Bragg spots ----------------------------------------------------------------------
def test_bragg_spots_are_masked_and_rows_renormalised():
    rng = np.random.default_rng(7)
    nphi = 400
    phi = 2 * np.pi * np.arange(nphi) / nphi
    pm = np.ones((1, nphi), bool)
    pm[0, 100:120] = False
    clean = (1 + 0.2 * np.cos(6 * phi) + 0.02 * rng.standard_normal((20, 1, nphi))) * pm
    spotted = clean.copy()
    where = [(3, 50), (3, 250), (8, 300), (15, 10)]
    for t, p in where:
        spotted[t, 0, p] += 3.0
    out, n = mask_bragg_spots(spotted, pm, nsigma=6, grow=1)
    for t, p in where:
        assert np.isnan(out[t, 0, p - 1:p + 2]).all()
    assert n.sum() == 3 * len(where)
    good = np.isfinite(out) & pm
    np.testing.assert_allclose([o[g].mean() for o, g in zip(out[:, 0], good[:, 0], strict=True)],
                               1,
                               rtol=1e-6)
    assert np.all(out[:, :, 100:120] == 0)
    # the spot-masked correlation follows the clean one; the raw one does not
    plan = make_plan(pm)
    ia = np.arange(19)
    ref = summarize_pairs(clean, ia, ia + 1, plan)["mean"]
    masked = summarize_pairs(out, ia, ia + 1, plan)["mean"]
    raw = summarize_pairs(spotted, ia, ia + 1, plan)["mean"]
    err_m, err_r = np.abs(masked - ref)[0, 1:].max(), np.abs(raw - ref)[0, 1:].max()
    assert err_m < 0.1 * err_r, (err_m, err_r)


def test_bragg_masking_on_real_gold_111_rings():
    """Real single-shot Au 111 angular profiles: nanocrystal spots stand out and are masked."""
    import h5py
    from conftest import shared_file

    with h5py.File(shared_file("loki", "bragg_rings.hdf5"), "r") as fh:
        rings = fh["111_Bragg_rings"][()].astype(np.float64)
        mask = fh["111_mask"][()].astype(bool)
    rows = (rings * mask)[:, None, :]
    means = np.array([r[0][mask].mean() for r in rows])
    norm = rows / means[:, None, None]
    out, n = mask_bragg_spots(norm, mask[None], nsigma=4)
    # the ring is spotty throughout (MAD ~45% of the median): the brightest
    # nanocrystal peaks of every shot stand out, a few percent of the bins
    assert (n > 0).all()
    assert n.sum() < 0.05 * mask.sum() * len(rows)
    before = np.array([x[0][mask].max() / np.median(x[0][mask]) for x in norm])
    left = np.isfinite(out[:, 0]) & mask
    after = np.array([x[m].max() / np.median(x[m]) for x, m in zip(out[:, 0], left, strict=True)])
    assert np.all(after < before)


# -- q pairs -------------------------------------------------------------------------
def test_parse_q_pairs():
    q = np.array([2.60, 2.62, 2.64, 2.66])
    assert parse_q_pairs(None, q) is None and parse_q_pairs("none", q) is None
    assert parse_q_pairs("all", q) == "all"
    np.testing.assert_array_equal(parse_q_pairs("0:3, 2:1", q), [[0, 3], [2, 1]])
    np.testing.assert_array_equal(parse_q_pairs("2.601:2.659", q), [[0, 3]])
    np.testing.assert_array_equal(parse_q_pairs(np.array([[2.6, 2.64]]), q), [[0, 2]])
    for bad, msg in (("0:4", "outside 0..3"), ("0-3", "not 'A:B'"), ("2.9:2.6", "outside the band"),
                     ("a:b", "neither")):
        with pytest.raises(ParameterError, match=msg):
            parse_q_pairs(bad, q)
    plan = make_plan(np.ones((4, 8), bool), parse_q_pairs("all", q))
    assert plan.nqp == 4 + 10 and plan.n_cross == 10
    np.testing.assert_array_equal(plan.q1[:4], np.arange(4))


# -- whole runs with known truth ---------------------------------------------------------
@pytest.fixture(scope="module")
def one_ring_run(tmp_path_factory):
    """Two rings (r = 20, 40 px); only the outer one carries cos(5 (phi - p_i))."""
    path = tmp_path_factory.mktemp("corr") / "one_ring.h5"
    return write_synthetic_run(path, n_tags=24, n_dark=2, shape=(128, 128), center=(66.3, 61.7),
                               ring_radii=(20.0, 40.0), ring_width=1.5, modulation_order=5,
                               modulation_amplitude=0.3, modulated_rings=[1], seed=11)


def _params(truth, r_in, r_out):
    g = truth.geometry
    return dict(qmin=float(g.radius_to_q(r_in)), qmax=float(g.radius_to_q(r_out)),
                center=(truth.center_x, truth.center_y), pixel_size=truth.pixel_size,
                distance=truth.distance)


def test_modulated_ring_correlates_only_at_its_q_and_order(one_ring_run):
    t = one_ring_run
    mask = panel_mask(t.shape, gap=4, edge=1)
    ds = plan_run(t.path, mask=mask, chunks=5, **_params(t, 15, 45)).dataset().compute()
    f = ds["corr_fourier"]
    assert f.dims == ("q", "n") and f.dtype == np.float64
    radius = ds["radius"].values
    ring1 = int(np.argmin(np.abs(radius - 40)))
    noise = np.median(np.abs(f.values[:, 1:60]), axis=1)
    # at the modulated ring the spectrum is order 5, far above the noise floor
    assert int(np.argmax(f.values[ring1, 1:60])) + 1 == 5
    assert f.values[ring1, 5] > 100 * noise[ring1]
    # away from it (including the isotropic ring at r = 20) order 5 is noise
    far = np.abs(radius - 40) > 6
    assert np.all(np.abs(f.values[far, 5]) < 6 * noise[far]), f.values[far, 5] / noise[far]
    # Fourier coefficients are those of the stored mean correlation
    np.testing.assert_allclose(f.values, fourier_coefficients(ds["corr"].values).real,
                               atol=1e-15)
    assert np.all(ds["corr_count"].values == int(ds["n_pairs"]))


def test_two_rings_with_phase_offset_cross_correlate_at_the_offset(tmp_path):
    delta, n = 0.6, 3
    t = write_synthetic_run(tmp_path / "offset.h5", n_tags=16, n_dark=1, shape=(128, 128),
                            center=(66.3, 61.7), ring_radii=(24.0, 40.0), ring_width=1.5,
                            ring_amplitudes=(3000.0, 3000.0), modulation_order=n,
                            modulation_amplitude=0.3, ring_phase_offsets=(0.0, delta), seed=2)
    g = t.geometry
    q0, q1 = g.radius_to_q(24.0), g.radius_to_q(40.0)
    plan = plan_run(t.path, q_pairs=f"{q0:.6f}:{q1:.6f}", nphi=720, **_params(t, 20, 44))
    ds = plan.dataset().compute()
    assert ds["corr"].dims == ("q", "dphi")           # the autocorrelation is always there
    c = ds["corr_cross"].isel(qpair=0)
    np.testing.assert_allclose([float(c.q1), float(c.q2)], [q0, q1], atol=float(
        np.diff(ds.q.values).max()))
    dphi = ds["dphi"].values
    k = int(np.argmax(c.values[: 720 // n]))
    assert abs(dphi[k] - delta) <= 2 * 2 * np.pi / 720, (dphi[k], delta)
    cf = ds["corr_cross_fourier"].isel(qpair=0).values
    assert np.iscomplexobj(cf)
    assert abs(-np.angle(cf[n]) / n - delta) < 0.02
    assert ds.attrs["q_pairs"] == f"{int(c.q1_index)}:{int(c.q2_index)}"


@pytest.fixture(scope="module")
def wild_runs(tmp_path_factory):
    """The same run twice; in the second, three bright shots are wild (a 30x bright sector)."""
    d = tmp_path_factory.mktemp("wild")
    kw = dict(n_tags=40, n_dark=5, shape=(128, 128), center=(66.3, 61.7),
              ring_radii=(20.0, 40.0), ring_width=1.5, modulation_order=6,
              modulation_amplitude=0.3, seed=1)
    clean = write_synthetic_run(d / "clean.h5", **kw)
    wild = write_synthetic_run(d / "wild.h5", **kw)
    import h5py

    bad = clean.tags[[9, 20, 33]]
    with h5py.File(wild.path, "r+") as fh:
        for tag in bad:
            ds = fh[f"/run_{wild.run}/detector_2d_assembled_1/tag_{tag}/detector_data"]
            img = ds[()]
            img[:64, 70:] *= 30.0
            ds[...] = img
    return clean, wild, bad


def test_wild_shots_are_rejected_and_barely_move_the_mean(wild_runs):
    clean, wild, bad = wild_runs
    kw = _params(clean, 34, 46)
    ref = plan_run(clean.path, chunks=6, **kw).dataset().compute()
    raw = plan_run(wild.path, chunks=6, **kw).dataset().compute()
    res = plan_run(wild.path, chunks=6, reject_outliers=5, **kw).dataset().compute()
    pa, pb = res["pair_tag_a"].values, res["pair_tag_b"].values
    involved = np.isin(pa, bad) | np.isin(pb, bad)
    np.testing.assert_array_equal(res["pair_rejected"].values, involved)
    assert int(res["n_pairs"]) == involved.size - involved.sum() == 34 - 6
    assert float(res["pair_stat_threshold"]) < res["pair_stat"].values[involved].min()
    # exactly the mean over the kept pairs of the clean run
    kept = np.stack([pa[~involved], pb[~involved]], axis=1)
    sub = plan_run(clean.path, pairs=kept, **kw).dataset().compute()
    np.testing.assert_allclose(res["corr"].values, sub["corr"].values, rtol=1e-9, atol=1e-13)
    np.testing.assert_array_equal(res["corr_count"].values, 28)
    # and within the standard error of the clean run's mean over all its pairs
    sem = ref["corr_sem"].values[:, 1:]
    z = (res["corr"].values - ref["corr"].values)[:, 1:] / sem
    z_raw = (raw["corr"].values - ref["corr"].values)[:, 1:] / sem
    assert np.sqrt(np.mean(z**2)) < 1 and np.mean(np.abs(z) < 1) > 0.9, np.sqrt(np.mean(z**2))
    assert np.sqrt(np.mean(z_raw**2)) > 5        # without rejection the wild shots dominate


def test_rejected_pairs_recomputed_by_rereading_not_by_holding_the_polar_data(wild_runs):
    clean, wild, bad = wild_runs
    plan = plan_run(wild.path, chunks=6, reject_outliers=5, bootstrap=8, **_params(clean, 34, 46))
    ds = plan.dataset()
    dsk = dict(ds["corr"].data.__dask_graph__())
    corrected = [k for k in dsk if isinstance(k, tuple) and k[-1] == "corrected"]
    assert len(corrected) == 1
    deps = dask.core.get_dependencies(dsk, corrected[0])
    assert not [k for k in deps if "polar" in str(k[0] if isinstance(k, tuple) else k)
                and "reloader" not in str(k)], deps
    # the reloader gives back exactly the rows of the main pass, and pickles
    import pickle

    key = next(k for k in dsk if "reloader" in str(k))
    reloader = pickle.loads(pickle.dumps(dask.get(dsk, key)))
    pos = np.array([3, 17])
    np.testing.assert_array_equal(reloader(pos), ds["polar"].data[pos].compute())


def test_bragg_option_and_per_pair_normalisation_in_the_pipeline(small_run, small_params):
    plan = plan_run(small_run.path, chunks=9, bragg=4.0, keep_pairs=True, **small_params)
    ds = plan.dataset().compute()
    assert ds["bragg_bins"].dims == ("tag", "q") and int(ds["bragg_bins"].sum()) > 0
    assert ds.attrs["bragg_nsigma"] == 4.0
    pol = ds["polar"].values
    cleaned = mask_bragg_spots(pol, ds["polar_mask"].values, 4.0)[0]
    np.testing.assert_array_equal(np.isnan(cleaned).sum(-1), ds["bragg_bins"].values)
    tags = ds["tag"].values
    pos = {t: i for i, t in enumerate(tags)}
    plan_c = make_plan(ds["polar_mask"].values)
    i = 5
    a, b = pos[int(ds["pair_tag_a"][i])], pos[int(ds["pair_tag_b"][i])]
    ref = brute_correlation(cleaned[a], cleaned[b], ds["polar_mask"].values,
                            plan_c.q1[:3], plan_c.q2[:3])
    np.testing.assert_allclose(ds["corr_pairs"].values[i, :3], ref, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(
        ds["corr"].values, np.nanmean(ds["corr_pairs"].values.astype(np.float64), 0),
        rtol=1e-5, atol=1e-8)


def test_bragg_masked_pipeline_in_blocks_of_few_rows(small_run, small_params, monkeypatch):
    """As a wide band runs (many blocks of q rows), with Bragg spots masked pair by pair:
    the mean and count over pairs are those of the pairs' own correlations."""
    import sacla_dask.correlation.statistics as corr_mod

    monkeypatch.setattr(corr_mod, "_row_blocks",
                        lambda n, nphi, block_bytes: [slice(r, min(n, r + 2))
                                                      for r in range(0, n, 2)])
    plan = plan_run(small_run.path, chunks=9, bragg=4.0, keep_pairs=True, **small_params)
    ds = plan.dataset().compute()
    assert int(ds["bragg_bins"].sum()) > 0 and ds.sizes["q"] > 2
    per = ds["corr_pairs"].values.astype(np.float64)
    np.testing.assert_array_equal(ds["corr_count"].values, np.isfinite(per).sum(0))
    np.testing.assert_allclose(ds["corr"].values, np.nanmean(per, 0), rtol=1e-5, atol=1e-8)


def test_pipeline_lazy_equals_eager_with_every_option(small_run, small_params):
    plan = plan_run(small_run.path, chunks=8, q_pairs="0:5,3:3", reject_outliers=3,
                    bootstrap=6, keep_pairs=True, **small_params)
    ds = plan.dataset()
    with raise_if_dask_computes():
        plan.dataset()
    pol = ds["polar"].values
    cplan = plan.correlation_plan()
    eager = summarize_pairs(pol, plan.ia, plan.ib, cplan, reject=3, n_boot=6,
                            keys=np.stack([plan.run.tags[plan.ia], plan.run.tags[plan.ib]], 1),
                            keep_pairs=True)
    nq = cplan.nq
    assert_eq(ds["corr"].data, eager["mean"][:nq], rtol=1e-9, atol=1e-13)
    assert_eq(ds["corr_cross"].data, eager["mean"][nq:], rtol=1e-9, atol=1e-13)
    assert_eq(ds["corr_sem"].data, eager["sem"][:nq], rtol=1e-7, atol=1e-13)
    assert_eq(ds["corr_cross_ci_high"].data, eager["ci_high"][nq:], rtol=1e-8, atol=1e-13)
    assert_eq(ds["pair_rejected"].data, eager["rejected"])
    np.testing.assert_allclose(ds["corr_pairs"].values, eager["pairs"][:, :nq])
    np.testing.assert_array_equal(ds["q1_index"].values, [0, 3])
    np.testing.assert_array_equal(ds["q2_index"].values, [5, 3])
    # the autocorrelation row 3 computed twice (as q and as qpair 3:3) agrees
    np.testing.assert_allclose(ds["corr_cross"].values[1], ds["corr"].values[3], rtol=1e-12)


@pytest.mark.slow
def test_cli_process_with_correlation_options(small_run, small_params, tmp_path):
    """The options end to end on a LocalCluster of worker processes (the reloader of
    rejected pairs is pickled to them)."""
    from click.testing import CliRunner

    from sacla_dask.cli import main

    out = tmp_path / "cli.zarr"
    p = small_params
    args = ["process", small_run.path, "--out", str(out), "--center", str(p["center"][0]),
            str(p["center"][1]), "--qmin", str(p["qmin"]), "--qmax", str(p["qmax"]),
            "--pixel-size", str(p["pixel_size"]), "--distance", str(p["distance"]),
            "--q-pairs", "0:1", "--reject-outliers", "4", "--bootstrap", "5", "--keep-pairs",
            "--pairing", "pulse_energy", "--workers", "1", "--no-progress"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    ds = xr.open_zarr(out, consolidated=False)
    for v in ("corr", "corr_sem", "corr_count", "corr_fourier", "corr_cross", "corr_ci_low",
              "corr_pairs", "pair_rejected", "pair_stat_threshold"):
        assert v in ds, v
    assert ds.attrs["pairing"] == "pulse_energy" and ds.attrs["shared_shots"] == 0
    assert ds.attrs["complete"] is True
    bad = CliRunner().invoke(main, args[:-3] + ["--q-pairs", "0:99", "--dry-run"])
    assert bad.exit_code == 2 and "outside 0.." in bad.output
    assert os.path.isdir(out)


def test_fold_step_adds_into_the_writable_part():
    """A running sum received read-only from another worker is added into the new part."""
    from sacla_dask.correlation import HeldPairs, _merge_partials, _Partial

    pol, plan, ia = _consecutive_pairs(22, 7)
    whole = pair_sums(pol, pol, plan, ia=ia, ib=ia + 1)[0]
    parts = [_Partial(pair_sums(pol, pol, plan, ia=ia[a:b], ib=ia[a:b] + 1)[0],
                      np.arange(a, b, dtype=float), HeldPairs.concat([], (2, 16), 0))
             for a, b in ((0, 4), (4, 6))]
    parts[0].sums.s1.flags.writeable = False
    second_s1 = parts[1].sums.s1
    merged = _merge_partials(parts)
    assert merged.sums.s1 is second_s1                   # no copy of the read-only one
    assert merged.stat.tolist() == list(range(6))        # per-pair values stay in order
    np.testing.assert_allclose(merged.sums.s1, whole.s1, rtol=1e-12)
    np.testing.assert_allclose(merged.sums.s2, whole.s2, rtol=1e-12)
    assert merged.sums.n == whole.n == 6


def test_held_out_pairs_all_rejected_with_the_bootstrap():
    """A shot a thousand times too bright: both its pairs are held out of the partial sums
    and then rejected, so the correction adds no pair at all; with the bootstrap on, the
    result is still the eager one (it used to fail reshaping an empty weight matrix)."""
    rng = np.random.default_rng(5)
    nq, nphi, ntag = 2, 16, 20
    pm = rng.random((nq, nphi)) > 0.2
    pol = random_polar(rng, ntag, nq, nphi, pm, 0.0)
    pol[9] *= 1000.0
    ia, ib = np.arange(ntag - 1), np.arange(1, ntag)
    plan = make_plan(pm, None)
    kw = dict(reject=3.0, n_boot=4, seed=7)
    eager = summarize_pairs(pol, ia, ib, plan, **kw)
    lazy = pair_statistics(da.from_array(pol, chunks=(5, -1, -1)), ia, ib, plan, **kw)
    rejected = np.asarray(lazy.rejected.compute())
    np.testing.assert_array_equal(np.flatnonzero(rejected), [8, 9])
    assert_eq(lazy.rejected, eager["rejected"])
    assert_eq(lazy.mean, eager["mean"], rtol=1e-9, atol=1e-12)
    assert_eq(lazy.ci_low, eager["ci_low"], rtol=1e-8, atol=1e-12)
