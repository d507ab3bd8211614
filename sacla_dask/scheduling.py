"""Task priorities, pick inlining and worker memory: what sacla_dask tells Dask about its
graph, and asks of the scheduler that will run it.

Dask orders a graph by its shape (``dask.order``), which for a run's graph
interleaves tag chunks: a worker could start reading chunk 15 while the
write and the correlation of chunk 11, whose polar block it holds, were
ready and waiting, so blocks piled up (three ring-band blocks held at
once where one or two suffice). The layers built inside
:func:`chunk_first` carry a ``priority`` annotation of minus their tag
chunk index, so a worker finishes what an older block feeds before it
starts a newer one, and root tasks (the reads) are handed out in chunk
order. Tasks without one (the fold steps of the pair sums, the final
statistics) keep priority 0 and run as soon as they can, which frees
partial sums early.

A pipeline task that makes several outputs at once (a tag chunk's
normalised polar block, row means and non-finite counts) returns them as a
tuple, and each output becomes a Dask array through a layer of cheap
``getitem`` "pick" tasks (:func:`pick_layer_name`). Those picks are
three scheduler tasks per tag chunk that do no work; :func:`inline_picks`,
the graph optimizer :meth:`ProcessingPlan.execute` computes with, moves each
pick into the tasks that consume it (a wide band's 5050-tag graph: 8995 ->
5206 tasks), keeping every layer's priority annotations.

:func:`memory_per_thread` says how much memory a task thread of the active
scheduler has, which sizes the default tag chunks of a plan
(:func:`sacla_dask.chunking.tags_per_chunk`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import dask

__all__ = ["block_index", "chunk_first", "inline_picks", "memory_per_thread", "pick_layer_name"]

#: name prefix of the layers of pick tasks (:func:`pick_layer_name`)
PICK_PREFIX = "pick-"


def block_index(key: Hashable) -> int:
    """The tag-chunk index of a task key: its first integer after the name (0 if none).

    ``("polar-chunk-<token>", 7, 0, 0)`` -> 7, ``("write-tag-chunk-<token>", 7)`` -> 7,
    ``("write-array-<token>", "bragg_bins", 7, 0)`` -> 7, ``"tag-chunks-written-<token>"`` -> 0.
    """
    if isinstance(key, tuple):
        for part in key[1:]:
            if isinstance(part, int):
                return part
    return 0


@contextlib.contextmanager
def chunk_first(index: Callable[[Hashable], int] = block_index) -> Iterator[None]:
    """Annotate the graph layers built inside with ``priority = -index(key)``.

    Parameters
    ----------
    index : callable
        Maps a task key to the tag chunk it belongs to (default
        :func:`block_index`).
    """
    with dask.annotate(priority=lambda key: -int(index(key))):
        yield


def pick_layer_name(label: str, token: str) -> str:
    """The name of a layer of pick tasks, ``operator.getitem`` of one tuple-valued task
    each: :func:`inline_picks` moves these into their consumers."""
    return f"{PICK_PREFIX}{label}-{token}"


def inline_picks(dsk: Any, keys: Any, **kwargs: Any) -> Any:
    """Dask ``delayed_optimize``: cull, then inline the pick layers' tasks into their consumers.

    Each pick task ``getitem(tuple_task, i)`` not among ``keys`` is removed
    and every task that used it computes it itself (a nested task: a tuple
    index, no copy); the consumers' layers keep their annotations (the
    chunk priorities), their dependencies move to the picked tasks. Use it
    as ``dask.config.set(delayed_optimize=inline_picks)`` around the
    compute of Delayed objects (Dask applies it to their merged graph).
    """
    from dask._task_spec import convert_legacy_graph
    from dask.core import flatten
    from dask.delayed import optimize
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    hlg = optimize(dsk, keys, **kwargs)
    pick_names = {n for n in hlg.layers if isinstance(n, str) and n.startswith(PICK_PREFIX)}
    if not pick_names:
        return hlg
    all_keys = set().union(*(hlg.layers[n].keys() for n in hlg.layers))
    picks: dict[Any, Any] = {}
    for n in pick_names:
        picks.update(convert_legacy_graph(hlg.layers[n], all_keys))
    if picks.keys() & set(flatten(keys)):
        return hlg  # a pick asked for itself stays a task
    # (a culled graph's layers no longer list their dependencies: look at every task)
    layers, deps = {}, {}
    for name, layer in hlg.layers.items():
        if name in pick_names:
            continue
        tasks = convert_legacy_graph(layer, all_keys)
        if any(t.dependencies & picks.keys() for t in tasks.values()):
            layer = MaterializedLayer({k: t.substitute(picks) for k, t in tasks.items()},
                                      annotations=layer.annotations,
                                      collection_annotations=layer.collection_annotations)
        d = set(hlg.dependencies.get(name, ()))
        used = d & pick_names  # where listed: depend on what the picks picked from
        deps[name] = (d - used).union(*(hlg.dependencies.get(u, ()) for u in used))
        layers[name] = layer
    return HighLevelGraph(layers, deps)


def memory_per_thread() -> int | None:
    """Memory of one task thread of the Dask scheduler a computation would use now (bytes).

    With a distributed client (the default one): the smallest
    ``memory_limit / nthreads`` of its workers, or None when that is not
    known (no worker has joined yet, e.g. batch jobs still queued, or the
    workers have no memory limit). With a scheduler in this process
    (threads, processes, sync): this machine's memory over the threads
    Dask would run (``num_workers`` or the CPU count; 1 for ``sync``).
    """
    import os
    import sys

    import dask.base
    import dask.local
    import dask.threaded
    import psutil

    named = dask.config.get("scheduler", None)
    if named in (dask.threaded.get, dask.local.get_sync):
        named = {dask.threaded.get: "threads", dask.local.get_sync: "sync"}[named]
    if "distributed" in sys.modules and named not in _IN_PROCESS:
        # (no client can exist without distributed imported: it is not imported for this)
        sched = dask.base.get_scheduler()
        client = getattr(sched, "__self__", None)
        if client is not None and hasattr(client, "scheduler_info"):
            try:
                workers = client.scheduler_info(n_workers=-1)["workers"].values()
            except Exception:  # noqa: BLE001 - an unreachable scheduler: not known
                return None
            per = [w["memory_limit"] / max(1, int(w.get("nthreads") or 1)) for w in workers
                   if w.get("memory_limit")]
            return int(min(per)) if per else None
        sync = sched is dask.local.get_sync
    else:
        sync = named in ("sync", "synchronous", "single-threaded")
    threads = 1 if sync else int(dask.config.get("num_workers", None) or os.cpu_count() or 1)
    return int(psutil.virtual_memory().total // max(1, threads))


#: names of Dask's schedulers that run in this process
_IN_PROCESS = ("threads", "threading", "sync", "synchronous", "single-threaded", "processes",
               "multiprocessing")

