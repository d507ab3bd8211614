"""sacla_dask's settings in Dask's configuration (:mod:`sacla_dask.config`).

Every key of ``sacla_dask/sacla_dask.yaml`` is read by the code (one test per
group shows a changed value taking effect), the documentation's table is the
YAML's, and the usual ways of setting a Dask key reach sacla_dask.
"""

from __future__ import annotations

import fnmatch
import importlib.resources
import math
import os
import pathlib
import subprocess
import sys
import tomllib
import weakref

import dask
import dask.array as da
import numpy as np
import pytest

from sacla_dask import config
from sacla_dask.correlation import graph as corr_graph
from sacla_dask.correlation import make_plan, pair_statistics, summarize_pairs
from sacla_dask.correlation import statistics as corr_stats

ROOT = pathlib.Path(__file__).resolve().parents[1]



def setting(**values):
    """``dask.config.set`` of sacla_dask keys given as ``group__key_name=value``."""
    return dask.config.set({"sacla_dask." + k.replace("__", ".").replace("_", "-"): v
                            for k, v in values.items()})


# -- the keys --------------------------------------------------------------------
def test_settings_are_the_yaml_keys_with_their_defaults():
    got = config.settings()
    assert [s.key for s in got] == config.keys()
    for s in got:
        assert config.get(s.key) == s.default, s.key
        assert s.doc, f"{s.key} has no comment in sacla_dask.yaml"


@pytest.mark.parametrize("key", config.keys())
def test_every_key_is_read_by_the_code(key):
    """Each key is named by some module of the package besides the configuration's own."""
    sources = [p.read_text() for p in (ROOT / "sacla_dask").rglob("*.py")
               if p.name != "config.py"]
    read = any(f'"{key}"' in s for s in sources)
    assert read, f"no module reads sacla_dask.{key}"


def test_unknown_key_is_a_key_error_listing_the_keys():
    with pytest.raises(KeyError, match=r"no sacla_dask setting 'correlation\.merge'") as err:
        config.get("correlation.merge")
    for key in config.keys():
        assert key in str(err.value)


def test_sizes_and_yes_no_values():
    with setting(correlation__merge_bytes="3KiB", read__direct="off"):
        assert config.get_bytes("correlation.merge-bytes") == 3072
        assert config.get_bool("read.direct") is False
    with setting(correlation__merge_bytes=4096, read__direct=0):
        assert config.get_bytes("correlation.merge-bytes") == 4096
        assert config.get_bool("read.direct") is False
    with setting(read__direct="maybe"), pytest.raises(ValueError, match="true or false"):
        config.get_bool("read.direct")
    assert config.get_bool("read.direct") is True


