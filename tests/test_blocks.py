"""The per-tag-chunk kernels of sacla_dask.blocks, each on one block of its own."""

from __future__ import annotations

import numpy as np
import pytest

from sacla_dask.io.run import open_run
from sacla_dask.io.synthetic import write_synthetic_run


def test_fused_polar_chunk_equals_the_separate_kernels():
    """polar_chunk (one task: polar + normalisation) == the step-by-step kernels.

    The block has a tag with a non-finite pixel, a tag whose window is all NaN
    (unreadable: NaN in every good bin) and a fully masked q row.
    """
    from sacla_dask.blocks import (
        image_ok_block,
        nonfinite_block,
        normalized_block,
        polar_block,
        polar_chunk,
        row_mean_block,
    )
    from sacla_dask.geometry import Geometry
    from sacla_dask.polar import PolarTransform

    rng = np.random.default_rng(3)
    mask = np.ones((64, 64), bool)
    mask[:, 30:34] = False
    g = Geometry(31.5, 32.2, 50e-6, 0.053, 1.44)
    tr = PolarTransform(g, (64, 64), float(g.radius_to_q(8)), float(g.radius_to_q(20)), mask=mask)
    op, pm = tr.operator, tr.polar_mask
    wy, wx = op.window_shape
    win = rng.uniform(1, 10, (4, wy, wx)).astype(np.float32)
    win[1, wy // 2, :] = np.nan  # a bad line: some bins NaN
    win[2] = np.nan  # an unreadable image
    norm, rmean, nf = polar_chunk(win, op, pm)
    raw = polar_block(win, op)
    np.testing.assert_array_equal(norm, normalized_block(raw, pm))
    np.testing.assert_array_equal(rmean, row_mean_block(raw, pm))
    np.testing.assert_array_equal(nf, nonfinite_block(raw))
    assert nf[1] > 0 and nf[0] == 0
    assert np.isnan(norm[2][pm]).all() and (norm[2][~pm] == 0).all()
    ref = np.isfinite(norm[:, pm]).any(axis=1)
    np.testing.assert_array_equal(image_ok_block(norm, pm), ref)
    assert ref.tolist() == [True, True, False, True]


@pytest.mark.parametrize("method", ["nearest", "bilinear"])
def test_thin_band_task_equals_polar_chunk_of_windows(tmp_path, method):
    """The pipeline's task on a thin band (the compact operator, pixels read from the file;
    a pick reads each bin's pixel straight into its polar image) == polar_chunk of the
    windows read by h5py with the full operator: normalised rows, row means, NaN bins,
    with a tag holding a line of NaN pixels through the band and one of only NaN."""
    import h5py

    from sacla_dask.blocks import polar_chunk, polar_chunk_from_run
    from sacla_dask.graph import worker_operator
    from sacla_dask.io.run import DETECTOR
    from sacla_dask.polar import PolarTransform

    t = write_synthetic_run(tmp_path / "thin.h5", n_tags=6, shape=(96, 96),
                            center=(47.3, 49.1), ring_radii=(30.0,), ring_width=1.5, seed=2)
    with h5py.File(t.path, "r+") as fh:
        fh[f"run_{t.run}/{DETECTOR}/tag_{t.tags[1]}/detector_data"][49, :] = np.nan
        fh[f"run_{t.run}/{DETECTOR}/tag_{t.tags[4]}/detector_data"][...] = np.nan
    g = t.geometry
    mask = np.ones((96, 96), bool)
    mask[:, 60:63] = False
    tr = PolarTransform(g, (96, 96), float(g.radius_to_q(27)), float(g.radius_to_q(33)),
                        mask=mask, method=method)
    op = worker_operator(tr.operator)
    assert op.pixels is not None and (op.gather is not None) == (method == "nearest")
    run = open_run(t.path)
    with h5py.File(t.path, "r") as fh:
        wins = np.stack([fh[f"run_{t.run}/{DETECTOR}/tag_{tag}/detector_data"][tr.window]
                         for tag in t.tags])
    want = polar_chunk(wins, tr.operator, tr.polar_mask)
    got = polar_chunk_from_run(run.sources, tr.window, "fail", op, tr.polar_mask)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert got[2][1] > 0 and got[2][0] == 0
    assert np.isnan(got[0][4][tr.polar_mask]).all()
