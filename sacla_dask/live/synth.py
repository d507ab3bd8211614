"""A synthetic run written as it arrives at the beamline: block files into a folder.

:func:`write_live_run` writes a synthetic run (:func:`sacla_dask.io.synthetic.write_synthetic_run`)
as DataConvert does during a run: block after block, each a complete file
holding ``block`` tags of the run with their event data, written under a
temporary name (``.NAME.h5.part``) and renamed, at ``rate`` tags per second.
The blocks together are the run one file would hold (the same tags, dark
shots and per-shot phases), so ``process`` over all of them is the
reference of a followed run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..io.synthetic import SyntheticTruth, write_synthetic_run


def block_name(run: int, index: int) -> str:
    """The file name of block ``index`` of ``run``."""
    return f"run_{run}_{index:05d}.h5"


def write_live_run(folder: str | os.PathLike[str], n_tags: int, block: int = 20,
                   rate: float | None = None, *, run: int = 178884, seed: int = 0,
                   staging: str | os.PathLike[str] | None = None,
                   on_block: Callable[[str, SyntheticTruth, float], None] | None = None,
                   **keywords: Any) -> list[str]:
    """Write a synthetic run into ``folder`` block by block, as it would arrive.

    Parameters
    ----------
    folder : path
        Where the block files appear (created).
    n_tags : int
        Tags with images in the whole run (``n_dark`` of them dark, first).
    block : int
        Tags per file.
    rate : float, optional
        Tags per second: block ``k`` appears ``k * block / rate`` s after the
        first (None: as fast as they are written).
    staging : path, optional
        Write the files here first and only rename them into ``folder`` at
        their time (a benchmark: the writing then costs the follower nothing);
        default: a temporary name in ``folder``.
    on_block : callable, optional
        ``on_block(path, truth, time_renamed)`` after each block appears.
    **keywords
        Of :func:`~sacla_dask.io.synthetic.write_synthetic_run` (``shape``,
        ``n_dark``, ``ring_radii``, ``modulation_order``...).

    Returns
    -------
    list of str
        The block files, in order.
    """
    if block < 1 or n_tags < 1:
        raise ValueError("block and n_tags must be >= 1")
    out = os.fspath(folder)
    os.makedirs(out, exist_ok=True)
    stage = os.fspath(staging) if staging is not None else out
    os.makedirs(stage, exist_ok=True)
    n_blocks = -(-n_tags // block)
    paths = []
    files = []
    if staging is not None:  # everything first, then the arrivals
        for k in range(n_blocks):
            files.append(_write_block(stage, run, k, block, n_tags, seed, keywords))
    t0 = time.time()
    for k in range(n_blocks):
        if staging is None:
            tmp, truth = _write_block(stage, run, k, block, n_tags, seed, keywords)
        else:
            tmp, truth = files[k]
        if rate:
            wait = t0 + k * block / float(rate) - time.time()
            if wait > 0:
                time.sleep(wait)
        final = os.path.join(out, block_name(run, k))
        os.replace(tmp, final)
        paths.append(final)
        if on_block is not None:
            on_block(final, truth, time.time())
    return paths


def _write_block(stage: str, run: int, k: int, block: int, n_tags: int, seed: int,
                 keywords: dict[str, Any]) -> tuple[str, SyntheticTruth]:
    tmp = os.path.join(stage, "." + block_name(run, k) + ".part")
    first = k * block
    truth = write_synthetic_run(tmp, n_tags=min(block, n_tags - first), first_image=first,
                                run=run, seed=seed, **keywords)
    return tmp, truth


def write_swmr_run(path: str | os.PathLike[str], n_tags: int, block: int = 20,
                   rate: float | None = None, *, shape: tuple[int, int] = (256, 256),
                   run: int = 178884, n_dark: int = 2, seed: int = 0,
                   first_tag: int = 166762140, tag_step: int = 2,
                   ring_radius: float | None = None, order: int = 6,
                   amplitude: float = 0.2, photon_energy: float = 8600.0) -> None:
    """Append a synthetic run to one HDF5 file with SWMR, ``block`` tags at a time.

    The layout :class:`~sacla_dask.live.source.SWMRFileSource` reads
    (``/run_N/detector_data`` (ntag, ny, nx) and ``/run_N/event_info/...``
    grown in step, ``tag_number_list`` last).
    """
    import h5py

    from ..io.synthetic import ring_image

    rng = np.random.default_rng(seed)
    ny, nx = shape
    cx, cy = (nx - 1) / 2 + 1.3, (ny - 1) / 2 - 0.7
    r0 = ring_radius or 0.6 * min(shape) / 2
    yy, xx = np.mgrid[:ny, :nx]
    phi = np.arctan2(yy - cy, xx - cx)
    ring = ring_image(shape, (cx, cy), [r0], 2.0).astype(np.float32) * 1000
    with h5py.File(os.fspath(path), "w", libver="latest") as fh:
        fh["file_info/run_number_list"] = np.array([run], dtype=np.int64)
        g = fh.create_group(f"run_{run}")
        det = g.create_dataset("detector_data", (0, ny, nx), np.float32,
                               maxshape=(None, ny, nx), chunks=(1, ny, nx))
        ev = g.create_group("event_info")
        names = {"bl_3/eh_1/xfel_pulse_selector_status": np.int32,
                 "bl_3/oh_2/photon_energy_in_eV": np.float64,
                 "bl_3/oh_2/bm_1_pulse_energy_in_joule": np.float64}
        evs = {n: ev.create_dataset(n.rsplit("/", 1)[-1], (0,), dt, maxshape=(None,))
               for n, dt in names.items()}
        tl = ev.create_dataset("tag_number_list", (0,), np.int64, maxshape=(None,))
        fh.swmr_mode = True
        t0 = time.time()
        for k, lo in enumerate(range(0, n_tags, block)):
            hi = min(n_tags, lo + block)
            idx = np.arange(lo, hi)
            bright = idx >= n_dark
            pe = np.where(bright, rng.normal(1e-3, 5e-5, idx.size), 0.0)
            imgs = np.empty((idx.size, ny, nx), np.float32)
            for i, b in enumerate(bright):
                if b:
                    mod = 1 + amplitude * np.cos(order * (phi - rng.uniform(0, 2 * np.pi)))
                    imgs[i] = rng.poisson(10 + ring * mod * pe[i] / 1e-3)
                else:
                    imgs[i] = rng.poisson(10, shape)
            if rate:
                wait = t0 + k * block / float(rate) - time.time()
                if wait > 0:
                    time.sleep(wait)
            det.resize((hi, ny, nx))
            det[lo:hi] = imgs
            values = [bright.astype(np.int32), photon_energy + rng.normal(0, 1, idx.size), pe]
            for (_n, d), v in zip(evs.items(), values, strict=True):
                d.resize((hi,))
                d[lo:hi] = v
                d.flush()
            det.flush()
            tl.resize((hi,))
            tl[lo:hi] = first_tag + tag_step * idx
            tl.flush()


__all__ = ["block_name", "write_live_run", "write_swmr_run"]
