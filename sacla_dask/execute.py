"""Running a plan into its Zarr store: chunks settled, template, resume, writes, completion.

:func:`execute` (what :meth:`ProcessingPlan.execute
<sacla_dask.plan.ProcessingPlan.execute>` calls) works with whatever Dask
scheduler is active: a distributed client if there is one (futures and
``distributed.progress``), else ``dask.compute``. The store is written tag
chunk by tag chunk (:mod:`sacla_dask.store`): a killed run keeps its
finished chunks, and executing the same plan again computes only the
missing ones, then the reductions over pairs; ``complete`` is set only
once every array is written.

Before anything is built, ``chunks="auto"`` is sized for the workers that
run the plan (:func:`settle_chunks`, a new plan): a plan made before its
cluster started gets chunks for that cluster, and a store to be resumed
keeps the chunking it was started with.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.sizeof import sizeof

from . import store as _store
from .chunking import auto_tags_for_workers
from .dataset import build_dataset, derived, plan_attrs
from .errors import ParameterError
from .graph import PolarArrays, polar_arrays
from .plan import ProcessingPlan
from .scheduling import inline_picks

log = logging.getLogger(__name__)

#: version of the store's layout: 2, ``image_ok`` is written with each tag chunk (an
#: unfinished store of layout 1 has it only at the end, so it cannot be resumed)
STORE_LAYOUT = 2


@dataclasses.dataclass(frozen=True)
class _Output:
    """What :func:`_output_state` found and built for a plan's store."""

    plan: ProcessingPlan
    state: str
    ds: xr.Dataset
    fresh: PolarArrays
    names: list[str]
    params: dict[str, Any]
    sha: str


def settle_chunks(plan: ProcessingPlan, overwrite: bool = False,
                  resume: bool = True) -> ProcessingPlan:
    """``plan`` with ``chunks="auto"`` sized for the scheduler active now (a new plan).

    A plan made before its cluster started (the CLI prints the plan, then
    starts the cluster) gets chunks sized for the workers that run it; a
    store to be resumed keeps the chunking it was started with (a resumed
    run on other workers would otherwise choose differently, and the store
    could not be resumed). When the workers' memory is not known (batch jobs
    not started yet) the plan's choice stays. Explicit chunks are never
    changed. Returns ``plan`` itself when nothing changes.
    """
    if not plan.auto_chunks:
        return plan
    stored = None
    if plan.out is not None and resume and not overwrite:
        stored = _store.stored_parameters(plan.out).get("tags_per_chunk")
    if isinstance(stored, int) and stored >= 1:
        per = stored
    else:
        found = auto_tags_for_workers(plan.n_tags, plan.transform.shape)
        if found is None:
            return plan
        per = found
    if per == plan.tags_per_chunk:
        return plan
    log.info("chunks='auto': %d tags per chunk (planned with %d)%s", per,
             plan.tags_per_chunk, " as in the store to resume" if stored else "")
    return dataclasses.replace(plan, tags_per_chunk=per)


def _kept(plan: ProcessingPlan, fresh: PolarArrays) -> list[da.Array]:
    """The arrays of the polar step that the store keeps per tag chunk.

    Correlation only keeps no polar images at all: they can be larger than
    the raw input (a wide band).
    """
    arrays = [fresh.normalized, fresh.row_mean, fresh.nonfinite]
    return arrays if plan.store_polar else arrays[1:]


def _chunk_names(plan: ProcessingPlan) -> list[str]:
    """The per-tag variables written chunk by chunk (and resumed), as :func:`_kept`."""
    return (["polar"] if plan.store_polar else []) + ["row_mean", "nonfinite_bins"]


