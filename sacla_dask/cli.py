"""The ``sacla-dask`` command line: a thin layer over the Python API.

This module owns argument parsing (click), turning user errors into one
clear line and a non-zero exit (``--debug`` for the traceback), and
choosing where the work runs (``--workers``, ``--scheduler``,
``--scheduler-file``, ``--cluster``). Every computation lives in the
library modules.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from .errors import SaclaDaskError

if TYPE_CHECKING:
    from .plan import OutputSpec, PairingSpec, PolarSpec, ShotSpec, StatisticsSpec

log = logging.getLogger("sacla_dask")

EXIT_USER_ERROR = 2


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print SaclaDaskError as one line and exit 2, unless --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        debug = (ctx.find_root().obj or {}).get("debug", False)
        try:
            return fn(*args, **kwargs)
        except SaclaDaskError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show the full traceback of errors.")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="sacla_dask")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: int) -> None:
    """Angular cross-correlation of SACLA XFEL runs, with Dask.

    \b
    Example (a synthetic run, processed on this machine):
      sacla-dask demo --dir demo
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    ctx.obj["verbose"] = verbose
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG),
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")


# -- synth ---------------------------------------------------------------------
@main.command()
@click.argument("out", type=click.Path(dir_okay=False), required=False)
@click.option("--tags", "n_tags", default=60, show_default=True, help="Tags with images.")
@click.option("--dark", "n_dark", default=5, show_default=True,
              help="Leading shutter-closed (dark) tags.")
@click.option("--shape", nargs=2, type=int, default=(512, 512), show_default=True,
              help="Image shape NY NX in pixels (MPCCD octal: 2400 2400).")
@click.option("--center", nargs=2, type=float, default=None,
              help="Beam centre X Y in pixels (default: near the image centre).")
@click.option("--ring", "rings", multiple=True, type=float,
              help="Powder ring radius in pixels (repeatable; default 0.3 and 0.6 of the "
                   "half-width).")
@click.option("--ring-width", default=2.0, show_default=True, help="Ring width (sigma), px.")
@click.option("--pixel-size", default=50e-6, show_default=True, help="Pixel size, metres.")
@click.option("--distance", default=0.053, show_default=True, help="Detector distance, metres.")
@click.option("--energy", default=8600.0, show_default=True, help="Photon energy, eV.")
@click.option("--order", default=6, show_default=True,
              help="Angular modulation order n of cos(n (phi - phase)) per shot.")
@click.option("--amplitude", default=0.2, show_default=True, help="Modulation amplitude.")
@click.option("--compression", type=click.Choice(["none", "gzip", "bitshuffle-lz4", "zstd"]),
              default="none", show_default=True, help="HDF5 filter of the detector data.")
@click.option("--mask-out", type=click.Path(dir_okay=False), default=None,
              help="Also write a panel-gap mask (.npy, 1 = good) for these images.")
@click.option("--seed", default=0, show_default=True, help="Random seed.")
@click.option("--live", "live_dir", type=click.Path(file_okay=False), default=None,
              help="Write the run into this folder as it would arrive during beamtime: "
                   "block files of --block tags at --rate tags/s (for 'follow'); no OUT.")
@click.option("--rate", default=30.0, show_default=True, help="With --live: tags per second.")
@click.option("--block", default=20, show_default=True, help="With --live: tags per file.")
@_handle_errors
def synth(out: str | None, n_tags: int, n_dark: int, shape: tuple[int, int],
          center: tuple[float, float] | None, rings: tuple[float, ...], ring_width: float,
          pixel_size: float, distance: float, energy: float, order: int, amplitude: float,
          compression: str, mask_out: str | None, seed: int, live_dir: str | None = None,
          rate: float = 30.0, block: int = 20) -> None:
    """Write a synthetic SACLA run (DataConvert layout) with known truth.

    \b
    Example:
      sacla-dask synth run.h5 --tags 200 --shape 1024 1024 --mask-out mask.npy
      sacla-dask synth --live incoming/ --tags 600 --rate 30 --block 20
    """
    from .io.synthetic import panel_mask, write_synthetic_run

    half = min(shape) / 2
    radii = rings or (0.3 * half, 0.6 * half)
    if live_dir is not None or out is None:
        from .live.synth import write_live_run

        if live_dir is None or out is not None:
            raise click.UsageError("give either OUT (one file) or --live DIR (block files)")
        if mask_out:
            np.save(mask_out, panel_mask((shape[0], shape[1])))

        def arrived(path: str, truth: Any, when: float) -> None:
            click.echo(f"{time.strftime('%H:%M:%S')} {path}: {len(truth.tags)} tags "
                       f"{truth.tags[0]}..{truth.tags[-1]}")

        write_live_run(live_dir, n_tags, block=block, rate=rate or None, n_dark=n_dark,
                       shape=(shape[0], shape[1]), center=center, ring_radii=radii,
                       ring_width=ring_width, pixel_size=pixel_size, distance=distance,
                       photon_energy=energy, modulation_order=order,
                       modulation_amplitude=amplitude, compression=compression, seed=seed,
                       on_block=arrived)
        return
    truth = write_synthetic_run(out, n_tags=n_tags, n_dark=n_dark, shape=(shape[0], shape[1]),
                                center=center, ring_radii=radii, ring_width=ring_width,
                                pixel_size=pixel_size, distance=distance,
                                photon_energy=energy, modulation_order=order,
                                modulation_amplitude=amplitude, compression=compression,
                                seed=seed)
    if mask_out:
        np.save(mask_out, panel_mask((shape[0], shape[1])))
    q = truth.ring_q()
    click.echo(f"wrote {out}: run {truth.run}, {n_tags} tags ({n_dark} dark), images {shape}")
    click.echo(f"centre x={truth.center_x:.3f} y={truth.center_y:.3f} px; rings at "
               + ", ".join(f"r={r:.1f} px (q={qq:.4f} 1/A)"
                           for r, qq in zip(truth.ring_radii, q, strict=True))
               + f"; wavelength {truth.wavelength:.5f} A")


