"""CrystFEL geometry files (``.geom``): separate detector panels and their bad pixels.

A ``.geom`` file describes each panel (``name/key = value`` lines; a key
without a panel name is the default of every panel that does not set it):

* ``min_fs``, ``max_fs``, ``min_ss``, ``max_ss`` (inclusive): where the
  panel's pixels are in the data;
* ``fs``, ``ss``: the lab direction of one step along the panel's fast and
  slow axes, in pixels (``+1.0x -0.0y``, optionally ``+0.0z``);
* ``corner_x``, ``corner_y``: where the corner of the panel's first pixel
  (``min_fs``, ``min_ss``: its outer corner, not its centre) is, in pixels
  from the beam;
* ``res`` (pixels per metre), ``clen`` (metres, camera length) and
  ``coffset`` (metres, added to ``clen``);
* ``data``: the data path, ``%`` the placeholder for the run and tag
  groups; a path naming a DataConvert sensor (``detector_2d_N``) puts the
  panel in that sensor's dataset;
* ``no_index = 1`` (the panel is left out), ``mask_file``, ``mask``,
  ``mask_good``, ``mask_bad`` (a mask dataset in an HDF5 file, bits as
  CrystFEL's), and bad regions ``badregionN/min_x, max_x, min_y, max_y``
  (lab pixels from the beam) or ``badregionN/min_fs, max_fs, min_ss,
  max_ss, panel`` (the panel's data coordinates).

Rigid groups, ``dim`` keys, ``adu_per_*``, ``max_adu`` and the rest are
read past. ``clen`` must be a number here (not a path into the data file).

The panels sit in one *stacked image* (:mod:`sacla_dask.io.panels`): the
sensor datasets ``detector_2d_1 .. N`` one below the other (rows ``(N-1)
* nss ..``). A panel whose ``data`` names sensor N is placed at ``(min_ss,
min_fs)`` of that sensor's dataset; a panel without (the stacked image of
Cheetah's SACLA geometry files) at ``(min_ss, min_fs)`` of the stacked image.

Lab frame: CrystFEL's ``x``, ``y`` (pixels in the detector plane) and ``z``
(along the beam) become pyFAI's ``t2``, ``t1``, ``t3`` (:mod:`sacla_dask.lab`),
so that ``phi = atan2(y, x)``: a panel with ``fs = +1x``, ``ss = +1y`` reads
like an assembled image, ``phi = atan2(row - cy, col - cx)``. A pixel's
centre, ``(fs, ss)`` steps from the panel's first one, sits at ``corner +
(fs + 1/2) fs_vec + (ss + 1/2) ss_vec`` (metres: pixels / ``res``, ``z =
clen + coffset``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import GeometryError, ParameterError
from .lab import DetectorLayout, Panel, check_layout

__all__ = ["CrystfelGeometry", "GeomPanel", "read_geom", "write_geom"]

_PANEL_KEYS = ("min_fs", "max_fs", "min_ss", "max_ss", "fs", "ss", "corner_x", "corner_y")
_INT_KEYS = ("min_fs", "max_fs", "min_ss", "max_ss")
_SENSOR_RE = re.compile(r"detector_2d_(\d+)(?![\w])")
_VEC_RE = re.compile(r"([+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)?)([xyz])")


@dataclasses.dataclass(frozen=True)
class GeomPanel:
    """One panel as the ``.geom`` file gives it (pixels, metres)."""

    name: str
    min_fs: int
    max_fs: int
    min_ss: int
    max_ss: int
    fs: tuple[float, float, float]
    ss: tuple[float, float, float]
    corner_x: float
    corner_y: float
    res: float
    clen: float
    coffset: float
    sensor: int | None
    no_index: bool
    mask: tuple[str, str, int, int] | None  # (file, dataset, good bits, bad bits)

    @property
    def nfs(self) -> int:
        return self.max_fs - self.min_fs + 1

    @property
    def nss(self) -> int:
        return self.max_ss - self.min_ss + 1


@dataclasses.dataclass(frozen=True)
class _BadRegion:
    name: str
    panel: str | None
    xy: tuple[float, float, float, float] | None  # min_x, max_x, min_y, max_y
    fs_ss: tuple[int, int, int, int] | None  # min_fs, max_fs, min_ss, max_ss


@dataclasses.dataclass(frozen=True, eq=False)
class CrystfelGeometry:
    """A CrystFEL geometry: panels, bad regions, camera length and pixel size.

    :meth:`layout` places the panels in the stacked image of a run's
    sensors and :meth:`mask` gives that image's good pixels.
    """

    path: str
    panels: tuple[GeomPanel, ...]
    bad_regions: tuple[_BadRegion, ...]
    photon_energy: float | None  # eV, when the file gives a number

    @property
    def pixel_size(self) -> float:
        """Metres (``1 / res`` of the first panel): the polar grid's radius unit."""
        return 1.0 / self.panels[0].res

    @property
    def distance(self) -> float:
        """Metres: the median of the panels' ``clen + coffset`` (labels the grid's radii)."""
        return float(np.median([p.clen + p.coffset for p in self.panels]))

    @property
    def wavelength(self) -> float | None:
        """Angstrom, from ``photon_energy`` (None when the file gives none)."""
        from .geometry import energy_to_wavelength

        return None if self.photon_energy is None else float(
            energy_to_wavelength(self.photon_energy))

    def describe(self) -> str:
        return f"CrystFEL geometry {self.path!r} ({len(self.panels)} panels)"

    # -- the stacked image -----------------------------------------------------------
    def layout(self, shape: tuple[int, int], sensors: int | None = None) -> DetectorLayout:
        """The panels in a stacked image of ``shape`` (``sensors`` datasets stacked by rows).

        Raises
        ------
        GeometryError
            Naming the file and the panel's keys: a panel in a sensor the
            run does not have, larger than its sensor's dataset, off the
            data, across two sensors, or overlapping another.
        """
        ny, nx = (int(s) for s in shape)
        n = sensors or 1
        if ny % n:
            raise GeometryError(f"geometry file {self.path!r}: the run's {ny} rows are not "
                                f"{n} sensors of equal height")
        h = ny // n
        out = []
        for p in self.panels:
            if p.sensor is not None:
                if sensors is None:
                    raise GeometryError(
                        f"geometry file {self.path!r}: {p.name}/data names sensor "
                        f"detector_2d_{p.sensor}, but the run's images are assembled "
                        "(detector_2d_assembled_1): a geometry of unassembled data?")
                if not 1 <= p.sensor <= n:
                    raise GeometryError(
                        f"geometry file {self.path!r}: {p.name}/data names sensor "
                        f"detector_2d_{p.sensor}; the run has detector_2d_1..{n}")
                if p.max_ss >= h or p.max_fs >= nx:
                    raise GeometryError(
                        f"geometry file {self.path!r}: panel {p.name!r} (max_ss {p.max_ss}, "
                        f"max_fs {p.max_fs}) is larger than its dataset detector_2d_"
                        f"{p.sensor} ({h}x{nx})")
                row0 = (p.sensor - 1) * h + p.min_ss
            else:
                row0 = p.min_ss
                if sensors is not None and row0 // h != (row0 + p.nss - 1) // h \
                        and row0 + p.nss <= ny:
                    raise GeometryError(
                        f"geometry file {self.path!r}: panel {p.name!r} (min_ss {p.min_ss}, "
                        f"max_ss {p.max_ss}) spans two sensor datasets of {h} rows each")
            out.append(self._panel(p, row0))
        check_layout(out, (ny, nx), f"geometry file {self.path!r}")
        return DetectorLayout(tuple(out), (ny, nx))

    def _panel(self, p: GeomPanel, row0: int) -> Panel:
        fs = np.array([p.fs[1], p.fs[0], p.fs[2]]) / p.res  # (x, y, z) -> (t1, t2, t3)
        ss = np.array([p.ss[1], p.ss[0], p.ss[2]]) / p.res
        corner = np.array([p.corner_y / p.res, p.corner_x / p.res, p.clen + p.coffset])
        origin = corner + 0.5 * (fs + ss)
        return Panel(p.name, int(row0), int(p.min_fs), p.nss, p.nfs, _t3(origin), _t3(fs),
                     _t3(ss))

    def mask(self, layout: DetectorLayout) -> np.ndarray | None:
        """Good pixels of the stacked image (bool; None when the file marks none bad).

        Pixels on no panel stay good (no ray reaches them); ``no_index``
        panels, bad regions and the panels' HDF5 masks are bad.
        """
        ny, nx = layout.shape
        good = np.ones((ny, nx), dtype=bool)
        touched = False
        by_name = {lp.name: (gp, lp) for gp, lp in zip(self.panels, layout.panels, strict=True)}
        for gp, lp in by_name.values():
            sl = (slice(lp.row0, lp.row0 + lp.nss), slice(lp.col0, lp.col0 + lp.nfs))
            if gp.no_index:
                good[sl] = False
                touched = True
            if gp.mask is not None:
                good[sl] &= self._hdf5_mask(gp)
                touched = True
        for br in self.bad_regions:
            touched = True
            if br.fs_ss is not None:
                names = [br.panel] if br.panel else list(by_name)
                for name in names:
                    if name not in by_name:
                        raise GeometryError(f"geometry file {self.path!r}: {br.name}/panel "
                                            f"{name!r} is not a panel of the file")
                    gp, lp = by_name[name]
                    f0, f1, s0, s1 = br.fs_ss
                    f0, f1 = max(f0, gp.min_fs), min(f1, gp.max_fs)
                    s0, s1 = max(s0, gp.min_ss), min(s1, gp.max_ss)
                    if f0 <= f1 and s0 <= s1:
                        good[lp.row0 + s0 - gp.min_ss: lp.row0 + s1 - gp.min_ss + 1,
                             lp.col0 + f0 - gp.min_fs: lp.col0 + f1 - gp.min_fs + 1] = False
            else:
                assert br.xy is not None
                x0, x1, y0, y1 = br.xy
                for gp, lp in by_name.values():
                    if br.panel and gp.name != br.panel:
                        continue
                    ss, fs = np.mgrid[:lp.nss, :lp.nfs]
                    pos = lp.positions(ss, fs)  # metres (t1 = y, t2 = x)
                    x = pos[..., 1] * gp.res
                    y = pos[..., 0] * gp.res
                    bad = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
                    good[lp.row0:lp.row0 + lp.nss, lp.col0:lp.col0 + lp.nfs] &= ~bad
        return good if touched else None

    def _hdf5_mask(self, p: GeomPanel) -> np.ndarray:
        import h5py

        assert p.mask is not None
        fname, dset, mgood, mbad = p.mask
        try:
            with h5py.File(fname, "r") as fh:
                m = np.asarray(fh[dset][p.min_ss:p.max_ss + 1, p.min_fs:p.max_fs + 1])
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise GeometryError(f"geometry file {self.path!r}: {p.name}/mask {dset!r} in "
                                f"mask_file {fname!r} cannot be read ({exc})") from None
        if m.shape != (p.nss, p.nfs):
            raise GeometryError(f"geometry file {self.path!r}: {p.name}/mask {dset!r} in "
                                f"{fname!r} is {m.shape}, smaller than the panel")
        m = m.astype(np.int64)
        return ((m & mgood) == mgood) & ((m & mbad) == 0)


