"""What a run's processing will do, as plain immutable data, before it does it.

:func:`plan_run` opens (or takes) a run, selects its shots, builds the polar
transform, pairs the shots and sizes the tag chunks; nothing is read but
the run's metadata (and, for a similarity pairing, one pass over the band).
The result, :class:`ProcessingPlan`, is a frozen record: its repr is what
the user checks before hours of compute, and a changed plan is a new one
(:func:`dataclasses.replace`, :meth:`ProcessingPlan.with_engine`).

The options come in small frozen groups, each validated when made:
:class:`PolarSpec` (the polar grid), :class:`PairingSpec` (which shots are
compared), :class:`StatisticsSpec` (what is computed over pairs),
:class:`OutputSpec` (the store and the tag chunks) and :class:`ShotSpec`
(which shots of the run). The lazy graph is built from a plan by
:mod:`sacla_dask.graph`, labelled by :mod:`sacla_dask.dataset` and run by
:mod:`sacla_dask.execute`.
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import dask
import numpy as np

from .chunking import is_auto, tags_per_chunk
from .correlation import CorrelationPlan, make_plan, parse_q_pairs
from .engine import Engine
from .errors import MaskError, PairingError, ParameterError
from .geometry import Geometry, GeometrySpec
from .io.run import Run, mean_wavelength, open_run
from .pairs import PAIRINGS, consecutive_pairs, pair_indices, read_pairs_file, similar_pairs
from .polar import PolarTransform, check_mask

if TYPE_CHECKING:
    import dask.array as da
    import xarray as xr

    from .graph import PolarArrays
    from .shots.groups import ShotGroups

PathLike = str | os.PathLike[str]


# -- the options ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PolarSpec:
    """The polar grid of the band and its corrections.

    Attributes
    ----------
    qmin, qmax : float
        q band in inverse Angstrom.
    nphi, nq : int, optional
        Polar grid size (defaults: one pixel of arc at the outer radius,
        one bin per pixel of radius).
    method : {"nearest", "bilinear", "splitting"}
        Polar resampling (:mod:`sacla_dask.polar`): the nearest pixel,
        bilinear interpolation, or pixel splitting (area overlap).
    fast_nphi : bool
        Round the default nphi up to an FFT-friendly length (False: exactly
        one pixel of arc; an ``nphi`` given is used as it is).
    solid_angle : bool
        Divide by the pixels' relative solid angle (pyFAI's convention).
    polarization : float, optional
        Divide by the polarisation factor with this ``f`` in ``[-1, 1]``
        (pyFAI's ``polarization_factor``; horizontal = +x).
    mask : path or array, optional
        User pixel mask (``.npy``), 1/True = good. A plan holds a path made
        absolute.
    units : {"detector", "photons"}
        Units of ``row_mean``: the detector's, or photons per pixel from the
        detector's ``absolute_gain`` and each shot's photon energy
        (:mod:`sacla_dask.shots.units`; the normalised polar images and the
        correlations have no units).
    """

    qmin: float
    qmax: float
    nphi: int | None = None
    nq: int | None = None
    method: str = "nearest"
    fast_nphi: bool = True
    solid_angle: bool = False
    polarization: float | None = None
    mask: PathLike | np.ndarray | None = None
    units: str = "detector"

    def __post_init__(self) -> None:
        if self.units not in ("detector", "photons"):
            raise ParameterError(f"units must be 'detector' or 'photons' (got {self.units!r})")

    @property
    def mask_path(self) -> str | None:
        """The mask file, absolute (None for no mask or an array)."""
        m = self.mask
        return os.path.abspath(os.fspath(m)) if isinstance(m, (str, os.PathLike)) else None


@dataclasses.dataclass(frozen=True)
class PairingSpec:
    """Which shots are compared, and which q rows are cross-correlated.

    Attributes
    ----------
    pairs : path or (n, 2) array, optional
        Tag pairs (a JSON list of [tagA, tagB], the tutorial's format);
        pairs naming tags the run lacks are dropped and counted.
    pairing : {"consecutive", "intensity", "pulse_energy", "profile", "angular"}
        Without ``pairs``: consecutive bright shots, or shots that look
        alike (disjoint pairs nearest in the band's mean intensity, the
        pulse energy, the radial profile or the angular profile;
        :func:`sacla_dask.pairs.similar_pairs`). Except ``pulse_energy``,
        the similarity pairings read the band of every bright shot once
        more, when planning, to measure it.
    overlapping : bool
        Consecutive pairs overlap (t1,t2),(t2,t3) (default) or not.
    q_pairs : "auto"/"none", "all", "A:B,..." or (n, 2) int
        Cross-correlations besides the autocorrelations (always computed):
        none, every q1 <= q2, or the listed pairs of q row indices (or q
        values in 1/A with a decimal point); see
        :func:`sacla_dask.correlation.parse_q_pairs`. A plan holds them
        parsed (None, ``"all"`` or row indices).
    """

    pairs: PathLike | np.ndarray | None = None
    pairing: str = "consecutive"
    overlapping: bool = True
    q_pairs: Any = "auto"

    def __post_init__(self) -> None:
        if self.pairing not in PAIRINGS:
            raise ParameterError(f"pairing must be one of {PAIRINGS} (got {self.pairing!r})")
        if self.pairs is not None and self.pairing != "consecutive":
            raise ParameterError(f"give either pairs (a list of tag pairs) or "
                                 f"pairing={self.pairing!r}, not both")

    @property
    def kind(self) -> str:
        """The pairing as recorded: ``pairing``, or ``"file"``/``"list"`` for given pairs."""
        if self.pairs is None:
            return self.pairing
        return "file" if isinstance(self.pairs, (str, os.PathLike)) else "list"


@dataclasses.dataclass(frozen=True)
class StatisticsSpec:
    """What is computed over the pairs besides their mean correlation.

    Attributes
    ----------
    bragg : float, optional
        Mask polar bins more than this many robust sigmas (median/MAD of
        the row) above their row before correlating (Bragg spots); the
        mask normalisation is then that of each pair.
    reject_outliers : float, optional
        Leave out pairs whose mean squared difference is this many robust
        sigmas (of its log) above the median; recorded in ``pair_rejected``.
    bootstrap : int
        Poisson-bootstrap resamples for percentile intervals (0: none).
    ci_level : float
        Level of the bootstrap intervals, in (0, 1).
    keep_pairs : bool
        Keep every pair's correlation in the store (``corr_pairs``).
    """

    bragg: float | None = None
    reject_outliers: float | None = None
    bootstrap: int = 0
    ci_level: float = 0.95
    keep_pairs: bool = False

    def __post_init__(self) -> None:
        for name in ("bragg", "reject_outliers"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)
                                      and v > 0):
                raise ParameterError(f"{name} must be a positive number of robust sigmas "
                                     f"(got {v!r})")
        b = self.bootstrap
        if int(b) != b or b < 0:
            raise ParameterError(f"bootstrap must be a number of resamples >= 0 (got {b!r})")
        if not 0 < self.ci_level < 1:
            raise ParameterError(f"ci_level must lie in (0, 1) (got {self.ci_level!r})")
        object.__setattr__(self, "bootstrap", int(b))
        object.__setattr__(self, "ci_level", float(self.ci_level))
        object.__setattr__(self, "keep_pairs", bool(self.keep_pairs))


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """Where the result goes, what it keeps, and the tag chunks it is made in.

    Attributes
    ----------
    out : path, optional
        Zarr store to write (a plan holds it as a str).
    store_polar : bool
        Keep the per-tag polar images in the store (else correlation only).
    compression : {"lz4", "zstd", "none"}
        Codec of the polar images in the store.
    chunks : int or str
        Tags per task, bytes of polar images per task (``"128MiB"``), or
        ``"auto"`` (:func:`sacla_dask.chunking.tags_per_chunk`: 32 MiB of
        polar images, but at least 16 tags where a tenth of a worker
        thread's memory holds them; sizes and ``"auto"`` give at least 4
        tags per chunk and 8 chunks; the numbers are settings
        ``sacla_dask.chunks.*``). ``"auto"`` looks at the scheduler active
        when planning and again when the plan executes, where an unfinished
        store keeps the chunking it was started with. A task reads its tags
        one at a time, so it holds its block of polar images and one image
        window; the chunk is also the unit of resumption.
    """

    out: PathLike | None = None
    store_polar: bool = True
    compression: str = "lz4"
    chunks: int | str = "auto"

    def __post_init__(self) -> None:
        if self.out is not None:
            object.__setattr__(self, "out", os.fspath(self.out))


@dataclasses.dataclass(frozen=True)
class ShotSpec:
    """Which shots of the run are processed and paired.

    Attributes
    ----------
    tag_range : (first, last), optional
        Tags ``first..last`` only (SACLA tag numbers, inclusive).
    min_pulse_energy : float, optional
        Pair only shots with at least this pulse energy, joules.
    skip_first : int, optional
        The first N exposures of each run are dark (files without a
        pulse-selector status).
    drop_unselected : bool
        Leave unselected shots out instead of keeping them unpaired.
    on_bad_tag : {"fail", "skip"}
        A tag whose image is missing or damaged: stop with
        :class:`~sacla_dask.errors.BadTagError`, or go on without it
        (listed in the ``bad_tags`` attr; a tag found unreadable only while
        computing is left out of every pair and flagged in ``image_ok``).
    select : str, optional
        Pair only the shots whose event data satisfy this expression
        (``"laser_pulse_selector_status == 1 and 0.5 < delay_mm <= 2"``;
        :mod:`sacla_dask.shots.select`).
    group_by : str, optional
        Group the selected shots by this event field (its distinct values,
        or the bins ``group_bins``): pairs within each group, statistics of
        each group (:mod:`sacla_dask.shots.groups`).
    group_bins : sequence of float, optional
        Increasing bin edges of ``group_by`` (a continuous field).
    """

    tag_range: tuple[int, int] | None = None
    min_pulse_energy: float | None = None
    skip_first: int | None = None
    drop_unselected: bool = False
    on_bad_tag: str = "fail"
    select: str | None = None
    group_by: str | None = None
    group_bins: Sequence[float] | None = None

    def __post_init__(self) -> None:
        if self.select is not None:
            from .shots.select import parse_selection

            parse_selection(self.select)  # syntax checked now, the fields when planning
        if self.group_bins is not None:
            if self.group_by is None:
                raise ParameterError("group_bins needs group_by (the field to bin)")
            object.__setattr__(self, "group_bins", tuple(float(b) for b in self.group_bins))

    @property
    def selects(self) -> bool:
        """Whether any shot selection is asked for."""
        return bool(self.tag_range is not None or self.min_pulse_energy is not None
                    or self.skip_first or self.drop_unselected or self.select)

    def apply(self, run: Run) -> Run:
        """``run`` with this selection (:meth:`sacla_dask.io.run.Run.select_shots`)."""
        if not self.selects:
            return run
        run = run.select_shots(tag_range=self.tag_range,
                               min_pulse_energy=self.min_pulse_energy,
                               skip_first=self.skip_first,
                               drop_unselected=self.drop_unselected and not self.select)
        if self.select:
            from .shots.select import select_by_events

            run = select_by_events(run, self.select, drop_unselected=self.drop_unselected)
        return run


# -- the plan ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class ProcessingPlan:
    """Everything a run's processing will do, before it does it.

    Build it with :func:`plan_run`; look at it (``repr`` or, in a notebook,
    the HTML view); then :meth:`execute`. :meth:`dataset` gives the lazy
    result as an xarray Dataset for interactive use. The plan is immutable
    (compared by identity: it holds arrays); a changed plan is a new one.

    Attributes
    ----------
    run : Run
        The run, its shots selected.
    transform : PolarTransform
        The band's polar transform (geometry, grid, mask, operator).
    pairs : ndarray int64 (n, 2)
        The tag pairs asked for (before dropping those the run lacks).
    ia, ib : ndarray int64 (npair,)
        Positions on the tag axis of the pairs kept.
    n_pairs_dropped : int
        Pairs asked for but not kept (tags missing or not selected).
    tags_per_chunk : int
        Tags per task, the unit of the graph and of resumption.
    polar_spec, pairing_spec, statistics_spec, output_spec, shot_spec
        The options (:class:`PolarSpec` with the mask path absolute,
        :class:`PairingSpec` with ``q_pairs`` parsed, ...).
    engine : Engine, optional
        Where :meth:`execute` will run, when known
        (:func:`sacla_dask.engine.choose_engine`).
    groups : ShotGroups, optional
        The groups of shots (``group_by``), with each pair's group; the
        pairs are ordered group by group (:mod:`sacla_dask.shots.groups`).
    """

    run: Run
    transform: PolarTransform
    pairs: np.ndarray
    ia: np.ndarray
    ib: np.ndarray
    n_pairs_dropped: int
    tags_per_chunk: int
    polar_spec: PolarSpec
    pairing_spec: PairingSpec = PairingSpec()
    statistics_spec: StatisticsSpec = StatisticsSpec()
    output_spec: OutputSpec = OutputSpec()
    shot_spec: ShotSpec = ShotSpec()
    engine: Engine | None = None
    groups: ShotGroups | None = None

    # -- derived values ------------------------------------------------------
    @property
    def geometry(self) -> Geometry:
        return self.transform.geometry

    @property
    def n_tags(self) -> int:
        return len(self.run)

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_tags / self.tags_per_chunk)

    @property
    def auto_chunks(self) -> bool:
        """``tags_per_chunk`` came from ``chunks="auto"``: :meth:`execute` sizes it again
        for the workers that run it (:meth:`settle_chunks`)."""
        return is_auto(self.output_spec.chunks)

    @property
    def bytes_to_read(self) -> int:
        """Bytes of image windows the run's processing reads."""
        wy, wx = self.transform.operator.window_shape
        return self.n_tags * wy * wx * np.dtype(self.run.image_dtype).itemsize

    @property
    def polar_nbytes(self) -> int:
        """Bytes of the run's float32 polar images."""
        nq, nphi = self.transform.shape
        return self.n_tags * nq * nphi * 4

    # the options under their plan_run names
    @property
    def out(self) -> str | None:
        return None if self.output_spec.out is None else os.fspath(self.output_spec.out)

    @property
    def store_polar(self) -> bool:
        return self.output_spec.store_polar

    @property
    def compression(self) -> str:
        return self.output_spec.compression

    @property
    def mask_path(self) -> str | None:
        return self.polar_spec.mask_path

    @property
    def pairing(self) -> str:
        return self.pairing_spec.kind

    @property
    def q_pairs(self) -> Any:
        return self.pairing_spec.q_pairs

    @property
    def bragg(self) -> float | None:
        return self.statistics_spec.bragg

    @property
    def reject_outliers(self) -> float | None:
        return self.statistics_spec.reject_outliers

    @property
    def bootstrap(self) -> int:
        return self.statistics_spec.bootstrap

    @property
    def ci_level(self) -> float:
        return self.statistics_spec.ci_level

    @property
    def keep_pairs(self) -> bool:
        return self.statistics_spec.keep_pairs

    def correlation_plan(self) -> CorrelationPlan:
        """The correlation's rows and mask normalisation
        (:func:`sacla_dask.correlation.make_plan`)."""
        return make_plan(self.transform.polar_mask, self.q_pairs)

    # -- new plans -----------------------------------------------------------
    def with_engine(self, engine: Engine | None) -> ProcessingPlan:
        """This plan, to run on ``engine``."""
        return dataclasses.replace(self, engine=engine)

    def settle_chunks(self, overwrite: bool = False, resume: bool = True) -> ProcessingPlan:
        """This plan with ``chunks="auto"`` sized for the scheduler active now.

        See :func:`sacla_dask.execute.settle_chunks`.
        """
        from .execute import settle_chunks

        return settle_chunks(self, overwrite=overwrite, resume=resume)

    # -- description ---------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The plan as a dict of plain values (what the repr shows)."""
        t = self.run.tags
        g = self.geometry
        tr = self.transform
        nq, nphi = tr.shape
        ny, nx = self.run.image_shape
        wy, wx = tr.operator.window_shape
        return {
            "run": ",".join(map(str, self.run.runs)),
            "files": len(self.run.paths),
            "tags": (f"{self.n_tags} ({t[0]}..{t[-1]}), {int(self.run.bright.sum())} bright, "
                     f"{int(self.run.selected.sum())} selected"
                     + (f", {len(self.run.bad_tags)} bad left out" if self.run.bad_tags else "")),
            "pairs": (f"{self.ia.size} {self.pairing} ({self.n_pairs_dropped} dropped: tags "
                      "missing or not selected)"),
            **({"groups": "; ".join(f"{self.groups.label(g)}: "
                                    f"{int((self.groups.labels == g).sum())} shots, "
                                    f"{int((self.groups.pair_group == g).sum())} pairs"
                                    for g in range(self.groups.n))
                                  + (f"; {self.groups.n_pairs_across} listed pairs across "
                                     "groups dropped" if self.groups.n_pairs_across else "")}
               if self.groups is not None else {}),
            "correlation": self._correlation_summary(),
            "geometry": (f"centre ({g.center_x:.2f}, {g.center_y:.2f}) px, pixel "
                         f"{g.pixel_size * 1e6:g} um, distance {g.distance * 1e3:g} mm, "
                         f"wavelength {g.wavelength:.4f} A"
                         + (f", tilted: PONI centre, rot1..3 = {g.rot1:.4g}, {g.rot2:.4g}, "
                            f"{g.rot3:.4g} rad" if g.tilted else "")
                         + (f"; {len(lay.panels)} panels of {lay.source}"
                            if (lay := getattr(tr, "layout", None)) is not None else "")),
            "q band": (f"{tr.qmin:g}..{tr.qmax:g} 1/A "
                       f"(r = {tr.radius[0]:.1f}..{tr.radius[-1]:.1f} px)"),
            "polar grid": (f"{nq} q x {nphi} phi ({tr.method}"
                           + (f", {tr.operator.corrections}"
                              if tr.operator.corrections != "none" else "")
                           + (f"; one pixel of arc is {n1} phi, rounded up for the FFT"
                              if (n1 := tr.grid.nphi_default) != nphi else "")
                           + ")"),
            "read": (f"{wy}x{wx} window of {ny}x{nx} images: "
                     f"{dask.utils.format_bytes(self.bytes_to_read)}"),
            "chunks": f"{self.n_chunks} x {self.tags_per_chunk} tags"
                      + (" (auto: sized again for the workers that run it)"
                         if self.auto_chunks else ""),
            "operator": dask.utils.format_bytes(tr.operator.nbytes),
            **({"engine": str(self.engine)} if self.engine is not None else {}),
            "output": (f"{self.out or '(in memory)'}"
                       + (f", polar {dask.utils.format_bytes(self.polar_nbytes)} "
                          f"({self.compression})" if self.store_polar else ", correlation only")),
        }

    def _correlation_summary(self) -> str:
        a = self.correlation_attrs()
        st = self.statistics_spec
        parts = [f"autocorrelation + {self.correlation_plan().n_cross} cross q pairs"]
        if st.bragg:
            parts.append(f"Bragg spots > {st.bragg:g} sigma masked")
        if st.reject_outliers:
            parts.append(f"pairs > {st.reject_outliers:g} sigma rejected")
        if st.bootstrap:
            parts.append(f"{st.bootstrap} bootstrap resamples ({100 * st.ci_level:g}% CI)")
        if st.keep_pairs:
            parts.append("per-pair correlations kept")
        if a["linked_pairs"]:
            parts.append(f"{a['linked_pairs']} pairs share a shot with the pair before "
                         "(correlated: counted in the SEM)")
        if a["unlinked_sharing"]:
            parts.append(f"{a['unlinked_sharing']} other pairs of pairs share a shot "
                         "(not counted: SEM optimistic)")
        return "; ".join(parts)

    def __repr__(self) -> str:
        lines = ["<ProcessingPlan>"] + [f"  {k:<11}: {v}" for k, v in self.summary().items()]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
                       f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>"
                       for k, v in self.summary().items())
        return f"<b>sacla_dask ProcessingPlan</b><table>{rows}</table>"

    # -- the result (sacla_dask.dataset, sacla_dask.execute) -------------------
    def attrs(self) -> dict[str, Any]:
        """Metadata written to the store's root attrs (:func:`sacla_dask.dataset.plan_attrs`)."""
        from .dataset import plan_attrs

        return plan_attrs(self)

    def correlation_attrs(self) -> dict[str, Any]:
        """Root attrs of the pairing and the statistics over pairs
        (:func:`sacla_dask.dataset.correlation_attrs`)."""
        from .dataset import correlation_attrs

        return correlation_attrs(self)

    def polar(self) -> tuple[da.Array, da.Array, da.Array]:
        """Lazy (normalised polar, row means, non-finite bin counts) over tags
        (:func:`sacla_dask.graph.polar_arrays`, built anew at each call)."""
        from .graph import polar_arrays

        norm, rmean, nonfinite, _ = polar_arrays(self)
        return norm, rmean, nonfinite

    def dataset(self, polar: PolarArrays | Sequence[Any] | None = None) -> xr.Dataset:
        """The whole result as a lazy, labelled xarray Dataset
        (:func:`sacla_dask.dataset.build_dataset`)."""
        from .dataset import build_dataset

        return build_dataset(self, polar)

    def check_output(self, overwrite: bool = False, resume: bool = True) -> str:
        """Refuse a bad output path now, before any cluster starts (removes nothing).

        Returns the state :meth:`execute` will find: ``"absent"``,
        ``"incomplete"`` (to resume) or ``"complete"``
        (:func:`sacla_dask.execute.check_output`).
        """
        from .execute import check_output

        return check_output(self, overwrite=overwrite, resume=resume)

    def execute(self, progress: bool = False, overwrite: bool = False,
                resume: bool = True) -> xr.Dataset:
        """Compute the result into the plan's Zarr store and open it.

        Uses whatever Dask scheduler is active (a distributed client if one
        is). The store is written tag chunk by tag chunk: a killed run keeps
        its finished chunks, and executing the same plan again computes only
        the missing ones, then the reductions over pairs. ``complete`` is
        set only once every array is written. See
        :func:`sacla_dask.execute.execute`.

        Parameters
        ----------
        progress : bool
            Show a progress bar and say what is resumed.
        overwrite : bool
            Replace whatever is at the output path.
        resume : bool
            Continue an unfinished store written with the same parameters
            (a complete one is returned as it is). A store of other
            parameters is always refused unless ``overwrite``.
        """
        from .execute import execute

        return execute(self, progress=progress, overwrite=overwrite, resume=resume)


# -- planning ---------------------------------------------------------------------
#: the flat keywords of :func:`plan_run`, by the spec they fill
_GEOMETRY_KEYWORDS = ("center", "pixel_size", "distance", "wavelength")
_SPECS: dict[str, type] = {"polar": PolarSpec, "pairing": PairingSpec,
                           "statistics": StatisticsSpec, "output": OutputSpec,
                           "shots": ShotSpec}


def _spec(name: str, given: Any, flat: dict[str, Any]) -> Any:
    """The spec ``name`` (a key of :data:`_SPECS`): ``given``, or made of the flat keywords
    that are its fields (taken out of ``flat``)."""
    cls = _SPECS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    mine = {k: flat.pop(k) for k in list(flat) if k in fields}
    if given is None:
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in mine]
        if missing:  # (qmin, qmax)
            raise TypeError(f"plan_run() missing required argument(s) "
                            f"{', '.join(map(repr, missing))} (or {name}={cls.__name__}(...))")
        return cls(**mine)
    if not isinstance(given, cls):
        raise ParameterError(f"{name} must be a {cls.__name__} (got {type(given).__name__})")
    if mine:
        raise ParameterError(f"give {', '.join(sorted(mine))} either in {name}="
                             f"{cls.__name__}(...) or as keyword(s), not both")
    return given


