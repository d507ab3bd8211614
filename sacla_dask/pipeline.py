"""The processing pipeline: a run in, a labelled correlation store out.

This module owns the assembly of the lazy Dask graph (read the band's
window of each image -> polar transform -> row normalisation -> pairwise
difference correlations -> tree-reduced statistics), the inspectable
:class:`ProcessingPlan` that a user sees before hours of compute, and its
execution into a Zarr store with whatever Dask scheduler is active.

Nothing here requires a distributed client: :meth:`ProcessingPlan.execute`
calls ``dask.compute``; a running ``distributed.Client`` is used if there is
one.
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
from collections.abc import Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from . import store as _store
from ._version import __version__
from .correlation import CorrelationPlan, correlate_pairs, make_plan, pair_statistic
from .errors import MaskError, ParameterError, PairingError
from .geometry import Geometry
from .pairs import consecutive_pairs, pair_indices, read_pairs_file
from .polar import PolarOperator, PolarTransform, apply_polar, check_mask, normalize_rows
from .run import Run, mean_wavelength, open_run, parse_chunk_size


# -- block kernels (numpy in, numpy out) --------------------------------------
def polar_block(windows: np.ndarray, op: PolarOperator) -> np.ndarray:
    """Raw polar intensities of a block of image windows (NaN where non-finite)."""
    return apply_polar(windows, op)[0]


def normalized_block(raw: np.ndarray, polar_mask: np.ndarray) -> np.ndarray:
    """Row-normalised polar block (0 where masked)."""
    return normalize_rows(raw, polar_mask)[0]


def row_mean_block(raw: np.ndarray, polar_mask: np.ndarray) -> np.ndarray:
    """Masked mean of each polar row of a block (intensity units), (ntag, nq)."""
    return normalize_rows(raw, polar_mask)[1]


def nonfinite_block(raw: np.ndarray) -> np.ndarray:
    """Number of polar bins hit by a non-finite pixel, per tag, (ntag,)."""
    return np.isnan(raw).sum(axis=(1, 2)).astype(np.int64)


def load_mask(mask: str | os.PathLike[str] | np.ndarray | None,
              shape: tuple[int, int]) -> np.ndarray | None:
    """Load a user mask (``.npy`` path or array; 1/True = good) and validate it."""
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


# -- the plan ----------------------------------------------------------------
@dataclasses.dataclass
class ProcessingPlan:
    """Everything a run's processing will do, before it does it.

    Build it with :func:`plan_run`; look at it (``repr`` or, in a notebook,
    the HTML view); then :meth:`execute`. ``dataset()`` gives the lazy
    result as an xarray Dataset for interactive use.
    """

    run: Run
    transform: PolarTransform
    pairs: np.ndarray
    ia: np.ndarray
    ib: np.ndarray
    n_pairs_dropped: int
    tags_per_chunk: int
    out: str | None = None
    store_polar: bool = True
    q_pairs: Any = "auto"
    compression: str = "lz4"
    mask_path: str | None = None

    # -- description -----------------------------------------------------
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
    def bytes_to_read(self) -> int:
        wy, wx = self.transform.operator.window_shape
        return self.n_tags * wy * wx * np.dtype(self.run.image_dtype).itemsize

    @property
    def polar_nbytes(self) -> int:
        nq, nphi = self.transform.shape
        return self.n_tags * nq * nphi * 4

    def summary(self) -> dict[str, Any]:
        """The plan as a dict of plain values (what the repr shows)."""
        t = self.run.tags
        g = self.geometry
        nq, nphi = self.transform.shape
        ny, nx = self.run.image_shape
        wy, wx = self.transform.operator.window_shape
        return {
            "run": ",".join(map(str, self.run.runs)),
            "files": len(self.run.paths),
            "tags": f"{self.n_tags} ({t[0]}..{t[-1]}), {int(self.run.bright.sum())} bright",
            "pairs": f"{self.ia.size} ({self.n_pairs_dropped} dropped: tags missing)",
            "geometry": (f"centre ({g.center_x:.2f}, {g.center_y:.2f}) px, pixel "
                         f"{g.pixel_size * 1e6:g} um, distance {g.distance * 1e3:g} mm, "
                         f"wavelength {g.wavelength:.4f} A"),
            "q band": (f"{self.transform.qmin:g}..{self.transform.qmax:g} 1/A "
                       f"(r = {self.transform.radius[0]:.1f}..{self.transform.radius[-1]:.1f} px)"),
            "polar grid": (f"{nq} q x {nphi} phi ({self.transform.method}"
                           f"{', FFT-friendly nphi' if self.transform.fast_nphi else ''})"),
            "read": (f"{wy}x{wx} window of {ny}x{nx} images: "
                     f"{dask.utils.format_bytes(self.bytes_to_read)}"),
            "chunks": f"{self.n_chunks} x {self.tags_per_chunk} tags",
            "operator": dask.utils.format_bytes(self.transform.operator.nbytes),
            "output": (f"{self.out or '(in memory)'}"
                       + (f", polar {dask.utils.format_bytes(self.polar_nbytes)} "
                          f"({self.compression})" if self.store_polar else ", correlation only")),
        }

    def __repr__(self) -> str:
        lines = ["<ProcessingPlan>"] + [f"  {k:<11}: {v}" for k, v in self.summary().items()]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
                       f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>"
                       for k, v in self.summary().items())
        return f"<b>sacla_dask ProcessingPlan</b><table>{rows}</table>"

    # -- the lazy result -------------------------------------------------
    def correlation_plan(self) -> CorrelationPlan:
        return make_plan(self.transform.polar_mask, self.q_pairs)

    def polar(self) -> tuple[da.Array, da.Array, da.Array]:
        """Lazy (normalised polar, row means, non-finite bin counts) over tags."""
        tr = self.transform
        nq, nphi = tr.shape
        images = self.run.images(chunks=self.tags_per_chunk, window=tr.window)
        op = dask.delayed(tr.operator, pure=True, traverse=False)
        pm = tr.polar_mask
        raw = images.map_blocks(polar_block, op, chunks=(images.chunks[0], (nq,), (nphi,)),
                                dtype=np.float32, meta=np.empty((0, 0, 0), np.float32),
                                name="polar-raw")
        norm = raw.map_blocks(normalized_block, pm, dtype=np.float32,
                              meta=np.empty((0, 0, 0), np.float32), name="polar-normalized")
        rmean = raw.map_blocks(row_mean_block, pm, drop_axis=2, dtype=np.float64,
                               meta=np.empty((0, 0), np.float64), name="polar-row-mean")
        nonfinite = raw.map_blocks(nonfinite_block, drop_axis=(1, 2), dtype=np.int64,
                                   meta=np.empty((0,), np.int64), name="nonfinite-bins")
        return norm, rmean, nonfinite

    def dataset(self) -> xr.Dataset:
        """The whole result as a lazy, labelled xarray Dataset."""
        tr = self.transform
        norm, rmean, nonfinite = self.polar()
        cplan = self.correlation_plan()
        corr_pairs, order = correlate_pairs(norm, self.ia, self.ib, cplan)
        n = corr_pairs.shape[0]
        mean = corr_pairs.mean(axis=0, split_every=8)
        if n > 1:
            sem = corr_pairs.std(axis=0, ddof=1, split_every=8) / np.sqrt(n)
        else:
            sem = da.full(mean.shape, np.nan, chunks=mean.chunks)
        stat = pair_statistic(corr_pairs).rechunk(-1)
        tags = self.run.tags
        ia, ib = self.ia[order], self.ib[order]
        coords: dict[str, Any] = {
            "tag": ("tag", tags, {"long_name": "SACLA tag number"}),
            "q": ("q", tr.q, {"units": "1/angstrom", "long_name": "momentum transfer"}),
            "radius": ("q", tr.radius, {"units": "pixel", "long_name": "radius from beam centre"}),
            "phi": ("phi", tr.phi, {"units": "rad", "long_name": "azimuth atan2(y-cy, x-cx)"}),
            "dphi": ("dphi", tr.phi.copy(), {"units": "rad", "long_name": "azimuthal lag"}),
            "pair": ("pair", np.arange(n)),
        }
        data: dict[str, Any] = {
            "polar_mask": (("q", "phi"), tr.polar_mask),
            "coverage": (("q", "phi"), tr.operator.coverage,
                         {"long_name": "fraction of interpolation weight on good pixels"}),
            "row_mean": (("tag", "q"), rmean, {"long_name": "masked mean of each polar row "
                                                           "before normalisation"}),
            "nonfinite_bins": (("tag",), nonfinite,
                               {"long_name": "polar bins hit by NaN/inf pixels (filled)"}),
            "pair_tag_a": (("pair",), tags[ia]),
            "pair_tag_b": (("pair",), tags[ib]),
            "pair_stat": (("pair",), stat, {"long_name": "mean squared normalised difference"}),
        }
        if self.store_polar:
            data["polar"] = (("tag", "q", "phi"), norm,
                             {"long_name": "row-normalised polar intensity, 0 where masked"})
        if cplan.auto:
            data["corr"] = (("q", "dphi"), mean, {"long_name": "mean difference autocorrelation"})
            data["corr_sem"] = (("q", "dphi"), sem, {"long_name": "standard error over pairs"})
        else:
            coords["q1"] = ("qpair", tr.q[cplan.q1], {"units": "1/angstrom"})
            coords["q2"] = ("qpair", tr.q[cplan.q2], {"units": "1/angstrom"})
            data["corr"] = (("qpair", "dphi"), mean,
                            {"long_name": "mean difference cross-correlation"})
            data["corr_sem"] = (("qpair", "dphi"), sem,
                                {"long_name": "standard error over pairs"})
        data["n_pairs"] = ((), n)
        for name in self.run.events.data_vars:
            data[f"event_{name}" if name in data else name] = ("tag",
                                                               self.run.events[name].values)
        ds = xr.Dataset(data, coords=coords)
        ds.attrs.update(self.attrs())
        return ds

    def attrs(self) -> dict[str, Any]:
        """Metadata written to the store's root attrs."""
        tr = self.transform
        g = self.geometry
        return {
            "center_x": g.center_x, "center_y": g.center_y, "pixel_size": g.pixel_size,
            "distance": g.distance, "wavelength": g.wavelength,
            "qmin": tr.qmin, "qmax": tr.qmax, "nphi": tr.nphi,
            "nphi_default": tr.grid.nphi_default, "fast_nphi": tr.fast_nphi,
            "method": tr.method, "mask": self.mask_path or "",
            "run": [int(r) for r in self.run.runs] if len(self.run.runs) > 1
            else int(self.run.run_number),
            "source": [os.path.abspath(p) for p in self.run.paths] if len(self.run.paths) > 1
            else os.path.abspath(self.run.paths[0]),
            "bad_tags": list(self.run.bad_tags),
            "n_pairs_dropped": int(self.n_pairs_dropped),
            "tags_per_chunk": int(self.tags_per_chunk),
            "sacla_dask_version": __version__,
            "complete": False,
        }

    # -- execution ---------------------------------------------------------
    def execute(self, progress: bool = False, overwrite: bool = False) -> xr.Dataset:
        """Compute the result into the plan's Zarr store and open it.

        Uses whatever Dask scheduler is active. The store's ``complete``
        attr is set only after every array is written.
        """
        if self.out is None:
            raise ParameterError("the plan has no output store (out=...)")
        _store.prepare_output(self.out, overwrite=overwrite)
        ds = self.dataset()
        enc_comp = _store.compressors(self.compression)
        encoding: dict[str, dict[str, Any]] = {}
        if "polar" in ds:
            encoding["polar"] = {"chunks": (self.tags_per_chunk,) + self.transform.shape,
                                 "compressors": enc_comp}
        delayed = ds.to_zarr(self.out, mode="w", compute=False, consolidated=False,
                             zarr_format=3, encoding=encoding)
        _compute(delayed, progress=progress)
        _store.mark_complete(self.out)
        return _store.open_result(self.out)


