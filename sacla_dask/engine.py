"""Which engine runs a plan on one machine, and why.

A run's graph is the same whatever runs it; what differs is the fixed cost
and what can go in parallel:

``threads``
    Dask's threaded scheduler in this process: nothing to start, the polar
    operator is shared rather than shipped, and no process pays for its own
    imports. Parallel where the work releases the GIL: a contiguous,
    uncompressed detector dataset is read straight from the file
    (``os.pread``), and numpy's gathers and scipy's FFTs release the GIL.
``processes``
    A ``distributed.LocalCluster`` of single-threaded worker processes:
    worth its start-up when the work would serialise in one process
    (chunked or compressed data is decoded by HDF5 under one global lock
    per process), when ``--workers`` asks for it, or when a Dask
    performance report is wanted.
``scheduler`` / ``jobqueue``
    A running scheduler (``--scheduler``, ``--scheduler-file``) or a
    dask-jobqueue cluster: the CLI attaches to it; chosen by the user.

:func:`choose_engine` picks one from the options and the run's storage
(``engine="auto"``), or takes the one forced; :func:`engine_context` runs
the computation on it. Either engine writes the same store, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .errors import ParameterError

if TYPE_CHECKING:
    from .io.run import Run

ENGINES = ("auto", "threads", "processes")


@dataclasses.dataclass(frozen=True)
class Engine:
    """Where a computation runs.

    Attributes
    ----------
    kind : {"threads", "processes", "scheduler", "jobqueue"}
        See the module docstring.
    workers : int or None
        Threads (``threads``) or worker processes (``processes``); None
        where the cluster decides.
    reason : str
        Why this engine, in words for the user.
    """

    kind: str
    workers: int | None
    reason: str

    def __str__(self) -> str:
        what = {"threads": f"{self.workers} threads in this process",
                "processes": f"LocalCluster of {self.workers} worker processes",
                "scheduler": "a running Dask scheduler",
                "jobqueue": "a dask-jobqueue cluster"}[self.kind]
        return f"{self.kind} ({what}): {self.reason}"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def read_without_lock(paths: Sequence[str], datasets: Sequence[str]) -> bool:
    """Whether the first image of each file is stored so that threads read it in parallel.

    That is a contiguous, unfiltered dataset of native numbers that the
    direct reader takes from the file with ``os.pread`` (see
    :func:`sacla_dask.io.hdf5.read_pixels`), outside HDF5's global lock. A
    chunked or compressed dataset is decoded by HDF5 holding that lock.
    False when the setting ``read.direct`` (:mod:`sacla_dask.config`) is off.

    Parameters
    ----------
    paths : sequence of str
        The run's files.
    datasets : sequence of str
        For each file, the path of one detector image dataset in it.
    """
    import h5py

    from . import config
    from .io import hdf5

    if not config.get_bool("read.direct"):
        return False
    for path, name in zip(paths, datasets, strict=True):
        with h5py.File(path, "r") as fh:
            dsid = h5py.h5d.open(fh.id, name.encode())
            if hdf5._contiguous_region(dsid, os.path.getsize(path)) is None:
                return False
    return True


def choose_engine(run: Run, engine: str = "auto", *, workers: int | None = None,
                  scheduler: str | None = None, scheduler_file: str | None = None,
                  cluster: str = "local", report: bool = False) -> Engine:
    """The engine for running ``run``'s plan with the CLI's options.

    Parameters
    ----------
    run : Run
        The run to process (its storage decides ``auto``).
    engine : {"auto", "threads", "processes"}
        ``auto``: threads unless processes pay (see the module docstring);
        the others force one on this machine.
    workers : int, optional
        Worker processes (or threads with ``engine="threads"``); a number
        given with ``auto`` means processes.
    scheduler, scheduler_file, cluster
        A running scheduler or ``cluster="jobqueue"``: that engine, whatever
        ``engine`` says (``engine`` must then be ``auto``).
    report : bool
        A Dask performance report is wanted: it needs the distributed
        scheduler, so ``auto`` takes processes.
    """
    if engine not in ENGINES:
        raise ParameterError(f"--engine must be one of {ENGINES} (got {engine!r})")
    remote = scheduler or scheduler_file or cluster == "jobqueue"
    if remote:
        if engine != "auto":
            raise ParameterError(f"--engine {engine} runs on this machine: do not also give "
                                 "--scheduler, --scheduler-file or --cluster jobqueue")
        if scheduler or scheduler_file:
            return Engine("scheduler", None, "attached to the scheduler given")
        return Engine("jobqueue", None, "--cluster jobqueue")
    if workers is not None and workers < 1:
        raise ParameterError(f"--workers must be >= 1 (got {workers})")
    n = workers or usable_cores()
    if engine == "threads":
        if report:
            raise ParameterError("--report needs the distributed scheduler: use --engine "
                                 "processes (or auto)")
        return Engine("threads", n, "--engine threads")
    if engine == "processes":
        return Engine("processes", n, "--engine processes")
    if workers is not None:
        return Engine("processes", n, "--workers given")
    if report:
        return Engine("processes", n, "--report needs the distributed scheduler")
    if n == 1:
        return Engine("threads", 1, "one core: nothing to gain from worker processes")
    datasets = [next(s.dataset for s in run.sources if s.path == p) for p in run.paths]
    if read_without_lock(run.paths, datasets):
        return Engine("threads", n, "contiguous uncompressed images are read outside "
                                    "HDF5's lock, so threads run in parallel with no "
                                    "worker processes to start")
    return Engine("processes", n, "chunked or compressed images are decoded under HDF5's "
                                  "global lock: one process per core decodes in parallel")


def local_threads(workers: int | None = None) -> Any:
    """Dask's threaded scheduler in this process for the block (``with``), ``workers`` threads.

    The scheduler is given as its function, not its name: behind a name Dask
    looks for a distributed client, importing distributed (about a second)
    for nothing.
    """
    import dask
    import dask.threaded

    return dask.config.set(scheduler=dask.threaded.get, num_workers=workers)


@contextlib.contextmanager
def engine_context(engine: Engine, *, jobs: int | None = None, scheduler: str | None = None,
                   scheduler_file: str | None = None) -> Iterator[Any]:
    """Run the computations inside on ``engine``; yields the distributed client or None.

    ``threads`` sets Dask's threaded scheduler with ``engine.workers``
    threads for the block (nothing is started); the others open a client
    with :func:`sacla_dask.cluster.dask_client` and close what they started.
    """
    if engine.kind == "threads":
        with local_threads(engine.workers):
            yield None
        return
    from .cluster import dask_client

    if engine.kind == "processes":
        kw: dict[str, Any] = {"workers": engine.workers}
    elif engine.kind == "scheduler":
        kw = {"scheduler": scheduler, "scheduler_file": scheduler_file}
    else:
        kw = {"cluster": "jobqueue", "jobs": jobs}
    with dask_client(**kw) as client:
        yield client
