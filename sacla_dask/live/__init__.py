"""Following a run live, while it is being taken: ``sacla-dask follow``.

What lives where:

:mod:`~sacla_dask.live.source`
    Where the data comes from: the :class:`Source` interface (``poll()``:
    the :class:`Block` of tags that arrived since the last poll, each able
    to read its images), :class:`DirectorySource` (DataConvert files
    arriving in a folder), :class:`SWMRFileSource` (one HDF5 file that a
    writer appends to) and :func:`open_source`.
:mod:`~sacla_dask.live.follow`
    :class:`Follower`: each new block read, transformed and folded into the
    running pair sums with the kernels of ``process``; the store grown and
    its correlation updated after each block; :func:`follow` runs it until
    no data arrives for ``idle_timeout`` seconds.
:mod:`~sacla_dask.live.growing`
    The growing store: its layout, appends along ``tag`` and ``pair``, the
    atomically replaced running state, and :func:`open_live`.
:mod:`~sacla_dask.live.lock`
    One writer per store (:func:`store_lock`, ``fcntl.flock``).
:mod:`~sacla_dask.live.page`
    The live page (a Bokeh server).
:mod:`~sacla_dask.live.synth`
    A synthetic run written block by block into a folder, as it arrives at
    the beamline.

See ``docs/live.md``.
"""

from .lock import StoreLockedError, store_lock
from .source import Block, DirectorySource, FileBlock, Source, SWMRFileSource, open_source

__all__ = ["Block", "DirectorySource", "FileBlock", "SWMRFileSource", "Source",
           "StoreLockedError", "open_source", "store_lock"]
