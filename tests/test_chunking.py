"""How a run is cut into tag chunks: ``chunks="auto"``, sized for the workers' memory.

The figures a beamline scientist meets are worked out by hand in the
docstrings of :func:`sacla_dask.chunking.tags_per_chunk` (the 40 x 5000 ring
band and the 1000 x 6912 wide band); these tests hold the code to them, and
check that the chunking ``execute()`` settles on is the one a store to be
resumed was started with.
"""

from __future__ import annotations

import dask
import numpy as np
import psutil
import pytest
import xarray as xr

import sacla_dask.chunking as chunking
from sacla_dask import config, store
from sacla_dask.chunking import tags_per_chunk
from sacla_dask.errors import ParameterError
from sacla_dask.plan import plan_run
from sacla_dask.scheduling import memory_per_thread

GiB = 2**30
RING = (40, 5000)    # 0.8 MB per polar image
WIDE = (1000, 6912)  # 27.6 MB per polar image


# -- the rule ----------------------------------------------------------------------
def test_auto_ring_band_is_32_mib_of_polar_images_whatever_the_memory():
    # 32 MiB / 800 000 bytes = 41.9 -> 41 tags; memory never lowers it
    for mem in (None, 0, 1 * GiB, 64 * GiB):
        assert tags_per_chunk("auto", 5050, RING, memory=mem) == 41


@pytest.mark.parametrize("mem_gib, expected", [
    (64, 16),    # capped at chunks.auto-min-tags
    (4.3, 16),   # 0.1 * 4.3 GiB = 461.7 MB >= 16 x 27.648 MB = 442.4 MB
    (4.0, 15),   # 429.5 MB / 27.648 MB = 15.5
    (2.0, 7),    # 214.7 MB / 27.648 MB = 7.8
    (0.5, 4),    # 1.9 tags fit: never fewer than chunks.min-tags
    (0, 4),      # memory not known: no raise
])
def test_auto_wide_band_takes_16_tags_where_a_tenth_of_the_memory_holds_them(mem_gib, expected):
    assert tags_per_chunk("auto", 5050, WIDE, memory=int(mem_gib * GiB)) == expected


def test_auto_short_run_still_makes_8_chunks_and_spelling():
    assert tags_per_chunk("auto", 100, WIDE, memory=64 * GiB) == 13   # ceil(100 / 8)
    assert tags_per_chunk("auto", 3, WIDE, memory=64 * GiB) == 1
    assert tags_per_chunk(" Auto ", 5050, WIDE, memory=64 * GiB) == 16


def test_explicit_sizes_ignore_memory():
    # bytes: 128 MiB / 27.648 MB = 4.85 -> 4; a number of tags is taken as it is
    assert tags_per_chunk("128MiB", 5050, WIDE, memory=64 * GiB) == 4
    assert tags_per_chunk("32MiB", 5050, WIDE, memory=64 * GiB) == 4   # at least 4 tags
    assert tags_per_chunk(2, 5050, WIDE, memory=64 * GiB) == 2
    with pytest.raises(ParameterError, match="'autos'"):
        tags_per_chunk("autos", 5050, WIDE)


# -- the memory of the scheduler's task threads --------------------------------------
def test_memory_per_thread_of_schedulers_in_this_process():
    total = psutil.virtual_memory().total
    with dask.config.set(scheduler="sync"):
        assert memory_per_thread() == total
    with dask.config.set(scheduler="threads", num_workers=4):
        assert memory_per_thread() == total // 4


def test_memory_per_thread_of_a_distributed_client():
    from distributed import Client, LocalCluster, Worker

    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as lc, \
            Client(lc) as client:
        assert memory_per_thread() is None  # no worker yet (batch jobs still queued)

        async def start(nthreads: int, memory: str) -> Worker:
            return await Worker(lc.scheduler_address, nthreads=nthreads, memory_limit=memory)

        # the smallest memory per thread (a worker's threads share its limit)
        workers = [client.sync(start, 2, "4GiB"), client.sync(start, 1, "3GiB")]
        client.wait_for_workers(2)
        assert memory_per_thread() == 2 * GiB
        with dask.config.set(scheduler="sync"):  # a scheduler chosen over the client
            assert memory_per_thread() == psutil.virtual_memory().total
        for w in workers:
            client.sync(w.close)


