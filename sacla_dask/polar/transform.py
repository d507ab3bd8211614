"""The user-facing polar step of one q band: grid and operator made once, applied to images."""

from __future__ import annotations

import warnings
from typing import cast

import numpy as np

from ..geometry import Geometry
from ..lab import DetectorLayout
from .build import Method, build_operator
from .grid import make_grid
from .operator import apply_polar

__all__ = ["PolarTransform"]


class PolarTransform:
    """Geometry, grid and operator for one q band: the polar step, precomputed once.

    Parameters
    ----------
    geometry : Geometry
        Beam centre and distances.
    image_shape : (ny, nx)
        Detector image shape in pixels.
    qmin, qmax : float
        Band limits in inverse Angstrom.
    nphi, nq : int, optional
        Grid size; defaults one pixel of arc at the outer radius, one bin
        per pixel of radius.
    mask : ndarray, optional
        User pixel mask (1 = good).
    method : {"nearest", "bilinear", "splitting"}
        Interpolation (see :mod:`sacla_dask.polar.build`).
    fast_nphi : bool
        Round the default nphi up to an FFT-friendly length (default True;
        an ``nphi`` given is used as it is).
    solid_angle : bool
        Correct for the pixels' relative solid angle (pyFAI's convention).
    polarization : float, optional
        Correct for polarisation with this factor in ``[-1, 1]`` (pyFAI's
        ``polarization_factor``; 0.99 or so at an XFEL, horizontal = +x).
    subdivision : int
        Samples per pixel length of ``splitting``.
    min_coverage : float
        Least fraction of a bin's weight on good pixels for it to be good.
    layout : DetectorLayout, optional
        Separate panels in a stacked image (:mod:`sacla_dask.crystfel`):
        the geometry then gives only the grid's units and the wavelength.
    """

    def __init__(
        self,
        geometry: Geometry,
        image_shape: tuple[int, int],
        qmin: float,
        qmax: float,
        *,
        nphi: int | None = None,
        nq: int | None = None,
        mask: np.ndarray | None = None,
        method: Method = "nearest",
        fast_nphi: bool = True,
        solid_angle: bool = False,
        polarization: float | None = None,
        subdivision: int = 4,
        min_coverage: float = 0.5,
        layout: DetectorLayout | None = None,
    ) -> None:
        self.geometry = geometry
        self.image_shape = cast(tuple[int, int], tuple(int(s) for s in image_shape))
        self.qmin = float(qmin)
        self.qmax = float(qmax)
        self.method = method
        self.fast_nphi = bool(fast_nphi)
        self.solid_angle = bool(solid_angle)
        self.polarization = None if polarization is None else float(polarization)
        self.layout = layout
        self.grid = make_grid(geometry, qmin, qmax, nphi=nphi, nq=nq, fast_nphi=fast_nphi)
        self.operator = build_operator(geometry, self.grid, self.image_shape, mask, method,
                                       min_coverage, solid_angle=solid_angle,
                                       polarization=polarization, subdivision=subdivision,
                                       layout=layout)
        empty = ~self.operator.polar_mask.any(axis=1)
        if empty.any():
            r = self.grid.radius[empty]
            warnings.warn(
                f"{int(empty.sum())} of {empty.size} q rows of the band (radius "
                f"{r.min():.1f}..{r.max():.1f} px) have no good pixel: off the "
                f"{self.image_shape[0]}x{self.image_shape[1]} detector or masked; they stay "
                "0 in the polar images and the correlation", stacklevel=2)

    # convenient views
    @property
    def q(self) -> np.ndarray:
        return self.grid.q

    @property
    def radius(self) -> np.ndarray:
        return self.grid.radius

    @property
    def phi(self) -> np.ndarray:
        return self.grid.phi

    @property
    def shape(self) -> tuple[int, int]:
        return self.grid.shape

    @property
    def nphi(self) -> int:
        return self.grid.phi.size

    @property
    def window(self) -> tuple[slice, slice]:
        return self.operator.window

    @property
    def polar_mask(self) -> np.ndarray:
        return self.operator.polar_mask

    @property
    def coverage(self) -> np.ndarray:
        cov = self.operator.coverage
        assert cov is not None  # (only an operator made for the workers has none)
        return cov

    def __call__(self, images: np.ndarray, window: bool = False) -> np.ndarray:
        """Polar intensities (not normalised) of full images, or of windows."""
        imgs = np.asarray(images)
        single = imgs.ndim == 2
        if single:
            imgs = imgs[None]
        if not window:
            imgs = imgs[(slice(None),) + self.window]
        out, _ = apply_polar(imgs, self.operator)
        return out[0] if single else out

    def __repr__(self) -> str:
        r = self.radius
        corr = "" if self.operator.corrections == "none" else f" {self.operator.corrections}"
        return (
            f"<PolarTransform {self.method}{corr} q={self.qmin:g}..{self.qmax:g} 1/A "
            f"(r={r[0]:.1f}..{r[-1]:.1f} px) grid {self.shape[0]}x{self.shape[1]} "
            f"window {self.operator.window_shape} operator {self.operator.nbytes / 2**20:.1f} MiB>"
        )
