"""The processing pipeline: a run in, a labelled correlation store out.

This module owns the assembly of the lazy Dask graph (read the band's
window of each image -> polar transform -> row normalisation -> pairwise
difference correlations -> statistics folded over pairs), the inspectable
:class:`ProcessingPlan` that a user sees before hours of compute, and its
execution into a Zarr store with whatever Dask scheduler is active.

Nothing here requires a distributed client: :meth:`ProcessingPlan.execute`
calls ``dask.compute``; a running ``distributed.Client`` is used if there is
one.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import logging
import math
import operator
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.highlevelgraph import HighLevelGraph
from dask.sizeof import sizeof

from . import store as _store
from ._version import __version__
from .chunking import parse_chunk_size
from .correlation import (
    CorrelationPlan,
    fourier_coefficients,
    make_plan,
    mask_bragg_spots,
    pair_links,
    pair_order,
    pair_statistics,
    parse_q_pairs,
)
from .engine import Engine
from .errors import MaskError, PairingError, ParameterError
from .geometry import Geometry
from .io import hdf5 as _hdf5
from .io.run import Run, TagSource, mean_wavelength, open_run
from .pairs import (
    PAIRINGS,
    consecutive_pairs,
    pair_indices,
    read_pairs_file,
    shared_shots,
    sharing_pairs,
    similar_pairs,
)
from .polar import (
    PolarOperator,
    PolarTransform,
    apply_polar,
    check_mask,
    normalize_rows,
    polar_from_columns,
    polar_from_pick,
)
from .polar import polar_into as apply_polar_into
from .scheduling import chunk_first, inline_picks, memory_per_thread, pick_layer_name

log = logging.getLogger(__name__)

#: a chunk size given in bytes never makes fewer tag chunks than this (if there are tags):
#: enough for a few workers to overlap reading, correlating and writing; a short run
#: cut finer pays a fixed ~40 ms per chunk (its writes, tasks, transfers) for nothing
#: (200 ring tags, 2 workers: 16 chunks 165 img/s, 8 chunks 186 img/s)
MIN_CHUNKS = 8
#: nor chunks of fewer tags than this (unless the run is short)
MIN_CHUNK_TAGS = 4
#: the default chunking, ``chunks="auto"`` (:func:`tags_per_chunk`): this many bytes of
#: polar images per task (41 tags of the 40 x 5000 ring band)...
AUTO_CHUNK_BYTES = 32 << 20
#: ...but at least this many tags where the workers' memory allows: per tag chunk the
#: graph has 4-5 tasks, a written chunk and a partial sum that may cross workers, and
#: ~40 ms of fixed cost; a wide band (28 MB per polar image) at 16 instead of 4 tags per
#: chunk: 1279 instead of 6299 tasks for 5050 tags (with its halo, below), at least as
#: fast (benchmarks/README.md)
AUTO_MIN_TAGS = 16
#: ...as long as the chunk's polar block is at most this fraction of a worker thread's
#: memory: a wide-band worker peaked at 0.9 GiB with 4-tag chunks and 1.3 GiB with
#: 16-tag chunks (a 422 MiB block), and Dask spills at 60-70 % of its memory limit
AUTO_MEMORY_FRACTION = 0.1


# -- block kernels (numpy in, numpy out) --------------------------------------
@sizeof.register(PolarOperator)
def _sizeof_operator(op: PolarOperator) -> int:
    # what a worker holds for it (Dask's default for an object it does not know is
    # ~56 bytes: a wide band's operator is ~165 MB)
    return int(op.nbytes)


def polar_block(windows: np.ndarray, op: PolarOperator) -> np.ndarray:
    """Raw polar intensities of a block of image windows (NaN where non-finite)."""
    return apply_polar(windows, op)[0]


def normalized_block(raw: np.ndarray, polar_mask: np.ndarray) -> np.ndarray:
    """Row-normalised polar block (0 where masked).

    A tag without a single finite good bin (an image that could not be read,
    ``on_bad_tag="skip"``, which the reader fills with NaN) is NaN in every
    good bin, so that every pair it is in has no data and stays out of the
    statistics; ``image_ok`` records it.
    """
    norm, rmean = normalize_rows(raw, polar_mask)
    return _mark_dead(norm, rmean, polar_mask)


def _mark_dead(norm: np.ndarray, rmean: np.ndarray, polar_mask: np.ndarray) -> np.ndarray:
    """NaN in every good bin of the tags with no finite good bin (in place), from row means."""
    dead = ~image_ok_from_means(rmean, bool(polar_mask.any()))
    if dead.any():
        norm[dead] = np.where(polar_mask, np.float32(np.nan), np.float32(0))
    return norm


def image_ok_block(polar: np.ndarray, polar_mask: np.ndarray) -> np.ndarray:
    """False for tags with no finite good polar bin (unreadable image), (ntag,) bool."""
    pm = polar_mask.reshape(-1)
    first = int(np.argmax(pm))
    if not pm[first]:
        return np.ones(polar.shape[0], dtype=bool)
    flat = polar.reshape(polar.shape[0], -1)
    ok = np.isfinite(flat[:, first])  # almost always decides: no copy of the good bins
    for i in np.flatnonzero(~ok):
        ok[i] = bool(np.isfinite(flat[i]).any(where=pm))
    return ok


def image_ok_from_means(rmean: np.ndarray, any_good: bool) -> np.ndarray:
    """:func:`image_ok_block` of a normalised block, from its row means ``(ntag, nq)``.

    A tag has a finite good bin exactly when one of its row means is finite
    (a row's mean is over its finite good bins; float32 sums cannot overflow
    float64).
    """
    if not any_good:
        return np.ones(rmean.shape[0], dtype=bool)
    return np.isfinite(rmean).any(axis=1)


def row_mean_block(raw: np.ndarray, polar_mask: np.ndarray) -> np.ndarray:
    """Masked mean of each polar row of a block (intensity units), (ntag, nq)."""
    return normalize_rows(raw, polar_mask)[1]


def nonfinite_block(raw: np.ndarray) -> np.ndarray:
    """Number of polar bins hit by a non-finite pixel, per tag, (ntag,)."""
    return np.isnan(raw).sum(axis=(1, 2)).astype(np.int64)


def polar_chunk(windows: np.ndarray, op: PolarOperator,
                polar_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read block -> (normalised polar, row means, non-finite bin counts), one task.

    The raw polar block lives only inside this call and the rows are
    normalised once; :meth:`ProcessingPlan.polar` picks the three outputs.
    """
    _tune_worker_allocator(op.shape)
    raw, nonfinite_pixels = apply_polar(windows, op)
    return _finish_polar(raw, nonfinite_pixels, polar_mask)


