"""Row normalisation of polar images: each q row divided by its masked mean.

The normalised rows are what the correlation uses
(:mod:`sacla_dask.correlation`); the row means are kept as the radial
profile of each shot.
"""

from __future__ import annotations

import numpy as np

__all__ = ["normalize_rows"]


def normalize_rows(polar: np.ndarray, polar_mask: np.ndarray,
                   out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Divide each polar row by its masked mean.

    One float64 row sum and one float32 multiply per image; rows holding a
    non-finite value are redone one by one, and the masked bins are looked
    at only where the mask has them (they are already 0 when ``polar``
    comes from :func:`~sacla_dask.polar.apply_polar`).

    Parameters
    ----------
    polar : ndarray (ntag, nq, nphi)
        Polar intensities; NaN marks bins hit by non-finite pixels.
    polar_mask : ndarray bool (nq, nphi)
        True = good bin.
    out : ndarray float32 (ntag, nq, nphi), optional
        Where to write the result; may be ``polar`` itself (in place: no
        new block, which for a wide band saves a few hundred MB and their
        page faults per task).

    Returns
    -------
    normalised : ndarray float32 (ntag, nq, nphi)
        ``polar / row_mean``: 0 in masked bins; NaN in good bins that are not
        finite (hit by a non-finite pixel): masked for that shot only, so
        that every pair it is in leaves the bin out and is normalised by its
        own mask (:func:`sacla_dask.correlation.difference_correlation`).
    row_mean : ndarray float64 (ntag, nq)
        The masked mean of each row (intensity units); NaN for a row with no
        good bin.
    """
    polar = np.asarray(polar)
    pm = np.asarray(polar_mask, dtype=bool)
    k = polar.shape[0]
    nq, nphi = pm.shape
    count = pm.sum(axis=1)
    masked = np.flatnonzero(~pm.ravel())
    total = polar.sum(axis=-1, dtype=np.float64)
    mvals = polar.reshape(k, nq * nphi)[:, masked] if masked.size else None
    dirty = mvals is not None and bool(np.any(mvals))  # masked bins that are not 0
    if dirty and mvals is not None:
        mrow = masked // nphi
        with np.errstate(invalid="ignore"):
            for i in range(k):
                total[i] -= np.bincount(mrow, weights=mvals[i].astype(np.float64), minlength=nq)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
    redo = np.argwhere(~np.isfinite(total) & (count > 0))  # a NaN/inf somewhere in the row
    for i, q in redo:
        row = polar[i, q]
        good = pm[q] & np.isfinite(row)
        n = int(good.sum())
        mean[i, q] = row[good].sum(dtype=np.float64) / n if n else np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(np.isfinite(mean) & (mean != 0), 1.0 / mean, 0.0).astype(np.float32)
    fill = [pm[q] & ~np.isfinite(polar[i, q]) for i, q in redo]  # before polar may change
    with np.errstate(invalid="ignore"):  # inf * 0 in a row without a mean: reset below
        res = np.multiply(polar, scale[..., None], out=out, dtype=np.float32)
    for (i, q), f in zip(redo, fill, strict=True):
        res[i, q][f] = np.nan
    if dirty or len(redo):
        res.reshape(k, nq * nphi)[:, masked] = 0
    return res, mean
