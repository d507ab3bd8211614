"""Warming the page cache while a command starts: which byte ranges are hinted."""

from __future__ import annotations

import os

import h5py
import pytest

from sacla_dask.io import prefetch
from sacla_dask.io.synthetic import write_synthetic_run


def _image_ranges(path, tags):
    with h5py.File(path, "r") as fh:
        run = int(fh["file_info/run_number_list"][0])
        out = []
        for t in tags:
            ds = fh[f"run_{run}/detector_2d_assembled_1/tag_{t}/detector_data"]
            out.append((ds.id.get_offset(), ds.id.get_storage_size()))
        return out


@pytest.fixture
def hints(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "posix_fadvise",
                        lambda fd, off, n, advice: calls.append((off, n, advice)))
    return calls


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pf") / "run.h5"
    truth = write_synthetic_run(path, n_tags=12, n_dark=2, shape=(64, 64))
    return path, truth


def test_cold_file_hints_the_first_images_in_tag_order_within_the_budget(
        run_file, hints, monkeypatch):
    path, truth = run_file
    monkeypatch.setattr(prefetch, "_cached", lambda fd, off, n: False)
    image = 64 * 64 * 4
    t = prefetch.start_prefetch([str(path)], first_tag=int(truth.tags[3]), nbytes=5 * image)
    t.join(10)
    expected = _image_ranges(path, truth.tags[3:8])
    assert [(off, n) for off, n, _ in hints] == expected
    assert {a for *_, a in hints} == {os.POSIX_FADV_WILLNEED}


def test_warm_file_is_left_alone(run_file, hints, monkeypatch):
    path, _ = run_file
    monkeypatch.setattr(prefetch, "_cached", lambda fd, off, n: True)
    prefetch.start_prefetch([str(path)], nbytes=1 << 30).join(10)
    assert hints == []


def test_compressed_images_are_left_to_hdf5(tmp_path, hints, monkeypatch):
    path = tmp_path / "gz.h5"
    write_synthetic_run(path, n_tags=6, n_dark=1, shape=(32, 32), compression="gzip")
    monkeypatch.setattr(prefetch, "_cached", lambda fd, off, n: False)
    prefetch.start_prefetch([str(path)], nbytes=1 << 30).join(10)
    assert hints == []


def test_off_and_bad_files_do_nothing(run_file, tmp_path, hints, monkeypatch):
    path, _ = run_file
    monkeypatch.setattr(prefetch, "_cached", lambda fd, off, n: False)
    prefetch.start_prefetch([str(path)], nbytes=0).join(10)
    bad = tmp_path / "not.h5"
    bad.write_text("no HDF5 here")
    prefetch.start_prefetch([str(bad)], nbytes=1 << 30).join(10)  # swallowed: a hint only
    assert hints == []


def test_the_cache_probe_sees_pages_read(run_file):
    path, truth = run_file
    (off, n), = _image_ranges(path, truth.tags[:1])
    with open(path, "rb") as fh:
        fh.seek(off)
        fh.read(n)  # now in the page cache
        assert prefetch._cached(fh.fileno(), off, n) or not hasattr(os, "RWF_NOWAIT")
