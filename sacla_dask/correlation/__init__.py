"""Difference angular correlations along phi and their statistics over pairs.

What lives where:

:mod:`~sacla_dask.correlation.plan`
    :class:`CorrelationPlan` (the correlated rows and the mask
    normalisation shipped to the workers), :func:`make_plan`,
    :func:`parse_q_pairs`.
:mod:`~sacla_dask.correlation.kernels`
    Numpy kernels on one block: pair differences and their FFT correlation
    (:func:`difference_correlation`, :func:`difference_statistic`),
    :func:`correlate_rows`, :func:`fourier_coefficients`,
    :func:`full_lags`, :func:`cross_matrix`, :func:`mask_bragg_spots`.
:mod:`~sacla_dask.correlation.statistics`
    Statistics over pairs: :class:`PairSums` and the pair kernel
    :func:`pair_sums`, :func:`pair_order` and :func:`pair_links`
    (overlapping consecutive pairs), the block bootstrap
    (:func:`bootstrap_blocks`, :func:`bootstrap_weights`),
    :func:`robust_outliers`, :func:`finalize`, and the eager reference
    :func:`summarize_pairs`.
:mod:`~sacla_dask.correlation.graph`
    The Dask graphs: :func:`correlate_pairs` (every pair's correlation) and
    :func:`pair_statistics` (the statistics in one pass, memory independent
    of the number of pairs), with :class:`PairStatisticsOptions`.

The tunable sizes and thresholds are the ``correlation.*`` settings of
:mod:`sacla_dask.config` (``dask.config.set({"sacla_dask.correlation.merge-bytes":
"64MiB"})``), read when a graph is built.
"""

from . import graph, kernels, statistics
from .graph import LazyPairStatistics, PairStatisticsOptions, correlate_pairs, pair_statistics
from .kernels import (
    correlate_rows,
    cross_matrix,
    difference_correlation,
    difference_statistic,
    fourier_coefficients,
    full_lags,
    mask_bragg_spots,
)
from .plan import CorrelationPlan, make_plan, parse_q_pairs
from .statistics import (
    HeldPairs,
    PairSums,
    bootstrap_blocks,
    bootstrap_weights,
    finalize,
    pair_links,
    pair_order,
    pair_sums,
    robust_outliers,
    summarize_pairs,
)

# internals the tests reach by their former path
_difference = kernels._difference
_nanpercentile0 = statistics._nanpercentile0
_merge_partials = graph._merge_partials
_Partial = graph._Partial

__all__ = [
    "CorrelationPlan", "HeldPairs", "LazyPairStatistics", "PairStatisticsOptions", "PairSums",
    "bootstrap_blocks", "bootstrap_weights", "correlate_pairs", "correlate_rows",
    "cross_matrix", "difference_correlation", "difference_statistic", "finalize",
    "fourier_coefficients", "full_lags", "make_plan", "mask_bragg_spots", "pair_links",
    "pair_order", "pair_statistics", "pair_sums", "parse_q_pairs", "robust_outliers",
    "summarize_pairs",
]
