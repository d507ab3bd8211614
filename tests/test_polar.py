"""The polar transform against independent truths: pyFAI, analytic images, geometry.

pyFAI conventions, mapped onto ours (checked by ``test_pyfai_conventions``):

* pyFAI puts pixel ``i``'s centre at ``(i + 0.5) * pixel_size`` along each
  axis, ours at ``i``: ``poni1 = (center_y + 0.5) * pixel_size`` (slow axis,
  rows) and ``poni2 = (center_x + 0.5) * pixel_size`` (fast axis, columns),
  in metres; ``dist`` = distance; ``wavelength`` in metres.
* pyFAI's ``chi = atan2(row - cy, col - cx)``, from +x toward +y, is our
  ``phi``; it lies in (-pi, pi] unless ``setChiDiscAtZero()`` (then
  [0, 2 pi)). Our bin ``j`` covers ``phi_j +- pi / nphi`` with
  ``phi_j = 2 pi j / nphi``, so pyFAI is asked for ``nphi - 1`` bins over
  ``azimuth_range = (dphi/2, 360 - dphi/2)`` degrees (chi discontinuity at
  0): its bin ``m`` is our bin ``m + 1``. Our bin 0 straddles pyFAI's
  discontinuity and its neighbours lose the pixels pyFAI drops there: those
  three columns are not compared.
* Radial: unit ``r_mm``, ``r_mm = radius_px * pixel_size * 1e3``; pyFAI is
  asked for one extra bin on each side of the band (its outermost bins
  treat the pixels that cross the range's edge differently) and those are
  dropped.
* pyFAI's mask is 1 = masked, ours 1 = good. Its ``correctSolidAngle`` is
  on by default: it is set explicitly.
"""

from __future__ import annotations

import math
import pickle
import warnings
import weakref

import dask
import numpy as np
import pytest
import scipy.fft
from hypothesis import given, settings
from hypothesis import strategies as st

from sacla_dask.errors import GeometryError, ParameterError
from sacla_dask.geometry import Geometry, default_nphi
from sacla_dask.polar import (
    METHODS,
    GatherEngine,
    PolarOperator,
    PolarTransform,
    SparseEngine,
    apply_polar,
    build_operator,
    correction_factors,
    make_grid,
    polar_from_columns,
    polar_from_gathered,
)

SHAPE = (150, 170)
CX, CY = 83.3, 71.6
PIX = 100e-6
GEOM = Geometry(CX, CY, PIX, 0.1, 1.0)


def coords(shape=SHAPE, cx=CX, cy=CY):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    return np.hypot(xx - cx, yy - cy), np.arctan2(yy - cy, xx - cx), xx, yy


def smooth_image(shape=SHAPE, cx=CX, cy=CY):
    r, ph, xx, _ = coords(shape, cx, cy)
    return (100 + 0.02 * r ** 2 + 20 * np.cos(2 * ph + 0.3) * r / 50 + 0.1 * xx).astype(np.float32)


def band(geom=GEOM, r_in=20.0, r_out=60.0, **kw):
    return make_grid(geom, geom.radius_to_q(r_in), geom.radius_to_q(r_out), **kw)


def polar_of(img, op):
    return apply_polar(img[op.window][None], op)[0][0]


def with_sparse_engine(op):
    """The same operator holding its map as a CSR matrix (whatever its engine)."""
    return PolarOperator(SparseEngine(op.matrix), op.window, op.shape, op.polar_mask,
                         op.coverage, op.method, tile=op.tile, corrections=op.corrections,
                         token=op.token, pixels=op.pixels)


def panel_gaps(shape=SHAPE):
    good = np.ones(shape, bool)
    good[:, 90:94] = False   # a vertical gap through the band
    good[40:43, :] = False   # a horizontal one
    good[80:84, 20:30] = False
    return good


# -- pyFAI --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pyfai_ai():
    pytest.importorskip("pyFAI")

    def make(geom: Geometry, shape=SHAPE):
        return geom.to_pyfai(shape)

    return make


def pyfai_polar(ai, img, grid, geom, good=None, **kw):
    """pyFAI integrate2d (full pixel splitting, CSR) on our grid; NaN where pyFAI has no pixel.

    Returns (nq, nphi); NaN in our bin 0 (which straddles pyFAI's chi = 0), in its
    neighbours 1 and nphi - 1 (pyFAI leaves out the pixels that straddle chi = 0, so
    they miss part of their area) and where pyFAI has no pixel.
    """
    nq, nphi = grid.shape
    dr = grid.dr
    r_in, r_out = grid.r_edges
    dphi = 360 / nphi
    mm = geom.pixel_size * 1e3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ai.integrate2d_ng(img, nq + 2, nphi - 1, unit="r_mm",
                                radial_range=((r_in - dr) * mm, (r_out + dr) * mm),
                                azimuth_range=(dphi / 2, 360 - dphi / 2),
                                method=("full", "csr", "cython"),
                                mask=None if good is None else (~good).astype(np.int8),
                                **kw)
    np.testing.assert_allclose(res.radial[1:-1] / mm, grid.radius, atol=1e-4)
    np.testing.assert_allclose(res.azimuthal, np.degrees(grid.phi[1:]), atol=1e-4)
    out = np.full((nq, nphi), np.nan)
    out[:, 1:] = np.where(res.sum_normalization > 0, res.intensity, np.nan).T[1:-1]
    out[:, [1, -1]] = np.nan  # pyFAI drops the pixels that straddle its chi discontinuity
    return out