def _output_state(plan: ProcessingPlan, overwrite: bool, resume: bool,
                  check_only: bool = False) -> _Output:
    """Settle the chunks, build the lazy result and find what the output path holds."""
    out = plan.out
    if out is None:
        raise ParameterError("the plan has no output store (out=...)")
    plan = settle_chunks(plan, overwrite, resume)
    fresh = polar_arrays(plan)
    ds = build_dataset(plan, fresh)
    names = _chunk_names(plan)
    for name, arr in zip(names, _kept(plan, fresh), strict=True):
        if name in ds and getattr(ds[name].data, "name", None) != arr.name:
            raise RuntimeError(f"dataset variable {name!r} is not the polar array")
    params, sha = _store.parameters(
        ds, compression=plan.compression, store_polar=plan.store_polar,
        source_bytes=[os.path.getsize(p) for p in plan.run.paths],
        store_layout=STORE_LAYOUT)
    state = _store.prepare_output(out, overwrite=overwrite, resume=resume,
                                  fingerprint=sha, params=params, check_only=check_only)
    return _Output(plan, state, ds, fresh, names, params, sha)


def check_output(plan: ProcessingPlan, overwrite: bool = False, resume: bool = True) -> str:
    """Refuse a bad output path now, before any cluster starts (removes nothing).

    Returns the state :func:`execute` will find: ``"absent"``,
    ``"incomplete"`` (to resume) or ``"complete"``.
    """
    return _output_state(plan, overwrite, resume, check_only=True).state


def execute(plan: ProcessingPlan, progress: bool = False, overwrite: bool = False,
            resume: bool = True) -> xr.Dataset:
    """Compute ``plan``'s result into its Zarr store and open it.

    Parameters
    ----------
    plan : ProcessingPlan
    progress : bool
        Show a progress bar (``distributed.progress`` with a client, else
        ``dask.diagnostics.ProgressBar``) and say what is resumed.
    overwrite : bool
        Replace whatever is at the output path.
    resume : bool
        Continue an unfinished store written with the same parameters (a
        complete one is returned as it is). A store of other parameters is
        always refused unless ``overwrite``.

    Returns
    -------
    xarray.Dataset
        The store, opened (:func:`sacla_dask.store.open_result`).
    """
    from .live.lock import store_lock

    if plan.out is None:
        return _execute(plan, progress, overwrite, resume)  # (refused there)
    with store_lock(plan.out, what="sacla-dask process"):  # one writer per store
        return _execute(plan, progress, overwrite, resume)


def _execute(plan: ProcessingPlan, progress: bool, overwrite: bool,
             resume: bool) -> xr.Dataset:
    o = _output_state(plan, overwrite, resume)
    out = str(o.plan.out)
    if o.plan.tags_per_chunk != plan.tags_per_chunk:
        _say(progress, f"chunks: {o.plan.n_chunks} x {o.plan.tags_per_chunk} tags (auto: "
                       + ("as the store to resume" if o.state != "absent" else
                          "for the workers running it") + f"; planned {plan.tags_per_chunk})")
    if o.state == "complete":
        _say(progress, f"{out} is already complete (same parameters): nothing to compute")
        return _store.open_result(out)
    if o.state == "absent":
        _store.write_template(out, o.ds, o.names + list(derived(o.plan)),
                              o.plan.tags_per_chunk, o.plan.compression, o.params, o.sha)
        done = np.zeros(o.plan.n_chunks, dtype=bool)
    else:
        done = _store.done_chunks(out, o.plan.n_chunks)
        _say(progress, f"resuming {out}: {int(done.sum())} of {o.plan.n_chunks} tag chunks "
                       "already written")
    return _write(o, out, done, progress)


