"""End-to-end pipeline: lazy == eager, known truth, schedulers, output contract."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import xarray as xr
from dask.array.utils import assert_eq

import sacla_dask as sd
from sacla_dask.io.run import open_run
from sacla_dask.io.synthetic import write_synthetic_run
from sacla_dask.plan import plan_run


def tutorial_reference(images, tags, bright, geom, qmin, qmax, nphi, mask):
    """The tutorial's algorithm in plain numpy (its two slips fixed), independent of the package.

    Nearest-neighbour polar sampling at radii one pixel apart, phi_j = 2 pi j / nphi,
    polar mask from the pixel mask, rows divided by their masked mean, consecutive bright
    pairs, FFT autocorrelation of the difference divided by the mask's autocorrelation,
    mean over pairs only.
    """
    r_in, r_out = geom.q_to_radius(qmin), geom.q_to_radius(qmax)
    nq = max(1, int(round(r_out - r_in)))
    dr = (r_out - r_in) / nq
    radius = r_in + (np.arange(nq) + 0.5) * dr
    phi = 2 * np.pi * np.arange(nphi) / nphi
    x = geom.center_x + radius[:, None] * np.cos(phi)[None, :]
    y = geom.center_y + radius[:, None] * np.sin(phi)[None, :]
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    pmask = mask[iy, ix]
    polar = images[:, iy, ix] * pmask
    norms = np.array([[row[m].mean() for row, m in zip(p, pmask, strict=True)] for p in polar])
    polar = polar / norms[:, :, None]
    b = np.sort(tags[bright])
    pos = {t: i for i, t in enumerate(tags)}
    diffs = np.array([polar[pos[a]] - polar[pos[c]] for a, c in zip(b[:-1], b[1:], strict=True)])
    f = np.fft.fft(diffs, axis=-1)
    ac = np.fft.ifft(np.abs(f) ** 2, axis=-1).real
    fm = np.fft.fft(pmask.astype(float), axis=-1)
    mac = np.fft.ifft(np.abs(fm) ** 2, axis=-1).real
    return polar, pmask, (ac / mac).mean(axis=0), np.asarray(geom.radius_to_q(radius))


def test_lazy_equals_eager_and_tutorial(small_run, small_mask, small_params):
    plan = plan_run(small_run.path, mask=small_mask, chunks=7, **small_params)
    ds = plan.dataset()
    # lazy: a graph, not yet values
    assert ds["polar"].chunks[0][0] == 7
    run = open_run(small_run.path)
    images = run.images(chunks=run.tags.size).compute()
    polar, pmask, corr, q = tutorial_reference(
        images, run.tags, run.bright, plan.geometry, small_params["qmin"], small_params["qmax"],
        plan.transform.nphi, small_mask)
    np.testing.assert_array_equal(ds["polar_mask"].values, pmask)
    np.testing.assert_allclose(ds["q"].values, q, rtol=1e-12)
    assert_eq(ds["polar"].data, polar.astype(np.float32), rtol=1e-5, atol=1e-6)
    assert_eq(ds["corr"].data, corr, rtol=1e-6, atol=1e-7)


def test_result_independent_of_chunking(small_run, small_params):
    a = plan_run(small_run.path, chunks=3, **small_params).dataset()
    b = plan_run(small_run.path, chunks=40, **small_params).dataset()
    assert_eq(a["corr"].data, b["corr"].data.compute(), rtol=1e-10)
    assert int(a["n_pairs"]) == int(b["n_pairs"]) == int(small_run.bright.sum()) - 1


def test_ring_lands_at_known_q(small_run, small_params):
    ds = plan_run(small_run.path, **small_params).dataset()
    bright = ds["bright"].values
    profile = ds["row_mean"].isel(tag=bright).mean("tag").compute()
    q_peak = float(profile.q[int(np.argmax(profile.values))])
    q_true = small_run.ring_q()[1]
    dq = float(np.diff(ds.q.values).mean())
    assert abs(q_peak - q_true) <= dq, (q_peak, q_true, dq)


def test_modulated_shots_correlate_at_theory_peaks(small_run, small_params):
    """Shots modulated by 1 + a cos(n (phi - p_i)), random p_i: the mean difference
    autocorrelation is a^2 <I>^2-weighted cos(n dphi): maxima at dphi = 2 pi k / n."""
    ds = plan_run(small_run.path, **small_params).dataset().compute()
    n = small_run.modulation_order
    c = ds["corr"].sel(q=small_run.ring_q()[1], method="nearest").values
    # the spectrum of the correlation is dominated by order n
    spec = np.abs(np.fft.rfft(c))
    assert int(np.argmax(spec[1:]) + 1) == n
    nphi = c.size
    # maxima at dphi = 2 pi k / n, minima half way between
    mid = [int(round((k + 0.5) * nphi / n)) for k in range(n)]
    peaks = [int(round(k * nphi / n)) % nphi for k in range(1, n)]
    assert np.all(c[peaks] > 0) and np.all(c[mid] < 0)


def test_distributed_equals_threaded(small_run, small_params, tmp_path):
    distributed = pytest.importorskip("distributed")
    plan = plan_run(small_run.path, chunks=6, out=tmp_path / "threaded.zarr", **small_params)
    ref = plan.execute()
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster):
        plan2 = plan_run(small_run.path, chunks=6, out=tmp_path / "dist.zarr", **small_params)
        res = plan2.execute()
    xr.testing.assert_allclose(ref["corr"], res["corr"], rtol=1e-12)
    xr.testing.assert_equal(ref["polar"], res["polar"])


def test_output_contract(small_run, small_params, tmp_path):
    out = tmp_path / "r.zarr"
    sd.process_run(small_run.path, out, **small_params)
    ds = xr.open_zarr(out, consolidated=False)
    assert ds.attrs["complete"] is True
    assert ds["polar"].dims == ("tag", "q", "phi") and ds["polar"].dtype == np.float32
    assert ds["polar_mask"].dtype == bool and ds["polar_mask"].dims == ("q", "phi")
    assert ds["corr"].dims == ("q", "dphi") and ds["corr"].dtype == np.float64
    assert ds["tag"].dtype == np.int64
    np.testing.assert_array_equal(ds["tag"].values, small_run.tags)
    for key in ("center_x", "center_y", "pixel_size", "distance", "wavelength", "run",
                "source", "sacla_dask_version"):
        assert key in ds.attrs, key
    assert ds.attrs["run"] == small_run.run
    np.testing.assert_allclose(ds.attrs["wavelength"], small_run.wavelength, rtol=1e-3)
    assert np.all(ds["polar"].values[:, ~ds["polar_mask"].values] == 0)
    phi = ds["phi"].values
    assert phi[0] == 0 and phi[-1] < 2 * np.pi
    pa, pb = ds["pair_tag_a"].values, ds["pair_tag_b"].values
    bright_tags = small_run.tags[small_run.bright]
    assert set(pa) | set(pb) <= set(bright_tags)
    np.testing.assert_array_equal(np.sort(pa), bright_tags[:-1])
    # one chain of overlapping consecutive pairs: each linked to the one before, counted
    # in corr_sem; no other pairs share a shot
    npair = bright_tags.size - 1
    assert ds.attrs["shared_shots"] == npair - 1 == ds.attrs["linked_pairs"]
    assert ds.attrs["unlinked_sharing"] == 0
    assert "linked_pairs" in ds["corr_sem"].attrs["long_name"]


def test_real_image_polar_transform_with_mask():
    from conftest import shared_file

    img = np.load(shared_file("loki", "test_img.npy"))
    mask = np.load(shared_file("loki", "test_mask.npy"))
    geom = sd.Geometry(152, 151, 400e-6, 0.051, 1.41)
    qmin, qmax = geom.radius_to_q(40), geom.radius_to_q(62)
    tr = sd.PolarTransform(geom, img.shape, qmin, qmax, mask=mask)
    polar = tr(img)
    pm = tr.polar_mask
    assert polar.shape == tr.shape == (22, sd.default_nphi(62))
    assert 0.5 < pm.mean() < 1.0          # the panel gaps are carried into the polar mask
    assert np.all(polar[~pm] == 0)
    # every good polar bin is the value of a good pixel at the nearest position
    r, p = np.meshgrid(tr.radius, tr.phi, indexing="ij")
    ix = np.rint(152 + r * np.cos(p)).astype(int)
    iy = np.rint(151 + r * np.sin(p)).astype(int)
    np.testing.assert_array_equal(pm, mask[iy, ix])
    np.testing.assert_allclose(polar[pm], img[iy, ix][pm], rtol=1e-6)
    # the bright broad ring peaks near r = 51 px
    prof = np.array([row[m].mean() for row, m in zip(polar, pm, strict=True)])
    assert abs(tr.radius[int(np.argmax(prof))] - 51) <= 3


def test_wavelength_from_photon_energy(small_run, small_params):
    plan = plan_run(small_run.path, **small_params)
    np.testing.assert_allclose(plan.geometry.wavelength, small_run.wavelength, rtol=1e-3)


def test_plan_repr_and_nothing_read(small_run, small_params, monkeypatch):
    from sacla_dask.io import hdf5

    calls = []
    orig = hdf5.read_pixels
    monkeypatch.setattr(hdf5, "read_pixels", lambda *a, **k: calls.append(1) or orig(*a, **k))
    plan = plan_run(small_run.path, **small_params)
    ds = plan.dataset()
    text = repr(plan)
    assert "q band" in text and "pairs" in text and "34" in text
    assert "33 pairs share a shot with the pair before" in text
    assert "<table>" in plan._repr_html_()
    assert calls == []
    ds["corr"].compute()
    assert calls


def test_planning_again_reuses_the_polar_operator(small_run, small_params):
    """A run planned again with the same geometry (other statistics) while the first plan
    is held shares its operator (built once); another band builds its own."""
    first = plan_run(small_run.path, **small_params)
    again = plan_run(small_run.path, bootstrap=5, **small_params)
    assert again.transform.operator is first.transform.operator
    other = dict(small_params, qmax=small_params["qmax"] * 1.01)
    assert plan_run(small_run.path, **other).transform.operator is not first.transform.operator


def test_nphi_default_uses_outer_radius_in_pixels(small_run, small_params):
    plan = plan_run(small_run.path, **small_params)
    r_out = plan.geometry.q_to_radius(small_params["qmax"])
    one_pixel = int(np.ceil(2 * np.pi * r_out))
    assert plan.transform.grid.nphi_default == one_pixel
    # rounded up to the next 5-smooth length (fast FFTs): a few per cent more bins at most
    assert plan.transform.nphi == scipy.fft.next_fast_len(one_pixel, real=True)
    assert one_pixel <= plan.transform.nphi <= 1.05 * one_pixel
    assert plan.transform.nphi > 100   # not 2*pi*qmax (a handful of bins)
    exact = plan_run(small_run.path, **small_params, fast_nphi=False)
    assert exact.transform.nphi == one_pixel


def test_compressed_run_matches_uncompressed(tmp_path, small_params):
    kw = dict(n_tags=12, n_dark=2, shape=(128, 128), center=(66.3, 61.7), ring_radii=(20.0, 40.0),
              ring_width=1.5, seed=3)
    a = write_synthetic_run(tmp_path / "a.h5", **kw)
    b = write_synthetic_run(tmp_path / "b.h5", compression="bitshuffle-lz4", **kw)
    ra = plan_run(a.path, **small_params).dataset()["corr"].values
    rb = plan_run(b.path, **small_params).dataset()["corr"].values
    np.testing.assert_array_equal(ra, rb)


def test_graph_prioritises_older_tag_chunks(small_run, small_params):
    """Each chunk's read, picks, writes, group and row copies carry priority -chunk.

    (sacla_dask.scheduling: a worker finishes what an older block feeds before it
    reads a newer one; merges and finals keep priority 0.)
    """
    from sacla_dask.scheduling import block_index

    assert block_index(("polar-chunk-x", 7, 0, 0)) == 7
    assert block_index(("write-array-x", "bragg_bins", 3, 0)) == 3
    assert block_index("tag-chunks-written-x") == 0
    plan = plan_run(small_run.path, chunks=7, **small_params)
    ds = plan.dataset()
    graph = ds["corr"].data.__dask_graph__()
    prio = {}
    for layer in graph.layers.values():
        f = (layer.annotations or {}).get("priority")
        for key in layer:
            prio[key] = f(key) if callable(f) else (0 if f is None else f)
    polar = {k: v for k, v in prio.items() if k[0].startswith("polar-chunk")}
    assert len(polar) == plan.n_chunks > 2
    assert all(v == -k[1] for k, v in polar.items())
    norm = {k: v for k, v in prio.items() if k[0].startswith("pick-polar-normalized")}
    assert norm and all(v == -k[1] for k, v in norm.items())
    groups = {k: v for k, v in prio.items() if k[0].startswith("pair-statistics")
              and k[1] == "group"}
    rows = {k: v for k, v in prio.items() if k[0].startswith("pair-statistics")
            and k[1] == "rows"}
    assert len(groups) == plan.n_chunks and rows
    # consecutive pairs: group g lives in chunk g and copies the last row of chunk g - 1,
    # in that chunk's turn
    assert all(v == -k[2] for k, v in groups.items())
    assert all(v == -k[3] == -(k[2] - 1) for k, v in rows.items())
    merges = [v for k, v in prio.items() if k[0].startswith("pair-statistics")
              and k[1] in ("fold", "final")]
    assert merges and all(v == 0 for v in merges)


def test_inline_picks_moves_picks_into_consumers_and_keeps_priorities():
    """A layer of picks of a tuple-valued task is computed inside its consumers: fewer
    tasks, the same values, the consumers' chunk priorities kept; a pick that is itself
    asked for stays a task."""
    import operator

    import dask
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    from sacla_dask.scheduling import inline_picks, pick_layer_name

    def both(j):
        return (np.full(3, j), j * 10)

    def use_both(a, b):
        return float(a.sum() + b)

    pa, pb = pick_layer_name("a", "t"), pick_layer_name("b", "t")
    total = "total-t"
    tasks = {"parts-t": {("parts-t", j): (both, j) for j in range(4)},
             pa: {(pa, j): (operator.getitem, ("parts-t", j), 0) for j in range(4)},
             pb: {(pb, j): (operator.getitem, ("parts-t", j), 1) for j in range(4)},
             "use-t": {("use-t", j): (use_both, (pa, j), (pb, j)) for j in range(4)},
             total: {total: (sum, [("use-t", j) for j in range(4)])}}
    priority = {"priority": lambda key: -key[1]}
    graph = HighLevelGraph(
        {n: MaterializedLayer(m, annotations=None if n == total else priority)
         for n, m in tasks.items()},
        {"parts-t": set(), pa: {"parts-t"}, pb: {"parts-t"}, "use-t": {pa, pb},
         total: {"use-t"}})
    opt = inline_picks(graph, [total])
    flat = dict(opt)
    assert not [k for k in flat if k[0] in (pa, pb)]
    assert len(flat) == len(dict(graph)) - 8
    prio = {}
    for layer in opt.layers.values():
        f = (layer.annotations or {}).get("priority")
        for key in layer:
            prio[key] = f(key) if callable(f) else None
    assert all(prio[("use-t", j)] == -j for j in range(4))
    want = sum(3 * j + 10 * j for j in range(4))
    assert dask.compute(Delayed(total, graph), scheduler="sync")[0] == want
    with dask.config.set(delayed_optimize=inline_picks):
        assert dask.compute(Delayed(total, graph), scheduler="sync")[0] == want
    # a pick asked for itself is not removed
    kept = dict(inline_picks(graph, [total, (pa, 2)]))
    assert (pa, 2) in kept


def test_execute_graph_has_no_pick_tasks(small_run, small_params, tmp_path, monkeypatch):
    """execute() computes the picks of each chunk's (polar, row means, counts) inside their
    consumers (writes, pair groups): no pick task reaches the scheduler, and the stored
    result equals the lazy dataset's."""
    import dask
    from dask.base import collections_to_expr

    import sacla_dask.execute as execute

    seen: list = []
    real = execute._compute

    def recording(objs, progress=False):
        seen.extend(collections_to_expr(list(objs), optimize_graph=True).optimize()
                    .__dask_graph__())
        return real(objs, progress)

    monkeypatch.setattr(execute, "_compute", recording)
    plan = plan_run(small_run.path, chunks=7, out=tmp_path / "o.zarr", **small_params)
    with dask.config.set(scheduler="sync"):
        ds = plan.execute()
    names = {k[0].rsplit("-", 1)[0] if isinstance(k, tuple) else k for k in seen}
    assert any(n.startswith("polar-chunk") for n in names)
    assert not [n for n in names if n.startswith("pick-")]
    assert len([k for k in seen if isinstance(k, tuple) and k[0].startswith("polar-chunk")]) \
        == plan.n_chunks
    lazy = plan.dataset().compute(scheduler="sync")
    for name in ("corr", "row_mean", "nonfinite_bins", "image_ok", "polar"):
        np.testing.assert_allclose(ds[name].values, lazy[name].values, rtol=1e-12)


