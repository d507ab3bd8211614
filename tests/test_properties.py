"""Property-based tests (hypothesis) of the geometry conversions and the numerical kernels.

Each property is checked against an independent statement of what must hold (an analytic
identity, a brute-force sum, a symmetry of the problem), never against the code's own
output on a fixed case. tests/test_geometry.py already checks the r -> q -> r round trip
and monotonicity in r for one geometry; here geometries are drawn too. Example counts are
bounded so that the file runs in well under 30 s.
"""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import pytest
from dask.array.utils import assert_eq
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sacla_dask.correlation import correlate_pairs, difference_correlation, make_plan
from sacla_dask.errors import GeometryError
from sacla_dask.geometry import HC_KEV_ANGSTROM, Geometry, default_nphi, energy_to_wavelength
from sacla_dask.polar import METHODS, apply_polar, build_operator, make_grid, normalize_rows

FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
SLOWER = settings(max_examples=30, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

pixel_sizes = st.floats(1e-5, 5e-4)
distances = st.floats(0.02, 2.0)
wavelengths = st.floats(0.3, 5.0)


@st.composite
def geometries(draw, cx=0.0, cy=0.0):
    return Geometry(cx, cy, draw(pixel_sizes), draw(distances), draw(wavelengths))


# -- geometry ------------------------------------------------------------------------
@FAST
@given(geometries(), st.floats(0.0, 0.95))
def test_q_to_radius_round_trip_any_geometry(g, frac):
    q = frac * g.q_max_physical
    assert g.radius_to_q(g.q_to_radius(q)) == pytest.approx(q, rel=1e-9, abs=1e-12)


@FAST
@given(geometries(), st.floats(0.0, 5000.0), st.floats(0.3, 5.0))
def test_q_times_wavelength_depends_on_angle_only(g, r, lam2):
    """q = 4 pi sin(theta) / lambda: q * lambda is the same at any wavelength, and is
    4 pi sin(atan(r p / d) / 2) by hand."""
    g2 = g.replace(wavelength=lam2)
    by_hand = 4 * math.pi * math.sin(math.atan(r * g.pixel_size / g.distance) / 2)
    assert g.radius_to_q(r) * g.wavelength == pytest.approx(by_hand, rel=1e-12, abs=1e-15)
    assert g2.radius_to_q(r) * lam2 == pytest.approx(by_hand, rel=1e-12, abs=1e-15)


@FAST
@given(geometries(), st.floats(0.0, 5000.0), st.floats(0.1, 10.0))
def test_only_pixel_size_over_distance_matters(g, r, scale):
    g2 = g.replace(pixel_size=g.pixel_size * scale, distance=g.distance * scale)
    assert g2.radius_to_q(r) == pytest.approx(g.radius_to_q(r), rel=1e-12, abs=1e-15)
    assert math.tan(g.two_theta(r)) == pytest.approx(r * g.pixel_size / g.distance, rel=1e-12)


@FAST
@given(geometries(), st.floats(1.0, 1e4))
def test_q_monotonic_in_radius_and_bounded(g, r):
    q1, q2 = g.radius_to_q(r), g.radius_to_q(r * 1.001)
    assert 0 < q1 < q2 < g.q_max_physical


@FAST
@given(geometries())
def test_unreachable_q_refused(g):
    with pytest.raises(GeometryError, match="not reachable"):
        g.q_to_radius(g.q_max_physical * 1.0001)


@FAST
@given(st.floats(100.0, 1e6))
def test_energy_wavelength_product(e):
    lam = energy_to_wavelength(e)
    assert lam * e == pytest.approx(HC_KEV_ANGSTROM * 1e3, rel=1e-14)
    assert energy_to_wavelength(HC_KEV_ANGSTROM * 1e3 / lam) == pytest.approx(lam, rel=1e-12)


@FAST
@given(st.floats(1.5, 5000.0), st.booleans())
def test_default_nphi_is_one_pixel_of_arc(r, fast):
    n = default_nphi(r, fast=fast)
    assert 2 * math.pi * r / n <= 1.0 + 1e-12               # at most one pixel of arc
    plain = default_nphi(r, fast=False)
    assert n >= plain
    assert n <= 1.06 * plain + 8    # "about" one pixel: 5-smooth lengths lie <= 5.5 % apart
    if plain > 8:
        assert 2 * math.pi * r / (plain - 1) > 1.0          # and no coarser than needed


# -- polar kernel --------------------------------------------------------------------
@st.composite
def polar_setups(draw, inside=False, square_centre=False, nphi_multiple=1, with_mask=True):
    """(geometry, grid, image shape, mask or None, method, rng)."""
    if square_centre:
        n = draw(st.integers(9, 30)) * 2 + 1                # odd: the centre is a pixel
        ny = nx = n
        cx = cy = (n - 1) / 2
    else:
        ny, nx = draw(st.integers(12, 48)), draw(st.integers(12, 48))
        cx = draw(st.floats(0.25 * (nx - 1), 0.75 * (nx - 1)))
        cy = draw(st.floats(0.25 * (ny - 1), 0.75 * (ny - 1)))
    room = min(cx, cy, nx - 1 - cx, ny - 1 - cy) - 1.5 if inside else 0.9 * max(nx, ny)
    assume(room > 2.0)
    r_in = draw(st.floats(0.5, room - 1.0))
    r_out = draw(st.floats(r_in + 0.5, room))
    g = Geometry(cx, cy, draw(pixel_sizes), draw(distances), draw(wavelengths))
    assume(r_out * g.pixel_size / g.distance < 10)           # far from 90 degrees
    nphi = draw(st.integers(1, 24)) * nphi_multiple
    assume(nphi >= 2)
    nq = draw(st.integers(1, 6))
    grid = make_grid(g, g.radius_to_q(r_in), g.radius_to_q(r_out), nphi=nphi, nq=nq)
    method = draw(st.sampled_from(METHODS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mask = None
    if with_mask and draw(st.booleans()):
        mask = rng.random((ny, nx)) < draw(st.floats(0.5, 1.0))
    return g, grid, (ny, nx), mask, method, rng


def _operator(g, grid, shape, mask, method):
    try:
        return build_operator(g, grid, shape, mask, method)
    except GeometryError:            # the drawn band has no good pixel at all: not this test
        assume(False)


@FAST
@given(polar_setups(), st.integers(1, 3))
def test_polar_shapes_finite_masked_zero(setup, k):
    g, grid, shape, mask, method, rng = setup
    op = _operator(g, grid, shape, mask, method)
    images = rng.gamma(2.0, 50.0, size=(k,) + shape).astype(np.float32) + 1
    windows = images[(slice(None),) + op.window]
    polar, nonfinite = apply_polar(windows, op)
    nq, nphi = grid.shape
    assert polar.shape == (k, nq, nphi) and polar.dtype == np.float32
    assert np.all(np.isfinite(polar)) and np.all(nonfinite == 0)
    pm = op.polar_mask
    assert pm.shape == (nq, nphi)
    assert np.all(polar[:, ~pm] == 0)
    # a good bin is a convex combination of good pixels: within their range
    assert np.all(polar[:, pm] >= images.min() * (1 - 1e-6))
    assert np.all(polar[:, pm] <= images.max() * (1 + 1e-6))
    norm, mean = normalize_rows(polar, pm)
    assert norm.shape == polar.shape and np.all(np.isfinite(norm))
    assert np.all(norm[:, ~pm] == 0)
    rows = pm.any(axis=1)
    # each row with a good bin has a masked mean of 1 after normalisation
    for t in range(k):
        for q in np.flatnonzero(rows):
            assert norm[t, q, pm[q]].mean() == pytest.approx(1.0, rel=1e-5)
    assert np.all(np.isnan(mean[:, ~rows]))


@FAST
@given(polar_setups(), st.floats(0.1, 1e4))
def test_constant_image_gives_rows_of_one(setup, c):
    g, grid, shape, mask, method, rng = setup
    op = _operator(g, grid, shape, mask, method)
    img = np.full((1,) + shape, c, np.float32)
    polar, _ = apply_polar(img[(slice(None),) + op.window], op)
    pm = op.polar_mask
    np.testing.assert_allclose(polar[0][pm], c, rtol=1e-5)
    norm, mean = normalize_rows(polar, pm)
    np.testing.assert_allclose(norm[0][pm], 1.0, rtol=1e-5)
    assert np.all(norm[0][~pm] == 0)
    rows = pm.any(axis=1)
    np.testing.assert_allclose(mean[0][rows], c, rtol=1e-5)


@FAST
@given(polar_setups(), st.floats(-3.0, 3.0))
def test_polar_is_linear(setup, a):
    g, grid, shape, mask, method, rng = setup
    op = _operator(g, grid, shape, mask, method)
    x = rng.normal(size=(1,) + shape)[(slice(None),) + op.window]
    y = rng.normal(size=(1,) + shape)[(slice(None),) + op.window]
    lhs, _ = apply_polar(a * x + y, op)
    px, _ = apply_polar(x, op)
    py, _ = apply_polar(y, op)
    np.testing.assert_allclose(lhs, a * px + py, atol=1e-4 * (abs(a) + 1) * 10)


def _too_close_to_a_pixel_edge(g, grid, method="nearest", subdivision=4):
    """Nearest neighbour is discontinuous half way between pixels; with a float-rounded
    angle a rotated sample point may fall on the other side. Not this test's subject.

    Pixel splitting samples each bin on a polar sub-grid (``subdivision`` samples per
    pixel of radius and of arc, as :func:`sacla_dask.polar.build_operator`) and has the
    same tie for a sample on a pixel edge."""
    if method == "splitting":
        dr, dphi = grid.dr, grid.dphi
        n_r = max(1, math.ceil(subdivision * dr - 1e-9))
        pts = []
        for rad in grid.radius:
            n_a = max(1, math.ceil(subdivision * (rad + dr / 2) * dphi - 1e-9))
            a = (np.arange(n_a) + 0.5) / n_a * dphi - dphi / 2
            rk = rad - dr / 2 + (np.arange(n_r) + 0.5) * dr / n_r
            ang = (grid.phi[:, None] + a[None, :]).ravel()
            pts.append((rk[:, None] * np.ones_like(ang), ang[None, :] * np.ones_like(rk)[:, None]))
        r = np.concatenate([x.ravel() for x, _ in pts])
        p = np.concatenate([y.ravel() for _, y in pts])
    else:
        r, p = np.meshgrid(grid.radius, grid.phi, indexing="ij")
    for v in (g.center_x + r * np.cos(p), g.center_y + r * np.sin(p)):
        frac = np.abs(v - np.floor(v) - 0.5)
        if np.any(frac < 1e-6):
            return True
    return False


@FAST
@given(polar_setups(inside=True, square_centre=True, nphi_multiple=4, with_mask=False),
       st.integers(1, 3))
def test_rotating_the_image_shifts_phi(setup, turns):
    """np.rot90 turns the image by -90 degrees per turn in (x right, y down) pixel axes
    about the array centre: the polar image is the same, shifted by nphi/4 per turn:
    P(rot90(img, k))[..., j] = P(img)[..., j + k nphi/4]."""
    g, grid, shape, _, method, rng = setup
    if method in ("nearest", "splitting"):
        assume(not _too_close_to_a_pixel_edge(g, grid, method))
    op = _operator(g, grid, shape, None, method)
    img = rng.gamma(2.0, 50.0, size=shape)
    rot = np.rot90(img, turns)
    p0, _ = apply_polar(img[None][(slice(None),) + op.window], op)
    p1, _ = apply_polar(rot[None][(slice(None),) + op.window], op)
    nphi = grid.shape[1]
    expected = np.roll(p0, -turns * nphi // 4, axis=-1)
    np.testing.assert_allclose(p1, expected, rtol=1e-4, atol=1e-3)


@FAST
@given(polar_setups(), st.integers(1, 6))
def test_nonfinite_pixels_are_flagged_not_spread(setup, nbad):
    """Bins whose interpolation touches a NaN/inf pixel come out NaN (and stay NaN, masked
    for that shot, after normalize_rows); every other bin is the same as for the clean
    image."""
    g, grid, shape, mask, method, rng = setup
    op = _operator(g, grid, shape, mask, method)
    img = rng.gamma(2.0, 50.0, size=(1,) + shape).astype(np.float32) + 1
    win = img[(slice(None),) + op.window]
    dirty = win.copy()
    wy, wx = op.window_shape
    ys, xs = rng.integers(0, wy, nbad), rng.integers(0, wx, nbad)
    dirty[0, ys, xs] = rng.choice([np.nan, np.inf, -np.inf], nbad)
    clean_p, _ = apply_polar(win, op)
    p, nonfinite = apply_polar(dirty, op)
    hit = np.isnan(p[0])
    assert not np.any(np.isinf(p))
    # counted: the bad pixels the operator reads (not those it gives no weight to)
    assert (nonfinite[0] > 0) == hit.any()
    assert nonfinite[0] <= np.count_nonzero(~np.isfinite(dirty))
    np.testing.assert_array_equal(p[0][~hit], clean_p[0][~hit])
    assert not np.any(hit & ~op.polar_mask)                 # masked bins stay 0
    if method == "nearest" and not _too_close_to_a_pixel_edge(g, grid):
        # independent: the pixel each good bin looks up
        r, ph = np.meshgrid(grid.radius, grid.phi, indexing="ij")
        ix = np.rint(g.center_x + r * np.cos(ph)).astype(int) - op.window[1].start
        iy = np.rint(g.center_y + r * np.sin(ph)).astype(int) - op.window[0].start
        inside = (ix >= 0) & (ix < wx) & (iy >= 0) & (iy < wy) & op.polar_mask
        bad = np.zeros(grid.shape, bool)
        bad[inside] = ~np.isfinite(dirty[0, iy[inside], ix[inside]])
        np.testing.assert_array_equal(hit, bad)
        assert nonfinite[0] == len(set(zip(iy[bad], ix[bad], strict=True)))
    norm, mean = normalize_rows(p, op.polar_mask)
    np.testing.assert_array_equal(np.isnan(norm[0]), hit)
    assert np.all(np.isfinite(norm[0][~hit]))
    rows = op.polar_mask.any(axis=1)
    for q in np.flatnonzero(rows):
        good = op.polar_mask[q] & ~hit[q]
        if good.any():
            assert mean[0, q] == pytest.approx(clean_p[0, q, good].astype(np.float64).mean(),
                                               rel=1e-6)


# -- correlation kernels -------------------------------------------------------------
@st.composite
def pair_blocks(draw, min_nq=1):
    """(a, b, polar_mask): pairs of normalised polar images, 0 where masked."""
    nq = draw(st.integers(min_nq, 4))
    nphi = draw(st.integers(2, 40))
    npair = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pm = rng.random((nq, nphi)) < draw(st.floats(0.3, 1.0))
    a = (1 + 0.3 * rng.normal(size=(npair, nq, nphi))) * pm
    b = (1 + 0.3 * rng.normal(size=(npair, nq, nphi))) * pm
    return a, b, pm


def brute_force(a, b, pm, q1, q2):
    """C[p, r, k] = sum_n D[p, q1, n] D[p, q2, n + k] / sum_n m[q1, n] m[q2, n + k]."""
    d = a - b
    npair, _, nphi = d.shape
    c = np.zeros((npair, len(q1), nphi))
    m = np.zeros((len(q1), nphi))
    for r, (i, j) in enumerate(zip(q1, q2, strict=True)):
        for k in range(nphi):
            c[:, r, k] = (d[:, i] * np.roll(d[:, j], -k, axis=-1)).sum(axis=-1)
            m[r, k] = (pm[i] & np.roll(pm[j], -k)).sum()
    return c, m


@FAST
@given(pair_blocks(), st.sampled_from(["auto", "all"]))
def test_correlation_equals_brute_force_sum(blocks, q_pairs):
    a, b, pm = blocks
    plan = make_plan(pm, q_pairs)
    c = difference_correlation(a, b, plan)
    assert c.shape == (a.shape[0], plan.nqp, pm.shape[1])
    ref, m = brute_force(a, b, pm, plan.q1, plan.q2)
    ok = np.broadcast_to(m > 0, c.shape)
    np.testing.assert_allclose(c[ok], (ref / np.where(m > 0, m, 1))[ok], rtol=1e-9, atol=1e-12)
    assert np.all(np.isfinite(c[ok]))


@FAST
@given(pair_blocks())
def test_autocorrelation_symmetric_and_zero_lag_is_mean_square(blocks):
    a, b, pm = blocks
    plan = make_plan(pm)
    c = difference_correlation(a, b, plan)
    auto = np.flatnonzero(plan.q1 == plan.q2)
    nphi = pm.shape[1]
    neg = (-np.arange(nphi)) % nphi
    ca = c[:, auto]
    np.testing.assert_allclose(ca, ca[..., neg], rtol=1e-9, atol=1e-12)    # C(dphi) = C(-dphi)
    d = a - b
    for r, q in zip(auto, plan.q1[auto], strict=True):
        if pm[q].any():
            ms = (d[:, q, pm[q]] ** 2).mean(axis=-1)
            np.testing.assert_allclose(c[:, r, 0], ms, rtol=1e-9, atol=1e-12)


@FAST
@given(pair_blocks(min_nq=2))
def test_cross_correlation_swaps_with_reversed_lag(blocks):
    """C(q1, q2, dphi) = C(q2, q1, -dphi)."""
    a, b, pm = blocks
    plan = make_plan(pm, np.array([[0, 1], [1, 0]]))
    c = difference_correlation(a, b, plan)
    r01 = np.flatnonzero((plan.q1 == 0) & (plan.q2 == 1))[0]
    r10 = np.flatnonzero((plan.q1 == 1) & (plan.q2 == 0))[0]
    nphi = pm.shape[1]
    neg = (-np.arange(nphi)) % nphi
    np.testing.assert_allclose(c[:, r01], c[:, r10][..., neg], rtol=1e-9, atol=1e-12)


@FAST
@given(pair_blocks(), st.integers(0, 100))
def test_correlation_invariant_to_a_common_phi_shift(blocks, s):
    """Turning both shots (and the mask with them) about the beam changes nothing."""
    a, b, pm = blocks
    c0 = difference_correlation(a, b, make_plan(pm, "all"))
    sh = s % pm.shape[1]
    c1 = difference_correlation(np.roll(a, sh, -1), np.roll(b, sh, -1),
                                make_plan(np.roll(pm, sh, -1), "all"))
    np.testing.assert_allclose(c1, c0, rtol=1e-9, atol=1e-12)


@st.composite
def chunked_runs(draw):
    """(polar (ntag, nq, nphi), mask, ia, ib, two tag chunkings)."""
    ntag = draw(st.integers(2, 14))
    nq, nphi = draw(st.integers(1, 3)), draw(st.integers(2, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pm = rng.random((nq, nphi)) < 0.8
    polar = (1 + 0.3 * rng.normal(size=(ntag, nq, nphi))) * pm
    npair = draw(st.integers(1, 2 * ntag))
    ia = rng.integers(0, ntag, npair)
    ib = (ia + rng.integers(1, ntag, npair)) % ntag          # never a shot with itself

    def chunking():
        cuts = sorted(draw(st.sets(st.integers(1, ntag - 1), max_size=ntag - 1)))
        edges = [0, *cuts, ntag]
        return tuple(int(e - s) for s, e in zip(edges[:-1], edges[1:], strict=True))

    return polar, pm, ia, ib, chunking(), chunking()


@SLOWER
@given(chunked_runs())
def test_correlation_independent_of_dask_chunking(run):
    polar, pm, ia, ib, ch1, ch2 = run
    plan = make_plan(pm)
    eager = difference_correlation(polar[ia], polar[ib], plan)
    means = []
    for ch in (ch1, ch2):
        lazy = da.from_array(polar, chunks=(ch, -1, -1))
        corr, order = correlate_pairs(lazy, ia, ib, plan)
        assert sorted(order.tolist()) == list(range(ia.size))          # every pair once
        assert_eq(corr, eager[order], rtol=1e-12, atol=1e-14)
        means.append(corr.mean(axis=0, split_every=2).compute(scheduler="sync"))
    np.testing.assert_allclose(means[0], means[1], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(means[0], eager.mean(axis=0), rtol=1e-12, atol=1e-14)
