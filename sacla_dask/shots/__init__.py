"""Shots as SACLA records them: event fields, selection, groups and photon units.

- :mod:`~sacla_dask.shots.fields`: the run's per-tag event fields, named by
  their variable name, the last component of their HDF5 path or the path
  itself (:func:`event_fields`, :func:`resolve_field`), and their summary
  for ``sacla-dask info`` (:func:`field_summaries`).
- :mod:`~sacla_dask.shots.select`: a safe expression over event fields
  (``0.5 < delay_mm <= 2 and laser_pulse_selector_status == 1``), parsed
  with :mod:`ast` and a whitelist of node types, never ``eval``
  (:func:`parse_selection`, :func:`select_by_events`).
- :mod:`~sacla_dask.shots.groups`: shots grouped by an event field (its
  distinct values, or bins of it), pairs within each group only, and the
  statistics of each group from one pass over the polar images
  (:func:`shot_groups`, :func:`grouped_pairs`).
- :mod:`~sacla_dask.shots.units`: detector units to photons per pixel
  (:func:`photon_factors`).
"""

from .fields import EventField, event_fields, field_summaries, resolve_field
from .select import Selection, parse_selection, select_by_events

__all__ = ["EventField", "Selection", "event_fields", "field_summaries", "parse_selection",
           "resolve_field", "select_by_events"]
