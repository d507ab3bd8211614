"""Synthetic SACLA runs in the DataConvert layout, with known truth.

This module owns the writer used by the tests, the demo and the benchmarks:
powder rings at known radii about a known beam centre, shutter-closed dark
shots first, per-tag event data, an optional angular modulation
``cos(n (phi - phase))`` with a random phase per shot (so that the
difference correlation has a known signature), panel gaps for a mask,
and the usual HDF5 compressions. It also damages files on purpose (a tag
without ``detector_data``, a corrupt compressed chunk, a truncated file) for
the tests of bad input.

A run is described by a few small frozen groups: :class:`Shots` (tags,
dark shots, event data), :class:`Detector` (image shape, beam centre, pixel
size, distance, background, noise), :class:`Rings` (radii, widths,
modulation), :class:`BraggSpots`, :class:`Nanocrystals` (randomly oriented
crystallites whose reflections light up where they meet the Ewald sphere)
and :class:`Storage` (compression, chunks, damaged tags).
:func:`write_synthetic_run` takes the groups, or any of their
fields as a flat keyword (``n_tags=``, ``ring_radii=``...); a new option is a
field of a group.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, TypedDict, Unpack

import numpy as np

from ..geometry import HC_KEV_ANGSTROM, Geometry

try:
    import hdf5plugin
except ImportError:  # pragma: no cover
    hdf5plugin = None  # type: ignore[assignment]
import h5py

from .run import DETECTOR
from .synthetic_panels import Panels, sensor_rects, write_panels_geom

COMPRESSIONS = ("none", "gzip", "bitshuffle-lz4", "zstd")


@dataclasses.dataclass
class SyntheticTruth:
    """What a synthetic run was made from (the answers tests compare with).

    ``tags``, ``bright``, ``phases`` and ``pulse_energy`` (joules) are per
    image tag; ``event_tags`` lists every exposure with event data;
    ``missing`` the tags written without ``detector_data``.
    """

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
    pulse_energy: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    event_tags: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    missing: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    nanocrystals: Nanocrystals | None = None
    spots_per_shot: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    laser_on: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, bool))
    delay: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    adu_per_photon: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    #: the CrystFEL geometry of an unassembled run (:class:`Panels`), else None
    geom: str | None = None

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
    for k, (rk, ak) in enumerate(zip(radii, amps, strict=True)):
        ring = ak * np.exp(-((r - rk) ** 2) / (2 * width**2))
        if modulation_amplitude and (modulated_ring is None or modulated_ring == k):
            ring = ring * mod
        img += ring
    return img


# -- what a synthetic run is made of ---------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Shots:
    """The run's exposures: their tags, which have images, which are dark, their event data.

    Attributes
    ----------
    n_tags : int
        Number of tags with images.
    n_dark : int
        The run's first ``n_dark`` exposures have the pulse selector closed
        (dark: background and noise only). Counted from the first exposure
        of the run, not of the file (see ``first_image``).
    run : int
        SACLA run number.
    first_tag, tag_step : int
        Tag of the run's first exposure, and the tag increment.
    first_image : int
        Index of the first exposure with an image: the file holds images for
        exposures ``first_image .. first_image + n_tags - 1`` of the run and
        event data for exposures ``0 .. first_image + n_tags +
        extra_event_tags - 1`` (a subset cut from the middle of a run, or
        one of several files of one run).
    extra_event_tags : int
        Event data for this many more exposures than have images (as in a
        subset file cut from a longer run: the tutorial's file holds 199
        images and event data for 5050 tags).
    pulse_selector : bool
        Write ``xfel_pulse_selector_status`` (``False``: a file without the
        status, where dark shots can only be skipped by count).
    photon_energy : float
        Mean photon energy in eV; event_info stores each exposure's, with a
        1 eV rms jitter.
    """

    n_tags: int = 40
    n_dark: int = 5
    run: int = 178884
    first_tag: int = 166762140
    tag_step: int = 2
    first_image: int = 0
    extra_event_tags: int = 0
    pulse_selector: bool = True
    photon_energy: float = 8600.0


@dataclasses.dataclass(frozen=True)
class Detector:
    """The detector: image size, where the beam hits it, pixel size, distance, noise.

    Attributes
    ----------
    shape : (ny, nx)
        Image shape in pixels (MPCCD octal: about 2400x2400).
    center : (x, y), optional
        Beam centre in pixels (default: slightly off the image centre).
    pixel_size : float
        Pixel size in metres.
    distance : float
        Sample-detector distance in metres.
    background : float
        Detector units added to every pixel of every shot, dark ones too.
    poisson_noise : bool
        Poisson noise on every pixel (``False`` is much faster for large
        images, e.g. benchmarks at 2400x2400).
    """

    shape: tuple[int, int] = (256, 256)
    center: tuple[float, float] | None = None
    pixel_size: float = 50e-6
    distance: float = 0.053
    background: float = 5.0
    poisson_noise: bool = True


@dataclasses.dataclass(frozen=True)
class Rings:
    """The sample's powder rings and their angular modulation.

    Attributes
    ----------
    radii : sequence of float
        Ring radii in pixels.
    width : float
        Gaussian width (sigma) of every ring in pixels.
    amplitudes : sequence of float, optional
        Peak height of each ring in detector units at a 1 mJ pulse (the
        rings scale with each shot's pulse energy); default 1000 each.
    modulation_order, modulation_amplitude : int, float
        Each bright shot's rings carry ``1 + a cos(n (phi - phase))`` with a
        random phase per shot (returned in the truth).
    modulated : sequence of int, optional
        Indices of the rings that carry the angular modulation (default:
        all); the others are isotropic.
    phase_offsets : sequence of float, optional
        Per-ring phase offset ``d_k`` (radians): ring k carries
        ``cos(n (phi - phase - d_k))`` (default: 0 for every ring).
    """

    radii: Sequence[float] = (40.0, 80.0)
    width: float = 2.0
    amplitudes: Sequence[float] | None = None
    modulation_order: int = 6
    modulation_amplitude: float = 0.2
    modulated: Sequence[int] | None = None
    phase_offsets: Sequence[float] | None = None

    def __post_init__(self) -> None:
        for name in ("radii", "amplitudes", "modulated", "phase_offsets"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))


@dataclasses.dataclass(frozen=True)
class BraggSpots:
    """Bragg spots on the rings of every bright shot (a spotty nanocrystal powder).

    Gaussian spots centred exactly on the ring radius at uniformly random
    azimuths, with exponentially distributed peak heights; spots off the
    detector are dropped. Combine with small ring amplitudes for a weak
    continuous ring under the spots. The spots are drawn from their own
    random stream, so adding them changes nothing else of the run.

    Attributes
    ----------
    per_ring : int
        Spots per ring on every bright shot (0: none).
    amplitude : float
        Mean peak height in detector units at a 1 mJ pulse (scaled by the
        pulse energy like the rings).
    width : float
        Gaussian width (sigma) of a spot in pixels.
    """

    per_ring: int = 0
    amplitude: float = 2000.0
    width: float = 1.0


@dataclasses.dataclass(frozen=True)
class Nanocrystals:
    """Randomly oriented crystallites on every bright shot (a nanocrystal powder, built honestly).

    Each bright shot holds ``per_shot`` crystallites of one lattice, each
    with an orientation drawn uniformly on SO(3) (a random unit
    quaternion). Every symmetry-equivalent vector ``G`` of each reflection
    (:func:`sacla_dask.structure.lattice.equivalents`, Friedel mates
    included) is rotated with its crystallite; it lights up where it meets
    the Ewald sphere: with the beam along +z, Bragg's condition puts ``G``
    at the elevation ``-theta_B`` (``G_z / |G| = -sin(theta_B)``), and a
    vector ``delta`` away from it reflects with the weight ``exp(-delta^2 /
    2 w^2)`` (``w`` the rocking width). Its spot is drawn where its
    scattered ray hits a flat detector normal to the beam: at the radius
    ``D tan(2 theta_B)`` from the beam centre and the azimuth of ``G``'s x, y
    components (``phi = atan2(G_y, G_x)``, the detector's ``atan2(y - cy,
    x - cx)``), a gaussian of ``spot_width`` pixels. Spots off the image are
    dropped; Poisson noise comes with the detector's. Drawn from their own
    random stream (a change here changes nothing else of the run).

    Attributes
    ----------
    per_shot : int
        Crystallites per bright shot (0: none).
    lattice : str
        ``"fcc"``, ``"bcc"``, ``"sc"``, ``"hexagonal"`` or ``"hcp"``.
    a, c : float
        Lattice constants in Angstrom (``c`` for hexagonal lattices only).
    reflections : sequence of (h, k, l)
        The reflections that scatter (each must be allowed by the lattice).
    amplitudes : sequence of float, optional
        Peak height of each reflection's spot at the exact Bragg condition,
        detector units at a 1 mJ pulse (default 300 each).
    rocking_width : float
        Gaussian width (sigma) of the reflection's angular acceptance,
        radians (a few 0.01 for nanocrystals of a few nm).
    spot_width : float
        Gaussian width (sigma) of a spot on the detector, pixels.
    """

    per_shot: int = 0
    lattice: str = "fcc"
    a: float = 4.078
    c: float | None = None
    reflections: Sequence[Sequence[int]] = ((1, 1, 1), (2, 0, 0))
    amplitudes: Sequence[float] | None = None
    rocking_width: float = 0.02
    spot_width: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "reflections",
                           tuple(tuple(int(v) for v in r) for r in self.reflections))
        if self.amplitudes is not None:
            object.__setattr__(self, "amplitudes", tuple(float(v) for v in self.amplitudes))


@dataclasses.dataclass(frozen=True)
class Storage:
    """How the images are stored in the file, and which tags it damages.

    Attributes
    ----------
    compression : {"none", "gzip", "bitshuffle-lz4", "zstd"}
        HDF5 filter of the detector datasets.
    chunks : (cy, cx), optional
        HDF5 chunk shape of the detector datasets (default: contiguous when
        uncompressed, one chunk per image when compressed).
    missing_data : sequence of int
        Indices (0-based, among the image tags) of tags whose group is
        written without ``detector_data`` (a damaged export). Their truth
        is still listed in ``tags``; see ``SyntheticTruth.missing``.
    """

    compression: str = "none"
    chunks: tuple[int, int] | None = None
    missing_data: Sequence[int] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "missing_data", tuple(self.missing_data))


@dataclasses.dataclass(frozen=True)
class PumpProbe:
    """A pump-probe run: a pump laser fires on some shots, with a delay (event data).

    Writes ``bl_3/lh_1/laser_pulse_selector_status`` (1: laser on) and,
    with ``delays``, ``bl_3/lh_1/delay_mm`` into event_info. Laser-on
    bright shots carry the rings' modulation of order ``on_order``,
    laser-off ones of order ``off_order`` (same amplitude, a random phase
    per shot); drawn from their own random stream.

    Attributes
    ----------
    laser : {"none", "alternate", "random"}
        No laser status (default), on for every other exposure (the first
        one on), or on with probability 1/2.
    on_order, off_order : int
        Modulation orders of laser-on and laser-off shots.
    delays : sequence of float, optional
        Delay-stage positions (mm), one drawn at random per exposure.
    """

    laser: str = "none"
    on_order: int = 6
    off_order: int = 4
    delays: Sequence[float] | None = None


@dataclasses.dataclass(frozen=True)
class PhotonCounting:
    """Images in detector units of known photon counts.

    With ``absolute_gain`` (electrons per detector unit) the noise-free
    image is the mean number of photons per pixel; the Poisson draw counts
    photons, and the stored value is ``photons * E / (w * absolute_gain)``
    (``E`` the shot's photon energy, ``w = 3.65 eV`` per electron-hole pair
    in silicon: :mod:`sacla_dask.shots.units`); ``detector_info/absolute_gain``
    is written.
    """

    absolute_gain: float | None = None


class SyntheticKeywords(TypedDict, total=False):
    """The flat keywords of :func:`write_synthetic_run`, one per field of a group.

    New options go into a group (:class:`Shots`, :class:`Detector`,
    :class:`Rings`, :class:`BraggSpots`, :class:`Nanocrystals`,
    :class:`Storage`), not here.
    """

    n_tags: int
    n_dark: int
    run: int
    first_tag: int
    tag_step: int
    first_image: int
    extra_event_tags: int
    pulse_selector: bool
    photon_energy: float
    shape: tuple[int, int]
    center: tuple[float, float] | None
    pixel_size: float
    distance: float
    background: float
    noise: bool
    ring_radii: Sequence[float]
    ring_width: float
    ring_amplitudes: Sequence[float] | None
    modulation_order: int
    modulation_amplitude: float
    modulated_rings: Sequence[int] | None
    ring_phase_offsets: Sequence[float] | None
    spots: int
    spot_amplitude: float
    spot_width: float
    crystals: int
    crystal_lattice: str
    crystal_a: float
    crystal_c: float | None
    crystal_reflections: Sequence[Sequence[int]]
    crystal_amplitudes: Sequence[float] | None
    rocking_width: float
    crystal_spot_width: float
    compression: str
    chunks: tuple[int, int] | None
    missing_data: Sequence[int]
    laser: str
    laser_on_order: int
    laser_off_order: int
    delays: Sequence[float] | None
    absolute_gain: float | None


#: flat keyword of :func:`write_synthetic_run` -> (group, field)
KEYWORD_FIELDS: dict[str, tuple[str, str]] = {
    "n_tags": ("shots", "n_tags"),
    "n_dark": ("shots", "n_dark"),
    "run": ("shots", "run"),
    "first_tag": ("shots", "first_tag"),
    "tag_step": ("shots", "tag_step"),
    "first_image": ("shots", "first_image"),
    "extra_event_tags": ("shots", "extra_event_tags"),
    "pulse_selector": ("shots", "pulse_selector"),
    "photon_energy": ("shots", "photon_energy"),
    "shape": ("detector", "shape"),
    "center": ("detector", "center"),
    "pixel_size": ("detector", "pixel_size"),
    "distance": ("detector", "distance"),
    "background": ("detector", "background"),
    "noise": ("detector", "poisson_noise"),
    "ring_radii": ("rings", "radii"),
    "ring_width": ("rings", "width"),
    "ring_amplitudes": ("rings", "amplitudes"),
    "modulation_order": ("rings", "modulation_order"),
    "modulation_amplitude": ("rings", "modulation_amplitude"),
    "modulated_rings": ("rings", "modulated"),
    "ring_phase_offsets": ("rings", "phase_offsets"),
    "spots": ("bragg_spots", "per_ring"),
    "spot_amplitude": ("bragg_spots", "amplitude"),
    "spot_width": ("bragg_spots", "width"),
    "crystals": ("nanocrystals", "per_shot"),
    "crystal_lattice": ("nanocrystals", "lattice"),
    "crystal_a": ("nanocrystals", "a"),
    "crystal_c": ("nanocrystals", "c"),
    "crystal_reflections": ("nanocrystals", "reflections"),
    "crystal_amplitudes": ("nanocrystals", "amplitudes"),
    "rocking_width": ("nanocrystals", "rocking_width"),
    "crystal_spot_width": ("nanocrystals", "spot_width"),
    "compression": ("storage", "compression"),
    "chunks": ("storage", "chunks"),
    "missing_data": ("storage", "missing_data"),
    "laser": ("pump_probe", "laser"),
    "laser_on_order": ("pump_probe", "on_order"),
    "laser_off_order": ("pump_probe", "off_order"),
    "delays": ("pump_probe", "delays"),
    "absolute_gain": ("photon_counting", "absolute_gain"),
}


# -- the writer ---------------------------------------------------------------------------
def write_synthetic_run(
    path: str | os.PathLike[str],
    *,
    shots: Shots | None = None,
    detector: Detector | None = None,
    rings: Rings | None = None,
    bragg_spots: BraggSpots | None = None,
    storage: Storage | None = None,
    nanocrystals: Nanocrystals | None = None,
    seed: int = 0,
    pump_probe: PumpProbe | None = None,
    photon_counting: PhotonCounting | None = None,
    panels: Panels | None = None,
    **keywords: Unpack[SyntheticKeywords],
) -> SyntheticTruth:
    """Write a synthetic SACLA run in the DataConvert layout.

    Powder rings about the beam centre on every bright shot, scaled by its
    pulse energy and modulated by ``1 + a cos(n (phi - phase))`` with a
    random phase per shot; the run's first exposures dark; per-tag event
    data (pulse selector, photon energy, pulse energy).

    Parameters
    ----------
    path : path
        Output HDF5 file (overwritten).
    shots : Shots, optional
        The exposures, their tags and event data (default :class:`Shots`).
    detector : Detector, optional
        Image shape, beam centre, pixel size, distance, background and noise.
    rings : Rings, optional
        Ring radii, widths, amplitudes and their angular modulation.
    bragg_spots : BraggSpots, optional
        Bragg spots on the rings (default: none).
    storage : Storage, optional
        Compression and chunks of the images, tags written without them.
    nanocrystals : Nanocrystals, optional
        Randomly oriented crystallites whose reflections meet the Ewald
        sphere (default: none; ``crystals=`` sets their number per shot).
    panels : Panels, optional
        Write the images as separate sensor datasets plus a CrystFEL
        ``.geom`` (:mod:`.synthetic_panels`, ``Panels(8)``); default assembled.
    seed : int
        Random seed.
    pump_probe : PumpProbe, optional
        Laser on/off shots of two angular symmetries, a delay (default: none).
    photon_counting : PhotonCounting, optional
        Images of known photon counts and the detector's absolute gain.
    **keywords
        Any field of a group by its flat name (:class:`SyntheticKeywords`,
        :data:`KEYWORD_FIELDS`): ``n_tags=``, ``shape=``, ``ring_radii=``,
        ``noise=`` (``Detector.poisson_noise``), ``spots=``
        (``BraggSpots.per_ring``), ``compression=``... A keyword replaces
        that field of the group given (or of the default one).

    Returns
    -------
    SyntheticTruth
    """
    groups: dict[str, Any] = {
        "shots": Shots() if shots is None else shots,
        "detector": Detector() if detector is None else detector,
        "rings": Rings() if rings is None else rings,
        "bragg_spots": BraggSpots() if bragg_spots is None else bragg_spots,
        "storage": Storage() if storage is None else storage,
        "nanocrystals": Nanocrystals() if nanocrystals is None else nanocrystals,
        "pump_probe": PumpProbe() if pump_probe is None else pump_probe,
        "photon_counting": PhotonCounting() if photon_counting is None else photon_counting,
        "panels": Panels() if panels is None else panels,
    }
    changes: dict[str, dict[str, Any]] = {}
    for name, value in keywords.items():
        if name not in KEYWORD_FIELDS:
            raise TypeError(f"write_synthetic_run() got an unexpected keyword argument {name!r}")
        group, field = KEYWORD_FIELDS[name]
        changes.setdefault(group, {})[field] = value
    for group, fields in changes.items():
        groups[group] = dataclasses.replace(groups[group], **fields)
    return _write(os.fspath(path), seed=seed, **groups)


def _write(p: str, shots: Shots, detector: Detector, rings: Rings, bragg_spots: BraggSpots,
           storage: Storage, nanocrystals: Nanocrystals, seed: int,
           pump_probe: PumpProbe = PumpProbe(),
           photon_counting: PhotonCounting = PhotonCounting(),
           panels: Panels | None = None) -> SyntheticTruth:
    """The writer of :func:`write_synthetic_run`, from its groups."""
    n_tags, first_image, extra_event_tags = shots.n_tags, shots.first_image, shots.extra_event_tags
    shape = detector.shape
    compression = storage.compression
    ring_radii, ring_width, order = rings.radii, rings.width, rings.modulation_order
    if pump_probe.laser != "none":  # laser-on shots: on_order; laser-off: off_order
        order = pump_probe.on_order
    spots = bragg_spots
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS} (got {compression!r})")
    if first_image < 0 or n_tags < 0 or extra_event_tags < 0:
        raise ValueError("n_tags, first_image and extra_event_tags must be >= 0")
    rng = np.random.default_rng(seed)
    ny, nx = shape
    center = detector.center
    if center is None:
        center = ((nx - 1) / 2 + 3.3, (ny - 1) / 2 - 2.1)
    cx, cy = float(center[0]), float(center[1])
    n_event = first_image + n_tags + extra_event_tags
    event_tags = shots.first_tag + shots.tag_step * np.arange(n_event, dtype=np.int64)
    img_idx = np.arange(first_image, first_image + n_tags)
    tags = event_tags[img_idx]
    bright = np.ones(n_event, dtype=bool)
    bright[:shots.n_dark] = False
    phases = rng.uniform(0, 2 * np.pi, n_event)
    pulse_energy = np.where(bright, rng.normal(1.0e-3, 0.05e-3, n_event), 0.0)
    energies = shots.photon_energy + rng.normal(0, 1.0, n_event)
    missing = sorted({int(i) for i in storage.missing_data})
    if missing and (missing[0] < 0 or missing[-1] >= n_tags):
        raise ValueError(f"missing_data indices must lie in 0..{n_tags - 1} (got {missing})")

    # Precompute r, phi once; each shot is a cheap float32 combination.
    yy, xx = np.mgrid[:ny, :nx].astype(np.float32)
    dx, dy = xx - np.float32(cx), yy - np.float32(cy)
    r = np.hypot(dx, dy)
    phi = np.arctan2(dy, dx)
    del yy, xx, dx, dy
    amps = (list(rings.amplitudes) if rings.amplitudes is not None
            else [1000.0] * len(ring_radii))
    ring_sum = np.zeros(shape, np.float32)
    for rk, a in zip(ring_radii, amps, strict=True):
        ring_sum += np.float32(a) * np.exp(-((r - np.float32(rk)) ** 2)
                                           / np.float32(2 * ring_width**2))
    per_ring = None
    if rings.modulated is not None or rings.phase_offsets is not None:
        per_ring = _ring_modulation(r, phi, ring_radii, amps, ring_width, ring_sum,
                                    order, rings.modulated, rings.phase_offsets)
    del r
    cos_n = np.cos(order * phi).astype(np.float32)
    sin_n = np.sin(order * phi).astype(np.float32)
    if per_ring is not None:
        cos_n, sin_n = per_ring
    laser_on, delay, off_mod = _pump_probe(pump_probe, phi, n_event, seed)
    del phi

    kw: dict = {}
    if compression == "gzip":
        kw = dict(compression="gzip", compression_opts=4)
    elif compression == "bitshuffle-lz4":
        kw = dict(**hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
    elif compression == "zstd":
        kw = dict(**hdf5plugin.Zstd())
    if storage.chunks is not None:
        kw["chunks"] = tuple(int(c) for c in storage.chunks)
    elif kw:
        kw["chunks"] = tuple(shape)
    rects = sensor_rects(shape, panels) if panels is not None and panels.sensors else []
    if rects and "chunks" in kw:  # (one chunk per sensor image, at most)
        kw["chunks"] = tuple(min(c, s) for c, s in zip(kw["chunks"], (rects[0].h, rects[0].w),
                                                       strict=True))

    if spots.per_ring < 0 or spots.width <= 0 or spots.amplitude < 0:
        raise ValueError("spots and spot_amplitude must be >= 0 and spot_width > 0")
    spot_rng = np.random.default_rng((seed, 1))
    crystal_rng = np.random.default_rng((seed, 2))
    xtal = _CrystalSpots.make(nanocrystals, shots.photon_energy, detector, cx, cy) \
        if nanocrystals.per_shot else None
    n_spots = np.zeros(n_tags, np.int64)
    adu_per_photon = None
    if photon_counting.absolute_gain is not None:
        from ..shots.units import PAIR_ENERGY_EV

        if not photon_counting.absolute_gain > 0:
            raise ValueError("absolute_gain must be positive (electrons per detector unit)")
        adu_per_photon = energies / (PAIR_ENERGY_EV * photon_counting.absolute_gain)
    img = np.empty(shape, np.float32)
    run = shots.run
    with h5py.File(p, "w") as fh:
        fh["file_info/run_number_list"] = np.array([run], dtype=np.int64)
        g = fh.create_group(f"run_{run}")
        dets = [g.create_group(f"detector_2d_{r.index + 1}") for r in rects] or \
            [g.create_group(DETECTOR)]
        det = dets[0]
        for d in dets:
            info = d.create_group("detector_info")
            info["pixel_size_in_micro_meter"] = np.array([detector.pixel_size * 1e6] * 2)
            info["detector_name"] = np.bytes_("MPCCD-8N0-synthetic")
        ev = g.create_group("event_info")
        ev["tag_number_list"] = event_tags
        if shots.pulse_selector:
            ev["bl_3/eh_1/xfel_pulse_selector_status"] = bright.astype(np.int32)
        ev["bl_3/oh_2/photon_energy_in_eV"] = energies
        ev["bl_3/oh_2/bm_1_pulse_energy_in_joule"] = pulse_energy
        if pump_probe.laser != "none":
            ev["bl_3/lh_1/laser_pulse_selector_status"] = laser_on.astype(np.int32)
        if delay.size:
            ev["bl_3/lh_1/delay_mm"] = delay
        if photon_counting.absolute_gain is not None:
            info["absolute_gain"] = np.float64(photon_counting.absolute_gain)
        g["run_info/sacla_config/synthetic"] = np.bytes_("sacla_dask.synthetic")
        g.create_group("exp_info")
        # Contiguous datasets are written with h5py's low-level calls, much
        # cheaper per tag group than the high-level API (a run has thousands).
        # Chunked or filtered datasets go through the high-level API, which
        # sets the filters up (a copied creation property list would re-run
        # the filters' set_local and garble their parameters).
        ftype = h5py.h5t.py_create(np.dtype("<f4"))
        space = h5py.h5s.create_simple(tuple(shape))
        stype = h5py.h5t.py_create(np.dtype("<i4"))
        sspace = h5py.h5s.create(h5py.h5s.SCALAR)
        one = np.array(1, dtype=np.int32)
        mset = set(missing)
        for k, (i, tag) in enumerate(zip(img_idx, tags, strict=True)):
            if off_mod is not None and not laser_on[i]:
                _shot(img, bright[i], detector.background, pulse_energy[i], ring_sum,
                      off_mod[0], off_mod[1], rings.modulation_amplitude,
                      pump_probe.off_order, phases[i])
            else:
                _shot(img, bright[i], detector.background, pulse_energy[i], ring_sum, cos_n,
                      sin_n, rings.modulation_amplitude,
                      pump_probe.on_order if off_mod is not None else order, phases[i])
            if spots.per_ring and bright[i]:
                _add_spots(img, spot_rng, spots.per_ring, cx, cy, ring_radii, spots.width,
                           spots.amplitude * pulse_energy[i] / 1.0e-3)
            if xtal is not None and bright[i]:
                n_spots[k] = xtal.draw(img, crystal_rng, pulse_energy[i] / 1.0e-3)
            if detector.poisson_noise:
                img[...] = rng.poisson(np.maximum(img, 0))
            if adu_per_photon is not None:
                img *= np.float32(adu_per_photon[i])
            if rects:  # the same pixels, as separate sensors
                for r, d in zip(rects, dets, strict=True):
                    sid = h5py.h5g.create(d.id, f"tag_{tag}".encode())
                    if k not in mset:
                        _write_image(sid, r.take(img), kw)
                    st = h5py.h5d.create(sid, b"detector_status", stype, sspace)
                    st.write(h5py.h5s.ALL, h5py.h5s.ALL, one)
                continue
            gid = h5py.h5g.create(det.id, f"tag_{tag}".encode())
            if k in mset:
                pass
            elif kw:
                h5py.Group(gid).create_dataset("detector_data", data=img, **kw)
            else:
                dsid = h5py.h5d.create(gid, b"detector_data", ftype, space)
                dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, img)
            st = h5py.h5d.create(gid, b"detector_status", stype, sspace)
            st.write(h5py.h5s.ALL, h5py.h5s.ALL, one)
    geom = None
    if rects:
        assert panels is not None
        geom = write_panels_geom(panels.geom or os.path.splitext(p)[0] + ".geom", shape,
                                 panels, (cx, cy), detector.pixel_size, detector.distance)
    return SyntheticTruth(
        geom=geom, path=p, run=run, tags=tags, bright=bright[img_idx], shape=(ny, nx),
        center_x=cx, center_y=cy, ring_radii=tuple(float(x) for x in ring_radii),
        ring_width=ring_width, pixel_size=detector.pixel_size, distance=detector.distance,
        photon_energy=shots.photon_energy, modulation_order=order,
        modulation_amplitude=rings.modulation_amplitude, phases=phases[img_idx],
        pulse_energy=pulse_energy[img_idx], event_tags=event_tags,
        missing=tags[missing] if missing else np.zeros(0, np.int64),
        nanocrystals=nanocrystals if nanocrystals.per_shot else None,
        spots_per_shot=n_spots, laser_on=laser_on[img_idx],
        delay=delay[img_idx] if delay.size else delay,
        adu_per_photon=(adu_per_photon[img_idx] if adu_per_photon is not None
                        else np.zeros(0)),
    )


def _pump_probe(pp: PumpProbe, phi: np.ndarray, n_event: int, seed: int
                ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """Laser status and delay per exposure, and the (cos, sin) images of the laser-off
    order (None without a laser)."""
    pp_rng = np.random.default_rng((seed, 3))
    if pp.laser == "none":
        laser_on = np.ones(n_event, dtype=bool)
    elif pp.laser == "alternate":
        laser_on = np.arange(n_event) % 2 == 0
    elif pp.laser == "random":
        laser_on = pp_rng.random(n_event) < 0.5
    else:
        raise ValueError(f"laser must be 'none', 'alternate' or 'random' (got {pp.laser!r})")
    delay = (pp_rng.choice(np.asarray(pp.delays, dtype=np.float64), n_event)
             if pp.delays else np.zeros(0))
    if pp.laser == "none":
        return laser_on, delay, None
    off = (np.cos(pp.off_order * phi).astype(np.float32),
           np.sin(pp.off_order * phi).astype(np.float32))
    return laser_on, delay, off


def _write_image(gid: h5py.h5g.GroupID, image: np.ndarray, kw: dict[str, Any]) -> None:
    """``detector_data`` of one image in the tag group ``gid`` (filters ``kw``, or contiguous)."""
    if kw:
        h5py.Group(gid).create_dataset("detector_data", data=image, **kw)
        return
    dsid = h5py.h5d.create(gid, b"detector_data", h5py.h5t.py_create(np.dtype("<f4")),
                           h5py.h5s.create_simple(image.shape))
    dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, image)


def _shot(out: np.ndarray, bright: bool, background: float, pulse_energy: float,
          ring_sum: np.ndarray, cos_n: np.ndarray, sin_n: np.ndarray, amplitude: float,
          order: int, phase: float) -> None:
    """One noise-free shot into ``out`` (float32, in place, no temporaries).

    ``bg + (E / 1 mJ) * rings * (1 + a cos(n (phi - phase)))`` for a bright
    shot; ``bg`` for a dark one.
    """
    if not bright:
        out.fill(background)
        return
    # cos(n(phi - p)) = cos(n phi) cos(n p) + sin(n phi) sin(n p)
    np.multiply(cos_n, np.float32(amplitude * np.cos(order * phase)), out=out)
    out += sin_n * np.float32(amplitude * np.sin(order * phase))
    out += np.float32(1)
    out *= ring_sum
    out *= np.float32(pulse_energy / 1.0e-3)
    out += np.float32(background)


def _add_spots(out: np.ndarray, rng: np.random.Generator, n: int, cx: float, cy: float,
               radii: Sequence[float], width: float, amplitude: float) -> None:
    """Add ``n`` gaussian Bragg spots per ring to ``out`` (float32, in place).

    Each spot: sigma ``width`` px, centred on ring radius ``R_k`` about
    ``(cx, cy)`` at a uniform random azimuth, peak height exponential with
    mean ``amplitude``; drawn in a window of +/- 4 sigma.
    """
    ny, nx = out.shape
    half = int(np.ceil(4 * width)) + 1
    for rk in radii:
        angles = rng.uniform(0, 2 * np.pi, n)
        heights = rng.exponential(amplitude, n) if amplitude > 0 else np.zeros(n)
        for a, h in zip(angles, heights, strict=True):
            sx, sy = cx + rk * np.cos(a), cy + rk * np.sin(a)
            x0, y0 = max(int(np.floor(sx)) - half, 0), max(int(np.floor(sy)) - half, 0)
            x1, y1 = min(int(np.floor(sx)) + half + 2, nx), min(int(np.floor(sy)) + half + 2, ny)
            if x0 >= x1 or y0 >= y1:
                continue
            gx = np.exp(-0.5 * ((np.arange(x0, x1) - sx) / width) ** 2)
            gy = np.exp(-0.5 * ((np.arange(y0, y1) - sy) / width) ** 2)
            out[y0:y1, x0:x1] += (h * np.outer(gy, gx)).astype(np.float32)


def random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` rotation matrices (n, 3, 3) uniform on SO(3) (normalised gaussian quaternions)."""
    qt = rng.normal(size=(n, 4))
    qt /= np.linalg.norm(qt, axis=1, keepdims=True)
    w, x, y, z = qt.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], axis=1)


