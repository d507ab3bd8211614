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
from collections.abc import Iterator
from typing import Any

from .errors import ParameterError

log = logging.getLogger(__name__)

CLUSTER_KINDS = ("local", "jobqueue")


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


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

        jq = jobqueue_cluster()
        jq.scale(jobs=jobs or 1)
        log.info("submitted %d batch job(s):\n%s", jobs or 1, jq.job_script())
        client = Client(jq)
        try:
            yield client
        finally:
            client.close()
            jq.close()
        return
    n = _default_workers() if workers is None else workers
    if n < 1:
        raise ParameterError(f"--workers must be >= 1 (got {workers})")
    lc = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                      memory_limit=memory_limit, dashboard_address="127.0.0.1:0")
    client = Client(lc)
    try:
        yield client
    finally:
        client.close()
        lc.close()