def polar_chunk_from_run(sources: Sequence[TagSource], window: tuple[slice, slice],
                         on_bad_tag: str, op: PolarOperator, polar_mask: np.ndarray,
                         halo: TagSource | bool | None = None) -> tuple[np.ndarray, ...]:
    """:func:`polar_chunk` reading the tags itself, one image at a time (the pipeline's task).

    With ``halo`` (the tag before the chunk, for large polar images) the
    task also makes that tag's normalised polar image and returns it as a
    fourth output, a ``(1, nq, nphi)`` view (the halo of
    :func:`sacla_dask.correlation.pair_statistics`): the rows are normalised
    one by one, so it equals the previous chunk's last row. With
    ``halo=False`` (the first chunk of a run with halos) the fourth output
    is empty ``(0, nq, nphi)``.

    Each tag's window is read into one reused buffer and transformed at
    once, so the task holds one image and the chunk's polar block instead
    of a block of image windows (for the ring band 13 windows of ~10 MB
    are replaced by one, with none of their page faults).

    With a compact operator (:meth:`PolarOperator.compact`, what the
    pipeline ships) only the pixels it reads are read
    (:func:`sacla_dask.io.hdf5.read_pixels`): for the ring band ~0.8 MB of an
    image instead of its ~10 MB window. A compact pixel pick (the default
    ``nearest`` method without corrections) reads each bin's pixel straight
    into the polar image (:meth:`PolarOperator.bin_offsets`,
    :func:`polar_from_pick`).
    """
    _tune_worker_allocator(op.shape)
    first = 0
    if halo is not None and halo is not False:
        sources, first = [halo, *sources], 1
    nq, nphi = op.shape
    raw = np.empty((len(sources), nq, nphi), dtype=np.float32)
    nonfinite_pixels = np.zeros(len(sources), dtype=np.int64)
    if op.pixels is not None and op.gather is not None:
        # a pixel pick: each bin's pixel read straight into the polar image, one gather
        def picked(i: int, y: np.ndarray) -> None:
            nonfinite_pixels[i] = polar_from_pick(y, op)

        _hdf5.read_pixels(sources, window, op.bin_pixels, op.bin_offsets, on_bad_tag,  # type: ignore[arg-type]
                         picked, into=raw.reshape(len(sources), -1).__getitem__)
    elif op.pixels is not None:
        def take(i: int, x: np.ndarray) -> None:
            nonfinite_pixels[i] = polar_from_columns(x, op, raw[i])

        _hdf5.read_pixels(sources, window, op.pixels, op.row_offsets, on_bad_tag,  # type: ignore[arg-type]
                         take)
    else:
        buf: list[np.ndarray] = []

        def consume(i: int, win: np.ndarray) -> None:
            nonfinite_pixels[i] = apply_polar_into(win, op, raw[i], buf)

        _hdf5._read_block(sources, window, on_bad_tag, consume=consume)  # type: ignore[arg-type]
    norm, rmean, nan_bins = _finish_polar(raw, nonfinite_pixels, polar_mask)
    if halo is None:
        return norm, rmean, nan_bins
    return norm[first:], rmean[first:], nan_bins[first:], norm[:first]


#: polar images of at least this many bytes (a wide band's 28 MB, not the ring's 0.8 MB)
#: are made with a halo: each tag chunk's task also makes the previous chunk's last image
#: (one image more per chunk), so that the correlation of the pair across the chunk
#: boundary waits for no other task and copies no row out of the previous block, which may
#: be on the other worker (wide band, 2 workers: see benchmarks/README.md)
HALO_IMAGE_BYTES = 4 << 20

#: A band whose pixels are at most this fraction of its bounding-box window is read
#: pixel by pixel (:meth:`PolarOperator.compact`, :func:`sacla_dask.io.hdf5.read_pixels`).
COMPACT_MAX_FRACTION = 0.5


def worker_operator(op: PolarOperator) -> PolarOperator:
    """The operator the pipeline ships to its workers for ``op``.

    A thin band (the ring: ~7 % of its window) is compacted: the workers
    read and hold weights for only its pixels (ring band, 2 workers: 187-197
    -> 211-235 img/s, same-hour A/B in benchmarks/README.md). A band that
    fills most of its window (the wide band: 75 %) gains little from it and
    keeps the window read, with which its workers' peak memory measured
    100-200 MiB lower; it ships without its coverage
    (:meth:`PolarOperator.for_workers`).
    """
    if op.pixels is None and (np.count_nonzero(op.used_columns)
                              <= COMPACT_MAX_FRACTION * op.n_columns):
        return op.compact()
    return op.for_workers()


