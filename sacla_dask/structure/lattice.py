"""Crystal lattices: reflections, their symmetry-equivalent vectors, and the angles between them.

Pure numpy. Lattices (``lattice`` argument):

``"sc"`` (also ``"simple cubic"``, ``"cubic"``)
    every ``hkl`` allowed.
``"bcc"``
    ``h + k + l`` even.
``"fcc"``
    ``h, k, l`` unmixed (all even or all odd).
``"hexagonal"``
    simple hexagonal (``a``, ``c``, gamma = 120 deg), every ``hkl`` allowed.
``"hcp"``
    hexagonal close packed: ``hkl`` with ``l`` odd and ``h + 2k`` a
    multiple of 3 are extinct.

Reflections are Miller indices ``(h, k, l)`` of the conventional cell (for
the hexagonal lattices the three-index form, ``i = -h - k`` implied), or
strings such as ``"111"``, ``"1 1 1"``, ``"-1 0 2"``. Vectors are in inverse
Angstrom with the crystallographer's ``2 pi``: ``|q| = 2 pi / d``.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import ParameterError

__all__ = [
    "LATTICES",
    "allowed",
    "equivalents",
    "parse_reflection",
    "parse_reflections",
    "reciprocal_basis",
    "reflection_label",
    "reflection_q",
    "reflections_in_band",
]

#: accepted names -> canonical lattice name
LATTICES: dict[str, str] = {
    "sc": "sc", "cubic": "sc", "simple cubic": "sc", "simple_cubic": "sc", "pc": "sc",
    "bcc": "bcc", "fcc": "fcc",
    "hexagonal": "hexagonal", "hex": "hexagonal", "hcp": "hcp",
}

_HEXAGONAL = ("hexagonal", "hcp")


def lattice_name(lattice: str) -> str:
    """The canonical name of a lattice (see :data:`LATTICES`)."""
    key = str(lattice).strip().lower()
    if key not in LATTICES:
        raise ParameterError(f"lattice must be one of sc, bcc, fcc, hexagonal, hcp "
                             f"(got {lattice!r})")
    return LATTICES[key]


def _constants(lattice: str, a: float, c: float | None) -> tuple[str, float, float | None]:
    name = lattice_name(lattice)
    try:
        av = float(a)
    except (TypeError, ValueError):
        raise ParameterError(f"a must be a lattice constant in Angstrom (got {a!r})") from None
    if not (math.isfinite(av) and av > 0):
        raise ParameterError(f"a must be a positive lattice constant in Angstrom (got {a!r})")
    cv = None
    if name in _HEXAGONAL:
        if c is None:
            raise ParameterError(f"the {name} lattice needs c, its c axis in Angstrom")
        try:
            cv = float(c)
        except (TypeError, ValueError):
            raise ParameterError(f"c must be a lattice constant in Angstrom (got {c!r})") from None
        if not (math.isfinite(cv) and cv > 0):
            raise ParameterError(f"c must be a positive lattice constant in Angstrom (got {c!r})")
    return name, av, cv


def reciprocal_basis(lattice: str, a: float, c: float | None = None) -> np.ndarray:
    """Rows ``b1, b2, b3`` of the reciprocal basis in 1/A (``b_i . a_j = 2 pi delta_ij``).

    Cubic lattices use the conventional cubic cell (``a`` along x, y, z);
    hexagonal ones ``a1 = a (1, 0, 0)``, ``a2 = a (-1/2, sqrt(3)/2, 0)``,
    ``a3 = c (0, 0, 1)``.
    """
    name, av, cv = _constants(lattice, a, c)
    if name in _HEXAGONAL:
        assert cv is not None
        real = np.array([[av, 0.0, 0.0], [-av / 2, av * math.sqrt(3) / 2, 0.0], [0.0, 0.0, cv]])
    else:
        real = av * np.eye(3)
    return 2 * math.pi * np.linalg.inv(real).T


def parse_reflection(value: Any) -> tuple[int, int, int]:
    """Miller indices from ``(h, k, l)`` or a string such as ``"111"`` or ``"-1 0 2"``."""
    if isinstance(value, str):
        text = value.strip().strip("()[]{}")
        parts = re.findall(r"-?\d+", text) if re.search(r"[\s,]", text) else \
            re.findall(r"-?\d", text)
        idx = [int(p) for p in parts]
    else:
        try:
            idx = [int(v) for v in value]
            if any(float(v) != int(v) for v in value):
                raise ValueError
        except (TypeError, ValueError):
            raise ParameterError(f"a reflection must be three integers h k l (got {value!r})"
                                 ) from None
    if len(idx) != 3:
        raise ParameterError(f"a reflection must be three integers h k l (got {value!r})")
    if idx == [0, 0, 0]:
        raise ParameterError("reflection 000 is the direct beam, not a reflection")
    return (idx[0], idx[1], idx[2])


def parse_reflections(values: Any) -> list[tuple[int, int, int]]:
    """A list of reflections from one (``"111"``, ``(1, 1, 1)``) or several (``"111,200"``)."""
    if isinstance(values, str):
        items: Iterable[Any] = [v for v in re.split(r"[,;]", values) if v.strip()]
    elif (isinstance(values, Sequence) and len(values) == 3
          and all(isinstance(v, (int, np.integer)) for v in values)):
        items = [values]
    else:
        items = list(values)
    out = [parse_reflection(v) for v in items]
    if not out:
        raise ParameterError("reflections is empty: give at least one hkl, e.g. '111'")
    return out


def reflection_label(hkl: Sequence[int]) -> str:
    """``"111"``, ``"200"``, or ``"1 -1 10"`` when an index is negative or above 9."""
    if all(0 <= int(v) <= 9 for v in hkl):
        return "".join(str(int(v)) for v in hkl)
    return " ".join(str(int(v)) for v in hkl)


def allowed(lattice: str, hkl: Sequence[int]) -> bool:
    """Whether the lattice's centring (or the hcp structure factor) lets ``hkl`` reflect."""
    name = lattice_name(lattice)
    h, k, l = (int(v) for v in hkl)  # noqa: E741
    if (h, k, l) == (0, 0, 0):
        return False
    if name == "fcc":
        return len({h % 2, k % 2, l % 2}) == 1
    if name == "bcc":
        return (h + k + l) % 2 == 0
    if name == "hcp":
        return not (l % 2 == 1 and (h + 2 * k) % 3 == 0)
    return True


