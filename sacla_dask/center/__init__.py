"""Beam centre and ring geometry (being split into modules)."""

from .circle import *  # noqa: F403
from .circle import __all__, _check_guess  # noqa: F401
