"""Where the work runs: a LocalCluster, a running scheduler, or dask-jobqueue.

This module owns turning the CLI's cluster options into a
``distributed.Client`` (as a context manager that closes what it started),
and nothing else: the library functions themselves never need a client and
use whatever scheduler is active.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import dask

from . import config
from .engine import usable_cores
from .errors import ParameterError

log = logging.getLogger(__name__)

CLUSTER_KINDS = ("local", "jobqueue")

# The settings read here (sacla_dask.config):
#
# worker.env: set in each worker process a LocalCluster starts, before it starts
# (``distributed.nanny.pre-spawn-environ``), unless this process's environment has
# the variable. MALLOC_ARENA_MAX=1: one glibc arena, so the task thread's large blocks
# come from the same heap as the rest and are reused rather than fragmenting
# per-thread arenas (docs/benchmarks.md). Batch jobs export it in their prologue
# (deploy/); workers you start yourself should too.
#
# worker.saturation: root tasks (a tag chunk's read) a scheduler this module starts
# hands a worker per thread (``distributed.scheduler.worker-saturation``; Dask's
# default 1.1 with one-thread workers queues a second read behind the running one, so
# a finished block's write and correlation wait behind the next read; 1.0 lowers the
# peak memory, docs/benchmarks.md). A scheduler you start yourself keeps its own
# setting (deploy/README.md).


def _scheduler_config() -> dict[str, Any]:
    """Dask config for a scheduler this module starts (LocalCluster, dask-jobqueue)."""
    return {"distributed.scheduler.worker-saturation": config.get("worker.saturation")}


def _worker_env() -> dict[str, str]:
    """The setting ``worker.env`` without the variables this process's environment sets
    (a user's own value wins), as strings."""
    env = config.get("worker.env") or {}
    return {str(k): str(v) for k, v in env.items() if k not in os.environ}


def _wait_for_file(path: str, timeout: str) -> None:
    """Wait for a scheduler file (a batch script may start the scheduler alongside).

    ``distributed.Client`` itself would wait for ever.
    """
    from dask.utils import parse_timedelta

    limit = time.monotonic() + (parse_timedelta(timeout) or 0)
    while not os.path.exists(path):
        if time.monotonic() > limit:
            raise ParameterError(f"scheduler file {path!r} does not exist (waited {timeout}); "
                                 "start the scheduler with `dask scheduler --scheduler-file "
                                 f"{path}`")
        time.sleep(0.1)


def _keep_jobs(cluster: Any, jobs: int) -> Any:
    """Resubmit batch jobs that end (walltime, pre-emption, ``scancel``, a dead node).

    dask-jobqueue forgets a job whose worker is gone (after dask's
    ``distributed.deploy.lost-worker-timeout``) but does not start another
    by itself; ``scale`` does, so call it every
    ``sacla_dask.jobqueue.replace-interval`` (:mod:`sacla_dask.config`) on the
    cluster's event loop. Returns the started ``tornado.ioloop.PeriodicCallback``.
    """
    from dask.utils import parse_timedelta
    from tornado.ioloop import PeriodicCallback

    interval = parse_timedelta(config.get("jobqueue.replace-interval"))

    def rescale() -> None:
        if len(cluster.workers) < len(cluster.worker_spec) or len(cluster.worker_spec) < jobs:
            log.warning("a batch job ended: submitting a replacement")
        cluster.scale(jobs=jobs)

    pc = PeriodicCallback(rescale, interval * 1000)
    cluster.loop.add_callback(pc.start)
    return pc


@contextlib.contextmanager
def dask_client(
    workers: int | None = None,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    cluster: str = "local",
    jobs: int | None = None,
    memory_limit: str | None = "auto",
    timeout: str = "30s",
) -> Iterator[Any]:
    """A distributed client for the given options; closes what it started.

    Parameters
    ----------
    workers : int, optional
        LocalCluster worker processes (one thread each: h5py serialises
        reads within a process). Default: the number of usable cores.
    scheduler : str, optional
        Address of a running scheduler, e.g. ``tcp://host:8786``.
    scheduler_file : str, optional
        A scheduler file written by ``dask scheduler --scheduler-file``.
    cluster : {"local", "jobqueue"}
        ``jobqueue``: a dask-jobqueue cluster configured in dask's config
        (``jobqueue.slurm`` or ``jobqueue.pbs``; see ``deploy/``), scaled to
        ``jobs`` jobs.
    jobs : int, optional
        Batch jobs to submit with ``cluster="jobqueue"`` (default 1).
    memory_limit : str, optional
        Per LocalCluster worker ("auto": the machine's memory shared out).
    timeout : str
        How long to wait for a running scheduler (or for its scheduler
        file to appear, as when a batch script starts it alongside).

    Yields
    ------
    distributed.Client
        Closed on exit, with the cluster this function started (never a
        scheduler it attached to).
    """
    from distributed import Client, LocalCluster

    if scheduler and scheduler_file:
        raise ParameterError("give either --scheduler or --scheduler-file, not both")
    if cluster not in CLUSTER_KINDS:
        raise ParameterError(f"cluster must be one of {CLUSTER_KINDS} (got {cluster!r})")
    if (scheduler or scheduler_file) and (cluster != "local" or workers is not None):
        raise ParameterError("--scheduler/--scheduler-file attach to a running scheduler: "
                             "do not also give --workers or --cluster")
    if jobs is not None and (cluster != "jobqueue" or jobs < 1):
        raise ParameterError(f"--jobs needs --cluster jobqueue and must be >= 1 (got {jobs})")
    if scheduler or scheduler_file:
        if scheduler_file:
            _wait_for_file(scheduler_file, timeout)
        try:
            client = Client(scheduler, scheduler_file=scheduler_file, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            where = scheduler or f"scheduler file {scheduler_file!r}"
            raise ParameterError(f"cannot reach the Dask scheduler at {where}: {exc}") from None
        try:
            yield client
        finally:
            client.close()
        return
    if cluster == "jobqueue":
        from .hpc import jobqueue_cluster

        with dask.config.set(_scheduler_config()):  # its scheduler runs here
            jq = jobqueue_cluster()
        n_jobs = jobs or 1
        jq.scale(jobs=n_jobs)
        log.info("submitted %d batch job(s):\n%s", n_jobs, jq.job_script())
        keeper = _keep_jobs(jq, n_jobs)
        client = Client(jq)
        try:
            yield client
        finally:
            jq.loop.add_callback(keeper.stop)
            client.close()
            jq.close()
        return
    n = usable_cores() if workers is None else workers
    if n < 1:
        raise ParameterError(f"--workers must be >= 1 (got {workers})")
    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    env.update(_worker_env())
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env, **_scheduler_config()}):
        lc = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                          memory_limit=memory_limit, dashboard_address="127.0.0.1:0")
    client = Client(lc)
    try:
        yield client
    finally:
        client.close()
        lc.close()
