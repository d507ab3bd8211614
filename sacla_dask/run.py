"""Former home of the run reader, now :mod:`sacla_dask.io.run` and :mod:`sacla_dask.io.hdf5`.

Re-exports the names other modules import from here, so that they work
unchanged until their imports point at :mod:`sacla_dask.io`; then this module
goes.

The readers and switches of :mod:`sacla_dask.io.hdf5` (``_read_block``,
``read_pixels``, ``_contiguous_region``, ``DIRECT_READ``, ``READ_STRATEGY``)
are not copied here: each access looks them up in that module (module
``__getattr__``), so ``run.read_pixels(...)`` calls whatever it holds at the
time, e.g. a test's or a worker preload's wrapper.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .chunking import parse_chunk_size
from .io import hdf5 as _hdf5
from .io.hdf5 import OnBadTag, ReadStrategy
from .io.run import (
    DETECTOR,
    EVENT_ALIASES,
    STATUS_VARIABLES,
    BadTag,
    Run,
    TagSource,
    mean_wavelength,
    open_run,
)

if TYPE_CHECKING:
    from .io.hdf5 import (  # noqa: F401
        DIRECT_READ,
        READ_STRATEGY,
        _contiguous_region,
        _read_block,
        read_pixels,
    )

#: names looked up in :mod:`sacla_dask.io.hdf5` at each access
_FROM_HDF5 = ("_read_block", "read_pixels", "_contiguous_region", "DIRECT_READ",
              "READ_STRATEGY")


def __getattr__(name: str) -> Any:
    if name in _FROM_HDF5:
        return getattr(_hdf5, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Run", "TagSource", "BadTag", "open_run", "parse_chunk_size", "mean_wavelength",
           "DETECTOR", "EVENT_ALIASES", "STATUS_VARIABLES", "OnBadTag", "ReadStrategy"]
