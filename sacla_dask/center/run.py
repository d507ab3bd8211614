"""Beam centre of a run: what ``sacla-dask center`` does, as one call.

:func:`center_run` opens the run file(s), averages at most ``max_shots``
bright shots spread evenly over the run (:func:`mean_image`, on a Dask
scheduler), fits the centre both ways from the same start
(:func:`~sacla_dask.center.find_center`), and gathers the rest of the
geometry (pixel size from the file, wavelength from the photon energy).
The :class:`CenterResult` it returns holds everything to report, and
writes the geometry file that ``sacla-dask process --geometry`` reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import h5py
import numpy as np

from ..errors import OutputError, ParameterError
from ..geometry import Geometry, write_geometry_file
from ..io.run import Run, mean_wavelength, open_run
from ..plan import load_mask
from ._common import Guess, _check_guess
from .circle import CenterFit
from .find import CenterComparison, find_center
from .sharpness import SharpnessFit

__all__ = ["BrightMean", "CenterResult", "center_run", "mean_image", "spread_evenly"]

PathLike = str | os.PathLike[str]


# -- mean of the bright shots ------------------------------------------------------------
def mean_image(
    images: Any,
    bright: np.ndarray | Sequence[bool] | None = None,
    *,
    split_every: int | None = None,
) -> np.ndarray:
    """Mean detector image over (the bright) shots, computed with Dask.

    Parameters
    ----------
    images : dask.array.Array (ntag, ny, nx), or anything ``dask.array.asarray`` takes
        Lazy stack of detector images.
    bright : ndarray of bool (ntag,), optional
        Selector of the shots to average (e.g. the bright shots); all when
        None.
    split_every : int, optional
        Fan-in of the tree reduction over the tag axis (Dask's default when
        None).

    Returns
    -------
    ndarray float64 (ny, nx)
        Mean image, computed on whatever Dask scheduler is active.

    Raises
    ------
    ParameterError
        If ``images`` is not 3-D or ``bright`` does not match it or selects
        nothing.
    """
    import dask.array as da

    arr = images if isinstance(images, da.Array) else da.asarray(images)
    if arr.ndim != 3:
        raise ParameterError(f"images must be a (tag, y, x) stack (got shape {arr.shape})")
    if bright is not None:
        sel = np.asarray(bright)
        if sel.dtype != bool or sel.shape != (arr.shape[0],):
            raise ParameterError(
                f"bright must be a boolean array of shape ({arr.shape[0]},) selecting tags "
                f"(got dtype {sel.dtype}, shape {sel.shape})"
            )
        if not sel.any():
            raise ParameterError("bright selects no shot: cannot average zero images")
        arr = arr[sel]
    elif arr.shape[0] == 0:
        raise ParameterError("images holds no shot: cannot average zero images")
    mean = arr.mean(axis=0, dtype=np.float64, split_every=split_every)
    return np.asarray(mean.compute())


def spread_evenly(index: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` entries of ``index``, evenly spread from its first to its last.

    Used to pick the shots to average so that they sample the whole run
    (drifts in beam position or intensity), not only its start.
    """
    if index.size <= n:
        return index
    return index[np.unique(np.round(np.linspace(0, index.size - 1, n)).astype(int))]


@dataclasses.dataclass(eq=False, repr=False)
class BrightMean:
    """The mean image of a run's bright shots, the image the centre is fitted to.

    Attributes
    ----------
    image : ndarray float64 (ny, nx)
        Mean of the shots averaged, in detector units.
    run : Run
        The run as opened (all tags).
    shots : Run
        The shots averaged: a selection of ``run``.
    n_shots : int
        Number of shots averaged.
    n_bright : int
        Bright shots in the run, of which ``n_shots`` were averaged.
    seconds : float
        Wall time of the averaging, including starting the scheduler.
    """

    image: np.ndarray
    run: Run
    shots: Run
    n_shots: int
    n_bright: int
    seconds: float

    @property
    def tags(self) -> np.ndarray:
        """SACLA tags of the shots averaged."""
        return self.shots.tags

    def __repr__(self) -> str:
        ny, nx = self.image.shape
        return (f"BrightMean({self.n_shots} of {self.n_bright} bright shots of run "
                f"{', '.join(map(str, self.run.runs))}: {ny} x {nx} px)")


