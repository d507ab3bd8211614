"""Digests of the stores and figures of a fixed set of synthetic runs.

A change that must not change behaviour (a refactoring, a new engine) is
checked by running this before and after it and comparing the two JSON
files::

    python benchmarks/store_digests.py --out before.json        # on the old commit
    python benchmarks/store_digests.py --out after.json         # on the new one
    python benchmarks/store_digests.py --compare before.json after.json

Everything goes through the ``sacla-dask`` command line (``synth``,
``process``, ``plot``, ``center``), the interface that has to stay the same.
Each store is digested variable by variable (dimensions, dtype, the bytes
of the values, the attrs) after dropping the attrs that name this
machine's paths; each figure by its decoded pixels. The scenarios: the ring
band, a wide band, cross-q correlations, the bootstrap, outlier rejection
with Bragg masking, a run killed (SIGKILL) part-way and resumed, and the
beam-centre fit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

#: attrs that name files on this machine (same run, other folder: other value)
VOLATILE_ATTRS = {"source", "sources", "parameters", "parameters_sha256", "mask"}

GEOMETRY = ["--pixel-size", "5e-5", "--distance", "0.053"]
SCENARIOS: dict[str, list[str]] = {
    "ring": ["--qmin", "0.14", "--qmax", "0.18", "--chunk-size", "6"],
    "wide": ["--qmin", "0.05", "--qmax", "0.40", "--chunk-size", "7", "--method", "bilinear"],
    "cross_q": ["--qmin", "0.14", "--qmax", "0.33", "--nq", "24", "--q-pairs", "all",
                "--chunk-size", "8", "--keep-pairs"],
    "bootstrap": ["--qmin", "0.14", "--qmax", "0.18", "--bootstrap", "20",
                  "--chunk-size", "5", "--non-overlapping"],
    "outliers": ["--qmin", "0.14", "--qmax", "0.33", "--reject-outliers", "2", "--bragg", "6",
                 "--chunk-size", "6", "--solid-angle", "--polarization", "0.99"],
}


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MPLBACKEND="Agg")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, **kw)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:20]


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def store_digest(path: str) -> dict[str, Any]:
    """Per-variable digests of a result store, and its attrs less the machine's paths."""
    import xarray as xr

    ds = xr.open_zarr(path, consolidated=False)
    out: dict[str, Any] = {}
    for name in sorted(ds.variables):
        v = ds[name]
        values = np.ascontiguousarray(v.values)
        if values.dtype == object:
            payload = json.dumps(values.tolist(), default=str).encode()
        else:
            payload = values.tobytes()
        out[str(name)] = f"{v.dims} {values.dtype} {_sha(payload)}"
    attrs = {k: _jsonable(v) for k, v in sorted(ds.attrs.items()) if k not in VOLATILE_ATTRS}
    out["attrs"] = _sha(json.dumps(attrs, sort_keys=True, default=str).encode())
    return out


def figure_digests(folder: str) -> dict[str, str]:
    import matplotlib.image as mpimg

    return {name: _sha(np.ascontiguousarray(mpimg.imread(os.path.join(folder, name))).tobytes())
            for name in sorted(os.listdir(folder)) if name.endswith(".png")}


def _killed_and_resumed(work: str, run: str, args: list[str]) -> str:
    """The ring scenario, SIGKILLed once part of its store is written, then run again."""
    out = os.path.join(work, "resumed.zarr")
    cmd = [shutil.which("sacla-dask") or "sacla-dask", "process", run, "--out", out,
           "--center", "128", "128", *GEOMETRY, *args, "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(os.path.join(out, "polar")):
            time.sleep(0.3)
            break
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _run(cmd)
    return out


def collect(work: str) -> dict[str, Any]:
    exe = shutil.which("sacla-dask") or "sacla-dask"
    run = os.path.join(work, "run.h5")
    _run([exe, "synth", run, "--tags", "60", "--dark", "4", "--shape", "256", "256",
          "--center", "128", "128"])
    digests: dict[str, Any] = {}
    for name, args in SCENARIOS.items():
        out = os.path.join(work, f"{name}.zarr")
        _run([exe, "process", run, "--out", out, "--center", "128", "128", *GEOMETRY, *args,
              "--no-progress"])
        digests[name] = store_digest(out)
        figs = os.path.join(work, f"{name}-figures")
        _run([exe, "plot", out, "--out", figs, "--shots", "4"])
        digests[f"{name}/figures"] = figure_digests(figs)
    digests["resume"] = store_digest(_killed_and_resumed(work, run, SCENARIOS["ring"]))
    geom = os.path.join(work, "geom.yaml")
    _run([exe, "center", run, "--guess", "125", "131", "38", "--out", geom])
    with open(geom) as fh:  # less the run's path
        digests["center"] = "".join(line for line in fh if run not in line)
    return digests


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    diffs = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} != {b.get(key)!r}")
    return diffs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the digests to this JSON file")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two digest files")
    args = p.parse_args()
    if args.compare:
        with open(args.compare[0]) as fa, open(args.compare[1]) as fb:
            diffs = compare(json.load(fa), json.load(fb))
        print("\n".join(diffs) if diffs else "identical")
        sys.exit(1 if diffs else 0)
    with tempfile.TemporaryDirectory() as work:
        digests = collect(work)
    text = json.dumps(digests, indent=1, sort_keys=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
