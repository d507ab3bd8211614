"""Radial profiles of a detector image and the powder ring in them.

* :func:`radial_profile` -- the masked mean intensity per radius bin about a
  centre, with optional fractional (linear split) binning so that it varies
  smoothly with the centre.
* :func:`initial_guess` -- a starting ``(x, y, r)`` from the masked,
  background-subtracted intensity-weighted centre and the strongest ring
  (largest prominence) of the radial profile about it.
* the ring's sub-pixel radial peak in angular sectors about a centre, the
  points the circle fit (:mod:`sacla_dask.center.circle`) goes through.

All lengths are in pixels, ``x`` the fast (column) axis, ``y`` the slow
(row) axis, angles in radians from +x toward +y; masks are True/1 = good.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import scipy.ndimage as ndi
import scipy.signal as sig

from ..errors import NoRingFoundError, ParameterError
from ._common import Guess, _check_guess, _check_image, _check_positive, _good_pixels, log

__all__ = ["initial_guess", "radial_profile"]


# -- radial profiles -----------------------------------------------------------
def _bin_accumulate(
    r: np.ndarray,
    values: np.ndarray,
    r_min: float,
    bin_width: float,
    nbins: int,
    split: bool,
    group: np.ndarray | None = None,
    ngroups: int = 1,
    extra: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Weighted sums per (group, radius bin): W, W*I, W*I^2, W^2 (and W*extra)."""
    size = ngroups * nbins
    parts: tuple[tuple[np.ndarray, np.ndarray], ...]
    if split:
        t = (r - r_min) / bin_width - 0.5
        k0 = np.floor(t).astype(np.int64)
        f = t - k0
        parts = ((k0, 1.0 - f), (k0 + 1, f))
    else:
        parts = ((np.floor((r - r_min) / bin_width).astype(np.int64), np.ones_like(r)),)
    out: dict[str, np.ndarray] = {k: np.zeros(size) for k in ("w", "wi", "wi2", "w2", "wx")}
    for k, w in parts:
        ok = (k >= 0) & (k < nbins)
        idx = k[ok] if group is None else group[ok] * nbins + k[ok]
        ww, vv = w[ok], values[ok]
        out["w"] += np.bincount(idx, ww, size)
        out["wi"] += np.bincount(idx, ww * vv, size)
        out["wi2"] += np.bincount(idx, ww * vv * vv, size)
        out["w2"] += np.bincount(idx, ww * ww, size)
        if extra is not None:
            out["wx"] += np.bincount(idx, ww * extra[ok], size)
    if ngroups > 1 or group is not None:
        out = {k: v.reshape(ngroups, nbins) for k, v in out.items()}
    return out


