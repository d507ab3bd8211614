"""The output contract: every variable, coordinate and attr of a result, in one place.

A result (the lazy :meth:`~sacla_dask.plan.ProcessingPlan.dataset`, or the
store :func:`sacla_dask.open_result` opens) is an xarray Dataset labelled
from the tables here: :data:`COORDS`, :data:`VARIABLES` (with the
correlation family :data:`CORRELATION`, repeated with the suffix
``_cross`` on dimension ``qpair`` for the cross-correlations of
``q_pairs``) and :data:`ATTRS` (root attrs). Each entry gives the
dimensions, dtype, units and meaning; ``long_name`` and ``units`` are
the attrs written with the variable (a variable without a ``long_name``
is written without one). The per-tag event data of the run (``bright``,
``selected``, ``run``, ``source``, ``pulse_energy`` ...) are added as they
are in :attr:`sacla_dask.io.run.Run.events`.

Correlations: for a pair of shots A, B, ``D = A - B`` on the bins valid in
both, ``C(q1, q2, dphi) = sum_phi D(q1, phi) D(q2, phi + dphi) / M`` with
``M`` the number of valid bin pairs at that lag. Fourier coefficients:
``c_n = (1/nphi) sum_k C(dphi_k) exp(-i n dphi_k)``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
import xarray as xr

from ._version import __version__
from .blocks import image_ok_from_means, nan_count_block
from .correlation import LazyPairStatistics, fourier_coefficients, pair_links, pair_order
from .graph import PolarArrays, correlated_polar, pair_statistics_of, polar_arrays
from .pairs import shared_shots, sharing_pairs
from .scheduling import chunk_first

if TYPE_CHECKING:
    from .plan import ProcessingPlan


@dataclasses.dataclass(frozen=True)
class Field:
    """One coordinate or variable of a result.

    Attributes
    ----------
    dims : tuple of str
    dtype : str
    meaning : str
        What it holds, for the reader of this table.
    long_name : str, optional
        The ``long_name`` attr written (``{what}``, ``{level}`` filled in).
    units : str, optional
        The ``units`` attr written.
    """

    dims: tuple[str, ...]
    dtype: str
    meaning: str
    long_name: str | None = None
    units: str | None = None

    def attrs(self, **fill: Any) -> dict[str, Any]:
        """The attrs written with it (``units``, then ``long_name``)."""
        out: dict[str, Any] = {}
        if self.units is not None:
            out["units"] = self.units
        if self.long_name is not None:
            out["long_name"] = self.long_name.format(**fill)
        return out


#: coordinates (``q1``... only with cross-correlations)
COORDS: dict[str, Field] = {
    "tag": Field(("tag",), "int64", "SACLA tag numbers of the run's shots",
                 "SACLA tag number"),
    "q": Field(("q",), "float64", "momentum transfer at the polar rows' centres",
               "momentum transfer", "1/angstrom"),
    "radius": Field(("q",), "float64", "the rows' radius from the beam centre (pixels)",
                    "radius from beam centre", "pixel"),
    "phi": Field(("phi",), "float64", "azimuth atan2(y - cy, x - cx), from +x toward +y, "
                 "in [0, 2 pi)", "azimuth atan2(y-cy, x-cx)", "rad"),
    "dphi": Field(("dphi",), "float64", "azimuthal lag of the correlations",
                  "azimuthal lag", "rad"),
    "n": Field(("n",), "int64", "angular Fourier order, 0 .. nphi/2", "angular Fourier order"),
    "pair": Field(("pair",), "int64", "pair number"),
    "q1": Field(("qpair",), "float64", "q of the first row of each cross-correlated pair",
                units="1/angstrom"),
    "q2": Field(("qpair",), "float64", "q of the second row", units="1/angstrom"),
    "q1_index": Field(("qpair",), "int64", "row index of q1", "q row index of q1"),
    "q2_index": Field(("qpair",), "int64", "row index of q2", "q row index of q2"),
}

#: per-tag and per-pair variables, and the polar mask (in the order written)
VARIABLES: dict[str, Field] = {
    "polar_mask": Field(("q", "phi"), "bool", "True = good polar bin"),
    "coverage": Field(("q", "phi"), "float32", "fraction of a bin's interpolation weight on "
                      "good pixels", "fraction of interpolation weight on good pixels"),
    "row_mean": Field(("tag", "q"), "float64", "masked mean of each polar row before "
                      "normalisation (detector units)",
                      "masked mean of each polar row before normalisation"),
    "image_ok": Field(("tag",), "bool", "False for a tag unreadable at read time: NaN in "
                      "polar, left out of every pair",
                      "image read and finite in the band (False: left out of every pair)"),
    "nonfinite_bins": Field(("tag",), "int64", "polar bins hit by NaN/inf pixels (masked for "
                            "that shot, counted)",
                            "polar bins hit by NaN/inf pixels (NaN in polar: left out of the "
                            "pairs of that shot)"),
    "pair_tag_a": Field(("pair",), "int64", "the earlier-listed tag of each pair"),
    "pair_tag_b": Field(("pair",), "int64", "the other tag of each pair"),
    "pair_stat": Field(("pair",), "float64", "mean squared normalised difference of each "
                       "pair (bins valid in both shots)",
                       "mean squared normalised difference (bins valid in both shots)"),
    "pair_rejected": Field(("pair",), "bool", "left out as an outlier (reject_outliers; attr "
                           "reject_nsigma)", "left out of the averages as an outlier"),
    "polar": Field(("tag", "q", "phi"), "float32", "row-normalised polar images, 0 where "
                   "masked, NaN in a bin hit by a NaN/inf pixel (store_polar only)",
                   "row-normalised polar intensity, 0 where masked, NaN where hit by a "
                   "non-finite pixel"),
    "bragg_bins": Field(("tag", "q"), "int32", "polar bins masked as Bragg spots (bragg "
                        "only; attr nsigma)", "polar bins masked as Bragg spots"),
    "pair_stat_threshold": Field((), "float64", "pair_stat above which pairs are rejected "
                                 "(reject_outliers only)",
                                 "pair_stat above which pairs are rejected"),
    "n_pairs": Field((), "int64", "number of pairs averaged (with data, after rejection)",
                     "pairs averaged (after outlier rejection)"),
}

#: the correlations of the autocorrelation rows (dims on ``q``); each again with the suffix
#: ``_cross`` on ``qpair`` for the ``q_pairs`` (``{what}``: which correlation)
CORRELATION: dict[str, Field] = {
    "corr": Field(("q", "dphi"), "float64", "mean over pairs of the mask-normalised "
                  "difference correlation (NaN where no valid bin pair)", "mean {what}"),
    "corr_sem": Field(("q", "dphi"), "float64", "its standard error over pairs",
                      "standard error of the mean over pairs (pairs sharing a shot with the "
                      "pair before them counted as correlated: attrs linked_pairs, "
                      "unlinked_sharing)"),
    "corr_count": Field(("q", "dphi"), "int64", "pairs with data in each bin",
                        "pairs with data in the bin (0: no valid bin pair, mean NaN)"),
    "corr_fourier": Field(("q", "n"), "float64 (complex128 for _cross)",
                          "angular Fourier coefficients c_n of corr",
                          "angular Fourier coefficients c_n of the mean {what}: C(dphi) = "
                          "sum_n c_n exp(i n dphi), c_-n = conj(c_n)"),
    "corr_ci_low": Field(("q", "dphi"), "float64", "bootstrap interval (bootstrap only)",
                         "lower {level} Poisson-bootstrap percentile bound"),
    "corr_ci_high": Field(("q", "dphi"), "float64", "bootstrap interval (bootstrap only)",
                          "upper {level} Poisson-bootstrap percentile bound"),
    "corr_fourier_ci_low": Field(("q", "n"), "float64", "bootstrap interval of Re c_n",
                                 "lower {level} bootstrap bound of Re c_n"),
    "corr_fourier_ci_high": Field(("q", "n"), "float64", "bootstrap interval of Re c_n",
                                  "upper {level} bootstrap bound of Re c_n"),
    "corr_pairs": Field(("pair", "q", "dphi"), "float32", "every pair's correlation "
                        "(keep_pairs only)", "per-pair {what} (float32; NaN: no valid bin "
                        "pair)"),
}

#: what ``{what}`` says of the correlations, by suffix
WHAT = {"": "difference autocorrelation C(q, q, dphi)",
        "_cross": "difference cross-correlation C(q1, q2, dphi)"}

#: root attrs (besides those of the run's events)
ATTRS: dict[str, str] = {
    "center_x": "beam centre along the fast (column) axis, pixels",
    "center_y": "beam centre along the slow (row) axis, pixels",
    "pixel_size": "metres", "distance": "sample to detector, metres",
    "wavelength": "Angstrom",
    "rot1": "detector rotation (pyFAI), radians; only when tilted (centre = PONI)",
    "rot2": "detector rotation (pyFAI), radians", "rot3": "detector rotation (pyFAI), radians",
    "qmin": "inner edge of the q band, 1/Angstrom", "qmax": "outer edge, 1/Angstrom",
    "nphi": "phi bins", "nphi_default": "phi bins of one pixel of arc at the outer radius",
    "fast_nphi": "nphi rounded up to an FFT-friendly length",
    "method": "polar resampling", "mask": "the pixel mask file ('' for none or an array)",
    "solid_angle": "divided by the relative solid angle",
    "polarization": "polarisation factor divided by (None: none)",
    "run": "SACLA run number(s)", "source": "the run file(s), absolute",
    "sources": "the run files, absolute (the source variable indexes them)",
    "bad_tags": "tags left out, with why", "bad_tag_numbers": "their tag numbers",
    "selection": "the shot selection", "n_pairs_dropped": "pairs asked for but not kept",
    "tags_per_chunk": "tags per task (the unit of resumption)",
    "sacla_dask_version": "version that wrote it",
    "complete": "every array written",
    "pairing": "consecutive, intensity, pulse_energy, profile, angular, file or list",
    "n_pairs_requested": "pairs asked for", "shared_shots": "tags in more than one pair",
    "linked_pairs": "pairs sharing a shot with the pair before them (counted in corr_sem)",
    "unlinked_sharing": "other pairs of pairs with a shot in common (not counted)",
    "q_pairs": "the cross-correlated q rows ('none', 'all' or 'A:B,...')",
    "bragg_nsigma": "Bragg-spot threshold, robust sigmas (0: none)",
    "reject_nsigma": "outlier threshold, robust sigmas (0: none)",
    "bootstrap": "bootstrap resamples", "ci_level": "bootstrap interval level",
}


def _var(table: dict[str, Field], name: str, data: Any, extra: dict[str, Any] | None = None,
         **fill: Any) -> tuple[tuple[str, ...], Any, dict[str, Any]]:
    """``(dims, data, attrs)`` of ``table[name]`` for :class:`xarray.Dataset`."""
    f = table[name]
    return f.dims, data, {**f.attrs(**fill), **(extra or {})}


def _coord(name: str, values: Any, dim: str | None = None) -> tuple[Any, ...]:
    f = COORDS[name]
    return ((dim or f.dims[0]), values, f.attrs())


def derived(plan: ProcessingPlan) -> dict[str, tuple[Callable[[np.ndarray], np.ndarray], str]]:
    """Per-tag variables computed from another per-tag variable of the same tag chunk.

    ``{name: (kernel, source variable)}``: the lazy dataset maps the kernel
    over the source's chunks; a store's chunk writes compute it
    themselves (no task of its own, :func:`sacla_dask.store.chunk_writes`).
    """
    any_good = bool(plan.transform.polar_mask.any())
    return {"image_ok": (functools.partial(image_ok_from_means, any_good=any_good),
                         "row_mean")}


def build_dataset(plan: ProcessingPlan,
                  polar: PolarArrays | Sequence[Any] | None = None) -> xr.Dataset:
    """The whole result of ``plan`` as a lazy, labelled xarray Dataset.

    Parameters
    ----------
    plan : ProcessingPlan
    polar : PolarArrays or (normalised polar, row means, non-finite counts), optional
        The polar arrays to build on instead of
        :func:`sacla_dask.graph.polar_arrays` (a resumed run passes those
        whose finished chunks are read back from its store).
    """
    pa = polar_arrays(plan) if polar is None else (
        polar if isinstance(polar, PolarArrays) else PolarArrays(*polar))
    src = correlated_polar(plan, pa.normalized)
    per = None
    if plan.groups is None:
        st = pair_statistics_of(plan, pa, src)
    else:  # each group's statistics over the same polar images (sacla_dask.shots.groups)
        from .shots.groups import grouped_statistics

        st, per = grouped_statistics(plan, pa, src)
    tr = plan.transform
    nf = tr.shape[1] // 2 + 1
    coords: dict[str, Any] = {
        "tag": _coord("tag", plan.run.tags), "q": _coord("q", tr.q),
        "radius": _coord("radius", tr.radius), "phi": _coord("phi", tr.phi),
        "dphi": _coord("dphi", tr.phi.copy()), "n": _coord("n", np.arange(nf)),
        "pair": _coord("pair", np.arange(int(plan.ia.size))),
    }
    data = _tag_and_pair_variables(plan, pa, src, st)
    if per is None:
        data.update(_correlation_variables(plan, st, coords))
        data["n_pairs"] = _var(VARIABLES, "n_pairs", st.n_pairs)
    else:
        from .shots.groups import grouped_variables

        grouped_variables(plan, per, coords, data, _correlation_variables)
    for name in plan.run.events.data_vars:
        ev = plan.run.events[name]
        data[f"event_{name}" if name in data else str(name)] = ("tag", ev.values, ev.attrs)
    if plan.shot_spec.select or plan.groups is not None or plan.polar_spec.units != "detector":
        from .shots.table import shot_table

        shot_table(plan, pa, data)
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update(plan_attrs(plan))
    ds.attrs.update(correlation_attrs(plan))
    return ds


def _tag_and_pair_variables(plan: ProcessingPlan, pa: PolarArrays, src: da.Array,
                            st: LazyPairStatistics) -> dict[str, Any]:
    tr = plan.transform
    tags = plan.run.tags
    spec = plan.statistics_spec
    kernel = derived(plan)["image_ok"][0]
    with chunk_first():
        # from the row means, not from the polar images: a consumer of those that runs
        # late (its output is only needed at the end) would keep them in memory
        image_ok = da.map_blocks(kernel, pa.row_mean, drop_axis=1, dtype=bool,
                                 meta=np.empty((0,), bool), token="image-ok")
    data: dict[str, Any] = {
        "polar_mask": _var(VARIABLES, "polar_mask", tr.polar_mask),
        "coverage": _var(VARIABLES, "coverage", tr.operator.coverage),
        "row_mean": _var(VARIABLES, "row_mean", pa.row_mean),
        "image_ok": _var(VARIABLES, "image_ok", image_ok),
        "nonfinite_bins": _var(VARIABLES, "nonfinite_bins", pa.nonfinite),
        "pair_tag_a": _var(VARIABLES, "pair_tag_a", tags[plan.ia]),
        "pair_tag_b": _var(VARIABLES, "pair_tag_b", tags[plan.ib]),
        "pair_stat": _var(VARIABLES, "pair_stat", st.stat),
        "pair_rejected": _var(VARIABLES, "pair_rejected", st.rejected,
                              {"reject_nsigma": float(spec.reject_outliers or 0)}),
    }
    if plan.output_spec.store_polar:
        data["polar"] = _var(VARIABLES, "polar", pa.normalized)
    if spec.bragg:
        bins = da.map_blocks(nan_count_block, src, drop_axis=2, dtype=np.int32,
                             meta=np.empty((0, 0), np.int32), token="bragg-bins")
        data["bragg_bins"] = _var(VARIABLES, "bragg_bins", bins,
                                  {"nsigma": float(spec.bragg)})
    if spec.reject_outliers:
        data["pair_stat_threshold"] = _var(VARIABLES, "pair_stat_threshold", st.threshold,
                                           {"reject_nsigma": float(spec.reject_outliers)})
    return data


def _correlation_variables(plan: ProcessingPlan, st: LazyPairStatistics,
                           coords: dict[str, Any]) -> dict[str, Any]:
    """The :data:`CORRELATION` family, of the autocorrelations and of the cross rows
    (whose coordinates it adds to ``coords``)."""
    tr = plan.transform
    cplan = plan.correlation_plan()
    nq, nphi = tr.shape
    fourier = da.map_blocks(fourier_coefficients, st.mean,
                            chunks=((cplan.nqp,), (nphi // 2 + 1,)), dtype=np.complex128,
                            meta=np.empty((0, 0), np.complex128))
    rows = {"": slice(0, nq)}
    if cplan.n_cross:
        rows["_cross"] = slice(nq, None)
        cq1, cq2 = cplan.q1[nq:], cplan.q2[nq:]
        coords.update(q1=_coord("q1", tr.q[cq1]), q2=_coord("q2", tr.q[cq2]),
                      q1_index=_coord("q1_index", cq1), q2_index=_coord("q2_index", cq2))
    level = f"{100 * plan.statistics_spec.ci_level:g}%"
    data: dict[str, Any] = {}
    for suffix, sl in rows.items():
        dim = "q" if suffix == "" else "qpair"
        what = WHAT[suffix]

        def var(name: str, values: Any, dims: tuple[str, ...] = (dim, "dphi"),
                suffix: str = suffix, what: str = what) -> None:
            attrs = CORRELATION[name].attrs(what=what, level=level)
            data[name.replace("corr", f"corr{suffix}", 1)] = (dims, values, attrs)

        var("corr", st.mean[sl])
        var("corr_sem", st.sem[sl])
        var("corr_count", st.count[sl])
        var("corr_fourier", fourier[sl].real if suffix == "" else fourier[sl], (dim, "n"))
        if (st.ci_low is not None and st.ci_high is not None  # (all four, or none)
                and st.fourier_ci_low is not None and st.fourier_ci_high is not None):
            var("corr_ci_low", st.ci_low[sl])
            var("corr_ci_high", st.ci_high[sl])
            var("corr_fourier_ci_low", st.fourier_ci_low[sl], (dim, "n"))
            var("corr_fourier_ci_high", st.fourier_ci_high[sl], (dim, "n"))
        if st.pairs is not None:
            per = max(1, (32 << 20) // max(1, cplan.nqp * nphi * 4))
            var("corr_pairs", st.pairs.rechunk({0: per})[:, sl], ("pair", dim, "dphi"))
    return data


def correlation_attrs(plan: ProcessingPlan) -> dict[str, Any]:
    """Root attrs describing the pairing and the statistics over pairs (:data:`ATTRS`)."""
    q_pairs = plan.pairing_spec.q_pairs
    if isinstance(q_pairs, str) or q_pairs is None:
        qp = "none" if q_pairs in (None, "auto", "none") else str(q_pairs)
    else:
        qp = ",".join(f"{a}:{b}" for a, b in np.asarray(q_pairs).reshape(-1, 2))
    ia, ib = plan.ia, plan.ib
    pairs = np.stack([ia, ib], axis=1)
    linked = 0
    for g in ([None] if plan.groups is None else range(plan.groups.n)):
        # (each group's pairs are ordered and linked on their own)
        mine = slice(None) if g is None else plan.groups.pair_group == g  # type: ignore[union-attr]
        order = pair_order(ia[mine], ib[mine])
        linked += int(pair_links(ia[mine][order], ib[mine][order]).sum())
    st = plan.statistics_spec
    return {
        "pairing": plan.pairing_spec.kind,
        "n_pairs_requested": int(len(plan.pairs)),
        "shared_shots": shared_shots(pairs),
        "linked_pairs": linked,
        "unlinked_sharing": sharing_pairs(pairs) - linked,
        "q_pairs": qp,
        "bragg_nsigma": float(st.bragg or 0),
        "reject_nsigma": float(st.reject_outliers or 0),
        "bootstrap": int(st.bootstrap),
        "ci_level": float(st.ci_level),
    }


def plan_attrs(plan: ProcessingPlan) -> dict[str, Any]:
    """Root attrs of the geometry, grid, run and chunking (:data:`ATTRS`)."""
    tr = plan.transform
    g = plan.geometry
    run = plan.run
    return {
        "center_x": g.center_x, "center_y": g.center_y, "pixel_size": g.pixel_size,
        "distance": g.distance, "wavelength": g.wavelength,
        **({"rot1": g.rot1, "rot2": g.rot2, "rot3": g.rot3} if g.tilted else {}),
        **({"geom": lay.source, "n_panels": len(lay.panels)}
           if (lay := getattr(tr, "layout", None)) is not None else {}),
        "qmin": tr.qmin, "qmax": tr.qmax, "nphi": tr.nphi,
        "nphi_default": tr.grid.nphi_default, "fast_nphi": tr.fast_nphi,
        "method": tr.method, "mask": plan.polar_spec.mask_path or "",
        "solid_angle": tr.solid_angle, "polarization": tr.polarization,
        "run": [int(r) for r in run.runs] if len(run.runs) > 1 else int(run.run_number),
        "source": [os.path.abspath(p) for p in run.paths] if len(run.paths) > 1
        else os.path.abspath(run.paths[0]),
        "sources": [os.path.abspath(p) for p in run.paths],
        "bad_tags": [str(b) for b in run.bad_tags],
        "bad_tag_numbers": [int(b.tag) for b in run.bad_tags],
        "selection": run.selection,
        "n_pairs_dropped": int(plan.n_pairs_dropped),
        "tags_per_chunk": int(plan.tags_per_chunk),
        "sacla_dask_version": __version__,
        "complete": False,
        **_shot_attrs(plan),
    }


def _shot_attrs(plan: ProcessingPlan) -> dict[str, Any]:
    """``groups`` and ``units`` attrs, only with a grouping or photon units."""
    if plan.groups is None and plan.polar_spec.units == "detector":
        return {}
    from .shots.table import shot_attrs

    return shot_attrs(plan)


__all__ = ["ATTRS", "COORDS", "CORRELATION", "VARIABLES", "WHAT", "Field", "build_dataset",
           "correlation_attrs", "derived", "plan_attrs"]