# -- process -------------------------------------------------------------------
def _cluster_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--workers", type=int, default=None,
                     help="LocalCluster worker processes (default: number of cores; with "
                          "--engine threads, threads)."),
        click.option("--scheduler", default=None,
                     help="Attach to a running scheduler, e.g. tcp://host:8786."),
        click.option("--scheduler-file", type=click.Path(dir_okay=False), default=None,
                     help="Attach to the scheduler described by this scheduler file."),
        click.option("--cluster", type=click.Choice(["local", "jobqueue"]), default="local",
                     show_default=True,
                     help="'jobqueue': a dask-jobqueue cluster from dask's config "
                          "(see deploy/README.md)."),
        click.option("--jobs", type=int, default=None,
                     help="Batch jobs to start with --cluster jobqueue."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


@contextlib.contextmanager
def _client_from(workers: int | None, scheduler: str | None, scheduler_file: str | None,
                 cluster: str, jobs: int | None) -> Any:
    from .cluster import dask_client

    _quiet_distributed()
    with dask_client(workers=workers, scheduler=scheduler, scheduler_file=scheduler_file,
                     cluster=cluster, jobs=jobs) as client:
        click.echo(f"dask dashboard: {client.dashboard_link}", err=True)
        yield client


def _quiet_distributed() -> None:
    import distributed  # noqa: F401  (configures its loggers on import)

    # distributed logs every worker start/stop at INFO: keep the terminal for
    # what the user asked unless -v was given.
    verbose = (click.get_current_context().find_root().obj or {}).get("verbose", 0)
    for name in ("distributed", "bokeh", "tornado"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:  # the dashboard listens on loopback: bokeh's wildcard-host notice is noise
        logging.getLogger("bokeh.server.util").setLevel(logging.ERROR)


@contextlib.contextmanager
def _engine(engine: Any, scheduler: str | None, scheduler_file: str | None,
            jobs: int | None) -> Any:
    """Run the block on ``engine`` (:mod:`sacla_dask.engine`), saying where it runs."""
    from .engine import engine_context

    if engine.kind != "threads":
        _quiet_distributed()
    with engine_context(engine, jobs=jobs, scheduler=scheduler,
                        scheduler_file=scheduler_file) as client:
        if client is not None:
            click.echo(f"dask dashboard: {client.dashboard_link}", err=True)
        yield client


@contextlib.contextmanager
def _performance_report(path: str | None) -> Any:
    """``distributed.performance_report`` to ``path`` (nothing if None)."""
    if path is None:
        yield
        return
    from distributed import performance_report

    with performance_report(filename=path):
        yield
    click.echo(f"dask performance report: {path}", err=True)


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(), help="Output Zarr store.")
@click.option("--geometry", type=click.Path(dir_okay=False), default=None,
              help="Geometry YAML (center_x, center_y, pixel_size, distance, wavelength, "
                   "mask); the flags below override it.")
@click.option("--poni", type=click.Path(dir_okay=False), default=None,
              help="pyFAI PONI file (distance, PONI, rot1..3, pixel size, wavelength: "
                   "docs/geometry.md); --geometry's keys and the flags override it.")
@click.option("--geom", type=click.Path(dir_okay=False), default=None,
              help="CrystFEL .geom of the detector's panels (an unassembled detector_2d_1..N "
                   "run, or an assembled one): it places every pixel (docs/geometry.md).")
@click.option("--center", nargs=2, type=float, default=None,
              help="Beam centre X Y in pixels (X = fast/column axis, Y = slow/row axis).")
@click.option("--qmin", type=float, required=True, help="Inner edge of the q band, 1/Angstrom.")
@click.option("--qmax", type=float, required=True, help="Outer edge of the q band, 1/Angstrom.")
@click.option("--pixel-size", type=float, default=None, help="Pixel size, metres (MPCCD 5e-5).")
@click.option("--distance", type=float, default=None, help="Detector distance, metres.")
@click.option("--wavelength", type=float, default=None,
              help="Wavelength, Angstrom (default: from the run's photon energy).")
@click.option("--mask", type=click.Path(dir_okay=False), default=None,
              help="Pixel mask .npy, same shape as the images, 1 = good.")
@click.option("--nphi", type=int, default=None,
              help="Phi bins (default: one pixel of arc at the band's outer radius).")
@click.option("--fast-nphi/--exact-nphi", default=True, show_default=True,
              help="Round the default nphi up to an FFT-friendly length (a few per cent "
                   "more bins, several times faster FFTs) or keep exactly one pixel of arc.")
@click.option("--nq", type=int, default=None, help="q bins (default: one per pixel of radius).")
@click.option("--method", type=click.Choice(["nearest", "bilinear", "splitting"]),
              default="nearest", show_default=True,
              help="Polar resampling: nearest pixel, bilinear interpolation, or pixel "
                   "splitting (each bin the area average of the pixels it overlaps).")
@click.option("--solid-angle", is_flag=True,
              help="Divide by the pixels' relative solid angle cos^3(2theta) (as pyFAI).")
@click.option("--polarization", "polarization", type=click.FloatRange(-1, 1), default=None,
              metavar="FACTOR",
              help="Divide by the polarisation factor, FACTOR = (Ih-Iv)/(Ih+Iv) in [-1, 1] "
                   "with horizontal = +x (pyFAI's polarization_factor; ~0.99 at an XFEL).")
@click.option("--pairs", type=click.Path(dir_okay=False), default=None,
              help="JSON list of [tagA, tagB] pairs (default: consecutive bright shots).")
@click.option("--non-overlapping", is_flag=True,
              help="Consecutive pairs (t1,t2),(t3,t4)... instead of (t1,t2),(t2,t3)...")
@click.option("--pairing", type=click.Choice(["consecutive", "intensity", "pulse_energy",
                                              "profile", "angular"]),
              default="consecutive", show_default=True,
              help="Without --pairs: consecutive bright shots, or disjoint pairs of shots "
                   "that look alike (nearest band mean intensity, pulse energy, radial or "
                   "angular profile; all but pulse_energy read the band once more first).")
@click.option("--q-pairs", default="none", show_default=True,
              help="Cross-correlations C(q1, q2, dphi) besides the autocorrelations: 'all' "
                   "(every q1 <= q2), or pairs like '0:3,2:5' (q row indices) or "
                   "'2.65:2.70' (q in 1/Angstrom, nearest row).")
@click.option("--bragg", type=float, default=None, metavar="NSIGMA",
              help="Mask polar bins more than NSIGMA robust sigmas (median/MAD) above their "
                   "row (Bragg spots) before correlating.")
@click.option("--reject-outliers", type=float, default=None, metavar="NSIGMA",
              help="Leave out pairs whose mean squared normalised difference is NSIGMA "
                   "robust sigmas (of its log) above the median (recorded in pair_rejected).")
@click.option("--bootstrap", type=int, default=0, show_default=True, metavar="N",
              help="Poisson-bootstrap resamples for percentile confidence intervals "
                   "(corr_ci_low/high; overlapping pairs drawn in blocks of 10); 0 = none. "
                   "N = 100 costs about 5x the correlation.")
@click.option("--ci-level", type=float, default=0.95, show_default=True,
              help="Confidence level of the bootstrap intervals.")
@click.option("--keep-pairs", is_flag=True,
              help="Keep every pair's correlation in the store (corr_pairs, float32).")
@click.option("--chunk-size", default="auto", show_default=True,
              help="Tags per task, or polar-image bytes per task (e.g. 128MiB), or auto: "
                   "32MiB, but 16 tags of large polar images (a wide band) where a tenth "
                   "of a worker's memory holds them; at least 4 tags and 8 chunks. Also the "
                   "unit of resumption.")
@click.option("--no-store-polar", is_flag=True,
              help="Correlation only: do not keep the per-tag polar images.")
@click.option("--compression", type=click.Choice(["lz4", "zstd", "none"]), default="lz4",
              show_default=True, help="Codec of the polar images in the store.")
@click.option("--on-bad-tag", type=click.Choice(["fail", "skip"]), default="fail",
              show_default=True, help="A damaged/missing tag image: stop, or go on without it "
                                      "(listed in the store's bad_tags attr).")
@click.option("--tag-range", nargs=2, type=int, default=None, metavar="FIRST LAST",
              help="Process only tags FIRST..LAST (SACLA tag numbers, inclusive).")
@click.option("--min-pulse-energy", type=float, default=None,
              help="Pair only shots with at least this pulse energy, joules (event_info "
                   "*pulse_energy*).")
@click.option("--skip-first", type=int, default=None,
              help="Treat the first N exposures of each run as dark (for files without a "
                   "pulse-selector status).")
@click.option("--drop-unselected", is_flag=True,
              help="Leave dark/unselected shots out of the store (default: kept, not paired).")
@click.option("--select", "select", default=None, metavar="EXPR",
              help="Pair only shots whose event data satisfy EXPR, e.g. "
                   "'laser_pulse_selector_status == 1 and 0.5 < delay_mm <= 2' (fields by name "
                   "or HDF5 path: see 'sacla-dask info RUN'; comparisons, and/or/not, ()).")
@click.option("--group-by", default=None, metavar="FIELD",
              help="Correlate each group of shots (each value of the event field FIELD, or "
                   "each of --group-bins) on its own: corr etc. gain a 'group' dimension; two "
                   "groups also give corr_diff and corr_diff_sem.")
@click.option("--group-bins", default=None, metavar="E0,E1,...",
              help="Increasing bin edges of --group-by (a continuous field such as a delay).")
@click.option("--units", type=click.Choice(["detector", "photons"]), default="detector",
              show_default=True,
              help="Units of row_mean: detector units, or photons per pixel from the "
                   "detector's absolute_gain and each shot's photon energy (docs/shots.md).")
@click.option("--overwrite", is_flag=True, help="Replace what is at --out.")
@click.option("--dry-run", is_flag=True, help="Print the plan and stop.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show a progress bar.")
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="Write a Dask performance report (HTML: task stream, worker profiles, "
                   "bandwidth) of the computation to this file (runs on worker processes).")
