"""sacla_dask: angular cross-correlation of SACLA XFEL runs, from a laptop to HPC.

The public API::

    run = open_run("run_178884.h5")                 # lazy: nothing read yet
    image = mean_image(run.images(), run.bright)     # mean bright shot (Dask)
    find_center(image, mask, guess=(1210, 1195, 480))  # circle fit vs ring sharpness
    plan = plan_run(run, qmin=2.64, qmax=2.71, center=(1200.3, 1199.7),
                    pixel_size=50e-6, distance=0.053, mask="mask.npy",
                    out="run_178884.zarr")
    plan                                             # what will be done
    ds = plan.execute()                              # any active Dask scheduler
"""

from __future__ import annotations

from ._version import __version__
from .center import find_center, fit_center, mean_image, refine_center_by_sharpness
from .errors import (
    BadTagError,
    GeometryError,
    IncompleteStoreError,
    LayoutError,
    MaskError,
    NoRingFoundError,
    OutputError,
    PairingError,
    ParameterError,
    RunFileError,
    SaclaDaskError,
)
from .geometry import Geometry, default_nphi, energy_to_wavelength
from .pipeline import ProcessingPlan, plan_run, process_run
from .polar import PolarTransform
from .run import Run, open_run
from .store import open_result
from .versions import show_versions

__all__ = [
    "__version__", "open_run", "Run", "Geometry", "PolarTransform", "plan_run", "process_run",
    "ProcessingPlan", "open_result", "default_nphi", "energy_to_wavelength", "show_versions",
    "SaclaDaskError", "RunFileError", "LayoutError", "BadTagError", "ParameterError",
    "GeometryError", "MaskError", "PairingError", "NoRingFoundError", "OutputError",
    "IncompleteStoreError", "fit_center", "find_center", "refine_center_by_sharpness",
    "mean_image",
]
