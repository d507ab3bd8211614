"""Polar-step benchmark: sacla_dask's operator against the tutorial and pyFAI, one core.

For 2400x2400 float32 images, on the tutorial's 40-pixel ring band (r =
745..785 px) and a wide band (r = 100..1100 px, nphi ~ 6900), times in one
process run:

* the tutorial's formulation (RingData ``InterpSimple.nearest``: precomputed
  integer index arrays, ``pmask * img[iy, ix]`` on the full image; and the
  same as a flat ``img.ravel()[idx]`` gather, a slightly faster variant);
* :func:`sacla_dask.polar.apply_polar` with ``nearest``, ``bilinear`` and
  ``splitting`` operators on blocks of image windows (what the pipeline
  reads from HDF5: the band's bounding box, C-contiguous);
* pyFAI ``integrate2d_ng`` on the same grid (``r_mm`` over the band,
  nq x nphi bins), CSR engine in Cython, ``OMP_NUM_THREADS=1``: full pixel
  splitting (``("full", "csr", "cython")``, the target) and no
  splitting (``("no", "csr", "cython")``);

and prints images/s and the ratios. Everything runs on one core: the
thread-count variables are set before numpy or pyFAI is imported. Times are
the best of ``--repeat`` passes over ``--images`` distinct images (so the
images do not all sit in the CPU cache), as wall clock and as process CPU
time; on a shared machine the CPU time is the steadier figure and the one
the ratios use. Building each operator (once per geometry) is timed apart.

Usage::

    python benchmarks/bench_polar.py                       # both bands, every method
    python benchmarks/bench_polar.py --bands ring --images 8 --repeat 3
    python benchmarks/bench_polar.py --quick               # small images, a smoke run
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "NUMEXPR_NUM_THREADS", "PYFAI_NB_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

#: the tutorial's geometry (50 um pixels, 53 mm, 1.44 A), a 2400x2400 MPCCD octal
from _common import BANDS, CENTER, DISTANCE, PIXEL, SHAPE, WAVELENGTH  # noqa: E402

from sacla_dask.geometry import Geometry  # noqa: E402
from sacla_dask.polar import apply_polar, build_operator, make_grid  # noqa: E402

METHODS = ("nearest", "bilinear", "splitting")


def log(*a: Any) -> None:
    print(*a, flush=True)


def timed(fn: Callable[[], Any], n_images: int, repeat: int) -> dict[str, float]:
    """Best-of-``repeat`` wall and CPU seconds per image of ``fn`` (one pass = n_images)."""
    fn()  # warm up (page faults, lazily built caches)
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall_ms": 1e3 * min(wall) / n_images, "cpu_ms": 1e3 * min(cpu) / n_images}


def make_images(n: int, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """``n`` distinct float32 images: powder rings on a noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[0:shape[0], 0:shape[1]]
    r = np.hypot(xx - CENTER[0] * shape[1] / SHAPE[1], yy - CENTER[1] * shape[0] / SHAPE[0])
    base = (50 + 400 * np.exp(-((r - 0.32 * shape[0]) ** 2) / 20)).astype(np.float32)
    out = np.empty((n,) + shape, np.float32)
    for i in range(n):
        out[i] = base + rng.standard_normal(shape, dtype=np.float32) * 5
    return out


