"""Whole commands as a user types them, against the serial script they replace.

Every figure is the wall time of a complete command in a fresh process
(``subprocess``, nothing imported or started beforehand), best of
``--repeat``, with the command and the serial script
(``benchmarks/tutorial_serial.py``) interleaved on the same file and the
same tags, so that the machine's drift hits both alike:

- the ring band (r = 745..785 px) over the first 40, 100, 300 and 1000
  tags, warm page cache (one untimed run of each first), and 300 tags cold
  (the run file evicted from the page cache before every timed command);
- the wide band (r = 100..1100 px), 100 tags, warm;
- ``sacla-dask --help`` and ``python -c "import sacla_dask"`` (and
  ``import numpy, h5py`` for reference);
- the command's marginal rate, (1000 - 100 tags) over the difference of
  its times, against a single reader's raw read of the same images
  (h5py ``read_direct`` into one buffer, after the timed runs).

It prints the table of ratios with the targets (PASS/MISS) and writes every
figure to ``benchmarks/_work/command-<time>.json``. The synthetic run
(2400x2400 float32, 1000 tags, 21.5 GiB) is written once into
``benchmarks/_work/`` and reused. Usage::

    python benchmarks/bench_command.py               # everything (~15 minutes)
    python benchmarks/bench_command.py --quick       # 40 and 300 tags warm, help/import
    python benchmarks/bench_command.py --engine processes   # force the engine

On this machine (RAM about the size of the 1000-tag file) the 1000-tag
"warm" runs read part of the file from the disk, the serial script and the
command alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SERIAL = os.path.join(HERE, "tutorial_serial.py")

#: (figure, target, "le": the ratio must be at most the target)
TARGETS = {
    "ring 300 warm": 0.5,
    "ring 40 warm": 1.0,
    "ring 1000 warm": 0.5,
    "ring 300 cold": 0.8,
    "wide 100 warm": 0.33,
}
MARGINAL_TARGET = 0.8
HELP_TARGET_S = 0.3


def log(*a: Any) -> None:
    print(*a, flush=True)


def band_q(r_in: float, r_out: float) -> tuple[float, float]:
    """The q band (1/A) of radii r_in..r_out px in the benchmark geometry."""
    def q(r: float) -> float:
        return 4 * math.pi / C.WAVELENGTH * math.sin(math.atan(r * C.PIXEL / C.DISTANCE) / 2)
    return q(r_in), q(r_out)


def timed(cmd: list[str], evict: str | None = None) -> float:
    """Wall seconds of one command in a fresh process (evicting ``evict`` first)."""
    if evict:
        C.evict([evict])
    t = time.perf_counter()
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    dt = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}")
    return dt


def commands(path: str, tags: np.ndarray, n: int, band: tuple[float, float],
             out: str, engine: str | None) -> tuple[list[str], list[str]]:
    """The serial script's command and sacla-dask's for the first ``n`` tags."""
    qmin, qmax = band_q(*band)
    serial = [sys.executable, SERIAL, path, "--center", *map(str, C.CENTER),
              "--radii", str(band[0]), str(band[1]), "--tags", str(n), "--out", out + ".npy"]
    ours = [shutil.which("sacla-dask") or "sacla-dask", "process", path, "--out", out,
            "--center", *map(str, C.CENTER), "--qmin", f"{qmin:.6f}", "--qmax", f"{qmax:.6f}",
            "--pixel-size", str(C.PIXEL), "--distance", str(C.DISTANCE),
            "--wavelength", str(C.WAVELENGTH)]
    if n < len(tags):
        ours += ["--tag-range", str(int(tags[0])), str(int(tags[n - 1]))]
    if engine:
        ours += ["--engine", engine]
    return serial, ours


def case(path: str, tags: np.ndarray, n: int, band_name: str, cold: bool, repeat: int,
         work: str, engine: str | None) -> dict[str, Any]:
    band = C.BANDS[band_name]
    out = os.path.join(work, f"cmd-{band_name}-{n}.zarr")
    serial, ours = commands(path, tags, n, band, out, engine)
    evict = path if cold else None
    times: dict[str, list[float]] = {"serial": [], "command": []}
    if not cold:  # warm the page cache (and Python's own caches) first
        timed(serial)
    for _ in range(repeat):
        for name, cmd in (("serial", serial), ("command", ours)):
            shutil.rmtree(out, ignore_errors=True)
            times[name].append(timed(cmd, evict))
    shutil.rmtree(out, ignore_errors=True)
    for f in (out + ".npy",):
        if os.path.exists(f):
            os.remove(f)
    best = {k: min(v) for k, v in times.items()}
    res = {"band": band_name, "tags": n, "cold": cold, "times": times, "best": best,
           "ratio": best["command"] / best["serial"],
           "command": " ".join(ours)}
    log(f"  {band_name} {n} {'cold' if cold else 'warm'}: serial {best['serial']:.2f} s, "
        f"sacla-dask {best['command']:.2f} s, ratio {res['ratio']:.2f}  "
        f"(all: {times})")
    return res


def startup(repeat: int) -> dict[str, float]:
    exe = shutil.which("sacla-dask") or "sacla-dask"
    cmds = {"sacla-dask --help": [exe, "--help"],
            "import sacla_dask": [sys.executable, "-c", "import sacla_dask"],
            "import numpy, h5py": [sys.executable, "-c", "import numpy, h5py"]}
    for cmd in cmds.values():
        timed(cmd)
    out = {name: min(timed(cmd) for _ in range(repeat)) for name, cmd in cmds.items()}
    for name, t in out.items():
        log(f"  {name}: {t:.3f} s")
    return out


def raw_read_rate(path: str, tags: np.ndarray) -> float:
    """Images per second of one reader (h5py ``read_direct`` into one buffer)."""
    import h5py

    buf = np.empty(C.SHAPE, dtype=np.float32)
    with h5py.File(path, "r") as fh:
        run = int(fh["file_info/run_number_list"][0])
        names = [f"/run_{run}/detector_2d_assembled_1/tag_{t}/detector_data" for t in tags]
        t = time.perf_counter()
        for name in names:
            fh[name].read_direct(buf)
        return len(names) / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each command (best)")
    p.add_argument("--quick", action="store_true", help="40 and 300 tags warm, help/import")
    p.add_argument("--engine", default=None, help="pass --engine to sacla-dask process")
    args = p.parse_args()
    n_max = 300 if args.quick else 1000
    path = C.ensure_run(C.WORK, n_max, log=log)
    import h5py

    with h5py.File(path, "r") as fh:
        run = int(fh["file_info/run_number_list"][0])
        tags = fh[f"run_{run}/event_info/tag_number_list"][()]
    machine = C.machine_info()
    log(f"machine: {machine.get('cpu')}, {machine.get('usable_cores')} cores, "
        f"{machine.get('ram_gib')} GiB; run {path}")
    res: dict[str, Any] = {"machine": machine, "run": path, "cases": [],
                           "when": datetime.datetime.now().isoformat(timespec="seconds")}
    log("start-up:")
    res["startup"] = startup(args.repeat)
    plan = [("ring", 40, False), ("ring", 300, False)]
    if not args.quick:
        plan += [("ring", 100, False), ("ring", 1000, False), ("ring", 300, True),
                 ("wide", 100, False)]
    log(f"whole commands (best of {args.repeat:d}):")
    for band, n, cold in plan:
        res["cases"].append(case(path, tags, n, band, cold, args.repeat, C.WORK, args.engine))
        if (band, n, cold) == ("ring", 1000, False):
            # the raw read in the page-cache state the 1000-tag runs had (on a machine
            # whose memory does not hold the whole file, partly from the disk)
            res["raw_rate"] = max(raw_read_rate(path, tags[:1000]) for _ in range(2))
            log(f"  raw read, 1000 tags, one reader: {res['raw_rate']:.0f} img/s")
    if not args.quick:
        by = {(c["band"], c["tags"], c["cold"]): c for c in res["cases"]}
        dt = by[("ring", 1000, False)]["best"]["command"] - by[("ring", 100, False)]["best"][
            "command"]
        res["marginal_rate"] = 900 / dt if dt > 0 else float("inf")
    print(markdown(res))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(C.WORK, f"command-{stamp}.json"), "w") as fh:
        json.dump(res, fh, indent=1, default=float)


def markdown(res: dict[str, Any]) -> str:
    rows = []
    for c in res["cases"]:
        name = f"{c['band']} {c['tags']} {'cold' if c['cold'] else 'warm'}"
        target = TARGETS.get(name)
        verdict = "" if target is None else ("PASS" if c["ratio"] <= target else "MISS")
        rows.append((name, f"{c['best']['serial']:.2f}", f"{c['best']['command']:.2f}",
                     f"{c['ratio']:.2f}", "" if target is None else f"<= {target}", verdict))
    if "marginal_rate" in res:
        ratio = res["marginal_rate"] / res["raw_rate"]
        rows.append(("marginal rate (1000 - 100 tags) / raw read",
                     f"raw {res['raw_rate']:.0f} img/s", f"{res['marginal_rate']:.0f} img/s",
                     f"{ratio:.2f}", f">= {MARGINAL_TARGET}",
                     "PASS" if ratio >= MARGINAL_TARGET else "MISS"))
    for name, t in res["startup"].items():
        target = HELP_TARGET_S if name == "sacla-dask --help" else None
        rows.append((name, "", f"{t:.2f}", "", "" if target is None else f"<= {target} s",
                     "" if target is None else ("PASS" if t <= target else "MISS")))
    return C.table(rows, ["figure", "serial script, s", "sacla-dask, s", "ratio", "target",
                          ""])


if __name__ == "__main__":
    main()