@click.option("--engine", type=click.Choice(["auto", "threads", "processes"]), default="auto",
              show_default=True,
              help="On this machine: threads in this process (nothing to start; parallel "
                   "where reads and kernels release the GIL), or a LocalCluster of worker "
                   "processes. auto: threads for contiguous uncompressed images, processes "
                   "for compressed ones (decoded under HDF5's lock) or when --workers or "
                   "--report is given.")
@_cluster_options
@_handle_errors
def process(runs: tuple[str, ...], out: str, **opts: Any) -> None:
    """Process run file(s) into a labelled correlation Zarr store.

    The store is written tag chunk by tag chunk: if the run is killed,
    running the same command again resumes it (only the missing chunks are
    computed). A store of other parameters is refused unless --overwrite.

    \b
    Example:
      sacla-dask process run.h5 --out run.zarr --center 1200.5 1199.8 \\
          --qmin 2.64 --qmax 2.71 --pixel-size 5e-5 --distance 0.053 \\
          --mask mask.npy --workers 2
    """
    from .engine import choose_engine
    from .geometry import resolve_geometry
    from .plan import plan_run

    geometry, mask = resolve_geometry(
        opts["geometry"], center=opts["center"], pixel_size=opts["pixel_size"],
        distance=opts["distance"], wavelength=opts["wavelength"], mask=opts["mask"],
        poni=opts["poni"], geom=opts["geom"])
    plan = plan_run(list(runs), geometry=geometry, polar=_polar_spec(opts, mask),
                    pairing=_pairing_spec(opts), statistics=_statistics_spec(opts),
                    output=_output_spec(out, opts), shots=_shot_spec(opts))
    plan = plan.with_engine(choose_engine(
        plan.run, opts["engine"], workers=opts["workers"], scheduler=opts["scheduler"],
        scheduler_file=opts["scheduler_file"], cluster=opts["cluster"],
        report=opts["report"] is not None))
    click.echo(repr(plan))
    if opts["dry_run"]:
        return
    if plan.engine is not None and plan.engine.kind != "threads":
        # refuse a bad --out before a cluster starts (on threads, execute checks it first)
        plan.check_output(overwrite=opts["overwrite"])
    t0 = time.perf_counter()
    try:
        with _engine(plan.engine, opts["scheduler"], opts["scheduler_file"], opts["jobs"]), \
                _performance_report(opts["report"]):
            ds = plan.execute(progress=opts["progress"], overwrite=opts["overwrite"])
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: the finished tag chunks stay in {out}; run the same "
                   "command again to resume", err=True)
        sys.exit(130)
    dt = time.perf_counter() - t0
    npairs = np.asarray(ds["n_pairs"].values)
    ptxt = (f"{int(npairs)} pairs" if npairs.ndim == 0 else
            f"{int(npairs.sum())} pairs ({' + '.join(map(str, npairs.tolist()))} in "
            f"{npairs.size} groups)")
    click.echo(f"wrote {out}: {ds.sizes['tag']} tags, {ptxt}, "
               f"corr {dict(ds['corr'].sizes)} in {dt:.1f} s "
               f"({ds.sizes['tag'] / dt:.1f} tags/s)")


# the option groups of 'process', as the library's specs (sacla_dask.plan)
def _polar_spec(o: dict[str, Any], mask: str | None) -> PolarSpec:
    from .plan import PolarSpec

    return PolarSpec(qmin=o["qmin"], qmax=o["qmax"], nphi=o["nphi"], nq=o["nq"],
                     method=o["method"], fast_nphi=o["fast_nphi"],
                     solid_angle=o["solid_angle"], polarization=o["polarization"], mask=mask,
                     units=o.get("units") or "detector")


def _pairing_spec(o: dict[str, Any]) -> PairingSpec:
    from .plan import PairingSpec

    return PairingSpec(pairs=o["pairs"], pairing=o["pairing"],
                       overlapping=not o["non_overlapping"], q_pairs=o["q_pairs"])


def _statistics_spec(o: dict[str, Any]) -> StatisticsSpec:
    from .plan import StatisticsSpec

    return StatisticsSpec(bragg=o["bragg"], reject_outliers=o["reject_outliers"],
                          bootstrap=o["bootstrap"], ci_level=o["ci_level"],
                          keep_pairs=o["keep_pairs"])


def _output_spec(out: str, o: dict[str, Any]) -> OutputSpec:
    from .plan import OutputSpec

    size: str = o["chunk_size"]
    return OutputSpec(out=out, store_polar=not o["no_store_polar"],
                      compression=o["compression"],
                      chunks=int(size) if size.isdigit() else size)


def _shot_spec(o: dict[str, Any]) -> ShotSpec:
    from .plan import ShotSpec

    return ShotSpec(tag_range=o["tag_range"] or None, min_pulse_energy=o["min_pulse_energy"],
                    skip_first=o["skip_first"], drop_unselected=o["drop_unselected"],
                    on_bad_tag=o["on_bad_tag"], select=o.get("select"),
                    group_by=o.get("group_by"), group_bins=_bins(o.get("group_bins")))


def _bins(text: str | None) -> list[float] | None:
    """``--group-bins`` ("0,0.5,1") as numbers."""
    if not text:
        return None
    from .errors import ParameterError

    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ParameterError(f"group_bins must be comma-separated numbers (got {text!r})") \
            from None


# -- demo ----------------------------------------------------------------------
@main.command()
@click.option("--dir", "workdir", default="sacla-dask-demo", show_default=True,
              type=click.Path(file_okay=False), help="Folder for the run, mask and store.")
@click.option("--tags", "n_tags", default=200, show_default=True, help="Tags to synthesise.")
@click.option("--shape", nargs=2, type=int, default=(1024, 1024), show_default=True,
              help="Image shape NY NX in pixels.")
@click.option("--engine", type=click.Choice(["auto", "threads", "processes"]), default="auto",
              show_default=True, help="Where it runs, as for 'process --engine'.")
@click.option("--workers", type=int, default=None,
              help="Threads or worker processes (default: number of cores).")
