"""End-to-end benchmark: is sacla_dask bound by the disk, and is its memory flat?

One invocation, on a synthetic DataConvert run of 2400x2400 float32 images it
writes itself into ``benchmarks/_work/`` (reused across invocations):

1. raw read throughput of the same detector datasets with plain h5py
   (``read_direct`` into one reused buffer), warm page cache and cold;
2. the tutorial's formulation, serially (the baseline);
3. sacla_dask end to end (open_run + plan_run + execute: read, polar,
   normalise, correlation, Zarr write) on a LocalCluster of 1 and 2
   single-threaded worker processes, with and without the per-tag polar
   images in the store, for the ring band and the wide band;
4. peak RSS of every worker for a short and a long run, and the number of
   tasks in the graph (also for a 5050-tag run);

then prints the ratios against its targets (PASS/MISS) and
writes every figure to ``benchmarks/_work/results-<time>.json``.

Usage::

    python benchmarks/bench_pipeline.py --tags 200        # the full benchmark
    python benchmarks/bench_pipeline.py --quick           # ~1.5 minutes, smoke figures
    python benchmarks/bench_pipeline.py --tags 200 --profile   # + py-spy and Dask reports

Timings are best-of-``--repeat`` wall clock (LocalCluster start-up is timed
separately, never inside a figure); the worker CPU time of each run is
recorded too, because on a shared machine other processes stretch the wall
clock but not the CPU seconds our processes spend.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.ma as ma

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

TARGETS = {
    "ring_vs_raw_warm": 0.8,
    "ring_vs_raw_cold": 0.9,
    "wide_vs_tutorial": 3.0,
    "scaling_2w_1w": 1.7,
    "rss_ratio": 1.1,
    "graph_tasks_5050": 2000,
}


def log(*a: Any) -> None:
    print(*a, flush=True)


# -- 1. raw read -----------------------------------------------------------------
def dataset_paths(run_number: int, tags: np.ndarray) -> list[str]:
    return [f"/run_{run_number}/detector_2d_assembled_1/tag_{t}/detector_data" for t in tags]


def raw_read(path: str, names: list[str], window: tuple[slice, slice] | None = None) -> dict:
    """Read every dataset with ``read_direct`` into one reused buffer; img/s."""
    import h5py

    if window is None:
        buf = np.empty(C.SHAPE, dtype=np.float32)
        sel: Any = None
    else:
        buf = np.empty((window[0].stop - window[0].start, window[1].stop - window[1].start),
                       dtype=np.float32)
        sel = window
    c0 = C.cpu_times([os.getpid()])
    t = time.perf_counter()
    with h5py.File(path, "r") as fh:
        for n in names:
            fh[n].read_direct(buf, source_sel=sel)
    dt = time.perf_counter() - t
    c = C.cpu_times([os.getpid()]) - c0
    return {"seconds": dt, "rate": len(names) / dt,
            "cpu_ms_per_img": 1e3 * (c[0] + c[1]) / len(names),
            "mb_per_s": len(names) * buf.nbytes / dt / 1e6}


def raw_read_synced(path: str, names: list[str]) -> float:
    """:func:`raw_read`'s img/s after ``os.sync()``, as :func:`pipeline` starts a run: the
    baseline paired with the runs, paying for no earlier run's writeback."""
    os.sync()
    return raw_read(path, names)["rate"]


def disk_write(workdir: str, mib: int = 1024) -> dict:
    """Sustained write rate of the disk under ``workdir``: ``mib`` MiB, then fdatasync; MB/s.

    What bounds a long run that stores its polar images once the page
    cache's dirty limit is reached (a ring image's polar block is ~0.5 MB
    compressed).
    """
    path = os.path.join(workdir, "disk-write-test.bin")
    block = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8).tobytes()
    n_blocks = max(1, mib // 8)
    os.sync()
    t = time.perf_counter()
    try:
        with open(path, "wb") as fh:
            for _ in range(n_blocks):
                fh.write(block)
            fh.flush()
            os.fdatasync(fh.fileno())
        dt = time.perf_counter() - t
    finally:
        if os.path.exists(path):
            os.remove(path)
    return {"seconds": dt, "mb_per_s": n_blocks * len(block) / dt / 1e6}


#: the steady state's long run, in multiples of --tags (a longer span makes the marginal
#: rate less sensitive to the host's noise)
STEADY_SPAN = 3


def raw_pixels(path: str, names: list[str], radii: tuple[float, float]) -> dict:
    """Plain numpy: each image's pixels with radius in ``radii`` (about ``C.CENTER``),
    taken from the image rows that hold them, read with one ``pread`` per image at the
    dataset's offset into a reused buffer; img/s.

    The floor of a reader that fetches only a thin band's pixels (what
    ``sacla_dask.io.hdf5.read_pixels`` does for a contiguous dataset; taking the
    pixels through a memory map instead costs more in page faults:
    docs/benchmarks.md).
    """
    import h5py

    ny, nx = C.SHAPE
    yy, xx = np.mgrid[0:ny, 0:nx]
    rr = np.hypot(xx - C.CENTER[0], yy - C.CENTER[1])
    inside = (rr >= radii[0]) & (rr < radii[1])
    rows = np.flatnonzero(inside.any(axis=1))
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    idx = np.flatnonzero(inside[y0:y1])
    with h5py.File(path, "r") as fh:
        offsets = [fh[n].id.get_offset() + y0 * nx * 4 for n in names]
    out = np.empty(idx.size, dtype=np.float32)
    buf = np.empty((y1 - y0) * nx, dtype=np.float32)
    view = memoryview(buf).cast("B")
    c0 = C.cpu_times([os.getpid()])
    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        for o in offsets:
            os.preadv(fd, [view], o)
            np.take(buf, idx, out=out)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t
    c = C.cpu_times([os.getpid()]) - c0
    return {"seconds": dt, "rate": len(names) / dt, "pixels": int(idx.size),
            "cpu_ms_per_img": 1e3 * (c[0] + c[1]) / len(names),
            "mb_per_s": len(names) * out.nbytes / dt / 1e6}


def raw_read_parallel(path: str, names: list[str], window: tuple[slice, slice] | None = None,
                      processes: int = 2) -> dict:
    """:func:`raw_read` by ``processes`` processes at once, each a share of ``names``.

    What as many workers reading at once can get from the page cache (they
    share its memory bandwidth): the ceiling of a read-bound pipeline.
    """
    import concurrent.futures
    import multiprocessing

    shares = [names[i::processes] for i in range(processes)]
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=ctx) as ex:
        list(ex.map(abs, range(processes)))  # the processes start before the clock
        t = time.perf_counter()
        parts = list(ex.map(raw_read, [path] * processes, shares, [window] * processes))
        dt = time.perf_counter() - t
    nbytes = sum(p["mb_per_s"] * p["seconds"] for p in parts) * 1e6
    return {"seconds": dt, "rate": len(names) / dt, "processes": processes,
            "cpu_ms_per_img": sum(p["cpu_ms_per_img"] * len(sh) for p, sh in
                                  zip(parts, shares, strict=True)) / len(names),
            "mb_per_s": nbytes / dt / 1e6}