@dataclasses.dataclass(frozen=True)
class _CrystalSpots:
    """The reflections of :class:`Nanocrystals` prepared for drawing (see there)."""

    vectors: np.ndarray      # (m, 3) unit reciprocal-lattice vectors of every reflection
    sin_theta: np.ndarray    # (m,) sin of their Bragg angles
    radius: np.ndarray       # (m,) spot radius on the detector, px
    amplitude: np.ndarray    # (m,) peak height at the Bragg condition, 1 mJ
    per_shot: int
    rocking_width: float
    spot_width: float
    cx: float
    cy: float

    @classmethod
    def make(cls, nc: Nanocrystals, photon_energy: float, detector: Detector, cx: float,
             cy: float) -> _CrystalSpots:
        from ..structure.lattice import (
            check_allowed,
            equivalents,
            lattice_name,
            reciprocal_basis,
        )

        if nc.per_shot < 0 or nc.rocking_width <= 0 or nc.spot_width <= 0:
            raise ValueError("crystals must be >= 0, rocking_width and spot_width > 0")
        name = lattice_name(nc.lattice)
        basis = reciprocal_basis(name, nc.a, nc.c)
        amps = nc.amplitudes or (300.0,) * len(nc.reflections)
        if len(amps) != len(nc.reflections):
            raise ValueError(f"{len(amps)} amplitudes for {len(nc.reflections)} reflections")
        wavelength = HC_KEV_ANGSTROM * 1e3 / photon_energy
        vec, sin_t, rad, amp = [], [], [], []
        for hkl, a in zip(nc.reflections, amps, strict=True):
            check_allowed(name, hkl)
            g = equivalents(name, hkl).astype(float) @ basis
            q = float(np.linalg.norm(g[0]))
            s = q * wavelength / (4 * np.pi)
            if not s < np.sin(np.pi / 4):
                raise ValueError(f"reflection {hkl} scatters beyond 90 degrees at "
                                 f"{wavelength:.4g} A: not on a flat detector")
            r = detector.distance * np.tan(2 * np.arcsin(s)) / detector.pixel_size
            vec.append(g / q)
            sin_t += [s] * len(g)
            rad += [r] * len(g)
            amp += [float(a)] * len(g)
        return cls(np.concatenate(vec), np.array(sin_t), np.array(rad), np.array(amp),
                   int(nc.per_shot), float(nc.rocking_width), float(nc.spot_width), cx, cy)

    def draw(self, out: np.ndarray, rng: np.random.Generator, scale: float) -> int:
        """Add one shot's crystallites' spots to ``out`` (in place); the number drawn."""
        rot = random_rotations(rng, self.per_shot)
        v = np.einsum("nij,mj->nmi", rot, self.vectors)  # (crystal, vector, xyz)
        # elevation below the plane normal to the beam vs the Bragg angle
        delta = np.arcsin(np.clip(-v[..., 2], -1, 1)) - np.arcsin(self.sin_theta)
        weight = np.exp(-0.5 * (delta / self.rocking_width) ** 2)
        ci, mi = np.nonzero(weight > 1e-3)
        phi = np.arctan2(v[ci, mi, 1], v[ci, mi, 0])
        r = self.radius[mi]
        heights = scale * self.amplitude[mi] * weight[ci, mi]
        drawn = 0
        for x, y, h in zip(self.cx + r * np.cos(phi), self.cy + r * np.sin(phi), heights,
                           strict=True):
            drawn += _gaussian_spot(out, float(x), float(y), self.spot_width, float(h))
        return drawn


