"""Reading SACLA runs as they come: subsets, several files, compression, bad tags, shot
selection, chunking by bytes, window reads, and the size of the graph of a 5050-tag run.

Every run here is written by :mod:`sacla_dask.io.synthetic`, whose truth (tags, dark
shots, pulse energies, images) is the reference; images read back are compared with
plain h5py reads of the same datasets.
"""

from __future__ import annotations

import io
import os
import shutil
import warnings

import dask
import h5py
import numpy as np
import pytest
from helpers import raise_if_dask_computes

from sacla_dask.chunking import parse_chunk_size
from sacla_dask.errors import BadTagError, LayoutError, ParameterError, RunFileError
from sacla_dask.io import hdf5
from sacla_dask.io.run import DETECTOR, BadTag, open_run
from sacla_dask.io.synthetic import corrupt_tag, truncate_file, write_synthetic_run
from sacla_dask.plan import plan_run

SHAPE = (40, 36)
KW = dict(shape=SHAPE, center=(17.3, 19.6), ring_radii=(7.0, 13.0), ring_width=1.2,
          modulation_order=6, modulation_amplitude=0.3, noise=False)


def h5_images(path, run, tags, window=(slice(None), slice(None))):
    """Independent reference: each tag's image read with plain h5py."""
    with h5py.File(path, "r") as fh:
        return np.stack([fh[f"run_{run}/{DETECTOR}/tag_{t}/detector_data"][window]
                         for t in tags]).astype(np.float32)


# -- subsets, several files, several runs ---------------------------------------------
def test_subset_event_data_aligned_by_tag(tmp_path):
    """Images for exposures 6..17 of a run; event data for exposures 0..39."""
    t = write_synthetic_run(tmp_path / "subset.h5", n_tags=12, n_dark=8, first_image=6,
                            extra_event_tags=22, **KW)
    run = open_run(t.path)
    np.testing.assert_array_equal(run.tags, t.tags)
    assert run.all_events.sizes["tag"] == 40
    np.testing.assert_array_equal(run.events["pulse_energy"].values, t.pulse_energy)
    np.testing.assert_array_equal(run.bright, t.bright)          # dark: exposures 6, 7
    assert run.bright.tolist()[:3] == [False, False, True]
    assert (run.events["source"].values == 0).all() and (run.events["run"] == t.run).all()
    assert run.events["pulse_energy"].attrs["hdf5_path"].endswith("pulse_energy_in_joule")
    assert run.selection["dark_from"][0].endswith("xfel_pulse_selector_status")
    np.testing.assert_array_equal(run.images(chunks=5).compute(),
                                  h5_images(t.path, t.run, t.tags))


def test_files_of_one_run_merge_like_one_file(tmp_path):
    whole = write_synthetic_run(tmp_path / "whole.h5", n_tags=20, n_dark=3, **KW)
    a = write_synthetic_run(tmp_path / "a.h5", n_tags=8, n_dark=3, extra_event_tags=12, **KW)
    b = write_synthetic_run(tmp_path / "b.h5", n_tags=12, n_dark=3, first_image=8, **KW)
    run = open_run([b.path, a.path])                # order of the files does not matter
    ref = open_run(whole.path)
    np.testing.assert_array_equal(run.tags, whole.tags)
    np.testing.assert_array_equal(run.bright, whole.bright)
    np.testing.assert_array_equal(run.events["source"].values, [1] * 8 + [0] * 12)
    assert run.paths == [b.path, a.path] and run.tag_paths()[0] == a.path
    assert run.events["source"].attrs["sources"][1].endswith("a.h5")
    da_ = run.images(chunks=3)                      # chunks straddle the two files
    np.testing.assert_array_equal(da_.compute(), ref.images().compute())
    assert all(s.run == whole.run for s in run.sources)