# -- what execute() settles on --------------------------------------------------------
@pytest.fixture
def scaled(monkeypatch):
    """Make auto chunking's memory rule matter on the 40-tag test run: every polar image
    is 'large' (32 MiB -> 1 tag), at least 2 chunks, and memory_per_thread() returns
    ``scaled.memory`` (bytes)."""

    class Memory:
        memory: int | None = None

    m = Memory()
    monkeypatch.setattr(chunking, "memory_per_thread", lambda: m.memory)
    with dask.config.set({"sacla_dask.chunks.auto-bytes": 1,
                          "sacla_dask.chunks.min-chunks": 2}):
        yield m


def _memory_for(plan, tags: int) -> int:
    """Memory per thread for which auto chunking gives ``tags`` tags per chunk."""
    nq, nphi = plan.transform.shape
    return int(np.ceil(tags * nq * nphi * 4 / config.get("chunks.auto-memory-fraction")))


def test_execute_sizes_auto_chunks_for_the_workers_that_run_it(small_run, small_params,
                                                               tmp_path, scaled):
    out = tmp_path / "r.zarr"
    scaled.memory = None  # planned where the workers are not known: 4 tags
    plan = plan_run(small_run.path, out=out, **small_params)
    assert plan.auto_chunks and plan.tags_per_chunk == 4
    assert "10 x 4 tags (auto: sized again" in repr(plan)
    # the reference: the lazy dataset with 10-tag chunks (the same sums in the same order)
    ref = plan_run(small_run.path, chunks=10, **small_params).dataset().compute(
        scheduler="sync")
    scaled.memory = _memory_for(plan, 10)
    with dask.config.set(scheduler="sync"):
        res = plan.execute()
    # the plan is not changed: execute() ran a settled copy, the chunking the store keeps
    assert plan.tags_per_chunk == 4
    settled = plan.settle_chunks()
    assert settled.tags_per_chunk == 10 and settled.n_chunks == 4
    assert store.stored_parameters(out)["tags_per_chunk"] == 10
    assert res.polar.encoding["chunks"][0] == 10
    xr.testing.assert_identical(res.drop_attrs(), ref.drop_attrs())
    # explicit chunks are the user's: never changed
    fixed = plan_run(small_run.path, out=tmp_path / "f.zarr", chunks=5, **small_params)
    with dask.config.set(scheduler="sync"):
        fixed.execute()
    assert fixed.tags_per_chunk == 5 and not fixed.auto_chunks
    assert fixed.settle_chunks() is fixed


def test_a_resumed_store_keeps_the_chunking_it_was_started_with(small_run, small_params,
                                                                tmp_path, scaled, monkeypatch):
    from sacla_dask.io import hdf5

    out = tmp_path / "r.zarr"
    scaled.memory = 0
    first = plan_run(small_run.path, out=out, **small_params)
    scaled.memory = _memory_for(first, 5)
    reads = {"n": 0}
    original = hdf5._read_block, hdf5.read_pixels

    def interrupt_after(n, f):
        def read(*args, **kwargs):
            if reads["n"] >= n:
                raise KeyboardInterrupt("injected")
            reads["n"] += 1
            return f(*args, **kwargs)
        return read

    with monkeypatch.context() as m:
        m.setattr(hdf5, "_read_block", interrupt_after(3, original[0]))
        m.setattr(hdf5, "read_pixels", interrupt_after(3, original[1]))
        with dask.config.set(scheduler="sync"), pytest.raises(KeyboardInterrupt):
            first.execute()
    assert first.settle_chunks().tags_per_chunk == 5
    done = int(store.done_chunks(out).sum())
    assert 0 < done < 8

    # the same command on workers with more memory: auto would now choose 10 tags
    scaled.memory = _memory_for(first, 10)
    again = plan_run(small_run.path, out=out, **small_params)
    assert again.tags_per_chunk == 10
    assert again.check_output() == "incomplete" and again.settle_chunks().tags_per_chunk == 5
    reads["n"] = 0
    with monkeypatch.context() as m:
        m.setattr(hdf5, "_read_block", interrupt_after(99, original[0]))
        m.setattr(hdf5, "read_pixels", interrupt_after(99, original[1]))
        with dask.config.set(scheduler="sync"):
            res = again.execute()
    assert reads["n"] == 8 - done  # only the missing chunks read
    ref = plan_run(small_run.path, chunks=5, **small_params).dataset().compute(
        scheduler="sync")
    xr.testing.assert_identical(res.drop_attrs(), ref.drop_attrs())
    # overwrite: sized afresh
    scaled.memory = _memory_for(first, 10)
    fresh = plan_run(small_run.path, out=out, **small_params)
    with dask.config.set(scheduler="sync"):
        fresh.execute(overwrite=True)
    assert fresh.settle_chunks().tags_per_chunk == 10 \
        == store.stored_parameters(out)["tags_per_chunk"]
