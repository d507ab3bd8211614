"""The per-shot table a result keeps when shots are selected, grouped or in photons.

Per tag, besides the run's event data (every event field, among them those
the selection and the grouping use) and ``selected``: ``shot_group`` (the
shot's group, -1 for none; with ``group_by``) and ``shot_intensity``, the
mean over the band of the shot's row means (``row_mean`` averaged over
``q``; in photons per pixel with ``units="photons"``), which
:func:`sacla_dask.plot.shot_quality` draws against the tag. Root attrs:
``groups`` (the grouping) and ``units`` (the photon conversion).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np

from ..scheduling import chunk_first

if TYPE_CHECKING:
    from ..graph import PolarArrays
    from ..plan import ProcessingPlan


def _band_mean(rmean: np.ndarray) -> np.ndarray:
    r = np.asarray(rmean, dtype=np.float64)
    n = np.isfinite(r).sum(axis=1)
    s = np.nansum(r, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, s / np.maximum(n, 1), np.nan)


def shot_table(plan: ProcessingPlan, pa: PolarArrays, data: dict[str, Any]) -> None:
    """Add ``shot_intensity`` (and the units of ``row_mean``) to the dataset's ``data``."""
    photons = plan.polar_spec.units == "photons"
    units = "photon/pixel" if photons else "detector units"
    with chunk_first():
        intensity = da.map_blocks(_band_mean, pa.row_mean, drop_axis=1, dtype=np.float64,
                                  meta=np.empty((0,), np.float64), token="shot-intensity")
    data["shot_intensity"] = (("tag",), intensity, {
        "units": units, "long_name": "mean intensity of the shot over the band (row_mean "
                                     "averaged over q)"})
    if photons:
        dims, values, attrs = data["row_mean"]
        data["row_mean"] = (dims, values, {**attrs, "units": units})


def shot_attrs(plan: ProcessingPlan) -> dict[str, Any]:
    """Root attrs of the grouping and the photon units (empty without them)."""
    out: dict[str, Any] = {}
    if plan.groups is not None:
        out["groups"] = plan.groups.describe()
    if plan.polar_spec.units == "photons":
        from .units import photon_attrs

        out.update(photon_attrs(plan.run))
    return out


__all__ = ["shot_attrs", "shot_table"]