def _t3(v: np.ndarray) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))


# -- reading ---------------------------------------------------------------------------
def _number(path: str, key: str, value: str | None, kind: type = float) -> Any:
    if value is None:
        raise GeometryError(f"geometry file {path!r} lacks {key}")
    try:
        v = float(value)
    except ValueError:
        raise GeometryError(f"geometry file {path!r}: {key} must be a number (got "
                            f"{value!r})") from None
    if not math.isfinite(v):
        raise GeometryError(f"geometry file {path!r}: {key} must be finite (got {value!r})")
    if kind is int:
        if v != int(v):
            raise GeometryError(f"geometry file {path!r}: {key} must be a whole number (got "
                                f"{value!r})")
        return int(v)
    return v


def _vector(path: str, key: str, value: str | None) -> tuple[float, float, float]:
    if value is None:
        raise GeometryError(f"geometry file {path!r} lacks {key}")
    text = value.replace(" ", "").replace("\t", "")
    out: dict[str, float] = {}
    pos = 0
    for m in _VEC_RE.finditer(text):
        coef, axis = m.group(1), m.group(2)
        if m.start() != pos or axis in out:
            break
        out[axis] = float(coef + "1" if coef in ("", "+", "-") else coef)
        pos = m.end()
    if pos != len(text) or not out:
        raise GeometryError(f"geometry file {path!r}: {key} must be a vector like "
                            f"'+1.0x -0.0y' (got {value!r})")
    v = (out.get("x", 0.0), out.get("y", 0.0), out.get("z", 0.0))
    if math.hypot(*v) == 0:
        raise GeometryError(f"geometry file {path!r}: {key} is the zero vector")
    return v


