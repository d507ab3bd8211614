"""Former home of the synthetic run writer, now :mod:`sacla_dask.io.synthetic`.

Re-exports its names so that modules importing from here work unchanged
until their imports point at :mod:`sacla_dask.io`; then this module goes.
"""

from __future__ import annotations

from .io.run import DETECTOR
from .io.synthetic import (
    COMPRESSIONS,
    SyntheticTruth,
    corrupt_tag,
    panel_mask,
    ring_image,
    tag_dataset_path,
    truncate_file,
    write_synthetic_run,
)

__all__ = ["COMPRESSIONS", "DETECTOR", "SyntheticTruth", "corrupt_tag", "panel_mask",
           "ring_image", "tag_dataset_path", "truncate_file", "write_synthetic_run"]