def test_pyfai_conventions(pyfai_ai):
    """Pixel centres, chi and q of pyFAI equal our radius, phi and q at every pixel."""
    ai = pyfai_ai(GEOM)
    r, ph, _, _ = coords()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r_mm = ai.array_from_unit(SHAPE, "center", "r_mm")
        q = ai.array_from_unit(SHAPE, "center", "q_A^-1")
        chi = ai.center_array(SHAPE, unit="chi_rad", scale=False)
    np.testing.assert_allclose(r_mm / (PIX * 1e3), r, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(q, GEOM.radius_to_q(r), rtol=1e-9, atol=1e-12)
    d = np.angle(np.exp(1j * (chi - ph)))  # equal modulo 2 pi
    far = r > 0.5
    assert np.abs(d[far]).max() < 1e-6
    assert chi.min() >= 0  # chi discontinuity at 0: [0, 2 pi) like our phi


@pytest.mark.parametrize("method", ["bilinear", "splitting"])
@pytest.mark.parametrize("masked", [False, True])
def test_smooth_image_matches_pyfai(pyfai_ai, method, masked):
    good = panel_gaps() if masked else None
    grid = band(nphi=256)
    op = build_operator(GEOM, grid, SHAPE, good, method)
    ours = polar_of(smooth_image(), op)
    ref = pyfai_polar(pyfai_ai(GEOM), smooth_image(), grid, GEOM, good, correctSolidAngle=False)
    sel = op.polar_mask & np.isfinite(ref)
    assert sel.sum() > 0.8 * op.polar_mask.sum()
    rel = np.abs(ours[sel] / ref[sel] - 1)
    assert rel.max() < 0.01, f"{method}: worst relative difference {rel.max():.2%}"
    if masked:
        assert (~op.polar_mask).sum() > 100  # the gaps did reach the band


def test_corrections_match_pyfai(pyfai_ai):
    """Solid angle and polarisation: a short distance, where they are tens of percent.

    (Closer still, at 4 mm, pyFAI's own splitting drifts up to 0.8 % from the
    converged area average, which ours reaches with subdivision 16..64.)
    """
    geom = GEOM.replace(distance=0.01)  # r = 60 px = 6 mm: 2 theta = 31 deg, cos^3 = 0.63
    grid = band(geom, nphi=256)
    img = smooth_image()
    ref = pyfai_polar(pyfai_ai(geom), img, grid, geom, correctSolidAngle=True,
                      polarization_factor=0.9)
    plain = polar_of(img, build_operator(geom, grid, SHAPE, None, "splitting"))
    for method in ("bilinear", "splitting"):
        op = build_operator(geom, grid, SHAPE, None, method, solid_angle=True, polarization=0.9)
        assert op.corrections == "solid_angle,polarization(0.9)"
        ours = polar_of(img, op)
        sel = op.polar_mask & np.isfinite(ref)
        rel = np.abs(ours[sel] / ref[sel] - 1)
        assert rel.max() < 0.01, f"{method}: worst relative difference {rel.max():.2%}"
    # the test can tell: without the corrections the values are far off
    assert np.nanmax(np.abs(plain / ref - 1)) > 0.3


def test_correction_factors_analytic():
    """cos^3(2theta) and the polarisation factor at chosen pixels (0, 45, 90 degrees)."""
    g = Geometry(0.0, 0.0, 1e-3, 1.0, 1.0)  # 1 px = 1 mm at 1 m: 1000 px is 2theta = 45 deg
    iy = np.array([0, 0, 1000])
    ix = np.array([1000, 0, 0])
    c2 = 0.5  # cos^2(45 deg)
    np.testing.assert_allclose(correction_factors(g, iy, ix, solid_angle=True),
                               [c2 ** 1.5, 1, c2 ** 1.5])
    # horizontal polarisation (f = 1): along x, P = (1 + cos^2 - sin^2)/2 = cos^2; along y 1
    np.testing.assert_allclose(correction_factors(g, iy, ix, polarization=1.0), [c2, 1, 1])
    np.testing.assert_allclose(correction_factors(g, iy, ix, polarization=0.0),
                               [(1 + c2) / 2, 1, (1 + c2) / 2])


def ring_centroid(profile, radius, half=5):
    k = int(np.argmax(profile))
    s = slice(max(0, k - half), k + half + 1)
    b = profile[s] - profile[s].min()
    return float((b * radius[s]).sum() / b.sum())


@pytest.mark.parametrize("method", ["bilinear", "splitting"])
def test_sharp_ring_position_matches_pyfai(pyfai_ai, method):
    r0 = 41.37
    r, _, _, _ = coords()
    img = (1 + 100 * np.exp(-((r - r0) ** 2) / 2)).astype(np.float32)  # sigma = 1 px
    grid = band(nphi=256)
    op = build_operator(GEOM, grid, SHAPE, None, method)
    ours = polar_of(img, op)[:, 2:-1].mean(axis=1)
    ref = pyfai_polar(pyfai_ai(GEOM), img, grid, GEOM, correctSolidAngle=False)[:, 2:-1]
    ref = ref.mean(axis=1)
    c_ours, c_ref = ring_centroid(ours, grid.radius), ring_centroid(ref, grid.radius)
    assert abs(c_ours - c_ref) < 0.1
    assert abs(c_ours - r0) < 0.1


# -- analytic truth ----------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_harmonic_recovered_up_to_nphi_over_4(method):
    """f(r) (1 + a cos(n phi + p)): the FFT of each polar row peaks at n with phase p."""
    shape, cx, cy = (128, 128), 63.7, 64.2
    geom = Geometry(cx, cy, PIX, 0.1, 1.0)
    # nphi = ceil(2 pi 56) = 352; period >= 3.3 px at n = 88
    grid = band(geom, 46.0, 56.0, fast_nphi=False)
    nphi = grid.phi.size
    assert nphi == default_nphi(56.0, fast=False)
    r, ph, _, _ = coords(shape, cx, cy)
    f = 10 + np.exp(-((r - 51) ** 2) / 50)
    op = build_operator(geom, grid, shape, None, method)
    rng = np.random.default_rng(3)
    for n in (1, 2, 6, 17, nphi // 8, nphi // 4):
        p = rng.uniform(-np.pi, np.pi)
        img = (f * (1 + 0.3 * np.cos(n * ph + p))).astype(np.float32)
        pol = polar_of(img, op)
        spec = np.fft.rfft(pol, axis=1)
        power = (np.abs(spec[:, 1:]) ** 2).sum(axis=0)
        assert int(np.argmax(power)) + 1 == n, f"n={n}"
        c = (spec[:, n] / spec[:, 0]).mean()  # expected 0.3 / 2 exp(i p), attenuated
        assert abs(np.angle(c * np.exp(-1j * p))) < 0.05, f"n={n}: phase off"
        assert 0.3 * 0.5 * 0.5 < abs(c) < 0.3 * 0.5 * 1.05, f"n={n}: amplitude {abs(c)}"


def test_band_edges_and_q_coordinate():
    grid = band(r_in=20.0, r_out=60.0)
    assert grid.shape[0] == 40                                  # one bin per pixel of radius
    np.testing.assert_allclose(np.diff(grid.radius), 1.0)
    assert grid.radius[0] == pytest.approx(20.5) and grid.radius[-1] == pytest.approx(59.5)
    np.testing.assert_allclose(grid.q, GEOM.radius_to_q(grid.radius))  # q at bin centres
    exact = band(r_in=20.0, r_out=60.0, fast_nphi=False)
    assert exact.phi.size == exact.nphi_default == math.ceil(2 * math.pi * 60)   # 377 = 13 x 29
    assert grid.phi.size == scipy.fft.next_fast_len(exact.phi.size, real=True) == 384
    assert grid.nphi_default == exact.phi.size
    assert band(nq=10).shape[0] == 10 and band(nq=10).dr == pytest.approx(4.0)


# -- masks and coverage ------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_masked_pixels_carry_zero_weight(method):
    good = panel_gaps()
    op = build_operator(GEOM, band(), SHAPE, good, method)
    img = smooth_image()
    wild = img.copy()
    wild[~good] = np.nan
    wild[~good & (np.arange(SHAPE[1]) % 2 == 0)] = 1e30
    a, nf_a = apply_polar(img[op.window][None], op)
    b, nf_b = apply_polar(wild[op.window][None], op)
    np.testing.assert_array_equal(a, b)
    assert nf_b[0] == 0 and np.isfinite(b).all()
    assert np.all(a[0][~op.polar_mask] == 0)
    # no column of the matrix is a masked pixel
    masked_cols = op.columns(np.ascontiguousarray((~good)[op.window]).astype(np.float32))
    assert not np.any(op.matrix @ masked_cols)


def test_coverage_nearest_and_bilinear_exact():
    from scipy.ndimage import map_coordinates

    good = panel_gaps()
    grid = band(r_in=30.0, r_out=95.0, nphi=300)  # runs off the image too
    rr, pp = np.meshgrid(grid.radius, grid.phi, indexing="ij")
    x, y = CX + rr * np.cos(pp), CY + rr * np.sin(pp)
    op = build_operator(GEOM, grid, SHAPE, good, "nearest")
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    inside = (ix >= 0) & (ix < SHAPE[1]) & (iy >= 0) & (iy < SHAPE[0])
    expect = np.zeros(grid.shape)
    expect[inside] = good[iy[inside], ix[inside]]
    np.testing.assert_array_equal(op.coverage, expect)
    op = build_operator(GEOM, grid, SHAPE, good, "bilinear")
    expect = map_coordinates(good.astype(float), [y, x], order=1, mode="grid-constant", cval=0.0)
    np.testing.assert_allclose(op.coverage, expect, atol=1e-6)
    np.testing.assert_array_equal(op.polar_mask, op.coverage >= 0.5)
    assert 0.05 < (~op.polar_mask).mean() < 0.6


@pytest.mark.parametrize("subdivision,tol", [(4, 0.08), (16, 0.02), (32, 0.005)])
def test_coverage_splitting_is_area_fraction(subdivision, tol):
    """A half-plane mask: coverage = the bin's area fraction right of the pixel edge.

    Exact in the limit: the sampled estimate's worst error falls like 1/subdivision.
    """
    x_edge = 95                                   # pixels x >= 95 good: edge at x = 94.5
    good = np.zeros(SHAPE, bool)
    good[:, x_edge:] = True
    grid = band(r_in=5.0, r_out=30.0, nphi=64)
    op = build_operator(GEOM, grid, SHAPE, good, "splitting", subdivision=subdivision)
    # independent: 64 x 64 midpoint quadrature of r dr dphi over each bin
    m = 64
    dr, dphi = grid.dr, grid.dphi
    u = (np.arange(m) + 0.5) / m - 0.5
    rs = grid.radius[:, None] + u[None, :] * dr                       # (nq, m)
    ps = grid.phi[:, None] + u[None, :] * dphi                        # (nphi, m)
    xs = CX + rs[:, None, :, None] * np.cos(ps)[None, :, None, :]     # (nq, nphi, m, m)
    wts = np.broadcast_to(rs[:, None, :, None], xs.shape)
    expect = (wts * (xs >= x_edge - 0.5)).sum(axis=(2, 3)) / wts.sum(axis=(2, 3))
    err = np.abs(op.coverage - expect)
    assert err.max() < tol, f"worst coverage error {err.max():.3f}"
    assert 0.2 < expect.mean() < 0.8


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_pixels_only_poison_the_bins_that_read_them(method):
    grid = band(nphi=200)
    op = build_operator(GEOM, grid, SHAPE, None, method)
    img = smooth_image()
    bad = img.copy()
    bad[CY.__round__(), 120] = np.nan   # r ~ 36.7 px, in the band
    bad[5, 5] = np.inf                  # far outside the band: never read
    clean = polar_of(img, op)
    pol, nf = apply_polar(bad[op.window][None], op)
    nan = np.isnan(pol[0])
    # the bins whose weights touch pixel (72, 120)
    probe = np.zeros(SHAPE, np.float32)
    probe[CY.__round__(), 120] = 1
    touched = polar_of(probe, op) > 0
    assert touched.any() and nf[0] == 1
    np.testing.assert_array_equal(nan, touched)
    np.testing.assert_array_equal(pol[0][~nan], clean[~nan])


# -- the kernel: blocks, dtypes, layouts ----------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_tiled_layout_equals_row_major(method):
    grid = band(r_in=5.0, r_out=60.0)
    good = panel_gaps()
    tiled = build_operator(GEOM, grid, SHAPE, good, method, tile=True)
    plain = build_operator(GEOM, grid, SHAPE, good, method, tile=False)
    assert tiled.tile is not None and plain.tile is None
    assert tiled.window_shape[0] % tiled.tile[0] == 0
    assert tiled.window_shape[1] % tiled.tile[1] == 0
    img = smooth_image()
    np.testing.assert_allclose(polar_of(img, tiled), polar_of(img, plain), rtol=2e-6)
    np.testing.assert_array_equal(tiled.polar_mask, plain.polar_mask)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("tile", [False, True])
def test_operator_built_in_blocks_on_threads_equals_one_block(monkeypatch, method, tile):
    """Building by blocks of q rows (on one or two threads: the settings
    polar.build-chunk-bins and polar.build-threads) gives the very operator of a build in
    one block: the CSR arrays, window, coverage and mask bit for bit."""
    import sacla_dask.polar.build as polar

    grid = band(r_in=5.0, r_out=60.0)
    good = panel_gaps()
    blocks: list[int] = []
    map_threads = polar._map_threads

    def counting(fn, items):
        blocks.append(len(items))
        return map_threads(fn, items)

    monkeypatch.setattr(polar, "_map_threads", counting)

    def build(chunk_bins, threads):
        monkeypatch.setattr(polar, "_OPERATORS", weakref.WeakValueDictionary())  # build anew
        blocks.clear()
        with dask.config.set({"sacla_dask.polar.build-chunk-bins": chunk_bins,
                              "sacla_dask.polar.build-threads": threads}):
            return build_operator(GEOM, grid, SHAPE, good, method, tile=tile, polarization=0.9)

    whole = build(1 << 30, 1)
    nq, nphi = grid.shape
    assert blocks[0] == 1
    for chunk_bins, threads in ((3 * nphi, 1), (3 * nphi, 2), (7 * nphi, 2), (1, 2)):
        op = build(chunk_bins, threads)
        assert blocks[0] == math.ceil(nq / max(1, chunk_bins // nphi))  # the q-row blocks
        assert op.window == whole.window and op.tile == whole.tile
        for a, b in ((op.matrix.data, whole.matrix.data),
                     (op.matrix.indices, whole.matrix.indices),
                     (op.matrix.indptr, whole.matrix.indptr),
                     (op.coverage, whole.coverage), (op.polar_mask, whole.polar_mask)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def test_an_operator_alive_is_reused_not_built_again(monkeypatch):
    """The same geometry, grid, mask and method give the operator already built while it
    is alive anywhere in the process (a plan made again); other inputs build another; none
    is kept alive by the reuse."""
    import gc

    import sacla_dask.polar.build as polar

    builds = []
    real = polar._build_operator
    monkeypatch.setattr(polar, "_build_operator", lambda *a: builds.append(1) or real(*a))
    monkeypatch.setattr(polar, "_OPERATORS", weakref.WeakValueDictionary())
    good = panel_gaps()
    op = build_operator(GEOM, band(), SHAPE, good, "bilinear")
    assert build_operator(GEOM, band(), SHAPE, good.copy(), "bilinear") is op
    assert len(builds) == 1
    for other in (dict(mask=~panel_gaps() | good), dict(method="nearest"),
                  dict(polarization=0.99), dict(min_coverage=0.9)):
        kw = dict(mask=good, method="bilinear") | other
        mask, method = kw.pop("mask"), kw.pop("method")
        assert build_operator(GEOM, band(), SHAPE, mask, method, **kw) is not op
    assert build_operator(GEOM, band(r_in=31.0), SHAPE, good, "bilinear") is not op
    assert len(builds) == 6
    token = op.token
    del op
    gc.collect()
    again = build_operator(GEOM, band(), SHAPE, good, "bilinear")
    assert len(builds) == 7 and again.token == token  # built anew, the same operator


class SnapshottingOperator(PolarOperator):
    """A PolarOperator that records what it pickles as before and after each change of its
    attributes: every state a worker pickling it on another thread could send."""

    snapshots: list = []

    def __setattr__(self, name, value):
        self.snapshot()
        super().__setattr__(name, value)
        self.snapshot()

    def snapshot(self):
        state = pickle.loads(pickle.dumps(PolarOperator.__getstate__(self)))
        copy = PolarOperator.__new__(PolarOperator)
        copy.__setstate__(state)
        self.snapshots.append(copy)


def test_gather_ships_as_its_index_and_derives_its_matrix():
    """A nearest operator travels to workers as an int32 gather index, not a CSR matrix;
    the copy computes the same images (a non-finite pixel derives the identical matrix)."""
    op = build_operator(GEOM, band(), SHAPE, panel_gaps(), "nearest")
    assert isinstance(op.engine, GatherEngine)
    m = op.matrix
    csr_bytes = m.data.nbytes + m.indices.nbytes + m.indptr.nbytes
    blob = pickle.dumps(op)
    back = pickle.loads(blob)
    assert "matrix" not in back._engine.__dict__          # a worker holds the gather only
    assert repr(back) == repr(op) and "nearest" in repr(op)
    assert "matrix" not in back._engine.__dict__          # (shown without deriving it)
    # a copy that only passes the operator on (Dask's scheduler) converts nothing: its
    # int32 index is pickled again as it came
    passed = back.__getstate__()["engine"].__reduce__()[1][0]
    assert passed.dtype == np.int32 and passed is back._engine.index
    assert not back._engine.is_ready
    fresh = pickle.loads(blob)                            # the matrix straight from the index
    for name in ("data", "indices", "indptr"):
        np.testing.assert_array_equal(getattr(fresh.matrix, name), getattr(m, name))
    with_matrix = len(pickle.dumps(with_sparse_engine(op)))
    assert len(blob) < with_matrix - csr_bytes // 2       # 4 bytes per bin instead of 12
    assert back.nbytes == op.nbytes - csr_bytes
    np.testing.assert_array_equal(back.used_columns, op.used_columns)
    # a worker pickles its copy on another thread while a task first uses the gather: at
    # every change of its state the operator pickles whole
    racing = pickle.loads(blob)
    SnapshottingOperator.snapshots = copies = []
    object.__setattr__(racing, "__class__", SnapshottingOperator)
    assert racing.gather[0].dtype == np.intp
    assert len(copies) == 2                               # the engine made ready: one change
    for c in copies:
        np.testing.assert_array_equal(c.gather[0], op.gather[0])
        np.testing.assert_array_equal(c.gather[1], op.gather[1])
    relayed = pickle.loads(pickle.dumps(back))            # a worker's copy sent on
    assert "matrix" not in relayed._engine.__dict__ and relayed.gather is not None
    assert relayed.gather[0].dtype == np.intp and relayed._engine.is_ready
    np.testing.assert_array_equal(relayed.gather[0], op.gather[0])
    np.testing.assert_array_equal(relayed.gather[1], op.gather[1])
    img = smooth_image()
    want, nf_want = apply_polar(img[op.window][None], op)
    got, nf_got = apply_polar(img[op.window][None], back)
    np.testing.assert_array_equal(got, want)
    assert "matrix" not in back._engine.__dict__ and nf_got[0] == nf_want[0] == 0
    img[72, 120] = np.nan                                 # the redo path uses the matrix
    want, nf_want = apply_polar(img[op.window][None], op)
    got, nf_got = apply_polar(img[op.window][None], back)
    np.testing.assert_array_equal(got, want)
    assert nf_got[0] == nf_want[0] == 1
    for name in ("data", "indices", "indptr"):
        np.testing.assert_array_equal(getattr(back.matrix, name), getattr(m, name))
    assert back.matrix.shape == m.shape
    again = pickle.loads(pickle.dumps(back))              # a copy of a copy: still a gather
    assert "matrix" not in again._engine.__dict__
    np.testing.assert_array_equal(apply_polar(img[op.window][None], again)[0], want)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        back.nope  # noqa: B018


@pytest.mark.parametrize("method,tile,corr", [
    ("nearest", False, {}), ("nearest", False, {"solid_angle": True}),
    ("bilinear", False, {}), ("bilinear", True, {}), ("splitting", True, {"polarization": 0.9}),
])
def test_compact_operator_reads_only_its_pixels_and_equals_the_window_one(method, tile, corr):
    """The compact operator (what the pipeline ships) gives bit for bit the full one's
    polar image, NaN bins and non-finite counts, from only the pixels it lists; the pixel
    list is exactly the set of pixels that carry weight, whatever the column order."""
    good = panel_gaps()
    op = build_operator(GEOM, band(r_in=5.0), SHAPE, good, method, tile=tile, **corr)
    c = op.compact()
    assert c.pixels is not None and c.tile is None and c.coverage is None
    assert op.compact() is c and c.compact() is c                 # cached, idempotent
    assert c.n_columns == c.pixels.size < op.n_columns
    # independent: a pixel carries weight iff a unit image there changes some bin
    (y0, y1), (x0, x1) = [(s.start, s.stop) for s in op.window]
    probe = np.zeros(SHAPE, np.float32)
    weighted = []
    for y in range(y0, y1, 3):
        for x in range(x0, x1, 3):
            probe[y, x] = 1
            if polar_of(probe, op).any():
                weighted.append((y - y0) * (x1 - x0) + (x - x0))
            probe[y, x] = 0
    listed = set(c.pixels.tolist())
    sampled = {(y - y0) * (x1 - x0) + (x - x0) for y in range(y0, y1, 3)
               for x in range(x0, x1, 3)}
    assert listed & sampled == set(weighted)
    rng = np.random.default_rng(3)
    img = (smooth_image() + rng.normal(0, 1, SHAPE)).astype(np.float32)
    img[72, 120] = np.nan                                         # in the band
    img[2, 2] = np.inf                                            # outside it
    for o in (c, pickle.loads(pickle.dumps(c))):                  # as a worker gets it
        want, nf_want = apply_polar(img[op.window][None], op)
        got, nf_got = apply_polar(img[op.window][None], o)        # gathered from the window
        np.testing.assert_array_equal(got, want)
        assert nf_got[0] == nf_want[0] == 1
        x = img.reshape(-1)[y0 * SHAPE[1] + o.row_offsets(SHAPE[1])]  # as a file read gives
        out = np.empty(op.shape, np.float32)
        assert polar_from_columns(x, o, out) == 1
        np.testing.assert_array_equal(out, want[0])
        if o.gather is None:
            with pytest.raises(ParameterError, match="not a compact gather"):
                o.bin_offsets(SHAPE[1])
            continue
        # a gather read bin by bin from the image's rows (the pipeline's ring reader)
        rows = img[y0:].reshape(-1)
        y = rows[o.bin_offsets(SHAPE[1])]
        assert polar_from_gathered(y, o) > 0                          # the NaN pixel's bins
        np.testing.assert_array_equal(y.reshape(op.shape), want[0])
        with pytest.raises(ParameterError, match="C-contiguous"):
            polar_from_gathered(np.zeros((op.shape[1], op.shape[0]), np.float32).T, o)
        y = img[op.window].reshape(-1)[o.bin_pixels]             # from a window read whole
        polar_from_gathered(y, o)
        np.testing.assert_array_equal(y.reshape(op.shape), want[0])
        finite = np.where(np.isfinite(img), img, 0).astype(np.float32)
        y = finite[y0:].reshape(-1)[o.bin_offsets(SHAPE[1])]
        assert polar_from_gathered(y, o) == 0
        np.testing.assert_array_equal(y.reshape(op.shape), polar_of(finite, op))
    assert pickle.loads(pickle.dumps(c)).pixels.dtype == np.int32


def test_compact_operator_is_smaller_on_a_ring():
    op = build_operator(GEOM, band(r_in=40.0, r_out=44.0), SHAPE, None, "nearest")
    c = op.compact()
    assert c.pixels.size < op.n_columns / 5                       # a thin ring of a window
    assert len(pickle.dumps(c)) < len(pickle.dumps(op))
    with pytest.raises(ParameterError, match="not a compact operator"):
        op.row_offsets(SHAPE[1])
    with pytest.raises(ParameterError, match="not a compact gather"):
        op.bin_offsets(SHAPE[1])
    with pytest.raises(ParameterError, match="not a compact gather"):
        op.bin_pixels  # noqa: B018


@pytest.mark.parametrize("method", ["nearest", "bilinear"])
def test_operator_for_workers_drops_only_the_coverage(method):
    """What the pipeline ships for a wide band: the same polar images (NaN pixels too),
    without the client-side coverage: smaller to hold and to pickle."""
    op = build_operator(GEOM, band(), SHAPE, panel_gaps(), method)
    w = op.for_workers()
    assert w.coverage is None and op.coverage is not None       # the client keeps it
    assert op.for_workers() is w and w.for_workers() is w
    assert w.nbytes == op.nbytes - op.coverage.nbytes
    assert len(pickle.dumps(w)) < len(pickle.dumps(op))
    img = smooth_image()
    img[72, 120] = np.nan
    want, nf_want = apply_polar(img[op.window][None], op)
    for o in (w, pickle.loads(pickle.dumps(w))):
        got, nf = apply_polar(img[op.window][None], o)
        np.testing.assert_array_equal(got, want)
        assert nf[0] == nf_want[0] == 1
        np.testing.assert_array_equal(o.polar_mask, op.polar_mask)


def test_nearest_gather_equals_the_matrix_product():
    op = build_operator(GEOM, band(), SHAPE, panel_gaps(), "nearest")
    assert op.gather is not None
    img = smooth_image()
    img[72, 120] = np.nan
    fast, nf_fast = apply_polar(img[op.window][None], op)
    slow, nf_slow = apply_polar(img[op.window][None], with_sparse_engine(op))  # CSR product
    np.testing.assert_array_equal(fast, slow)
    assert nf_fast[0] == nf_slow[0] == 1
    corrected = build_operator(GEOM, band(), SHAPE, None, "nearest", solid_angle=True)
    assert corrected.gather is None                       # weights are not all 1


def test_block_dtypes_and_layouts_agree():
    rng = np.random.default_rng(0)
    imgs = rng.uniform(0, 1000, (5,) + SHAPE).astype(np.float32)
    for tile in (False, True):
        op = build_operator(GEOM, band(), SHAPE, panel_gaps(), "bilinear", tile=tile)
        win = imgs[(slice(None),) + op.window]            # a non-contiguous view
        block, _ = apply_polar(win, op)
        assert block.dtype == np.float32 and block.shape == (5,) + op.shape
        one_by_one = np.stack([polar_of(im, op) for im in imgs])
        np.testing.assert_array_equal(block, one_by_one)
        np.testing.assert_allclose(apply_polar(win.astype(np.float64), op)[0], block, rtol=1e-6)
        ints = np.round(win).astype(np.uint16)
        np.testing.assert_allclose(apply_polar(ints, op)[0],
                                   apply_polar(ints.astype(np.float32), op)[0], rtol=1e-6)
    with pytest.raises(ParameterError, match="window shape"):
        apply_polar(imgs, op)


def test_transform_call_and_repr():
    tr = PolarTransform(GEOM, SHAPE, GEOM.radius_to_q(20), GEOM.radius_to_q(60),
                        method="splitting", solid_angle=True, polarization=0.99)
    img = smooth_image()
    np.testing.assert_array_equal(tr(img), tr(img[None])[0])
    np.testing.assert_array_equal(tr(img[tr.window], window=True), tr(img))
    text = repr(tr)
    assert "splitting" in text and "solid_angle,polarization(0.99)" in text and "MiB" in text
    assert tr.operator.nbytes >= tr.operator.matrix.data.nbytes + tr.operator.matrix.indices.nbytes


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="cubic"), "method must be one of"),
    (dict(method="bilinear", polarization=1.5), "polarization factor"),
    (dict(method="splitting", subdivision=0), "subdivision"),
    (dict(method="nearest", min_coverage=0), "min_coverage"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(ParameterError, match=match):
        build_operator(GEOM, band(), SHAPE, **kwargs)


def test_band_off_the_detector_is_refused():
    with pytest.raises(GeometryError, match="no good pixel"):
        build_operator(GEOM, band(r_in=300.0, r_out=320.0), SHAPE, None, "bilinear")


# -- property: rotating the image rotates phi ------------------------------------------
@settings(max_examples=30, deadline=None)
@given(ny=st.integers(24, 48), nx=st.integers(24, 48), fx=st.floats(0.3, 0.7),
       fy=st.floats(0.3, 0.7), r_in=st.floats(2.0, 8.0), width=st.floats(3.0, 12.0),
       quarter=st.integers(4, 40), method=st.sampled_from(METHODS), seed=st.integers(0, 99))
def test_rot90_shifts_phi_by_a_quarter(ny, nx, fx, fy, r_in, width, quarter, method, seed):
    """np.rot90 maps (dx, dy) to (dy, -dx): phi -> phi - pi/2, i.e. a roll by -nphi/4."""
    cx, cy = fx * (nx - 1) + 0.0123, fy * (ny - 1) - 0.0071   # no exact pixel-edge ties
    nphi = 4 * quarter
    rng = np.random.default_rng(seed)
    img = rng.uniform(1, 2, (ny, nx)).astype(np.float32)
    good = rng.uniform(size=(ny, nx)) > 0.1
    geom = Geometry(cx, cy, PIX, 0.1, 1.0)
    grid = band(geom, r_in, r_in + width, nphi=nphi)
    rot = Geometry(cy, nx - 1 - cx, PIX, 0.1, 1.0)     # new (x, y) = (y, nx - 1 - x)
    grid_r = band(rot, r_in, r_in + width, nphi=nphi)
    try:
        op = build_operator(geom, grid, (ny, nx), good, method)
    except GeometryError:
        return
    op_r = build_operator(rot, grid_r, (nx, ny), np.rot90(good), method)
    a = polar_of(img, op)
    b = polar_of(np.ascontiguousarray(np.rot90(img)), op_r)
    np.testing.assert_array_equal(np.roll(op.polar_mask, -quarter, axis=1), op_r.polar_mask)
    np.testing.assert_allclose(np.roll(a, -quarter, axis=1), b, rtol=1e-5, atol=1e-6)


# -- shipping the operator -------------------------------------------------------------
def test_operator_pickles_without_cache_and_tokenizes_cheaply():
    good = panel_gaps()
    op = build_operator(GEOM, band(), SHAPE, good, "bilinear")
    assert op.used_columns.sum() == np.unique(op.matrix.indices).size  # derives it
    assert op.compact() is op.compact()                                # keeps it aside
    back = pickle.loads(pickle.dumps(op))
    assert back._derived == {} and "used_columns" not in back._engine.__dict__
    for name in ("data", "indices", "indptr"):
        np.testing.assert_array_equal(getattr(back.matrix, name), getattr(op.matrix, name))
    same = build_operator(GEOM, band(), SHAPE, good.copy(), "bilinear")
    other = build_operator(GEOM, band(), SHAPE, ~panel_gaps() | good, "bilinear")
    tok = dask.base.tokenize
    assert tok(op) == tok(same) != tok(other)
    assert tok(op) != tok(build_operator(GEOM, band(), SHAPE, good, "nearest"))


@pytest.fixture
def small_plan(small_run, small_mask, small_params):
    from sacla_dask.plan import plan_run

    return plan_run(small_run.path, mask=small_mask, method="bilinear", chunks=8,
                    solid_angle=True, polarization=0.95, **small_params)


def test_operator_is_one_graph_key(small_plan):
    """The operator is one key of the graph, referenced (not embedded) by every polar task."""
    import cloudpickle

    norm, _, _ = small_plan.polar()
    op_nbytes = small_plan.transform.operator.nbytes
    # as built, and as dask.compute will run it (after graph optimisation)
    for arr in (norm, dask.optimize(norm)[0]):
        graph = dict(arr.__dask_graph__())
        sizes = {k: len(cloudpickle.dumps(v)) for k, v in graph.items()}
        big = [k for k, n in sizes.items() if n > op_nbytes / 2]
        assert len(big) == 1, big
        assert "polaroperator" in str(big[0]).lower()
        users = [k for k in graph if big[0] in dask.core.get_dependencies(graph, k)]
        assert len(users) == small_plan.n_chunks
        assert max(sizes[k] for k in users) < min(20_000, op_nbytes / 10)


def test_lazy_polar_equals_eager(small_plan, small_run, small_mask):
    import h5py
    from dask.array.utils import assert_eq

    from sacla_dask.polar import normalize_rows

    tr = small_plan.transform
    with h5py.File(small_run.path, "r") as fh:
        imgs = np.stack([fh[f"/run_{small_run.run}/detector_2d_assembled_1/tag_{int(t)}/"
                            "detector_data"][tr.window] for t in small_plan.run.tags])
    # eager, from the geometry alone (not the plan's operator)
    g = small_plan.geometry
    grid = make_grid(g, tr.qmin, tr.qmax)
    op = build_operator(g, grid, small_run.shape, small_mask, "bilinear", solid_angle=True,
                        polarization=0.95)
    assert op.window == tr.window
    raw, _ = apply_polar(imgs, op)
    norm, rmean = normalize_rows(raw, op.polar_mask)
    lazy_norm, lazy_rmean, _ = small_plan.polar()
    assert_eq(lazy_norm, norm)
    assert_eq(lazy_rmean, rmean)
    attrs = small_plan.attrs()
    assert attrs["method"] == "bilinear" and attrs["solid_angle"] is True
    assert attrs["polarization"] == 0.95
    assert "solid_angle,polarization(0.95)" in repr(small_plan)


# -- row normalisation -------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 3), nq=st.integers(1, 5), nphi=st.integers(2, 12),
       seed=st.integers(0, 10_000), dirty=st.booleans())
def test_normalize_rows_is_the_masked_mean(k, nq, nphi, seed, dirty):
    """Against numpy.ma: mean over good, finite bins; 0 masked; NaN where non-finite (a bin
    masked for that shot only)."""
    from sacla_dask.polar import normalize_rows

    rng = np.random.default_rng(seed)
    pm = rng.uniform(size=(nq, nphi)) > 0.3
    polar = rng.uniform(0.5, 2.0, (k, nq, nphi)).astype(np.float32)
    if not dirty:
        polar[:, ~pm] = 0                      # as apply_polar leaves them
    special = rng.uniform(size=polar.shape)
    polar[special < 0.08] = np.nan
    polar[(special > 0.08) & (special < 0.12)] = np.inf
    out, mean = normalize_rows(polar, pm)
    bad = ~np.isfinite(polar)
    ref = np.ma.masked_array(polar.astype(np.float64), mask=bad | ~pm[None]).mean(axis=-1)
    ref_mean = ref.filled(np.nan)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
    with np.errstate(invalid="ignore", divide="ignore"):
        expect = polar / ref_mean[..., None]
    expect[~np.isfinite(ref_mean)] = 0
    expect[bad & pm[None]] = np.nan
    expect[:, ~pm] = 0
    np.testing.assert_allclose(out, expect, rtol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(np.isnan(out), bad & pm[None])
    assert out.dtype == np.float32 and mean.dtype == np.float64


def test_cli_exposes_method_and_corrections(small_run, small_params, tmp_path):
    from click.testing import CliRunner

    from sacla_dask.cli import main

    p = small_params
    args = ["process", str(small_run.path), "--out", str(tmp_path / "r.zarr"),
            "--center", str(p["center"][0]), str(p["center"][1]),
            "--qmin", str(p["qmin"]), "--qmax", str(p["qmax"]),
            "--pixel-size", str(p["pixel_size"]), "--distance", str(p["distance"]),
            "--method", "splitting", "--solid-angle", "--polarization", "0.95", "--dry-run"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "splitting, solid_angle,polarization(0.95)" in res.output
    bad = CliRunner().invoke(main, args[:-3] + ["--polarization", "1.5", "--dry-run"])
    assert bad.exit_code != 0 and "1.5" in bad.output