def _write(o: _Output, out: str, done: np.ndarray, progress: bool) -> xr.Dataset:
    """Compute the missing tag chunks and everything over pairs into the store; finish it."""
    plan, fresh, names = o.plan, o.fresh, o.names
    kept = _kept(plan, fresh)
    arrays = {n: _store.resume_array(out, n, a, done) for n, a in zip(names, kept, strict=True)}
    # correlation only: no polar images are stored, so a resumed run computes those of
    # the finished chunks again (from the raw images) for the pairs; it keeps their
    # written row means and counts
    polar = arrays["polar"] if plan.store_polar else fresh.normalized
    ds = o.ds
    if any(arrays[n] is not a for n, a in zip(names, kept, strict=True)):
        # some chunks are read back from the store: the dataset of those arrays (else the
        # one made of the same arrays already); the halo only with freshly made images
        halo = fresh.halo if polar is fresh.normalized else None
        ds = build_dataset(plan, PolarArrays(polar, arrays["row_mean"],
                                             arrays["nonfinite_bins"], halo))
    flags = derived(plan)
    writes = _store.chunk_writes(out, arrays, ~done, flags)
    # everything else lazy (reductions over pairs...) is recomputed from the polar
    # images and stored by the workers too
    finals = {str(k): v.data for k, v in ds.variables.items()
              if isinstance(v.data, da.Array) and k not in names and k not in flags}
    # the picks of the polar chunks' outputs run inside their consumers (fewer tasks per
    # tag chunk); the graph carries the operator and the correlation plan once (each
    # worker fetches them once): by design, not the "large graph" distributed warns about
    settings: dict[str, Any] = {"delayed_optimize": inline_picks}
    if "distributed" in sys.modules:  # (setting a key of a config not loaded would drop
        # the whole tree on exit, should distributed be imported meanwhile)
        shipped = plan.transform.operator.nbytes + sizeof(plan.correlation_plan())
        settings["distributed.admin.large-graph-warning-threshold"] = max(10 << 20,
                                                                         2 * shipped)
    with dask.config.set(settings):
        _compute([writes, _store.array_writes(out, finals)], progress=progress)
    _record_unreadable(plan, out, _store.read_array(out, "image_ok"))
    _store.finish(out)
    return _store.open_result(out)


def _record_unreadable(plan: ProcessingPlan, out: str, image_ok: np.ndarray | None) -> None:
    """List the tags found unreadable while computing in the store's attrs, and warn.

    (Their reader warnings stay on the workers with a distributed client.)
    """
    if image_ok is None or np.all(image_ok):
        return
    run = plan.run
    bad = run.tags[~np.asarray(image_ok, dtype=bool)]
    paths = run.tag_paths()
    where = {int(t): paths[i] for i, t in enumerate(run.tags)}
    msgs = [f"{where[int(t)]!r} tag {int(t)}: image unreadable (or not finite anywhere "
            "in the band) at read time; left out of every pair" for t in bad]
    a = plan_attrs(plan)
    _store.set_attrs(out, bad_tags=a["bad_tags"] + msgs,
                     bad_tag_numbers=a["bad_tag_numbers"] + [int(t) for t in bad])
    warnings.warn(f"{bad.size} tag(s) could not be read and were left out of every pair: "
                  f"{bad[:10].tolist()}{'...' if bad.size > 10 else ''} (listed in the "
                  f"store's bad_tags attr)", stacklevel=4)


def _say(progress: bool, msg: str) -> None:
    """Tell the user (stderr, next to the progress bar) or the log."""
    if progress:
        print(msg, file=sys.stderr, flush=True)
    else:
        log.info(msg)


def _active_client() -> Any:
    if "distributed" not in sys.modules:  # no client without it (and no import for nothing)
        return None
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def _compute(objs: Sequence[Any], progress: bool = False) -> list[Any]:
    """Compute several collections at once with the active scheduler.

    With a distributed client: futures, ``distributed.progress`` on them
    (a text bar in a terminal, a widget in a notebook), then gather; a
    worker lost meanwhile only makes the scheduler recompute its tasks.
    Otherwise ``dask.compute`` (with ``dask.diagnostics.ProgressBar``).
    """
    client = _active_client()
    if client is not None and dask.config.get("scheduler", None) in (None, "dask.distributed"):
        futs = client.compute(list(objs))
        if progress:
            from distributed import progress as dprogress

            dprogress(futs)
        return list(client.gather(futs))
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar():
            return list(dask.compute(*objs))
    return list(dask.compute(*objs))


__all__ = ["STORE_LAYOUT", "check_output", "execute", "settle_chunks"]
