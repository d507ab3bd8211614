"""The per-tag event fields of a run, by every name a user may give them.

A field of ``Run.events`` (``pulse_selector``, ``photon_energy``, a delay
stage...) may be named by its variable name, by the last component of its
HDF5 path (``xfel_pulse_selector_status``), by its path under
``event_info`` (``bl_3/eh_1/xfel_pulse_selector_status``) or by its full
path (``/run_178884/event_info/bl_3/eh_1/xfel_pulse_selector_status``).
``tag`` and ``run`` are fields too. A name that fits two fields is
ambiguous; an unknown or ambiguous name is a
:class:`~sacla_dask.errors.ParameterError` that lists the fields.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from ..errors import ParameterError
from ..io.run import Run

#: per-tag variables of ``Run.events`` that are not event data of the file
NOT_EVENT_DATA = ("bright", "selected", "source", "shot_group")


@dataclasses.dataclass(frozen=True)
class EventField:
    """One per-tag event field.

    Attributes
    ----------
    name : str
        Its variable name in ``Run.events`` (and in the result store).
    path : str
        Its HDF5 path (``""`` for ``tag`` and ``run``).
    names : tuple of str
        Every name it may be given.
    """

    name: str
    path: str
    names: tuple[str, ...]


def _relative(path: str) -> str:
    """The path under ``event_info`` (the path itself when it has none)."""
    m = re.search(r"/event_info/(.+)$", path)
    return m.group(1) if m else path.lstrip("/")


def event_fields(run: Run) -> list[EventField]:
    """The run's event fields (``tag``, ``run`` and every event_info dataset)."""
    out = [EventField("tag", "", ("tag",)), EventField("run", "", ("run",))]
    for name in run.events.data_vars:
        name = str(name)
        if name in NOT_EVENT_DATA or name == "run":
            continue
        path = str(run.events[name].attrs.get("hdf5_path", ""))
        names = [name]
        if path:
            rel = _relative(path)
            names += [rel.rsplit("/", 1)[-1], rel, "/" + rel, path]
        out.append(EventField(name, path, tuple(dict.fromkeys(names))))
    return out


def field_list(fields: list[EventField]) -> str:
    """The fields as a user reads them in an error message."""
    return ", ".join(f"{f.name} ({_relative(f.path)})" if f.path and
                     _relative(f.path).rsplit("/", 1)[-1] != f.name else f.name
                     for f in fields)


def resolve_field(fields: list[EventField], name: str, parameter: str = "select") -> EventField:
    """The field called ``name``.

    Raises
    ------
    ParameterError
        Naming ``parameter``, when no field or more than one has that name
        (the message lists the fields).
    """
    found = [f for f in fields if name in f.names]
    if not found:
        raise ParameterError(f"{parameter}: no event field {name!r} in the run; its fields "
                             f"are: {field_list(fields)}")
    if len(found) > 1:
        raise ParameterError(f"{parameter}: the event field name {name!r} is ambiguous: it "
                             "names " + ", ".join(repr(f.path or f.name) for f in found)
                             + "; give the path")
    return found[0]


def field_values(run: Run, field: EventField) -> np.ndarray:
    """The field's per-tag values (``tag``: the tag numbers)."""
    if field.name == "tag":
        return np.asarray(run.tags)
    return np.asarray(run.events[field.name].values)


def summarize(values: np.ndarray, max_distinct: int = 8) -> str:
    """Range, or distinct values with their counts when there are few."""
    v = np.asarray(values)
    finite = v[np.isfinite(v)] if v.dtype.kind == "f" else v
    missing = f", {v.size - finite.size} missing (NaN)" if finite.size < v.size else ""
    if finite.size == 0:
        return "no values" + missing
    uniq, counts = np.unique(finite, return_counts=True)
    if uniq.size <= max_distinct:
        return ("values " + ", ".join(f"{x:g} (x{c})" for x, c in zip(uniq, counts,
                                                                      strict=True)) + missing)
    return (f"{finite.min():g} .. {finite.max():g}, mean {finite.mean():g}, {uniq.size} "
            f"distinct{missing}")


def field_summaries(run: Run) -> list[str]:
    """One line per event field of the run: name, HDF5 path, dtype, range or values.

    Over the tags with images; for ``sacla-dask info``.
    """
    lines = []
    for f in event_fields(run):
        if f.name in ("tag", "run"):
            continue
        var = run.all_events[f.name] if f.name in run.all_events else run.events[f.name]
        units = str(var.attrs.get("units") or run.events[f.name].attrs.get("units") or "")
        vals = np.asarray(run.events[f.name].values)
        text = summarize(vals) + (f" {units}" if units else "")
        lines.append(f"{f.name} [{f.path}] {var.dtype}: {text}")
    return lines


__all__ = ["EventField", "event_fields", "field_list", "field_summaries", "field_values",
           "resolve_field", "summarize"]
