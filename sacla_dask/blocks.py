"""Per-tag-chunk kernels: numpy in, numpy out, one block of tags at a time.

Each function here is what one Dask task of the pipeline runs on one tag
chunk (a block of image windows, of raw or normalised polar images, or of
row means); :mod:`sacla_dask.graph` lifts them into the lazy graph. Shapes:
``ntag`` tags of the chunk, polar images ``(nq, nphi)`` (float32,
detector intensity units before normalisation, dimensionless after),
image windows ``(wy, wx)`` pixels. A chunk's task reads its tags itself
(:func:`polar_chunk_from_run`), one image at a time, so it never holds a
block of raw images.

The readers are called as attributes of :mod:`sacla_dask.io.hdf5`
(``hdf5.read_pixels``), so that a patched or worker-preloaded reader is the
one used.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from dask.sizeof import sizeof

from .correlation import mask_bragg_spots
from .io import hdf5
from .io.run import Run, TagSource
from .memory import tune_worker_allocator
from .polar import (
    PolarOperator,
    apply_polar,
    normalize_rows,
    polar_from_columns,
    polar_from_gathered,
)
from .polar import polar_into as apply_polar_into

#: phi sectors of the ``"angular"`` pairing feature (:func:`feature_block`)
ANGULAR_SECTORS = 64


@sizeof.register(PolarOperator)
def _sizeof_operator(op: PolarOperator) -> int:
    # what a worker holds for it (Dask's default for an object it does not know is a few
    # tens of bytes: a wide band's operator is ~165 MB)
    return int(op.nbytes)


def polar_block(windows: np.ndarray, op: PolarOperator) -> np.ndarray:
    """Raw polar intensities of a block of image windows, ``(ntag, nq, nphi)`` float32.

    NaN in a bin where the operator read a non-finite pixel.
    """
    return apply_polar(windows, op)[0]


def normalized_block(raw: np.ndarray, polar_mask: np.ndarray) -> np.ndarray:
    """Row-normalised polar block (dimensionless, 0 where masked), ``(ntag, nq, nphi)``.

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
    """False for tags with no finite good polar bin (unreadable image), ``(ntag,)`` bool."""
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
    float64). ``any_good``: whether the polar mask has a good bin at all.
    """
    if not any_good:
        return np.ones(rmean.shape[0], dtype=bool)
    return np.isfinite(rmean).any(axis=1)


def row_mean_block(raw: np.ndarray, polar_mask: np.ndarray) -> np.ndarray:
    """Masked mean of each polar row of a block (intensity units), ``(ntag, nq)`` float64."""
    return normalize_rows(raw, polar_mask)[1]


def nonfinite_block(raw: np.ndarray) -> np.ndarray:
    """Number of polar bins hit by a non-finite pixel, per tag, ``(ntag,)`` int64."""
    return np.isnan(raw).sum(axis=(1, 2)).astype(np.int64)


def polar_chunk(windows: np.ndarray, op: PolarOperator,
                polar_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block of image windows -> (normalised polar, row means, non-finite bin counts).

    The raw polar block lives only inside this call and the rows are
    normalised once. Equals :func:`normalized_block`, :func:`row_mean_block`
    and :func:`nonfinite_block` of :func:`polar_block`.
    """
    tune_worker_allocator(op.shape)
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
    of a block of image windows.

    With a compact operator (:meth:`PolarOperator.compact`) only the pixels
    it reads are read (:func:`sacla_dask.io.hdf5.read_pixels`). A compact
    pixel pick (the default ``nearest`` method without corrections) reads
    each bin's pixel straight into the polar image
    (:meth:`PolarOperator.bin_offsets`, :func:`polar_from_gathered`).
    """
    tune_worker_allocator(op.shape)
    first = 0
    if halo is not None and not isinstance(halo, bool):  # (False: the first chunk)
        sources, first = [halo, *sources], 1
    nq, nphi = op.shape
    raw = np.empty((len(sources), nq, nphi), dtype=np.float32)
    nonfinite_pixels = np.zeros(len(sources), dtype=np.int64)
    if op.pixels is not None and op.gather is not None:
        # a pixel pick: each bin's pixel read straight into the polar image, one gather
        def picked(i: int, y: np.ndarray) -> None:
            nonfinite_pixels[i] = polar_from_gathered(y, op)

        hdf5.read_pixels(sources, window, op.bin_pixels, op.bin_offsets, on_bad_tag,  # type: ignore[arg-type]
                         picked, into=raw.reshape(len(sources), -1).__getitem__)
    elif op.pixels is not None:
        def take(i: int, x: np.ndarray) -> None:
            nonfinite_pixels[i] = polar_from_columns(x, op, raw[i])

        hdf5.read_pixels(sources, window, op.pixels, op.row_offsets, on_bad_tag,  # type: ignore[arg-type]
                         take)
    else:
        buf: list[np.ndarray] = []

        def consume(i: int, win: np.ndarray) -> None:
            nonfinite_pixels[i] = apply_polar_into(win, op, raw[i], buf)

        hdf5._read_block(sources, window, on_bad_tag, consume=consume)  # type: ignore[arg-type]
    norm, rmean, nan_bins = _finish_polar(raw, nonfinite_pixels, polar_mask)
    if halo is None:
        return norm, rmean, nan_bins
    return norm[first:], rmean[first:], nan_bins[first:], norm[:first]


def _finish_polar(raw: np.ndarray, nonfinite_pixels: np.ndarray,
                  polar_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalise a raw polar block in place; count its NaN bins per tag."""
    # NaN bins exist only in images where the operator read a non-finite pixel
    nan_bins = np.zeros(raw.shape[0], dtype=np.int64)
    for i in np.flatnonzero(nonfinite_pixels):
        nan_bins[i] = int(np.count_nonzero(np.isnan(raw[i])))
    rmean = normalize_rows(raw, polar_mask, out=raw)[1]  # in place: raw is ours
    return _mark_dead(raw, rmean, polar_mask), rmean, nan_bins