def count_reads_and_transforms(monkeypatch) -> dict[str, int]:
    """Calls of the pixel reader and of the per-image polar transform (counts, live)."""
    import sacla_dask.blocks as blocks
    from sacla_dask.io import hdf5

    calls = {"polar": 0, "read": 0}

    def counted(key, f):
        def wrapped(*a, **k):
            calls[key] += 1
            return f(*a, **k)
        return wrapped

    # the per-image finish of a pick read bin by bin, or of pixels read as columns
    for name in ("polar_from_gathered", "polar_from_columns"):
        monkeypatch.setattr(blocks, name, counted("polar", getattr(blocks, name)))
    monkeypatch.setattr(hdf5, "read_pixels", counted("read", hdf5.read_pixels))
    return calls


def test_each_chunk_read_and_transformed_once(small_run, small_params, monkeypatch, tmp_path):
    """One read per tag chunk and one polar transform per tag, lazily and in execute()."""
    calls = count_reads_and_transforms(monkeypatch)
    plan = plan_run(small_run.path, chunks=7, out=tmp_path / "r.zarr", **small_params)
    plan.dataset().compute(scheduler="sync")
    assert plan.n_chunks > 1
    assert calls == {"polar": plan.n_tags, "read": plan.n_chunks}
    calls.update(polar=0, read=0)
    import dask

    with dask.config.set(scheduler="sync"):
        plan.execute()
    assert calls == {"polar": plan.n_tags, "read": plan.n_chunks}


