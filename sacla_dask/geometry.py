"""Experiment geometry: detector distance, pixel size, wavelength and beam centre.

This module owns the conversion between pixel radius on the detector and
momentum transfer ``q``, the default angular sampling ``nphi``, the photon
energy to wavelength conversion, and reading/writing the geometry YAML file
shared by ``sacla-dask center`` and ``sacla-dask process``.

Conventions
-----------
* ``center_x`` is along the fast (column, last) image axis and ``center_y``
  along the slow (row) axis, both in pixels, pixel centres at integers.
* ``q = 4 pi / lambda * sin(arctan(r * pixel_size / distance) / 2)``, in
  inverse Angstrom, with ``r`` in pixels, ``pixel_size`` and ``distance`` in
  metres and ``lambda`` in Angstrom.
* ``phi = atan2(y - center_y, x - center_x)`` in radians, in ``[0, 2 pi)``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .errors import GeometryError, ParameterError

#: h * c in keV * Angstrom (CODATA 2018).
HC_KEV_ANGSTROM = 12.398419843320026

GEOMETRY_KEYS = ("center_x", "center_y", "pixel_size", "distance", "wavelength", "mask")
#: Further keys of the geometry YAML: a pyFAI PONI file, and the detector's rotations.
TILT_KEYS = ("poni", "rot1", "rot2", "rot3")


def energy_to_wavelength(energy_ev: float | np.ndarray) -> float | np.ndarray:
    """Photon energy in eV to wavelength in Angstrom.

    Parameters
    ----------
    energy_ev : float or ndarray
        Photon energy in electronvolts; must be positive.

    Returns
    -------
    float or ndarray
        Wavelength in Angstrom (``12398.42 / E[eV]``).
    """
    e = np.asarray(energy_ev, dtype=float)
    if not np.all(np.isfinite(e)) or np.any(e <= 0):
        raise ParameterError(f"photon energy must be positive and finite (got {energy_ev!r} eV)")
    out = HC_KEV_ANGSTROM * 1e3 / e
    return float(out) if out.ndim == 0 else out


def check_positive(name: str, value: float, unit: str) -> float:
    """``float(value)``, or ParameterError naming ``name`` and ``unit`` unless positive, finite."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ParameterError(f"{name} must be a number in {unit} (got {value!r})") from None
    if not math.isfinite(v) or v <= 0:
        raise ParameterError(f"{name} must be positive and finite, in {unit} (got {value!r})")
    return v


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Scattering geometry of one detector.

    Parameters
    ----------
    center_x, center_y : float
        Beam centre in pixels (x = fast/column axis, y = slow/row axis).
    pixel_size : float
        Pixel size in metres (MPCCD: 50e-6).
    distance : float
        Sample-to-detector distance in metres.
    wavelength : float
        X-ray wavelength in Angstrom.
    rot1, rot2, rot3 : float
        Detector rotations in radians, pyFAI's (``docs/geometry.md``); all 0
        (the default) for a detector perpendicular to the beam. When any is
        not 0, ``center_x``, ``center_y`` are pyFAI's point of normal
        incidence (PONI) in pixels, ``distance`` the sample-PONI distance,
        and the pixel radius of :meth:`radius_to_q` and the polar grid is the
        radius on an untilted detector at ``distance`` (``tan(2 theta) *
        distance / pixel_size``), which labels the q bins only.
    """

    center_x: float
    center_y: float
    pixel_size: float
    distance: float
    wavelength: float
    rot1: float = 0.0
    rot2: float = 0.0
    rot3: float = 0.0

    def __post_init__(self) -> None:
        for name in ("center_x", "center_y"):
            v = getattr(self, name)
            try:
                fv = float(v)
            except (TypeError, ValueError):
                raise ParameterError(f"{name} must be a number of pixels (got {v!r})") from None
            if not math.isfinite(fv):
                raise ParameterError(f"{name} must be finite (got {v!r})")
            object.__setattr__(self, name, fv)
        for name in ("rot1", "rot2", "rot3"):
            v = getattr(self, name)
            try:
                fv = float(v)
            except (TypeError, ValueError):
                raise ParameterError(f"{name} must be a number of radians (got {v!r})") from None
            if not math.isfinite(fv) or abs(fv) >= math.pi / 2:
                raise ParameterError(f"{name} must be finite and within +-pi/2 rad (got {v!r})")
            object.__setattr__(self, name, fv)
        for name, unit in (("pixel_size", "metres"), ("distance", "metres"),
                           ("wavelength", "Angstrom")):
            object.__setattr__(self, name, check_positive(name, getattr(self, name), unit))

    # -- tilt ----------------------------------------------------------------
    @property
    def tilted(self) -> bool:
        """True when any rotation is not 0 (the detector is not perpendicular to the beam)."""
        return self.rot1 != 0.0 or self.rot2 != 0.0 or self.rot3 != 0.0

    @property
    def rotations(self) -> tuple[float, float, float]:
        """``(rot1, rot2, rot3)`` in radians."""
        return (self.rot1, self.rot2, self.rot3)

    def beam_center(self) -> tuple[float, float]:
        """Where the direct beam hits the detector, ``(x, y)`` in pixels.

        The centre itself when untilted; otherwise pyFAI's Fit2D beam centre.
        """
        if not self.tilted:
            return (self.center_x, self.center_y)
        from .lab import beam_center

        return beam_center(self)

    def key(self) -> tuple[float, ...]:
        """The values that define the geometry (the rotations only when tilted)."""
        t = (self.center_x, self.center_y, self.pixel_size, self.distance, self.wavelength)
        return t + self.rotations if self.tilted else t

    # -- conversions -------------------------------------------------------
    @property
    def q_max_physical(self) -> float:
        """Largest q reachable at 90 degrees scattering angle, in inverse Angstrom."""
        return 4 * math.pi / self.wavelength * math.sin(math.pi / 4)

    def radius_to_q(self, radius_px: float | np.ndarray) -> float | np.ndarray:
        """Pixel radius from the beam centre to momentum transfer q (1/Angstrom)."""
        r = np.asarray(radius_px, dtype=float)
        two_theta = np.arctan(r * self.pixel_size / self.distance)
        q = 4 * np.pi / self.wavelength * np.sin(two_theta / 2)
        return float(q) if q.ndim == 0 else q

    def q_to_radius(self, q: float | np.ndarray) -> float | np.ndarray:
        """Momentum transfer q (1/Angstrom) to pixel radius from the beam centre."""
        qa = np.asarray(q, dtype=float)
        s = qa * self.wavelength / (4 * np.pi)
        if np.any(s < 0) or np.any(s >= math.sin(math.pi / 4)):
            raise GeometryError(
                f"q = {q!r} 1/A is not reachable on a flat detector at wavelength "
                f"{self.wavelength} A (must be 0 <= q < {self.q_max_physical:.4g} 1/A)"
            )
        r = np.tan(2 * np.arcsin(s)) * self.distance / self.pixel_size
        return float(r) if r.ndim == 0 else r

    def two_theta(self, radius_px: float | np.ndarray) -> float | np.ndarray:
        """Scattering angle 2-theta in radians at a pixel radius."""
        r = np.asarray(radius_px, dtype=float)
        out = np.arctan(r * self.pixel_size / self.distance)
        return float(out) if out.ndim == 0 else out

    def check_on_detector(self, shape: tuple[int, int]) -> None:
        """Raise :class:`GeometryError` if the centre lies outside an image of ``shape``.

        A centre may legitimately sit in a gap or behind the beam stop, but not
        off the detector: a fit that wandered there is wrong.
        """
        ny, nx = shape
        if self.tilted:  # the direct beam's spot, not the PONI, must be on the detector
            bx, by = self.beam_center()
            if not (-0.5 <= bx <= nx - 0.5 and -0.5 <= by <= ny - 0.5):
                raise GeometryError(
                    f"the direct beam hits the tilted detector at ({bx:g}, {by:g}) px, off "
                    f"the {ny}x{nx} detector image (PONI ({self.center_x:g}, "
                    f"{self.center_y:g}) px, rot1..3 = {self.rotations})")
            return
        if not (-0.5 <= self.center_x <= nx - 0.5 and -0.5 <= self.center_y <= ny - 0.5):
            raise GeometryError(
                f"beam centre (center_x={self.center_x:g}, center_y={self.center_y:g}) px "
                f"lies off the {ny}x{nx} detector image"
            )

    def to_pyfai(self, shape: tuple[int, int]) -> Any:
        """The same geometry as a pyFAI ``AzimuthalIntegrator`` (pyFAI must be installed).

        pyFAI puts pixel centres at ``(i + 0.5) * pixel`` (so ``poni = (center + 0.5) *
        pixel_size``, ``poni1`` along rows) and its ``chi`` then equals our ``phi``; the
        chi discontinuity is put at 0 so that chi runs over [0, 2 pi) like phi.
        """
        from pyFAI.detectors import Detector
        from pyFAI.integrator.azimuthal import AzimuthalIntegrator

        det = Detector(pixel1=self.pixel_size, pixel2=self.pixel_size, max_shape=shape)
        ai = AzimuthalIntegrator(dist=self.distance, poni1=(self.center_y + 0.5) * self.pixel_size,
                                 poni2=(self.center_x + 0.5) * self.pixel_size, detector=det,
                                 wavelength=self.wavelength * 1e-10, rot1=self.rot1,
                                 rot2=self.rot2, rot3=self.rot3)
        ai.setChiDiscAtZero()
        return ai

    def replace(self, **changes: Any) -> Geometry:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_attrs(self) -> dict[str, float]:
        """The geometry as a flat dict (the result store's attrs names; the rotations only
        when tilted)."""
        out = dataclasses.asdict(self)
        if not self.tilted:
            for k in ("rot1", "rot2", "rot3"):
                del out[k]
        return out


def default_nphi(outer_radius_px: float, fast: bool = True) -> int:
    """Number of phi bins giving about one pixel of arc at ``outer_radius_px``.

    The arc length of a bin at the outer radius is at most one pixel:
    ``ceil(2 pi r)`` bins, rounded up (by default) to the next length whose
    FFT is fast (``scipy.fft.next_fast_len``, only factors 2, 3 and 5). The
    rounding adds at most 6 % of bins, usually 1-3 % (4933 -> 5000 at r =
    785 px) and makes the correlation's FFTs several times faster: a length
    with a large prime factor (4933 is prime) costs 4-10x more.

    Parameters
    ----------
    outer_radius_px : float
        Outer radius of the q band, in pixels (not in inverse Angstrom: the
        tutorial's ``int(2*pi*qmax)`` slip).
    fast : bool
        Round up to a length that FFTs fast (default); False gives exactly
        ``ceil(2 pi r)``.

    Returns
    -------
    int
        ``ceil(2 pi r)``, at least 8, rounded up to an FFT-friendly length
        unless ``fast=False``.
    """
    if not math.isfinite(outer_radius_px) or outer_radius_px <= 0:
        raise ParameterError(f"outer radius must be positive (got {outer_radius_px!r} px)")
    n = max(8, int(math.ceil(2 * math.pi * outer_radius_px)))
    if fast:
        import scipy.fft

        n = int(scipy.fft.next_fast_len(n, real=True))
    return n


# -- YAML geometry file ------------------------------------------------------
def read_geometry_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a geometry YAML file into a dict of the known keys.

    Keys: ``center_x``, ``center_y`` (pixels), ``pixel_size``, ``distance``
    (metres), ``wavelength`` (Angstrom), ``mask`` (path, relative to the
    YAML file's folder when not absolute). Unknown keys are refused.
    """
    import yaml

    p = os.fspath(path)
    try:
        with open(p) as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ParameterError(f"geometry file {p!r} does not exist") from None
    except yaml.YAMLError as exc:
        raise ParameterError(f"geometry file {p!r} is not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ParameterError(f"geometry file {p!r} must hold a mapping of {GEOMETRY_KEYS}")
    unknown = sorted(set(data) - set(GEOMETRY_KEYS) - set(TILT_KEYS) - {"radius", "notes", "fit"}
                     - {"geom"})
    if unknown:
        raise ParameterError(
            f"geometry file {p!r} has unknown keys {unknown}; allowed: "
            f"{list(GEOMETRY_KEYS) + list(TILT_KEYS) + ['geom']}"
        )
    out = dict(data)
    for k in ("mask", "poni", "geom"):
        if out.get(k) and not os.path.isabs(out[k]):
            out[k] = os.path.join(os.path.dirname(os.path.abspath(p)), out[k])
    return out


@dataclasses.dataclass(frozen=True)
class GeometrySpec:
    """The geometry as a user gives it: the wavelength may be left to the run.

    Attributes
    ----------
    center : (x, y)
        Beam centre in pixels (x: fast/column axis, y: slow/row axis).
    pixel_size, distance : float
        Metres.
    wavelength : float or None
        Angstrom; None: the run's mean photon energy decides
        (:meth:`geometry`).
    """

    center: tuple[float, float]
    pixel_size: float
    distance: float
    wavelength: float | None = None
    rotations: tuple[float, float, float] = (0.0, 0.0, 0.0)
    shape: tuple[int, int] | None = None
    source: str | None = None
    #: a CrystFEL geometry of separate panels (:mod:`sacla_dask.crystfel`), else None
    panels: Any = dataclasses.field(default=None, compare=False)

    def geometry(self, wavelength: Callable[[], float]) -> Geometry:
        """The :class:`Geometry`, calling ``wavelength()`` (Angstrom) only if none was given."""
        cx, cy = self.center
        wl = self.wavelength if self.wavelength is not None else wavelength()
        return Geometry(cx, cy, self.pixel_size, self.distance, wl, *self.rotations)

    def check_shape(self, shape: tuple[int, int]) -> None:
        """GeometryError unless the detector shape of the PONI file (if any) is ``shape``."""
        if self.shape is not None and tuple(self.shape) != tuple(shape):
            raise GeometryError(
                f"PONI file {self.source!r}: Detector_config max_shape {list(self.shape)} is "
                f"not the run's image shape {list(shape)} (a PONI of another detector?)")


def resolve_geometry(path: str | os.PathLike[str] | None = None, *,
                     center: tuple[float, float] | None = None,
                     pixel_size: float | None = None, distance: float | None = None,
                     wavelength: float | None = None,
                     mask: str | None = None,
                     poni: str | os.PathLike[str] | None = None,
                     geom: str | os.PathLike[str] | None = None
                     ) -> tuple[GeometrySpec, str | None]:
    """The geometry of a geometry YAML file (optional) with the given values over it.

    What ``sacla-dask process --geometry FILE --center X Y ...`` uses: each
    value given (not None) replaces the file's.

    Parameters
    ----------
    path : path, optional
        A geometry YAML file (:func:`read_geometry_file`).
    center : (x, y), optional
        Pixels.
    pixel_size, distance : float, optional
        Metres.
    wavelength : float, optional
        Angstrom (None in both: the run's photon energy decides).
    mask : str, optional
        Pixel mask ``.npy`` path.
    poni : path, optional
        A pyFAI PONI file (:mod:`sacla_dask.poni`), or the YAML's ``poni``
        key: distance, PONI (the centre), rotations, pixel size and
        wavelength; the YAML's other keys and then the values given go over it.
    geom : path, optional
        A CrystFEL geometry of separate panels (:mod:`sacla_dask.crystfel`),
        or the YAML's ``geom`` key: it places every pixel, so no centre,
        pixel size, distance or rotation may be given with it; the
        wavelength: the one given, else the file's ``photon_energy``, else
        the run's.

    Returns
    -------
    (GeometrySpec, mask path or None)

    Raises
    ------
    ParameterError
        If the centre, pixel size or distance is in neither (the message
        names the command line flags).
    """
    geo: dict[str, Any] = read_geometry_file(path) if path else {}
    geom = geom if geom is not None else geo.get("geom")
    if geom:
        from .crystfel import geometry_spec

        return geometry_spec(geom, geo, path, center=center, pixel_size=pixel_size,
                             distance=distance, wavelength=wavelength, poni=poni), \
            (mask if mask is not None else (geo.get("mask") or None))
    poni = poni if poni is not None else geo.get("poni")
    extra: dict[str, Any] = {}
    if poni:
        from .poni import read_poni

        pg = read_poni(poni)
        base = {"center_x": pg.center[0], "center_y": pg.center[1], "pixel_size": pg.pixel1,
                "distance": pg.distance, "rot1": pg.rot1, "rot2": pg.rot2, "rot3": pg.rot3,
                "wavelength": None if pg.wavelength is None else pg.wavelength * 1e10}
        geo = {**base, **{k: v for k, v in geo.items() if v is not None}}
        extra = {"shape": pg.shape, "source": pg.path}
    for k in ("rot1", "rot2", "rot3"):
        v = geo.get(k, 0.0)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ParameterError(f"geometry file {os.fspath(path or '')!r}: {k} must be a number "
                                 f"of radians (got {v!r})")
    rotations = (float(geo.get("rot1", 0.0)), float(geo.get("rot2", 0.0)),
                 float(geo.get("rot3", 0.0)))
    cxy: tuple[Any, Any] = (center if center is not None
                            else (geo.get("center_x"), geo.get("center_y")))
    cx = cxy[0]
    pixel_size = pixel_size if pixel_size is not None else geo.get("pixel_size")
    distance = distance if distance is not None else geo.get("distance")
    wavelength = wavelength if wavelength is not None else geo.get("wavelength")
    mask = mask if mask is not None else (geo.get("mask") or None)
    missing = [n for n, v in (("--center", cx), ("--pixel-size", pixel_size),
                              ("--distance", distance)) if v is None]
    if missing or pixel_size is None or distance is None:
        raise ParameterError(f"missing {', '.join(missing)} (give the flag(s), --geometry or "
                             "--poni)")
    return GeometrySpec(cxy, pixel_size, distance, wavelength, rotations, **extra), mask


def write_geometry_file(path: str | os.PathLike[str], values: Mapping[str, Any]) -> None:
    """Write a geometry YAML file (see :func:`read_geometry_file` for the keys)."""
    import yaml

    clean: dict[str, Any] = {}
    for k, v in values.items():
        if v is None:
            continue
        if isinstance(v, (np.floating, np.integer)):
            v = v.item()
        clean[k] = v
    with open(os.fspath(path), "w") as fh:
        yaml.safe_dump(clean, fh, sort_keys=False)
