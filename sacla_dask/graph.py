"""The lazy Dask arrays of a plan: polar images per tag chunk, statistics over pairs.

Each function takes a :class:`~sacla_dask.plan.ProcessingPlan` and returns
what it builds (nothing is kept on the plan). Per tag chunk one task reads
its tags one at a time, makes their polar images and normalises them
(:func:`sacla_dask.blocks.polar_chunk_from_run`); the chunk's outputs are
picked by plain graph layers that :func:`sacla_dask.scheduling.inline_picks`
later moves into their consumers. For large polar images (at least
``sacla_dask.polar.halo-image-bytes``, a wide band) each chunk's task also
makes the image of the tag before the chunk, a halo, so that the pair
across the boundary waits for no other task.

Settings (:mod:`sacla_dask.config`) are read when a graph is built, in the
client: ``polar.halo-image-bytes`` and ``polar.compact-max-fraction``.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any, NamedTuple

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from . import config
from .blocks import (
    ANGULAR_SECTORS,
    PolarReloader,
    bragg_block,
    feature_block,
    polar_chunk_from_run,
)
from .correlation import LazyPairStatistics, pair_statistics
from .errors import ParameterError
from .io.run import Run
from .pairs import PAIRINGS
from .polar import PolarOperator, PolarTransform
from .scheduling import chunk_first, pick_layer_name

if TYPE_CHECKING:
    from .plan import ProcessingPlan


class PolarArrays(NamedTuple):
    """The lazy per-tag arrays of a run's polar step, chunked by tag chunk.

    Attributes
    ----------
    normalized : dask array float32 (tag, q, phi)
        Row-normalised polar images (dimensionless; 0 where masked, NaN in a
        bin hit by a non-finite pixel).
    row_mean : dask array float64 (tag, q)
        Masked mean of each polar row before normalisation (detector units).
    nonfinite : dask array int64 (tag,)
        Polar bins hit by a non-finite pixel.
    halo : dask array float32 (tag, q, phi) or None
        For each chunk after the first, the normalised image of the tag
        before it (chunks ``(0, 1, 1, ...)``); None without halos.
    """

    normalized: da.Array
    row_mean: da.Array
    nonfinite: da.Array
    halo: da.Array | None = None


def worker_operator(op: PolarOperator) -> PolarOperator:
    """The operator a plan ships to its workers for ``op``.

    A thin band (a ring: a few per cent of its window) is compacted: the
    workers read and hold weights for only its pixels. A band whose pixels
    fill more than ``sacla_dask.polar.compact-max-fraction`` of its window
    (a wide band) gains little from that and keeps the window read, with
    lower peak memory; it ships without its coverage
    (:meth:`PolarOperator.for_workers`).
    """
    fraction = float(config.get("polar.compact-max-fraction"))
    if op.pixels is None and np.count_nonzero(op.used_columns) <= fraction * op.n_columns:
        return op.compact()
    return op.for_workers()


def with_halo(polar_shape: tuple[int, int], n_chunks: int) -> bool:
    """Whether tag chunks of float32 polar images ``(nq, nphi)`` are made with a halo."""
    nq, nphi = polar_shape
    return nq * nphi * 4 >= config.get_bytes("polar.halo-image-bytes") and n_chunks > 1


def polar_arrays(plan: ProcessingPlan) -> PolarArrays:
    """Lazy normalised polar images, row means and non-finite bin counts over tags.

    One task per chunk reads, transforms and normalises; cheap picks take
    its outputs. The read is part of the task, not a graph layer of its
    own: an unfused read would hold (and might ship) each block of image
    windows.
    """
    tr = plan.transform
    nq, nphi = tr.shape
    op = dask.delayed(worker_operator(tr.operator), pure=True, traverse=False)
    pmk = dask.delayed(tr.polar_mask, pure=True, traverse=False)
    images = plan.run.images(chunks=plan.tags_per_chunk, window=tr.window)
    tchunks = images.chunks[0]
    halo = with_halo(tr.shape, len(tchunks))
    name = "polar-chunk-" + dask.base.tokenize(images.name, op, pmk, halo)
    sources = plan.run.sources
    bounds = np.cumsum((0,) + tchunks)
    dsk: dict[Any, Any] = {}
    for c in range(len(tchunks)):
        dsk[(name, c, 0, 0)] = (polar_chunk_from_run, sources[bounds[c]:bounds[c + 1]],
                                tr.window, plan.run.on_bad_tag, op.key, pmk.key)
        if halo:
            dsk[(name, c, 0, 0)] += (sources[bounds[c] - 1] if c else False,)
    with chunk_first():  # a worker finishes an older block's work before a newer read
        graph = HighLevelGraph.from_collections(name, dsk, dependencies=[op, pmk])
    parts = da.Array(graph, name, (tchunks, (nq,), (nphi,)),
                     meta=np.empty((0, 0, 0), np.float32))
    norm = _picked(parts, 0, (tchunks, (nq,), (nphi,)), np.float32, "polar-normalized")
    if plan.polar_spec.units == "photons":
        from .shots.units import photon_row_mean

        rmean = photon_row_mean(plan, parts, (tchunks, (nq,)))
    else:
        rmean = _picked(parts, 1, (tchunks, (nq,)), np.float64, "polar-row-mean")
    nonfinite = _picked(parts, 2, (tchunks,), np.int64, "nonfinite-bins")
    halo_arr = None
    if halo:
        hchunks = (0,) + (1,) * (len(tchunks) - 1)
        halo_arr = _picked(parts, 3, (hchunks, (nq,), (nphi,)), np.float32, "polar-halo")
    return PolarArrays(norm, rmean, nonfinite, halo_arr)


def _picked(parts: da.Array, i: int, chunks: tuple[tuple[int, ...], ...], dtype: Any,
            label: str) -> da.Array:
    """Output ``i`` of the tuple-valued blocks of ``parts`` (chunked on its first axis).

    A plain graph layer, not a blockwise one, so that no later blockwise
    fusion can fuse ``parts``'s work into a consumer and redo it there;
    :func:`sacla_dask.execute.execute` inlines it into its consumers
    (:func:`sacla_dask.scheduling.inline_picks`).
    """
    name = pick_layer_name(label, dask.base.tokenize(parts.name, i))
    rest = (0,) * (len(chunks) - 1)
    dsk = {(name, j) + rest: (operator.getitem, (parts.name, j, 0, 0), i)
           for j in range(len(chunks[0]))}
    with chunk_first():
        graph = HighLevelGraph.from_collections(name, dsk,  # type: ignore[arg-type]
                                                dependencies=[parts])  # type: ignore[list-item]
    return da.Array(graph, name, chunks, meta=np.empty((0,) * len(chunks), dtype))


def correlated_polar(plan: ProcessingPlan, norm: da.Array) -> da.Array:
    """The polar images the pairs correlate: ``norm``, Bragg spots masked with ``bragg``."""
    bragg = plan.statistics_spec.bragg
    if not bragg:
        return norm
    return da.map_blocks(bragg_block, norm, plan.transform.polar_mask, float(bragg),
                         dtype=np.float32, meta=np.empty((0, 0, 0), np.float32),
                         token="polar-bragg")


def pair_statistics_of(plan: ProcessingPlan, polar: PolarArrays,
                       src: da.Array) -> LazyPairStatistics:
    """The lazy statistics over the plan's pairs of ``src`` (:func:`correlated_polar`).

    The halo of ``polar`` is used when ``src`` is its normalised images
    (Bragg masking changes the rows after the polar step: no halo then).
    """
    st = plan.statistics_spec
    tags = plan.run.tags
    halo = polar.halo if src is polar.normalized else None
    return pair_statistics(src, plan.ia, plan.ib, plan.correlation_plan(),
                           reject=st.reject_outliers, n_boot=st.bootstrap, ci=st.ci_level,
                           keys=np.stack([tags[plan.ia], tags[plan.ib]], axis=1),
                           keep_pairs=st.keep_pairs,
                           reload=reloader(plan, src) if st.reject_outliers else None,
                           halo=halo)


def reloader(plan: ProcessingPlan, src: da.Array) -> Delayed:
    """A lazy :class:`~sacla_dask.blocks.PolarReloader`: one graph key holding the run and
    the operator."""
    tr = plan.transform
    bragg = plan.statistics_spec.bragg
    key = "polar-reloader-" + dask.base.tokenize(src.name, bragg)
    value = PolarReloader(plan.run, tr.window, tr.operator, tr.polar_mask, bragg)
    return Delayed(key, HighLevelGraph.from_collections(key, {key: value}))


def shot_feature_array(run: Run, transform: PolarTransform, kind: str,
                       chunks: int | str = "128MiB") -> da.Array:
    """Lazy pairing features of the run's selected shots, ``(nselected, k)`` float64.

    ``kind`` is ``"intensity"``, ``"profile"`` or ``"angular"``
    (:func:`sacla_dask.blocks.feature_block`); ``chunks`` are those of
    the image windows read (:meth:`sacla_dask.io.run.Run.images`).
    """
    if kind not in ("intensity", "profile", "angular"):
        raise ParameterError(f"pairing feature must be one of {PAIRINGS[1:]} (got {kind!r})")
    nq, nphi = transform.shape
    k = {"intensity": 1, "profile": nq, "angular": min(ANGULAR_SECTORS, nphi)}[kind]
    bright = np.asarray(run.selected, dtype=bool)
    if not bright.any():
        return da.empty((0, k), dtype=np.float64)
    images = run.select(bright).images(chunks=chunks, window=transform.window)
    op = dask.delayed(transform.operator, pure=True, traverse=False)
    return da.map_blocks(feature_block, images, op, transform.polar_mask, kind,
                         drop_axis=(1, 2), new_axis=1, chunks=(images.chunks[0], (k,)),
                         dtype=np.float64, meta=np.empty((0, 0), np.float64))


__all__ = ["PolarArrays", "correlated_polar", "pair_statistics_of", "polar_arrays",
           "reloader", "shot_feature_array", "with_halo", "worker_operator"]