def _pixels_near(
    img: np.ndarray, good: np.ndarray, cx: float, cy: float, r_max: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Good pixels in the bounding box of a circle: (x, y, value) 1-D arrays."""
    ny, nx = img.shape
    x0 = max(0, int(math.floor(cx - r_max - 1)))
    x1 = min(nx, int(math.ceil(cx + r_max + 2)))
    y0 = max(0, int(math.floor(cy - r_max - 1)))
    y1 = min(ny, int(math.ceil(cy + r_max + 2)))
    if x0 >= x1 or y0 >= y1:
        empty = np.zeros(0)
        return empty, empty, empty
    yy, xx = np.nonzero(good[y0:y1, x0:x1])
    vals = img[y0:y1, x0:x1][yy, xx]
    return (xx + x0).astype(np.float64), (yy + y0).astype(np.float64), vals


def radial_profile(
    image: np.ndarray,
    mask: np.ndarray | None,
    center: Sequence[float],
    *,
    bin_width: float = 1.0,
    r_min: float = 0.0,
    r_max: float | None = None,
    split: bool = True,
    return_weight: bool = False,
) -> tuple[np.ndarray, ...]:
    """Masked mean intensity per radius bin about a centre.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Detector image (any real dtype, image units).
    mask : ndarray of bool (ny, nx) or None
        True/1 = good pixel. Non-finite pixels are always excluded.
    center : (x, y)
        Centre in pixels (x = fast/column axis).
    bin_width : float
        Bin width in pixels (fractional widths allowed).
    r_min, r_max : float
        Radius range in pixels; ``r_max`` defaults to the farthest image
        corner.
    split : bool
        If True (default) each pixel's intensity is shared linearly between
        the two bins whose centres bracket its radius (fractional binning),
        which makes the profile a continuous function of the centre; if
        False each pixel goes whole into the bin containing its radius.
    return_weight : bool
        Also return the summed pixel weight per bin (number of pixels).

    Returns
    -------
    radius : ndarray (nbins,)
        Bin centres in pixels, ``r_min + (k + 0.5) * bin_width``.
    mean : ndarray (nbins,)
        Masked mean intensity per bin (image units); NaN for an empty bin.
    weight : ndarray (nbins,)
        Only if ``return_weight``: pixels per bin (fractional with ``split``).
    """
    img = _check_image(image)
    good = _good_pixels(img, mask)
    try:
        cx, cy = (float(v) for v in center)
    except (TypeError, ValueError):
        raise ParameterError(f"center must be (x, y) in pixels (got {center!r})") from None
    bw = _check_positive("bin_width", bin_width)
    ny, nx = img.shape
    if r_max is None:
        r_max = math.hypot(max(cx, nx - 1 - cx), max(cy, ny - 1 - cy)) + bw
    r_min = float(r_min)
    if not (math.isfinite(r_min) and r_min >= 0):
        raise ParameterError(f"r_min must be >= 0 px (got {r_min!r})")
    if not (math.isfinite(float(r_max)) and float(r_max) > r_min):
        raise ParameterError(f"r_max must be larger than r_min={r_min:g} px (got {r_max!r})")
    nbins = max(1, int(math.ceil((float(r_max) - r_min) / bw)))
    x, y, v = _pixels_near(img, good, cx, cy, r_min + nbins * bw)
    r = np.hypot(x - cx, y - cy)
    acc = _bin_accumulate(r, v, r_min, bw, nbins, split)
    radius = r_min + (np.arange(nbins) + 0.5) * bw
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(acc["w"] > 0, acc["wi"] / acc["w"], np.nan)
    if return_weight:
        return radius, mean, acc["w"]
    return radius, mean


# -- ring location in a 1-D profile --------------------------------------------
def _nan_smooth(y: np.ndarray, sigma_bins: float) -> np.ndarray:
    """Gaussian smoothing that ignores NaNs (NaN where no valid neighbour)."""
    valid = np.isfinite(y)
    if sigma_bins <= 0:
        return np.where(valid, y, np.nan)
    num = ndi.gaussian_filter1d(np.where(valid, y, 0.0), sigma_bins, axis=-1, mode="nearest")
    den = ndi.gaussian_filter1d(valid.astype(float), sigma_bins, axis=-1, mode="nearest")
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    out[den < 1e-3] = np.nan
    return out


@dataclasses.dataclass
class _Ring:
    radius: float
    fwhm: float
    prominence: float
    snr: float


def _find_rings(
    radius: np.ndarray, mean: np.ndarray, weight: np.ndarray, var: np.ndarray, smooth_px: float
) -> list[_Ring]:
    """Significant peaks of a radial profile, strongest (prominence) first."""
    bw = float(radius[1] - radius[0]) if radius.size > 1 else 1.0
    ok = np.isfinite(mean) & (weight >= 4)
    if ok.sum() < 5:
        return []
    idx = np.nonzero(ok)[0]
    lo, hi = idx[0], idx[-1] + 1
    r = radius[lo:hi]
    y = np.interp(r, radius[ok], mean[ok])  # bridge masked radii
    sm = _nan_smooth(y, smooth_px / bw)
    peaks, _ = sig.find_peaks(sm)
    if peaks.size == 0:
        return []
    # prominence and width judged locally (+/- max(10 px, r/2)), so that a broad
    # ring sitting on the shoulder of a beam-stop edge is measured against its
    # own surroundings, not against the shadow
    proms = np.empty(peaks.size)
    widths = np.empty(peaks.size)
    for i, p in enumerate(peaks):
        wlen = 2 * int(math.ceil(max(10.0, 0.5 * float(r[p])) / bw)) + 1
        pr = sig.peak_prominences(sm, [p], wlen=wlen)
        proms[i] = pr[0][0]
        widths[i] = sig.peak_widths(sm, [p], rel_height=0.5, prominence_data=pr)[0][0]
    # noise of one bin of the profile: pixel scatter / sqrt(pixels per bin)
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma_bin = np.sqrt(np.interp(r, radius[ok], var[ok])
                            / np.interp(r, radius[ok], weight[ok]))
    rings = []
    for p, prom, wid in zip(peaks, proms, widths, strict=True):
        noise = float(np.nanmedian(sigma_bin[max(0, p - 2):p + 3]))
        snr = prom / noise if noise > 0 else (np.inf if prom > 0 else 0.0)
        a = p - 1 if p > 0 else p
        b = p + 1 if p < sm.size - 1 else p
        rp = float(r[p])
        if a < p < b:
            den = sm[a] - 2 * sm[p] + sm[b]
            if den < 0:
                rp += 0.5 * bw * (sm[a] - sm[b]) / den
        rings.append(_Ring(radius=rp, fwhm=float(wid * bw), prominence=float(prom), snr=float(snr)))
    rings.sort(key=lambda g: -g.prominence)
    return rings


def _profile_stats(
    img: np.ndarray, good: np.ndarray, cx: float, cy: float, r_max: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """1-px split radial profile with per-bin weight and pixel variance."""
    ny, nx = img.shape
    if r_max is None:
        r_max = math.hypot(max(cx, nx - 1 - cx), max(cy, ny - 1 - cy)) + 1.0
    nbins = max(1, int(math.ceil(r_max)))
    x, y, v = _pixels_near(img, good, cx, cy, nbins)
    r = np.hypot(x - cx, y - cy)
    acc = _bin_accumulate(r, v, 0.0, 1.0, nbins, True)
    radius = np.arange(nbins) + 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(acc["w"] > 0, acc["wi"] / acc["w"], np.nan)
        var = np.where(acc["w"] > 0, acc["wi2"] / acc["w"] - mean**2, np.nan)
    return radius, mean, acc["w"], np.clip(var, 0, None)


def _locate_ring(
    img: np.ndarray,
    good: np.ndarray,
    cx: float,
    cy: float,
    near: float | None,
    min_snr: float,
    r_min: float,
    smooth_px: float = 1.0,
) -> tuple[_Ring, np.ndarray, np.ndarray]:
    """Strongest significant ring about (cx, cy), or the one nearest ``near``."""
    radius, mean, weight, var = _profile_stats(img, good, cx, cy)
    sel = radius >= r_min
    rings = _find_rings(radius[sel], mean[sel], weight[sel], var[sel], smooth_px)
    strong = [g for g in rings if g.snr >= min_snr]
    if near is not None:
        tol = max(5.0, 0.2 * near)
        close = [g for g in strong if abs(g.radius - near) <= tol]
        if not close:
            raise NoRingFoundError(
                f"no powder ring found: no ring with signal-to-noise >= min_snr={min_snr:g} in "
                f"the radial profile within {tol:.1f} px of r={near:.1f} px about "
                f"({cx:.1f}, {cy:.1f}); significant rings are at "
                f"{[round(float(g.radius), 1) for g in strong[:5]]} px"
            )
        # prefer the strongest among those near the guessed radius
        return close[0], radius, mean
    if not strong:
        best = (f" (best peak at r={rings[0].radius:.1f} px has S/N {rings[0].snr:.1f})"
                if rings else "")
        raise NoRingFoundError(
            f"no powder ring found: the masked radial profile about ({cx:.1f}, {cy:.1f}) px has "
            f"no peak with signal-to-noise >= min_snr={min_snr:g}{best}"
        )
    return strong[0], radius, mean


def _start_ring(
    img: np.ndarray, good: np.ndarray, cx: float, cy: float, r_guess: float | None,
    min_snr: float,
) -> _Ring:
    """The ring to start from: the strongest one, or the one near the guessed radius.

    A user's radius is trusted when the profile about a wrong centre smears
    the ring below significance (it splits into two caustics at ``r +/-
    offset``): the ring is then sought in a wide window (+/- 0.3 r to 0.5 r)
    around it.
    """
    try:
        return _locate_ring(img, good, cx, cy, r_guess, min_snr, 3.0)[0]
    except NoRingFoundError:
        if r_guess is None:
            raise
        log.info("no significant ring near r=%.1f px about the guess; searching around it",
                 r_guess)
        width = min(0.5 * r_guess, max(0.3 * r_guess, 12.0))
        return _Ring(radius=float(r_guess), fwhm=width, prominence=math.nan, snr=math.nan)


def _weighted_centroid(img: np.ndarray, good: np.ndarray) -> tuple[float, float]:
    vals = img[good]
    w = np.clip(img - np.median(vals), 0, None)
    w[~good] = 0
    total = w.sum()
    if not np.isfinite(total) or total <= 0:
        raise NoRingFoundError(
            "no powder ring found: the image has no intensity above its median in the "
            "good pixels (a blank or constant image?)"
        )
    yy, xx = np.indices(img.shape)
    return float((w * xx).sum() / total), float((w * yy).sum() / total)


def _start(
    img: np.ndarray, good: np.ndarray, guess: Guess, ring_min_snr: float
) -> tuple[float, float, float | None, _Ring]:
    """Starting centre ``(x, y)``, the user's radius (None if not given) and the ring.

    Without a guess the centre is the intensity-weighted centroid; the ring
    is the strongest significant one about it, or the one near the guessed
    radius (:func:`_start_ring`).
    """
    if guess is None:
        cx, cy = _weighted_centroid(img, good)
        r_guess = None
    else:
        cx, cy, r_guess = _check_guess(guess, img.shape)
    return cx, cy, r_guess, _start_ring(img, good, cx, cy, r_guess, ring_min_snr)


def initial_guess(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    min_snr: float = 5.0,
    r_min: float = 3.0,
) -> tuple[float, float, float]:
    """Starting ``(x, y, r)`` with no user guess.

    The centre is the intensity-weighted centroid of the good pixels after
    subtracting the median (so that the flat background does not pull it to
    the middle of the detector); ``r`` is the radius of the most prominent
    significant peak of the masked radial profile about that centre.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Detector image.
    mask : ndarray of bool, optional
        True/1 = good pixel.
    min_snr : float
        A profile peak counts as a ring when its prominence exceeds this many
        times the noise of one 1-px bin (pixel scatter / sqrt(pixels)).
    r_min : float
        Ignore peaks closer than this to the centre, in pixels.

    Returns
    -------
    (x, y, r) : tuple of float
        Pixels.

    Raises
    ------
    NoRingFoundError
        If the image is blank or its profile has no significant peak.
    """
    img = _check_image(image)
    good = _good_pixels(img, mask)
    cx, cy = _weighted_centroid(img, good)
    ring, _, _ = _locate_ring(img, good, cx, cy, None, min_snr, r_min)
    return cx, cy, ring.radius


# -- sector peak points ----------------------------------------------------------
_REASONS = ("ok", "masked", "edge", "gap", "weak", "flat")


@dataclasses.dataclass
class _Sectors:
    x: np.ndarray  # peak points (pixels), NaN where no peak
    y: np.ndarray
    reason: np.ndarray  # index into _REASONS


@dataclasses.dataclass
class _SectorProfiles:
    """Radial profiles of the ring window, one row per angular sector."""

    radius: np.ndarray  # bin centres (nbins,), pixels
    weight: np.ndarray  # summed pixel weight (nsectors, nbins)
    valid: np.ndarray  # bins covered enough to use
    mean: np.ndarray  # mean intensity, NaN where not valid
    var: np.ndarray  # pixel variance per bin
    mean_var_factor: np.ndarray  # Var(bin mean) / pixel variance
    dphi_mean: np.ndarray  # mean pixel angle within the sector (rad)
    smooth: np.ndarray  # Gaussian-smoothed mean
    bin_width: float  # pixels
    dphi: float  # sector width (rad)


def _sector_profiles(
    img: np.ndarray,
    good: np.ndarray,
    cx: float,
    cy: float,
    r_lo: float,
    r_hi: float,
    n_sectors: int,
    bin_width: float,
    smooth_px: float,
) -> _SectorProfiles:
    """Split-binned radial profiles of the ring window in each angular sector."""
    bw = bin_width
    nb = max(5, int(math.ceil((r_hi - r_lo) / bw)))
    x, y, v = _pixels_near(img, good, cx, cy, r_lo + nb * bw + bw)
    dx, dy = x - cx, y - cy
    r = np.hypot(dx, dy)
    keep = (r >= r_lo - bw) & (r < r_lo + (nb + 1) * bw)
    dx, dy, r, v = dx[keep], dy[keep], r[keep], v[keep]
    dphi = 2 * math.pi / n_sectors
    phi = np.mod(np.arctan2(dy, dx), 2 * math.pi)
    sec = np.minimum((phi / dphi).astype(np.int64), n_sectors - 1)
    acc = _bin_accumulate(r, v, r_lo, bw, nb, True, group=sec, ngroups=n_sectors,
                          extra=phi - sec * dphi)
    rc = r_lo + (np.arange(nb) + 0.5) * bw
    expected = rc * dphi * bw  # pixel weight of a fully covered bin
    W = acc["w"]
    valid = W >= 0.3 * expected[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        prof = np.where(valid, acc["wi"] / W, np.nan)
        var = np.where(valid, acc["wi2"] / W - prof**2, np.nan)
        mean_var_factor = np.where(valid, acc["w2"] / W**2, np.nan)  # Var(mean) / pixel var
        dphi_mean = np.where(W > 0, acc["wx"] / W, np.nan)
    sm = _nan_smooth(prof, smooth_px / bw)
    return _SectorProfiles(radius=rc, weight=W, valid=valid, mean=prof, var=var,
                           mean_var_factor=mean_var_factor, dphi_mean=dphi_mean, smooth=sm,
                           bin_width=bw, dphi=dphi)


def _sector_peak(
    sp: _SectorProfiles,
    s: int,
    span: int,
    kern: np.ndarray,
    min_snr: float,
    min_coverage: float,
) -> tuple[int, float, float]:
    """Sub-pixel ring peak in sector ``s``: (reason index, radius px, angle rad).

    The reason is 0 ("ok") when a peak was found, else the index in
    ``_REASONS`` of why the sector gives no point (radius and angle NaN).
    """
    bw = sp.bin_width
    nb = sp.radius.size
    rc, W, sm = sp.radius, sp.weight, sp.smooth
    kh = kern.size // 2
    vs = sp.valid[s]
    if vs.mean() < min_coverage:
        return 1, math.nan, math.nan
    row = np.where(vs, sm[s], -np.inf)
    k = int(np.argmax(row))
    if k < span or k > nb - 1 - span:
        return 2, math.nan, math.nan
    win = slice(k - span, k + span + 1)
    core = max(2, span // 3)
    if not vs[k - core:k + core + 1].all() or vs[win].mean() < 0.75:
        return 3, math.nan, math.nan
    left = sm[s, : k - span][vs[: k - span]]
    right = sm[s, k + span + 1:][vs[k + span + 1:]]
    if left.size == 0 or right.size == 0:
        return 2, math.nan, math.nan
    prominence = sm[s, k] - max(left.min(), right.min())
    # noise of the smoothed profile at the peak (bins treated as independent)
    g = kern.copy()
    lo, hi = k - kh, k + kh + 1
    ga = g[max(0, -lo): g.size - max(0, hi - nb)]
    sl = slice(max(0, lo), min(nb, hi))
    vv = vs[sl]
    ga = np.where(vv, ga, 0.0)
    ga = ga / ga.sum()
    pix_var = float(np.nanmedian(sp.var[s][vs]))
    noise = math.sqrt(2 * pix_var * float(np.nansum(ga**2 * sp.mean_var_factor[s, sl])))
    if not prominence > min_snr * noise:
        return 4, math.nan, math.nan
    # sub-pixel peak: weighted quadratic fit of the raw profile over the top
    fit_ok = vs[win]
    rr = rc[win][fit_ok] - rc[k]
    coef = np.polyfit(rr, sp.mean[s, win][fit_ok], 2, w=np.sqrt(W[s, win][fit_ok]))
    if not coef[0] < 0:
        return 5, math.nan, math.nan
    vertex = -coef[1] / (2 * coef[0])
    if abs(vertex) > span * bw:
        return 5, math.nan, math.nan
    rpk = rc[k] + vertex
    ang = s * sp.dphi + float(np.nanmean(sp.dphi_mean[s, win]))
    return 0, float(rpk), ang


def _sector_peaks(
    img: np.ndarray,
    good: np.ndarray,
    cx: float,
    cy: float,
    r_lo: float,
    r_hi: float,
    n_sectors: int,
    bin_width: float,
    smooth_px: float,
    half_span_px: float,
    min_snr: float,
    min_coverage: float = 0.8,
) -> _Sectors:
    """Sub-pixel radial peak of the ring in each angular sector about (cx, cy).

    In each sector the split-binned profile over ``r_lo .. r_hi`` is smoothed
    (``smooth_px``); its maximum must stand ``min_snr`` times its noise above
    the lowest smoothed value on either side of ``+/- half_span_px``, and a
    weighted parabola over that span gives the sub-pixel radius. The point
    is placed at the sector's mean pixel angle. Lengths in pixels.
    """
    bw = bin_width
    sp = _sector_profiles(img, good, cx, cy, r_lo, r_hi, n_sectors, bw, smooth_px)
    span = max(2, int(round(half_span_px / bw)))
    sigma_b = smooth_px / bw
    kern = np.exp(-0.5 * (np.arange(-3 * int(math.ceil(sigma_b)) - 1,
                                    3 * int(math.ceil(sigma_b)) + 2) / max(sigma_b, 1e-6)) ** 2)
    px = np.full(n_sectors, np.nan)
    py = np.full(n_sectors, np.nan)
    reason = np.zeros(n_sectors, dtype=np.int64)
    for s in range(n_sectors):
        reason[s], rpk, ang = _sector_peak(sp, s, span, kern, min_snr, min_coverage)
        if reason[s] == 0:
            px[s] = cx + rpk * math.cos(ang)
            py[s] = cy + rpk * math.sin(ang)
    return _Sectors(px, py, reason)