def _active_client() -> Any:
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def _compute(obj: Any, progress: bool = False) -> Any:
    """Compute with the active scheduler, showing progress when asked."""
    client = _active_client()
    if client is not None and dask.config.get("scheduler", None) in (None, "dask.distributed"):
        fut = client.compute(obj)
        if progress:
            from distributed import progress as dprogress

            dprogress(fut)
        return fut.result()
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar():
            return dask.compute(obj)[0]
    return dask.compute(obj)[0]


def plan_run(
    run: Run | str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    qmin: float,
    qmax: float,
    center: tuple[float, float],
    pixel_size: float,
    distance: float,
    wavelength: float | None = None,
    mask: str | os.PathLike[str] | np.ndarray | None = None,
    nphi: int | None = None,
    nq: int | None = None,
    method: str = "nearest",
    fast_nphi: bool = False,
    pairs: str | os.PathLike[str] | np.ndarray | None = None,
    overlapping: bool = True,
    q_pairs: Any = "auto",
    chunks: int | str = "128MiB",
    out: str | os.PathLike[str] | None = None,
    store_polar: bool = True,
    compression: str = "lz4",
    on_bad_tag: str = "fail",
) -> ProcessingPlan:
    """Plan the processing of a run (nothing is read or computed).

    Parameters
    ----------
    run : Run or path(s)
        An opened run or the HDF5 file(s).
    qmin, qmax : float
        q band in inverse Angstrom.
    center : (x, y)
        Beam centre in pixels (x: fast/column axis, y: slow/row axis).
    pixel_size, distance : float
        Metres.
    wavelength : float, optional
        Angstrom; default from the run's mean photon energy.
    mask : path or array, optional
        User pixel mask, 1/True = good.
    nphi, nq : int, optional
        Polar grid size (defaults: one pixel of arc at the outer radius,
        one bin per pixel of radius).
    method : {"nearest", "bilinear"}
    fast_nphi : bool
        Round nphi up to an FFT-friendly length.
    pairs : path or (n, 2) array, optional
        Tag pairs; default consecutive bright shots.
    overlapping : bool
        Consecutive pairs overlap (t1,t2),(t2,t3) (default) or not.
    q_pairs : "auto", "all" or (n, 2) int
        Autocorrelation only, all q pairs, or chosen row-index pairs.
    chunks : int or str
        Tags per task, or bytes of image window per task ("128MiB").
    out : path, optional
        Zarr store to write.
    store_polar : bool
        Keep the per-tag polar images in the store (else correlation only).
    compression : {"lz4", "zstd", "none"}
        Codec of the polar images in the store.
    """
    if not isinstance(run, Run):
        run = open_run(run, on_bad_tag=on_bad_tag)  # type: ignore[arg-type]
    if wavelength is None:
        wavelength = mean_wavelength(run)
    cx, cy = center
    geom = Geometry(cx, cy, pixel_size, distance, wavelength)
    mask_path = os.path.abspath(os.fspath(mask)) if isinstance(mask, (str, os.PathLike)) else None
    m = load_mask(mask, run.image_shape)
    transform = PolarTransform(geom, run.image_shape, qmin, qmax, nphi=nphi, nq=nq, mask=m,
                               method=method, fast_nphi=fast_nphi)  # type: ignore[arg-type]
    if pairs is None:
        pair_arr = consecutive_pairs(run.tags, run.bright, overlapping=overlapping)
    elif isinstance(pairs, (str, os.PathLike)):
        pair_arr = read_pairs_file(pairs)
    else:
        pair_arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    ia, ib, kept = pair_indices(pair_arr, run.tags)
    if ia.size == 0:
        raise PairingError(f"none of the {len(pair_arr)} pairs has both tags in the run")
    wy, wx = transform.operator.window_shape
    per = parse_chunk_size(chunks, wy * wx * 4)
    return ProcessingPlan(
        run=run, transform=transform, pairs=pair_arr, ia=ia, ib=ib,
        n_pairs_dropped=int((~kept).sum()), tags_per_chunk=per,
        out=os.fspath(out) if out is not None else None, store_polar=store_polar,
        q_pairs=q_pairs, compression=compression, mask_path=mask_path,
    )


def process_run(run: Run | str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                out: str | os.PathLike[str], *, overwrite: bool = False,
                progress: bool = False, **kwargs: Any) -> xr.Dataset:
    """Plan and execute: process a run into the Zarr store ``out``.

    Keyword arguments are those of :func:`plan_run`. Returns the opened store.
    """
    plan = plan_run(run, out=out, **kwargs)
    return plan.execute(progress=progress, overwrite=overwrite)