def _finish_polar(raw: np.ndarray, nonfinite_pixels: np.ndarray,
                  polar_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # NaN bins exist only in images where the operator read a non-finite pixel
    nan_bins = np.zeros(raw.shape[0], dtype=np.int64)
    for i in np.flatnonzero(nonfinite_pixels):
        nan_bins[i] = int(np.count_nonzero(np.isnan(raw[i])))
    rmean = normalize_rows(raw, polar_mask, out=raw)[1]  # in place: raw is ours
    return _mark_dead(raw, rmean, polar_mask), rmean, nan_bins


def _picked(parts: da.Array, i: int, chunks: tuple[tuple[int, ...], ...], dtype: Any,
            label: str) -> da.Array:
    """Output ``i`` of the tuple-valued blocks of ``parts`` (chunked on its first axis).

    A plain graph layer, not a blockwise one, so that no later blockwise
    fusion can fuse ``parts``'s work into a consumer and redo it there;
    :meth:`ProcessingPlan.execute` inlines it into its consumers
    (:func:`sacla_dask.scheduling.inline_picks`).
    """
    name = pick_layer_name(label, dask.base.tokenize(parts.name, i))
    rest = (0,) * (len(chunks) - 1)
    dsk = {(name, j) + rest: (operator.getitem, (parts.name, j, 0, 0), i)
           for j in range(len(chunks[0]))}
    with chunk_first():
        graph = HighLevelGraph.from_collections(name, dsk, dependencies=[parts])
    return da.Array(graph, name, chunks, meta=np.empty((0,) * len(chunks), dtype))


#: glibc policy set in this process by :func:`tune_allocator` (None: untouched)
_ALLOCATOR_MODE: str | None = None
#: polar image bytes from which workers keep freed memory for reuse (see tune_allocator)
RETAIN_IMAGE_BYTES = 4 << 20


def _tune_worker_allocator(polar_shape: tuple[int, int]) -> None:
    """:func:`tune_allocator` for a task's float32 polar image ``(nq, nphi)``, in a Dask
    worker only.

    A user's own process (a notebook with the threaded scheduler) is left alone.
    """
    nq, nphi = polar_shape
    mode = "retain" if 4 * nq * nphi >= RETAIN_IMAGE_BYTES else "release"
    if _ALLOCATOR_MODE == mode or "distributed" not in sys.modules:
        return  # (a worker has distributed imported; this process need not import it)
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return
    tune_allocator(mode)


def tune_allocator(mode: str = "release") -> bool:
    """Set glibc's policy for large blocks in this process (a Dask worker).

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which
    also freezes glibc's mmap threshold at 128 KiB: every array over 128 KiB
    is a fresh ``mmap`` whose pages the kernel must zero (and, on a VM with
    free page reporting such as the benchmark machine, the host must back
    again: ~0.75 ms per MB there) on first touch. Two policies:

    ``"release"`` (small polar images, e.g. the ring band)
        Allocations under 4 MiB come from the heap and are reused (up to
        32 MiB of free heap kept); larger ones (polar blocks) stay mmaps,
        returned to the OS when freed. Fresh memory per image is ~1 MB and
        a worker's memory follows what its tasks hold (ring band: 13 000
        -> ~170 page faults per image against the nanny's setting).
    ``"retain"`` (polar images of ``RETAIN_IMAGE_BYTES`` or more, e.g. the
    wide band)
        Every allocation comes from the heap (``M_MMAP_MAX = 0``) and free
        memory is kept: a worker allocates the same large sizes task after
        task (27.6 MB polar images, 110 MB partial sums, message buffers),
        which would otherwise cost ~55 MB of fresh pages per image (wide
        band, 2 workers, 128 tags, the same hour: 5.5-8.6 -> 10.1 img/s).
        With one glibc arena (:data:`sacla_dask.cluster.WORKER_ENV`,
        ``MALLOC_ARENA_MAX=1``) a wide-band worker then faults in ~4 pages
        per image. The ring band does not use it: its gain there was within
        noise and its peak RSS rose (366 -> 455 MiB for 1000 tags).
        benchmarks/README.md.

    Returns whether glibc accepted the settings (False off glibc or when
    ``SACLA_DASK_MALLOC_TUNE=0``).
    """
    global _ALLOCATOR_MODE
    if mode not in ("release", "retain"):
        raise ParameterError(f"allocator mode must be 'release' or 'retain' (got {mode!r})")
    _ALLOCATOR_MODE = mode
    if os.environ.get("SACLA_DASK_MALLOC_TUNE", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4
        if mode == "retain":
            return bool(libc.mallopt(m_trim_threshold, 2**31 - 1)
                        and libc.mallopt(m_mmap_max, 0))
        ok = bool(libc.mallopt(m_mmap_max, 65536)  # glibc's default
                  and libc.mallopt(m_trim_threshold, 32 << 20)
                  and libc.mallopt(m_mmap_threshold, 4 << 20))
        libc.malloc_trim(0)  # what "retain" kept, if it was set before
        return ok
    except (OSError, AttributeError):  # not glibc
        return False


def bragg_block(norm: np.ndarray, polar_mask: np.ndarray, nsigma: float) -> np.ndarray:
    """Normalised polar block with Bragg spots set to NaN and rows renormalised."""
    return mask_bragg_spots(norm, polar_mask, nsigma)[0]


def nan_count_block(x: np.ndarray) -> np.ndarray:
    """Bins set to NaN (masked for that shot only) per polar row, (ntag, nq) int32."""
    return np.isnan(x).sum(axis=-1).astype(np.int32)


class PolarReloader:
    """Re-read a few shots and redo their polar steps (rows of rejected pairs).

    ``reloader(positions)`` returns the normalised (and, with ``bragg``,
    spot-masked) polar images of the tags at those sorted positions, with
    the very kernels of the main pass: used by
    :func:`sacla_dask.correlation.pair_statistics` to subtract rejected
    pairs without keeping the run's polar images in memory.
    """

    def __init__(self, run: Run, window: tuple[slice, slice], operator: PolarOperator,
                 polar_mask: np.ndarray, bragg: float | None = None) -> None:
        self.run = run
        self.window = window
        self.operator = operator
        self.polar_mask = polar_mask
        self.bragg = bragg

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        pos = np.asarray(positions, dtype=np.int64)
        keep = np.zeros(len(self.run), dtype=bool)
        keep[pos] = True
        sub = self.run.select(keep)
        imgs = sub.images(chunks=max(1, int(keep.sum())), window=self.window)
        norm = normalized_block(polar_block(imgs.compute(scheduler="sync"), self.operator),
                                self.polar_mask)
        if self.bragg:
            norm = bragg_block(norm, self.polar_mask, self.bragg)
        return norm


def _feature_block(windows: np.ndarray, op: PolarOperator, polar_mask: np.ndarray,
                   kind: str) -> np.ndarray:
    norm, rmean = normalize_rows(polar_block(windows, op), polar_mask)
    np.nan_to_num(norm, copy=False, nan=1.0)  # a bin hit by a bad pixel: no signal (the mean)
    if kind == "intensity":
        return np.nanmean(rmean, axis=1)[:, None]
    if kind == "profile":
        return rmean / np.nanmean(rmean, axis=1, keepdims=True)
    # angular: the q-averaged normalised profile in 64 phi sectors
    nphi = polar_mask.shape[1]
    edges = np.linspace(0, nphi, min(64, nphi) + 1).astype(int)[:-1]
    num = np.add.reduceat(norm.astype(np.float64).sum(axis=1), edges, axis=-1)
    den = np.add.reduceat(polar_mask.sum(axis=0).astype(np.float64), edges)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, 0.0)


def shot_features(run: Run, transform: PolarTransform, kind: str,
                  chunks: int | str = "128MiB") -> np.ndarray:
    """Per-tag features for pairing shots that look alike (NaN for dark shots).

    ``"pulse_energy"``: the event data (nothing read). The others read the
    band's window of every bright shot once (a pre-pass before the main
    one): ``"intensity"``, the band's mean intensity (1 value);
    ``"profile"``, the radial profile over the band divided by its mean
    (nq values); ``"angular"``, the normalised polar image averaged over q
    in 64 phi sectors (the angular profile RingData compared; note that
    pairing by it also cancels genuine shot-to-shot angular structure).

    Returns
    -------
    ndarray float64 (ntag, k)
    """
    if kind == "pulse_energy":
        if "pulse_energy" not in run.events:
            raise PairingError(f"no pulse energy in the event data of {run.paths}; choose "
                               "another pairing")
        v = np.asarray(run.events["pulse_energy"].values, dtype=np.float64)
        return np.where(run.selected, v, np.nan)[:, None]
    if kind not in ("intensity", "profile", "angular"):
        raise ParameterError(f"pairing feature must be one of {PAIRINGS[1:]} (got {kind!r})")
    nq, nphi = transform.shape
    k = {"intensity": 1, "profile": nq, "angular": min(64, nphi)}[kind]
    out = np.full((len(run), k), np.nan)
    bright = np.asarray(run.selected, dtype=bool)
    if not bright.any():
        return out
    images = run.select(bright).images(chunks=chunks, window=transform.window)
    op = dask.delayed(transform.operator, pure=True, traverse=False)
    feats = images.map_blocks(_feature_block, op, transform.polar_mask, kind, drop_axis=(1, 2),
                              new_axis=1, chunks=(images.chunks[0], (k,)), dtype=np.float64,
                              meta=np.empty((0, 0), np.float64))
    out[bright] = _compute([feats])[0]
    return out


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
    pairing: str = "consecutive"
    bragg: float | None = None
    reject_outliers: float | None = None
    bootstrap: int = 0
    ci_level: float = 0.95
    keep_pairs: bool = False
    #: ``tags_per_chunk`` came from ``chunks="auto"``: :meth:`execute` sizes it again for
    #: the workers that run it (:meth:`settle_chunks`)
    auto_chunks: bool = False
    #: where :meth:`execute` will run, when known (:func:`sacla_dask.engine.choose_engine`)
    engine: Engine | None = None
    #: the halo (:data:`HALO_IMAGE_BYTES`) of each normalised polar array :meth:`polar`
    #: made, by the array's name
    _halos: dict[str, da.Array] = dataclasses.field(default_factory=dict, init=False,
                                                    repr=False, compare=False)

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
            "tags": (f"{self.n_tags} ({t[0]}..{t[-1]}), {int(self.run.bright.sum())} bright, "
                     f"{int(self.run.selected.sum())} selected"
                     + (f", {len(self.run.bad_tags)} bad left out" if self.run.bad_tags else "")),
            "pairs": (f"{self.ia.size} {self.pairing} ({self.n_pairs_dropped} dropped: tags "
                      "missing or not selected)"),
            "correlation": self._correlation_summary(),
            "geometry": (f"centre ({g.center_x:.2f}, {g.center_y:.2f}) px, pixel "
                         f"{g.pixel_size * 1e6:g} um, distance {g.distance * 1e3:g} mm, "
                         f"wavelength {g.wavelength:.4f} A"),
            "q band": (f"{self.transform.qmin:g}..{self.transform.qmax:g} 1/A "
                       f"(r = {self.transform.radius[0]:.1f}..{self.transform.radius[-1]:.1f} px)"),
            "polar grid": (f"{nq} q x {nphi} phi ({self.transform.method}"
                           + (f", {self.transform.operator.corrections}"
                              if self.transform.operator.corrections != "none" else "")
                           + (f"; one pixel of arc is {n1} phi, rounded up for the FFT"
                              if (n1 := self.transform.grid.nphi_default) != nphi else "")
                           + ")"),
            "read": (f"{wy}x{wx} window of {ny}x{nx} images: "
                     f"{dask.utils.format_bytes(self.bytes_to_read)}"),
            "chunks": f"{self.n_chunks} x {self.tags_per_chunk} tags"
                      + (" (auto: sized again for the workers that run it)"
                         if self.auto_chunks else ""),
            "operator": dask.utils.format_bytes(self.transform.operator.nbytes),
            **({"engine": str(self.engine)} if self.engine is not None else {}),
            "output": (f"{self.out or '(in memory)'}"
                       + (f", polar {dask.utils.format_bytes(self.polar_nbytes)} "
                          f"({self.compression})" if self.store_polar else ", correlation only")),
        }

    def _correlation_summary(self) -> str:
        a = self.correlation_attrs()
        parts = [f"autocorrelation + {self.correlation_plan().n_cross} cross q pairs"]
        if self.bragg:
            parts.append(f"Bragg spots > {self.bragg:g} sigma masked")
        if self.reject_outliers:
            parts.append(f"pairs > {self.reject_outliers:g} sigma rejected")
        if self.bootstrap:
            parts.append(f"{self.bootstrap} bootstrap resamples ({100 * self.ci_level:g}% CI)")
        if self.keep_pairs:
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

    # -- the lazy result -------------------------------------------------
    def correlation_plan(self) -> CorrelationPlan:
        return make_plan(self.transform.polar_mask, self.q_pairs)

    def polar(self) -> tuple[da.Array, da.Array, da.Array]:
        """Lazy (normalised polar, row means, non-finite bin counts) over tags."""
        tr = self.transform
        nq, nphi = tr.shape
        op = dask.delayed(worker_operator(tr.operator), pure=True, traverse=False)
        pm = tr.polar_mask
        # One task per chunk reads, transforms and normalises; three cheap
        # tasks pick its outputs. The read is part of the task, not a graph
        # layer of its own: an unfused read would hold (and might ship)
        # each block of image windows.
        pmk = dask.delayed(pm, pure=True, traverse=False)
        images = self.run.images(chunks=self.tags_per_chunk, window=tr.window)
        tchunks = images.chunks[0]
        # (polar_chunk_from_run): it reads its tags one by one and transforms each
        # at once, so the chunk's image windows are never held together
        with_halo = nq * nphi * 4 >= HALO_IMAGE_BYTES and len(tchunks) > 1
        name = "polar-chunk-" + dask.base.tokenize(images.name, op, pmk, with_halo)
        sources = self.run.sources
        bounds = np.cumsum((0,) + tchunks)
        dsk: dict[Any, Any] = {}
        for c in range(len(tchunks)):
            dsk[(name, c, 0, 0)] = (polar_chunk_from_run, sources[bounds[c]:bounds[c + 1]],
                                    tr.window, self.run.on_bad_tag, op.key, pmk.key)
            if with_halo:
                dsk[(name, c, 0, 0)] += (sources[bounds[c] - 1] if c else False,)
        with chunk_first():  # a worker finishes an older block's work before a newer read
            graph = HighLevelGraph.from_collections(name, dsk, dependencies=[op, pmk])
        parts = da.Array(graph, name, (tchunks, (nq,), (nphi,)),
                         meta=np.empty((0, 0, 0), np.float32))
        norm = _picked(parts, 0, (tchunks, (nq,), (nphi,)), np.float32, "polar-normalized")
        rmean = _picked(parts, 1, (tchunks, (nq,)), np.float64, "polar-row-mean")
        nonfinite = _picked(parts, 2, (tchunks,), np.int64, "nonfinite-bins")
        if with_halo:
            hchunks = (0,) + (1,) * (len(tchunks) - 1)
            self._halos[norm.name] = _picked(parts, 3, (hchunks, (nq,), (nphi,)), np.float32,
                                             "polar-halo")
        return norm, rmean, nonfinite

    def dataset(self, polar: tuple[da.Array, da.Array, da.Array] | None = None) -> xr.Dataset:
        """The whole result as a lazy, labelled xarray Dataset.

        ``polar``: the (normalised polar, row means, non-finite counts)
        triple to build on instead of :meth:`polar` (a resumed run passes
        one whose finished chunks are read back from the store).
        """
        tr = self.transform
        norm, rmean, nonfinite = self.polar() if polar is None else polar
        cplan = self.correlation_plan()
        nq, nphi = tr.shape
        tags = self.run.tags
        n = int(self.ia.size)
        src = norm
        if self.bragg:
            src = norm.map_blocks(bragg_block, tr.polar_mask, float(self.bragg), dtype=np.float32,
                                  meta=np.empty((0, 0, 0), np.float32), token="polar-bragg")
        st = pair_statistics(src, self.ia, self.ib, cplan, reject=self.reject_outliers,
                             n_boot=self.bootstrap, ci=self.ci_level,
                             keys=np.stack([tags[self.ia], tags[self.ib]], axis=1),
                             keep_pairs=self.keep_pairs,
                             reload=self._reloader(src) if self.reject_outliers else None,
                             halo=self._halos.get(src.name))
        with chunk_first():
            image_ok = rmean.map_blocks(self._derived()["image_ok"][0], drop_axis=1,
                                        dtype=bool, meta=np.empty((0,), bool),
                                        token="image-ok")
        nf = nphi // 2 + 1
        fourier = st.mean.map_blocks(fourier_coefficients, chunks=((cplan.nqp,), (nf,)),
                                     dtype=np.complex128, meta=np.empty((0, 0), np.complex128))
        coords: dict[str, Any] = {
            "tag": ("tag", tags, {"long_name": "SACLA tag number"}),
            "q": ("q", tr.q, {"units": "1/angstrom", "long_name": "momentum transfer"}),
            "radius": ("q", tr.radius, {"units": "pixel", "long_name": "radius from beam centre"}),
            "phi": ("phi", tr.phi, {"units": "rad", "long_name": "azimuth atan2(y-cy, x-cx)"}),
            "dphi": ("dphi", tr.phi.copy(), {"units": "rad", "long_name": "azimuthal lag"}),
            "n": ("n", np.arange(nf), {"long_name": "angular Fourier order"}),
            "pair": ("pair", np.arange(n)),
        }
        data: dict[str, Any] = {
            "polar_mask": (("q", "phi"), tr.polar_mask),
            "coverage": (("q", "phi"), tr.operator.coverage,
                         {"long_name": "fraction of interpolation weight on good pixels"}),
            "row_mean": (("tag", "q"), rmean, {"long_name": "masked mean of each polar row "
                                                           "before normalisation"}),
            # from the row means, not from norm: a consumer of norm that runs
            # late (its output is only needed at the end) keeps norm in memory
            "image_ok": (("tag",), image_ok,
                {"long_name": "image read and finite in the band (False: left out of every "
                              "pair)"}),
            "nonfinite_bins": (("tag",), nonfinite,
                               {"long_name": "polar bins hit by NaN/inf pixels (NaN in polar: "
                                             "left out of the pairs of that shot)"}),
            "pair_tag_a": (("pair",), tags[self.ia]),
            "pair_tag_b": (("pair",), tags[self.ib]),
            "pair_stat": (("pair",), st.stat,
                          {"long_name": "mean squared normalised difference (bins valid in "
                                        "both shots)"}),
            "pair_rejected": (("pair",), st.rejected,
                              {"long_name": "left out of the averages as an outlier",
                               "reject_nsigma": float(self.reject_outliers or 0)}),
        }
        if self.store_polar:
            data["polar"] = (("tag", "q", "phi"), norm,
                             {"long_name": "row-normalised polar intensity, 0 where masked, "
                                           "NaN where hit by a non-finite pixel"})
        if self.bragg:
            data["bragg_bins"] = (("tag", "q"),
                                  src.map_blocks(nan_count_block, drop_axis=2, dtype=np.int32,
                                                 meta=np.empty((0, 0), np.int32),
                                                 token="bragg-bins"),
                                  {"long_name": "polar bins masked as Bragg spots",
                                   "nsigma": float(self.bragg)})
        if self.reject_outliers:
            data["pair_stat_threshold"] = ((), st.threshold, {
                "long_name": "pair_stat above which pairs are rejected",
                "reject_nsigma": float(self.reject_outliers)})
        rows = {"": slice(0, nq)}
        if cplan.n_cross:
            rows["_cross"] = slice(nq, None)
            cq1, cq2 = cplan.q1[nq:], cplan.q2[nq:]
            coords["q1"] = ("qpair", tr.q[cq1], {"units": "1/angstrom"})
            coords["q2"] = ("qpair", tr.q[cq2], {"units": "1/angstrom"})
            coords["q1_index"] = ("qpair", cq1, {"long_name": "q row index of q1"})
            coords["q2_index"] = ("qpair", cq2, {"long_name": "q row index of q2"})
        what = {"": "difference autocorrelation C(q, q, dphi)",
                "_cross": "difference cross-correlation C(q1, q2, dphi)"}
        for suffix, sl in rows.items():
            dim = "q" if suffix == "" else "qpair"
            w = what[suffix]
            data[f"corr{suffix}"] = ((dim, "dphi"), st.mean[sl], {"long_name": f"mean {w}"})
            data[f"corr{suffix}_sem"] = ((dim, "dphi"), st.sem[sl], {
                "long_name": "standard error of the mean over pairs (pairs sharing a "
                             "shot with the pair before them counted as correlated: "
                             "attrs linked_pairs, unlinked_sharing)"})
            data[f"corr{suffix}_count"] = ((dim, "dphi"), st.count[sl], {
                "long_name": "pairs with data in the bin (0: no valid bin pair, mean NaN)"})
            f = fourier[sl].real if suffix == "" else fourier[sl]
            data[f"corr{suffix}_fourier"] = ((dim, "n"), f, {
                "long_name": f"angular Fourier coefficients c_n of the mean {w}: "
                             "C(dphi) = sum_n c_n exp(i n dphi), c_-n = conj(c_n)"})
            if st.ci_low is not None:
                lvl = f"{100 * self.ci_level:g}%"
                data[f"corr{suffix}_ci_low"] = ((dim, "dphi"), st.ci_low[sl], {
                    "long_name": f"lower {lvl} Poisson-bootstrap percentile bound"})
                data[f"corr{suffix}_ci_high"] = ((dim, "dphi"), st.ci_high[sl], {
                    "long_name": f"upper {lvl} Poisson-bootstrap percentile bound"})
                data[f"corr{suffix}_fourier_ci_low"] = ((dim, "n"), st.fourier_ci_low[sl], {
                    "long_name": f"lower {lvl} bootstrap bound of Re c_n"})
                data[f"corr{suffix}_fourier_ci_high"] = ((dim, "n"), st.fourier_ci_high[sl], {
                    "long_name": f"upper {lvl} bootstrap bound of Re c_n"})
            if st.pairs is not None:
                per = max(1, (32 << 20) // max(1, cplan.nqp * nphi * 4))
                data[f"corr{suffix}_pairs"] = (("pair", dim, "dphi"),
                                               st.pairs.rechunk({0: per})[:, sl], {
                    "long_name": f"per-pair {w} (float32; NaN: no valid bin pair)"})
        # pairs with data (not those with an unreadable image), after rejection
        data["n_pairs"] = ((), st.n_pairs,
                           {"long_name": "pairs averaged (after outlier rejection)"})
        for name in self.run.events.data_vars:
            ev = self.run.events[name]
            data[f"event_{name}" if name in data else name] = ("tag", ev.values, ev.attrs)
        ds = xr.Dataset(data, coords=coords)
        ds.attrs.update(self.attrs())
        ds.attrs.update(self.correlation_attrs())
        return ds

    def _reloader(self, src: da.Array) -> Any:
        """A lazy :class:`PolarReloader`: one graph key holding the run and the operator."""
        from dask.delayed import Delayed
        from dask.highlevelgraph import HighLevelGraph

        tr = self.transform
        key = "polar-reloader-" + dask.base.tokenize(src.name, self.bragg)
        reloader = PolarReloader(self.run, tr.window, tr.operator, tr.polar_mask, self.bragg)
        return Delayed(key, HighLevelGraph.from_collections(key, {key: reloader}))

    def _record_unreadable(self, out: str, image_ok: np.ndarray | None) -> None:
        """List the tags found unreadable while computing in the store's attrs, and warn.

        (Their reader warnings stay on the workers with a distributed client.)
        """
        if image_ok is None or np.all(image_ok):
            return
        bad = self.run.tags[~np.asarray(image_ok, dtype=bool)]
        paths = self.run.tag_paths()
        where = {int(t): paths[i] for i, t in enumerate(self.run.tags)}
        msgs = [f"{where[int(t)]!r} tag {int(t)}: image unreadable (or not finite anywhere "
                "in the band) at read time; left out of every pair" for t in bad]
        a = self.attrs()
        _store.set_attrs(out, bad_tags=a["bad_tags"] + msgs,
                         bad_tag_numbers=a["bad_tag_numbers"] + [int(t) for t in bad])
        import warnings

        warnings.warn(f"{bad.size} tag(s) could not be read and were left out of every pair: "
                      f"{bad[:10].tolist()}{'...' if bad.size > 10 else ''} (listed in the "
                      f"store's bad_tags attr)", stacklevel=3)

    def correlation_attrs(self) -> dict[str, Any]:
        """Root attrs describing the pairing and the statistics over pairs."""
        if isinstance(self.q_pairs, str) or self.q_pairs is None:
            qp = "none" if self.q_pairs in (None, "auto", "none") else str(self.q_pairs)
        else:
            qp = ",".join(f"{a}:{b}" for a, b in np.asarray(self.q_pairs).reshape(-1, 2))
        pairs = np.stack([self.ia, self.ib], axis=1)
        order = pair_order(self.ia, self.ib)
        linked = int(pair_links(self.ia[order], self.ib[order]).sum())
        return {
            "pairing": self.pairing,
            "n_pairs_requested": int(len(self.pairs)),
            "shared_shots": shared_shots(pairs),
            "linked_pairs": linked,
            "unlinked_sharing": sharing_pairs(pairs) - linked,
            "q_pairs": qp,
            "bragg_nsigma": float(self.bragg or 0),
            "reject_nsigma": float(self.reject_outliers or 0),
            "bootstrap": int(self.bootstrap),
            "ci_level": float(self.ci_level),
        }

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
            "solid_angle": tr.solid_angle, "polarization": tr.polarization,
            "run": [int(r) for r in self.run.runs] if len(self.run.runs) > 1
            else int(self.run.run_number),
            "source": [os.path.abspath(p) for p in self.run.paths] if len(self.run.paths) > 1
            else os.path.abspath(self.run.paths[0]),
            "sources": [os.path.abspath(p) for p in self.run.paths],
            "bad_tags": [str(b) for b in self.run.bad_tags],
            "bad_tag_numbers": [int(b.tag) for b in self.run.bad_tags],
            "selection": self.run.selection,
            "n_pairs_dropped": int(self.n_pairs_dropped),
            "tags_per_chunk": int(self.tags_per_chunk),
            "sacla_dask_version": __version__,
            "complete": False,
        }

    # -- execution ---------------------------------------------------------
    def execute(self, progress: bool = False, overwrite: bool = False,
                resume: bool = True) -> xr.Dataset:
        """Compute the result into the plan's Zarr store and open it.

        Uses whatever Dask scheduler is active (a distributed client if one
        is). The store is written tag chunk by tag chunk (see
        :mod:`sacla_dask.store`): a killed run keeps its finished chunks, and
        executing the same plan again computes only the missing ones, then
        the reductions over pairs. ``complete`` is set only once every array
        is written.

        Parameters
        ----------
        progress : bool
            Show a progress bar (``distributed.progress`` with a client,
            else ``dask.diagnostics.ProgressBar``) and say what is resumed.
        overwrite : bool
            Replace whatever is at the output path.
        resume : bool
            Continue an unfinished store written with the same parameters
            (a complete one is returned as it is). A store of other
            parameters is always refused unless ``overwrite``.
        """
        planned = self.tags_per_chunk
        state, ds, fresh, names, params, sha = self._output_state(overwrite, resume)
        out = str(self.out)
        if self.tags_per_chunk != planned:
            _say(progress, f"chunks: {self.n_chunks} x {self.tags_per_chunk} tags (auto: "
                           + ("as the store to resume" if state != "absent" else
                              "for the workers running it") + f"; planned {planned})")
        if state == "complete":
            _say(progress, f"{out} is already complete (same parameters): nothing to compute")
            return _store.open_result(out)
        if state == "absent":
            _store.write_template(out, ds, names + list(self._derived()), self.tags_per_chunk,
                                  self.compression, params, sha)
            done = np.zeros(self.n_chunks, dtype=bool)
        else:
            done = _store.done_chunks(out, self.n_chunks)
            _say(progress, f"resuming {out}: {int(done.sum())} of {self.n_chunks} tag chunks "
                           "already written")
        return self._write(out, ds, fresh, names, done, progress)

    def check_output(self, overwrite: bool = False, resume: bool = True) -> str:
        """Refuse a bad output path now, before any cluster starts (removes nothing).

        Returns the state :meth:`execute` will find: ``"absent"``,
        ``"incomplete"`` (to resume) or ``"complete"``.
        """
        return self._output_state(overwrite, resume, check_only=True)[0]

    def settle_chunks(self, overwrite: bool = False, resume: bool = True) -> int:
        """Size ``chunks="auto"`` for the scheduler active now; returns tags per chunk.

        :meth:`execute` (and :meth:`check_output`) call it first: a plan made
        before its cluster started (the CLI prints the plan, then starts the
        cluster) gets chunks sized for the workers that run it; a store to
        be resumed keeps the chunking it was started with (a resumed run on
        other workers would otherwise choose differently, and the store
        could not be resumed). When the workers' memory is not known (batch
        jobs not started yet) the plan's choice stays. Explicit chunks are
        never changed.
        """
        if not self.auto_chunks:
            return self.tags_per_chunk
        stored = None
        if self.out is not None and resume and not overwrite:
            stored = _store.stored_parameters(self.out).get("tags_per_chunk")
        if isinstance(stored, int) and stored >= 1:
            per = stored
        else:
            mem = memory_per_thread()
            if mem is None:
                return self.tags_per_chunk
            per = tags_per_chunk("auto", self.n_tags, self.transform.shape, memory=mem)
        if per != self.tags_per_chunk:
            log.info("chunks='auto': %d tags per chunk (planned with %d)%s", per,
                     self.tags_per_chunk, " as in the store to resume" if stored else "")
            self.tags_per_chunk = per
        return per

    def _output_state(self, overwrite: bool, resume: bool, check_only: bool = False) -> tuple:
        if self.out is None:
            raise ParameterError("the plan has no output store (out=...)")
        self.settle_chunks(overwrite, resume)
        out = self.out
        fresh = self.polar()
        ds = self.dataset(polar=fresh)
        # the per-tag arrays written chunk by chunk (and resumed); correlation only keeps
        # no polar images at all: they can be larger than the raw input (a wide band)
        names = (["polar"] if self.store_polar else []) + ["row_mean", "nonfinite_bins"]
        for name, arr in zip(names, self._kept(fresh), strict=True):
            if name in ds and getattr(ds[name].data, "name", None) != arr.name:
                raise RuntimeError(f"dataset variable {name!r} is not the polar() array")
        params, sha = _store.parameters(
            ds, compression=self.compression, store_polar=self.store_polar,
            source_bytes=[os.path.getsize(p) for p in self.run.paths],
            # 2: image_ok written with each tag chunk (an unfinished store of layout 1
            # has it only at the end, so it cannot be resumed)
            store_layout=2)
        state = _store.prepare_output(out, overwrite=overwrite, resume=resume,
                                      fingerprint=sha, params=params, check_only=check_only)
        return state, ds, fresh, names, params, sha

    def _kept(self, fresh: Sequence[da.Array]) -> list[da.Array]:
        """The arrays of :meth:`polar` that the store keeps per tag chunk."""
        return list(fresh) if self.store_polar else list(fresh[1:])

    def _derived(self) -> dict[str, tuple[Callable[[np.ndarray], np.ndarray], str]]:
        """Per-tag flags from a chunk's row means: the lazy dataset's kernel, and what each
        chunk write computes itself (no task of their own in :meth:`execute`)."""
        any_good = bool(self.transform.polar_mask.any())
        return {"image_ok": (functools.partial(image_ok_from_means, any_good=any_good),
                             "row_mean")}

    def _write(self, out: str, ds: xr.Dataset, fresh: Any, names: list[str], done: np.ndarray,
               progress: bool) -> xr.Dataset:
        arrays = {n: _store.resume_array(out, n, a, done)
                  for n, a in zip(names, self._kept(fresh), strict=True)}
        # correlation only: no polar images are stored, so a resumed run computes those of
        # the finished chunks again (from the raw images) for the pairs; it keeps their
        # written row means and counts
        polar = arrays["polar"] if self.store_polar else fresh[0]
        if any(arrays[n] is not a for n, a in zip(names, self._kept(fresh), strict=True)):
            # some chunks are read back from the store: the dataset of those arrays (else
            # the one given, made of the same arrays: a wide band's takes ~50 ms to make)
            ds = self.dataset(polar=(polar, arrays["row_mean"], arrays["nonfinite_bins"]))
        derived = self._derived()
        writes = _store.chunk_writes(out, arrays, ~done, derived)
        # everything else lazy (reductions over pairs...) is recomputed from the polar
        # images and stored by the workers too
        finals = {str(k): v.data for k, v in ds.variables.items()
                  if isinstance(v.data, da.Array) and k not in names and k not in derived}
        # the picks of the polar chunks' outputs run inside their consumers (3 tasks fewer
        # per tag chunk)
        # the graph carries the operator and the correlation plan once (each worker fetches
        # them once): that is by design, not the "large graph" distributed warns about
        settings: dict[str, Any] = {"delayed_optimize": inline_picks}
        if "distributed" in sys.modules:  # (setting a key of a config not loaded would drop
            # the whole tree on exit, should distributed be imported meanwhile)
            shipped = self.transform.operator.nbytes + sizeof(self.correlation_plan())
            settings["distributed.admin.large-graph-warning-threshold"] = max(10 << 20,
                                                                             2 * shipped)
        with dask.config.set(settings):
            _compute([writes, _store.array_writes(out, finals)], progress=progress)
        self._record_unreadable(out, _store.read_array(out, "image_ok"))
        _store.finish(out)
        return _store.open_result(out)


