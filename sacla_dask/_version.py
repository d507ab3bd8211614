"""Package version (single source: pyproject.toml's version via importlib.metadata)."""

from __future__ import annotations

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("sacla_dask")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.1.0+unknown"
