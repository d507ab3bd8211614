"""Detector tilt from a ring's ellipse and its refinement (sacla_dask.center.tilt).

The rings are made independently of the formulas under test: rays of one
2-theta cone intersected with the tilted detector plane (pyFAI's rotation
matrix, checked against pyFAI in test_geometry_tilt.py), and the ellipse
through those points fitted by the centre fit's own ellipse fitter.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from sacla_dask.center.circle import _fit_ellipse
from sacla_dask.center.tilt import (
    _two_theta,
    choose_tilt_sign,
    refine_tilt,
    ring_two_theta,
    tilt_from_ellipse,
)
from sacla_dask.errors import GeometryError, NoRingFoundError
from sacla_dask.geometry import Geometry
from sacla_dask.lab import hit, layout_of_geometry

PIX = 5e-5


def ring_points(g: Geometry, tth: float, n: int = 360) -> np.ndarray:
    """(x, y) pixels where the cone of ``tth`` meets the detector of ``g``."""
    phi = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rays = np.stack([np.sin(tth) * np.sin(phi), np.sin(tth) * np.cos(phi),
                     np.full(n, np.cos(tth))], axis=1)
    ss, fs, _, _ = hit(layout_of_geometry(g, (1, 1)).panels[0], rays)
    return np.column_stack([fs, ss])


def ellipse_of(pts: np.ndarray):
    c = np.array([pts[:, 0].mean(), pts[:, 1].mean(), np.ptp(pts[:, 0]) / 2])
    e = _fit_ellipse(pts[:, 0], pts[:, 1], c, "linear", 50.0)
    assert e is not None
    return e


def params(c) -> np.ndarray:
    return np.array([c.distance, c.center_x, c.center_y, c.rot1, c.rot2])


@pytest.mark.parametrize("rot1, rot2, tth", [(0.15, -0.10, 0.25), (-0.05, 0.03, 0.4),
                                             (0.0, 0.2, 0.3), (0.3, 0.0, 0.2),
                                             (-0.02, -0.01, 0.5)])
def test_ellipse_gives_the_tilt_back(rot1, rot2, tth):
    """One of the two mirror solutions is the truth; both put the ring at its 2-theta."""
    g = Geometry(140.3, 120.7, PIX, 0.02, 1.2, rot1=rot1, rot2=rot2)
    pts = ring_points(g, tth)
    e = ellipse_of(pts)
    cands = tilt_from_ellipse((e.center_x, e.center_y), e.semi_major, e.semi_minor, e.angle,
                              PIX, distance=0.02)
    err = [np.abs(params(c) - [0.02, 140.3, 120.7, rot1, rot2]) for c in cands]
    best = err[int(np.argmin([x[1] + x[2] for x in err]))]
    # the ellipse fit is exact here (rms ~1e-12 px): the round trip to 1e-6 px, 1e-9 rad
    assert best[1] < 1e-6 and best[2] < 1e-6 and best[3] < 1e-9 and best[4] < 1e-9
    for c in cands:
        assert c.two_theta == pytest.approx(tth, abs=1e-9)
        assert c.tilt == pytest.approx(math.acos(math.cos(rot1) * math.cos(rot2)), abs=1e-9)
        assert np.abs(_two_theta(params(c), pts[:, 0], pts[:, 1], PIX) - tth).max() < 1e-9
    # the beam spot of the true one is Geometry.beam_center()
    true = cands[int(np.argmin([x[1] + x[2] for x in err]))]
    assert (true.beam_x, true.beam_y) == pytest.approx(g.beam_center(), abs=1e-6)
    # given the 2-theta instead of the distance, the distance comes back
    c2 = tilt_from_ellipse((e.center_x, e.center_y), e.semi_major, e.semi_minor, e.angle,
                           PIX, two_theta=tth)[0]
    assert c2.distance == pytest.approx(0.02, rel=1e-9)


def test_circle_gives_no_tilt():
    cands = tilt_from_ellipse((100.0, 90.0), 80.0, 80.0, 0.3, PIX, distance=0.05)
    for c in cands:
        assert c.rot1 == 0.0 and abs(c.rot2) == 0.0 and c.tilt == 0.0
        assert (c.center_x, c.center_y) == (100.0, 90.0) == (c.beam_x, c.beam_y)
        assert math.tan(c.two_theta) == pytest.approx(80 * PIX / 0.05, rel=1e-12)


def test_refinement_recovers_the_geometry_from_noisy_points():
    """Peak points with 0.05 px noise, start from the ellipse at a 3 % wrong distance."""
    g = Geometry(140.3, 120.7, PIX, 0.02, 1.2, rot1=0.15, rot2=-0.10)
    tth = 0.25
    pts = ring_points(g, tth, 300)
    rng = np.random.default_rng(1)
    noisy = pts + rng.normal(0, 0.05, pts.shape)
    e = ellipse_of(noisy)
    cands = tilt_from_ellipse((e.center_x, e.center_y), e.semi_major, e.semi_minor, e.angle,
                              PIX, distance=0.0206)
    fits = [refine_tilt(noisy, c, tth, PIX) for c in cands]
    # both mirror solutions fit equally well (one ring cannot tell them apart)
    assert fits[0].rms_px == pytest.approx(fits[1].rms_px, rel=0.02)
    f = min(fits, key=lambda r: abs(r.rot1 - 0.15))
    assert f.rms_px == pytest.approx(0.05, rel=0.2)
    truth = dict(distance=0.02, center_x=140.3, center_y=120.7, rot1=0.15, rot2=-0.10)
    for k, v in truth.items():
        assert abs(getattr(f, k) - v) < 4 * f.sigma[k], (k, getattr(f, k), v, f.sigma[k])
        assert f.sigma[k] < {"distance": 2e-4, "rot1": 0.01, "rot2": 0.01}.get(k, 3.0)


def test_brightness_tells_the_mirror_tilts_apart():
    """The ring drawn with each pixel's solid angle: the near side is brighter."""
    g = Geometry(140.3, 120.7, PIX, 0.02, 1.2, rot1=0.15, rot2=-0.10)
    ai = g.to_pyfai((256, 256))
    tth_map = ai.twoThetaArray((256, 256))
    tth = 0.25
    img = 10 + 1000 * np.exp(-0.5 * ((tth_map - tth) / 0.003) ** 2) * ai.solidAngleArray()
    pts = ring_points(g, tth, 200)
    pts = pts[(pts >= 1).all(axis=1) & (pts < 254).all(axis=1)]
    e = ellipse_of(pts)
    cands = tilt_from_ellipse((e.center_x, e.center_y), e.semi_major, e.semi_minor, e.angle,
                              PIX, distance=0.02)
    k, t = choose_tilt_sign(cands, img, pts, PIX)
    assert cands[k].rot1 == pytest.approx(0.15, abs=1e-6) and t > 10, t


def test_bad_input():
    with pytest.raises(GeometryError, match="not reachable"):
        ring_two_theta(20.0, 1.2)
    with pytest.raises(NoRingFoundError, match="at least 8"):
        refine_tilt(np.zeros((3, 2)), tilt_from_ellipse((0, 0), 5, 5, 0, PIX, 0.1)[0], 0.1,
                    PIX)