@_handle_errors
def demo(workdir: str, n_tags: int, shape: tuple[int, int], workers: int | None,
         engine: str = "auto") -> None:
    """The whole job end to end on a synthetic run.

    Writes a synthetic run with dark shots, a known centre, powder rings
    and a 6-fold angular modulation; processes the band around the outer
    ring with the default engine (as 'process' would); checks the result
    against the known truth.

    \b
    Example:
      sacla-dask demo --dir demo --tags 200
    """
    from .engine import choose_engine
    from .io.synthetic import panel_mask, write_synthetic_run
    from .plan import plan_run

    os.makedirs(workdir, exist_ok=True)
    run_path = os.path.join(workdir, "run_synthetic.h5")
    mask_path = os.path.join(workdir, "mask.npy")
    out = os.path.join(workdir, "result.zarr")
    half = min(shape) / 2
    t0 = time.perf_counter()
    truth = write_synthetic_run(run_path, n_tags=n_tags, n_dark=10, shape=(shape[0], shape[1]),
                                ring_radii=(0.3 * half, 0.6 * half), ring_width=2.5,
                                modulation_order=6, modulation_amplitude=0.2)
    np.save(mask_path, panel_mask((shape[0], shape[1]), center=(truth.center_x, truth.center_y),
                                  beamstop=0.1 * half))
    click.echo(f"1. wrote synthetic run {run_path} ({n_tags} tags, {shape[0]}x{shape[1]}) "
               f"in {time.perf_counter() - t0:.1f} s")
    g = truth.geometry
    r = truth.ring_radii[1]
    qmin, qmax = g.radius_to_q(r - 10), g.radius_to_q(r + 10)
    plan = plan_run(run_path, qmin=qmin, qmax=qmax, center=(truth.center_x, truth.center_y),
                    pixel_size=truth.pixel_size, distance=truth.distance, mask=mask_path,
                    out=out, chunks="64MiB")
    chosen = choose_engine(plan.run, engine, workers=workers)
    plan = plan.with_engine(chosen)
    click.echo("2. plan:\n" + repr(plan))
    t0 = time.perf_counter()
    with _engine(chosen, None, None, None):
        ds = plan.execute(progress=True, overwrite=True)
    dt = time.perf_counter() - t0
    click.echo(f"3. processed on {chosen.kind} in {dt:.1f} s "
               f"({ds.sizes['tag'] / dt:.1f} tags/s) -> {out}")
    bright = ds["bright"].values
    prof = ds["polar"].where(ds["polar_mask"]).isel(tag=bright).mean(("tag", "phi"))
    ring_q = float(ds.q[int(np.argmax(ds["row_mean"].isel(tag=bright).mean("tag").values))])
    corr = ds["corr"].mean("q").values
    n = corr.size
    lo = n // 24
    peak = float(ds.dphi[lo + int(np.argmax(corr[lo: n // 2 - lo]))])
    click.echo(f"4. ring found at q = {ring_q:.4f} 1/A (truth {truth.ring_q()[1]:.4f}); "
               f"correlation peak at dphi = {peak:.3f} rad "
               f"(truth: multiples of 2 pi/{truth.modulation_order} = "
               f"{2 * np.pi / truth.modulation_order:.3f}); normalised polar mean "
               f"{float(prof.mean()):.3f}")
    click.echo(f"open it with: xarray.open_zarr({out!r}) or sacla_dask.open_result({out!r})")


# -- info ----------------------------------------------------------------------
#: HDF5 filter ids -> names (built-in filters and the registered plugins that
#: hdf5plugin provides for SACLA exports).
_HDF5_FILTERS = {1: "gzip", 2: "shuffle", 3: "fletcher32", 4: "szip", 5: "nbit",
                 6: "scaleoffset", 32000: "lzf", 32001: "blosc", 32004: "lz4",
                 32008: "bitshuffle", 32015: "zstd", 32026: "blosc2"}


def _hdf5_storage(path: str, dataset: str) -> tuple[str, dict[str, Any]]:
    """Compression/chunking of one HDF5 dataset, and the detector_info it sits beside."""
    import h5py

    with h5py.File(path, "r") as fh:
        d = fh[dataset]
        plist = d.id.get_create_plist()
        names = []
        for i in range(plist.get_nfilters()):
            code, _flags, vals, _name = plist.get_filter(i)
            name = _HDF5_FILTERS.get(code, f"HDF5 filter {code}")
            if code == 1 and vals:
                name += f" (level {vals[0]})"
            elif code == 32008:  # cd_values: major, minor, itemsize, block, codec
                codec = int(vals[4]) if len(vals) > 4 else 0
                name += {2: "+lz4", 3: "+zstd"}.get(codec, " (no LZ4/zstd stage)")
            elif code == 32015 and vals:
                name += f" (level {vals[0]})"
            names.append(name)
        layout = ("chunks " + "x".join(map(str, d.chunks))) if d.chunks else "contiguous"
        text = f"{' + '.join(names) if names else 'none'} ({layout})"
        det: dict[str, Any] = {}
        grp = fh.get(dataset.rsplit("/", 2)[0] + "/detector_info")
        if grp is not None:
            for key in ("detector_name", "pixel_size_in_micro_meter"):
                if key in grp:
                    v = grp[key][()]
                    det[key] = v.decode(errors="replace") if isinstance(v, bytes) else v
    return text, det


def _span(values: np.ndarray) -> str:
    """'first..last' of sorted integer tags, with the step when it is constant."""
    v = np.asarray(values)
    if v.size == 0:
        return "none"
    if v.size == 1:
        return str(v[0])
    steps = np.unique(np.diff(v))
    step = f", step {steps[0]}" if steps.size == 1 else ""
    return f"{v[0]}..{v[-1]}{step}"


def _run_lines(path: str) -> list[str]:
    import warnings

    from dask.utils import format_bytes

    from .errors import ParameterError
    from .io.run import mean_wavelength, open_run

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = open_run(path, on_bad_tag="skip")
    tags, bright = run.tags, run.bright
    ev = run.events
    lines = [f"run file {path} ({format_bytes(os.path.getsize(path))})",
             f"  run number : {', '.join(map(str, run.runs))}",
             f"  tags       : {len(run)} with images ({_span(tags)})"]
    n_event = run.all_events.sizes["tag"]
    if n_event != len(run):
        lines.append(f"  event_info : {n_event} tags ({_span(run.all_events['tag'].values)}): "
                     f"{n_event - len(run):+d} vs. the images (a subset file?)")
    if "pulse_selector" in ev or "shutter" in ev:
        how = "pulse selector" if "pulse_selector" in ev else "shutter status"
        dark = tags[~bright]
        lines.append(f"  shots      : {int(bright.sum())} bright, {dark.size} dark "
                     f"(from the {how}" + (f"; dark tags {_span(dark)})" if dark.size else ")"))
    else:
        lines.append(f"  shots      : {len(run)} bright, 0 dark (no pulse-selector or shutter "
                     "status in event_info: every tag counts as bright)")
    storage, det = _hdf5_storage(run.sources[0].path, run.sources[0].dataset)
    ny, nx = run.image_shape
    lines.append(f"  images     : {ny} x {nx} px (rows x cols), {run.image_dtype}, "
                 f"{format_bytes(ny * nx * run.image_dtype.itemsize)} each")
    sensors = run.sources[0].sensors
    lines.append("  layout     : " + (
        f"unassembled: {len(sensors)} sensors of {ny // len(sensors)} x {nx} px "
        f"({sensors[0]}..{sensors[-1]}), read as one {ny} x {nx} stacked image; give "
        "their CrystFEL geometry to process (--geom)" if sensors
        else "assembled (detector_2d_assembled_1)"))
    lines.append(f"  compression: {storage}")
    if det:
        px = det.get("pixel_size_in_micro_meter")
        pxs = np.unique(np.atleast_1d(px)) if px is not None else np.array([])
        px_txt = (f", pixel {' x '.join(f'{p:g}' for p in pxs)} um" if pxs.size else "")
        lines.append(f"  detector   : {det.get('detector_name', '?')}{px_txt}")
    from .shots.fields import field_summaries

    fields = field_summaries(run)
    lines.append(f"  event data : {', '.join(f.split(' [', 1)[0] for f in fields)} (name "
                 "[HDF5 path] dtype: range, or values (count); for --select and --group-by)"
                 if fields else "  event data : none")
    lines += ["    " + f for f in fields]
    try:
        lines.append(f"  wavelength : {mean_wavelength(run):.5f} A (mean photon energy of the "
                     "bright shots)")
    except ParameterError:
        lines.append("  wavelength : unknown (no photon energy): give --wavelength to process")
    if run.bad_tags:
        lines.append(f"  bad tags   : {len(run.bad_tags)} left out, e.g. {run.bad_tags[0]}")
    for w in caught:
        if not run.bad_tags or "bad tag" not in str(w.message):
            lines.append(f"  note       : {w.message}")
    return lines


def _dir_size(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total


def _result_lines(path: str) -> list[str]:
    from dask.utils import format_bytes

    from .store import open_result, progress_text, store_state

    state = store_state(path)
    ds = open_result(path, allow_incomplete=True)
    a = ds.attrs
    head = f"result store {path}: {state}"
    if state == "incomplete":
        done = progress_text(path)
        head += (f" ({done + '; ' if done else ''}the run that wrote it did not finish: values "
                 "may be missing; re-run the same command to finish it)")
    lines = [head]
    src = a.get("source") or []
    srcs = [src] if isinstance(src, str) else list(src)
    reach = ("reachable" if srcs and all(os.path.exists(s) for s in srcs)
             else "not reachable from here")
    lines.append(f"  run        : {a.get('run')} from {', '.join(srcs) or '?'} ({reach})")
    tags = ds["tag"].values
    tag_txt = f"{tags.size} ({_span(tags)})"
    if "bright" in ds:
        tag_txt += f", {int(np.asarray(ds['bright'].values, dtype=bool).sum())} bright"
    lines.append(f"  tags       : {tag_txt}")
    q = np.asarray(ds["q"].values, dtype=float)
    r = np.asarray(ds["radius"].values, dtype=float) if "radius" in ds.coords else None
    band = (f"; band {a['qmin']:.5g}..{a['qmax']:.5g} 1/A" if "qmin" in a and "qmax" in a
            else "")
    rtxt = f", r = {r.min():.1f}..{r.max():.1f} px" if r is not None and r.size else ""
    lines.append(f"  q          : {q.min():.5g}..{q.max():.5g} 1/A ({q.size} bins{band}{rtxt})")
    nphi = ds.sizes.get("phi", ds.sizes.get("dphi", 0))
    dflt = (f"; one pixel of arc: {a['nphi_default']}" if "nphi_default" in a else "")
    lines.append(f"  nphi       : {nphi} ({360 / max(nphi, 1):.3f} deg bins{dflt}; "
                 f"{a.get('method', '?')} interpolation)")
    npair = ds.sizes.get("pair", 0)
    ptxt = f"{npair} correlated"
    if a.get("pairing"):
        ptxt += f" ({a['pairing']} pairing)"
    if "pair_rejected" in ds and state == "complete":
        from .plot import pair_rejection

        rejected, threshold = pair_rejection(ds)
        if rejected is not None:
            nsig = ds["pair_rejected"].attrs.get("reject_nsigma")
            why = [f"> {float(nsig):g} sigma" if nsig else "",
                   f"pair_stat > {threshold:.3g}" if threshold is not None else ""]
            why_txt = "; ".join(w for w in why if w)
            ptxt += f", {int(rejected.sum())} rejected as outliers" + (
                f" ({why_txt})" if why_txt else "")
    if "n_pairs_dropped" in a:
        ptxt += f", {a['n_pairs_dropped']} dropped (a tag not in the run)"
    if a.get("linked_pairs"):
        ptxt += (f"; {a['linked_pairs']} share a shot with the pair before "
                 "(counted in corr_sem)")
    if a.get("unlinked_sharing"):
        ptxt += f"; {a['unlinked_sharing']} other sharing pairs not counted (SEM optimistic)"
    lines.append(f"  pairs      : {ptxt}")
    grp = a.get("groups")
    if isinstance(grp, dict) and "group" in ds.dims:
        counts = "; ".join(f"{lab}: {ns} shots, {npr} pairs" for lab, ns, npr in zip(
            grp.get("labels", []), grp.get("n_shots", []), grp.get("n_pairs", []), strict=False))
        across = (f"; {grp['n_pairs_across']} listed pairs across groups dropped"
                  if grp.get("n_pairs_across") else "")
        diff = ("; corr_diff = " + str(ds["corr_diff"].attrs.get("difference", "?"))
                if "corr_diff" in ds else "; no difference variable (more than two groups)")
        lines.append(f"  groups     : {ds.sizes['group']} by {grp.get('field')} "
                     f"({counts}){across}{diff}")
    try:
        lines.append(f"  geometry   : centre ({a['center_x']:.3f}, {a['center_y']:.3f}) px, "
                     f"pixel {a['pixel_size'] * 1e6:g} um, distance {a['distance'] * 1e3:g} mm, "
                     f"wavelength {a['wavelength']:.5f} A")
    except (KeyError, TypeError):
        lines.append("  geometry   : not recorded")
    lines.append(f"  mask       : {a.get('mask') or 'none'}")
    contents = ", ".join(f"{n} ({' x '.join(map(str, ds[n].dims))})"
                         for n in ("polar", "corr", "corr_cross", "corr_pairs",
                                   "corr_cross_pairs", "bragg_bins") if n in ds)
    if "corr_ci_low" in ds:
        contents += f", bootstrap intervals ({a.get('bootstrap', '?')} resamples)"
    if "corr_cross" in ds:
        contents += f"; {ds.sizes.get('qpair', 0)} cross-correlated q pairs"
    if "polar" not in ds:
        contents += " (correlation only: no per-tag polar images)"
    lines.append(f"  arrays     : {contents}")
    lines.append(f"  written by : sacla_dask {a.get('sacla_dask_version', '?')}; "
                 f"{format_bytes(_dir_size(path))} on disk")
    return lines


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@_handle_errors
def info(paths: tuple[str, ...]) -> None:
    """Summarise run files (HDF5) or result stores (Zarr), without processing.

    For a run file: run number, tags with images (count, first..last, step),
    bright and dark shot counts, image shape (pixels) and dtype, the HDF5
    compression of detector_data, detector name and pixel size (um), and
    the per-tag event data (photon energy in eV -> wavelength in A).
    For a result store: complete or not, source run, tags, q range (1/A)
    and radii (px), nphi, pairs, geometry (centre px, pixel um, distance
    mm, wavelength A) and what arrays it holds.

    \b
    Example:
      sacla-dask info run_178884.h5
      sacla-dask info result.zarr
    """
    for i, path in enumerate(paths):
        if i:
            click.echo("")
        lines = _result_lines(path) if os.path.isdir(path) else _run_lines(path)
        click.echo("\n".join(lines))


# -- plot ----------------------------------------------------------------------
@main.command()
@click.argument("store", type=click.Path())
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the PNG files (created when missing).")
@click.option("--cut", default=0.05, show_default=True, type=float,
              help="Fraction of the full circle (2 pi rad) left out at each end of dphi, to "
                   "hide the self-correlation edge: 0.05 drops dphi < 0.1 pi and > 1.9 pi.")
@click.option("--q", "q_profile", type=float, default=None,
              help="q of the correlation line profile, 1/Angstrom (default: the ring, i.e. "
                   "the brightest q row of the mean bright shot).")
@click.option("--tag", type=int, default=None,
              help="SACLA tag of the polar image shown (default: the first bright tag).")
@click.option("--shots", default=10, show_default=True,
              help="Bright raw shots averaged for image.png (read from the run file).")
@click.option("--dpi", default=120, show_default=True, help="PNG resolution, dots per inch.")
@click.option("--lattice", type=click.Choice(["fcc", "bcc", "sc", "hexagonal", "hcp"]),
              default=None, help="Mark the predicted Bragg-pair angles of this lattice on the "
                                 "correlation figures (needs --a).")
@click.option("--a", "lattice_a", type=float, default=None,
              help="Lattice constant a, Angstrom (gold: 4.078).")
@click.option("--c", "lattice_c", type=float, default=None,
              help="Lattice constant c, Angstrom (hexagonal and hcp only).")
@click.option("--reflections", default=None,
              help="Reflections to mark, e.g. '111' or '111,200' (default: the lattice's "
                   "allowed reflections whose q lies in the store's q band).")
@_handle_errors
def plot(store: str, out_dir: str, cut: float, q_profile: float | None, tag: int | None,
         shots: int, dpi: int, lattice: str | None, lattice_a: float | None,
         lattice_c: float | None, reflections: str | None) -> None:
    """Write the standard figures of a result store as PNG files.

    \b
    image.png               mean raw shot, mask, centre and q band (needs the
                            run file named in the store's 'source' attr)
    polar.png               one tag's polar image: phi (rad) x q (1/A)
    correlation.png         C(q, dphi) without the self-correlation edge
    correlation_profile.png C(dphi) at one q, +/- 1 s.e.m. over pairs
    radial_profile.png      mean intensity vs q (1/A) and radius (px)
    pair_statistics.png     per-pair statistic, accepted/rejected pairs
    correlation_psi.png     C(q, psi) and its profile with the B_l sum (after
                            'sacla-dask structure')
    bl.png                  Legendre coefficients B_l at one q (idem)

    With --lattice and --a the predicted Bragg-pair angles (psi and their
    detector dphi, Ewald curvature included) are marked.

    \b
    Example:
      sacla-dask plot run.zarr --out figures --cut 0.05 --q 2.67
      sacla-dask plot run.zarr --out figures --lattice fcc --a 4.078
    """
    import matplotlib

    matplotlib.use("Agg")  # never open a window from the command line
    from .plot import plot_result
    from .store import open_result

    ds = open_result(store)
    angles = None
    if lattice is not None or lattice_a is not None:
        from .structure.cli import store_angles

        angles, note = store_angles(ds, lattice, lattice_a, lattice_c, reflections)
        click.echo(note)
    report = plot_result(ds, out_dir, cut=cut, q=q_profile, tag=tag,
                         shots=shots, dpi=dpi, angles=angles)
    for path in report.written.values():
        click.echo(f"wrote {path}")
    for name, why in report.skipped.items():
        click.echo(f"skipped {name}: {why}")


# -- center --------------------------------------------------------------------
def _center_tilt(result: Any, ring_q: float | None) -> dict[str, float]:
    """Print the tilt the ellipse implies (and, with ``ring_q``, its refinement).

    Returns the tilted geometry to write: ``center_x``, ``center_y`` (the
    PONI, px), ``distance`` (m), ``rot1``, ``rot2``, ``rot3``.
    """
    from .center.tilt import choose_tilt_sign, refine_tilt, ring_two_theta, tilt_from_ellipse
    from .errors import GeometryError, NoRingFoundError, ParameterError

    c, e = result.circle, result.circle.ellipse
    opt = "--ring-q" if ring_q is not None else "--tilt"
    if result.pixel_size is None:
        raise ParameterError(f"{opt} needs the pixel size (--pixel-size: the file has none)")
    if e is None:
        raise NoRingFoundError(f"{opt}: no ellipse could be fitted to the ring's "
                               f"{c.n_used} peak points, so no tilt can be estimated")
    p = result.pixel_size
    tth = None
    if ring_q is not None:
        if result.wavelength is None:
            raise ParameterError("--ring-q needs the wavelength (--wavelength, or photon "
                                 f"energies in the run file: {result.wavelength_error})")
        tth = ring_two_theta(ring_q, result.wavelength)
        if result.distance is not None:
            ny, nx = result.mean.image.shape
            far = max(np.hypot(x - c.center_x, y - c.center_y)
                      for x in (-0.5, nx - 0.5) for y in (-0.5, ny - 0.5))
            r = math.tan(tth) * result.distance / p if tth < math.pi / 2 else math.inf
            if r > 1.5 * far:
                raise GeometryError(
                    f"--ring-q {ring_q:g} 1/A lies at r = {r:.0f} px at distance "
                    f"{result.distance * 1e3:g} mm, beyond the detector (its farthest corner "
                    f"is {far:.0f} px from the centre): not the fitted ring at r = "
                    f"{c.radius:.1f} px")
    elif result.distance is None:
        raise ParameterError("--tilt needs the distance (--distance or --poni)")
    cands = tilt_from_ellipse((e.center_x, e.center_y), e.semi_major, e.semi_minor, e.angle,
                              p, distance=result.distance if tth is None else None,
                              two_theta=tth)
    k, t = choose_tilt_sign(cands, result.mean.image, c.points, p)
    est, mirror = cands[k], cands[1 - k]
    sign_note = (f"its brightness (solid angle) favours the first, t = {t:.1f}" if t >= 3
                 else f"its brightness does not tell either (t = {t:.1f}): the first is a "
                      "guess")
    click.echo(f"tilt        : ellipse implies rot1 = {est.rot1:.5f}, rot2 = {est.rot2:.5f} rad "
               f"(tilt {math.degrees(est.tilt):.3f} deg about an axis at "
               f"{est.axis_angle:.1f} deg), PONI ({est.center_x:.3f}, {est.center_y:.3f}) px "
               f"at {est.distance * 1e3:.4g} mm, beam at ({est.beam_x:.3f}, "
               f"{est.beam_y:.3f}) px")
    click.echo(f"              or its mirror rot1 = {mirror.rot1:.5f}, rot2 = {mirror.rot2:.5f} "
               f"rad, PONI ({mirror.center_x:.3f}, {mirror.center_y:.3f}) px: one ring's "
               f"shape cannot tell them apart; {sign_note}")
    if tth is None:
        return {"center_x": est.center_x, "center_y": est.center_y, "distance": est.distance,
                "rot1": est.rot1, "rot2": est.rot2, "rot3": 0.0}
    fits = [refine_tilt(c.points, s, tth, p) for s in (est, mirror)]
    f = fits[0]
    sg = f.sigma
    click.echo(f"refined     : q = {ring_q:g} 1/A (2theta {math.degrees(tth):.4f} deg): "
               f"distance {f.distance * 1e3:.4f} +/- {sg['distance'] * 1e3:.4f} mm, PONI "
               f"({f.center_x:.3f} +/- {sg['center_x']:.3f}, {f.center_y:.3f} +/- "
               f"{sg['center_y']:.3f}) px, rot1 = {f.rot1:.5f} +/- {sg['rot1']:.5f}, rot2 = "
               f"{f.rot2:.5f} +/- {sg['rot2']:.5f} rad; ring residual rms {f.rms_px:.3f} px "
               f"over {f.n_points} points (mirror: rms {fits[1].rms_px:.3f} px)")
    if result.distance is not None and abs(f.distance / result.distance - 1) > 0.1:
        click.echo(f"note: the refined distance {f.distance * 1e3:.4g} mm is "
                   f"{f.distance / result.distance:.3g} x the given one: is q = {ring_q:g} "
                   "1/A the fitted ring?", err=True)
    return {"center_x": f.center_x, "center_y": f.center_y, "distance": f.distance,
            "rot1": f.rot1, "rot2": f.rot2, "rot3": 0.0}


def _write_tilted(result: Any, tilted: dict[str, float], out: str) -> None:
    """Write the tilted geometry to ``out`` (a PONI file, or the geometry YAML)."""
    from .errors import OutputError, ParameterError
    from .geometry import Geometry, write_geometry_file

    if out.lower().endswith(".poni"):
        from .poni import write_poni

        if result.wavelength is None:
            raise ParameterError("a PONI file needs --wavelength (give it, or --poni)")
        g = Geometry(pixel_size=result.pixel_size, wavelength=result.wavelength, **tilted)
        try:
            write_poni(out, g, result.mean.image.shape,
                       comment="tilted geometry fitted by sacla-dask center")
        except OSError as exc:
            raise OutputError(f"cannot write the PONI file {out!r}: {exc}") from None
    else:
        values = result.geometry_values()
        values.update({k: float(v) for k, v in tilted.items()})
        try:
            write_geometry_file(out, values)
        except OSError as exc:
            raise OutputError(f"cannot write the geometry file {out!r}: {exc}") from None
    click.echo(f"wrote {out} (tilted: PONI ({tilted['center_x']:.3f}, "
               f"{tilted['center_y']:.3f}) px, distance {tilted['distance'] * 1e3:.4g} mm, "
               f"rot1..3 = {tilted['rot1']:g}, {tilted['rot2']:g}, 0 rad)")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--guess", nargs=3, type=float, default=None, metavar="X Y R",
              help="Rough beam centre X Y and ring radius R, pixels (X = fast/column axis, "
                   "Y = slow/row axis). Default: the intensity-weighted centre and the "
                   "strongest ring of the radial profile about it.")
@click.option("--mask", type=click.Path(dir_okay=False), default=None,
              help="Pixel mask .npy, same shape as the images, 1 = good (panel gaps, beam "
                   "stop, hot pixels). Recorded in the geometry file.")
@click.option("--max-shots", default=100, show_default=True, type=click.IntRange(min=1),
              help="Average at most this many bright shots, evenly spread over the run(s).")
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None,
              help="Write the geometry YAML here (read by 'sacla-dask process --geometry'); "
                   "a name ending in .poni writes a pyFAI PONI file instead.")
@click.option("--poni", type=click.Path(dir_okay=False), default=None,
              help="pyFAI PONI file giving the pixel size, distance, wavelength and "
                   "rotations (the flags override them).")
@click.option("--geom", type=click.Path(dir_okay=False), default=None,
              help="CrystFEL .geom of the run's panels: the mean is drawn on a lab grid and "
                   "the beam's offset from where the .geom puts it is fitted; --out x.geom "
                   "writes the .geom with its corners shifted to the fitted beam.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG: the mean image with the fitted ring and centre, and the "
                   "radial profile with the ring marked.")
@click.option("--pixel-size", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Pixel size, metres (default: the file's detector_info, e.g. 5e-5).")
@click.option("--distance", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Sample-detector distance, metres (not in the run file: give it here or "
                   "to process).")
@click.option("--wavelength", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Wavelength, Angstrom (default: from the bright shots' photon energy).")
@click.option("--tolerance", default=1.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Pixels: the two methods 'disagree' above this distance (a warning).")
@click.option("--on-bad-tag", type=click.Choice(["fail", "skip"]), default="fail",
              show_default=True, help="A damaged/missing tag image: stop, or leave it out.")
@click.option("--skip-first", type=int, default=None,
              help="Treat the first N exposures of each run as dark (for files without a "
                   "pulse-selector status).")
@click.option("--select", "select", default=None, metavar="EXPR",
              help="Average only shots whose event data satisfy EXPR (as for 'process').")
@click.option("--tilt", "tilt", is_flag=True, default=False,
              help="Print the detector tilt the ring's ellipse implies (needs --distance) "
                   "and write that tilted geometry (PONI and rot1, rot2) to --out.")
@click.option("--ring-q", "ring_q", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="Q",
              help="q (1/A) of the fitted ring (e.g. a calibrant's line; needs the "
                   "wavelength): refine distance, PONI, rot1, rot2 from the ellipse's "
                   "estimate so that the ring's peaks all have this q; --out gets the result.")
@_cluster_options
@_handle_errors
def center(runs: tuple[str, ...], guess: tuple[float, float, float] | None, mask: str | None,
           max_shots: int, out: str | None, plot_path: str | None, pixel_size: float | None,
           distance: float | None, wavelength: float | None, tolerance: float,
           on_bad_tag: str, skip_first: int | None, workers: int | None,
           scheduler: str | None, scheduler_file: str | None, cluster: str,
           jobs: int | None, poni: str | None = None, geom: str | None = None,
           select: str | None = None, tilt: bool = False,
           ring_q: float | None = None) -> None:
    """Find the beam centre from the mean of a run's bright shots; write a geometry file.

    Averages the bright shots (at most --max-shots, evenly spread over the
    run) with Dask, then fits the centre two independent ways from the same
    start: a robust circle (and ellipse) fit to the ring's peak positions in
    angular sectors, and the centre that makes the ring sharpest in the
    masked radial profile. Prints both and their disagreement in pixels.
    The circle fit is adopted: --out writes center_x, center_y (px),
    pixel_size, distance (m), wavelength (A) and mask (path) as YAML, the
    names of the result store's attrs, for 'process --geometry' (whose
    flags override it).

    The mean runs on Dask's threaded scheduler in this process (reading a
    few hundred images does not repay starting a cluster); --workers N,
    --scheduler, --scheduler-file or --cluster jobqueue compute it on a
    distributed cluster instead.

    \b
    Example:
      sacla-dask center run_178884.h5 --guess 1210 1195 480 --mask mask.npy \\
          --distance 0.053 --out geom.yaml --plot center.png
      sacla-dask process run_178884.h5 --geometry geom.yaml --qmin 2.64 --qmax 2.71 \\
          --out run_178884.zarr
    """

    from .center import BrightMean, center_figure, center_run
    from .errors import OutputError, ParameterError

    rotations = (0.0, 0.0, 0.0)
    if geom and (tilt or ring_q is not None):
        raise ParameterError("--tilt and --ring-q fit one flat detector: not with --geom "
                             "(its panels place every pixel)")
    if geom and out and not out.lower().endswith(".geom"):
        raise ParameterError(f"with --geom, --out writes the .geom with its corners shifted to "
                             f"the fitted beam: give a name ending in .geom (got {out!r})")
    if poni:
        from .poni import read_poni

        pg = read_poni(poni)
        pixel_size = pixel_size if pixel_size is not None else pg.pixel1
        distance = distance if distance is not None else pg.distance
        if wavelength is None and pg.wavelength is not None:
            wavelength = pg.wavelength * 1e10
        rotations = (pg.rot1, pg.rot2, pg.rot3)
    on_cluster = workers is not None or scheduler or scheduler_file or cluster != "local"
    how = "on the Dask cluster" if on_cluster else "with Dask's threaded scheduler"

    def computing_mean() -> Any:
        if on_cluster:
            return _client_from(workers, scheduler, scheduler_file, cluster, jobs)
        from .engine import local_threads

        return local_threads()

    def report_mean(mean: BrightMean) -> None:
        shape = mean.image.shape
        click.echo(f"mean of {mean.n_shots} of {mean.n_bright} bright shots (tags "
                   f"{_span(mean.tags)}) of run {', '.join(map(str, mean.run.runs))}: "
                   f"{shape[0]} x {shape[1]} px, {mean.seconds:.1f} s {how}")

    result = center_run(runs, guess=guess, mask=mask, max_shots=max_shots,
                        pixel_size=pixel_size, distance=distance, wavelength=wavelength,
                        tolerance=tolerance, on_bad_tag=on_bad_tag, skip_first=skip_first,
                        compute_context=computing_mean, on_mean=report_mean, geom=geom,
                        **({"select": select} if select else {}))
    c = result.circle
    click.echo(f"circle fit  : centre x = {c.center_x:.3f} +/- {c.sigma_x:.3f}, "
               f"y = {c.center_y:.3f} +/- {c.sigma_y:.3f} px; radius {c.radius:.3f} +/- "
               f"{c.sigma_radius:.3f} px (ring FWHM {c.ring_fwhm:.2f} px; {c.n_used} peak "
               f"points, {c.n_rejected} rejected, {c.n_skipped}/{c.n_sectors} sectors "
               f"skipped; rms {c.rms_px:.3f} px)")
    e = c.ellipse
    if e is not None:
        click.echo(f"ellipse     : centre ({e.center_x:.3f}, {e.center_y:.3f}) px, semi-axes "
                   f"{e.semi_major:.3f} +/- {e.sigma_semi_major:.3f} and {e.semi_minor:.3f} "
                   f"+/- {e.sigma_semi_minor:.3f} px (b/a {e.axis_ratio:.4f}), major axis at "
                   f"{np.degrees(e.angle):.1f} deg")
    else:
        click.echo("ellipse     : could not be fitted")
    res, s = result.fit, result.sharpness
    if s is not None:
        click.echo(f"sharpness   : centre x = {s.center_x:.3f}, y = {s.center_y:.3f} px; ring "
                   f"r = {s.radius:.3f} px, FWHM {s.fwhm:.2f} px (height above baseline "
                   f"{s.sharpness_at_guess:.4g} at the guess -> {s.sharpness:.4g})")
        verdict = ("agree" if res.agree else "DISAGREE: check the mask, the guess and the "
                   "ring in --plot")
        click.echo(f"disagreement: {res.disagreement_px:.3f} px (dx {res.dx:+.3f}, "
                   f"dy {res.dy:+.3f}): {verdict} (tolerance {tolerance:g} px)")
    else:
        click.echo(f"sharpness   : FAILED ({res.sharpness_error}); the circle fit is unchecked")

    if result.wavelength_error is not None:
        click.echo(f"note: no wavelength written ({result.wavelength_error})", err=True)
    g = result.geometry
    if g is not None:
        click.echo(f"ring        : r = {c.radius:.3f} px -> q = {result.q_ring:.5f} 1/A (pixel "
                   f"{g.pixel_size * 1e6:g} um, distance {g.distance * 1e3:g} mm, "
                   f"wavelength {g.wavelength:.5f} A)")
    tilted = _center_tilt(result, ring_q) if (tilt or ring_q is not None) else None
    if plot_path:
        try:
            center_figure(result).savefig(plot_path, dpi=110)
        except OSError as exc:
            raise OutputError(f"cannot write the plot {plot_path!r}: {exc}") from None
        click.echo(f"wrote {plot_path}")
    if result.panels is not None:
        bx, by = result.panels.beam_offset((c.center_x, c.center_y))
        click.echo(f"panels      : the beam is at ({bx:+.3f}, {by:+.3f}) px of where {geom} "
                   f"puts it (centre on its lab grid, origin {result.panels.origin})")
    if out and result.panels is not None and out.lower().endswith(".geom"):
        from .center.panels import shift_geom

        n = shift_geom(geom, out, (bx, by))  # type: ignore[arg-type]
        click.echo(f"wrote {out} ({n} corners shifted by ({-bx:+.3f}, {-by:+.3f}) px)")
    elif out and tilted is not None:
        _write_tilted(result, tilted, out)
    elif out and out.lower().endswith(".poni"):
        from .center.poni import write_center_poni

        gp = write_center_poni(out, (c.center_x, c.center_y), result.pixel_size,
                               result.distance, result.wavelength, result.mean.image.shape,
                               rotations)
        click.echo(f"wrote {out} (PONI ({gp.center_x:.3f}, {gp.center_y:.3f}) px, rot1..3 = "
                   f"{gp.rot1:g}, {gp.rot2:g}, {gp.rot3:g} rad)")
    elif out:
        result.write_geometry(out)
        missing = [f"--{k.replace('_', '-')}" for k in result.missing_geometry]
        click.echo(f"wrote {out}" + (f" (without {', '.join(missing)}: give them to process)"
                                     if missing else ""))
    else:
        click.echo("(give --out geom.yaml to save the geometry for 'sacla-dask process')")


# -- follow --------------------------------------------------------------------
#: options of 'process' that 'follow' does not take (where the work runs, whole-run ones)
_NOT_FOLLOWED = ("runs", "out", "dry_run", "report", "engine", "scheduler", "scheduler_file",
                 "cluster", "jobs", "progress")


def _follow_command() -> click.Command:
    """'follow': every option of 'process' (as 'process' defines them) and its own."""
    params: list[click.Parameter] = [
        click.Argument(["source"], type=click.Path()),
        click.Option(["--out", "-o"], required=True, type=click.Path(),
                     help="Output Zarr store (grows as the run arrives)."),
        click.Option(["--idle-timeout"], type=float, default=None, metavar="SECONDS",
                     help="Finalise when no new data arrived for this long (default 300: "
                          "outlasts SACLA's conversion of a run's next block)."),
        click.Option(["--serve"], type=int, default=None, metavar="PORT",
                     help="Serve a live page at http://127.0.0.1:PORT/ (correlation map, "
                          "profile with its SEM band, Fourier coefficients against pairs, "
                          "rates)."),
        click.Option(["--poll"], type=float, default=0.2, show_default=True,
                     help="Seconds between looks at the source."),
    ]
    for p in process.params:
        if p.name not in _NOT_FOLLOWED:
            params.append(p)
    return click.Command(
        "follow", params=params, callback=_handle_errors(_follow),
        help=_follow.__doc__, short_help="Follow a run live as its files arrive.")


def _follow(source: str, out: str, idle_timeout: float | None, serve: int | None,
            poll: float, **opts: Any) -> None:
    """Follow a run while it is taken: fold each new block into the store as it arrives.

    SOURCE is a folder (or a glob) into which the run's DataConvert files
    arrive (names ending in .h5; each a complete file of some tags, written
    under another name and renamed), or one HDF5 file that a writer appends
    to with SWMR. Each new block is read, transformed and its pairs folded
    into the running sums at once; the store grows along tag and is readable
    at any moment (sacla_dask.open_result(OUT, allow_incomplete=True): the
    tags so far, the current corr, corr_sem, corr_fourier, pairs). Pairs
    across blocks are those 'process' makes over the same files. When no
    data arrived for --idle-timeout seconds the store is finalised
    ('complete'): it then equals 'process' over the same files. Ctrl-C, or
    a kill, leaves a store that the same command resumes (nothing lost or
    counted twice). One writer per store: a second 'follow' or 'process' on
    OUT is refused while this runs. Not live: --pairs, --pairing other than
    consecutive, --reject-outliers (use 'process' afterwards).

    \b
    Example:
      sacla-dask synth --live incoming --tags 600 --rate 30 --block 20 &
      sacla-dask follow incoming --out live.zarr --qmin 1.6 --qmax 1.8 \\
          --center 259.3 253.9 --pixel-size 5e-5 --distance 0.053 --serve 5006
    """
    from .geometry import resolve_geometry
    from .live.follow import IDLE_TIMEOUT, LiveOptions, LiveStatus, follow
    from .live.source import open_source

    geometry, mask = resolve_geometry(
        opts["geometry"], center=opts["center"], pixel_size=opts["pixel_size"],
        distance=opts["distance"], wavelength=opts["wavelength"], mask=opts["mask"])
    options = LiveOptions(geometry=geometry, polar=_polar_spec(opts, mask),
                          pairing=_pairing_spec(opts), statistics=_statistics_spec(opts),
                          output=_output_spec(out, opts), shots=_shot_spec(opts),
                          threads=opts.get("workers"))
    options.check()
    src = open_source(source, on_bad_tag=opts["on_bad_tag"])
    status = LiveStatus()
    server = None
    if serve is not None:
        from .live.page import serve_page

        server = serve_page(status, serve)
        click.echo(f"live page: http://127.0.0.1:{serve}/", err=True)
    timeout = IDLE_TIMEOUT if idle_timeout is None else idle_timeout
    click.echo(f"following {source} into {out} (finalised after {timeout:g} s without new "
               "data; Ctrl-C stops, the same command resumes)", err=True)
    try:
        ds = follow(src, options, idle_timeout=timeout, poll_interval=poll,
                    overwrite=opts["overwrite"], status=status,
                    say=lambda m: click.echo(m, err=True))
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: {out} keeps every block folded so far; run the same "
                   "command again to go on", err=True)
        sys.exit(130)
    finally:
        if server is not None:
            server.stop()
    if ds is not None:
        click.echo(f"wrote {out}: {ds.sizes['tag']} tags, {int(ds['n_pairs'])} pairs, "
                   f"corr {dict(ds['corr'].sizes)}")


main.add_command(_follow_command())


# -- structure -----------------------------------------------------------------
@main.command()
@click.argument("store", type=click.Path())
@click.option("--lmax", default=20, show_default=True, type=int,
              help="Highest Legendre order l of the B_l fit.")
@click.option("--odd-l", is_flag=True,
              help="Fit every l, not only the even ones (a check: by Friedel's law the odd "
                   "B_l of an intensity correlation vanish).")
@click.option("--skip-lags", default=2, show_default=True, type=int,
              help="Leave the lags dphi_k, k < N (shot-noise self-correlation), out of the fit.")
@click.option("--npsi", type=int, default=None,
              help="Points of the psi grid over 0..pi (default: nphi / 2 + 1).")
@click.option("--max-vif", default=10.0, show_default=True, type=float,
              help="Flag B_l whose variance inflation factor exceeds this (psi coverage too "
                   "short to determine it).")
@click.option("--errors", type=click.Choice(["auto", "sem", "bootstrap"]), default="auto",
              show_default=True,
              help="Per-lag errors of the fit: corr_sem, or the bootstrap intervals (auto: "
                   "the bootstrap when the store has it).")
@click.option("--no-cross", is_flag=True, help="Leave the cross-correlations (q pairs) out.")
@_handle_errors
def structure(store: str, lmax: int, odd_l: bool, skip_lags: int, npsi: int | None,
              max_vif: float, errors: str, no_cross: bool) -> None:
    """Add C(psi) and the Legendre coefficients B_l to a result store.

    Resamples corr (and corr_cross) from the detector angle dphi onto the
    3-D angle psi between the scattering vectors (the Ewald sphere's
    curvature undone: cos psi = sin t1 sin t2 + cos t1 cos t2 cos dphi),
    and fits B_l (l = 0..lmax) by weighted least squares over the psi the
    detector reaches. Writes corr_psi, corr_psi_sem, corr_psi_count, bl,
    bl_sem, bl_flag, bl_vif, bl_offset, bl_chi2 (and the _cross ones),
    replacing those of an earlier run. Reads only the correlation
    statistics: seconds, whatever the number of tags. See docs/structure.md.

    \b
    Example:
      sacla-dask structure run.zarr --lmax 30
      sacla-dask plot run.zarr --out figures --lattice fcc --a 4.078
    """
    from .structure.cli import summary_lines
    from .structure.compute import add_structure

    t0 = time.perf_counter()
    ds = add_structure(store, lmax, odd=odd_l, skip_lags=skip_lags, npsi=npsi,
                       max_vif=max_vif, errors=errors, cross=not no_cross)
    for line in summary_lines(ds, store, time.perf_counter() - t0):
        click.echo(line)


if __name__ == "__main__":  # pragma: no cover
    main()
