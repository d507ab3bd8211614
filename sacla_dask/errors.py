"""Exception classes raised by sacla_dask.

This module owns the error vocabulary of the package. Every user-facing
failure (bad file, bad parameter, bad mask, unfinished store...) raises a
subclass of :class:`SaclaDaskError` whose message names the file, tag or
parameter at fault, so that the CLI can print it without a traceback.
"""

from __future__ import annotations


class SaclaDaskError(Exception):
    """Base class of every error that is the user's input, not a bug."""


class RunFileError(SaclaDaskError):
    """A run file is missing, unreadable, truncated or not HDF5."""


class LayoutError(RunFileError):
    """An HDF5 file does not have the SACLA DataConvert layout."""


class BadTagError(RunFileError):
    """A tag's detector dataset is missing, damaged, or of the wrong shape/dtype."""


class ParameterError(SaclaDaskError, ValueError):
    """A parameter (geometry, q band, nphi, chunk size...) is out of range."""


class GeometryError(ParameterError):
    """The experiment geometry is inconsistent with the detector image."""


class MaskError(ParameterError):
    """A user mask has the wrong shape or is not boolean / 0-1."""


class PairingError(SaclaDaskError):
    """Shot pairs cannot be formed (too few bright shots, bad pairs file...)."""


class NoRingFoundError(SaclaDaskError):
    """Centre finding could not find a powder ring."""


class OutputError(SaclaDaskError):
    """The output path exists and holds something else, or is not writable."""


class IncompleteStoreError(SaclaDaskError):
    """A result store was opened that is not marked complete."""
