"""Shared helpers for the benchmarks: machine facts, the synthetic run, cache
eviction, worker CPU / memory meters.

Nothing here is timed itself; the scripts in this folder import it. Files the
benchmarks write go to ``benchmarks/_work/`` (git-ignored) and are reused
across invocations.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, "_work")

#: the benchmark geometry (the tutorial's: 50 um pixels, 53 mm, 1.44 A)
SHAPE = (2400, 2400)
CENTER = (1200.0, 1200.0)
PIXEL = 50e-6
DISTANCE = 0.053
WAVELENGTH = 1.44
#: q bands by radius in pixels: the tutorial's ring and a wide band
BANDS = {"ring": (745.0, 785.0), "wide": (100.0, 1100.0)}
IMAGE_BYTES = SHAPE[0] * SHAPE[1] * 4


# -- machine -----------------------------------------------------------------
def machine_info(path: str = HERE) -> dict[str, Any]:
    """CPU, RAM, disk, OS and package versions, as plain values."""
    info: dict[str, Any] = {"nproc": os.cpu_count()}
    try:
        info["usable_cores"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        info["cpu"] = platform.processor()
    try:
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        pass
    du = shutil.disk_usage(path)
    info["disk"] = _disk_name(path)
    info["disk_free_gib"] = round(du.free / 2**30, 1)
    info["kernel"] = platform.release()
    info["python"] = sys.version.split()[0]
    vers = {}
    for mod in ("numpy", "scipy", "h5py", "hdf5plugin", "dask", "distributed", "zarr",
                "numcodecs", "xarray", "pyFAI", "sacla_dask"):
        try:
            vers[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - informative only
            vers[mod] = "-"
    try:
        import h5py

        vers["hdf5"] = h5py.version.hdf5_version
    except Exception:  # noqa: BLE001
        pass
    info["versions"] = vers
    info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _disk_name(path: str) -> str:
    """The block device under ``path`` and whether it is rotational."""
    try:
        dev = os.stat(path).st_dev
        major, minor = os.major(dev), os.minor(dev)
        sysdir = f"/sys/dev/block/{major}:{minor}"
        name = os.path.basename(os.path.realpath(sysdir))
        rot = "?"
        for cand in (f"{sysdir}/queue/rotational", f"{sysdir}/../queue/rotational"):
            if os.path.exists(cand):
                rot = "HDD" if open(cand).read().strip() == "1" else "SSD"
                break
        fs = "?"
        with open("/proc/mounts") as fh:
            best = ""
            for line in fh:
                parts = line.split()
                if path.startswith(parts[1]) and len(parts[1]) > len(best):
                    best, fs = parts[1], parts[2]
        virt = (" (virtio: a VM disk, 'rotational' flag meaningless)"
                if name.startswith("vd") else "")
        return f"/dev/{name} {fs}, kernel says {rot}{virt}"
    except OSError:
        return "?"


# -- the synthetic run ------------------------------------------------------
def run_file(workdir: str, n_tags: int) -> str:
    return os.path.join(workdir, f"run_{SHAPE[0]}x{SHAPE[1]}_{n_tags}tags.h5")


def _meta_path(h5: str) -> str:
    return h5 + ".json"


def find_run(workdir: str, n_tags: int) -> str | None:
    """An existing, completely written synthetic run with at least ``n_tags`` tags."""
    best = None
    if not os.path.isdir(workdir):
        return None
    for name in os.listdir(workdir):
        if not (name.endswith(".h5.json") and name.startswith(f"run_{SHAPE[0]}x{SHAPE[1]}_")):
            continue
        try:
            meta = json.load(open(os.path.join(workdir, name)))
        except (OSError, ValueError):
            continue
        h5 = os.path.join(workdir, name[:-5])
        if (meta.get("complete") and meta.get("n_tags", 0) >= n_tags and os.path.exists(h5)
                and os.path.getsize(h5) == meta.get("size")):
            if best is None or meta["n_tags"] < best[0]:
                best = (meta["n_tags"], h5)
    return best[1] if best else None


def ensure_run(workdir: str, n_tags: int, log=print) -> str:
    """Path of a synthetic 2400x2400 float32 run with >= ``n_tags`` tags (written if needed).

    Noise-free images (a background plus three modulated rings at 400, 765
    and 1000 px), uncompressed contiguous datasets as DataConvert writes
    them. A JSON side file marks a completely written file, so an
    interrupted write is never reused.
    """
    os.makedirs(workdir, exist_ok=True)
    found = find_run(workdir, n_tags)
    if found:
        return found
    need = n_tags * IMAGE_BYTES * 1.01 + 2**30
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise SystemExit(f"not enough disk space in {workdir}: need {need / 2**30:.1f} GiB "
                         f"for {n_tags} tags, {free / 2**30:.1f} GiB free")
    from sacla_dask.io.synthetic import write_synthetic_run

    path = run_file(workdir, n_tags)
    if os.path.exists(_meta_path(path)):
        os.remove(_meta_path(path))
    log(f"writing the synthetic run {path} ({n_tags} tags, "
        f"{n_tags * IMAGE_BYTES / 2**30:.1f} GiB)...")
    t = time.perf_counter()
    write_synthetic_run(path, n_tags=n_tags, n_dark=5, shape=SHAPE, center=CENTER,
                        ring_radii=(400.0, 765.0, 1000.0), ring_width=3.0,
                        pixel_size=PIXEL, distance=DISTANCE,
                        photon_energy=12398.419843320026 / WAVELENGTH, noise=False)
    dt = time.perf_counter() - t
    json.dump({"complete": True, "n_tags": n_tags, "size": os.path.getsize(path),
               "seconds": round(dt, 1)}, open(_meta_path(path), "w"))
    log(f"  written in {dt:.0f} s ({n_tags / dt:.1f} img/s)")
    return path


def ensure_layout_run(workdir: str, n_tags: int) -> str:
    """A DataConvert run of ``n_tags`` 2400x2400 float32 tags whose pixels were never
    written (HDF5 allocates a contiguous dataset's storage when it is first written: the
    file is a few MB): the run's layout, to build and count the graph of a long run of
    the real image size without reading or computing it."""
    import h5py

    from sacla_dask.io.run import DETECTOR

    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, f"layout_{SHAPE[0]}x{SHAPE[1]}_{n_tags}tags.h5")
    meta = _meta_path(path)
    if os.path.exists(meta) and os.path.exists(path):
        return path
    run = 1
    tags = np.arange(n_tags, dtype=np.int64) * 2 + 100000
    bright = np.ones(n_tags, dtype=np.int32)
    bright[:50] = 0  # dark shots, as in the synthetic runs
    with h5py.File(path, "w") as fh:
        fh["file_info/run_number_list"] = np.array([run], dtype=np.int64)
        g = fh.create_group(f"run_{run}")
        det = g.create_group(DETECTOR)
        det["detector_info/pixel_size_in_micro_meter"] = np.array([PIXEL * 1e6] * 2)
        ev = g.create_group("event_info")
        ev["tag_number_list"] = tags
        ev["bl_3/eh_1/xfel_pulse_selector_status"] = bright
        ev["bl_3/oh_2/photon_energy_in_eV"] = np.full(n_tags, 12398.419843320026 / WAVELENGTH)
        ev["bl_3/oh_2/bm_1_pulse_energy_in_joule"] = np.full(n_tags, 1e-3)
        ftype = h5py.h5t.py_create(np.dtype("<f4"))
        space = h5py.h5s.create_simple(SHAPE)
        for t in tags:
            gid = h5py.h5g.create(det.id, f"tag_{t}".encode())
            h5py.h5d.create(gid, b"detector_data", ftype, space)
    json.dump({"complete": True, "n_tags": n_tags, "size": os.path.getsize(path),
               "layout_only": True}, open(meta, "w"))
    return path


# -- page cache ----------------------------------------------------------------
def evict(paths: Iterable[str], method: str = "auto") -> str:
    """Drop ``paths`` from the page cache; return the method used.

    ``drop_caches`` (all clean pages of the machine: needs root and a
    writable /proc/sys) or ``fadvise`` (POSIX_FADV_DONTNEED on each file:
    only these files' clean pages). ``auto``: drop_caches if possible.
    """
    paths = list(paths)
    for p in paths:  # dirty pages cannot be dropped
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
    if method in ("auto", "drop_caches"):
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as fh:
                fh.write("3\n")
            return "drop_caches"
        except OSError:
            if method == "drop_caches":
                raise
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


# -- per-process meters ----------------------------------------------------------
def _stat(pid: int) -> tuple[float, float, int]:
    """(user s, system s, minor faults) of a process."""
    with open(f"/proc/{pid}/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(f[11]) / tck, int(f[12]) / tck, int(f[7])


def cpu_times(pids: Sequence[int]) -> np.ndarray:
    """Summed (user, system, minor faults) over ``pids``."""
    out = np.zeros(3)
    for p in pids:
        try:
            out += _stat(p)
        except OSError:
            pass
    return out


def _status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of a process (clear_refs 5)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5\n")
        return True
    except OSError:
        return False


@dataclass
class RSSMonitor:
    """Peak resident memory of some processes while a block runs.

    Uses the kernel's exact high-water mark (VmHWM, reset through
    /proc/PID/clear_refs when allowed) and, as a cross-check and fallback,
    polls VmRSS every ``interval`` seconds in a thread.
    """

    pids: Sequence[int]
    interval: float = 0.02
    polled: dict[int, int] = field(default_factory=dict)
    hwm: dict[int, int | None] = field(default_factory=dict)
    start_rss: dict[int, int] = field(default_factory=dict)
    hwm_reset: bool = False
    samples: dict[int, list[int]] = field(default_factory=dict)

    @contextlib.contextmanager
    def watch(self) -> Iterator[RSSMonitor]:
        self.hwm_reset = all(reset_peak_rss(p) for p in self.pids)
        self.start_rss = {p: _status_kib(p, "VmRSS") or 0 for p in self.pids}
        self.polled = dict(self.start_rss)
        self.samples = {p: [] for p in self.pids}
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                for p in self.pids:
                    v = _status_kib(p, "VmRSS")
                    if v is not None:
                        self.samples[p].append(v)
                        if v > self.polled.get(p, 0):
                            self.polled[p] = v
                stop.wait(self.interval)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        try:
            yield self
        finally:
            stop.set()
            th.join()
            self.hwm = {p: _status_kib(p, "VmHWM") for p in self.pids}

    def median_mib(self) -> dict[int, float]:
        """Median of the polled RSS per process in MiB (the typical, not the peak, size)."""
        return {p: float(np.median(v)) / 1024 if v else 0.0 for p, v in self.samples.items()}

    def peak_mib(self) -> dict[int, float]:
        """Peak RSS per process in MiB (VmHWM when it was reset, else polled)."""
        out = {}
        for p in self.pids:
            h = self.hwm.get(p)
            v = h if (self.hwm_reset and h) else self.polled.get(p, 0)
            out[p] = v / 1024
        return out


# -- profiling ---------------------------------------------------------------------
@contextlib.contextmanager
def py_spy(pids: Sequence[int], prefix: str, rate: int = 100) -> Iterator[list[str]]:
    """Record each process with ``py-spy record`` (if installed) into ``prefix-PID.txt``.

    Collapsed-stack ("raw") format: :func:`spy_summary` aggregates it, and
    flamegraph tools (inferno, flamegraph.pl, speedscope) draw it.
    """
    exe = shutil.which("py-spy")
    procs, outs = [], []
    if exe:
        for p in pids:
            out = f"{prefix}-{p}.txt"
            procs.append(subprocess.Popen([exe, "record", "--pid", str(p), "--rate", str(rate),
                                           "--nonblocking", "--format", "raw", "--output", out],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            outs.append(out)
        time.sleep(0.5)
    try:
        yield outs
    finally:
        import signal

        for pr in procs:
            pr.send_signal(signal.SIGINT)
        for pr in procs:
            try:
                pr.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pr.kill()


def spy_summary(files: Sequence[str], top: int = 18) -> list[tuple[str, float]]:
    """Share of task-thread samples in each function (inclusive), from py-spy raw files."""
    import collections

    total = 0
    incl: collections.Counter[str] = collections.Counter()
    for fn in files:
        if not os.path.exists(fn):
            continue
        for line in open(fn):
            line = line.rstrip()
            if not line or " " not in line:
                continue
            stack, n = line.rsplit(" ", 1)
            frames = stack.split(";")
            if not any("_run_task" in f for f in frames):
                continue  # not a task: the worker's event loop, heartbeats...
            total += int(n)
            seen = set()
            for f in frames:
                name, _, where = f.partition(" (")
                key = f"{name} ({where.split(':')[0]})" if where else name
                if key not in seen:
                    incl[key] += int(n)
                    seen.add(key)
    keep = ("sacla_dask/", "fft/_basic_backend.py", "zarr/core/array.py", "numcodecs/")
    return [(k, round(100 * v / total, 1)) for k, v in incl.most_common()
            if any(s in k for s in keep)][:top] if total else []


# -- printing -------------------------------------------------------------------
def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A GitHub-markdown table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([fmt(cells[0]), "|" + "|".join("-" * (x + 2) for x in w) + "|"]
                     + [fmt(r) for r in cells[1:]])