def _say(progress: bool, msg: str) -> None:
    """Tell the user (stderr, next to the progress bar) or the log."""
    if progress:
        print(msg, file=sys.stderr, flush=True)
    else:
        log.info(msg)


def _active_client() -> Any:
    if "distributed" not in sys.modules:  # no client without it (and no import for nothing)
        return None
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def _compute(objs: Sequence[Any], progress: bool = False) -> list[Any]:
    """Compute several collections at once with the active scheduler.

    With a distributed client: futures, ``distributed.progress`` on them
    (a text bar in a terminal, a widget in a notebook), then gather; a
    worker lost meanwhile only makes the scheduler recompute its tasks.
    Otherwise ``dask.compute`` (with ``dask.diagnostics.ProgressBar``).
    """
    client = _active_client()
    if client is not None and dask.config.get("scheduler", None) in (None, "dask.distributed"):
        futs = client.compute(list(objs))
        if progress:
            from distributed import progress as dprogress

            dprogress(futs)
        return list(client.gather(futs))
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar():
            return list(dask.compute(*objs))
    return list(dask.compute(*objs))


def tags_per_chunk(chunks: int | str, n_tags: int, polar_shape: tuple[int, int],
                   memory: int | None = None) -> int:
    """Tags per task for ``chunks`` (tags, bytes of polar images, or "auto") in a run of
    ``n_tags``.

    A size in bytes counts the float32 polar block a task holds (it reads
    its tags one by one). ``"auto"`` is ``AUTO_CHUNK_BYTES`` (32 MiB), raised
    to ``AUTO_MIN_TAGS`` (16) tags for large polar images as far as the
    block stays within ``AUTO_MEMORY_FRACTION`` (a tenth) of ``memory``,
    the bytes per worker thread (default: those of the active scheduler,
    :func:`sacla_dask.scheduling.memory_per_thread`; not known: no raise).
    Bytes and "auto" then take at least ``MIN_CHUNK_TAGS`` tags (a chunk's
    float64 partial sums of the correlation weigh as much as 4 polar
    images: with fewer tags they would outweigh the data) and make at
    least ``MIN_CHUNKS`` chunks (a short run still spreads over workers).

    Examples: the 40 x 5000 ring band, 41 tags; the 1000 x 6912 wide band
    (27.6 MB per image), 16 tags with 4.3 GiB or more per worker thread,
    7 with 2 GiB, never fewer than 4.
    """
    nq, nphi = polar_shape
    image = nq * nphi * 4
    if is_auto(chunks):
        per = max(1, AUTO_CHUNK_BYTES // image)
        if per < AUTO_MIN_TAGS:
            mem = memory_per_thread() if memory is None else memory
            per = max(per, min(AUTO_MIN_TAGS, int(AUTO_MEMORY_FRACTION * (mem or 0)) // image))
    else:
        per = parse_chunk_size(chunks, image)
    if isinstance(chunks, str):
        per = max(per, MIN_CHUNK_TAGS)
        per = max(1, min(per, math.ceil(max(n_tags, 1) / MIN_CHUNKS)))
    return per


def is_auto(chunks: int | str) -> bool:
    """Whether ``chunks`` asks for the default chunking (``"auto"``)."""
    return isinstance(chunks, str) and chunks.strip().lower() == "auto"


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
    fast_nphi: bool = True,
    solid_angle: bool = False,
    polarization: float | None = None,
    pairs: str | os.PathLike[str] | np.ndarray | None = None,
    overlapping: bool = True,
    pairing: str = "consecutive",
    q_pairs: Any = "auto",
    bragg: float | None = None,
    reject_outliers: float | None = None,
    bootstrap: int = 0,
    ci_level: float = 0.95,
    keep_pairs: bool = False,
    chunks: int | str = "auto",
    out: str | os.PathLike[str] | None = None,
    store_polar: bool = True,
    compression: str = "lz4",
    on_bad_tag: str = "fail",
    tag_range: tuple[int, int] | None = None,
    min_pulse_energy: float | None = None,
    skip_first: int | None = None,
    drop_unselected: bool = False,
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
    method : {"nearest", "bilinear", "splitting"}
        Polar resampling (:mod:`sacla_dask.polar`): the nearest pixel,
        bilinear interpolation, or pixel splitting (area overlap).
    fast_nphi : bool
        Round the default nphi up to an FFT-friendly length (default True;
        False: exactly one pixel of arc; an ``nphi`` given is used as it is).
    solid_angle : bool
        Divide by the pixels' relative solid angle (pyFAI's convention).
    polarization : float, optional
        Divide by the polarisation factor with this ``f`` in ``[-1, 1]``
        (pyFAI's ``polarization_factor``; horizontal = +x).
    pairs : path or (n, 2) array, optional
        Tag pairs (a JSON list of [tagA, tagB], the tutorial's format);
        pairs naming tags the run lacks are dropped and counted.
    overlapping : bool
        Consecutive pairs overlap (t1,t2),(t2,t3) (default) or not.
    pairing : {"consecutive", "intensity", "pulse_energy", "profile", "angular"}
        Without ``pairs``: consecutive bright shots, or shots that look
        alike (disjoint pairs nearest in the band's mean intensity, the
        pulse energy, the radial profile or the angular profile;
        :func:`sacla_dask.pairs.similar_pairs`). Except ``pulse_energy``,
        the similarity pairings read the band of every bright shot once
        more, here, to measure it.
    q_pairs : "auto"/"none", "all", "A:B,..." or (n, 2) int
        Cross-correlations besides the autocorrelations (always computed):
        none, every q1 <= q2, or the listed pairs of q row indices (or q
        values in 1/A with a decimal point); see
        :func:`sacla_dask.correlation.parse_q_pairs`.
    bragg : float, optional
        Mask polar bins more than this many robust sigmas (median/MAD of
        the row) above their row before correlating (Bragg spots); the
        mask normalisation is then that of each pair.
    reject_outliers : float, optional
        Leave out pairs whose mean squared difference is this many robust
        sigmas (of its log) above the median; recorded in ``pair_rejected``.
    bootstrap : int
        Poisson-bootstrap resamples for percentile intervals (0: none) at
        level ``ci_level``.
    keep_pairs : bool
        Keep every pair's correlation in the store (``corr_pairs``).
    chunks : int or str
        Tags per task, bytes of polar images per task ("128MiB"), or
        "auto" (the default, :func:`tags_per_chunk`): 32 MiB of polar
        images (41 tags of the 40 x 5000 ring band), but at least 16 tags
        where a tenth of a worker thread's memory holds them (a wide band's
        28 MB images: 16 tags with 4.3 GiB or more per worker, 7 with 2
        GiB). Sizes and "auto" give at least ``MIN_CHUNK_TAGS`` (4) tags per
        chunk (a chunk's float64 partial sums weigh as much as 4 polar
        images) and at least ``MIN_CHUNKS`` (8) chunks, so that a short run
        still keeps several workers busy. "auto" looks at the scheduler
        active when planning (a distributed client's workers, else this
        machine) and again when the plan executes, where an unfinished
        store keeps the chunking it was started with. A task reads its
        tags one at a time, so it holds its block of polar images and one
        image window; the chunk is also the unit of resumption
        (``_chunk_done``).
    out : path, optional
        Zarr store to write.
    store_polar : bool
        Keep the per-tag polar images in the store (else correlation only).
    compression : {"lz4", "zstd", "none"}
        Codec of the polar images in the store.
    on_bad_tag : {"fail", "skip"}
        A tag whose image is missing or damaged: stop with
        :class:`~sacla_dask.errors.BadTagError`, or go on without it (listed
        in the ``bad_tags`` attr; a tag found unreadable only while computing
        is left out of every pair and flagged in ``image_ok``).
    tag_range, min_pulse_energy, skip_first, drop_unselected
        Shot selection (:meth:`sacla_dask.io.run.Run.select_shots`): tags
        ``first..last`` only; shots with a pulse energy of at least this many
        joules; the first N exposures of each run dark (files without a
        pulse-selector status); leave unselected shots out instead of
        keeping them unpaired. Pairs (consecutive, similar or from a list)
        use selected shots only; the choice is in the ``selection`` attr and
        the ``bright``/``selected`` variables.
    """
    if not isinstance(run, Run):
        run = open_run(run, on_bad_tag=on_bad_tag)  # type: ignore[arg-type]
    if (tag_range is not None or min_pulse_energy is not None or skip_first
            or drop_unselected):
        run = run.select_shots(tag_range=tag_range, min_pulse_energy=min_pulse_energy,
                               skip_first=skip_first, drop_unselected=drop_unselected)
    if wavelength is None:
        wavelength = mean_wavelength(run)
    cx, cy = center
    geom = Geometry(cx, cy, pixel_size, distance, wavelength)
    mask_path = os.path.abspath(os.fspath(mask)) if isinstance(mask, (str, os.PathLike)) else None
    m = load_mask(mask, run.image_shape)
    transform = PolarTransform(geom, run.image_shape, qmin, qmax, nphi=nphi, nq=nq, mask=m,
                               method=method, fast_nphi=fast_nphi,  # type: ignore[arg-type]
                               solid_angle=solid_angle, polarization=polarization)
    if pairing not in PAIRINGS:
        raise ParameterError(f"pairing must be one of {PAIRINGS} (got {pairing!r})")
    if pairs is not None and pairing != "consecutive":
        raise ParameterError(f"give either pairs (a list of tag pairs) or pairing={pairing!r}, "
                             "not both")
    for name, v in (("bragg", bragg), ("reject_outliers", reject_outliers)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ParameterError(f"{name} must be a positive number of robust sigmas (got {v!r})")
    if int(bootstrap) != bootstrap or bootstrap < 0:
        raise ParameterError(f"bootstrap must be a number of resamples >= 0 (got {bootstrap!r})")
    if not 0 < ci_level < 1:
        raise ParameterError(f"ci_level must lie in (0, 1) (got {ci_level!r})")
    q_pairs = parse_q_pairs(q_pairs, transform.q)
    if pairs is None and pairing == "consecutive":
        pair_arr = consecutive_pairs(run.tags, run.selected, overlapping=overlapping)
    elif pairs is None:
        # (shot_features' own default chunking for "auto": its chunks are image windows)
        pair_arr = similar_pairs(run.tags, run.selected,
                                 shot_features(run, transform, pairing,
                                               **({} if is_auto(chunks) else {"chunks": chunks})))
    elif isinstance(pairs, (str, os.PathLike)):
        pair_arr = read_pairs_file(pairs)
        pairing = "file"
    else:
        pair_arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        pairing = "list"
    ia, ib, kept = pair_indices(pair_arr, run.tags)
    if not run.selected.all():  # pairs use selected shots only (user lists too)
        ok = run.selected[ia] & run.selected[ib]
        kept[np.flatnonzero(kept)[~ok]] = False
        ia, ib = ia[ok], ib[ok]
    if ia.size == 0:
        src = f" in {os.fspath(pairs)!r}" if isinstance(pairs, (str, os.PathLike)) else ""
        absent = np.setdiff1d(pair_arr, run.tags)[:5].tolist()
        raise PairingError(f"none of the {len(pair_arr)} pairs{src} has both tags in the run "
                           f"(tags {run.tags[0]}..{run.tags[-1]}; not in it: e.g. {absent})")
    per = tags_per_chunk(chunks, len(run), transform.shape)
    return ProcessingPlan(
        run=run, transform=transform, pairs=pair_arr, ia=ia, ib=ib,
        n_pairs_dropped=int((~kept).sum()), tags_per_chunk=per, auto_chunks=is_auto(chunks),
        out=os.fspath(out) if out is not None else None, store_polar=store_polar,
        q_pairs=q_pairs, compression=compression, mask_path=mask_path,
        pairing=pairing, bragg=bragg, reject_outliers=reject_outliers,
        bootstrap=int(bootstrap), ci_level=float(ci_level), keep_pairs=bool(keep_pairs),
    )


def process_run(run: Run | str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                out: str | os.PathLike[str], *, overwrite: bool = False,
                progress: bool = False, **kwargs: Any) -> xr.Dataset:
    """Plan and execute: process a run into the Zarr store ``out``.

    Keyword arguments are those of :func:`plan_run`. Returns the opened store.
    """
    plan = plan_run(run, out=out, **kwargs)
    return plan.execute(progress=progress, overwrite=overwrite)