def _mean_of_bright_shots(
    run: Run, paths: Sequence[str], max_shots: int,
    compute_context: Callable[[], contextlib.AbstractContextManager[Any]] | None,
) -> BrightMean:
    """Average at most ``max_shots`` bright shots of ``run`` (opened from ``paths``)."""
    bright = np.nonzero(run.bright)[0]
    if bright.size == 0:
        raise ParameterError(f"no bright shot in {', '.join(paths)} ({len(run)} tags, all "
                             "dark): nothing to fit a ring to")
    use = spread_evenly(bright, max_shots)
    keep = np.zeros(len(run), dtype=bool)
    keep[use] = True
    shots = run.select(keep)
    t0 = time.perf_counter()
    with (compute_context or contextlib.nullcontext)():
        image = mean_image(shots.images())
    return BrightMean(image=image, run=run, shots=shots, n_shots=int(use.size),
                      n_bright=int(bright.size), seconds=time.perf_counter() - t0)


# -- the rest of the geometry -----------------------------------------------------------
def _file_pixel_size(run: Run) -> float | None:
    """Pixel size in metres from the first file's detector_info (None if absent or not square)."""
    src = run.sources[0]
    key = "pixel_size_in_micro_meter"
    try:
        with h5py.File(src.path, "r") as fh:
            grp = fh.get(src.dataset.rsplit("/", 2)[0] + "/detector_info")
            value: Any = grp[key][()] if grp is not None and key in grp else []
    except (OSError, KeyError):
        return None
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    px = np.unique(np.atleast_1d(np.asarray(value, dtype=float)))
    if px.size != 1 or not np.isfinite(px[0]) or px[0] <= 0:
        return None
    return float(px[0]) * 1e-6