def _gaussian_spot(out: np.ndarray, sx: float, sy: float, width: float, height: float) -> int:
    """Add a gaussian spot (sigma ``width`` px) at ``(sx, sy)``; 1 if it touches the image."""
    ny, nx = out.shape
    half = int(np.ceil(4 * width)) + 1
    x0, y0 = max(int(np.floor(sx)) - half, 0), max(int(np.floor(sy)) - half, 0)
    x1, y1 = min(int(np.floor(sx)) + half + 2, nx), min(int(np.floor(sy)) + half + 2, ny)
    if x0 >= x1 or y0 >= y1:
        return 0
    gx = np.exp(-0.5 * ((np.arange(x0, x1) - sx) / width) ** 2)
    gy = np.exp(-0.5 * ((np.arange(y0, y1) - sy) / width) ** 2)
    out[y0:y1, x0:x1] += (height * np.outer(gy, gx)).astype(np.float32)
    return 1


# -- damaged files (for the tests of bad input) --------------------------------
def tag_dataset_path(run: int, tag: int) -> str:
    """HDF5 path of a tag's image in the DataConvert layout."""
    return f"/run_{run}/{DETECTOR}/tag_{tag}/detector_data"


def corrupt_tag(path: str | os.PathLike[str], tag: int, run: int | None = None,
                nbytes: int = 4096, seed: int = 0) -> int:
    """Overwrite the start of a tag's first stored chunk with random bytes.

    The HDF5 metadata stays intact, so the file opens and lists the tag;
    only decompressing that chunk fails, when the image is read. The
    dataset must be chunked and compressed (with a contiguous layout there
    is nothing HDF5 could detect).

    Returns
    -------
    int
        The file offset (bytes) that was overwritten.
    """
    p = os.fspath(path)
    with h5py.File(p, "r") as fh:
        if run is None:
            run = int(np.atleast_1d(fh["file_info/run_number_list"][()])[0])
        ds = fh[tag_dataset_path(run, tag)]
        if ds.chunks is None or not ds.compression and not ds.id.get_create_plist().get_nfilters():
            raise ValueError(f"{p!r} tag {tag}: detector_data is not chunked and compressed; "
                             "write the run with compression= to corrupt a chunk")
        info = ds.id.get_chunk_info(0)
    garbage = np.random.default_rng(seed).integers(0, 256, min(nbytes, info.size),
                                                   dtype=np.uint8).tobytes()
    with open(p, "r+b") as f:
        f.seek(info.byte_offset)
        f.write(garbage)
    return int(info.byte_offset)


def truncate_file(path: str | os.PathLike[str], fraction: float = 0.5) -> int:
    """Cut a file to ``fraction`` of its size (an interrupted copy). Returns the new size."""
    p = os.fspath(path)
    size = int(os.path.getsize(p) * fraction)
    os.truncate(p, size)
    return size


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