def _why_forbidden(name: str) -> str:
    return {"fcc": "fcc needs h, k, l unmixed (all even or all odd)",
            "bcc": "bcc needs h + k + l even",
            "hcp": "hcp forbids l odd with h + 2k a multiple of 3"}.get(name, "")


def check_allowed(lattice: str, hkl: Sequence[int]) -> None:
    """Raise :class:`ParameterError` naming the rule if ``hkl`` is forbidden."""
    name = lattice_name(lattice)
    if not allowed(name, hkl):
        raise ParameterError(f"reflection {reflection_label(hkl)} is forbidden for the {name} "
                             f"lattice ({_why_forbidden(name)}); check reflections")


def equivalents(lattice: str, hkl: Sequence[int]) -> np.ndarray:
    """The symmetry-equivalent Miller indices of ``hkl`` (Laue class), Friedel mates included.

    Cubic: every permutation and sign change (m-3m, up to 48); hexagonal:
    the permutations of ``(h, k, i = -h - k)``, their common sign, and the
    sign of ``l`` (6/mmm, up to 24). Returns an int array (n, 3) of distinct
    rows.
    """
    name = lattice_name(lattice)
    h, k, l = (int(v) for v in hkl)  # noqa: E741
    out: set[tuple[int, int, int]] = set()
    if name in _HEXAGONAL:
        i = -h - k
        for p in itertools.permutations((h, k, i)):
            for s in (1, -1):
                for sl in (1, -1):
                    out.add((s * p[0], s * p[1], sl * l))
    else:
        for p in itertools.permutations((h, k, l)):
            for signs in itertools.product((1, -1), repeat=3):
                out.add((signs[0] * p[0], signs[1] * p[1], signs[2] * p[2]))
    return np.array(sorted(out), dtype=int)


def reflection_q(lattice: str, a: float, hkl: Sequence[int], c: float | None = None) -> float:
    """``|q| = 2 pi / d`` of a reflection, inverse Angstrom."""
    b = reciprocal_basis(lattice, a, c)
    return float(np.linalg.norm(np.asarray(hkl, dtype=float) @ b))


def reflections_in_band(lattice: str, a: float, qmin: float, qmax: float,
                        c: float | None = None, max_index: int = 6
                        ) -> list[tuple[int, int, int]]:
    """One representative ``hkl`` of each allowed family with ``qmin <= q <= qmax``.

    Families are told apart by their equivalent sets; each is represented by
    its largest member (e.g. ``(1, 1, 1)``, ``(2, 0, 0)``), in order of q.
    """
    name = lattice_name(lattice)
    b = reciprocal_basis(name, a, c)
    seen: set[tuple[int, int, int]] = set()
    found: list[tuple[float, tuple[int, int, int]]] = []
    rng = range(-max_index, max_index + 1)
    for hkl in itertools.product(rng, rng, rng):
        if hkl == (0, 0, 0) or hkl in seen or not allowed(name, hkl):
            continue
        q = float(np.linalg.norm(np.asarray(hkl, dtype=float) @ b))
        eq = [tuple(int(v) for v in row) for row in equivalents(name, hkl)]
        seen.update(eq)  # type: ignore[arg-type]
        if qmin <= q <= qmax:
            rep = max(eq)
            found.append((q, (rep[0], rep[1], rep[2])))
    return [hkl for _, hkl in sorted(found)]