def test_large_polar_images_are_made_with_a_halo(small_run, small_params, monkeypatch,
                                                 tmp_path):
    """Polar images of polar.halo-image-bytes or more: each chunk's task also makes the
    image of the tag before it, the pair across the boundary takes it from there (no
    row-copy task), and every result is the very same as without."""
    import dask
    import xarray as xr

    from sacla_dask.graph import polar_arrays

    ref = plan_run(small_run.path, chunks=7, **small_params).dataset().compute(scheduler="sync")
    halo_bytes = "sacla_dask.polar.halo-image-bytes"
    with dask.config.set({halo_bytes: 0}):
        calls = count_reads_and_transforms(monkeypatch)
        plan = plan_run(small_run.path, chunks=7, out=tmp_path / "r.zarr", **small_params)
        ds = plan.dataset()
        assert polar_arrays(plan).halo is not None
        kinds = {k[1] for k in ds["corr"].data.__dask_graph__() if isinstance(k, tuple)
                 and str(k[0]).startswith("pair-statistics")}
        assert "group" in kinds and "rows" not in kinds
        res = ds.compute(scheduler="sync")
        xr.testing.assert_identical(res, ref)
        # one image more per chunk after the first, read in the same pass
        assert calls == {"polar": plan.n_tags + plan.n_chunks - 1, "read": plan.n_chunks}
        with dask.config.set(scheduler="sync"):
            stored = plan.execute()
        xr.testing.assert_identical(stored.drop_attrs(), ref.drop_attrs())
        # Bragg masking changes the rows after the polar step: no halo there
        bragg = plan_run(small_run.path, chunks=7, bragg=4.0, **small_params).dataset()
    with dask.config.set({halo_bytes: 1 << 40}):
        xr.testing.assert_identical(
            bragg.compute(scheduler="sync"),
            plan_run(small_run.path, chunks=7, bragg=4.0, **small_params).dataset().compute(
                scheduler="sync"))


