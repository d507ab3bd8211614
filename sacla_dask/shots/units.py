"""Detector units to photons per pixel.

A SACLA DataConvert file records each detector's gain as
``/run_N/detector_2d_assembled_1/detector_info/absolute_gain``. It is
read here as the detector's conversion gain in electrons per detector unit
(e-/ADU, the usual meaning of a CCD's "system gain"). An X-ray photon of
energy ``E`` absorbed in the MPCCD's silicon sensor frees ``E / w``
electron-hole pairs, ``w = 3.65 eV`` per pair in silicon. So a pixel
holding ``S`` detector units saw

    photons = S * absolute_gain * w / E

with ``E`` the shot's photon energy (event_info ``photon_energy_in_eV``; a
tag without one uses the mean of the run). Where this comes from and what
could not be checked: ``docs/shots.md``.

``units="photons"`` (``--units photons``) multiplies each shot's row
means (``row_mean``, written with ``units: photon/pixel``) by its factor;
the normalised polar images and the correlations are ratios, the same in
either unit. :func:`to_photons` converts images themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import numpy as np
from dask.highlevelgraph import HighLevelGraph

from ..errors import ParameterError
from ..io.hdf5 import _open_h5
from ..io.run import DETECTOR, Run
from ..scheduling import chunk_first, pick_layer_name

if TYPE_CHECKING:
    from ..plan import ProcessingPlan

#: mean energy to make one electron-hole pair in silicon, eV
PAIR_ENERGY_EV = 3.65
#: where the gain is, under each run's group
GAIN_PATH = f"{DETECTOR}/detector_info/absolute_gain"
#: the ``units`` attr of ``row_mean`` in photons
PHOTON_UNITS = "photon/pixel"


def absolute_gains(run: Run) -> dict[tuple[str, int], float]:
    """``{(file, run number): absolute_gain}`` of every file and run of ``run``.

    Raises
    ------
    ParameterError
        Naming ``units``, when a file has no (or a bad) ``absolute_gain``.
    """
    out: dict[tuple[str, int], float] = {}
    for path, rn in sorted({(s.path, s.run) for s in run.sources}):
        where = f"/run_{rn}/{GAIN_PATH}"
        with _open_h5(path) as fh:
            if where not in fh:
                raise ParameterError(f"units='photons' needs the detector gain {where} but "
                                     f"{path!r} has none; process in detector units")
            g = np.asarray(fh[where][()], dtype=np.float64).ravel()
        if g.size != 1 or not np.isfinite(g[0]) or g[0] <= 0:
            raise ParameterError(f"units='photons': {path!r} {where} is {g.tolist()}, not one "
                                 "positive number")
        out[(path, rn)] = float(g[0])
    return out


def photon_factors(run: Run) -> np.ndarray:
    """Photons per detector unit of each tag, ``absolute_gain * w / E`` (float64)."""
    gains = absolute_gains(run)
    if "photon_energy" not in run.events:
        raise ParameterError(f"units='photons' needs each shot's photon energy, but the event "
                             f"data of {run.paths} has none")
    e = np.asarray(run.events["photon_energy"].values, dtype=np.float64)
    good = np.isfinite(e) & (e > 0)
    if not good.any():
        raise ParameterError(f"units='photons': no positive photon energy in {run.paths}")
    e = np.where(good, e, e[good].mean())
    g = np.array([gains[(s.path, s.run)] for s in run.sources])
    return g * PAIR_ENERGY_EV / e


def check_photon_units(run: Run) -> None:
    """Refuse ``units="photons"`` now, when planning, if the run cannot be converted."""
    photon_factors(run)


def photon_attrs(run: Run) -> dict[str, Any]:
    """The root attr ``units`` of a result in photons: the formula and its inputs."""
    gains = absolute_gains(run)
    return {"units": {"row_mean": PHOTON_UNITS,
                      "formula": "photons = detector units * absolute_gain * w / E",
                      "absolute_gain": sorted(set(gains.values())),
                      "absolute_gain_path": GAIN_PATH,
                      "absolute_gain_read_as": "electrons per detector unit",
                      "w_eV": PAIR_ENERGY_EV,
                      "E": "each shot's photon_energy (eV)"}}


def _scaled(parts: Any, i: int, factor: np.ndarray) -> np.ndarray:
    return np.asarray(parts[i]) * factor[:, None]


def photon_row_mean(plan: ProcessingPlan, parts: da.Array,
                    chunks: tuple[tuple[int, ...], ...]) -> da.Array:
    """The row means of the polar chunks ``parts`` (output 1), in photons per pixel.

    A layer of pick tasks (:func:`sacla_dask.scheduling.inline_picks` moves
    them into their consumers), each scaling its chunk's row means by its
    tags' factors.
    """
    factor = photon_factors(plan.run)
    bounds = np.cumsum((0,) + tuple(chunks[0]))
    name = pick_layer_name("polar-row-mean-photons", dask.base.tokenize(parts.name, factor))
    dsk = {(name, j, 0): (_scaled, (parts.name, j, 0, 0), 1, factor[bounds[j]:bounds[j + 1]])
           for j in range(len(chunks[0]))}
    with chunk_first():
        graph = HighLevelGraph.from_collections(name, dsk,  # type: ignore[arg-type]
                                                dependencies=[parts])  # type: ignore[list-item]
    return da.Array(graph, name, chunks, meta=np.empty((0, 0), np.float64))


def to_photons(images: da.Array, run: Run) -> da.Array:
    """Lazy images ``(tag, y, x)`` of ``run`` (:meth:`Run.images`) in photons per pixel."""
    f = da.from_array(photon_factors(run), chunks=(images.chunks[0],))
    return images * f[:, None, None]


__all__ = ["GAIN_PATH", "PAIR_ENERGY_EV", "PHOTON_UNITS", "absolute_gains",
           "check_photon_units", "photon_attrs", "photon_factors", "photon_row_mean",
           "to_photons"]