def test_environment_variables_reach_a_fresh_process(tmp_path):
    env = {**os.environ, "DASK_SACLA_DASK__READ__DIRECT": "false",
           "DASK_SACLA_DASK__CORRELATION__MERGE_BYTES": "64MiB",
           "DASK_SACLA_DASK__WORKER__ENV": '{"MALLOC_ARENA_MAX": "2"}',
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = ("from sacla_dask import config; "
            "print(config.get_bool('read.direct'), config.get_bytes('correlation.merge-bytes'),"
            " config.get('worker.env'), config.get('polar.build-threads'))")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(None, 2)[:2] == ["False", str(64 * 2**20)]
    assert "'MALLOC_ARENA_MAX': '2'" in r.stdout and r.stdout.rstrip().endswith(" 2")


def test_the_yaml_is_package_data():
    """The defaults file sits in the package and pyproject ships it."""
    shipped = importlib.resources.files("sacla_dask").joinpath("sacla_dask.yaml")
    assert shipped.is_file()
    assert shipped.read_text() == pathlib.Path(config._DEFAULTS_FILE).read_text()
    with open(ROOT / "pyproject.toml", "rb") as fh:
        data = tomllib.load(fh)["tool"]["setuptools"]["package-data"]["sacla_dask"]
    assert any(fnmatch.fnmatch("sacla_dask.yaml", pat) for pat in data)


def test_the_documented_table_is_the_yaml():
    doc = ROOT / "docs" / "configuration.md"
    assert config.table_in(str(doc)) == config.markdown_table(), (
        "docs/configuration.md is out of date: python -m sacla_dask.config "
        "docs/configuration.md")
    for key in config.keys():
        assert f"| `{key}` |" in doc.read_text()
    assert "docs/configuration.md" in (ROOT / "README.md").read_text()


# -- correlation.* ------------------------------------------------------------------
def wild_run(ntag=20):
    """Polar images of which shot 9 is wild: its two pairs are rejected at 5 sigmas."""
    rng = np.random.default_rng(31)
    pm = rng.random((2, 16)) > 0.1
    pol = (1 + 0.2 * rng.standard_normal((ntag, 2, 16))) * pm
    pol[9] = 1 + 4 * (pol[9] - 1)
    return pol, np.arange(ntag - 1), make_plan(pm)


def test_correct_bytes_sets_the_correction_batches():
    """correlation.correct-bytes: rejected pairs (and their linked neighbours) are read
    back in batches of that many bytes of polar rows: 1 byte, one pair per batch. It is
    read when the graph is built: the compute outside the setting keeps it."""
    pol, ia, plan = wild_run()
    calls = []

    def reload(pos):
        calls.append(pos.size)
        return pol[pos]

    results = {}
    for batch in (None, 1):
        calls.clear()
        with setting(**({} if batch is None else {"correlation__correct_bytes": batch})):
            res = pair_statistics(da.from_array(pol, chunks=(4, -1, -1)), ia, ia + 1, plan,
                                  reject=5, reload=reload)
        results[batch] = res.sem.compute(scheduler="sync")
        assert res.rejected.compute(scheduler="sync").sum() == 2
        results[batch, "calls"] = len(calls)
    assert results[None, "calls"] == 1
    assert results[1, "calls"] > 2
    np.testing.assert_allclose(results[1], results[None], rtol=1e-12)


def fold_steps(res) -> int:
    return sum(1 for k in dict(res.mean.__dask_graph__())
               if isinstance(k, tuple) and len(k) == 3 and k[1] == "fold")


def test_merge_bytes_sets_the_fold_width():
    """correlation.merge-bytes: partial sums per fold step (8 by default for small sums,
    one at a time when they do not fit), the same statistics."""
    pol, ia, plan = wild_run()
    x = da.from_array(pol, chunks=(1, -1, -1))
    wide = pair_statistics(x, ia, ia + 1, plan)
    with setting(correlation__merge_bytes="1KiB"):
        narrow = pair_statistics(x, ia, ia + 1, plan)
    assert fold_steps(wide) == math.ceil(18 / 8) and fold_steps(narrow) == 18
    np.testing.assert_allclose(narrow.mean.compute(), wide.mean.compute(), rtol=1e-12)


def test_block_bytes_and_hold_out_are_passed_to_the_tasks(monkeypatch):
    """correlation.block-bytes, hold-out-stat and hold-out-max reach the group tasks as
    the values set when the graph was built, whatever the configuration at compute."""
    pol, ia, plan = wild_run()
    seen = []
    sum_pairs = corr_graph._sum_pairs

    def spy(*args, **kw):
        seen.append((kw["block_bytes"], kw["hold_above"], kw["hold_max"]))
        return sum_pairs(*args, **kw)

    monkeypatch.setattr(corr_graph, "_sum_pairs", spy)
    x = da.from_array(pol, chunks=(5, -1, -1))
    default = pair_statistics(x, ia, ia + 1, plan, reject=5)
    default.mean.compute(scheduler="sync")
    assert set(seen) == {(2 * 2**20, 100.0, 16)}
    seen.clear()
    with setting(correlation__block_bytes=3 * 8 * 16, correlation__hold_out_stat=0.5,
                 correlation__hold_out_max=3):
        res = pair_statistics(x, ia, ia + 1, plan, reject=5)
    assert res.mean.name != default.mean.name  # the settings are in the token
    rows = []
    row_blocks = corr_stats._row_blocks
    monkeypatch.setattr(corr_stats, "_row_blocks",
                        lambda n, nphi, b: rows.append(b) or row_blocks(n, nphi, b))
    mean = res.mean.compute(scheduler="sync")
    assert set(seen) == {(3 * 8 * 16, 0.5, 3)} and set(rows) == {3 * 8 * 16}
    eager = summarize_pairs(pol, ia, ia + 1, plan, reject=5)
    np.testing.assert_allclose(mean, eager["mean"], rtol=1e-9)
    # options given to pair_statistics win over the settings
    seen.clear()
    with setting(correlation__hold_out_max=3):
        pair_statistics(x, ia, ia + 1, plan, reject=5, hold_out_max=1,
                        block_bytes=4096).mean.compute(scheduler="sync")
    assert {(b, m) for b, _, m in seen} == {(4096, 1)}


def test_bootstrap_block_sets_the_blocks_of_linked_pairs():
    """correlation.bootstrap-block: linked pairs are resampled in blocks of that many;
    the lazy intervals follow it (and equal the eager ones) and the token holds it."""
    links = np.r_[False, np.ones(12, bool)]
    with setting(correlation__bootstrap_block=2):
        assert corr_stats.bootstrap_blocks(links).tolist() == \
            corr_stats.bootstrap_blocks(links, 2).tolist()
    pol, ia, plan = wild_run()
    x = da.from_array(pol, chunks=(4, -1, -1))
    lows = []
    for block in (1, 10):
        with setting(correlation__bootstrap_block=block):
            res = pair_statistics(x, ia, ia + 1, plan, n_boot=20, seed=3)
            eager = summarize_pairs(pol, ia, ia + 1, plan, n_boot=20, seed=3)
        low = res.ci_low.compute(scheduler="sync")
        np.testing.assert_allclose(low, eager["ci_low"], rtol=1e-9)
        lows.append((res.ci_low.name, low))
    assert lows[0][0] != lows[1][0]
    assert not np.allclose(lows[0][1], lows[1][1])


# -- polar.build-* --------------------------------------------------------------------
def test_build_chunk_bins_and_threads_change_the_build_not_the_operator(monkeypatch):
    import concurrent.futures

    import sacla_dask.polar.build as build
    from sacla_dask.geometry import Geometry
    from sacla_dask.polar import build_operator, make_grid

    geom = Geometry(83.3, 71.6, 100e-6, 0.1, 1.0)
    grid = make_grid(geom, geom.radius_to_q(5.0), geom.radius_to_q(60.0))
    good = np.ones((150, 170), bool)
    pools = []
    pool = concurrent.futures.ThreadPoolExecutor

    def counting(max_workers=None, *a, **kw):
        pools.append(max_workers)
        return pool(max_workers, *a, **kw)

    monkeypatch.setattr(build.concurrent.futures, "ThreadPoolExecutor", counting)

    def make(**values):
        monkeypatch.setattr(build, "_OPERATORS", weakref.WeakValueDictionary())
        pools.clear()
        with setting(**values):
            return build_operator(geom, grid, (150, 170), good, "bilinear")

    ref = make(polar__build_chunk_bins=1 << 30, polar__build_threads=1)
    assert pools == []  # one block, no thread
    nphi = grid.shape[1]
    op = make(polar__build_chunk_bins=5 * nphi, polar__build_threads=3)
    assert pools and pools[0] == 3
    for a, b in ((op.matrix.data, ref.matrix.data), (op.matrix.indices, ref.matrix.indices),
                 (op.matrix.indptr, ref.matrix.indptr), (op.polar_mask, ref.polar_mask)):
        np.testing.assert_array_equal(a, b)


# -- read.direct --------------------------------------------------------------------------
def test_read_direct_off_reads_through_hdf5(tmp_path, monkeypatch):
    from sacla_dask.engine import read_without_lock
    from sacla_dask.io import hdf5
    from sacla_dask.io.run import open_run
    from sacla_dask.io.synthetic import write_synthetic_run

    t = write_synthetic_run(tmp_path / "d.h5", n_tags=3, shape=(40, 36), center=(17.3, 19.6),
                            ring_radii=(7.0,), ring_width=1.2, noise=True)
    run = open_run(t.path)
    window = (slice(2, 30), slice(3, 33))
    pixels = np.arange(0, 28 * 30, 7)
    offsets = (pixels // 30) * 36 + pixels % 30 + 3
    direct = []
    take_direct = hdf5._take_direct
    monkeypatch.setattr(hdf5, "_take_direct", lambda *a: direct.append(1) or take_direct(*a))

    def read():
        out = np.empty((len(run.sources), pixels.size), np.float32)
        hdf5.read_pixels(run.sources, window, pixels, lambda nx: offsets, "fail",
                         lambda i, x: out.__setitem__(i, x))
        return out

    datasets = [run.sources[0].dataset]
    assert read_without_lock([t.path], datasets)
    first = read()
    assert len(direct) == 3
    with setting(read__direct=False):
        assert not read_without_lock([t.path], datasets)
        np.testing.assert_array_equal(read(), first)
    assert len(direct) == 3  # none more


# -- worker.* and jobqueue.* ----------------------------------------------------------------
def test_worker_settings_make_the_cluster_config(monkeypatch):
    from sacla_dask import cluster

    for name in ("MALLOC_ARENA_MAX", "OMP_NUM_THREADS"):  # (a cluster test may set them)
        monkeypatch.delenv(name, raising=False)
    assert cluster._worker_env() == {"MALLOC_ARENA_MAX": "1"}
    assert cluster._scheduler_config() == {"distributed.scheduler.worker-saturation": 1.0}
    with setting(worker__env={"MALLOC_ARENA_MAX": 2, "OMP_NUM_THREADS": "1"},
                 worker__saturation=1.5):
        assert cluster._worker_env() == {"MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
        assert cluster._scheduler_config() == {"distributed.scheduler.worker-saturation": 1.5}
        monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # the user's own value is kept
        assert cluster._worker_env() == {"OMP_NUM_THREADS": "1"}


def test_jobqueue_settings(monkeypatch):
    dask_jobqueue = pytest.importorskip("dask_jobqueue")
    from sacla_dask import cluster
    from sacla_dask.hpc import jobqueue_cluster

    class Loop:
        def add_callback(self, fn):
            pass

    class Cluster:
        loop = Loop()

    with setting(jobqueue__replace_interval="2 minutes"):
        assert cluster._keep_jobs(Cluster(), 1).callback_time == 120_000
    assert cluster._keep_jobs(Cluster(), 1).callback_time == 30_000
    monkeypatch.setattr(dask_jobqueue, "SLURMCluster", lambda **kw: "slurm")
    monkeypatch.setattr(dask_jobqueue, "PBSCluster", lambda **kw: "pbs")
    with dask.config.set({"jobqueue.slurm.cores": 8, "jobqueue.pbs.cores": 8}):
        assert jobqueue_cluster() == "slurm"  # the first configured
        with setting(jobqueue__system="pbs"):
            assert jobqueue_cluster() == "pbs"