def test_execute_writes_image_ok_with_each_tag_chunk(small_run, small_params, tmp_path,
                                                     monkeypatch):
    """image_ok is computed by each chunk's write from its row means: no task of its own
    and no separate write per chunk; the stored flags equal the lazy dataset's."""
    import sacla_dask.execute as execute

    seen: list = []
    real = execute._compute

    def recording(objs, progress=False):
        for o in objs:
            seen.extend(str(k) for k in o.__dask_graph__())
        return real(objs, progress)

    monkeypatch.setattr(execute, "_compute", recording)
    plan = plan_run(small_run.path, chunks=7, out=tmp_path / "o.zarr", **small_params)
    ds = plan.execute()
    assert any("write-tag-chunk" in k for k in seen)
    assert not [k for k in seen if "image-ok" in k or "image_ok" in k]
    np.testing.assert_array_equal(ds["image_ok"].values, plan.dataset()["image_ok"].values)
    assert ds["image_ok"].values.all()


def test_polar_operator_reports_its_size_to_dask(small_run, small_params):
    """Dask sizes the operator each worker holds by its arrays, not as a bare object."""
    from dask.sizeof import sizeof

    op = plan_run(small_run.path, **small_params).transform.operator
    m = op.matrix
    assert sizeof(op) == op.nbytes >= m.data.nbytes + m.indices.nbytes + m.indptr.nbytes
