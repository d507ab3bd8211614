"""Former home of the run reader, now :mod:`sacla_dask.io.run` and :mod:`sacla_dask.io.hdf5`.

Re-exports the names other modules import from here, so that they work
unchanged until their imports point at :mod:`sacla_dask.io`; then this module
goes.

``_read_block`` and ``read_pixels`` are not copied here: each access looks
them up in :mod:`sacla_dask.io.hdf5` (module ``__getattr__``), so
``run.read_pixels(...)`` calls whatever that module holds at the time, e.g.
a test's or a worker preload's wrapper.
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
    from .io.hdf5 import _read_block, read_pixels  # noqa: F401

#: names looked up in :mod:`sacla_dask.io.hdf5` at each access
_FROM_HDF5 = ("_read_block", "read_pixels")


def __getattr__(name: str) -> Any:
    if name in _FROM_HDF5:
        return getattr(_hdf5, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Run", "TagSource", "BadTag", "open_run", "parse_chunk_size", "mean_wavelength",
           "DETECTOR", "EVENT_ALIASES", "STATUS_VARIABLES", "OnBadTag", "ReadStrategy"]
