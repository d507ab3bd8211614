"""Geometry conversions against analytic values, and their error messages."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sacla_dask.errors import GeometryError, ParameterError
from sacla_dask.geometry import (
    Geometry,
    default_nphi,
    energy_to_wavelength,
    read_geometry_file,
    write_geometry_file,
)

G = Geometry(1200.0, 1199.5, 50e-6, 0.053, 1.44)


def test_q_of_radius_matches_bragg_by_hand():
    # r = 765 px -> 2theta = atan(765*50e-6/0.053); q = 4 pi/lambda sin(theta)
    tth = math.atan(765 * 50e-6 / 0.053)
    assert G.radius_to_q(765) == pytest.approx(4 * math.pi / 1.44 * math.sin(tth / 2), rel=1e-14)
    # the tutorial's gold 111 ring at q ~ 2.67 1/A sits near r ~ 765 px
    assert 740 < G.q_to_radius(2.67) < 790


@given(st.floats(0, 3000))
def test_radius_q_round_trip(r):
    assert G.q_to_radius(G.radius_to_q(r)) == pytest.approx(r, abs=1e-7)


@given(st.floats(0.01, 5), st.floats(0.02, 5))
def test_q_monotonic_in_radius(r, dr):
    assert G.radius_to_q(r + dr) > G.radius_to_q(r)


def test_energy_to_wavelength():
    assert energy_to_wavelength(12398.419843320026) == pytest.approx(1.0)
    assert energy_to_wavelength(8600) == pytest.approx(1.44167, rel=1e-4)
    with pytest.raises(ParameterError, match="photon energy"):
        energy_to_wavelength(0)
    with pytest.raises(ParameterError, match="photon energy"):
        energy_to_wavelength(-5)


@pytest.mark.parametrize("field,value,msg", [
    ("wavelength", 0, "wavelength must be positive"),
    ("wavelength", -1.0, "wavelength must be positive"),
    ("distance", 0, "distance must be positive"),
    ("pixel_size", float("nan"), "pixel_size must be positive"),
    ("center_x", float("inf"), "center_x must be finite"),
])
def test_bad_geometry_named(field, value, msg):
    kw = dict(center_x=1, center_y=1, pixel_size=5e-5, distance=0.05, wavelength=1.4)
    kw[field] = value
    with pytest.raises(ParameterError, match=msg):
        Geometry(**kw)


def test_unreachable_q_named():
    with pytest.raises(GeometryError, match="not reachable"):
        G.q_to_radius(100.0)


def test_centre_off_detector():
    with pytest.raises(GeometryError, match="off the 100x200 detector"):
        G.replace(center_x=250).check_on_detector((100, 200))
    G.replace(center_x=10, center_y=10).check_on_detector((100, 200))


def test_default_nphi_one_pixel_of_arc():
    assert default_nphi(765, fast=False) == math.ceil(2 * math.pi * 765)
    n = default_nphi(765)
    assert n == default_nphi(765, fast=True)
    assert default_nphi(765, fast=False) <= n <= 1.02 * default_nphi(765, fast=False)
    # fast length has only small prime factors
    m = n
    for p in (2, 3, 5):
        while m % p == 0:
            m //= p
    assert m == 1
    with pytest.raises(ParameterError):
        default_nphi(0)


def test_geometry_yaml_round_trip(tmp_path):
    p = tmp_path / "geom.yaml"
    write_geometry_file(p, {"center_x": np.float64(1.5), "center_y": 2.5, "pixel_size": 5e-5,
                            "distance": 0.05, "wavelength": 1.4, "mask": "mask.npy"})
    g = read_geometry_file(p)
    assert g["center_x"] == 1.5 and g["distance"] == 0.05
    assert g["mask"] == str(tmp_path / "mask.npy")
    (tmp_path / "bad.yaml").write_text("center_x: 1\ncentre_y: 2\n")
    with pytest.raises(ParameterError, match="unknown keys \\['centre_y'\\]"):
        read_geometry_file(tmp_path / "bad.yaml")
