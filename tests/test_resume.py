"""Resumable runs: an interrupted run, re-run, computes only what is missing.

The reference everywhere is the lazy dataset computed in memory with the
synchronous scheduler (``plan.dataset().compute()``): no store is involved,
so a store that lost, doubled or misplaced a tag chunk cannot match it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import dask
import numpy as np
import pytest
import xarray as xr
import zarr
from dask_procs import DaskProcesses, reads_logged

from sacla_dask import store
from sacla_dask.errors import IncompleteStoreError, OutputError
from sacla_dask.io import hdf5
from sacla_dask.plan import plan_run

CHUNK = 4  # tags per chunk: 40 tags -> 10 chunks
_READERS = {name: getattr(hdf5, name) for name in ("_read_block", "read_pixels")}


class RawReads:
    """Counts blocks of raw images read (in this process); interrupts after ``fail_after``.

    Wraps :func:`sacla_dask.io.hdf5._read_block` and :func:`sacla_dask.io.hdf5.read_pixels`, one
    of which every task reading a chunk of images calls once: this counts chunk
    computations from the raw data whatever the graph's key names.
    """

    def __init__(self, monkeypatch, fail_after: int | None = None) -> None:
        self.n = 0
        self.fail_after = fail_after
        for name, original in _READERS.items():
            monkeypatch.setattr(hdf5, name, self._counted(original))

    def _counted(self, original):
        def read(*args, **kwargs):
            if self.fail_after is not None and self.n >= self.fail_after:
                raise KeyboardInterrupt("injected interruption")
            self.n += 1
            return original(*args, **kwargs)

        return read


def reference(plan) -> xr.Dataset:
    return plan.dataset().compute(scheduler="sync")


def assert_same_result(res: xr.Dataset, ref: xr.Dataset) -> None:
    """Every variable, coordinate and value equal (store bookkeeping attrs aside)."""
    assert set(res.variables) == set(ref.variables)
    xr.testing.assert_identical(res.drop_attrs(), ref.drop_attrs())
    np.testing.assert_array_equal(res["tag"].values, ref["tag"].values)


@pytest.mark.parametrize("store_polar", [True, False])
def test_interrupted_run_resumes_missing_chunks_only(small_run, small_params, tmp_path,
                                                     store_polar, monkeypatch):
    out = tmp_path / "r.zarr"
    plan = plan_run(small_run.path, chunks=CHUNK, out=out, store_polar=store_polar,
                    **small_params)
    n = plan.n_chunks
    assert n == 10
    ref = reference(plan)

    reads = RawReads(monkeypatch, fail_after=5)
    with dask.config.set(scheduler="sync"), pytest.raises(KeyboardInterrupt):
        plan.execute()
    assert reads.n == 5
    assert store.store_state(out) == "incomplete"
    done = store.done_chunks(out)
    k = int(done.sum())
    assert 1 <= k <= 5, done  # finished chunks were written as they finished
    with pytest.raises(IncompleteStoreError, match=f"{k} of {n} tag chunks written"):
        store.open_result(out)
    # what a finished chunk holds is already final
    if store_polar:
        part = xr.open_zarr(out, consolidated=False)
        i = int(np.flatnonzero(done)[0])
        sl = slice(i * CHUNK, (i + 1) * CHUNK)
        np.testing.assert_array_equal(part["polar"].values[sl], ref["polar"].values[sl])

    # the same command again (a new plan object, as a new process would build)
    again = plan_run(small_run.path, chunks=CHUNK, out=out, store_polar=store_polar,
                     **small_params)
    reads = RawReads(monkeypatch)
    with dask.config.set(scheduler="sync"):
        res = again.execute()
    # the polar images of finished chunks are read back from the store; correlation only
    # stores none (they can outweigh the raw data), so its finished chunks are read again
    assert reads.n == (n - k if store_polar else n)
    assert res.attrs["complete"] is True
    assert_same_result(res, ref)
    assert store.DONE not in zarr.open_group(out, mode="r")
    assert ("polar" in res) == store_polar


def test_rerun_of_complete_store_computes_nothing(small_run, small_params, tmp_path,
                                                  monkeypatch):
    out = tmp_path / "r.zarr"
    plan_run(small_run.path, chunks=CHUNK, out=out, **small_params).execute()
    reads = RawReads(monkeypatch)
    with dask.config.set(scheduler="sync"):
        res = plan_run(small_run.path, chunks=CHUNK, out=out, **small_params).execute()
    assert reads.n == 0
    assert res.attrs["complete"] is True
    with pytest.raises(OutputError, match="already holds a complete result"):
        plan_run(small_run.path, chunks=CHUNK, out=out, **small_params).execute(resume=False)


def _interrupt(plan, monkeypatch, after: int = 3) -> None:
    with monkeypatch.context() as m:
        RawReads(m, fail_after=after)
        with dask.config.set(scheduler="sync"), pytest.raises(KeyboardInterrupt):
            plan.execute()


@pytest.mark.parametrize("change, named", [({"qmax_scale": 0.98}, "qmax"),
                                           ({"chunks": 5}, "tags_per_chunk")])
def test_changed_parameters_never_resume(small_run, small_params, tmp_path, change, named,
                                        monkeypatch):
    """(Which parameters enter the fingerprint: tests/test_store.py.)"""
    out = tmp_path / "r.zarr"
    _interrupt(plan_run(small_run.path, chunks=CHUNK, out=out, **small_params), monkeypatch)
    k = int(store.done_chunks(out).sum())
    params = dict(small_params, chunks=CHUNK)
    if "qmax_scale" in change:
        params["qmax"] *= change["qmax_scale"]
    else:
        params.update(change)
    other = plan_run(small_run.path, out=out, **params)
    with pytest.raises(OutputError, match=rf"different parameters \(.*{named} \(store .*"
                                          "--overwrite"):
        other.execute()
    assert int(store.done_chunks(out).sum()) == k  # the refusal changed nothing
    res = other.execute(overwrite=True)
    assert_same_result(res, reference(other))


# -- real processes: kill the CLI, re-run it ---------------------------------------
@pytest.fixture(scope="module")
def slow_cluster(tmp_path_factory):
    """A scheduler and one worker taking 0.4 s per raw image block read
    (shared by the tests below: starting them costs seconds)."""
    procs = DaskProcesses(tmp_path_factory.mktemp("dask"), delay=0.4)
    try:
        procs.start_scheduler()
        procs.start_worker()
        yield procs
    finally:
        procs.close()


def _cli(small_run, small_params, out, *extra):
    qmin, qmax = small_params["qmin"], small_params["qmax"]
    cx, cy = small_params["center"]
    return [sys.executable, "-m", "sacla_dask.cli", "process", str(small_run.path),
            "--out", str(out), "--center", repr(cx), repr(cy), "--qmin", repr(qmin),
            "--qmax", repr(qmax), "--pixel-size", repr(small_params["pixel_size"]),
            "--distance", repr(small_params["distance"]), "--chunk-size", str(CHUNK), *extra]


def _wait_for(cond, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_cli_resumes_against_running_scheduler(small_run, small_params, tmp_path,
                                                      slow_cluster):
    """kill -9 the driver mid-run; the same command again computes only the
    chunks the store lacks, and the result is whole."""
    out = tmp_path / "r.zarr"
    cmd = _cli(small_run, small_params, out, "--scheduler-file",
               str(slow_cluster.scheduler_file))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_for(lambda: store.done_chunks(out, 10).sum() >= 3 or proc.poll() is not None,
                  timeout=60, what="3 chunks written")
        assert proc.poll() is None, proc.stdout.read().decode()
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    # the scheduler drops the dead client's work; a task already running finishes
    slow_cluster.wait_idle()
    done = store.done_chunks(out, 10)
    k = int(done.sum())
    assert 3 <= k < 10
    with pytest.raises(IncompleteStoreError):
        store.open_result(out)

    before = reads_logged(slow_cluster.read_log)
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming {out}: {k} of 10 tag chunks already written" in rerun.stderr
    assert reads_logged(slow_cluster.read_log) - before == 10 - k
    plan = plan_run(small_run.path, chunks=CHUNK, **small_params)
    assert_same_result(store.open_result(out), reference(plan))


@pytest.mark.slow
def test_lost_worker_loses_and_doubles_no_tag(small_run, small_params, tmp_path,
                                              slow_cluster):
    """kill -9 the only worker mid-run, start another: the store equals a clean run's."""
    from distributed import Client

    out = tmp_path / "r.zarr"
    plan = plan_run(small_run.path, chunks=CHUNK, out=out, **small_params)
    first = slow_cluster.workers[-1]
    assert first.poll() is None
    with Client(scheduler_file=str(slow_cluster.scheduler_file), timeout="30s") as client:
        futures = []
        import threading

        def run():
            try:
                futures.append(plan.execute())
            except BaseException as exc:  # surfaced below
                futures.append(exc)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        _wait_for(lambda: store.done_chunks(out, 10).sum() >= 2, timeout=60,
                  what="2 chunks written")
        slow_cluster.kill_worker(first)
        assert first.returncode == -signal.SIGKILL
        written_when_killed = int(store.done_chunks(out, 10).sum())
        new = slow_cluster.start_worker(wait=False)
        t.join(timeout=120)
        assert not t.is_alive(), "the run did not finish after the worker was replaced"
        # the scheduler saw the worker go and the new one take over
        workers = client.scheduler_info(n_workers=-1)["workers"]
        assert [w["name"] for w in workers.values()] == [f"w{len(slow_cluster.workers) - 1}"]
        assert new.poll() is None
    assert written_when_killed < 10
    res = futures[0]
    if isinstance(res, BaseException):
        raise res
    assert res.attrs["complete"] is True
    ref = reference(plan)
    assert_same_result(res, ref)
    assert res.sizes["tag"] == len(small_run.tags)


def test_parameters_are_recorded(small_run, small_params, tmp_path):
    out = tmp_path / "r.zarr"
    res = plan_run(small_run.path, chunks=CHUNK, out=out, **small_params).execute()
    params = json.loads(res.attrs[store.PARAMETERS])
    assert params["qmin"] == pytest.approx(small_params["qmin"])
    assert params["tags_per_chunk"] == CHUNK
    assert params["source_bytes"] == [os.path.getsize(small_run.path)]
    assert len(res.attrs[store.FINGERPRINT]) == 64
