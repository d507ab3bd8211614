"""Does ``sacla-dask follow`` keep up with a run arriving at the beamline's rate?

A synthetic 2400 x 2400 run (the benchmark geometry of ``_common.py``) is
written block by block into a staging folder first (not timed), then the
blocks are renamed into the followed folder at ``--rate`` tags per second,
``--block`` tags per file, as SACLA's conversion makes them appear. The
follower (``sacla-dask follow``, a separate process, the default threads
engine) prints when each block is in the store; for each block this script
reports the time from its arrival (the rename) to that moment. It keeps up
when that delay does not grow over the run (no backlog) and stays under
10 s.

    python benchmarks/bench_follow.py --band ring --tags 1000 --rate 30 --block 20
    python benchmarks/bench_follow.py --band wide --tags 200 --rate 10

Options: ``--band ring|wide``, ``--tags``, ``--rate`` (tags/s), ``--block``
(tags per file), ``--keep`` (keep the staged files for another rate).
Needs ``tags x 23 MB`` of disk under ``benchmarks/_work/`` (removed at the
end unless ``--keep``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import BANDS, CENTER, DISTANCE, PIXEL, SHAPE, WAVELENGTH, WORK  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--band", choices=sorted(BANDS), default="ring")
    ap.add_argument("--tags", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=30.0)
    ap.add_argument("--block", type=int, default=20)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    from sacla_dask.geometry import Geometry
    from sacla_dask.live.synth import _write_block, block_name

    g = Geometry(CENTER[0], CENTER[1], PIXEL, DISTANCE, WAVELENGTH)
    r0, r1 = BANDS[a.band]
    qmin, qmax = g.radius_to_q(r0), g.radius_to_q(r1)
    root = os.path.join(WORK, "follow")
    stage = os.path.join(root, f"stage-{a.tags}-{a.block}")
    inc, out = os.path.join(root, "incoming"), os.path.join(root, "live.zarr")
    for p in (inc, out):
        shutil.rmtree(p, ignore_errors=True)
    os.makedirs(stage, exist_ok=True)
    n_blocks = -(-a.tags // a.block)
    t0 = time.time()
    files = []
    for k in range(n_blocks):
        tmp = os.path.join(stage, "." + block_name(178884, k) + ".part")
        if not os.path.exists(tmp):
            _write_block(stage, 178884, k, a.block, a.tags, 0,
                         dict(shape=SHAPE, center=CENTER, n_dark=5, ring_radii=(765.0,),
                              ring_width=3.0, pixel_size=PIXEL, distance=DISTANCE,
                              photon_energy=12.398419843320026 / WAVELENGTH * 1000))
        files.append(tmp)
    print(f"staged {n_blocks} blocks of {a.block} tags ({SHAPE[0]}x{SHAPE[1]}) in "
          f"{time.time() - t0:.0f} s", flush=True)
    os.makedirs(inc)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "sacla_dask.cli", "follow", inc, "--out", out,
           "--center", str(CENTER[0]), str(CENTER[1]), "--pixel-size", str(PIXEL),
           "--distance", str(DISTANCE), "--wavelength", str(WAVELENGTH),
           "--qmin", repr(qmin), "--qmax", repr(qmax), "--idle-timeout", "5",
           "--poll", "0.1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    done: dict[str, float] = {}  # when the follower said it committed each block
    cpu0 = os.times()

    def reader() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            m = re.match(r"block (\S+):.* in store at ", line)
            if m:  # (printed right after the commit: the time the line is read)
                done[m.group(1)] = time.time()
            elif "error" in line or "Traceback" in line:
                print(line, end="", flush=True)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    time.sleep(3.0)  # the follower's start-up (imports), before the run starts
    arrived: dict[str, float] = {}
    start = time.time()
    for k, tmp in enumerate(files):
        wait = start + k * a.block / a.rate - time.time()
        if wait > 0:
            time.sleep(wait)
        name = block_name(178884, k)
        if not a.keep:
            os.replace(tmp, os.path.join(inc, name))
        else:
            os.link(tmp, os.path.join(inc, name))
        arrived[name] = time.time()
    proc.wait()
    th.join(5)
    wall = time.time() - start
    cpu = os.times()
    delays = np.array([done[n] - arrived[n] for n in arrived if n in done])
    n = delays.size
    half = max(1, n // 2)
    res = {
        "band": a.band, "tags": a.tags, "rate": a.rate, "block": a.block,
        "blocks_in_store": n, "blocks": n_blocks, "returncode": proc.returncode,
        "delay_median_s": float(np.median(delays)) if n else None,
        "delay_max_s": float(delays.max()) if n else None,
        "delay_first_half_mean_s": float(delays[:half].mean()) if n else None,
        "delay_second_half_mean_s": float(delays[half:].mean()) if n > 1 else None,
        "wall_s": wall, "children_cpu_s": (cpu.children_user + cpu.children_system
                                           - cpu0.children_user - cpu0.children_system),
    }
    grows = n > 1 and res["delay_second_half_mean_s"] > res["delay_first_half_mean_s"] + 1.0
    res["keeps_up"] = bool(n == n_blocks and not grows and res["delay_max_s"] < 10)
    print(json.dumps(res, indent=1), flush=True)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(inc, ignore_errors=True)
    if not a.keep:
        shutil.rmtree(stage, ignore_errors=True)


if __name__ == "__main__":
    main()
