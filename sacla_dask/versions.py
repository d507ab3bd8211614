"""``show_versions()``: the versions that matter in a bug report."""

from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

PACKAGES = ("sacla_dask", "numpy", "scipy", "dask", "distributed", "h5py", "hdf5plugin",
            "xarray", "zarr", "numcodecs", "matplotlib", "click", "dask-jobqueue", "pyFAI")


def versions() -> dict[str, str]:
    """Python, platform, HDF5 and package versions as a dict."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for p in PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    try:
        import h5py

        out["hdf5"] = h5py.version.hdf5_version
    except ImportError:  # pragma: no cover
        pass
    return out


def show_versions(file: SupportsWrite[str] | None = None) -> None:
    """Print the versions (for bug reports), to ``file`` (default: standard output)."""
    for k, v in versions().items():
        print(f"{k:>14}: {v}", file=file)
