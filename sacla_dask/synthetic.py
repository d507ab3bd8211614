"""Synthetic SACLA runs in the DataConvert layout, with known truth.

This module owns the writer used by the tests, the demo and the benchmarks:
powder rings at known radii about a known beam centre, shutter-closed dark
shots first, per-tag event data, an optional angular modulation
``cos(n (phi - phase))`` with a random phase per shot (so that the
difference correlation has a known signature), panel gaps for a mask,
and the usual HDF5 compressions.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from .geometry import HC_KEV_ANGSTROM, Geometry

try:
    import hdf5plugin
except ImportError:  # pragma: no cover
    hdf5plugin = None
import h5py

from .run import DETECTOR

COMPRESSIONS = ("none", "gzip", "bitshuffle-lz4", "zstd")


@dataclasses.dataclass
class SyntheticTruth:
    """What a synthetic run was made from (the answers tests compare with)."""

    path: str
    run: int
    tags: np.ndarray
    bright: np.ndarray
    shape: tuple[int, int]
    center_x: float
    center_y: float
    ring_radii: tuple[float, ...]
    ring_width: float
    pixel_size: float
    distance: float
    photon_energy: float
    modulation_order: int
    modulation_amplitude: float
    phases: np.ndarray

    @property
    def wavelength(self) -> float:
        """Wavelength in Angstrom."""
        return HC_KEV_ANGSTROM * 1e3 / self.photon_energy

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.center_x, self.center_y, self.pixel_size, self.distance,
                        self.wavelength)

    def ring_q(self) -> np.ndarray:
        """Ring positions in inverse Angstrom."""
        return np.asarray(self.geometry.radius_to_q(np.asarray(self.ring_radii)))


def panel_mask(shape: tuple[int, int], gap: int = 6, edge: int = 2,
               center: tuple[float, float] | None = None, beamstop: float = 0.0) -> np.ndarray:
    """An MPCCD-octal-like mask: 4x2 panels with gaps, edges, an optional beam stop.

    Returns bool (True = good).
    """
    ny, nx = shape
    m = np.ones(shape, dtype=bool)
    m[:edge] = m[-edge:] = False
    m[:, :edge] = m[:, -edge:] = False
    for k in range(1, 4):
        y = k * ny // 4
        m[y - gap // 2: y + (gap + 1) // 2] = False
    x = nx // 2
    m[:, x - gap // 2: x + (gap + 1) // 2] = False
    if beamstop > 0:
        cx, cy = center if center is not None else ((nx - 1) / 2, (ny - 1) / 2)
        yy, xx = np.ogrid[:ny, :nx]
        m &= (xx - cx) ** 2 + (yy - cy) ** 2 > beamstop**2
    return m


def ring_image(shape: tuple[int, int], center: tuple[float, float],
               radii: Sequence[float], width: float, amplitudes: Sequence[float] | None = None,
               modulation_order: int = 0, modulation_amplitude: float = 0.0,
               phase: float = 0.0, background: float = 0.0,
               modulated_ring: int | None = None) -> np.ndarray:
    """Noise-free powder-ring image (float64).

    ``I = bg + sum_k A_k exp(-(r - R_k)^2 / 2 w^2) * (1 + a cos(n (phi - phase)))``
    with the modulation on every ring, or on ring ``modulated_ring`` only.
    """
    ny, nx = shape
    cx, cy = center
    yy, xx = np.mgrid[:ny, :nx].astype(np.float64)
    dx, dy = xx - cx, yy - cy
    r = np.hypot(dx, dy)
    phi = np.arctan2(dy, dx)
    amps = list(amplitudes) if amplitudes is not None else [1000.0] * len(radii)
    img = np.full(shape, float(background))
    mod = 1.0 + modulation_amplitude * np.cos(modulation_order * (phi - phase))
    for k, (rk, ak) in enumerate(zip(radii, amps)):
        ring = ak * np.exp(-((r - rk) ** 2) / (2 * width**2))
        if modulation_amplitude and (modulated_ring is None or modulated_ring == k):
            ring = ring * mod
        img += ring
    return img


def write_synthetic_run(
    path: str | os.PathLike[str],
    n_tags: int = 40,
    n_dark: int = 5,
    shape: tuple[int, int] = (256, 256),
    center: tuple[float, float] | None = None,
    ring_radii: Sequence[float] = (40.0, 80.0),
    ring_width: float = 2.0,
    ring_amplitudes: Sequence[float] | None = None,
    pixel_size: float = 50e-6,
    distance: float = 0.053,
    photon_energy: float = 8600.0,
    run: int = 178884,
    first_tag: int = 166762140,
    tag_step: int = 2,
    modulation_order: int = 6,
    modulation_amplitude: float = 0.2,
    background: float = 5.0,
    noise: bool = True,
    compression: str = "none",
    extra_event_tags: int = 0,
    seed: int = 0,
    modulated_rings: Sequence[int] | None = None,
    ring_phase_offsets: Sequence[float] | None = None,
) -> SyntheticTruth:
    """Write a synthetic SACLA run in the DataConvert layout.

    Parameters
    ----------
    path : path
        Output HDF5 file (overwritten).
    n_tags : int
        Number of tags with images; the first ``n_dark`` have the pulse
        selector closed (dark: background and noise only).
    shape : (ny, nx)
        Image shape in pixels (MPCCD octal: about 2400x2400).
    center : (x, y), optional
        Beam centre in pixels (default: slightly off the image centre).
    ring_radii, ring_width : float
        Powder ring radii and gaussian width, in pixels.
    pixel_size, distance : float
        Metres. ``photon_energy`` in eV (stored per tag in event_info).
    modulation_order, modulation_amplitude : int, float
        Each bright shot's rings carry ``1 + a cos(n (phi - phase))`` with a
        random phase per shot (returned in the truth).
    noise : bool
        Poisson noise on every pixel.
    compression : {"none", "gzip", "bitshuffle-lz4", "zstd"}
        HDF5 filter of the detector datasets (image-sized chunks).
    extra_event_tags : int
        Event data for this many more tags than have images (as in a subset
        file cut from a longer run).
    seed : int
        Random seed.
    modulated_rings : sequence of int, optional
        Indices of the rings that carry the angular modulation (default:
        all); the others are isotropic.
    ring_phase_offsets : sequence of float, optional
        Per-ring phase offset ``d_k`` (radians): ring k carries
        ``cos(n (phi - phase - d_k))`` (default: 0 for every ring).

    Returns
    -------
    SyntheticTruth
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS} (got {compression!r})")
    rng = np.random.default_rng(seed)
    ny, nx = shape
    if center is None:
        center = ((nx - 1) / 2 + 3.3, (ny - 1) / 2 - 2.1)
    cx, cy = float(center[0]), float(center[1])
    n_event = n_tags + extra_event_tags
    event_tags = first_tag + tag_step * np.arange(n_event, dtype=np.int64)
    tags = event_tags[:n_tags]
    bright = np.ones(n_event, dtype=bool)
    bright[:n_dark] = False
    phases = rng.uniform(0, 2 * np.pi, n_event)
    pulse_energy = np.where(bright, rng.normal(1.0e-3, 0.05e-3, n_event), 0.0)
    energies = photon_energy + rng.normal(0, 1.0, n_event)

    # Precompute r, phi once; each shot is a cheap combination.
    yy, xx = np.mgrid[:ny, :nx].astype(np.float32)
    dx, dy = xx - np.float32(cx), yy - np.float32(cy)
    r = np.hypot(dx, dy)
    phi = np.arctan2(dy, dx)
    del yy, xx, dx, dy
    amps = list(ring_amplitudes) if ring_amplitudes is not None else [1000.0] * len(ring_radii)
    rings = [np.float32(a) * np.exp(-((r - np.float32(rk)) ** 2) / np.float32(2 * ring_width**2))
             for rk, a in zip(ring_radii, amps)]
    ring_sum = np.sum(rings, axis=0, dtype=np.float32) if rings else np.zeros(shape, np.float32)
    per_ring = None
    if modulated_rings is not None or ring_phase_offsets is not None:
        per_ring = _ring_modulation(r, phi, ring_radii, amps, ring_width, ring_sum,
                                    modulation_order, modulated_rings, ring_phase_offsets)
    del rings, r
    cos_n = np.cos(modulation_order * phi).astype(np.float32)
    sin_n = np.sin(modulation_order * phi).astype(np.float32)
    if per_ring is not None:
        cos_n, sin_n = per_ring
    del phi

    kw: dict = {}
    if compression == "gzip":
        kw = dict(compression="gzip", compression_opts=4, chunks=shape)
    elif compression == "bitshuffle-lz4":
        kw = dict(chunks=shape, **hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
    elif compression == "zstd":
        kw = dict(chunks=shape, **hdf5plugin.Zstd())

    p = os.fspath(path)
    with h5py.File(p, "w") as fh:
        fh["file_info/run_number_list"] = np.array([run], dtype=np.int64)
        g = fh.create_group(f"run_{run}")
        det = g.create_group(DETECTOR)
        info = det.create_group("detector_info")
        info["pixel_size_in_micro_meter"] = np.array([pixel_size * 1e6] * 2)
        info["detector_name"] = np.bytes_("MPCCD-8N0-synthetic")
        ev = g.create_group("event_info")
        ev["tag_number_list"] = event_tags
        ev["bl_3/eh_1/xfel_pulse_selector_status"] = bright.astype(np.int32)
        ev["bl_3/oh_2/photon_energy_in_eV"] = energies
        ev["bl_3/oh_2/bm_1_pulse_energy_in_joule"] = pulse_energy
        g["run_info/sacla_config/synthetic"] = np.bytes_("sacla_dask.synthetic")
        g.create_group("exp_info")
        for i, tag in enumerate(tags):
            if bright[i]:
                a = modulation_amplitude
                # cos(n(phi - p)) = cos(n phi) cos(n p) + sin(n phi) sin(n p)
                mod = 1 + a * (cos_n * np.float32(np.cos(modulation_order * phases[i]))
                               + sin_n * np.float32(np.sin(modulation_order * phases[i])))
                scale = np.float32(pulse_energy[i] / 1.0e-3)
                img = background + scale * ring_sum * mod
            else:
                img = np.full(shape, background, dtype=np.float32)
            if noise:
                img = rng.poisson(np.maximum(img, 0)).astype(np.float32)
            tg = det.create_group(f"tag_{tag}")
            tg.create_dataset("detector_data", data=np.asarray(img, dtype=np.float32), **kw)
            tg["detector_status"] = np.int32(1)
    return SyntheticTruth(
        path=p, run=run, tags=tags, bright=bright[:n_tags], shape=tuple(shape),
        center_x=cx, center_y=cy, ring_radii=tuple(float(x) for x in ring_radii),
        ring_width=ring_width, pixel_size=pixel_size, distance=distance,
        photon_energy=photon_energy, modulation_order=modulation_order,
        modulation_amplitude=modulation_amplitude, phases=phases[:n_tags],
    )


def _ring_modulation(r: np.ndarray, phi: np.ndarray, radii: Sequence[float],
                     amps: Sequence[float], width: float, ring_sum: np.ndarray, order: int,
                     modulated: Sequence[int] | None,
                     offsets: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-ring modulation folded into the (cos n phi, sin n phi) images of the shots.

    Returns ``C / S``-like images such that ``ring_sum * (1 + a (c cos(n p) +
    s sin(n p)))`` equals ``sum_k R_k (1 + a m_k cos(n (phi - p - d_k)))``.
    """
    n_r = len(radii)
    mod = set(range(n_r) if modulated is None else (int(k) for k in modulated))
    if any(not 0 <= k < n_r for k in mod):
        raise ValueError(f"modulated_rings must index the {n_r} rings (got {sorted(mod)})")
    off = [0.0] * n_r if offsets is None else [float(d) for d in offsets]
    if len(off) != n_r:
        raise ValueError(f"ring_phase_offsets needs one value per ring ({n_r}), got {len(off)}")
    c = np.zeros(r.shape, np.float64)
    s = np.zeros(r.shape, np.float64)
    for k in sorted(mod):
        ring = float(amps[k]) * np.exp(-((r.astype(np.float64) - radii[k]) ** 2) / (2 * width**2))
        c += ring * np.cos(order * (phi - off[k]))
        s += ring * np.sin(order * (phi - off[k]))
    rs = ring_sum.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cn = np.where(rs > 0, c / rs, 0.0).astype(np.float32)
        sn = np.where(rs > 0, s / rs, 0.0).astype(np.float32)
    return cn, sn