# -- the tutorial ----------------------------------------------------------------
def tutorial_indices(geom: Geometry, r_in: float, r_out: float, nphi: int,
                     shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """RingData InterpSimple's nearest-pixel index arrays (rows one pixel of radius apart)."""
    phis = np.arange(nphi) * 2 * np.pi / nphi
    q_rows = np.arange(r_in, r_out) + 0.5
    x = geom.center_x + q_rows[:, None] * np.cos(phis)[None, :]
    y = geom.center_y + q_rows[:, None] * np.sin(phis)[None, :]
    ix = np.clip(np.rint(x).astype(np.int64), 0, shape[1] - 1)
    iy = np.clip(np.rint(y).astype(np.int64), 0, shape[0] - 1)
    return iy, ix


# -- pyFAI -------------------------------------------------------------------------
def pyfai_integrator(geom: Geometry, shape: tuple[int, int]) -> Any:
    return geom.to_pyfai(shape)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bands", default="ring,wide", help="comma list of: ring, wide")
    ap.add_argument("--methods", default=",".join(METHODS), help="sacla_dask methods")
    ap.add_argument("--images", type=int, default=8, help="distinct images per pass")
    ap.add_argument("--repeat", type=int, default=3, help="passes (best is kept)")
    ap.add_argument("--no-pyfai", action="store_true", help="skip pyFAI")
    ap.add_argument("--quick", action="store_true",
                    help="600x600 images, bands scaled by 1/4: a smoke run, not a figure")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)

    scale = 0.25 if args.quick else 1.0
    shape = (int(SHAPE[0] * scale), int(SHAPE[1] * scale))
    geom = Geometry(CENTER[0] * scale, CENTER[1] * scale, PIXEL / scale, DISTANCE, WAVELENGTH)
    bands = [b.strip() for b in args.bands.split(",") if b.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    n = args.images

    import scipy

    info = {"machine": platform.machine(), "cpu": _cpu_name(), "python": sys.version.split()[0],
            "numpy": np.__version__, "scipy": scipy.__version__,
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "shape": shape,
            "images": n, "repeat": args.repeat}
    if not args.no_pyfai:
        try:
            import pyFAI

            info["pyFAI"] = pyFAI.version
        except ImportError:
            args.no_pyfai = True
            log("pyFAI is not installed: its rows are skipped")
    log(f"polar-step benchmark, one core: {json.dumps(info)}")
    log(f"making {n} distinct {shape[0]}x{shape[1]} float32 images "
        f"({n * shape[0] * shape[1] * 4 / 2**20:.0f} MiB)")
    images = make_images(n, shape)
    results: dict[str, Any] = {"info": info, "bands": {}}

    for band in bands:
        r_in, r_out = (v * scale for v in BANDS[band])
        grid = make_grid(geom, geom.radius_to_q(r_in), geom.radius_to_q(r_out))
        nq, nphi = grid.shape
        log(f"\n== {band} band: r = {r_in:g}..{r_out:g} px, grid {nq} q x {nphi} phi "
            f"({nq * nphi / 1e6:.2f} M bins)")
        rows: dict[str, dict[str, Any]] = {}

        # the tutorial: pmask * img[iy, ix] on the full image
        iy, ix = tutorial_indices(geom, r_in, r_out, nphi, shape)
        pmask = np.ones((nq, nphi), np.float32)  # no mask: the multiply is still done
        flat = iy * shape[1] + ix

        def tut2d(pmask: np.ndarray = pmask, iy: np.ndarray = iy, ix: np.ndarray = ix) -> None:
            for img in images:
                pmask * img[iy, ix]

        def tutflat(pmask: np.ndarray = pmask, flat: np.ndarray = flat) -> None:
            for img in images:
                pmask * img.ravel()[flat]

        rows["tutorial img[iy, ix]"] = timed(tut2d, n, args.repeat)
        rows["tutorial flat gather"] = timed(tutflat, n, args.repeat)

        # sacla_dask
        for method in methods:
            t0 = time.perf_counter()
            op = build_operator(geom, grid, shape, None, method)
            build = time.perf_counter() - t0
            windows = np.ascontiguousarray(images[(slice(None),) + op.window])

            def ours(op: Any = op, windows: np.ndarray = windows) -> None:
                apply_polar(windows, op)

            r = timed(ours, n, args.repeat)
            r.update(build_s=build, operator_mib=op.nbytes / 2**20, nnz=int(op.matrix.nnz),
                     window=list(op.window_shape), tile=op.tile)
            rows[f"sacla_dask {method}"] = r
            del windows, op

        # pyFAI
        if not args.no_pyfai:
            ai = pyfai_integrator(geom, shape)
            mm = geom.pixel_size * 1e3
            for split in ("full", "no"):
                kw = dict(npt_rad=nq, npt_azim=nphi, unit="r_mm",
                          radial_range=(grid.r_edges[0] * mm, grid.r_edges[1] * mm),
                          azimuth_range=(0.0, 360.0), method=(split, "csr", "cython"),
                          correctSolidAngle=False)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t0 = time.perf_counter()
                    ai.integrate2d_ng(images[0], **kw)  # builds the CSR engine
                    build = time.perf_counter() - t0

                    def fai(kw: dict = kw, ai: Any = ai) -> None:
                        for img in images:
                            ai.integrate2d_ng(img, **kw)

                    r = timed(fai, n, args.repeat)
                r.update(build_s=build)
                rows[f"pyFAI integrate2d {split}-split csr"] = r
                ai.reset()

        _print_band(rows)
        results["bands"][band] = {"grid": [nq, nphi], "r": [r_in, r_out], "rows": rows}

    _print_targets(results)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, default=str)
    return results


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _print_band(rows: dict[str, dict[str, Any]]) -> None:
    tut = rows["tutorial img[iy, ix]"]["cpu_ms"]
    fai = rows.get("pyFAI integrate2d full-split csr", {}).get("cpu_ms")
    log(f"{'':36s} {'cpu ms/img':>10s} {'wall ms':>8s} {'img/s':>8s} {'x tutorial':>10s} "
        f"{'x pyFAI':>8s} {'build s':>8s} {'MiB':>7s}")
    for name, r in rows.items():
        speed = 1e3 / r["cpu_ms"]
        vs_fai = f"{fai / r['cpu_ms']:8.2f}" if fai else f"{'-':>8s}"
        build = f"{r['build_s']:8.2f}" if "build_s" in r else f"{'':8s}"
        mib = f"{r['operator_mib']:7.1f}" if "operator_mib" in r else f"{'':7s}"
        log(f"{name:36s} {r['cpu_ms']:10.2f} {r['wall_ms']:8.2f} {speed:8.1f} "
            f"{tut / r['cpu_ms']:10.2f} {vs_fai} {build} {mib}")


def _print_targets(results: dict[str, Any]) -> None:
    log("\ntarget: sacla_dask bilinear at least as fast per image as pyFAI's CSR engine "
        "(full splitting), one core")
    for band, b in results["bands"].items():
        rows = b["rows"]
        ours = rows.get("sacla_dask bilinear")
        fai = rows.get("pyFAI integrate2d full-split csr")
        if ours and fai:
            ratio = fai["cpu_ms"] / ours["cpu_ms"]
            log(f"  {band}: bilinear {ours['cpu_ms']:.2f} ms vs pyFAI {fai['cpu_ms']:.2f} ms per "
                f"image: {ratio:.1f}x faster -> {'PASS' if ratio >= 1 else 'MISS'}")


if __name__ == "__main__":
    main()
