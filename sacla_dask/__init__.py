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

from typing import TYPE_CHECKING, Any

from ._version import __version__

# Names are imported on first use (PEP 562), so that ``import sacla_dask`` and the
# command line's ``--help`` do not pay for Dask, xarray, zarr and scipy up front.
_LAZY = {
    "find_center": "center", "fit_center": "center", "mean_image": "center",
    "refine_center_by_sharpness": "center",
    "BadTagError": "errors", "GeometryError": "errors", "IncompleteStoreError": "errors",
    "LayoutError": "errors", "MaskError": "errors", "NoRingFoundError": "errors",
    "OutputError": "errors", "PairingError": "errors", "ParameterError": "errors",
    "RunFileError": "errors", "SaclaDaskError": "errors",
    "Geometry": "geometry", "default_nphi": "geometry", "energy_to_wavelength": "geometry",
    "OutputSpec": "plan", "PairingSpec": "plan", "PolarSpec": "plan", "ProcessingPlan": "plan",
    "ShotSpec": "plan", "StatisticsSpec": "plan", "plan_run": "plan", "process_run": "plan",
    "GeometrySpec": "geometry",
    "PolarTransform": "polar",
    "Run": "io.run", "open_run": "io.run",
    "open_result": "store",
    "show_versions": "versions",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sacla_dask' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # the eager imports, for type checkers and IDEs
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
    from .geometry import Geometry, GeometrySpec, default_nphi, energy_to_wavelength
    from .io.run import Run, open_run
    from .plan import (
        OutputSpec,
        PairingSpec,
        PolarSpec,
        ProcessingPlan,
        ShotSpec,
        StatisticsSpec,
        plan_run,
        process_run,
    )
    from .polar import PolarTransform
    from .store import open_result
    from .versions import show_versions