def _geometry_spec(given: Geometry | GeometrySpec | None,
                   flat: dict[str, Any]) -> Geometry | GeometrySpec:
    mine = {k: flat.pop(k) for k in _GEOMETRY_KEYWORDS if k in flat}
    if given is not None:
        if not isinstance(given, (Geometry, GeometrySpec)):
            raise ParameterError(f"geometry must be a Geometry or a GeometrySpec "
                                 f"(got {type(given).__name__})")
        if mine:
            raise ParameterError(f"give {', '.join(sorted(mine))} either in geometry= or as "
                                 "keyword(s), not both")
        return given
    missing = [k for k in ("center", "pixel_size", "distance") if k not in mine]
    if missing:
        raise TypeError(f"plan_run() missing required argument(s) "
                        f"{', '.join(map(repr, missing))} (or geometry=...)")
    return GeometrySpec(**mine)


def plan_run(
    run: Run | PathLike | Sequence[PathLike],
    *,
    geometry: Geometry | GeometrySpec | None = None,
    polar: PolarSpec | None = None,
    pairing: PairingSpec | str | None = None,
    statistics: StatisticsSpec | None = None,
    output: OutputSpec | None = None,
    shots: ShotSpec | None = None,
    **options: Any,
) -> ProcessingPlan:
    """Plan the processing of a run (nothing is read or computed).

    Parameters
    ----------
    run : Run or path(s)
        An opened run or the HDF5 file(s).
    geometry : Geometry or GeometrySpec, optional
        The geometry (a :class:`~sacla_dask.geometry.GeometrySpec` may
        leave the wavelength to the run's mean photon energy); else the
        keywords ``center`` (x, y pixels; x: fast/column axis),
        ``pixel_size``, ``distance`` (metres) and ``wavelength`` (Angstrom,
        optional).
    polar : PolarSpec, optional
        The polar grid; else its fields as keywords (``qmin``, ``qmax``
        required, ``mask``, ``nphi``, ``nq``, ``method``, ``fast_nphi``,
        ``solid_angle``, ``polarization``, ``units``).
    pairing : PairingSpec or str, optional
        The pairing; else its fields as keywords (``pairs``, ``pairing``
        as a str, ``overlapping``, ``q_pairs``).
    statistics : StatisticsSpec, optional
        Else ``bragg``, ``reject_outliers``, ``bootstrap``, ``ci_level``,
        ``keep_pairs``.
    output : OutputSpec, optional
        Else ``out``, ``store_polar``, ``compression``, ``chunks``.
    shots : ShotSpec, optional
        Else ``tag_range``, ``min_pulse_energy``, ``skip_first``,
        ``drop_unselected``, ``on_bad_tag``, ``select``, ``group_by``,
        ``group_bins``.
    **options
        The flat keywords above (see each spec for their meaning and units).
        A keyword given both flat and in its spec is refused.

    Returns
    -------
    ProcessingPlan

    Raises
    ------
    TypeError
        For an unknown keyword or a required one missing.
    ParameterError, GeometryError, MaskError, PairingError
        For a value that cannot be used (the message names the parameter).
    """
    flat = dict(options)
    if isinstance(pairing, str):
        flat["pairing"], pairing = pairing, None
    geo = _geometry_spec(geometry, flat)
    specs = {name: _spec(name, given, flat) for name, given in
             (("polar", polar), ("pairing", pairing), ("statistics", statistics),
              ("output", output), ("shots", shots))}
    if flat:
        raise TypeError(f"plan_run() got unexpected keyword argument(s) "
                        f"{', '.join(map(repr, sorted(flat)))}")
    return make_plan_of(run, geo, specs["polar"], specs["pairing"], specs["statistics"],
                        specs["output"], specs["shots"])


