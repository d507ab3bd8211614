"""glibc's allocator policy in Dask worker processes.

Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which
also freezes glibc's mmap threshold at 128 KiB: every array over 128 KiB
is then a fresh ``mmap`` whose pages the kernel must zero (and, on a VM
with free page reporting, the host must back again) on first touch. A
polar task allocates the same large sizes image after image, so it pays
that again and again. :func:`tune_allocator` sets one of two policies,
and :func:`tune_worker_allocator` picks one for a task's polar images,
in a Dask worker only (a user's own process is left alone).

Two settings of Dask's configuration (:mod:`sacla_dask.config`) switch it:
``sacla_dask.worker.malloc-tune`` (false: glibc is never touched) and
``sacla_dask.worker.retain-image-bytes`` (the polar image size from which
workers keep freed memory for reuse).
"""

from __future__ import annotations

import sys

from . import config
from .errors import ParameterError

MODES = ("release", "retain")


class _Applied:
    """The policy :func:`tune_allocator` last set in this process (None: untouched)."""

    mode: str | None = None


_APPLIED = _Applied()


def applied_mode() -> str | None:
    """The policy set in this process by :func:`tune_allocator`, or None if never set."""
    return _APPLIED.mode


def allocator_mode(polar_shape: tuple[int, int]) -> str:
    """The policy for tasks making float32 polar images of ``polar_shape`` ``(nq, nphi)``.

    ``"retain"`` from ``sacla_dask.worker.retain-image-bytes`` bytes per
    image on (a wide band), else ``"release"`` (a ring band).
    """
    nq, nphi = polar_shape
    return "retain" if 4 * nq * nphi >= config.get_bytes("worker.retain-image-bytes") \
        else "release"


def tune_worker_allocator(polar_shape: tuple[int, int]) -> None:
    """:func:`tune_allocator` for a task's float32 polar images ``(nq, nphi)``, in a Dask
    worker only.

    Called by every polar task; does nothing once the policy is set, nor
    outside a Dask worker (a notebook with the threaded scheduler keeps its
    allocator as it is).
    """
    mode = allocator_mode(polar_shape)
    if _APPLIED.mode == mode or "distributed" not in sys.modules:
        return  # (a worker has distributed imported; this process need not import it)
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return
    tune_allocator(mode)


def tune_allocator(mode: str = "release") -> bool:
    """Set glibc's policy for large blocks in this process (a Dask worker).

    ``"release"`` (small polar images, e.g. the ring band)
        Allocations under 4 MiB come from the heap and are reused (up to
        32 MiB of free heap kept); larger ones (polar blocks) stay mmaps,
        returned to the OS when freed. A worker's memory follows what its
        tasks hold, with few fresh pages per image.
    ``"retain"`` (polar images of ``sacla_dask.worker.retain-image-bytes``
    or more, e.g. the wide band)
        Every allocation comes from the heap (``M_MMAP_MAX = 0``) and free
        memory is kept: a worker allocates the same large sizes task after
        task (polar images, partial sums, message buffers), which would
        otherwise be fresh pages each time. With one glibc arena
        (``sacla_dask.worker.env``: ``MALLOC_ARENA_MAX=1``) a wide-band
        worker then rarely faults in a page. Small images do not use it:
        it raises their workers' peak memory for no gain.

    Parameters
    ----------
    mode : {"release", "retain"}

    Returns
    -------
    bool
        Whether glibc accepted the settings (False off glibc or when the
        setting ``sacla_dask.worker.malloc-tune`` is false).
    """
    if mode not in MODES:
        raise ParameterError(f"allocator mode must be 'release' or 'retain' (got {mode!r})")
    _APPLIED.mode = mode
    if not config.get("worker.malloc-tune") or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4
        if mode == "retain":
            return bool(libc.mallopt(m_trim_threshold, 2**31 - 1)
                        and libc.mallopt(m_mmap_max, 0))
        ok = bool(libc.mallopt(m_mmap_max, 65536)  # glibc's default
                  and libc.mallopt(m_trim_threshold, 32 << 20)
                  and libc.mallopt(m_mmap_threshold, 4 << 20))
        libc.malloc_trim(0)  # what "retain" kept, if it was set before
        return ok
    except (OSError, AttributeError):  # not glibc
        return False


__all__ = ["MODES", "allocator_mode", "applied_mode", "tune_allocator",
           "tune_worker_allocator"]