# -- 2. the tutorial ------------------------------------------------------------------
def tutorial(path: str, run_number: int, tags: np.ndarray, bright: np.ndarray,
             r_in: float, r_out: float, mask: np.ndarray) -> dict:
    """The tutorial's formulation, serial, in Python 3.

    As written in the tutorial (RingData's InterpSimple / DiffCorr), with its
    two slips fixed: nphi from the outer radius in pixels (not in 1/A) and
    the mean taken over pairs only (not over pairs and q). One change of
    form, not of arithmetic: the tutorial first materialises every polar
    image (too large for the wide band: 200 x 27 MB), then the differences;
    here each image is processed as the generator yields it and the
    autocorrelations are summed as they come: the same operations per image,
    without the tutorial's HDF5 writes of the polar stacks, so this baseline
    is if anything faster than the tutorial.
    """
    import h5py

    x_c, y_c = C.CENTER
    nphi = int(2 * np.pi * r_out)  # single pixel resolution at the outer radius (pixels)
    ny, nx = mask.shape
    # -- InterpSimple(x_c, y_c, qmax_pix, qmin_pix, nphi, raw_img_shape)
    phis = np.arange(nphi) * 2 * np.pi / nphi
    q_rows = np.arange(r_in, r_out)
    Q = np.vstack([np.ones(nphi) * iq for iq in q_rows])
    PHI = np.vstack([phis for _ in q_rows])
    xring = Q * np.cos(PHI - np.pi) + x_c
    yring = Q * np.sin(PHI - np.pi) + y_c
    xnear = xring.astype(int) + np.round(xring - np.floor(xring)).astype(int)
    ynear = yring.astype(int) + np.round(yring - np.floor(yring)).astype(int)
    indices_1d = nx * ynear + xnear

    def nearest(img: np.ndarray) -> np.ndarray:
        return img.ravel()[indices_1d]

    pmask = nearest(mask.astype(np.float32)).round()
    # mask autocorrelation (the normalisation later analysis scripts applied)
    fm = np.fft.rfft(pmask, n=nphi, axis=-1)
    mask_ac = np.fft.irfft(fm * np.conjugate(fm), n=nphi, axis=-1)
    mask_ac = np.rint(mask_ac)

    imgs_path = f"/run_{run_number}/detector_2d_assembled_1"
    exposure_tags = [f"tag_{t}" for t in tags]
    t0 = time.perf_counter()
    c0 = C.cpu_times([os.getpid()])
    fh5 = h5py.File(path, "r")
    img_gen = (fh5[imgs_path + "/" + tag + "/detector_data"][()] for tag in exposure_tags)
    total = np.zeros((q_rows.size, nphi))
    npairs = 0
    prev = None
    for i in range(len(exposure_tags)):
        polar = pmask * nearest(next(img_gen))
        # normalize_polar_images(imgs, mask_val=0), one image at a time
        norms = ma.masked_equal(polar, 0).mean(axis=1)
        polar /= np.asarray(norms.filled(1.0))[:, None]
        polar[polar < 0] = 0
        if prev is not None and bright[i] and bright[i - 1]:
            diff = prev - polar  # shotA - shotB, consecutive exposures
            fx = np.fft.rfft(diff, n=nphi, axis=-1)  # DiffCorr._fft_autocorr
            total += np.fft.irfft(fx * np.conjugate(fx), n=nphi, axis=-1)
            npairs += 1
        prev = polar
    fh5.close()
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(mask_ac > 0, total / max(npairs, 1) / mask_ac, 0.0)
    dt = time.perf_counter() - t0
    c = C.cpu_times([os.getpid()]) - c0
    return {"seconds": dt, "rate": len(tags) / dt,
            "cpu_ms_per_img": 1e3 * (c[0] + c[1]) / len(tags),
            "nphi": nphi, "nq": int(q_rows.size), "pairs": npairs,
            "corr_checksum": float(np.abs(corr).sum())}


