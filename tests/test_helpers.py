"""The shared test helpers themselves: a check that never fires would pass every test."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from helpers import raise_if_dask_computes


def test_raise_if_dask_computes_fails_on_a_compute():
    x = da.ones(10, chunks=5)
    with pytest.raises(AssertionError, match="1 computes, at most 0"):
        with raise_if_dask_computes():
            x.sum().compute()


def test_raise_if_dask_computes_allows_graph_building():
    with raise_if_dask_computes() as scheduler:
        y = (da.ones((6, 4), chunks=2) * 2).sum(axis=0)
    assert scheduler.total_computes == 0
    np.testing.assert_array_equal(y.compute(), np.full(4, 12.0))


def test_raise_if_dask_computes_counts_up_to_max_computes():
    x = da.arange(6, chunks=3)
    with raise_if_dask_computes(max_computes=2) as scheduler:
        assert int(x.sum().compute()) == 15
        assert x.persist().shape == (6,)
        assert scheduler.total_computes == 2
        with pytest.raises(AssertionError, match="3 computes, at most 2"):
            x.max().compute()
