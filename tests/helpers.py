"""Helpers shared by the tests (imported as ``from helpers import ...``: pytest puts
this directory on ``sys.path``, as for ``dask_procs``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import dask
from dask.local import get_sync


class CountingScheduler:
    """A Dask scheduler that counts the computes it runs and fails past ``max_computes``.

    Computes within the limit run with the synchronous scheduler.
    """

    def __init__(self, max_computes: int = 0) -> None:
        self.max_computes = max_computes
        self.total_computes = 0

    def __call__(self, dsk: Mapping[Any, Any], keys: Sequence[Any] | Any, **kwargs: Any) -> Any:
        self.total_computes += 1
        if self.total_computes > self.max_computes:
            raise AssertionError(
                f"a dask computation ran: {self.total_computes} computes, "
                f"at most {self.max_computes} allowed")
        return get_sync(dsk, keys, **kwargs)


@contextmanager
def raise_if_dask_computes(max_computes: int = 0) -> Iterator[CountingScheduler]:
    """Fail the test if Dask computes more than ``max_computes`` times in the block.

    The default, 0: nothing may compute (building a graph must stay lazy). The
    scheduler is yielded, so a test can also read ``total_computes``.
    (After flox's ``tests.raise_if_dask_computes``.) Only the default scheduler
    is replaced: a ``compute(scheduler=...)`` naming its own is not counted.
    """
    scheduler = CountingScheduler(max_computes)
    with dask.config.set(scheduler=scheduler):
        yield scheduler