# -- 3. sacla_dask --------------------------------------------------------------------
def _task_counter() -> Any:
    """A scheduler plugin counting the tasks of each graph submitted."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    class TaskCounter(SchedulerPlugin):
        name = "bench-task-counter"

        def __init__(self) -> None:
            self.counts: list[int] = []

        def update_graph(self, scheduler: Any, *, tasks: Any = None, keys: Any = None,
                         **kw: Any) -> None:
            self.counts.append(len(tasks) if tasks is not None else len(keys or ()))

    return TaskCounter()


@contextlib.contextmanager
def cluster(workers: int) -> Any:
    """A LocalCluster the way users get one (sacla_dask.cluster.dask_client)."""
    from sacla_dask.cluster import dask_client

    t = time.perf_counter()
    with dask_client(workers=workers) as client:
        client.wait_for_workers(workers)
        startup = time.perf_counter() - t
        counter = _task_counter()
        client.cluster.scheduler.add_plugin(counter, name=counter.name)
        pids = sorted(client.run(os.getpid).values())
        yield {"client": client, "startup": startup, "counter": counter, "pids": pids,
               "workers": workers}


def warm_up(cl: dict, path: str, mask: np.ndarray, workdir: str, bands: list[str],
            n: int = 16) -> float:
    """One small untimed run per band on a fresh cluster (imports, codecs, allocator)."""
    t = time.perf_counter()
    for band in bands:
        pipeline(cl, path, n, band, store_polar=True, mask=mask,
                 out=os.path.join(workdir, "out-warmup.zarr"))
    return time.perf_counter() - t


def band_q(band: str) -> tuple[float, float]:
    from sacla_dask.geometry import Geometry

    g = Geometry(*C.CENTER, C.PIXEL, C.DISTANCE, C.WAVELENGTH)
    r0, r1 = C.BANDS[band]
    return float(g.radius_to_q(r0)), float(g.radius_to_q(r1))


def pipeline(cl: dict, path: str, n_tags: int, band: str, *, store_polar: bool,
             mask: np.ndarray, out: str, compression: str = "lz4", fast_nphi: bool = True,
             cold: str | None = None, profile: str | None = None,
             chunks: int | str | None = None) -> dict:
    """open_run + plan_run + execute on the cluster ``cl``; wall, CPU, RSS, tasks."""
    from sacla_dask.io.run import open_run
    from sacla_dask.plan import plan_run

    if os.path.exists(out):
        shutil.rmtree(out)
    # no earlier run's writes still being flushed: a run pays for its own writes only
    # (without it, a store run could wait on the previous runs' writeback)
    os.sync()
    evicted = C.evict([path], cold) if cold else None
    pids = cl["pids"]
    counter = cl["counter"]
    counter.counts.clear()
    qmin, qmax = band_q(band)
    mon = C.RSSMonitor(pids)
    c0 = C.cpu_times(pids)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = open_run(path)
        if len(run) > n_tags:
            run = run.select(np.arange(len(run)) < n_tags)
        plan = plan_run(run, qmin=qmin, qmax=qmax, center=C.CENTER, pixel_size=C.PIXEL,
                        distance=C.DISTANCE, wavelength=C.WAVELENGTH, mask=mask, out=out,
                        store_polar=store_polar, compression=compression,
                        fast_nphi=fast_nphi,
                        **({} if chunks is None else {"chunks": chunks}))  # None: the default
        plan = plan.settle_chunks(overwrite=True)  # the chunks execute() runs (and reported)
        t1 = time.perf_counter()
        prof_ctx: Any = contextlib.nullcontext()
        spy_ctx: Any = contextlib.nullcontext([])
        if profile:
            from distributed import performance_report

            prof_ctx = performance_report(filename=profile + ".html")
            spy_ctx = C.py_spy(pids, profile)
        with spy_ctx as spy_files, prof_ctx, mon.watch():
            plan.execute(overwrite=True)
    t2 = time.perf_counter()
    c = C.cpu_times(pids) - c0
    nq, nphi = plan.transform.shape
    wy, wx = plan.transform.operator.window_shape
    # the chunk a task holds: its block of polar images (it reads its tags one by one)
    chunk_bytes = plan.tags_per_chunk * nq * nphi * 4
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    shutil.rmtree(out, ignore_errors=True)
    peaks = mon.peak_mib()
    return {
        "band": band, "workers": cl["workers"], "store_polar": store_polar,
        "compression": compression, "fast_nphi": fast_nphi, "tags": len(run),
        "cold": evicted, "seconds": t2 - t0, "plan_seconds": t1 - t0,
        "execute_seconds": t2 - t1, "rate": len(run) / (t2 - t0),
        "worker_cpu_ms_per_img": 1e3 * (c[0] + c[1]) / len(run),
        "worker_sys_ms_per_img": 1e3 * c[1] / len(run),
        "minor_faults_per_img": c[2] / len(run),
        "tasks": int(sum(counter.counts)), "graphs": len(counter.counts),
        "tags_per_chunk": plan.tags_per_chunk, "chunk_mib": chunk_bytes / 2**20,
        "grid": [nq, nphi], "window": [wy, wx], "store_mib": size / 2**20,
        "peak_rss_mib": [round(peaks[p], 1) for p in pids],
        "median_rss_mib": [round(x, 1) for x in mon.median_mib().values()],
        "rss_hwm_exact": mon.hwm_reset, "load": round(load0, 2),
        "profile": ({"files": spy_files, "report": profile + ".html",
                     "functions": C.spy_summary(spy_files)} if profile else None),
    }


def best(results: list[dict]) -> dict:
    """The fastest of repeated runs, with the spread kept."""
    b = dict(min(results, key=lambda r: r["seconds"]))
    b["all_rates"] = [round(r["rate"], 2) for r in results]
    return b


# -- extras -----------------------------------------------------------------------------
def fft_lengths(nq: int = 40, pairs: int = 12) -> list[dict]:
    """Cost of the correlation FFT (rfft + irfft of float64 rows) for some nphi."""
    import scipy.fft

    out = []
    n0 = int(2 * np.pi * C.BANDS["ring"][1])
    lengths = [n0, n0 + 1, scipy.fft.next_fast_len(n0, real=True), 5000]
    for n in dict.fromkeys(lengths):
        x = np.random.default_rng(0).standard_normal((pairs, nq, n))
        for lib, rf, irf in (("scipy", scipy.fft.rfft, scipy.fft.irfft),
                             ("numpy", np.fft.rfft, np.fft.irfft)):
            irf(np.abs(rf(x, axis=-1)) ** 2, n=n, axis=-1)
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                f = rf(x, axis=-1)
                irf(f.real**2 + f.imag**2, n=n, axis=-1)
                ts.append(time.perf_counter() - t)
            out.append({"nphi": n, "lib": lib, "ms_per_pair": 1e3 * min(ts) / pairs,
                        "factors": _factor(n)})
    return out


def _factor(n: int) -> str:
    f, d = [], 2
    while d * d <= n:
        while n % d == 0:
            f.append(d)
            n //= d
        d += 1
    if n > 1:
        f.append(n)
    return "x".join(map(str, f))


def steady_state(path: str, band: str, n1: int, n2: int, per: int, workers: Sequence[int],
                 mask: np.ndarray, a: Any, out: str,
                 raw_names: list[str] | None = None) -> list[dict]:
    """Marginal rate between runs of ``n1`` and ``n2`` tags, per worker count and store mode.

    Interleaved (n1, n2, n1, n2, ...) and best of each: on a host whose speed drifts, one
    slow spell must not fall on one length only. The same ``per`` tags per chunk for both.
    With ``raw_names`` (the ``n2`` tags' datasets) each round starts with their raw read,
    whose best is kept as ``raw_paired``: the baseline of the same minutes.
    """
    found = []
    for nw in workers:
        with cluster(nw) as cl:
            warm_up(cl, path, mask, a.workdir, [band], n=8 if a.quick else 16)
            for sp in (False, True):
                secs = {n1: math.inf, n2: math.inf}
                store_mib = 0.0
                raw_best = 0.0
                for _ in range(max(3, a.repeat)):
                    if raw_names:
                        raw_best = max(raw_best, raw_read_synced(path, raw_names))
                    for n in (n1, n2):
                        r = pipeline(cl, path, n, band, store_polar=sp, mask=mask, out=out,
                                     chunks=per)
                        secs[n] = min(secs[n], r["seconds"])
                        store_mib = r["store_mib"] if n == n2 else store_mib
                rate = (n2 - n1) / (secs[n2] - secs[n1])
                fixed = secs[n1] - n1 / rate
                found.append({"band": band, "workers": nw, "store_polar": sp,
                              "tags": [n1, n2], "tags_per_chunk": per,
                              "seconds": [secs[n1], secs[n2]], "rate": rate,
                              "fixed_seconds": fixed,
                              "store_mb_per_tag": store_mib * 2**20 / 1e6 / n2,
                              "raw_paired": raw_best or None})
                log(f"  {nw}w store_polar={sp}: {n1} tags {secs[n1]:.2f} s, {n2} tags "
                    f"{secs[n2]:.2f} s -> {rate:.1f} img/s marginal ({per} tags/chunk); "
                    f"fixed cost per run {fixed:.2f} s"
                    + (f"; raw read of the {n2} tags in these rounds {raw_best:.1f} img/s"
                       if raw_best else ""))
    return found


def default_tags_per_chunk(path: str, n_tags: int, band: str, mask: np.ndarray) -> int:
    """Tags per chunk that plan_run chooses by default for the first ``n_tags`` tags."""
    from sacla_dask.io.run import open_run
    from sacla_dask.plan import plan_run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = open_run(path)
        run = run.select(np.arange(len(run)) < n_tags)
        qmin, qmax = band_q(band)
        plan = plan_run(run, qmin=qmin, qmax=qmax, center=C.CENTER, pixel_size=C.PIXEL,
                        distance=C.DISTANCE, wavelength=C.WAVELENGTH, mask=mask)
        return int(plan.tags_per_chunk)


class _Counted(Exception):
    """Raised by the capture of :func:`graph_tasks_5050` to stop ``execute()`` before it
    computes anything."""


def graph_tasks_5050(workdir: str, bands: Sequence[str], mask: np.ndarray,
                     store_polar: tuple[bool, ...] = (True, False)) -> dict:
    """Tasks of the graph execute() submits for a 5050-tag run of 2400x2400 images.

    On a run of the real layout whose pixels were never written
    (:func:`_common.ensure_layout_run`), with the defaults (the tags per chunk
    and the fold's fan-in follow from the band's real grid): ``execute()``
    writes the store's template, then its graph is built and optimised as
    the scheduler would get it (``collections_to_expr(...).optimize()``) and
    counted, and the compute is stopped before it starts. (The real image
    size matters: the fold's fan-in is chosen from the size of the partial
    sums, so a graph of tiny images with the same tags per chunk would have
    a different count.)
    """
    import collections

    import dask
    from dask.base import collections_to_expr
    from dask.utils import key_split

    import sacla_dask.execute as execute
    from sacla_dask.io.run import open_run
    from sacla_dask.plan import plan_run

    path = C.ensure_layout_run(workdir, 5050)
    out = os.path.join(workdir, "out-graph.zarr")
    res = {}
    seen: dict[str, Any] = {}

    def capture(objs: Sequence[Any], progress: bool = False) -> list[Any]:
        dsk = collections_to_expr(list(objs), optimize_graph=True).optimize().__dask_graph__()
        seen["tasks"] = len(dsk)
        seen["kinds"] = dict(collections.Counter(key_split(k) for k in dsk).most_common(8))
        raise _Counted

    real = execute._compute
    execute._compute = capture
    try:
        with warnings.catch_warnings(), dask.config.set(scheduler="sync"):
            warnings.simplefilter("ignore")
            run = open_run(path)
            for band in bands:
                qmin, qmax = band_q(band)
                for sp in store_polar:
                    if os.path.exists(out):
                        shutil.rmtree(out)
                    plan = plan_run(run, qmin=qmin, qmax=qmax, center=C.CENTER,
                                    pixel_size=C.PIXEL, distance=C.DISTANCE,
                                    wavelength=C.WAVELENGTH, mask=mask, out=out,
                                    store_polar=sp)
                    plan = plan.settle_chunks(overwrite=True)  # the chunks execute() runs
                    try:
                        plan.execute(overwrite=True)
                    except _Counted:
                        pass
                    res[f"{band} ({plan.tags_per_chunk} tags/chunk, store_polar={sp})"] = {
                        "tasks": int(seen["tasks"]), "chunks": plan.n_chunks,
                        "pairs": int(plan.ia.size), "kinds": seen["kinds"]}
    finally:
        execute._compute = real
        shutil.rmtree(out, ignore_errors=True)
    return res


# -- main --------------------------------------------------------------------------------
def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tags", type=int, default=200, help="tags timed (default 200)")
    ap.add_argument("--wide-tags", type=int, default=100,
                    help="tags timed for the wide band, which is compute-bound and ~50x "
                         "slower per image (default 100, at most --tags)")
    ap.add_argument("--rss-tags", default="100,300,1000",
                    help="run lengths for the peak-RSS test, shortest and longest compared "
                         "(default 100,300,1000: the middle one shows whether memory has "
                         "levelled off once the run is several chunks long; the longest "
                         "shrinks to what fits the disk)")
    ap.add_argument("--repeat", type=int, default=2, help="timed repeats, best kept (default 2)")
    ap.add_argument("--bands", default="ring,wide")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--cold", default="fadvise",
                    choices=["auto", "drop_caches", "fadvise", "none"],
                    help="page-cache eviction for the cold figures: fadvise (default: "
                         "POSIX_FADV_DONTNEED on the run file only, harmless to other work "
                         "on the machine), drop_caches (echo 3 > /proc/sys/vm/drop_caches: "
                         "root only, empties everyone's cache), auto (drop_caches if "
                         "allowed, else fadvise), none")
    ap.add_argument("--codecs", default="none,lz4,zstd",
                    help="polar store codecs compared (2 workers); '' to skip")
    ap.add_argument("--exact-nphi", action="store_true",
                    help="also time the ring band at exactly one pixel of arc (nphi 4933, a "
                         "prime: slow FFTs) besides the default FFT-friendly 5000")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy flame graphs of the workers and Dask performance reports "
                         "for the 2-worker runs (into _work/profiles/)")
    ap.add_argument("--skip", default="", help="sections to skip: raw,tutorial,pipeline,"
                                               "codecs,steady,rss,graph,fft")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run of ~1.5 minutes: 30 ring tags, 8 wide, one "
                         "repeat, ring RSS at 10 and 30 tags, no codec comparison (not the "
                         "figures of docs/benchmarks.md)")
    ap.add_argument("--workdir", default=C.WORK)
    ap.add_argument("--json", default=None, help="results file (default _work/results-*.json)")
    a = ap.parse_args(argv)
    if a.quick:
        a.tags, a.wide_tags, a.rss_tags, a.repeat, a.codecs = 30, 8, "10,30", 1, ""
    a.wide_tags = min(a.wide_tags, a.tags)
    ntags = {"ring": a.tags, "wide": a.wide_tags}
    skip = set(filter(None, a.skip.split(",")))
    bands = [b for b in a.bands.split(",") if b]
    workers = [int(w) for w in a.workers.split(",") if w]
    rss_lengths = sorted(int(x) for x in a.rss_tags.split(","))
    rss_long = rss_lengths[-1]
    os.makedirs(a.workdir, exist_ok=True)
    prof_dir = os.path.join(a.workdir, "profiles")
    if a.profile:
        os.makedirs(prof_dir, exist_ok=True)

    res: dict[str, Any] = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
                           "argv": sys.argv[1:], "machine": C.machine_info(a.workdir)}
    m = res["machine"]
    log(f"machine: {m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, {m['disk']}; "
        f"load {m['loadavg_at_start']}")

    # the run file: big enough for the timed tags and the long RSS run, if the disk allows
    free = shutil.disk_usage(a.workdir).free
    base = max(a.tags, STEADY_SPAN * a.tags if "steady" not in skip else 0)
    have = C.find_run(a.workdir, max(base, rss_long if "rss" not in skip else 0))
    if have is None:
        room = int((free - 8 * 2**30) / (C.IMAGE_BYTES * 1.01))
        if "rss" not in skip and rss_long > room:
            log(f"disk: {free / 2**30:.0f} GiB free: the long RSS run shrinks from {rss_long} "
                f"to {room} tags")
            rss_long = room
        n_file = max(base, rss_long if "rss" not in skip else 0)
        if n_file > room:
            raise SystemExit(f"not enough disk for {n_file} tags of 2400x2400 float32 "
                             f"({free / 2**30:.0f} GiB free)")
    else:
        n_file = max(base, rss_long if "rss" not in skip else 0)
    path = C.ensure_run(a.workdir, n_file, log=log)
    res["run_file"] = path

    from sacla_dask.io.run import open_run
    from sacla_dask.io.synthetic import panel_mask

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = open_run(path)
    run_number = full.run_number
    tags = full.tags[: a.tags]
    bright = full.bright[: a.tags]
    names = dataset_paths(run_number, tags)
    mask = panel_mask(C.SHAPE)
    out = os.path.join(a.workdir, "out.zarr")

    # -- 1. raw read
    if "raw" not in skip:
        log(f"\n[1] raw h5py read_direct of {len(names)} images "
            f"({C.IMAGE_BYTES / 1e6:.0f} MB each)")
        raw_read(path, names)  # warm the page cache
        warm = [raw_read(path, names) for _ in range(max(2, a.repeat))]
        res["raw_warm"] = dict(min(warm, key=lambda r: r["seconds"]),
                               all_rates=[round(r["rate"], 1) for r in warm])
        log(f"  warm: {res['raw_warm']['rate']:.1f} img/s "
            f"({res['raw_warm']['mb_per_s']:.0f} MB/s; runs {res['raw_warm']['all_rates']})")
        r0, r1 = C.BANDS["ring"]
        h = int(math.ceil(r1)) + 2
        win = (slice(int(C.CENTER[1]) - h, int(C.CENTER[1]) + h),
               slice(int(C.CENTER[0]) - h, int(C.CENTER[0]) + h))
        res["raw_warm_ring_window"] = raw_read(path, names, window=win)
        log(f"  warm, ring band's window {2 * h}x{2 * h}: "
            f"{res['raw_warm_ring_window']['rate']:.1f} img/s")
        res["raw_warm_ring_pixels"] = max((raw_pixels(path, names, C.BANDS["ring"])
                                           for _ in range(2)), key=lambda r: r["rate"])
        log(f"  warm, only the ring band's {res['raw_warm_ring_pixels']['pixels']} pixels "
            f"(numpy, pread of its rows): {res['raw_warm_ring_pixels']['rate']:.1f} img/s")
        res["raw_warm_ring_window_2p"] = max(
            (raw_read_parallel(path, names, window=win) for _ in range(2)),
            key=lambda r: r["rate"])
        res["raw_warm_2p"] = max((raw_read_parallel(path, names) for _ in range(2)),
                                 key=lambda r: r["rate"])
        log(f"  warm, 2 processes at once: whole images "
            f"{res['raw_warm_2p']['rate']:.1f} img/s, ring window "
            f"{res['raw_warm_ring_window_2p']['rate']:.1f} img/s (what two workers' reads "
            "can get together)")
        res["disk_write"] = disk_write(a.workdir)
        log(f"  disk write, sustained (1 GiB + fdatasync, {a.workdir}): "
            f"{res['disk_write']['mb_per_s']:.0f} MB/s")
        if a.cold != "none":
            method = C.evict([path], a.cold)
            res["raw_cold"] = dict(raw_read(path, names), method=method)
            log(f"  cold ({method}): {res['raw_cold']['rate']:.1f} img/s "
                f"({res['raw_cold']['mb_per_s']:.0f} MB/s)")
            raw_read(path, names)  # warm again for what follows

    # -- 2. the tutorial
    if "tutorial" not in skip:
        log("\n[2] the tutorial's formulation, serial (warm)")
        res["tutorial"] = {}
        for band in bands:
            r0, r1 = C.BANDS[band]
            n = ntags[band]
            runs = [tutorial(path, run_number, tags[:n], bright[:n], r0, r1, mask)
                    for _ in range(a.repeat)]
            t = dict(min(runs, key=lambda r: r["seconds"]),
                     all_rates=[round(r["rate"], 2) for r in runs])
            res["tutorial"][band] = t
            log(f"  {band}: {t['rate']:.1f} img/s (nq {t['nq']} x nphi {t['nphi']}, "
                f"{t['pairs']} pairs; {t['cpu_ms_per_img']:.1f} CPU ms/img; runs {t['all_rates']})")

    # -- 3. sacla_dask end to end
    pipe: list[dict] = []
    res["pipeline"] = pipe
    res["startup"] = {}
    if "pipeline" not in skip or "codecs" not in skip:
        log("\n[3] sacla_dask end to end (open_run + plan_run + execute), warm")
        for nw in workers:
            with cluster(nw) as cl:
                res["startup"][nw] = cl["startup"]
                wu = warm_up(cl, path, mask, a.workdir, bands, n=8 if a.quick else 16)
                log(f"  LocalCluster of {nw} worker(s): started in {cl['startup']:.1f} s, "
                    f"warm-up run {wu:.1f} s (neither is in the figures)")
                variants = [(b, sp, True) for b in bands for sp in (True, False)]
                if a.exact_nphi:  # the wide band's one pixel of arc (6912) is FFT-friendly
                    variants += [("ring", sp, False) for sp in (True, False) if "ring" in bands]
                if "pipeline" not in skip:
                    for band, sp, fast in variants:
                        rr = []
                        paired = []  # the ring's baseline: the raw read just before each run
                        for i in range(a.repeat):
                            tag = f"{band}{'' if fast else '-exact'}-{nw}w-sp{int(sp)}"
                            prof = (os.path.join(prof_dir, tag)
                                    if a.profile and nw == max(workers) and i == 0 else None)
                            if band == "ring":
                                paired.append(raw_read_synced(path, names))
                            rr.append(pipeline(cl, path, ntags[band], band, store_polar=sp,
                                               mask=mask, out=out, fast_nphi=fast,
                                               profile=prof))
                        r = best(rr)
                        r["profile"] = next((x["profile"] for x in rr if x.get("profile")), None)
                        r["raw_paired"] = max(paired) if paired else None
                        pipe.append(r)
                        log(f"  {nw}w {band:4s} store_polar={sp!s:5s}"
                            f"{'' if fast else ' exact_nphi'}: {r['rate']:6.1f} img/s "
                            f"(runs {r['all_rates']}; plan {r['plan_seconds']:.1f} s; "
                            f"{r['worker_cpu_ms_per_img']:.1f} worker CPU ms/img, "
                            f"{r['minor_faults_per_img']:.0f} faults/img; {r['tasks']} tasks; "
                            f"peak RSS {r['peak_rss_mib']} MiB; load {r['load']})"
                            + (f"; raw read just before each run {r['raw_paired']:.1f} img/s"
                               if r["raw_paired"] else ""))
                    if a.cold != "none" and "ring" in bands:
                        for sp in (True, False):
                            r = pipeline(cl, path, a.tags, "ring", store_polar=sp, mask=mask,
                                         out=out, cold=a.cold)
                            r["all_rates"] = [round(r["rate"], 2)]
                            pipe.append(r)
                            log(f"  {nw}w ring store_polar={sp!s:5s} COLD ({r['cold']}): "
                                f"{r['rate']:6.1f} img/s")
                        raw_read(path, names)
                if "codecs" not in skip and a.codecs and nw == max(workers):
                    res["codecs"] = []
                    for band in bands:
                        for codec in a.codecs.split(","):
                            r = best([pipeline(cl, path, ntags[band], band, store_polar=True,
                                               mask=mask, out=out, compression=codec)
                                      for _ in range(1)])
                            res["codecs"].append(r)
                            log(f"  codec {codec:4s} {band}: {r['rate']:6.1f} img/s, polar "
                                f"store {r['store_mib']:.0f} MiB "
                                f"({r['worker_cpu_ms_per_img']:.1f} CPU ms/img)")

    # -- 3b. steady state: the rate of a long run without the per-run fixed cost
    # the long run: STEADY_SPAN x N tags if the file has them and half the RAM holds them
    # (warm page cache); a longer span makes the marginal rate less sensitive to noise
    n_steady = min(STEADY_SPAN * a.tags, len(full),
                   int(0.5 * m["ram_gib"] * 2**30 / C.IMAGE_BYTES))
    if "steady" not in skip and "ring" in bands and n_steady >= 2 * a.tags:
        n1 = a.tags
        n2 = n_steady
        log(f"\n[3b] steady state, ring band, warm: marginal rate between {n1} and {n2} tags "
            "(the fixed cost per run cancels; the same tags per chunk for both; best of "
            f"{max(3, a.repeat)} interleaved runs each)")
        names2 = dataset_paths(run_number, full.tags[:n2])
        raw_read(path, names2)  # warm the page cache for every tag used
        res["raw_warm_steady"] = min((raw_read(path, names2) for _ in range(2)),
                                     key=lambda r: r["seconds"])
        log(f"  raw read_direct of the {n2} tags, warm: {res['raw_warm_steady']['rate']:.1f} "
            "img/s")
        per = default_tags_per_chunk(path, n2, "ring", mask)
        res["steady"] = steady_state(path, "ring", n1, n2, per, workers, mask, a, out,
                                     raw_names=names2)
        raw_read(path, names)

    # -- 3c. steady state of the wide band: 2 workers vs 1 without the per-run fixed cost
    n1w, n2w = ntags["wide"], 3 * ntags["wide"]
    if "steady" not in skip and "wide" in bands and not a.quick and n2w <= len(full):
        per = default_tags_per_chunk(path, n2w, "wide", mask)
        log(f"\n[3c] steady state, wide band, warm: marginal rate between {n1w} and {n2w} "
            f"tags (as [3b])")
        res["steady_wide"] = steady_state(path, "wide", n1w, n2w, per, workers, mask, a, out)

    # -- 4. memory in run length, graph size
    if "rss" not in skip:
        log(f"\n[4] worker peak RSS: {', '.join(map(str, rss_lengths))} tags (2 workers, a "
            "fresh cluster each)")
        res["rss"] = []
        for band, sp in (("ring", True),) + ((("wide", False),) if not a.quick else ()):
            if band not in bands:
                continue
            # the same tags per chunk for both lengths: the long run's default (a short
            # run's default chunks are smaller, at least chunks.min-chunks of them, which would
            # flatter it)
            per = default_tags_per_chunk(path, rss_long, band, mask)
            for n in sorted(set(rss_lengths[:-1] + [rss_long])):
                with cluster(max(workers)) as cl:
                    warm_up(cl, path, mask, a.workdir, [band], n=8 if a.quick else 16)
                    r = pipeline(cl, path, n, band, store_polar=sp, mask=mask, out=out,
                                 chunks=per)
                res["rss"].append(r)
                log(f"  {band} store_polar={sp}: {n} tags: peak RSS {r['peak_rss_mib']} MiB "
                    f"(chunk {r['chunk_mib']:.0f} MiB; {r['tasks']} tasks; {r['rate']:.1f} img/s)")
    if "graph" not in skip:
        gbands = ["ring"] if a.quick else bands
        log("\n[4b] tasks of the graph execute() submits for a 5050-tag run (2400x2400 "
            "layout, default chunks; built and counted, not run)")
        res["graph_5050"] = graph_tasks_5050(a.workdir, gbands, mask,
                                             (True,) if a.quick else (True, False))
        for k, v in res["graph_5050"].items():
            log(f"  {k}: {v['tasks']} tasks ({v['chunks']} chunks, {v['pairs']} pairs; "
                f"{v['kinds']})")
    if "fft" not in skip:
        res["fft"] = fft_lengths()
        log("\n[5] correlation FFT cost per pair (40 q rows, rfft + irfft, float64)")
        for f in res["fft"]:
            log(f"  nphi {f['nphi']:5d} ({f['factors']:>14s}) {f['lib']}: "
                f"{f['ms_per_pair']:.2f} ms")

    res["summary"] = summary(res, workers)
    res["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    res["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    fn = a.json or os.path.join(a.workdir, "results-" + res["started"].replace(":", "") + ".json")
    with open(fn, "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    md = markdown(res)
    with open(fn[:-5] + ".md", "w") as fh:
        fh.write(md)
    log(f"\nresults: {fn} (and as markdown tables for docs/benchmarks.md: {fn[:-5]}.md)")
    return res


def markdown(res: dict) -> str:
    """Every figure of a run as markdown tables (for docs/benchmarks.md)."""
    m = res["machine"]
    v = m["versions"]
    out = [f"Run {res['started']} .. {res.get('finished')}: `bench_pipeline.py "
           f"{' '.join(res['argv'])}`; {m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, "
           f"{m['disk']}; Linux {m['kernel']}; Python {m['python']}, "
           + ", ".join(f"{k} {x}" for k, x in v.items())
           + f". Load average at start {m['loadavg_at_start']}, at end "
             f"{res.get('loadavg_at_end')}.", ""]
    rows = []
    for key, label in (("raw_warm", "raw read_direct, warm"),
                       ("raw_warm_ring_window", "raw read_direct of the ring window, warm"),
                       ("raw_warm_ring_pixels",
                        "raw numpy gather of the ring band's pixels (pread of its rows), warm"),
                       ("raw_warm_2p", "raw read_direct, warm, 2 processes at once"),
                       ("raw_warm_ring_window_2p",
                        "raw read_direct of the ring window, warm, 2 processes at once"),
                       ("raw_cold", "raw read_direct, cold")):
        if key in res:
            r = res[key]
            rows.append([label + (f" ({r['method']})" if "method" in r else ""),
                         f"{r['rate']:.1f}", f"{r['mb_per_s']:.0f}", f"{r['cpu_ms_per_img']:.1f}"])
    for band, t in res.get("tutorial", {}).items():
        rows.append([f"tutorial, serial, {band} ({t['nq']} x {t['nphi']})", f"{t['rate']:.2f}",
                     "", f"{t['cpu_ms_per_img']:.1f}"])
    if rows:
        out += [C.table(rows, ["baseline", "img/s", "MB/s", "CPU ms/img"]), ""]
    pipe = res.get("pipeline", [])
    if pipe:
        rows = [[r["band"] + ("" if r.get("fast_nphi", True) else " exact_nphi"), r["tags"],
                 r["workers"], r["store_polar"],
                 ("cold " + r["cold"]) if r.get("cold") else "warm",
                 f"{r['rate']:.1f}", " ".join(map(str, r.get("all_rates", []))),
                 f"{r['plan_seconds']:.2f}", f"{r['worker_cpu_ms_per_img']:.1f}",
                 f"{r['minor_faults_per_img']:.0f}", r["tasks"], r["tags_per_chunk"],
                 "/".join(f"{x:.0f}" for x in r["peak_rss_mib"]), r["load"]]
                for r in pipe]
        out += ["sacla_dask end to end (open_run + plan_run + execute; best of the runs "
                "listed):", "",
                C.table(rows, ["band", "tags", "workers", "store_polar", "cache", "img/s", "runs",
                               "plan s", "worker CPU ms/img", "faults/img", "tasks",
                               "tags/chunk", "peak RSS MiB", "load"]), ""]
    st = res.get("startup")
    if st:
        out += ["LocalCluster start-up (not in any figure): "
                + ", ".join(f"{k} worker(s) {x:.1f} s" for k, x in st.items()), ""]
    if res.get("codecs"):
        rows = [[r["band"], r["compression"], f"{r['rate']:.1f}", f"{r['store_mib']:.0f}",
                 f"{r['worker_cpu_ms_per_img']:.1f}"] for r in res["codecs"]]
        out += ["Polar store codec (2 workers, store_polar=True):", "",
                C.table(rows, ["band", "codec", "img/s", "store MiB", "worker CPU ms/img"]), ""]
    if res.get("steady"):
        raw_s = res.get("raw_warm_steady", {}).get("rate", float("nan"))
        rows = [[x["workers"], x.get("store_polar", True), f"{x['tags'][0]} -> {x['tags'][1]}",
                 x["tags_per_chunk"], f"{x['seconds'][0]:.2f} / {x['seconds'][1]:.2f}",
                 f"{x['rate']:.1f}", f"{x['rate'] / raw_s:.2f}", f"{x['fixed_seconds']:.2f}"]
                for x in res["steady"]]
        out += [f"Steady state, ring band, warm (raw read_direct of the same "
                f"tags {raw_s:.1f} img/s):", "",
                C.table(rows, ["workers", "store_polar", "tags", "tags/chunk", "seconds",
                               "marginal img/s", "x raw", "fixed s per run"]), ""]
    if res.get("steady_wide"):
        rows = [[x["workers"], x["store_polar"], f"{x['tags'][0]} -> {x['tags'][1]}",
                 x["tags_per_chunk"], f"{x['seconds'][0]:.2f} / {x['seconds'][1]:.2f}",
                 f"{x['rate']:.1f}", f"{x['fixed_seconds']:.2f}"] for x in res["steady_wide"]]
        out += ["Steady state, wide band, warm:", "",
                C.table(rows, ["workers", "store_polar", "tags", "tags/chunk", "seconds",
                               "marginal img/s", "fixed s per run"]), ""]
    if res.get("rss"):
        rows = [[r["band"], r["store_polar"], r["tags"], f"{r['chunk_mib']:.0f}",
                 "/".join(f"{x:.0f}" for x in r["peak_rss_mib"]),
                 "/".join(f"{x:.0f}" for x in r["median_rss_mib"]), r["tasks"],
                 f"{r['rate']:.1f}", r["rss_hwm_exact"]] for r in res["rss"]]
        out += ["Worker RSS (2 workers, fresh cluster + warm-up each):", "",
                C.table(rows, ["band", "store_polar", "tags", "chunk MiB", "peak RSS MiB",
                               "median RSS MiB", "tasks", "img/s", "exact peak (VmHWM)"]), ""]
    if res.get("graph_5050"):
        rows = [[k, x["tasks"], x["chunks"], x["pairs"]] for k, x in res["graph_5050"].items()]
        out += ["Tasks submitted by execute() for 5050 tags:", "",
                C.table(rows, ["case", "tasks", "chunks", "pairs"]), ""]
    if res.get("fft"):
        rows = [[f["nphi"], f["factors"], f["lib"], f"{f['ms_per_pair']:.2f}"] for f in res["fft"]]
        out += ["Correlation FFT (rfft + irfft, 40 float64 rows) per pair:", "",
                C.table(rows, ["nphi", "factors", "library", "ms/pair"]), ""]
    for r in pipe:
        if r.get("profile") and r["profile"]["functions"]:
            out += [f"py-spy, {r['band']} {r['workers']}w store_polar={r['store_polar']} "
                    f"(share of the workers' task time, inclusive):", "",
                    C.table([[f"`{k}`", f"{x:.1f}%"] for k, x in r["profile"]["functions"]],
                            ["function", "share"]), ""]
    if res.get("summary"):
        out += ["Targets:", "", C.table([[r["figure"], r["value"], r["target"], r["verdict"],
                                          r["note"]] for r in res["summary"]],
                                         ["figure", "value", "target", "verdict", "note"]), ""]
    return "\n".join(out)


def _find(pipe: list[dict], **kw: Any) -> dict | None:
    for r in pipe:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def summary(res: dict, workers: list[int]) -> list[dict]:
    """Ratios against the targets; printed as a table."""
    rows: list[dict] = []
    pipe = res.get("pipeline", [])
    nw = max(workers)

    def add(name: str, value: float | None, target: float | None, le: bool = False,
            note: str = "") -> None:
        ok = None if value is None or target is None else (
            value <= target if le else value >= target)
        rows.append({"figure": name, "value": None if value is None else round(value, 3),
                     "target": "-" if target is None else f"{'<=' if le else '>='} {target:g}",
                     "verdict": "info" if target is None else verdict(ok), "note": note})

    raw_w = res.get("raw_warm", {}).get("rate")
    raw_c = res.get("raw_cold", {}).get("rate")
    for sp in (True, False):
        r = _find(pipe, band="ring", workers=nw, store_polar=sp, cold=None, fast_nphi=True)
        if r and raw_w:
            add(f"ring {nw}w store_polar={sp} / raw warm", r["rate"] / raw_w,
                TARGETS["ring_vs_raw_warm"], note=f"{r['rate']:.1f} vs {raw_w:.1f} img/s")
        if r and r.get("raw_paired"):
            add(f"ring {nw}w store_polar={sp} / raw warm, paired", r["rate"] / r["raw_paired"],
                TARGETS["ring_vs_raw_warm"],
                note=f"{r['rate']:.1f} vs {r['raw_paired']:.1f} img/s (the raw read just "
                     "before each run: the same minutes)")
        raw_px = res.get("raw_warm_ring_pixels", {}).get("rate")
        if r and raw_px:
            add(f"ring {nw}w store_polar={sp} / raw gather of the band's pixels",
                r["rate"] / raw_px, None, note=f"{r['rate']:.1f} vs {raw_px:.1f} img/s (one "
                "process; the floor of a pixel reader)")
        rf = _find(pipe, band="ring", workers=nw, store_polar=sp, cold=None, fast_nphi=False)
        if rf and raw_w:
            add(f"ring exact_nphi {nw}w store_polar={sp} / raw warm", rf["rate"] / raw_w,
                TARGETS["ring_vs_raw_warm"], note=f"{rf['rate']:.1f} vs {raw_w:.1f} img/s "
                f"(nphi {rf['grid'][1]})")
        rc = next((x for x in pipe if x["band"] == "ring" and x["workers"] == nw
                   and x["store_polar"] == sp and x["cold"]), None)
        if rc and raw_c:
            add(f"ring {nw}w store_polar={sp} / raw cold", rc["rate"] / raw_c,
                TARGETS["ring_vs_raw_cold"], note=f"{rc['rate']:.1f} vs {raw_c:.1f} img/s")
    tut = res.get("tutorial", {})
    for band in ("ring", "wide"):
        for sp in (True, False):
            r = _find(pipe, band=band, workers=nw, store_polar=sp, cold=None, fast_nphi=True)
            if r and band in tut:
                tgt = TARGETS["wide_vs_tutorial"] if band == "wide" else None
                add(f"{band} {nw}w store_polar={sp} / tutorial", r["rate"] / tut[band]["rate"],
                    tgt, note=f"{r['rate']:.1f} vs {tut[band]['rate']:.1f} img/s")
    if len(workers) > 1:
        for band in ("ring", "wide"):
            for sp in (True, False):
                r2 = _find(pipe, band=band, workers=max(workers), store_polar=sp, cold=None,
                           fast_nphi=True)
                r1 = _find(pipe, band=band, workers=min(workers), store_polar=sp, cold=None,
                           fast_nphi=True)
                if r1 and r2:
                    add(f"{band} store_polar={sp}: {max(workers)}w / {min(workers)}w",
                        r2["rate"] / r1["rate"], TARGETS["scaling_2w_1w"],
                        note=f"{r2['rate']:.1f} vs {r1['rate']:.1f} img/s; CPU ms/img "
                             f"{r2['worker_cpu_ms_per_img']:.1f} vs "
                             f"{r1['worker_cpu_ms_per_img']:.1f}")
    def steady_ratios(band: str, sp: bool, steady: dict, base: str, base_rate: float | None,
                      target: Any) -> None:
        """The most workers' steady-state rate over ``base``, and over the fewest workers'."""
        if steady and base_rate:
            x = steady[max(steady)]
            add(f"{band} {x['workers']}w steady state store_polar={sp} / {base}",
                x["rate"] / base_rate, target,
                note=f"{x['rate']:.1f} vs {base_rate:.1f} img/s (marginal rate {x['tags'][0]} "
                     f"-> {x['tags'][1]} tags)")
        if steady and steady[max(steady)].get("raw_paired"):
            x = steady[max(steady)]
            add(f"{band} {x['workers']}w steady state store_polar={sp} / {base}, paired",
                x["rate"] / x["raw_paired"], target,
                note=f"{x['rate']:.1f} vs {x['raw_paired']:.1f} img/s (the raw read of the "
                     f"{x['tags'][1]} tags in the same rounds)")
        if len(steady) > 1:
            x2, x1 = steady[max(steady)], steady[min(steady)]
            add(f"{band} steady state store_polar={sp}: {x2['workers']}w / {x1['workers']}w",
                x2["rate"] / x1["rate"], TARGETS["scaling_2w_1w"],
                note=f"{x2['rate']:.1f} vs {x1['rate']:.1f} img/s")

    raw_s = res.get("raw_warm_steady", {}).get("rate")
    tut_wide = res.get("tutorial", {}).get("wide", {}).get("rate")
    disk = res.get("disk_write", {}).get("mb_per_s")
    for sp in (True, False):
        steady = {x["workers"]: x for x in res.get("steady", [])
                  if x.get("store_polar", True) == sp}
        steady_ratios("ring", sp, steady, "raw warm", raw_s, TARGETS["ring_vs_raw_warm"])
        if steady and sp and disk and steady[max(steady)].get("store_mb_per_tag"):
            x = steady[max(steady)]
            mb = x["store_mb_per_tag"]
            add(f"ring {x['workers']}w steady state store_polar=True: store write rate / disk",
                x["rate"] * mb / disk, None,
                note=f"{x['rate'] * mb:.0f} vs {disk:.0f} MB/s ({mb:.2f} MB per tag: the disk "
                     f"alone bounds a long run at {disk / mb:.0f} img/s)")
    for sp in (True, False):
        steady = {x["workers"]: x for x in res.get("steady_wide", []) if x["store_polar"] == sp}
        steady_ratios("wide", sp, steady, "tutorial", tut_wide, TARGETS["wide_vs_tutorial"])
    rss = res.get("rss", [])
    for band in ("ring", "wide"):
        rr = sorted([r for r in rss if r["band"] == band], key=lambda r: r["tags"])
        if len(rr) >= 2:
            s, lg = rr[0], rr[-1]
            for mid in rr[1:-1]:  # levelled off? (both runs several chunks long)
                add(f"{band} peak RSS {lg['tags']} / {mid['tags']} tags",
                    max(lg["peak_rss_mib"]) / max(mid["peak_rss_mib"]), None,
                    note=f"{max(lg['peak_rss_mib']):.0f} vs {max(mid['peak_rss_mib']):.0f} MiB; "
                         f"{lg['tags'] // lg['tags_per_chunk']} vs "
                         f"{mid['tags'] // mid['tags_per_chunk']} chunks")
            ratio = max(lg["peak_rss_mib"]) / max(s["peak_rss_mib"])
            med = max(lg["median_rss_mib"]) / max(s["median_rss_mib"])
            add(f"{band} peak RSS {lg['tags']} / {s['tags']} tags", ratio, TARGETS["rss_ratio"],
                le=True, note=f"{max(lg['peak_rss_mib']):.0f} vs {max(s['peak_rss_mib']):.0f} "
                              f"MiB; median RSS {max(lg['median_rss_mib']):.0f} vs "
                              f"{max(s['median_rss_mib']):.0f} MiB (ratio {med:.2f})")
            limit = 4 * lg["chunk_mib"] + 300
            add(f"{band} peak RSS ({lg['tags']} tags) MiB", max(lg["peak_rss_mib"]), limit,
                le=True, note=f"4 x chunk ({lg['chunk_mib']:.0f} MiB) + 300 MiB")
    for k, v in res.get("graph_5050", {}).items():
        add(f"tasks, 5050 tags, {k}", v["tasks"], TARGETS["graph_tasks_5050"], le=True)
    log("\nsummary (targets)")
    log(C.table([[r["figure"], r["value"], r["target"], r["verdict"], r["note"]] for r in rows],
                ["figure", "value", "target", "verdict", "note"]))
    return rows


if __name__ == "__main__":
    main()
