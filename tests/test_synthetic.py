"""The synthetic run writer: layout, truth, options, and the damaged files it makes.

The images are checked against :func:`sacla_dask.io.synthetic.ring_image`, an
independent float64 formula, and the layout against plain h5py reads.
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from sacla_dask.io.run import DETECTOR
from sacla_dask.io.synthetic import (
    corrupt_tag,
    ring_image,
    tag_dataset_path,
    truncate_file,
    write_synthetic_run,
)

SHAPE = (48, 40)
KW = dict(shape=SHAPE, center=(21.3, 22.6), ring_radii=(8.0, 15.0), ring_width=1.5,
          modulation_order=4, modulation_amplitude=0.25, background=5.0, noise=False)


def test_layout_and_event_data(tmp_path):
    t = write_synthetic_run(tmp_path / "r.h5", n_tags=6, n_dark=4, first_image=2,
                            extra_event_tags=3, run=42, first_tag=1000, tag_step=2, **KW)
    # event data for exposures 0..(2 + 6 + 3 - 1); images for exposures 2..7
    np.testing.assert_array_equal(t.event_tags, 1000 + 2 * np.arange(11))
    np.testing.assert_array_equal(t.tags, 1000 + 2 * np.arange(2, 8))
    np.testing.assert_array_equal(t.bright, [False, False, True, True, True, True])
    with h5py.File(t.path, "r") as fh:
        assert fh["file_info/run_number_list"][()].tolist() == [42]
        g = fh["run_42"]
        np.testing.assert_array_equal(g["event_info/tag_number_list"][()], t.event_tags)
        status = g["event_info/bl_3/eh_1/xfel_pulse_selector_status"][()]
        np.testing.assert_array_equal(status, [0] * 4 + [1] * 7)
        pe = g["event_info/bl_3/oh_2/bm_1_pulse_energy_in_joule"][()]
        np.testing.assert_array_equal(pe[2:8], t.pulse_energy)
        assert (pe[:4] == 0).all() and (pe[4:] > 0).all()
        tags = sorted(int(k[4:]) for k in g[DETECTOR] if k.startswith("tag_"))
        assert tags == t.tags.tolist()
        ds = g[f"{DETECTOR}/tag_{t.tags[0]}/detector_data"]
        assert ds.shape == SHAPE and ds.dtype == np.float32 and ds.chunks is None
        assert int(g[f"{DETECTOR}/tag_{t.tags[0]}/detector_status"][()]) == 1


def test_images_match_independent_formula(tmp_path):
    t = write_synthetic_run(tmp_path / "r.h5", n_tags=4, n_dark=1, **KW)
    with h5py.File(t.path, "r") as fh:
        imgs = [fh[tag_dataset_path(t.run, int(tag))][()] for tag in t.tags]
    # dark shot: background only
    np.testing.assert_array_equal(imgs[0], np.full(SHAPE, 5.0, np.float32))
    for i in range(1, 4):
        ref = ring_image(SHAPE, (t.center_x, t.center_y), t.ring_radii, t.ring_width,
                         modulation_order=t.modulation_order,
                         modulation_amplitude=t.modulation_amplitude, phase=t.phases[i])
        ref = 5.0 + ref * (t.pulse_energy[i] / 1e-3)
        np.testing.assert_allclose(imgs[i], ref, rtol=2e-5, atol=2e-3)


def test_noise_is_poisson_counts(tmp_path):
    t = write_synthetic_run(tmp_path / "r.h5", n_tags=2, n_dark=2, **{**KW, "noise": True})
    with h5py.File(t.path, "r") as fh:
        img = fh[tag_dataset_path(t.run, int(t.tags[0]))][()]
    assert np.array_equal(img, np.round(img)) and img.min() >= 0
    assert abs(img.mean() - 5.0) < 0.3 and abs(img.var() - 5.0) < 1.0  # Poisson(5)


@pytest.mark.parametrize("compression,check", [
    ("gzip", lambda ds: ds.compression == "gzip"),
    # bitshuffle's cd_values: major, minor, item size, block size, codec (2 = LZ4)
    ("bitshuffle-lz4", lambda ds: list(_filters(ds)) == [32008]
     and _filters(ds)[32008][2:] == (4, 0, 2)),
    ("zstd", lambda ds: list(_filters(ds)) == [32015]),
])
def test_compression_and_chunks(tmp_path, compression, check):
    plain = write_synthetic_run(tmp_path / "plain.h5", n_tags=3, n_dark=1, **KW)
    t = write_synthetic_run(tmp_path / "c.h5", n_tags=3, n_dark=1, compression=compression,
                            **KW)
    r = write_synthetic_run(tmp_path / "rows.h5", n_tags=3, n_dark=1, compression=compression,
                            chunks=(8, SHAPE[1]), **KW)
    with h5py.File(plain.path) as a, h5py.File(t.path) as b, h5py.File(r.path) as c:
        for tag in t.tags:
            name = tag_dataset_path(t.run, int(tag))
            assert check(b[name]) and check(c[name])
            assert b[name].chunks == SHAPE and c[name].chunks == (8, SHAPE[1])
            np.testing.assert_array_equal(b[name][()], a[name][()])
            np.testing.assert_array_equal(c[name][()], a[name][()])


def _filters(ds: h5py.Dataset) -> dict[int, tuple[int, ...]]:
    plist = ds.id.get_create_plist()
    return dict(plist.get_filter(i)[0:3:2] for i in range(plist.get_nfilters()))


def test_without_status_and_missing_data(tmp_path):
    t = write_synthetic_run(tmp_path / "r.h5", n_tags=5, n_dark=2, pulse_selector=False,
                            missing_data=[1, 3], **KW)
    np.testing.assert_array_equal(t.missing, t.tags[[1, 3]])
    with h5py.File(t.path) as fh:
        g = fh[f"run_{t.run}"]
        assert "bl_3/eh_1/xfel_pulse_selector_status" not in g["event_info"]
        for i, tag in enumerate(t.tags):
            grp = g[f"{DETECTOR}/tag_{tag}"]
            assert ("detector_data" in grp) == (i not in (1, 3))
            assert "detector_status" in grp
    with pytest.raises(ValueError, match="missing_data"):
        write_synthetic_run(tmp_path / "x.h5", n_tags=3, missing_data=[3], **KW)


def test_corrupt_tag_breaks_only_that_chunk(tmp_path):
    t = write_synthetic_run(tmp_path / "r.h5", n_tags=3, n_dark=1, compression="gzip", **KW)
    with h5py.File(t.path) as fh:
        before = [fh[tag_dataset_path(t.run, int(tag))][()] for tag in t.tags]
    off = corrupt_tag(t.path, int(t.tags[1]))
    assert off > 0
    with h5py.File(t.path) as fh:
        with pytest.raises(OSError):
            fh[tag_dataset_path(t.run, int(t.tags[1]))][()]
        for i in (0, 2):
            np.testing.assert_array_equal(fh[tag_dataset_path(t.run, int(t.tags[i]))][()],
                                          before[i])
    plain = write_synthetic_run(tmp_path / "p.h5", n_tags=2, **KW)
    with pytest.raises(ValueError, match="not chunked and compressed"):
        corrupt_tag(plain.path, int(plain.tags[0]))


def test_truncate_file(tmp_path):
    t = write_synthetic_run(tmp_path / "r.h5", n_tags=3, **KW)
    size = os.path.getsize(t.path)
    assert truncate_file(t.path, 0.5) == size // 2 == os.path.getsize(t.path)
    with pytest.raises(OSError, match="truncated"):
        h5py.File(t.path, "r")


def test_bad_compression_name(tmp_path):
    with pytest.raises(ValueError, match="compression must be one of"):
        write_synthetic_run(tmp_path / "r.h5", compression="lzf", **KW)
