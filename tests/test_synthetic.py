"""The synthetic run writer: layout, truth, options, and the damaged files it makes.

The images are checked against :func:`sacla_dask.io.synthetic.ring_image`, an
independent float64 formula, and the layout against plain h5py reads.
"""

from __future__ import annotations

import dataclasses
import os

import h5py
import numpy as np
import pytest

from sacla_dask.io.run import DETECTOR
from sacla_dask.io.synthetic import (
    KEYWORD_FIELDS,
    BraggSpots,
    Detector,
    Nanocrystals,
    PhotonCounting,
    PumpProbe,
    Rings,
    Shots,
    Storage,
    SyntheticKeywords,
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


# -- the groups of options and the flat keywords ---------------------------------------
def _datasets(path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as fh:
        fh.visititems(lambda name, obj: out.__setitem__(name, obj[()])
                      if isinstance(obj, h5py.Dataset) else None)
    return out


def test_groups_write_what_the_flat_keywords_write(tmp_path):
    """Every flat keyword sets its field of a group: a run written from groups and one
    written from the same values as keywords hold the same datasets and truth."""
    flat = dict(n_tags=5, n_dark=2, run=7, first_tag=500, tag_step=3, first_image=1,
                extra_event_tags=2, pulse_selector=True, photon_energy=9100.0,
                shape=(40, 44), center=(20.5, 18.25), pixel_size=75e-6, distance=0.1,
                background=3.0, noise=True, ring_radii=(7.0, 14.0), ring_width=1.3,
                ring_amplitudes=(800.0, 400.0), modulation_order=3,
                modulation_amplitude=0.4, modulated_rings=(1,), ring_phase_offsets=(0.0, 0.5),
                spots=3, spot_amplitude=900.0, spot_width=1.5, compression="gzip",
                chunks=(10, 44), missing_data=(2,), crystals=4, crystal_lattice="bcc",
                crystal_a=3.3, crystal_c=None, crystal_reflections=((1, 1, 0),),
                crystal_amplitudes=(500.0,), rocking_width=0.1, crystal_spot_width=1.2,
                laser="random", laser_on_order=5, laser_off_order=2, delays=(0.5, 1.5),
                absolute_gain=3.0)
    assert set(flat) == set(KEYWORD_FIELDS)  # every keyword exercised
    a = write_synthetic_run(tmp_path / "flat.h5", seed=4, **flat)
    b = write_synthetic_run(
        tmp_path / "groups.h5", seed=4,
        shots=Shots(n_tags=5, n_dark=2, run=7, first_tag=500, tag_step=3, first_image=1,
                    extra_event_tags=2, pulse_selector=True, photon_energy=9100.0),
        detector=Detector(shape=(40, 44), center=(20.5, 18.25), pixel_size=75e-6,
                          distance=0.1, background=3.0, poisson_noise=True),
        rings=Rings(radii=(7.0, 14.0), width=1.3, amplitudes=(800.0, 400.0),
                    modulation_order=3, modulation_amplitude=0.4, modulated=(1,),
                    phase_offsets=(0.0, 0.5)),
        bragg_spots=BraggSpots(per_ring=3, amplitude=900.0, width=1.5),
        storage=Storage(compression="gzip", chunks=(10, 44), missing_data=(2,)),
        nanocrystals=Nanocrystals(per_shot=4, lattice="bcc", a=3.3, c=None,
                                  reflections=((1, 1, 0),), amplitudes=(500.0,),
                                  rocking_width=0.1, spot_width=1.2),
        pump_probe=PumpProbe(laser="random", on_order=5, off_order=2, delays=(0.5, 1.5)),
        photon_counting=PhotonCounting(absolute_gain=3.0))
    da, db = _datasets(a.path), _datasets(b.path)
    assert da.keys() == db.keys()
    for name in da:
        np.testing.assert_array_equal(da[name], db[name], err_msg=name)
    assert a.run == b.run == 7 and a.shape == b.shape == (40, 44)
    np.testing.assert_array_equal(a.tags, 500 + 3 * np.arange(1, 6))
    np.testing.assert_array_equal(a.tags, b.tags)
    np.testing.assert_array_equal(a.phases, b.phases)
    np.testing.assert_array_equal(a.missing, b.missing)
    assert a.missing.tolist() == [a.tags[2]]
    assert (a.center_x, a.center_y, a.pixel_size, a.distance) == (20.5, 18.25, 75e-6, 0.1)


def test_a_keyword_replaces_that_field_of_a_group(tmp_path):
    """A flat keyword next to its group replaces only that field."""
    t = write_synthetic_run(tmp_path / "r.h5", shots=Shots(n_tags=3, n_dark=1, run=9),
                            detector=Detector(shape=(24, 20), poisson_noise=False),
                            n_tags=4, ring_radii=(6.0,), background=2.0)
    assert len(t.tags) == 4 and t.run == 9 and t.bright.tolist() == [False, True, True, True]
    with h5py.File(t.path, "r") as fh:
        dark = fh[tag_dataset_path(t.run, int(t.tags[0]))][()]
    np.testing.assert_array_equal(dark, np.full((24, 20), 2.0, np.float32))  # no noise
    assert t.ring_radii == (6.0,)


def test_groups_are_frozen_and_keywords_checked(tmp_path):
    with pytest.raises(dataclasses.FrozenInstanceError):
        Shots().n_tags = 3  # type: ignore[misc]
    rings = Rings(radii=[5.0, 9.0], modulated=[0])
    assert rings.radii == (5.0, 9.0) and rings.modulated == (0,)  # lists become tuples
    assert Storage(missing_data=[2, 1]).missing_data == (2, 1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_tag'"):
        write_synthetic_run(tmp_path / "r.h5", n_tag=3)  # type: ignore[call-arg]
    assert not (tmp_path / "r.h5").exists()


def test_flat_keywords_name_existing_fields():
    """The typed keywords and their map agree, and each maps to a field of its group."""
    assert set(SyntheticKeywords.__annotations__) == set(KEYWORD_FIELDS)
    groups = {"shots": Shots, "detector": Detector, "rings": Rings,
              "bragg_spots": BraggSpots, "storage": Storage, "nanocrystals": Nanocrystals,
              "pump_probe": PumpProbe, "photon_counting": PhotonCounting}
    fields = {(g, f.name) for g, cls in groups.items() for f in dataclasses.fields(cls)}
    assert set(KEYWORD_FIELDS.values()) == fields  # every field has its keyword
