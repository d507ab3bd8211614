"""Polar transform: detector image -> (q, phi) grid inside a q band.

The package owns the precomputed resampling operator that maps a detector
image (or the bounding-box window of it that the band touches) onto a polar
grid, the polar mask and per-bin coverage derived from the user's pixel
mask, the optional solid-angle and polarisation corrections, and the
per-row masked-mean normalisation. The numerical kernels
(:func:`apply_polar`, :func:`normalize_rows`) act on one numpy block of
images; :mod:`sacla_dask.graph` lifts them over tag chunks, the operator being one
graph key shipped once to each worker.

Modules
-------
:mod:`.grid`
    The (q, phi) grid of a band (its conventions) and the pixel-mask check.
:mod:`.corrections`
    Solid-angle and polarisation factors (pyFAI's conventions).
:mod:`.build`
    The operator's weights from geometry, grid and mask (the methods
    ``nearest``, ``bilinear`` and ``splitting``), and the reuse of
    operators alive.
:mod:`.operator`
    :class:`PolarOperator` (the columns it reads, its polar mask, one
    engine) and the kernels applying it to one image or a block.
:mod:`.sparse`, :mod:`.gather`
    The engines: a CSR matrix, or one pixel per bin applied as a gather.
:mod:`.normalize`
    :func:`normalize_rows`.
:mod:`.transform`
    :class:`PolarTransform`, the polar step of one band for users.
"""

from __future__ import annotations

from .build import METHODS, TILE, Method, build_operator
from .corrections import correction_factors
from .gather import GatherEngine
from .grid import PolarGrid, check_mask, make_grid
from .normalize import normalize_rows
from .operator import (
    PolarOperator,
    apply_polar,
    polar_from_columns,
    polar_from_gathered,
    polar_into,
)
from .sparse import SparseEngine
from .transform import PolarTransform

__all__ = [
    "METHODS",
    "TILE",
    "GatherEngine",
    "Method",
    "PolarGrid",
    "PolarOperator",
    "PolarTransform",
    "SparseEngine",
    "apply_polar",
    "build_operator",
    "check_mask",
    "correction_factors",
    "make_grid",
    "normalize_rows",
    "polar_from_columns",
    "polar_from_gathered",
    "polar_into",
]
