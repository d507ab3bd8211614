"""The plan as immutable data: option specs, flat keywords, new plans by replacement."""

from __future__ import annotations

import dataclasses

import pytest

from sacla_dask.engine import Engine
from sacla_dask.errors import ParameterError
from sacla_dask.geometry import GeometrySpec, resolve_geometry
from sacla_dask.plan import (
    OutputSpec,
    PairingSpec,
    PolarSpec,
    ShotSpec,
    StatisticsSpec,
    plan_run,
)


def _specs(p: dict) -> dict:
    return dict(geometry=GeometrySpec(p["center"], p["pixel_size"], p["distance"]),
                polar=PolarSpec(p["qmin"], p["qmax"], method="bilinear"),
                pairing=PairingSpec(overlapping=False, q_pairs="0:1"),
                statistics=StatisticsSpec(bootstrap=3),
                output=OutputSpec(chunks=6, store_polar=False),
                shots=ShotSpec(skip_first=2))


def test_specs_and_flat_keywords_make_the_same_plan(small_run, small_params):
    a = plan_run(small_run.path, **_specs(small_params))
    b = plan_run(small_run.path, method="bilinear", overlapping=False, q_pairs="0:1",
                 bootstrap=3, chunks=6, store_polar=False, skip_first=2, **small_params)
    assert repr(a) == repr(b)
    assert a.attrs() == b.attrs() and a.correlation_attrs() == b.correlation_attrs()
    assert a.tags_per_chunk == 6 and not a.store_polar and a.bootstrap == 3
    assert a.pairing == "consecutive" and a.q_pairs.tolist() == [[0, 1]]


def test_plan_is_immutable_and_replaced(small_run, small_params):
    plan = plan_run(small_run.path, **small_params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.tags_per_chunk = 3  # type: ignore[misc]
    engine = Engine("threads", 2, "test")
    other = plan.with_engine(engine)
    assert other is not plan and other.engine is engine and plan.engine is None
    assert "engine     : threads" in repr(other) and "engine" not in repr(plan)
    assert other.transform is plan.transform


def test_plan_run_refuses_unclear_options(small_run, small_params):
    with pytest.raises(TypeError, match="'qmni'"):
        plan_run(small_run.path, qmni=1.0, **small_params)
    with pytest.raises(ParameterError, match="bootstrap either in statistics="):
        plan_run(small_run.path, statistics=StatisticsSpec(), bootstrap=2, **small_params)
    with pytest.raises(ParameterError,
                       match="give center, distance, pixel_size either in geometry="):
        plan_run(small_run.path, geometry=GeometrySpec((1, 2), 5e-5, 0.05),
                 **small_params)
    p = {k: v for k, v in small_params.items() if k != "qmin"}
    with pytest.raises(TypeError, match="'qmin'"):
        plan_run(small_run.path, **p)
    with pytest.raises(ParameterError, match="statistics must be a StatisticsSpec"):
        plan_run(small_run.path, statistics={"bootstrap": 2}, **small_params)
    with pytest.raises(ParameterError, match="ci_level must lie in"):
        StatisticsSpec(ci_level=1.5)
    with pytest.raises(ParameterError, match="pairing must be one of"):
        PairingSpec(pairing="random")


def test_resolve_geometry_flags_over_the_file(tmp_path):
    f = tmp_path / "g.yaml"
    f.write_text("center_x: 10\ncenter_y: 20\npixel_size: 5.0e-5\ndistance: 0.05\n"
                 "mask: m.npy\n")
    geo, mask = resolve_geometry(f, distance=0.06)
    assert geo == GeometrySpec((10, 20), 5e-5, 0.06, None)
    assert mask == str(tmp_path / "m.npy")
    with pytest.raises(ParameterError, match="missing --center, --distance"):
        resolve_geometry(None, pixel_size=5e-5)
