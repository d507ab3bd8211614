"""Following a run while it is taken: each block folded into the pair sums as it arrives.

:class:`Follower` takes the blocks a :class:`~sacla_dask.live.source.Source`
returns and, block by block, with the kernels of ``process``:

1. selects its shots (dark shots, ``tag_range``, ``min_pulse_energy``,
   ``skip_first``, ``drop_unselected``: :class:`~sacla_dask.plan.ShotSpec`,
   as :meth:`sacla_dask.io.run.Run.select_shots` does);
2. makes its polar images (:meth:`Block.polar
   <sacla_dask.live.source.Block.polar>`: the pipeline's
   :func:`~sacla_dask.blocks.polar_chunk_from_run` for a file), split over
   the engine's threads, and masks Bragg spots
   (:func:`~sacla_dask.blocks.bragg_block`);
3. pairs its selected shots with each other and with the shot waiting from
   the blocks before (consecutive pairs, overlapping or not: exactly the
   pairs :func:`sacla_dask.pairs.consecutive_pairs` makes over the whole
   run), in :func:`~sacla_dask.correlation.pair_order`;
4. sums their correlations (:func:`~sacla_dask.correlation.pair_sums`'s
   kernel, split over the threads) into the running
   :class:`~sacla_dask.correlation.PairSums`, adding the product of the
   first new pair with the last old one when they share a shot (the lag-1
   covariance of ``corr_sem``), with the bootstrap weights of the pairs'
   blocks (:func:`~sacla_dask.correlation.bootstrap_blocks`);
5. appends its per-tag and per-pair arrays to the store, saves the running
   state atomically (the commit), and writes the current ``corr``,
   ``corr_sem``, ``corr_count``, ``corr_fourier``... from
   :func:`~sacla_dask.correlation.finalize` of the sums.

The final store equals ``process`` over the same files (tags, pairs and
per-tag arrays identical; the sums folded in another order, so the
correlations agree to rounding, ~1e-15 relative). Not supported live (refused with a
message): pairs read from a file, similarity pairings (they need every shot
first) and outlier rejection (it needs every pair's statistic first).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import xarray as xr
import zarr

from .. import config
from .. import store as _store
from .._version import __version__
from ..blocks import bragg_block, image_ok_from_means, nan_count_block
from ..chunking import tags_per_chunk
from ..correlation import (
    CorrelationPlan,
    PairSums,
    bootstrap_blocks,
    bootstrap_weights,
    finalize,
    fourier_coefficients,
    make_plan,
    pair_links,
    parse_q_pairs,
)
from ..correlation.statistics import Edge, _sum_pairs
from ..dataset import COORDS, CORRELATION, VARIABLES, WHAT
from ..engine import usable_cores
from ..errors import OutputError, PairingError, ParameterError, SaclaDaskError
from ..geometry import GeometrySpec, energy_to_wavelength
from ..graph import worker_operator
from ..plan import OutputSpec, PairingSpec, PolarSpec, ShotSpec, StatisticsSpec, load_mask
from ..polar import PolarTransform
from . import growing
from .lock import store_lock
from .source import Block, Source

log = logging.getLogger(__name__)

#: seconds without new data after which ``follow`` finalises the store (the default of
#: ``--idle-timeout``): SACLA's DataConvert writes a run's blocks a few tens of seconds
#: apart and the last block within a minute or two of the run's end; 5 minutes outlasts
#: a slow conversion without leaving a finished run open for long
IDLE_TIMEOUT = 300.0
#: seconds between polls of the source
POLL_INTERVAL = 0.2


@dataclasses.dataclass(frozen=True)
class LiveOptions:
    """What ``follow`` computes: the options of ``process`` (:mod:`sacla_dask.plan` specs).

    ``threads``: the engine's threads (default: the usable cores).
    """

    geometry: GeometrySpec
    polar: PolarSpec
    pairing: PairingSpec = PairingSpec()
    statistics: StatisticsSpec = StatisticsSpec()
    output: OutputSpec = OutputSpec()
    shots: ShotSpec = ShotSpec()
    threads: int | None = None

    def check(self) -> None:
        """Refuse what cannot be computed live (:class:`ParameterError`)."""
        if self.pairing.pairs is not None:
            raise ParameterError("follow pairs consecutive shots only: a pairs file (--pairs) "
                                 "needs the whole run; use 'process' afterwards")
        if self.pairing.pairing != "consecutive":
            raise ParameterError(f"follow pairs consecutive shots only: --pairing "
                                 f"{self.pairing.pairing} matches shots over the whole run; "
                                 "use 'process' afterwards")
        if self.statistics.reject_outliers:
            raise ParameterError("follow cannot reject outlier pairs (--reject-outliers "
                                 "needs every pair's statistic first); use 'process' "
                                 "afterwards")
        if self.output.out is None:
            raise ParameterError("follow needs an output store (out=...)")

    def fingerprint(self) -> tuple[str, str]:
        """(parameters as JSON, their SHA-256): a store is resumed only with the same."""
        def plain(x: Any) -> Any:
            if dataclasses.is_dataclass(x) and not isinstance(x, type):
                return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
            if isinstance(x, (list, tuple)):
                return [plain(v) for v in x]
            if isinstance(x, np.ndarray):
                return x.tolist()
            if isinstance(x, (os.PathLike,)):
                return os.fspath(x)
            return x

        polar = dataclasses.replace(self.polar, mask=self.polar.mask_path
                                    if self.polar.mask_path else self.polar.mask)
        d = {"geometry": plain(self.geometry), "polar": plain(polar),
             "pairing": plain(self.pairing), "statistics": plain(self.statistics),
             "store_polar": self.output.store_polar, "compression": self.output.compression,
             "chunks": self.output.chunks, "shots": plain(self.shots)}
        text = json.dumps(d, sort_keys=True, default=str)
        return text, hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass
class LiveStatus:
    """What the live page shows, replaced after each block (read under ``lock``)."""

    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    version: int = 0
    started: float = dataclasses.field(default_factory=time.time)
    state: str = "waiting for data"
    n_tags: int = 0
    n_bright: int = 0
    n_dark: int = 0
    n_selected: int = 0
    n_pairs: int = 0
    n_rejected: int = 0
    last_tag: int | None = None
    shots_per_s: float = 0.0
    lag_s: float = 0.0
    backlog: int = 0
    q: np.ndarray | None = None
    dphi: np.ndarray | None = None
    corr: np.ndarray | None = None
    sem: np.ndarray | None = None
    fourier: np.ndarray | None = None
    #: (pairs, c_n at every q for the orders shown) after each block
    history: list[tuple[int, np.ndarray]] = dataclasses.field(default_factory=list)

    def update(self, **kw: Any) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, v)
            self.version += 1


#: Fourier orders whose convergence the page follows
HISTORY_ORDERS = tuple(range(0, 13))


class Follower:
    """Fold the blocks of a run into a growing store as they arrive (see the module doc).

    Parameters
    ----------
    options : LiveOptions
    overwrite : bool
        Replace what is at the output path.
    status : LiveStatus, optional
        Updated after each block (the live page reads it).
    say : callable, optional
        Where progress lines go (default: the log).
    """

    def __init__(self, options: LiveOptions, overwrite: bool = False,
                 status: LiveStatus | None = None,
                 say: Callable[[str], None] | None = None) -> None:
        options.check()
        self.options = options
        self.out = os.fspath(options.output.out)  # type: ignore[arg-type]
        self.overwrite = overwrite
        self.status = status or LiveStatus()
        self.say = say or log.info
        self.threads = max(1, int(options.threads or usable_cores()))
        self._pool = concurrent.futures.ThreadPoolExecutor(self.threads,
                                                           thread_name_prefix="follow")
        self.params, self.sha = options.fingerprint()
        self.store: growing.GrowingStore | None = None
        self.transform: PolarTransform | None = None
        self.cplan: CorrelationPlan | None = None
        self.op: Any = None
        self.sums: PairSums | None = None
        self.edge: Edge | None = None
        self.meta: dict[str, Any] = {}
        self.carry_img: np.ndarray | None = None
        self.pair_tags = np.zeros((0, 2), np.int64)
        self._rate: list[tuple[float, int]] = []
        self.complete = False

    # -- setting up ------------------------------------------------------------------
    def resume(self) -> str:
        """Look at the output path: ``"absent"`` (a new store at the first block),
        ``"resumed"`` (state loaded) or ``"complete"``. Refuses a foreign store or one of
        other parameters."""
        out = self.out
        state = _store.store_state(out)
        if self.overwrite and state != "absent":
            _store.prepare_output(out, overwrite=True)
            return "absent"
        if state == "absent":
            _store.prepare_output(out)  # (the folder's checks)
            return "absent"
        if state == "foreign":
            _store.prepare_output(out)  # raises
        attrs = dict(zarr.open_group(out, mode="r").attrs)
        if not growing.is_live(attrs):
            raise OutputError(f"output store {out!r} holds a result written by 'process', "
                              "not a followed one; choose another --out or pass --overwrite")
        if attrs.get("live_parameters_sha256") != self.sha:
            raise OutputError(f"output store {out!r} was followed with different parameters "
                              f"(store {attrs.get('live_parameters')}, now {self.params}): it "
                              "cannot be resumed; choose another --out or pass --overwrite")
        if state == "complete":
            self.complete = True
            return "complete"
        loaded = growing.load_state(out)
        if loaded is None:  # killed before the first block was committed: start again
            _store.remove(out)
            return "absent"
        self.meta, self.sums, self.edge, arrays = loaded
        self._setup(tuple(self.meta["image_shape"]), float(self.meta["wavelength"]))
        self.store = growing.GrowingStore(out)
        nt, npair = int(self.meta["n_tags"]), int(self.meta["n_pairs"])
        self.store.set_attrs(**{growing.TAGS_ATTR: nt, growing.PAIRS_ATTR: npair})
        self.store.truncate("tag", nt)
        self.store.truncate("pair", npair)
        self.carry_img = arrays.get("carry_img")
        if npair:
            a = np.asarray(zarr.open_array(store=out, path="pair_tag_a", mode="r")[:npair])
            b = np.asarray(zarr.open_array(store=out, path="pair_tag_b", mode="r")[:npair])
            self.pair_tags = np.stack([a, b], axis=1).astype(np.int64)
        self._publish(time.time())
        return "resumed"

    def _setup(self, image_shape: tuple[int, ...], wavelength: float) -> None:
        o = self.options
        p = o.polar
        geom = o.geometry.geometry(lambda: wavelength)
        shape = (int(image_shape[0]), int(image_shape[1]))
        self.transform = tr = PolarTransform(
            geom, shape, p.qmin, p.qmax, nphi=p.nphi, nq=p.nq,
            mask=load_mask(p.mask, shape), method=p.method,  # type: ignore[arg-type]
            fast_nphi=p.fast_nphi, solid_angle=p.solid_angle, polarization=p.polarization)
        qp = parse_q_pairs(o.pairing.q_pairs, tr.q)
        self.q_pairs = qp
        self.cplan = make_plan(tr.polar_mask, qp)
        nq = tr.shape[0]
        self.rows = {"": (0, nq)}
        if self.cplan.n_cross:
            self.rows["_cross"] = (nq, self.cplan.nqp)
        self.op = worker_operator(tr.operator)
        if self.sums is None:
            self.sums = PairSums.for_plan(self.cplan, o.statistics.bootstrap,
                                          linked=o.pairing.overlapping)

    def _wavelength(self, block: Block, selected: np.ndarray) -> float:
        if self.options.geometry.wavelength is not None:
            return float(self.options.geometry.wavelength)
        ev = block.events
        if "photon_energy" not in ev:
            raise ParameterError(f"no photon energy in the event data of {block.name}; give "
                                 "the wavelength (--wavelength, Angstrom)")
        use = selected if selected.any() else np.ones(len(block), dtype=bool)
        e = np.asarray(ev["photon_energy"].values, dtype=np.float64)[use]
        e = e[np.isfinite(e)]
        if e.size == 0 or not np.all(e > 0):
            raise ParameterError(f"the photon energy in {block.name} is missing or not "
                                 "positive; give the wavelength (--wavelength, Angstrom)")
        return float(energy_to_wavelength(float(np.mean(e))))

    # -- shot selection ----------------------------------------------------------------
    def _select(self, block: Block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keep, bright, selected) per tag of ``block`` (``ShotSpec`` as ``select_shots``)."""
        s = self.options.shots
        tags = block.tags
        ev = block.events
        keep = np.ones(tags.size, dtype=bool)
        bright = np.asarray(ev["bright"].values, dtype=bool).copy()
        if s.tag_range is not None:
            first, last = (int(t) for t in s.tag_range)
            keep &= (tags >= first) & (tags <= last)
        if s.skip_first:
            first_n = self.meta.setdefault("first_exposures", {})
            runs = np.asarray(ev["run"].values, dtype=np.int64)
            for rn, known in block.known_tags().items():
                prev = np.asarray(first_n.get(str(rn), []), dtype=np.int64)
                both = np.union1d(prev, np.asarray(known, np.int64))[:int(s.skip_first)]
                first_n[str(rn)] = both.tolist()
            for rn in np.unique(runs):
                on = runs == rn
                bright[on] &= ~np.isin(tags[on], first_n.get(str(int(rn)), []))
        selected = bright.copy()
        if s.min_pulse_energy is not None:
            if "pulse_energy" not in ev:
                raise ParameterError(f"a pulse-energy threshold needs the pulse energy in "
                                     f"event_info, but {block.name} has none")
            e = np.asarray(ev["pulse_energy"].values, dtype=np.float64)
            with np.errstate(invalid="ignore"):
                selected &= np.isfinite(e) & (e >= float(s.min_pulse_energy))
        if s.drop_unselected:
            keep &= selected
        return keep, bright, selected

    # -- the store -----------------------------------------------------------------------
    def _create(self, block: Block, wavelength: float) -> None:
        self._setup(block.image_shape, wavelength)
        tr, cplan, o = self.transform, self.cplan, self.options
        assert tr is not None and cplan is not None
        nq, nphi = tr.shape
        nf = nphi // 2 + 1
        ev0 = block.events
        self.event_vars = {str(k): (v.dtype, dict(v.attrs)) for k, v in ev0.data_vars.items()
                           if k not in ("bright", "selected", "run", "source")}
        data: dict[str, Any] = {}
        coords: dict[str, Any] = {
            "tag": ("tag", np.zeros(0, np.int64), COORDS["tag"].attrs()),
            "q": ("q", tr.q, COORDS["q"].attrs()),
            "radius": ("q", tr.radius, COORDS["radius"].attrs()),
            "phi": ("phi", tr.phi, COORDS["phi"].attrs()),
            "dphi": ("dphi", tr.phi.copy(), COORDS["dphi"].attrs()),
            "n": ("n", np.arange(nf), COORDS["n"].attrs()),
            "pair": ("pair", np.zeros(0, np.int64), COORDS["pair"].attrs()),
        }

        def var(name: str, dims: tuple[str, ...], values: Any, table: Any = VARIABLES,
                **extra: Any) -> None:
            data[name] = (dims, values, {**table[name].attrs(), **extra})

        var("polar_mask", ("q", "phi"), tr.polar_mask)
        var("coverage", ("q", "phi"), tr.operator.coverage)
        var("row_mean", ("tag", "q"), np.zeros((0, nq)))
        var("image_ok", ("tag",), np.zeros(0, bool))
        var("nonfinite_bins", ("tag",), np.zeros(0, np.int64))
        var("pair_tag_a", ("pair",), np.zeros(0, np.int64))
        var("pair_tag_b", ("pair",), np.zeros(0, np.int64))
        var("pair_stat", ("pair",), np.zeros(0))
        var("pair_rejected", ("pair",), np.zeros(0, bool), reject_nsigma=0.0)
        if o.output.store_polar:
            var("polar", ("tag", "q", "phi"), np.zeros((0, nq, nphi), np.float32))
        if o.statistics.bragg:
            var("bragg_bins", ("tag", "q"), np.zeros((0, nq), np.int32),
                nsigma=float(o.statistics.bragg))
        var("n_pairs", (), np.int64(0))
        rows = self.rows
        if cplan.n_cross:
            cq1, cq2 = cplan.q1[nq:], cplan.q2[nq:]
            for name, cv in (("q1", tr.q[cq1]), ("q2", tr.q[cq2]), ("q1_index", cq1),
                             ("q2_index", cq2)):
                coords[name] = ("qpair", cv, COORDS[name].attrs())
        level = f"{100 * o.statistics.ci_level:g}%"
        corr_names = ["corr", "corr_sem", "corr_count", "corr_fourier"]
        if o.statistics.bootstrap:
            corr_names += ["corr_ci_low", "corr_ci_high", "corr_fourier_ci_low",
                           "corr_fourier_ci_high"]
        for suffix, (lo, hi) in rows.items():
            dim = "q" if suffix == "" else "qpair"
            attrs_of = {n: CORRELATION[n].attrs(what=WHAT[suffix], level=level)
                        for n in CORRELATION}
            for n in corr_names:
                full = n.replace("corr", f"corr{suffix}", 1)
                lag = "n" if "fourier" in n else "dphi"
                shape = (hi - lo, nf if lag == "n" else nphi)
                if n == "corr_count":
                    vals: Any = np.zeros(shape, np.int64)
                elif n == "corr_fourier" and suffix:
                    vals = np.full(shape, np.nan + 0j, np.complex128)
                else:
                    vals = np.full(shape, np.nan)
                data[full] = ((dim, lag), vals, attrs_of[n])
            if o.statistics.keep_pairs:
                data[f"corr{suffix}_pairs"] = (("pair", dim, "dphi"),
                                               np.zeros((0, hi - lo, nphi), np.float32),
                                               attrs_of["corr_pairs"])
        for name, (dt, attrs) in self.event_vars.items():
            data[name] = ("tag", np.zeros(0, dt), attrs)
        data["bright"] = ("tag", np.zeros(0, bool), dict(ev0["bright"].attrs))
        data["selected"] = ("tag", np.zeros(0, bool), {"long_name": "used for pairs"})
        data["run"] = ("tag", np.zeros(0, np.int64), {"long_name": "SACLA run number"})
        data["source"] = ("tag", np.zeros(0, np.int64),
                          {"long_name": "index of the tag's run file in the 'sources' "
                                        "attribute"})
        ds = xr.Dataset(data, coords=coords)
        ds.attrs.update(self._attrs(wavelength))
        enc = self._encoding(ds)
        self.meta = {"n_tags": 0, "n_pairs": 0, "last_tag": None, "carry_tag": None,
                     "sources": [], "image_shape": list(block.image_shape),
                     "wavelength": wavelength, "n_dark": 0, "n_selected": 0,
                     "n_bright": 0, "n_unselected_dropped": 0, "n_low_pulse_energy": 0,
                     "first_exposures": self.meta.get("first_exposures", {}),
                     "event_vars": list(self.event_vars)}
        with _store.writing(self.out):
            ds.to_zarr(self.out, mode="w", zarr_format=3, consolidated=False, encoding=enc)
            zarr.open_group(self.out, mode="r+").require_group(growing.STATE_GROUP)
        self.store = growing.GrowingStore(self.out)
        growing.save_state(self.out, self.meta, self.sums, None, {})  # type: ignore[arg-type]

    def _encoding(self, ds: xr.Dataset) -> dict[str, dict[str, Any]]:
        tr = self.transform
        assert tr is not None
        chunks = self.options.output.chunks
        per3 = int(chunks) if isinstance(chunks, int) else 1
        comp = _store.compressors(self.options.output.compression)
        enc: dict[str, dict[str, Any]] = {}
        for name, v in ds.variables.items():
            if not v.dims or v.dims[0] not in growing.GROWING_DIMS:
                continue
            if v.ndim == 3:
                per = per3 if v.dims[0] == "tag" else max(
                    1, (32 << 20) // max(1, v.shape[1] * v.shape[2] * 4))
                e: dict[str, Any] = {"chunks": (per,) + v.shape[1:]}
                if name == "polar":
                    e["compressors"] = comp
            elif v.ndim == 2:
                e = {"chunks": (256,) + v.shape[1:]}
            else:
                e = {"chunks": (4096,)}
            enc[str(name)] = e
        return enc

    def _attrs(self, wavelength: float) -> dict[str, Any]:
        tr, o = self.transform, self.options
        assert tr is not None
        g = tr.geometry
        st = o.statistics
        qp = self.q_pairs
        if isinstance(qp, str) or qp is None:
            qps = "none" if qp in (None, "auto", "none") else str(qp)
        else:
            qps = ",".join(f"{a}:{b}" for a, b in np.asarray(qp).reshape(-1, 2))
        return {
            "center_x": g.center_x, "center_y": g.center_y, "pixel_size": g.pixel_size,
            "distance": g.distance, "wavelength": g.wavelength,
            "qmin": tr.qmin, "qmax": tr.qmax, "nphi": tr.nphi,
            "nphi_default": tr.grid.nphi_default, "fast_nphi": tr.fast_nphi,
            "method": tr.method, "mask": o.polar.mask_path or "",
            "solid_angle": tr.solid_angle, "polarization": tr.polarization,
            "run": 0, "source": "", "sources": [], "bad_tags": [], "bad_tag_numbers": [],
            "selection": {}, "n_pairs_dropped": 0,
            "tags_per_chunk": int(tags_per_chunk(o.output.chunks, 1 << 20, tr.shape)),
            "sacla_dask_version": __version__, "complete": False,
            "pairing": "consecutive", "n_pairs_requested": 0, "shared_shots": 0,
            "linked_pairs": 0, "unlinked_sharing": 0, "q_pairs": qps,
            "bragg_nsigma": float(st.bragg or 0), "reject_nsigma": 0.0,
            "bootstrap": int(st.bootstrap), "ci_level": float(st.ci_level),
            growing.TAGS_ATTR: 0, growing.PAIRS_ATTR: 0,
            "live_source": "", "live_parameters": self.params,
            "live_parameters_sha256": self.sha,
            "live_wavelength_from": ("given" if o.geometry.wavelength is not None
                                     else "the first block's mean photon energy"),
        }

    # -- one block -------------------------------------------------------------------------
    def fold(self, block: Block) -> int:
        """Select, transform, pair, sum and store one block; commit. Returns tags added."""
        t0 = time.time()
        last = self.meta.get("last_tag")
        if last is not None and len(block):
            new = block.tags > int(last)
            if not new.any():
                return 0
            if not new.all():
                block = block.subset(new)
        keep, bright, selected = self._select(block)
        if self.store is None:
            if not keep.any():
                return 0
            self._create(block, self._wavelength(block, selected & keep))
        if not keep.all():
            self.meta["n_unselected_dropped"] += int((~keep).sum())
            block = block.subset(keep)
            bright, selected = bright[keep], selected[keep]
        if not len(block):
            return 0
        assert self.store is not None and self.transform is not None and self.sums is not None
        if tuple(block.image_shape) != tuple(self.meta["image_shape"]):
            raise SaclaDaskError(f"{block.name}: images are {block.image_shape} but the "
                                 f"run's are {tuple(self.meta['image_shape'])}")
        norm, rmean, nonfinite = self._polar(block)
        src = norm
        st = self.options.statistics
        if st.bragg:
            src = bragg_block(norm, self.transform.polar_mask, float(st.bragg))
        pairs, rows, ia, ib, carry = self._pairs(block, src, selected)
        sums, stat, kept, first, last_edge = self._sum(rows, ia, ib, pairs)
        # -- persist: per-tag, per-pair arrays; then the state (the commit); then corr
        nt, npair = int(self.meta["n_tags"]), int(self.meta["n_pairs"])
        if block.name not in self.meta["sources"]:
            self.meta["sources"].append(block.name)
        src_index = self.meta["sources"].index(block.name)
        tag_vals = self._tag_values(block, norm, rmean, nonfinite, src, bright, selected,
                                    src_index)
        self.store.append("tag", nt, tag_vals)
        pair_vals: dict[str, np.ndarray] = {
            "pair": np.arange(npair, npair + len(pairs), dtype=np.int64),
            "pair_tag_a": pairs[:, 0], "pair_tag_b": pairs[:, 1], "pair_stat": stat,
            "pair_rejected": np.zeros(len(pairs), bool)}
        if kept is not None:
            for suffix, (lo, hi) in self.rows.items():
                pair_vals[f"corr{suffix}_pairs"] = kept[:, lo:hi]
        self.store.append("pair", npair, pair_vals)
        self.sums.absorb([sums])
        if self.edge is not None and first is not None:
            self.sums.add_product(self.edge, first)
        if len(pairs):
            self.edge = last_edge
        self.pair_tags = np.concatenate([self.pair_tags, pairs])
        m = self.meta
        m["n_tags"], m["n_pairs"] = nt + len(block), npair + len(pairs)
        m["last_tag"] = int(block.tags[-1])
        m["carry_tag"] = carry[0]
        self.carry_img = carry[1]
        m.setdefault("runs", [])
        m["runs"] = sorted(set(m["runs"]) | set(int(r) for r in np.unique(tag_vals["run"])))
        m["n_bright"] += int(bright.sum())
        m["n_dark"] += int((~bright).sum())
        m["n_selected"] += int(selected.sum())
        growing.save_state(self.out, m, self.sums, self.edge,
                           {} if self.carry_img is None else {"carry_img": self.carry_img})
        self._write_statistics()
        now = time.time()
        self._rate.append((now, len(block)))
        self._publish(now, lag=now - block.arrived)
        stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f"{now % 1:.3f}"[1:]
        self.say(f"block {os.path.basename(block.name)}: tags {block.tags[0]}..{block.tags[-1]} "
                 f"({len(block)}, {int(selected.sum())} selected), {len(pairs)} pairs -> "
                 f"{m['n_tags']} tags, {m['n_pairs']} pairs in store at {stamp} "
                 f"({now - t0:.2f} s; {now - block.arrived:.3f} s after arrival)")
        return len(block)

    def _polar(self, block: Block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tr = self.transform
        assert tr is not None
        n = len(block)
        parts = min(self.threads, n)
        bounds = np.linspace(0, n, parts + 1).astype(int)
        futs = [self._pool.submit(block.polar, tr.window, self.op, tr.polar_mask,
                                  self.options.shots.on_bad_tag,
                                  slice(int(bounds[i]), int(bounds[i + 1])))
                for i in range(parts)]
        outs = [f.result() for f in futs]
        return tuple(np.concatenate([o[j] for o in outs]) for j in range(3))  # type: ignore

    def _pairs(self, block: Block, src: np.ndarray, selected: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                          tuple[int | None, np.ndarray | None]]:
        """New pairs (tags, in pair order), the rows they index, their positions in them, and
        the shot left waiting (tag, image)."""
        sel = np.flatnonzero(selected)
        chain_tags = block.tags[sel]
        carry_tag = self.meta.get("carry_tag")
        if carry_tag is not None and self.carry_img is not None:
            rows = np.concatenate([self.carry_img[None], src[sel]])
            chain_tags = np.concatenate([[int(carry_tag)], chain_tags])
        else:
            rows = src[sel]
        pos = np.arange(chain_tags.size)
        if self.options.pairing.overlapping:
            ia, ib = pos[:-1], pos[1:]
            carry = (int(chain_tags[-1]), rows[-1].copy()) if chain_tags.size else (None, None)
        else:
            n2 = chain_tags.size // 2 * 2
            ia, ib = pos[0:n2:2], pos[1:n2:2]
            carry = ((int(chain_tags[-1]), rows[-1].copy()) if chain_tags.size % 2
                     else (None, None))
        pairs = np.stack([chain_tags[ia], chain_tags[ib]], axis=1).astype(np.int64)
        return pairs.reshape(-1, 2), rows, ia, ib, carry

    def _sum(self, rows: np.ndarray, ia: np.ndarray, ib: np.ndarray, pairs: np.ndarray
             ) -> tuple[PairSums, np.ndarray, np.ndarray | None, Edge | None, Edge | None]:
        """Sums over the new pairs (split over the threads, merged as the pipeline's fold),
        their statistics and kept correlations, and their first and last edges."""
        cplan = self.cplan
        assert cplan is not None
        st = self.options.statistics
        n_boot = int(st.bootstrap)
        linked = bool(self.options.pairing.overlapping)
        npair = len(pairs)
        if npair == 0:
            return (PairSums.for_plan(cplan, n_boot, linked), np.zeros(0), None if not
                    st.keep_pairs else np.zeros((0, cplan.nqp, cplan.nphi), np.float32),
                    None, None)
        allp = np.concatenate([self.pair_tags, pairs])
        links_all = pair_links(allp[:, 0], allp[:, 1])
        links = links_all[len(self.pair_tags):]
        w = None
        if n_boot:
            blk = bootstrap_blocks(links_all, int(config.get("correlation.bootstrap-block")))
            keys = allp[blk[len(self.pair_tags):]]
            w = bootstrap_weights(keys, n_boot, 0)
        block_bytes = config.get_bytes("correlation.block-bytes")
        parts = min(self.threads, npair)
        bounds = np.linspace(0, npair, parts + 1).astype(int)

        def run(lo: int, hi: int) -> Any:
            return _sum_pairs(rows, rows, cplan, ia=ia[lo:hi], ib=ib[lo:hi],
                              weights=None if w is None else w[:, lo:hi],
                              keep=st.keep_pairs, block_bytes=block_bytes,
                              links=links[lo:hi], linked=linked)

        futs = [self._pool.submit(run, int(bounds[i]), int(bounds[i + 1]))
                for i in range(parts)]
        outs = [f.result() for f in futs]
        sums = outs[0][0].absorb([o[0] for o in outs[1:]])
        for left, right in zip(outs[:-1], outs[1:], strict=True):
            if left[4][1] is not None and right[4][0] is not None:
                sums.add_product(left[4][1], right[4][0])
        stat = np.concatenate([o[1] for o in outs])
        kept = np.concatenate([o[2] for o in outs]) if st.keep_pairs else None
        return sums, stat, kept, outs[0][4][0], outs[-1][4][1]

    def _tag_values(self, block: Block, norm: np.ndarray, rmean: np.ndarray,
                    nonfinite: np.ndarray, src: np.ndarray, bright: np.ndarray,
                    selected: np.ndarray, src_index: int) -> dict[str, np.ndarray]:
        tr = self.transform
        assert tr is not None
        n = len(block)
        ev = block.events
        out: dict[str, np.ndarray] = {
            "tag": block.tags.astype(np.int64), "row_mean": rmean,
            "nonfinite_bins": nonfinite,
            "image_ok": image_ok_from_means(rmean, bool(tr.polar_mask.any())),
            "bright": bright, "selected": selected,
            "run": np.asarray(ev["run"].values, dtype=np.int64),
            "source": np.full(n, src_index, dtype=np.int64)}
        if self.options.output.store_polar:
            out["polar"] = norm
        if self.options.statistics.bragg:
            out["bragg_bins"] = nan_count_block(src)
        for name in self.meta.get("event_vars", []):
            dt = self.store.array(name).dtype  # type: ignore[union-attr]
            if name in ev:
                out[name] = np.asarray(ev[name].values).astype(dt, copy=False)
            else:
                out[name] = np.full(n, np.nan if np.dtype(dt).kind == "f" else 0, dtype=dt)
        return out

    def _write_statistics(self) -> None:
        """The current correlation statistics, from the running sums, into the store."""
        assert self.sums is not None and self.store is not None
        st = self.options.statistics
        res = finalize(self.sums, st.ci_level)
        fourier = fourier_coefficients(res["mean"])
        vals: dict[str, Any] = {}
        for suffix, (lo, hi) in self.rows.items():
            vals[f"corr{suffix}"] = res["mean"][lo:hi]
            vals[f"corr{suffix}_sem"] = res["sem"][lo:hi]
            vals[f"corr{suffix}_count"] = res["count"][lo:hi]
            vals[f"corr{suffix}_fourier"] = (fourier[lo:hi].real if suffix == ""
                                             else fourier[lo:hi])
            if st.bootstrap:
                for k in ("ci_low", "ci_high", "fourier_ci_low", "fourier_ci_high"):
                    vals[f"corr{suffix}_{k}"] = res[k][lo:hi]
        vals["n_pairs"] = np.int64(self.sums.n)
        self.store.write(vals)
        m = self.meta
        pt = self.pair_tags
        linked = int(pair_links(pt[:, 0], pt[:, 1]).sum()) if len(pt) else 0
        shared = int(np.sum(np.unique(pt, return_counts=True)[1] > 1)) if len(pt) else 0
        sources = list(m["sources"])
        runs = m.get("runs", [])
        self.store.set_attrs(**{
            growing.TAGS_ATTR: int(m["n_tags"]), growing.PAIRS_ATTR: int(m["n_pairs"]),
            "sources": sources, "source": sources if len(sources) > 1 else
            (sources[0] if sources else ""), "run": runs[0] if len(runs) == 1 else runs,
            "n_pairs_requested": int(m["n_pairs"]), "linked_pairs": linked,
            "shared_shots": shared, "live_source": m.get("live_source", ""),
            "selection": {"n_tags": int(m["n_tags"]), "n_dark": int(m["n_dark"]),
                          "n_selected": int(m["n_selected"]),
                          "skip_first": int(self.options.shots.skip_first or 0),
                          "tag_range": (list(self.options.shots.tag_range)
                                        if self.options.shots.tag_range else None),
                          "min_pulse_energy": self.options.shots.min_pulse_energy,
                          "n_dropped": int(m["n_unselected_dropped"])}})
        self._last_stats = (res, fourier)

    def _publish(self, now: float, lag: float | None = None) -> None:
        """Update :attr:`status` for the page."""
        m = self.meta
        tr = self.transform
        if tr is None or not m:
            return
        stats = getattr(self, "_last_stats", None)
        if stats is None and self.sums is not None and self.sums.n:
            res = finalize(self.sums, self.options.statistics.ci_level)
            stats = (res, fourier_coefficients(res["mean"]))
        recent = [(t, k) for t, k in self._rate if now - t <= 10.0]
        self._rate = recent
        rate = 0.0
        if len(recent) > 1:
            rate = sum(k for _, k in recent[1:]) / max(1e-6, recent[-1][0] - recent[0][0])
        nq = tr.shape[0]
        kw: dict[str, Any] = dict(
            state="following", n_tags=int(m["n_tags"]), n_bright=int(m["n_bright"]),
            n_dark=int(m["n_dark"]), n_selected=int(m["n_selected"]),
            n_pairs=int(m["n_pairs"]), last_tag=m.get("last_tag"), shots_per_s=rate,
            q=tr.q, dphi=tr.phi)
        if lag is not None:
            kw["lag_s"] = lag
        if stats is not None:
            res, fourier = stats
            kw.update(corr=res["mean"][:nq], sem=res["sem"][:nq], fourier=fourier[:nq].real)
            hist = list(self.status.history)
            hist.append((int(m["n_pairs"]), fourier[:nq, list(HISTORY_ORDERS)].real.copy()))
            kw["history"] = hist[-2000:]
        self.status.update(**kw)

    # -- the end ---------------------------------------------------------------------------
    def finish(self) -> None:
        """Finalise: the last statistics, ``complete``, the running state removed."""
        if self.store is None:
            raise PairingError("no data arrived: nothing to finalise (no store written)")
        m = self.meta
        if int(m["n_pairs"]) == 0 or self.sums is None or self.sums.n == 0:
            raise PairingError(
                f"need at least two bright shots to form a pair; the run so far has "
                f"{m['n_selected']} selected of {m['n_tags']} tags: the store is left "
                "unfinished (run the same command again to go on when more data arrives)")
        self._write_statistics()
        g = zarr.open_group(self.out, mode="r+")
        if growing.STATE_GROUP in g:
            del g[growing.STATE_GROUP]
        st = growing.state_path(self.out)
        if os.path.exists(os.path.dirname(st)):
            import shutil

            shutil.rmtree(os.path.dirname(st), ignore_errors=True)
        _store.finish(self.out)
        self.complete = True
        self.status.update(state="complete")

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def follow(source: Source, options: LiveOptions, *, idle_timeout: float = IDLE_TIMEOUT,
           poll_interval: float = POLL_INTERVAL, overwrite: bool = False,
           status: LiveStatus | None = None, say: Callable[[str], None] | None = None,
           max_blocks: int | None = None) -> xr.Dataset | None:
    """Follow ``source`` into ``options.output.out`` until it is idle for ``idle_timeout`` s.

    Holds the store's write lock throughout (:func:`~sacla_dask.live.lock.store_lock`).
    Each block is folded as soon as it is seen (:meth:`Follower.fold`); when
    no new tag arrived for ``idle_timeout`` seconds the store is finalised
    (``complete``) and opened. A store left by an interrupted or killed
    ``follow`` is resumed. ``max_blocks`` stops (without finalising) after
    that many blocks (tests). Returns the finished store, or None when
    stopped by ``max_blocks``.
    """
    out = os.fspath(options.output.out)  # type: ignore[arg-type]
    say = say or log.info
    with store_lock(out, what="sacla-dask follow"):
        fol = Follower(options, overwrite=overwrite, status=status, say=say)
        try:
            state = fol.resume()
            if state == "complete":
                say(f"{out} is already complete (same parameters): nothing to follow")
                return _store.open_result(out)
            if state == "resumed":
                say(f"resuming {out}: {fol.meta['n_tags']} tags, {fol.meta['n_pairs']} pairs "
                    f"folded (up to tag {fol.meta['last_tag']})")
            fol.meta.setdefault("live_source", source.description)
            last_new = time.time()
            blocks = 0
            while True:
                got = source.poll()
                if got:
                    fol.status.update(backlog=len(got))
                for i, b in enumerate(got):
                    if fol.fold(b):
                        last_new = time.time()
                    blocks += 1
                    fol.status.update(backlog=len(got) - i - 1)
                    if max_blocks is not None and blocks >= max_blocks:
                        return None
                if not got:
                    idle = time.time() - last_new
                    if idle >= idle_timeout:
                        say(f"no new data for {idle:.0f} s: finalising {out}")
                        break
                    if fol.store is None:
                        fol.status.update(state="waiting for data")
                    elif idle > 2.0:
                        fol.status.update(state=f"no new data for {idle:.0f} s (finalised "
                                                f"after {idle_timeout:g} s)")
                    time.sleep(poll_interval)
            fol.finish()
            return _store.open_result(out)
        finally:
            fol.close()
            source.close()


__all__ = ["IDLE_TIMEOUT", "POLL_INTERVAL", "Follower", "LiveOptions", "LiveStatus", "follow"]