# -- the run's centre ---------------------------------------------------------------------
@dataclasses.dataclass(eq=False, repr=False)
class CenterResult:
    """Beam centre of a run (:func:`center_run`) and the geometry to write.

    Attributes
    ----------
    mean : BrightMean
        The mean bright image the centre was fitted to, and its shots.
    mask : ndarray of bool (ny, nx) or None
        Good pixels used (True = good).
    fit : CenterComparison
        Circle fit (adopted) and sharpness refinement, with their
        disagreement in pixels.
    pixel_size : float or None
        Metres: as given, else from the file's detector_info.
    distance : float or None
        Sample-detector distance in metres, as given.
    wavelength : float or None
        Angstrom: as given, else from the averaged shots' photon energy.
    wavelength_error : str or None
        Why no wavelength could be derived, when it could not.
    paths : tuple of str
        The run files, as given.
    mask_path : str or None
        Absolute path of the mask file, when the mask was given as a path.
    """

    mean: BrightMean
    mask: np.ndarray | None
    fit: CenterComparison
    pixel_size: float | None
    distance: float | None
    wavelength: float | None
    wavelength_error: str | None
    paths: tuple[str, ...]
    mask_path: str | None
    #: with a CrystFEL ``.geom``: the panels drawn on a lab grid (:mod:`.panels`), where
    #: the centre is fitted; ``panels.beam_offset(centre)`` is the beam in the .geom's frame
    panels: Any = None

    @property
    def circle(self) -> CenterFit:
        """The adopted result: the circle fit."""
        return self.fit.circle

    @property
    def sharpness(self) -> SharpnessFit | None:
        """The sharpness refinement, None if it failed."""
        return self.fit.sharpness

    @property
    def geometry(self) -> Geometry | None:
        """Geometry at the fitted centre; None without pixel size, distance or wavelength."""
        if self.pixel_size is None or self.distance is None or self.wavelength is None:
            return None
        c = self.circle
        return Geometry(c.center_x, c.center_y, self.pixel_size, self.distance, self.wavelength)

    @property
    def q_ring(self) -> float | None:
        """Momentum transfer of the fitted ring in 1/Angstrom (None without a geometry)."""
        g = self.geometry
        return None if g is None else float(g.radius_to_q(self.circle.radius))

    @property
    def missing_geometry(self) -> list[str]:
        """Names of ``pixel_size``, ``distance``, ``wavelength`` that are not known."""
        return [k for k in ("pixel_size", "distance", "wavelength") if getattr(self, k) is None]

    def geometry_values(self) -> dict[str, Any]:
        """What the geometry file holds (None values are left out when written).

        ``center_x``, ``center_y``, ``radius`` (pixels), ``pixel_size``,
        ``distance`` (metres), ``wavelength`` (Angstrom), ``mask`` (path) --
        the names of the result store's attrs -- and ``fit``: the circle
        fit's 1-sigma uncertainties and ring FWHM (pixels), the sharpness
        centre and the disagreement (pixels), the shots averaged and the run
        files.
        """
        c, s = self.circle, self.sharpness
        fit = {"sigma_center_x": c.sigma_x, "sigma_center_y": c.sigma_y,
               "sigma_radius": c.sigma_radius, "ring_fwhm": c.ring_fwhm,
               "sharpness_center_x": s.center_x if s is not None else None,
               "sharpness_center_y": s.center_y if s is not None else None,
               "disagreement_px": self.fit.disagreement_px if s is not None else None,
               "shots": int(self.mean.n_shots),
               "runs": [os.path.abspath(p) for p in self.paths]}
        values = {"center_x": c.center_x, "center_y": c.center_y, "pixel_size": self.pixel_size,
                  "distance": self.distance, "wavelength": self.wavelength,
                  "mask": self.mask_path, "radius": c.radius,
                  "fit": {k: (float(v) if isinstance(v, float) else v)
                          for k, v in fit.items() if v is not None}}
        return {k: (float(v) if isinstance(v, float) else v) for k, v in values.items()}

    def write_geometry(self, path: PathLike) -> None:
        """Write :meth:`geometry_values` as YAML to ``path``, atomically.

        Raises
        ------
        OutputError
            If the file cannot be written.
        """
        out = os.fspath(path)
        tmp = f"{out}.tmp-{os.getpid()}"
        try:
            write_geometry_file(tmp, self.geometry_values())
            os.replace(tmp, out)
        except OSError as exc:
            raise OutputError(f"cannot write the geometry file {out!r}: {exc}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    def __repr__(self) -> str:
        return f"CenterResult({self.mean!r}; {self.fit!r})"


def center_run(
    runs: PathLike | Sequence[PathLike],
    *,
    guess: Guess = None,
    mask: PathLike | np.ndarray | None = None,
    max_shots: int = 100,
    pixel_size: float | None = None,
    distance: float | None = None,
    wavelength: float | None = None,
    tolerance: float = 1.0,
    on_bad_tag: str = "fail",
    skip_first: int | None = None,
    compute_context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    on_mean: Callable[[BrightMean], None] | None = None,
    select: str | None = None,
    geom: PathLike | None = None,
) -> CenterResult:
    """Beam centre of a run from the mean of its bright shots, fitted two ways.

    Averages at most ``max_shots`` bright shots, evenly spread over the
    run(s), then runs :func:`~sacla_dask.center.find_center` on the mean:
    a robust circle (and ellipse) fit to the ring's peak positions and the
    centre that makes the ring sharpest, from the same start, with their
    disagreement. The circle fit is the adopted centre.

    Parameters
    ----------
    runs : path or list of paths
        SACLA run file(s) (see :func:`~sacla_dask.io.run.open_run`).
    guess : (x, y) or (x, y, r), optional
        Rough centre and ring radius in pixels; checked against the image
        before any image is read. Default: the intensity-weighted centre
        and the strongest ring about it.
    mask : path of a .npy file, or ndarray of bool (ny, nx), optional
        Good pixels (1 = good). A path is recorded in the geometry file.
    max_shots : int
        Most bright shots averaged.
    pixel_size : float, optional
        Metres; default the file's detector_info.
    distance : float, optional
        Sample-detector distance in metres (not in the run file).
    wavelength : float, optional
        Angstrom; default from the averaged shots' photon energy.
    tolerance : float
        Pixels: the two methods disagree above this distance.
    on_bad_tag : {"fail", "skip"}
        A damaged or missing tag image: stop, or leave it out.
    skip_first : int, optional
        Treat the first N exposures of each run as dark.
    select : str, optional
        Average only the bright shots whose event data satisfy this
        expression (:mod:`sacla_dask.shots.select`).
    compute_context : callable, optional
        Called to make the context manager the mean is computed in, e.g. one
        that starts a distributed client, or
        ``lambda: dask.config.set(scheduler="threads")``. Default: the
        active Dask scheduler.
    on_mean : callable, optional
        Called with the :class:`BrightMean` as soon as it is computed, before
        the (possibly failing) fit: lets a caller report the slow step.
    geom : path, optional
        A CrystFEL geometry of the run's panels (needed for an unassembled
        run): the mean is drawn on a lab grid (:mod:`.panels`) and fitted
        there (``guess`` in that grid's pixels); pixel size and distance
        default to the file's.

    Returns
    -------
    CenterResult

    Raises
    ------
    ParameterError
        If the run has no bright shot, or for a bad option.
    GeometryError
        If ``guess`` lies off the detector or its radius is impossible.
    MaskError
        If the mask cannot be read or does not match the images.
    NoRingFoundError
        If no significant powder ring is found.
    RunFileError, LayoutError, BadTagError
        From opening and reading the run files.
    """
    paths = (os.fspath(runs),) if isinstance(runs, (str, os.PathLike)) else tuple(
        os.fspath(p) for p in runs)
    run = open_run(list(paths), on_bad_tag=on_bad_tag,  # type: ignore[arg-type]
                   skip_first=skip_first)
    if select:
        from ..shots.select import select_by_events

        run = select_by_events(run, select)
        run = run._replace(events=run.events.assign(bright=run.events["selected"]))
    from ..crystfel import panel_layout_of_file

    layout = panel_layout_of_file(geom, run)  # (None: assembled, no .geom)
    if guess is not None and layout is None:  # fail before reading any image
        _check_guess(guess, run.image_shape)
    good = load_mask(mask, run.image_shape)
    mean = _mean_of_bright_shots(run, paths, max_shots, compute_context)
    view = None
    if layout is not None:
        from .panels import render

        lay, cg, bad = layout
        both = bad if good is None else good if bad is None else good & bad
        view = render(cg, lay, mean.image, both)
        mean = dataclasses.replace(mean, image=view.image)
        good = view.good
        if guess is not None:
            _check_guess(guess, view.image.shape)
        pixel_size = cg.pixel_size if pixel_size is None else pixel_size
        distance = cg.distance if distance is None else distance
        wavelength = cg.wavelength if wavelength is None else wavelength
    if on_mean is not None:
        on_mean(mean)
    fit = find_center(mean.image, good, guess, tolerance=tolerance)
    if pixel_size is None:
        pixel_size = _file_pixel_size(run)
    wavelength_error = None
    if wavelength is None:
        try:
            wavelength = mean_wavelength(mean.shots)
        except ParameterError as exc:
            wavelength_error = str(exc)
    mask_path = (os.path.abspath(os.fspath(mask)) if isinstance(mask, (str, os.PathLike))
                 and os.fspath(mask) else None)
    return CenterResult(mean=mean, mask=good, fit=fit, pixel_size=pixel_size,
                        distance=distance, wavelength=wavelength,
                        wavelength_error=wavelength_error, paths=paths, mask_path=mask_path,
                        panels=view)