def read_geom(path: str | os.PathLike[str]) -> CrystfelGeometry:
    """Read a CrystFEL ``.geom`` file.

    Raises
    ------
    ParameterError
        The file does not exist.
    GeometryError
        A key missing or not a number, a bad vector, an empty panel, no
        panel at all: the message names the file and the key.
    """
    p = os.fspath(path)
    try:
        with open(p) as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        raise ParameterError(f"geometry file {p!r} does not exist") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise GeometryError(f"geometry file {p!r} is not a text file") from None
    glob: dict[str, str] = {}
    panels: dict[str, dict[str, str]] = {}
    regions: dict[str, dict[str, str]] = {}
    for n, raw in enumerate(lines, 1):
        line = raw.split(";", 1)[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise GeometryError(f"geometry file {p!r} line {n}: {raw.strip()!r} is not "
                                "'key = value'")
        key, value = (s.strip() for s in line.split("=", 1))
        if "/" in key:
            name, sub = (s.strip() for s in key.split("/", 1))
            if name.startswith("rigid_group"):
                continue
            table = regions if name.startswith("badregion") else panels
            table.setdefault(name, {})[sub] = value
        elif not key.startswith("rigid_group"):
            glob[key] = value
    if not panels:
        raise GeometryError(f"geometry file {p!r} defines no panel (lines 'name/min_fs = ...')")
    here = os.path.dirname(os.path.abspath(p))
    out = [_read_panel(p, name, {**glob, **keys}, here) for name, keys in panels.items()]
    bad = [_read_region(p, name, keys) for name, keys in regions.items()]
    energy = glob.get("photon_energy")
    pe: float | None = None
    if energy is not None:
        try:
            pe = float(energy)
        except ValueError:
            pe = None  # a path into the data file: the run's photon energy is used
        if pe is not None and not (math.isfinite(pe) and pe > 0):
            raise GeometryError(f"geometry file {p!r}: photon_energy must be positive eV "
                                f"(got {energy!r})")
    return CrystfelGeometry(p, tuple(out), tuple(bad), pe)


def _read_panel(path: str, name: str, keys: Mapping[str, str], here: str) -> GeomPanel:
    missing = [f"{name}/{k}" for k in _PANEL_KEYS if k not in keys]
    for k in ("res", "clen"):
        if k not in keys:
            missing.append(f"{k} (or {name}/{k})")
    if missing:
        raise GeometryError(f"geometry file {path!r} lacks {', '.join(missing)}")
    ints = {k: _number(path, f"{name}/{k}", keys[k], int) for k in _INT_KEYS}
    for a in ("fs", "ss"):
        lo, hi = ints[f"min_{a}"], ints[f"max_{a}"]
        if lo < 0 or hi < lo:
            raise GeometryError(f"geometry file {path!r}: panel {name!r} has min_{a} {lo}, "
                                f"max_{a} {hi} (need 0 <= min_{a} <= max_{a})")
    res = _number(path, f"{name}/res", keys["res"])
    clen_txt = keys["clen"]
    try:
        float(clen_txt)
    except ValueError:
        raise GeometryError(f"geometry file {path!r}: {name}/clen must be a number of metres "
                            f"(got {clen_txt!r}: a path into the data file is not read)") from None
    clen = _number(path, f"{name}/clen", clen_txt)
    if res <= 0 or clen + _number(path, f"{name}/coffset", keys.get("coffset", "0")) <= 0:
        raise GeometryError(f"geometry file {path!r}: {name}/res and clen + coffset must be "
                            f"positive (res {res}, clen {clen})")
    coffset = _number(path, f"{name}/coffset", keys.get("coffset", "0"))
    sensor = None
    data = keys.get("data")
    if data:
        m = _SENSOR_RE.search(data)
        sensor = int(m.group(1)) if m else None
    no_index = _number(path, f"{name}/no_index", keys.get("no_index", "0"), int) != 0
    mask = None
    if "mask" in keys:
        if "mask_file" not in keys:
            raise GeometryError(f"geometry file {path!r}: {name}/mask {keys['mask']!r} is in "
                                "the data files (no mask_file): not supported; give mask_file")
        mf = keys["mask_file"]
        mf = mf if os.path.isabs(mf) else os.path.join(here, mf)
        mask = (mf, keys["mask"], _bits(path, f"{name}/mask_good", keys.get("mask_good", "0")),
                _bits(path, f"{name}/mask_bad", keys.get("mask_bad", "0")))
    return GeomPanel(name, ints["min_fs"], ints["max_fs"], ints["min_ss"], ints["max_ss"],
                     _vector(path, f"{name}/fs", keys["fs"]),
                     _vector(path, f"{name}/ss", keys["ss"]),
                     _number(path, f"{name}/corner_x", keys["corner_x"]),
                     _number(path, f"{name}/corner_y", keys["corner_y"]),
                     res, clen, coffset, sensor, no_index, mask)


def _bits(path: str, key: str, value: str) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise GeometryError(f"geometry file {path!r}: {key} must be an integer such as 0x01 "
                            f"(got {value!r})") from None


def _read_region(path: str, name: str, keys: Mapping[str, str]) -> _BadRegion:
    xy_keys = ("min_x", "max_x", "min_y", "max_y")
    fs_keys = ("min_fs", "max_fs", "min_ss", "max_ss")
    if all(k in keys for k in xy_keys):
        v = tuple(_number(path, f"{name}/{k}", keys[k]) for k in xy_keys)
        return _BadRegion(name, keys.get("panel"), v, None)
    if all(k in keys for k in fs_keys):
        iv = tuple(_number(path, f"{name}/{k}", keys[k], int) for k in fs_keys)
        return _BadRegion(name, keys.get("panel"), None, iv)
    raise GeometryError(f"geometry file {path!r}: bad region {name!r} needs min_x, max_x, "
                        "min_y, max_y or min_fs, max_fs, min_ss, max_ss")


# -- writing ---------------------------------------------------------------------------------
def write_geom(path: str | os.PathLike[str], panels: list[dict[str, Any]], *, res: float,
               clen: float, header: str = "", extra: str = "") -> None:
    """Write a ``.geom`` file: ``panels`` of name, min/max fs/ss, fs, ss (x, y), corner, data."""
    lines = [f"; {h}" for h in header.splitlines()] + [
        f"res = {res!r}", f"clen = {clen!r}", "coffset = 0.0", "adu_per_eV = 1.0", ""]
    for q in panels:
        n = q["name"]
        fx, fy = q["fs"]
        sx, sy = q["ss"]
        lines += [f"{n}/min_fs = {q['min_fs']}", f"{n}/max_fs = {q['max_fs']}",
                  f"{n}/min_ss = {q['min_ss']}", f"{n}/max_ss = {q['max_ss']}",
                  f"{n}/fs = {fx:+.1f}x {fy:+.1f}y", f"{n}/ss = {sx:+.1f}x {sy:+.1f}y",
                  f"{n}/corner_x = {q['corner_x']!r}", f"{n}/corner_y = {q['corner_y']!r}"]
        if q.get("data"):
            lines.append(f"{n}/data = {q['data']}")
        lines.append("")
    with open(os.fspath(path), "w") as fh:
        fh.write("\n".join(lines) + extra)


# -- the geometry of a run ------------------------------------------------------------------
def geometry_spec(geom: str | os.PathLike[str], yaml_values: Mapping[str, Any],
                  yaml_path: str | os.PathLike[str] | None, *,
                  center: tuple[float, float] | None = None, pixel_size: float | None = None,
                  distance: float | None = None, wavelength: float | None = None,
                  poni: str | os.PathLike[str] | None = None) -> Any:
    """The :class:`~sacla_dask.geometry.GeometrySpec` of a ``.geom`` file.

    The panels place every pixel: a centre, pixel size, distance, rotation
    or PONI given besides is refused (naming where it came from). The grid's
    radius unit is ``1 / res`` and its distance ``clen + coffset`` (the
    median over panels); the centre recorded is (0, 0), the beam's place in
    CrystFEL's lab frame. Wavelength: the one given (argument, then YAML),
    else the file's ``photon_energy``, else (None) the run's.
    """
    from .geometry import GeometrySpec

    cg = read_geom(geom)
    where = f"geometry file {os.fspath(yaml_path)!r}" if yaml_path else "the command line"
    given = [n for n, v in (("--center", center), ("--pixel-size", pixel_size),
                            ("--distance", distance), ("--poni", poni)) if v is not None]
    given += [k for k in ("center_x", "center_y", "pixel_size", "distance", "poni", "rot1",
                          "rot2", "rot3") if yaml_values.get(k) is not None]
    if given:
        raise ParameterError(f"{', '.join(given)} cannot be used with the CrystFEL geometry "
                             f"{cg.path!r} (from {where}): its panels place every pixel")
    wl = wavelength if wavelength is not None else yaml_values.get("wavelength")
    if wl is None:
        wl = cg.wavelength
    return GeometrySpec((0.0, 0.0), cg.pixel_size, cg.distance, wl, panels=cg)


def panel_layout(geometry: Any, run: Any, mask: np.ndarray | None
                 ) -> tuple[DetectorLayout | None, np.ndarray | None]:
    """The panel layout of ``geometry`` (a ``GeometrySpec`` with a ``.geom``) on ``run``'s
    stacked image, and ``mask`` with the file's bad pixels; ``(None, mask)`` without one.

    Raises
    ------
    GeometryError
        An unassembled run without a ``.geom``, or a ``.geom`` that does not fit the run.
    """
    cg = getattr(geometry, "panels", None)
    sensors = run.sources[0].sensors if len(run) else ()
    if cg is None:
        if sensors:
            raise GeometryError(
                f"{run.paths[0]!r} is unassembled ({len(sensors)} sensors {sensors[0]}.."
                f"{sensors[-1]}, stacked {run.image_shape[0]}x{run.image_shape[1]}): give "
                "its CrystFEL geometry (--geom FILE.geom, or geom: in the geometry YAML)")
        return None, mask
    layout = cg.layout(run.image_shape, len(sensors) or None)
    bad = cg.mask(layout)
    if bad is not None:
        mask = bad if mask is None else (np.asarray(mask, bool) & bad)
    return dataclasses.replace(layout, source=cg.path), mask


def panel_layout_of_file(geom: str | os.PathLike[str] | None, run: Any
                         ) -> tuple[DetectorLayout, CrystfelGeometry, np.ndarray | None] | None:
    """The layout of a ``.geom`` on ``run``, the geometry and its bad-pixel mask (None
    without a ``.geom``; an unassembled run without one is refused)."""
    if geom is None:
        panel_layout(None, run, None)  # (refuses an unassembled run)
        return None
    cg = read_geom(geom)
    sensors = run.sources[0].sensors if len(run) else ()
    layout = dataclasses.replace(cg.layout(run.image_shape, len(sensors) or None), source=cg.path)
    return layout, cg, cg.mask(layout)
