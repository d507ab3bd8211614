"""Shared fixtures: small synthetic runs with known truth, and the real data path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from sacla_dask.io.synthetic import SyntheticTruth, write_synthetic_run

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_file(*parts: str) -> Path:
    """Path of a file in ../shared/data, skipping the test when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data {p} not available (../shared absent)")
    return p


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> SyntheticTruth:
    """40 tags (5 dark) of 128x128 images, rings at r = 20 and 40 px, n = 6 modulation."""
    path = tmp_path_factory.mktemp("runs") / "small_run.h5"
    return write_synthetic_run(path, n_tags=40, n_dark=5, shape=(128, 128),
                               center=(66.3, 61.7), ring_radii=(20.0, 40.0), ring_width=1.5,
                               modulation_order=6, modulation_amplitude=0.3, seed=1)


@pytest.fixture(scope="session")
def small_mask(small_run: SyntheticTruth) -> np.ndarray:
    """A panel-gap mask for ``small_run`` (True = good)."""
    from sacla_dask.io.synthetic import panel_mask

    return panel_mask(small_run.shape, gap=4, edge=1)


@pytest.fixture
def small_params(small_run: SyntheticTruth) -> dict:
    """plan_run keyword arguments for the band around the outer ring of ``small_run``."""
    g = small_run.geometry
    return dict(qmin=float(g.radius_to_q(34.0)), qmax=float(g.radius_to_q(46.0)),
                center=(small_run.center_x, small_run.center_y),
                pixel_size=small_run.pixel_size, distance=small_run.distance)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
