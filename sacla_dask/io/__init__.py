"""Reading SACLA DataConvert run files, and writing synthetic ones.

:mod:`~sacla_dask.io.run`
    The run: :func:`open_run`, :class:`Run` (tags, event data, dark and
    selected shots, lazy images), :func:`mean_wavelength`.
:mod:`~sacla_dask.io.hdf5`
    The HDF5 low level the run's tasks read images with: windows, the direct
    ``pread`` path for a band's pixels, compression codecs.
:mod:`~sacla_dask.io.synthetic`
    Synthetic runs in the DataConvert layout with known truth
    (:func:`write_synthetic_run`, described by :class:`Shots`,
    :class:`Detector`, :class:`Rings`, :class:`BraggSpots`, :class:`Storage`),
    and damaged files, for tests, demos and benchmarks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Names are imported on first use (PEP 562), as for the package itself: importing one
# module of sacla_dask.io (io.hdf5, say) does not import the reader's Dask and xarray.
_LAZY = {
    **dict.fromkeys(("DETECTOR", "BadTag", "Run", "TagSource", "mean_wavelength", "open_run"),
                    "run"),
    **dict.fromkeys(("COMPRESSIONS", "BraggSpots", "Detector", "Rings", "Shots", "Storage",
                     "Panels", "SyntheticTruth", "corrupt_tag", "panel_mask", "ring_image",
                     "truncate_file", "write_synthetic_run"), "synthetic"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .run import DETECTOR, BadTag, Run, TagSource, mean_wavelength, open_run
    from .synthetic import (
        COMPRESSIONS,
        BraggSpots,
        Detector,
        Panels,
        Rings,
        Shots,
        Storage,
        SyntheticTruth,
        corrupt_tag,
        panel_mask,
        ring_image,
        truncate_file,
        write_synthetic_run,
    )

__all__ = [
    "DETECTOR", "BadTag", "Run", "TagSource", "mean_wavelength", "open_run",
    "COMPRESSIONS", "Shots", "Detector", "Rings", "BraggSpots", "Storage", "SyntheticTruth",
    "Panels", "corrupt_tag", "panel_mask", "ring_image", "truncate_file", "write_synthetic_run",
]
