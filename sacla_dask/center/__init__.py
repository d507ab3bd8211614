"""Beam centre and ring geometry from a (mean) detector image.

The ``sacla-dask center`` numerics, one module per step:

* :mod:`~sacla_dask.center.profile` -- :func:`radial_profile` (masked mean
  intensity per radius bin, optionally with fractional bins so that it
  varies smoothly with the centre), :func:`initial_guess` (intensity-weighted
  centre and strongest ring), and the ring's peak in angular sectors.
* :mod:`~sacla_dask.center.circle` -- :func:`fit_center`, the main method: a
  robust circle (and ellipse) fit to the ring's sub-pixel peak positions in
  angular sectors, re-measured about the new centre until it stops moving.
* :mod:`~sacla_dask.center.sharpness` -- :func:`refine_center_by_sharpness`,
  an independent check: the centre that makes the ring highest above its
  baseline in the masked radial profile.
* :mod:`~sacla_dask.center.find` -- :func:`find_center`: both from the same
  start, and their disagreement in pixels.
* :mod:`~sacla_dask.center.run` -- :func:`mean_image` (mean of the bright
  shots with Dask) and :func:`center_run`, the centre of a run as the
  command line reports and writes it.
* :mod:`~sacla_dask.center.figure` -- :func:`center_figure`, its picture.

Conventions are those of :mod:`sacla_dask.geometry`: ``x`` is the fast
(column) axis, ``y`` the slow (row) axis, pixel centres at integer
coordinates, all lengths in pixels, angles in radians measured from +x toward
+y. Masks are True/1 = good pixel; non-finite pixel values are always treated
as masked.
"""

from __future__ import annotations

from .circle import CenterFit, EllipseFit, fit_center
from .figure import center_figure
from .find import CenterComparison, find_center
from .profile import initial_guess, radial_profile
from .run import BrightMean, CenterResult, center_run, mean_image, spread_evenly
from .sharpness import SharpnessFit, refine_center_by_sharpness

__all__ = [
    "BrightMean",
    "CenterComparison",
    "CenterFit",
    "CenterResult",
    "EllipseFit",
    "SharpnessFit",
    "center_figure",
    "center_run",
    "find_center",
    "fit_center",
    "initial_guess",
    "mean_image",
    "radial_profile",
    "refine_center_by_sharpness",
    "spread_evenly",
]
