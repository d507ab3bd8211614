"""dask-jobqueue clusters (SLURM, PBS) configured from dask's config.

This module owns building a dask-jobqueue cluster object from the
``jobqueue`` section of dask's configuration (``~/.config/dask/jobqueue.yaml``
or ``DASK_CONFIG``; ``deploy/`` has SLURM and PBS examples), so that the
same ``sacla-dask process --cluster jobqueue`` works at any facility.
(Replacing worker jobs that end early is :func:`sacla_dask.cluster.dask_client`'s
job, every ``sacla_dask.jobqueue.replace-interval``.)
"""

from __future__ import annotations

from typing import Any

import dask

from . import config
from .errors import ParameterError

SYSTEMS = ("slurm", "pbs")


def jobqueue_cluster(system: str | None = None, **kwargs: Any) -> Any:
    """A dask-jobqueue cluster for ``system`` ("slurm" or "pbs").

    ``system`` defaults to the setting ``sacla_dask.jobqueue.system``
    (:mod:`sacla_dask.config`), else the first of ``jobqueue.slurm`` /
    ``jobqueue.pbs`` that has a ``cores`` setting. Keyword arguments
    override the config.
    """
    try:
        import dask_jobqueue
    except ImportError:
        raise ParameterError("--cluster jobqueue needs dask-jobqueue: pip install "
                             "'sacla_dask[hpc]'") from None
    system = system or config.get("jobqueue.system")
    if system is None:
        for s in SYSTEMS:
            if dask.config.get(f"jobqueue.{s}.cores", None):
                system = s
                break
    if system not in SYSTEMS:
        raise ParameterError(
            "no dask-jobqueue configuration found: set jobqueue.slurm or jobqueue.pbs "
            "(cores, memory, queue...) in dask's config; see deploy/README.md"
        )
    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[system]
    return cls(**kwargs)