def make_plan_of(run: Run | PathLike | Sequence[PathLike], geometry: Geometry | GeometrySpec,
                 polar: PolarSpec, pairing: PairingSpec, statistics: StatisticsSpec,
                 output: OutputSpec, shots: ShotSpec) -> ProcessingPlan:
    """:func:`plan_run` of specs: open and select the run, build the transform, pair the
    shots, size the chunks."""
    if not isinstance(run, Run):
        run = open_run(run, on_bad_tag=shots.on_bad_tag)  # type: ignore[arg-type]
    run = shots.apply(run)
    if isinstance(geometry, GeometrySpec):
        geometry.check_shape(run.image_shape)
    geom = geometry if isinstance(geometry, Geometry) else \
        geometry.geometry(lambda: mean_wavelength(run))
    from .crystfel import panel_layout  # (separate panels: a CrystFEL .geom)

    layout, mask = panel_layout(geometry, run, load_mask(polar.mask, run.image_shape))
    transform = PolarTransform(geom, run.image_shape, polar.qmin, polar.qmax, nphi=polar.nphi,
                               nq=polar.nq, mask=mask,
                               method=polar.method,  # type: ignore[arg-type]
                               fast_nphi=polar.fast_nphi, solid_angle=polar.solid_angle,
                               polarization=polar.polarization, layout=layout)
    pairing = dataclasses.replace(pairing, q_pairs=parse_q_pairs(pairing.q_pairs, transform.q))
    groups = None
    labelled = run
    if shots.group_by is not None:
        from .shots.groups import grouped_pairs, shot_groups, with_group_labels

        groups = shot_groups(run, shots.group_by, shots.group_bins)
        labelled = with_group_labels(run, groups)  # (a new name: run is in a closure above)
        pair_arr, ia, ib, kept, groups = grouped_pairs(
            labelled, groups, lambda r: _pairs(r, transform, pairing, output.chunks))
    else:
        pair_arr, ia, ib, kept = _pairs(run, transform, pairing, output.chunks)
    if polar.units == "photons":
        from .shots.units import check_photon_units

        check_photon_units(run)
    if polar.mask_path is not None:
        polar = dataclasses.replace(polar, mask=polar.mask_path)
    return ProcessingPlan(
        run=labelled, transform=transform, pairs=pair_arr, ia=ia, ib=ib,
        n_pairs_dropped=int((~kept).sum()),
        tags_per_chunk=tags_per_chunk(output.chunks, len(run), transform.shape),
        polar_spec=polar, pairing_spec=pairing, statistics_spec=statistics,
        output_spec=output, shot_spec=shots, groups=groups)


