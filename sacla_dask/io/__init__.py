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

from .run import DETECTOR, BadTag, Run, TagSource, mean_wavelength, open_run
from .synthetic import (
    COMPRESSIONS,
    BraggSpots,
    Detector,
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
    "corrupt_tag", "panel_mask", "ring_image", "truncate_file", "write_synthetic_run",
]
