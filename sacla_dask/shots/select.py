"""A safe selection expression over a run's event fields.

``--select EXPR`` keeps the shots whose event data satisfy ``EXPR``::

    laser_pulse_selector_status == 1
    0.5 < delay_mm <= 2 and not (pulse_energy < 1e-4)
    bl_3/lh_1/laser_pulse_selector_status == 0 or tag >= 166762200

Fields are named as :func:`sacla_dask.shots.fields.resolve_field` allows
(a name with ``/`` is a path). The grammar: comparisons (``< <= > >= ==
!=``, chained as in Python: ``a < x <= b``), ``and``, ``or``, ``not``,
parentheses, numbers (a leading ``-``), ``True``/``False``, and a field
alone (true where it is non-zero and not NaN). The text is parsed with
:mod:`ast` and only a whitelist of node types is accepted: a function
call, an attribute, a subscript, arithmetic or anything else is refused
with a :class:`~sacla_dask.errors.ParameterError` before anything runs;
nothing is ever passed to ``eval``. Evaluation is numpy's: a comparison
with a NaN (a tag without that event data) is false, except ``!=``.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import ParameterError
from ..io.run import Run
from .fields import event_fields, field_values, resolve_field

#: a field given by its path: ``a/b/c`` or ``/run_1/event_info/a/b``
_PATH = re.compile(r"(?<![\w.])/?[A-Za-z_]\w*(?:/\w+)+")

_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Lt: np.less, ast.LtE: np.less_equal, ast.Gt: np.greater,
    ast.GtE: np.greater_equal, ast.Eq: np.equal, ast.NotEq: np.not_equal,
}

_REFUSED = {ast.Call: "a function call", ast.Attribute: "an attribute access",
            ast.Subscript: "a subscript", ast.BinOp: "arithmetic",
            ast.Lambda: "a lambda", ast.IfExp: "a conditional expression",
            ast.List: "a list", ast.Tuple: "a tuple", ast.Dict: "a dict", ast.Set: "a set",
            ast.ListComp: "a comprehension", ast.GeneratorExp: "a comprehension",
            ast.NamedExpr: "an assignment", ast.Starred: "a starred expression"}


@dataclasses.dataclass(frozen=True)
class Selection:
    """A parsed selection expression.

    Attributes
    ----------
    text : str
        The expression as given.
    tree : ast.Expression
        Its checked syntax tree (names with ``/`` replaced by placeholders).
    paths : dict
        Placeholder -> the path it stands for.
    """

    text: str
    tree: ast.Expression
    paths: dict[str, str]

    @property
    def names(self) -> list[str]:
        """The field names used, in order of appearance, each once."""
        out = [self.paths.get(n.id, n.id) for n in ast.walk(self.tree)
               if isinstance(n, ast.Name)]
        return list(dict.fromkeys(out))

    def mask(self, run: Run, parameter: str = "select") -> np.ndarray:
        """Boolean per tag of ``run``: the shots the expression keeps."""
        fields = event_fields(run)
        values = {}
        for n in ast.walk(self.tree):
            if isinstance(n, ast.Name) and n.id not in values:
                f = resolve_field(fields, self.paths.get(n.id, n.id), parameter)
                values[n.id] = np.asarray(field_values(run, f), dtype=np.float64)
        return self.evaluate(values, len(run))

    def evaluate(self, values: dict[str, np.ndarray], n: int) -> np.ndarray:
        """The mask given each name's values (keyed by the tree's names)."""
        with np.errstate(invalid="ignore"):
            out = _eval(self.tree.body, values)
        return np.broadcast_to(_truth(out), (n,)).copy()

    def fields_used(self, run: Run, parameter: str = "select") -> list[str]:
        """The variable names of the fields used (in the run and the store)."""
        fields = event_fields(run)
        return list(dict.fromkeys(resolve_field(fields, n, parameter).name
                                  for n in self.names))


def parse_selection(text: str, parameter: str = "select") -> Selection:
    """Parse and check a selection expression (no field is looked up yet).

    Raises
    ------
    ParameterError
        Naming ``parameter``: a syntax error (with where), or a construct
        that is not allowed (a call, an attribute, arithmetic...).
    """
    if not isinstance(text, str) or not text.strip():
        raise ParameterError(f"{parameter} must be a non-empty expression over event fields "
                             f"(got {text!r})")
    paths: dict[str, str] = {}

    def placeholder(m: re.Match[str]) -> str:
        key = f"_path{len(paths)}_"
        paths[key] = m.group(0)
        return key

    src = _PATH.sub(placeholder, text.strip())
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError as exc:
        where = f" at column {exc.offset}" if exc.offset else ""
        raise ParameterError(f"{parameter}: {text!r} is not a valid expression{where} "
                             f"({exc.msg}); use comparisons of event fields with numbers, "
                             "and/or/not and parentheses") from None
    for node in ast.walk(tree):
        kind = _REFUSED.get(type(node))
        if kind is not None:
            raise ParameterError(f"{parameter}: {kind} is not allowed in {text!r}; only "
                                 "comparisons of event fields with numbers, and/or/not and "
                                 "parentheses")
        if not isinstance(node, (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp,
                                 ast.Not, ast.USub, ast.UAdd, ast.Compare, ast.Name,
                                 ast.Load, ast.Constant, *_COMPARE)):
            raise ParameterError(f"{parameter}: {type(node).__name__} is not allowed in "
                                 f"{text!r}; only comparisons of event fields with numbers, "
                                 "and/or/not and parentheses")
        if isinstance(node, ast.Constant) and (
                isinstance(node.value, str) or not isinstance(node.value, (int, float, bool))):
            raise ParameterError(f"{parameter}: only numbers may be compared with event "
                                 f"fields (got {node.value!r} in {text!r})")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) \
                and not isinstance(node.operand, ast.Constant):
            raise ParameterError(f"{parameter}: a sign goes on a number only (in {text!r})")
        if isinstance(node, ast.Name) and node.id in ("True", "False", "None"):
            raise ParameterError(f"{parameter}: {node.id} is not an event field")
    return Selection(text, tree, paths)


def _truth(v: Any) -> np.ndarray:
    """A field (or number) as a condition: non-zero and not NaN."""
    a = np.asarray(v)
    if a.dtype == bool:
        return a
    return np.nan_to_num(a.astype(np.float64), nan=0.0) != 0


def _eval(node: ast.AST, values: dict[str, np.ndarray]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return values[node.id]
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.Not):
            return ~_truth(_eval(node.operand, values))
        v = _eval(node.operand, values)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BoolOp):
        parts = [_truth(_eval(v, values)) for v in node.values]
        out = parts[0]
        for p in parts[1:]:
            out = (out & p) if isinstance(node.op, ast.And) else (out | p)
        return out
    if isinstance(node, ast.Compare):
        left = _eval(node.left, values)
        result: Any = True
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = _eval(right_node, values)
            result = result & _COMPARE[type(op)](_operand(left), _operand(right))
            left = right
        return result
    raise ParameterError(f"cannot evaluate {type(node).__name__}")  # (refused when parsed)


def _operand(v: Any) -> Any:
    """A comparison operand: a condition (bool array) compares as 0/1."""
    a = np.asarray(v)
    return a.astype(np.float64) if a.dtype == bool else v


def select_by_events(run: Run, text: str, drop_unselected: bool = False) -> Run:
    """``run`` with only the shots whose event data satisfy ``text`` selected.

    Adds to the selection already made (dark shots stay unselected); records
    the expression, the fields it used and the counts in ``run.selection``.
    ``drop_unselected`` leaves the unselected shots out of the run.
    """
    sel = parse_selection(text)
    keep = sel.mask(run)
    ev = run.events.copy()
    before = np.asarray(ev["selected"].values, dtype=bool)
    selected = before & keep
    ev["selected"] = ("tag", selected, ev["selected"].attrs)
    info = dict(run.selection)
    info["select"] = text
    info["select_fields"] = sel.fields_used(run)
    info["n_not_matching_select"] = int((before & ~keep).sum())
    info["n_selected"] = int(selected.sum())
    out = run._replace(events=ev, selection=info)
    if drop_unselected:
        info["dropped_unselected"] = True
        info["n_tags"] = int(selected.sum())
        out = out._replace(keep=selected, selection=info)
    return out


__all__ = ["Selection", "parse_selection", "select_by_events"]