def bragg_block(norm: np.ndarray, polar_mask: np.ndarray, nsigma: float) -> np.ndarray:
    """Normalised polar block with Bragg spots (``nsigma`` robust sigmas above their row)
    set to NaN and rows renormalised, ``(ntag, nq, nphi)``."""
    return mask_bragg_spots(norm, polar_mask, nsigma)[0]


def nan_count_block(x: np.ndarray) -> np.ndarray:
    """Bins set to NaN (masked for that shot only) per polar row, ``(ntag, nq)`` int32."""
    return np.isnan(x).sum(axis=-1).astype(np.int32)


def feature_block(windows: np.ndarray, op: PolarOperator, polar_mask: np.ndarray,
                  kind: str) -> np.ndarray:
    """Pairing features of a block of image windows, ``(ntag, k)`` float64.

    ``kind``: ``"intensity"`` (the band's mean intensity, k = 1),
    ``"profile"`` (the radial profile over its mean, k = nq) or
    ``"angular"`` (the q-averaged normalised profile in
    :data:`ANGULAR_SECTORS` phi sectors, k = min(64, nphi)).
    """
    norm, rmean = normalize_rows(polar_block(windows, op), polar_mask)
    np.nan_to_num(norm, copy=False, nan=1.0)  # a bin hit by a bad pixel: no signal (the mean)
    if kind == "intensity":
        return np.nanmean(rmean, axis=1)[:, None]
    if kind == "profile":
        return rmean / np.nanmean(rmean, axis=1, keepdims=True)
    nphi = polar_mask.shape[1]
    edges = np.linspace(0, nphi, min(ANGULAR_SECTORS, nphi) + 1).astype(int)[:-1]
    num = np.add.reduceat(norm.astype(np.float64).sum(axis=1), edges, axis=-1)
    den = np.add.reduceat(polar_mask.sum(axis=0).astype(np.float64), edges)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, 0.0)


class PolarReloader:
    """Re-read a few shots and redo their polar steps (rows of rejected pairs).

    ``reloader(positions)`` returns the normalised (and, with ``bragg``,
    spot-masked) polar images of the tags at those sorted positions, with
    the very kernels of the main pass: used by
    :func:`sacla_dask.correlation.pair_statistics` to subtract rejected
    pairs without keeping the run's polar images in memory.

    Parameters
    ----------
    run : Run
    window : (slice, slice)
        The band's window of the images (pixels).
    operator : PolarOperator
    polar_mask : ndarray bool (nq, nphi)
    bragg : float, optional
        Robust sigmas of the Bragg-spot masking (None: none).
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


__all__ = ["ANGULAR_SECTORS", "PolarReloader", "bragg_block", "feature_block",
           "image_ok_block", "image_ok_from_means", "nan_count_block", "nonfinite_block",
           "normalized_block", "polar_block", "polar_chunk", "polar_chunk_from_run",
           "row_mean_block"]