def test_several_runs(tmp_path):
    a = write_synthetic_run(tmp_path / "a.h5", n_tags=6, n_dark=2, run=100, first_tag=500, **KW)
    b = write_synthetic_run(tmp_path / "b.h5", n_tags=5, n_dark=2, run=101, first_tag=600,
                            **KW)
    run = open_run([a.path, b.path], skip_first=3)
    assert run.runs == [100, 101] and run.run_number == 100
    np.testing.assert_array_equal(run.tags, np.r_[a.tags, b.tags])
    np.testing.assert_array_equal(run.events["run"].values, [100] * 6 + [101] * 5)
    # skip_first counts from the start of each run (on top of the status: 2 dark each)
    np.testing.assert_array_equal(run.bright, [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(run.images(chunks=4)[6:].compute(),
                                  h5_images(b.path, 101, b.tags))


def test_duplicates_refused(tmp_path):
    a = write_synthetic_run(tmp_path / "a.h5", n_tags=4, **KW)
    with pytest.raises(ParameterError, match=r"a\.h5' is given twice"):
        open_run([a.path, a.path])
    shutil.copy(a.path, tmp_path / "copy.h5")
    with pytest.raises(LayoutError, match=rf"tag {a.tags[0]} appears twice: in .*a\.h5.*copy\.h5"):
        open_run([a.path, tmp_path / "copy.h5"])


def test_different_image_shapes_refused(tmp_path):
    a = write_synthetic_run(tmp_path / "a.h5", n_tags=3, **KW)
    b = write_synthetic_run(tmp_path / "b.h5", n_tags=3, first_tag=9000,
                            **{**KW, "shape": (20, 20), "center": (9.5, 9.5)})
    with pytest.raises(LayoutError, match=r"b\.h5.*images are \(20, 20\)"):
        open_run([a.path, b.path])


# -- shot selection ---------------------------------------------------------------
def test_skip_first_without_status_counts_from_run_start(tmp_path):
    t = write_synthetic_run(tmp_path / "nostatus.h5", n_tags=10, n_dark=5, first_image=3,
                            pulse_selector=False, **KW)
    run = open_run(t.path)
    assert run.bright.all() and run.selection["dark_from"] == "none"
    run5 = open_run(t.path, skip_first=5)           # exposures 0..4: only images 3, 4
    np.testing.assert_array_equal(run5.bright, [0, 0] + [1] * 8)
    np.testing.assert_array_equal(run.select_shots(skip_first=5).bright, run5.bright)
    assert run5.selection["skip_first"] == 5 and run5.selection["n_dark"] == 2
    with pytest.raises(ParameterError, match="skip_first"):
        run.select_shots(skip_first=-1)


def test_select_shots_tag_range_and_pulse_energy(tmp_path):
    t = write_synthetic_run(tmp_path / "r.h5", n_tags=30, n_dark=4, **KW)
    run = open_run(t.path)
    thr = float(np.median(t.pulse_energy[t.bright]))
    first, last = int(t.tags[2]), int(t.tags[25])
    sel = run.select_shots(tag_range=(first, last), min_pulse_energy=thr)
    inside = (t.tags >= first) & (t.tags <= last)
    np.testing.assert_array_equal(sel.tags, t.tags[inside])          # others not read
    expected = t.bright[inside] & (t.pulse_energy[inside] >= thr)
    np.testing.assert_array_equal(sel.selected, expected)
    np.testing.assert_array_equal(sel.bright, t.bright[inside])
    s = sel.selection
    assert s["tag_range"] == [first, last] and s["min_pulse_energy"] == thr
    assert s["n_out_of_range"] == 30 - inside.sum() and s["n_selected"] == expected.sum()
    assert s["n_dark"] == 2 and s["n_low_pulse_energy"] == (t.bright[inside] & ~expected).sum()
    assert s["pulse_energy_dataset"].endswith("bm_1_pulse_energy_in_joule")
    # criteria add up; dropping the unselected shots keeps only the selected ones
    dropped = sel.select_shots(drop_unselected=True)
    np.testing.assert_array_equal(dropped.tags, t.tags[inside][expected])
    assert dropped.selected.all() and dropped.selection["dropped_unselected"]
    np.testing.assert_array_equal(dropped.images(chunks=4).compute(),
                                  h5_images(t.path, t.run, dropped.tags))


def test_select_shots_errors(tmp_path):
    t = write_synthetic_run(tmp_path / "r.h5", n_tags=6, **KW)
    run = open_run(t.path)
    with pytest.raises(ParameterError, match=r"no tag of the run lies in the tag range 1\.\.2"):
        run.select_shots(tag_range=(1, 2))
    with pytest.raises(ParameterError, match="first .* > last"):
        run.select_shots(tag_range=(int(t.tags[3]), int(t.tags[1])))
    with pytest.raises(ParameterError, match="finite"):
        run.select_shots(min_pulse_energy=float("nan"))
    with h5py.File(t.path, "r+") as fh:
        del fh[f"run_{t.run}/event_info/bl_3/oh_2/bm_1_pulse_energy_in_joule"]
    with pytest.raises(ParameterError, match=r"pulse energy in event_info, but .*r\.h5"):
        open_run(t.path).select_shots(min_pulse_energy=1e-4)


def test_selection_in_plan_and_output(tmp_path):
    t = write_synthetic_run(tmp_path / "r.h5", n_tags=24, n_dark=3, **KW)
    thr = float(np.quantile(t.pulse_energy[t.bright], 0.3))
    first, last = int(t.tags[1]), int(t.tags[20])
    g = t.geometry
    plan = plan_run(t.path, qmin=float(g.radius_to_q(10.0)), qmax=float(g.radius_to_q(16.0)),
                    center=(t.center_x, t.center_y), pixel_size=t.pixel_size,
                    distance=t.distance, tag_range=(first, last), min_pulse_energy=thr,
                    chunks=5)
    inside = (t.tags >= first) & (t.tags <= last)
    keep = t.bright[inside] & (t.pulse_energy[inside] >= thr)
    good = t.tags[inside][keep]
    np.testing.assert_array_equal(plan.run.tags, t.tags[inside])
    ds = plan.dataset()
    # consecutive pairs of the selected shots only
    np.testing.assert_array_equal(ds["pair_tag_a"].values, good[:-1])
    np.testing.assert_array_equal(ds["pair_tag_b"].values, good[1:])
    np.testing.assert_array_equal(ds["selected"].values, keep)
    np.testing.assert_array_equal(ds["bright"].values, t.bright[inside])
    assert ds.attrs["selection"]["tag_range"] == [first, last]
    assert ds.attrs["selection"]["min_pulse_energy"] == thr
    assert ds.attrs["sources"] == [str(tmp_path / "r.h5")]
    assert (ds["source"].values == 0).all() and (ds["run"].values == t.run).all()


def test_process_cli_selection_flags(tmp_path, monkeypatch):
    import contextlib

    from click.testing import CliRunner

    import sacla_dask.cli as cli
    from sacla_dask.cli import main
    from sacla_dask.store import open_result

    # the flags' wiring is under test, not the cluster: compute in this process
    monkeypatch.setattr(cli, "_client_from", lambda *a, **k: contextlib.nullcontext())

    t = write_synthetic_run(tmp_path / "r.h5", n_tags=16, n_dark=2, pulse_selector=False,
                            **KW)
    g = t.geometry
    thr = float(np.quantile(t.pulse_energy[2:], 0.25))
    out = tmp_path / "o.zarr"
    res = CliRunner().invoke(main, [
        "process", t.path, "--out", str(out), "--center", str(t.center_x), str(t.center_y),
        "--qmin", str(g.radius_to_q(10.0)), "--qmax", str(g.radius_to_q(16.0)),
        "--pixel-size", str(t.pixel_size), "--distance", str(t.distance),
        "--skip-first", "2", "--tag-range", str(t.tags[1]), str(t.tags[14]),
        "--min-pulse-energy", repr(thr), "--chunk-size", "4KiB", "--workers", "1",
        "--no-progress"])
    assert res.exit_code == 0, res.output
    ds = open_result(out)
    sel = ds.attrs["selection"]
    assert sel["skip_first"] == 2 and sel["tag_range"] == [int(t.tags[1]), int(t.tags[14])]
    assert sel["min_pulse_energy"] == thr and sel["dark_from"] == "none"
    expected = (np.arange(1, 15) >= 2) & (t.pulse_energy[1:15] >= thr)
    np.testing.assert_array_equal(ds["selected"].values, expected)
    assert set(ds["pair_tag_a"].values) | set(ds["pair_tag_b"].values) <= set(
        t.tags[1:15][expected])


# -- compression -----------------------------------------------------------------
@pytest.mark.parametrize("compression", ["gzip", "bitshuffle-lz4", "zstd"])
@pytest.mark.parametrize("chunks", [None, (8, SHAPE[1]), (16, 16)])
def test_compressed_read_transparently(tmp_path, compression, chunks):
    t = write_synthetic_run(tmp_path / "c.h5", n_tags=7, n_dark=2, compression=compression,
                            chunks=chunks, **{**KW, "noise": True})
    run = open_run(t.path)
    np.testing.assert_array_equal(run.images(chunks=3).compute(),
                                  h5_images(t.path, t.run, t.tags))
    win = (slice(5, 30), slice(9, 27))
    np.testing.assert_array_equal(run.images(chunks=3, window=win).compute(),
                                  h5_images(t.path, t.run, t.tags, win))


def test_integer_images_read_as_float32(tmp_path):
    t = write_synthetic_run(tmp_path / "r.h5", n_tags=3, **{**KW, "noise": True})
    with h5py.File(t.path, "r+") as fh:
        for tag in t.tags:
            g = fh[f"run_{t.run}/{DETECTOR}/tag_{tag}"]
            data = g["detector_data"][()].astype(">u2")
            del g["detector_data"]
            g["detector_data"] = data
    img = open_run(t.path).images(window=(slice(3, 30), slice(2, 20))).compute()
    assert img.dtype == np.float32
    np.testing.assert_array_equal(img, h5_images(t.path, t.run, t.tags,
                                                 (slice(3, 30), slice(2, 20))))


# -- bad tags ---------------------------------------------------------------------------
def test_tag_without_detector_data(tmp_path):
    t = write_synthetic_run(tmp_path / "nodata.h5", n_tags=8, n_dark=1, missing_data=[3],
                            **KW)
    bad = int(t.tags[3])
    with pytest.raises(BadTagError, match=rf"nodata\.h5' run {t.run} tag {bad}: no "
                                          r"detector_data.*--on-bad-tag skip"):
        open_run(t.path)
    with pytest.warns(UserWarning, match=rf"1 bad tag\(s\) left out: .*tag {bad}"):
        run = open_run(t.path, on_bad_tag="skip")
    good = np.delete(t.tags, 3)
    np.testing.assert_array_equal(run.tags, good)
    assert len(run.bad_tags) == 1 and isinstance(run.bad_tags[0], BadTag)
    assert run.bad_tags[0].tag == bad and run.bad_tags[0].path == t.path
    np.testing.assert_array_equal(run.images(chunks=3).compute(),
                                  h5_images(t.path, t.run, good))


def test_tag_with_wrong_shape(tmp_path):
    t = write_synthetic_run(tmp_path / "shape.h5", n_tags=5, **KW)
    bad = int(t.tags[2])
    with h5py.File(t.path, "r+") as fh:
        g = fh[f"run_{t.run}/{DETECTOR}/tag_{bad}"]
        del g["detector_data"]
        g["detector_data"] = np.zeros((10, 10), np.float32)
    with pytest.raises(BadTagError, match=rf"tag {bad}: detector_data has shape \(10, 10\)"):
        open_run(t.path)
    with pytest.warns(UserWarning, match=f"tag {bad}"):
        run = open_run(t.path, on_bad_tag="skip")
    assert bad not in run.tags and len(run) == 4


def test_corrupt_chunk_found_at_read_time(tmp_path):
    t = write_synthetic_run(tmp_path / "corrupt.h5", n_tags=9, n_dark=1, compression="gzip",
                            **{**KW, "noise": True})
    ref = h5_images(t.path, t.run, t.tags)
    bad = int(t.tags[4])
    corrupt_tag(t.path, bad)
    run = open_run(t.path)                          # the metadata is intact
    with pytest.raises(BadTagError, match=rf"corrupt\.h5': tag {bad} cannot be read"):
        run.images(chunks=3).compute(scheduler="sync")
    run = open_run(t.path, on_bad_tag="skip")
    with pytest.warns(UserWarning, match=rf"tag {bad} cannot be read.*left out of every pair"):
        img = run.images(chunks=3).compute(scheduler="sync")
    assert np.isnan(img[4]).all()
    np.testing.assert_array_equal(np.delete(img, 4, axis=0), np.delete(ref, 4, axis=0))


def test_corrupt_tag_left_out_of_every_pair(tmp_path):
    """With --on-bad-tag skip, a tag found unreadable while computing is listed in the
    output and its two pairs are left out: the result equals that of the intact run
    with those two pairs removed by hand."""
    kw = {**KW, "noise": True}
    t = write_synthetic_run(tmp_path / "intact.h5", n_tags=16, n_dark=2, compression="gzip",
                            **kw)
    shutil.copy(t.path, tmp_path / "corrupt.h5")
    bad = int(t.tags[7])
    corrupt_tag(tmp_path / "corrupt.h5", bad)
    g = t.geometry
    geo = dict(qmin=float(g.radius_to_q(10.0)), qmax=float(g.radius_to_q(16.0)),
               center=(t.center_x, t.center_y), pixel_size=t.pixel_size,
               distance=t.distance, chunks=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # the reader's warning, in the tasks
        got = plan_run(str(tmp_path / "corrupt.h5"), on_bad_tag="skip",
                       out=tmp_path / "o.zarr", **geo)
        with pytest.warns(UserWarning, match=rf"1 tag\(s\) could not be read.*{bad}"):
            ds = got.execute()
    b = t.tags[t.bright]
    pairs = np.stack([b[:-1], b[1:]], axis=1)
    keep = ~(pairs == bad).any(axis=1)
    ref = plan_run(t.path, pairs=pairs[keep], **geo).dataset().compute()
    assert not bool(ds["image_ok"].sel(tag=bad)) and int(ds["image_ok"].sum()) == 15
    assert bad in ds.attrs["bad_tag_numbers"]
    assert any(str(bad) in m for m in ds.attrs["bad_tags"])
    assert int(ds["n_pairs"]) == int(ref["n_pairs"]) == keep.sum()
    np.testing.assert_allclose(ds["corr"].values, ref["corr"].values, rtol=1e-6, atol=1e-9)
    assert np.isnan(ds["polar"].sel(tag=bad).values[ds["polar_mask"].values]).all()


def test_truncated_file_names_the_file(tmp_path):
    t = write_synthetic_run(tmp_path / "cut.h5", n_tags=4, **KW)
    truncate_file(t.path, 0.6)
    with pytest.raises(RunFileError, match=r"cut\.h5.*truncated"):
        open_run(t.path)
    with pytest.raises(RunFileError, match=r"cut\.h5.*truncated"):
        open_run(t.path, on_bad_tag="skip")


def test_file_damaged_after_opening(tmp_path):
    """A file that disappears between planning and reading fails with its name."""
    t = write_synthetic_run(tmp_path / "gone.h5", n_tags=4, **KW)
    run = open_run(t.path, on_bad_tag="skip")
    img = run.images(chunks=2)
    (tmp_path / "gone.h5").unlink()
    with pytest.raises(RunFileError, match=r"gone\.h5.*does not exist"):
        img.compute(scheduler="sync")


# -- chunks, windows, graph size --------------------------------------------------------
def test_chunking_by_bytes(tmp_path):
    t = write_synthetic_run(tmp_path / "r.h5", n_tags=25, **{**KW, "shape": (16, 16),
                                                               "center": (7.5, 7.5),
                                                               "ring_radii": (5.0,)})
    run = open_run(t.path)                                         # 1 KiB per image
    assert run.images(chunks="1KiB").chunks[0] == (1,) * 25
    assert run.images(chunks="10KiB").chunks[0] == (10, 10, 5)
    assert run.images(chunks="10kB").chunks[0] == (9, 9, 7)         # 10000 bytes
    assert run.images(chunks=7).chunks[0] == (7, 7, 7, 4)
    # the window's bytes count, not the image's
    assert run.images(chunks="1KiB", window=(slice(0, 8), slice(0, 8))).chunks[0] == (4,) * 6 + (1,)
    assert parse_chunk_size("256MiB", 2400 * 2400 * 4) == 11
    assert parse_chunk_size("1B", 100) == 1
    for bad in ("lots", "-5MiB", 0, -3, 2.5):
        with pytest.raises(ParameterError, match="chunk size"):
            parse_chunk_size(bad, 100)


class CountingFile(io.FileIO):
    """A file that counts the bytes HDF5 reads from it."""

    total = 0

    def readinto(self, b):  # type: ignore[override]
        n = super().readinto(b)
        CountingFile.total += n or 0
        return n


def test_window_reads_only_its_rows(tmp_path, monkeypatch):
    """The bytes read follow the window: a band's bounding box in the middle rows
    reads at most those rows (HDF5's sieve buffer reads across the row ends of a
    contiguous dataset), not the image; a row-chunked compressed dataset reads only
    the chunks it touches."""
    shape = (256, 128)
    t = write_synthetic_run(tmp_path / "r.h5", n_tags=6, **{**KW, "shape": shape,
                                                             "center": (63.5, 127.5)})
    c = write_synthetic_run(tmp_path / "c.h5", n_tags=6, compression="gzip",
                            chunks=(16, 128), **{**KW, "shape": shape,
                                                 "center": (63.5, 127.5), "noise": True})

    def counting_open(path):
        return h5py.File(CountingFile(path, "r"), "r")

    monkeypatch.setattr(hdf5, "_open_h5", counting_open)
    win = (slice(100, 140), slice(30, 90))               # 40 of 256 rows
    img_bytes = shape[0] * shape[1] * 4
    rows_bytes = 40 * shape[1] * 4

    def bytes_read(path, window):
        run = open_run(path)
        arr = run.images(chunks=2, window=window)
        assert arr.chunksize == (2, 40, 60) if window else (2,) + shape
        CountingFile.total = 0
        got = arr.compute(scheduler="sync")
        np.testing.assert_array_equal(got, h5_images(path, run.run_number, run.tags,
                                                     window or np.s_[:, :]))
        return CountingFile.total / len(run)

    full = bytes_read(t.path, None)
    part = bytes_read(t.path, win)
    assert img_bytes <= full < img_bytes + 8192
    assert 40 * 60 * 4 <= part < rows_bytes + 8192       # metadata: a few KiB
    assert part < 0.2 * full
    # compressed in chunks of 16 rows: rows 100..139 touch chunks 6, 7, 8 of 16
    with h5py.File(c.path) as fh:
        sizes = np.mean([[ds.id.get_chunk_info(i).size for i in range(16)] for ds in (
            fh[f"run_{c.run}/{DETECTOR}/tag_{tag}/detector_data"] for tag in c.tags)], axis=0)
    cfull = bytes_read(c.path, None)
    cpart = bytes_read(c.path, win)
    assert sizes.sum() <= cfull
    # the same metadata either way; the window saves exactly the 13 chunks it misses
    untouched = sizes.sum() - sizes[6:9].sum()
    assert abs((cfull - cpart) - untouched) < 0.02 * untouched


# -- reading only a band's pixels ------------------------------------------------------
def pixels_of(sources, window, pixels, nx, direct=None, on_bad_tag="fail", into=False):
    """read_pixels into a (tag, pixel) array; row offsets computed here, independently.
    ``into``: the reader writes each tag's row of that array itself."""
    wx = window[1].stop - window[1].start
    offsets = (pixels // wx) * nx + pixels % wx + window[1].start
    got = np.full((len(sources), pixels.size), -1.0, np.float32)
    seen = []

    def take(i, x):
        if into:
            assert np.shares_memory(x, got[i])
            seen.append(i)
        else:
            got[i] = x

    hdf5.read_pixels(sources, window, pixels, lambda n: offsets, on_bad_tag, take,
                        direct=direct, into=got.__getitem__ if into else None)
    assert not into or seen == list(range(len(sources)))
    return got


@pytest.mark.parametrize("kind,mapped", [("float32", True), ("int16", True),
                                         ("big-endian", False), ("gzip", False)])
def test_read_pixels_equals_h5py(tmp_path, monkeypatch, kind, mapped):
    """Only the listed pixels of the window are read, in the listed order: from a memory
    map of a contiguous native dataset, else through HDF5; the same values either way."""
    t = write_synthetic_run(tmp_path / "p.h5", n_tags=5, compression="gzip" if
                            kind == "gzip" else "none", **{**KW, "noise": True})
    if kind in ("int16", "big-endian"):
        with h5py.File(t.path, "r+") as fh:
            for tag in t.tags:
                g = fh[f"run_{t.run}/{DETECTOR}/tag_{tag}"]
                data = g["detector_data"][()].astype("<i2" if kind == "int16" else ">f4")
                del g["detector_data"]
                g["detector_data"] = data
    run = open_run(t.path)
    window = (slice(5, 30), slice(9, 27))
    rng = np.random.default_rng(1)
    pixels = rng.permutation(25 * 18)[:60].astype(np.int32)     # any order
    ref = h5_images(t.path, t.run, t.tags, window).reshape(len(t.tags), -1)[:, pixels]
    maps = []
    take_direct = hdf5._take_direct
    monkeypatch.setattr(hdf5, "_take_direct", lambda *a: maps.append(1) or take_direct(*a))
    for into in (False, True):                                  # reused buffer, or the caller's
        np.testing.assert_array_equal(pixels_of(run.sources, window, pixels, SHAPE[1],
                                                into=into), ref)
        assert len(maps) == (len(t.tags) if mapped else 0)
        maps.clear()
        np.testing.assert_array_equal(
            pixels_of(run.sources, window, pixels, SHAPE[1], direct=False, into=into), ref)
        assert not maps


def test_direct_read_maps_nothing_even_when_profiled(tmp_path):
    """The direct read copies each image's rows into one reused buffer: no page of the file
    is mapped into the process, even while a profiler keeps snapshots of the reading
    frame's locals (Dask's does)."""
    import gc
    import sys

    t = write_synthetic_run(tmp_path / "m.h5", n_tags=4, **{**KW, "noise": True})
    run = open_run(t.path)
    window = (slice(0, SHAPE[0]), slice(0, SHAPE[1]))
    pixels = np.arange(0, SHAPE[0] * SHAPE[1], 7)
    snapshots = []

    def tracer(frame, event, arg):
        if frame.f_code.co_name == "_take_direct":
            snapshots.append(dict(frame.f_locals))
        return tracer

    sys.settrace(tracer)
    try:
        got = pixels_of(run.sources, window, pixels, SHAPE[1])
    finally:
        sys.settrace(None)
    assert snapshots
    np.testing.assert_array_equal(
        got, h5_images(t.path, t.run, t.tags).reshape(len(t.tags), -1)[:, pixels])
    snapshots.clear()
    gc.collect()
    with open("/proc/self/maps") as fh:
        assert str(t.path) not in fh.read()


@pytest.mark.parametrize("cache", ["all", "part", "none", "no-nowait"])
def test_direct_read_hints_the_next_image_only_when_reading_from_disk(tmp_path, monkeypatch,
                                                                      cache):
    """The direct reader first reads without waiting for the disk (RWF_NOWAIT): rows all in
    the page cache -> no read-ahead hint (it costs a walk over cached pages); some or none
    cached -> the next image's rows are hinted, then the read waits; a file system without
    RWF_NOWAIT -> hint and wait from then on. The pixels are right in every case (the page
    cache's answers are simulated around the real pread)."""
    t = write_synthetic_run(tmp_path / "n.h5", n_tags=4, **{**KW, "noise": True})
    run = open_run(t.path)
    window = (slice(2, 30), slice(3, 33))
    pixels = np.arange(0, 28 * 30, 5)
    ref = h5_images(t.path, t.run, t.tags, window).reshape(len(t.tags), -1)[:, pixels]
    real_preadv, nowait = os.preadv, 8
    monkeypatch.setattr(hdf5._PREADV, "nowait", nowait)
    nowait_calls, hints = [], []

    def preadv(fd, buffers, offset, flags=0):
        if not flags:
            return real_preadv(fd, buffers, offset)
        nowait_calls.append(offset)
        if cache == "no-nowait":
            raise OSError(95, "Operation not supported")
        if cache == "none":
            raise BlockingIOError(11, "Resource temporarily unavailable")
        n = real_preadv(fd, buffers, offset)
        return n if cache == "all" else n // 2  # "part": the first half was cached

    monkeypatch.setattr(hdf5.os, "preadv", preadv)
    monkeypatch.setattr(hdf5.os, "posix_fadvise",
                        lambda fd, off, n, advice: hints.append(off), raising=False)
    np.testing.assert_array_equal(pixels_of(run.sources, window, pixels, SHAPE[1]), ref)
    if cache == "all":
        assert len(nowait_calls) == len(t.tags) and not hints
    elif cache == "no-nowait":
        assert len(nowait_calls) == 1 and hdf5._PREADV.nowait == 0
        assert len(hints) == len(t.tags) - 1  # every image but the last hints its successor
    else:
        assert len(nowait_calls) == len(t.tags) and len(hints) == len(t.tags) - 1


def test_dataset_past_the_end_of_the_file_is_an_error(tmp_path):
    """A truncated copy is refused by HDF5 when opened; should a dataset still point past
    the end of its file, it is an error naming the file and tag, never a memory fault."""
    t = write_synthetic_run(tmp_path / "e.h5", n_tags=3, **KW)
    with h5py.File(t.path, "r") as fh:
        dsid = fh[f"run_{t.run}/{DETECTOR}/tag_{t.tags[1]}/detector_data"].id
        offset = dsid.get_offset()
        assert hdf5._contiguous_region(dsid, offset + 4 * SHAPE[0] * SHAPE[1]) is not None
        with pytest.raises(OSError, match="run past the end of the file.*truncated"):
            hdf5._contiguous_region(dsid, offset + 100)
    run = open_run(t.path)
    real = hdf5._contiguous_region

    def short(dsid, size):
        return real(dsid, size if dsid.get_offset() != offset else offset + 100)

    window = (slice(0, SHAPE[0]), slice(0, SHAPE[1]))
    pixels = np.arange(10)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hdf5, "_contiguous_region", short)
        with pytest.raises(BadTagError, match=rf"e\.h5': tag {t.tags[1]} cannot be read.*"
                                              "truncated"):
            pixels_of(run.sources, window, pixels, SHAPE[1])
        for into in (False, True):
            with pytest.warns(UserWarning, match=rf"tag {t.tags[1]} cannot be read"):
                got = pixels_of(run.sources, window, pixels, SHAPE[1], on_bad_tag="skip",
                                into=into)
            assert np.isnan(got[1]).all() and np.isfinite(got[[0, 2]]).all()
    truncate_file(t.path, 0.7)
    with pytest.raises(RunFileError, match=r"e\.h5.*truncated"):
        pixels_of(run.sources, window, pixels, SHAPE[1])


def test_pipeline_same_result_direct_or_through_hdf5(tmp_path, monkeypatch):
    """A thin band is read pixel by pixel (a wide one as a window): the same store
    whether its pixels are read directly from the file or through HDF5."""
    from sacla_dask.graph import worker_operator

    t = write_synthetic_run(tmp_path / "s.h5", n_tags=12, n_dark=2, **{**KW, "noise": True})
    g = t.geometry
    kw = dict(qmin=float(g.radius_to_q(10.0)), qmax=float(g.radius_to_q(14.0)),
              center=(t.center_x, t.center_y), pixel_size=t.pixel_size, distance=t.distance,
              chunks=5, store_polar=True)
    assert worker_operator(plan_run(t.path, **kw).transform.operator).pixels is not None
    wide = plan_run(t.path, **{**kw, "qmin": float(g.radius_to_q(2.0))}).transform.operator
    shipped = worker_operator(wide)
    assert shipped.pixels is None and shipped.coverage is None  # the window, no coverage
    maps = []
    take_direct = hdf5._take_direct
    monkeypatch.setattr(hdf5, "_take_direct", lambda *a: maps.append(1) or take_direct(*a))
    with dask.config.set(scheduler="sync"):
        mapped = plan_run(t.path, out=tmp_path / "a.zarr", **kw).execute()
        assert len(maps) == 12                               # every tag, bright or dark
        with dask.config.set({"sacla_dask.read.direct": False}):
            through = plan_run(t.path, out=tmp_path / "b.zarr", **kw).execute()
        assert len(maps) == 12                   # read.direct off: no tag read directly
    for name in ("polar", "row_mean", "corr", "corr_sem", "image_ok"):
        np.testing.assert_array_equal(mapped[name].values, through[name].values)


@pytest.fixture(scope="module")
def run5050(tmp_path_factory):
    """The tutorial's full run size: 5050 tags (50 dark), tiny 8x8 images."""
    p = tmp_path_factory.mktemp("big") / "run5050.h5"
    return write_synthetic_run(p, n_tags=5050, n_dark=50, shape=(8, 8), center=(3.6, 3.4),
                               ring_radii=(2.5,), ring_width=0.8, noise=False)


def graph_tasks(ds) -> int:
    """Number of distinct tasks behind every lazy variable of a Dataset."""
    keys: set = set()
    for v in ds.variables.values():
        if dask.is_dask_collection(v.data):
            keys |= set(v.data.__dask_graph__().keys())
    return len(keys)


def test_task_count_grows_with_chunks_not_tags(run5050):
    t = run5050
    run = open_run(t.path)
    assert len(run) == 5050 and int((~run.bright).sum()) == 50
    g = t.geometry
    geo = dict(qmin=float(g.radius_to_q(1.5)), qmax=float(g.radius_to_q(3.5)),
               center=(t.center_x, t.center_y), pixel_size=t.pixel_size, distance=t.distance)
    counts = {}
    with raise_if_dask_computes():
        for per in (5050, 1010, 101, 50):
            plan = plan_run(run, chunks=per, **geo)
            counts[plan.n_chunks] = graph_tasks(plan.dataset())
    # one chunk of 5050 tags: a handful of tasks, not thousands
    assert counts[1] < 60
    assert counts[50] < 2000 and counts[101] < 2 * 2000
    # linear in the number of chunks, with a small cost per chunk
    per_chunk = (counts[101] - counts[50]) / 51
    assert 3 <= per_chunk <= 25
    assert abs(counts[50] - (counts[5] + per_chunk * 45)) < 0.1 * counts[50]
    # byte-sized chunks: bytes of the polar block a task holds (float32 nq x nphi per tag)
    plan = plan_run(run, chunks="6400B", **geo)
    assert plan.tags_per_chunk == 6400 // (4 * np.prod(plan.transform.shape))


def test_file_truncated_while_read_is_an_error_not_a_crash(tmp_path, monkeypatch):
    """A file cut short after its tags were located: the direct read of an image comes
    back short, an error naming the file and tag (not zeros or stale buffer bytes)."""
    t = write_synthetic_run(tmp_path / "cut.h5", n_tags=4, **{**KW, "noise": True})
    run = open_run(t.path)
    with h5py.File(t.path, "r") as fh:
        offset = fh[f"run_{t.run}/{DETECTOR}/tag_{t.tags[2]}/detector_data"].id.get_offset()
    take_direct, seen = hdf5._take_direct, []

    def cut_before_the_third(fd, *args):
        seen.append(1)
        if len(seen) == 3:
            os.truncate(t.path, offset + 8)
        return take_direct(fd, *args)

    monkeypatch.setattr(hdf5, "_take_direct", cut_before_the_third)
    window = (slice(0, SHAPE[0]), slice(0, SHAPE[1]))
    with pytest.raises(BadTagError, match=rf"cut\.h5': tag {t.tags[2]} cannot be read.*"
                                          "truncated while being read"):
        pixels_of(run.sources, window, np.arange(SHAPE[0] * SHAPE[1]), SHAPE[1])
