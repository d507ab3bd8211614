"""Difference angular correlations along phi and their statistics over pairs."""

from .statistics import *  # noqa: F403
from .statistics import (  # noqa: F401
    HeldPairs,
    __all__,  # noqa: F401
    _difference,
    _merge_partials,
    _nanpercentile0,
    _Partial,
    bootstrap_blocks,
    full_lags,
    pair_links,
    pair_order,
)