def _pairs(run: Run, transform: PolarTransform, spec: PairingSpec,
           chunks: int | str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The tag pairs asked for, the positions of those kept, and which were kept."""
    if spec.pairs is None and spec.pairing == "consecutive":
        pair_arr = consecutive_pairs(run.tags, run.selected, overlapping=spec.overlapping)
    elif spec.pairs is None:
        # (shot_features' own default chunking for "auto": its chunks are image windows)
        feats = shot_features(run, transform, spec.pairing,
                              **({} if is_auto(chunks) else {"chunks": chunks}))
        pair_arr = similar_pairs(run.tags, run.selected, feats)
    elif isinstance(spec.pairs, (str, os.PathLike)):
        pair_arr = read_pairs_file(spec.pairs)
    else:
        pair_arr = np.asarray(spec.pairs, dtype=np.int64).reshape(-1, 2)
    ia, ib, kept = pair_indices(pair_arr, run.tags)
    if not run.selected.all():  # pairs use selected shots only (user lists too)
        ok = run.selected[ia] & run.selected[ib]
        kept[np.flatnonzero(kept)[~ok]] = False
        ia, ib = ia[ok], ib[ok]
    if ia.size == 0:
        p = spec.pairs
        src = f" in {os.fspath(p)!r}" if isinstance(p, (str, os.PathLike)) else ""
        absent = np.setdiff1d(pair_arr, run.tags)[:5].tolist()
        raise PairingError(f"none of the {len(pair_arr)} pairs{src} has both tags in the run "
                           f"(tags {run.tags[0]}..{run.tags[-1]}; not in it: e.g. {absent})")
    return pair_arr, ia, ib, kept


def shot_features(run: Run, transform: PolarTransform, kind: str,
                  chunks: int | str = "128MiB") -> np.ndarray:
    """Per-tag features for pairing shots that look alike, ``(ntag, k)`` float64.

    NaN for shots not selected. ``"pulse_energy"``: the event data (J;
    nothing read). The others read the band's window of every selected
    shot once (:func:`sacla_dask.graph.shot_feature_array`, computed now):
    ``"intensity"``, the band's mean intensity (1 value); ``"profile"``,
    the radial profile over the band divided by its mean (nq values);
    ``"angular"``, the normalised polar image averaged over q in 64 phi
    sectors (pairing by it also cancels genuine shot-to-shot angular
    structure).
    """
    from .execute import _compute
    from .graph import shot_feature_array

    if kind == "pulse_energy":
        if "pulse_energy" not in run.events:
            raise PairingError(f"no pulse energy in the event data of {run.paths}; choose "
                               "another pairing")
        v = np.asarray(run.events["pulse_energy"].values, dtype=np.float64)
        return np.where(run.selected, v, np.nan)[:, None]
    feats = shot_feature_array(run, transform, kind, chunks)
    out = np.full((len(run), feats.shape[1]), np.nan)
    bright = np.asarray(run.selected, dtype=bool)
    if bright.any():
        out[bright] = _compute([feats])[0]
    return out


def load_mask(mask: PathLike | np.ndarray | None,
              shape: tuple[int, int]) -> np.ndarray | None:
    """Load a user mask (``.npy`` path or array; 1/True = good) and validate it.

    Raises
    ------
    MaskError
        If the file is missing or not a ``.npy`` array, or the mask does not
        fit images of ``shape`` (:func:`sacla_dask.polar.check_mask`).
    """
    if mask is None:
        return None
    name = "mask"
    if isinstance(mask, (str, os.PathLike)):
        name = f"mask file {os.fspath(mask)!r}"
        try:
            arr = np.load(os.fspath(mask), allow_pickle=False)
        except FileNotFoundError:
            raise MaskError(f"{name} does not exist") from None
        except (ValueError, OSError) as exc:
            raise MaskError(f"{name} is not a .npy array ({exc})") from None
    else:
        arr = np.asarray(mask)
    return check_mask(arr, shape, name=name)


def process_run(run: Run | PathLike | Sequence[PathLike], out: PathLike, *,
                overwrite: bool = False, progress: bool = False,
                **kwargs: Any) -> xr.Dataset:
    """Plan and execute: process a run into the Zarr store ``out``.

    Keyword arguments are those of :func:`plan_run`. Returns the opened store.
    """
    output = kwargs.pop("output", None)
    if output is not None:
        kwargs["output"] = dataclasses.replace(output, out=out)
    else:
        kwargs["out"] = out
    plan = plan_run(run, **kwargs)
    return plan.execute(progress=progress, overwrite=overwrite)


__all__ = ["OutputSpec", "PairingSpec", "PolarSpec", "ProcessingPlan", "ShotSpec",
           "StatisticsSpec", "load_mask", "plan_run", "process_run", "shot_features"]
