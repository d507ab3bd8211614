"""The engine a command runs on: chosen from the run's storage and the options, and
writing the same store whichever it is."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import xarray as xr

from sacla_dask.engine import choose_engine, read_without_lock
from sacla_dask.errors import ParameterError
from sacla_dask.io.run import open_run
from sacla_dask.io.synthetic import write_synthetic_run


@pytest.fixture(scope="module")
def compressed_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "gzip.h5"
    write_synthetic_run(path, n_tags=12, n_dark=2, shape=(64, 64), compression="gzip")
    return path


def test_auto_takes_threads_for_contiguous_images(small_run):
    run = open_run(small_run.path)
    assert read_without_lock(run.paths, [run.sources[0].dataset])
    eng = choose_engine(run, workers=None)
    assert eng.kind == "threads" and eng.workers == len(os.sched_getaffinity(0))
    assert "HDF5" in eng.reason


def test_auto_takes_processes_for_compressed_images(compressed_run):
    run = open_run(compressed_run)
    assert not read_without_lock(run.paths, [run.sources[0].dataset])
    eng = choose_engine(run)
    assert eng.kind == ("processes" if len(os.sched_getaffinity(0)) > 1 else "threads")


@pytest.mark.parametrize("kw, kind, why", [
    ({"workers": 3}, "processes", "--workers"),
    ({"report": True}, "processes", "--report"),
    ({"engine": "processes"}, "processes", "--engine processes"),
    ({"engine": "threads", "workers": 3}, "threads", "--engine threads"),
    ({"scheduler": "tcp://127.0.0.1:1"}, "scheduler", "scheduler"),
    ({"cluster": "jobqueue"}, "jobqueue", "jobqueue"),
])
def test_options_decide_the_engine(small_run, kw, kind, why):
    eng = choose_engine(open_run(small_run.path), **kw)
    assert eng.kind == kind and why in eng.reason
    if "workers" in kw:
        assert eng.workers == kw["workers"]


@pytest.mark.parametrize("kw, match", [
    ({"engine": "fast"}, "--engine must be one of"),
    ({"engine": "threads", "scheduler": "tcp://h:1"}, "do not also give"),
    ({"engine": "threads", "report": True}, "--report needs the distributed scheduler"),
    ({"workers": 0}, "--workers must be >= 1"),
])
def test_bad_engine_options(small_run, kw, match):
    with pytest.raises(ParameterError, match=match):
        choose_engine(open_run(small_run.path), **kw)


def _process(small_run, small_params, out, *extra):
    cx, cy = small_params["center"]
    cmd = [sys.executable, "-m", "sacla_dask.cli", "process", str(small_run.path),
           "--out", str(out), "--center", repr(cx), repr(cy),
           "--qmin", repr(small_params["qmin"]), "--qmax", repr(small_params["qmax"]),
           "--pixel-size", repr(small_params["pixel_size"]),
           "--distance", repr(small_params["distance"]), "--chunk-size", "6",
           "--q-pairs", "all", "--reject-outliers", "3", "--no-progress", *extra]
    env = dict(os.environ, PYTHONWARNINGS="always")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)


@pytest.mark.slow
def test_engines_write_identical_stores_without_warnings(small_run, small_params, tmp_path):
    """Threads and worker processes: the same bytes in every variable and the same attrs
    (less the engine-independent paths), and nothing warned on the way or on opening."""
    runs = {}
    for engine in ("threads", "processes"):
        out = tmp_path / f"{engine}.zarr"
        res = _process(small_run, small_params, out, "--engine", engine, "--workers", "2")
        assert f"engine     : {engine}" in res.stdout
        assert "Warning" not in res.stderr, res.stderr
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a plain open of the result is silent
            runs[engine] = xr.open_zarr(out).load()
    a, b = runs["threads"], runs["processes"]
    assert set(a.variables) == set(b.variables)
    for name in a.variables:
        va, vb = a[name].values, b[name].values
        assert va.dtype == vb.dtype and va.shape == vb.shape, name
        assert va.tobytes() == vb.tobytes(), name
    drop = {"source", "sources", "parameters", "parameters_sha256"}
    assert ({k: v for k, v in a.attrs.items() if k not in drop}
            == {k: v for k, v in b.attrs.items() if k not in drop})
    assert np.isfinite(a["corr"].values).any()


def test_threads_engine_imports_no_distributed(small_run, small_params, tmp_path):
    """Starting nothing means importing nothing of distributed either (about a second)."""
    cx, cy = small_params["center"]
    args = ["process", str(small_run.path), "--out", str(tmp_path / "t.zarr"),
            "--center", repr(cx), repr(cy), "--qmin", repr(small_params["qmin"]),
            "--qmax", repr(small_params["qmax"]), "--pixel-size",
            repr(small_params["pixel_size"]), "--distance", repr(small_params["distance"])]
    code = ("import sys\nfrom sacla_dask.cli import main\n"
            f"main({args!r}, standalone_mode=False)\n"
            "print('distributed imported:', 'distributed' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert "engine     : threads" in res.stdout
    assert "distributed imported: False" in res.stdout


def test_help_imports_no_scientific_stack():
    code = ("import sys\nfrom sacla_dask.cli import main\n"
            "try:\n    main(['process', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('dask', 'xarray', 'zarr', 'scipy', 'distributed', "
            "'matplotlib', 'h5py') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert res.stdout.strip().endswith("[]"), res.stdout[-300:]
