"""From correlations to structure: C(psi), Legendre coefficients B_l, predicted Bragg-pair angles.

The detector sees two scattering vectors at an azimuth difference ``dphi``;
a scientist interprets the 3-D angle ``psi`` between them and the Legendre
expansion of the correlation over ``psi`` (Kam's ``B_l(q, q')``), where
structure determination from fluctuation scattering starts. At large q the
Ewald sphere's curvature moves the peaks: for gold 111 at 1.24 A the 111-111
interplanar angles 70.53 and 109.47 deg appear at ``dphi`` = 73.5 and 115.6
deg on the detector.

What lives where:

:mod:`~sacla_dask.structure.kernels`
    Pure numpy: the Ewald mapping (:func:`bragg_angle`, :func:`cos_psi`,
    :func:`psi_of_dphi`, :func:`dphi_of_psi`, :func:`psi_range`),
    :func:`fold_halves` and :func:`resample_row` (one row from ``dphi`` to
    ``psi``), :func:`legendre_design`, :func:`fit_legendre` (weighted least
    squares, errors, variance inflation) and :func:`legendre_sum`.
:mod:`~sacla_dask.structure.lattice`
    Lattices (sc, bcc, fcc, hexagonal, hcp), allowed reflections,
    symmetry-equivalent vectors.
:mod:`~sacla_dask.structure.angles`
    :func:`predicted_angles`: the ``psi`` and ``dphi`` of Bragg-pair peaks.
:mod:`~sacla_dask.structure.compute`
    The store layer: :func:`compute_structure`, :func:`add_structure`
    (``sacla-dask structure STORE``), :func:`bl_series`.
:mod:`~sacla_dask.structure.plot`
    Figures of ``corr_psi`` and ``bl``, and predicted angles marked on any
    correlation figure.

See ``docs/structure.md`` for the method: the resampling, the fit and its
errors, the coverage flag, the row normalisation's constant and odd l.
"""

from .angles import angles_between, predicted_angles
from .compute import (
    DEFAULT_LMAX,
    DEFAULT_MAX_VIF,
    DEFAULT_SKIP_LAGS,
    add_structure,
    bl_series,
    compute_structure,
    structure_variables,
)
from .kernels import (
    LegendreFit,
    bragg_angle,
    cos_psi,
    dphi_of_psi,
    fit_legendre,
    fold_halves,
    legendre_design,
    legendre_sum,
    psi_of_dphi,
    psi_range,
    resample_row,
    variance_inflation,
)
from .lattice import allowed, equivalents, reciprocal_basis, reflection_q, reflections_in_band

__all__ = [
    "DEFAULT_LMAX",
    "DEFAULT_MAX_VIF",
    "DEFAULT_SKIP_LAGS",
    "LegendreFit",
    "add_structure",
    "allowed",
    "angles_between",
    "bl_series",
    "bragg_angle",
    "compute_structure",
    "cos_psi",
    "dphi_of_psi",
    "equivalents",
    "fit_legendre",
    "fold_halves",
    "legendre_design",
    "legendre_sum",
    "predicted_angles",
    "psi_of_dphi",
    "psi_range",
    "reciprocal_basis",
    "reflection_q",
    "reflections_in_band",
    "resample_row",
    "structure_variables",
    "variance_inflation",
]
