"""sacla_dask's tunables, kept in Dask's own configuration.

Every knob has a default in ``sacla_dask/sacla_dask.yaml`` (shipped with
the package, registered with :func:`dask.config.update_defaults` when this
module is imported) under the key ``sacla_dask``, and is read when it is
used, so all of Dask's ways of changing a setting apply::

    dask.config.set({"sacla_dask.chunks.auto-bytes": "64MiB"})   # in Python
    # ~/.config/dask/sacla_dask.yaml, or the environment:
    DASK_SACLA_DASK__READ__DIRECT=false sacla-dask process ...

Worker processes started by a LocalCluster receive the configuration of the
process that starts them. Read a setting with :func:`get` (``get_bytes``,
``get_bool`` for sizes and yes/no values); ``docs/configuration.md`` lists
them all, its table made from the YAML file by ``python -m sacla_dask.config
docs/configuration.md`` (:func:`markdown_table`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any

import dask.config
import yaml

_DEFAULTS_FILE = os.path.join(os.path.dirname(__file__), "sacla_dask.yaml")

with open(_DEFAULTS_FILE) as _fh:
    DEFAULTS: dict[str, Any] = yaml.safe_load(_fh)

# (values already set, from the environment, a YAML file or dask.config.set, stay)
dask.config.update_defaults(DEFAULTS)



def get(key: str) -> Any:
    """The value of ``sacla_dask.<key>`` in Dask's configuration.

    Raises
    ------
    KeyError
        If ``key`` names no sacla_dask setting (the message lists them).
    """
    try:
        return dask.config.get(f"sacla_dask.{key}")
    except KeyError:
        raise KeyError(f"no sacla_dask setting {key!r}; the settings are: "
                       + ", ".join(keys())) from None


def get_bytes(key: str) -> int:
    """A size setting in bytes (``"32MiB"``, ``4194304``)."""
    from dask.utils import parse_bytes

    value = get(key)
    return int(value) if isinstance(value, (int, float)) else int(parse_bytes(value))


def get_bool(key: str) -> bool:
    """A yes/no setting: a boolean, a number, or ``"true"``/``"false"``, ``"1"``/``"0"``,
    ``"yes"``/``"no"``, ``"on"``/``"off"`` (any case).

    Raises
    ------
    ValueError
        For any other string.
    """
    value = get(key)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"sacla_dask setting {key!r} must be true or false (got {value!r})")
    return bool(value)


def keys() -> list[str]:
    """Every sacla_dask setting, dotted (``"correlation.merge-bytes"``, ...)."""
    return _keys(DEFAULTS["sacla_dask"])


def _keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        if isinstance(v, dict) and k != "env":
            out += _keys(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


# -- the settings described (docs/configuration.md is made from this) ----------
@dataclasses.dataclass(frozen=True)
class Setting:
    """One sacla_dask setting as ``sacla_dask.yaml`` defines it.

    Attributes
    ----------
    key : str
        Dotted, without the leading ``sacla_dask.`` (``"read.direct"``).
    default : Any
        Its default value.
    doc : str
        The comment above it in the YAML file.
    """

    key: str
    default: Any
    doc: str

    @property
    def kind(self) -> str:
        """What the value is: a size in bytes, a duration, a number, ..."""
        from dask.utils import parse_bytes, parse_timedelta

        v = self.default
        if isinstance(v, bool):
            return "true/false"
        if isinstance(v, dict):
            return "mapping"
        if isinstance(v, int):
            return "integer"
        if isinstance(v, float):
            return "number"
        if v is None:
            return "string or null"
        if isinstance(v, str) and not v.strip().isdigit():
            try:
                parse_bytes(v)
                return "size (bytes)"
            except ValueError:
                pass
            try:
                parse_timedelta(v)
                return "duration"
            except (ValueError, KeyError):
                pass
        return "string"

    @property
    def env(self) -> str:
        """The environment variable that sets it in a process that starts."""
        return "DASK_SACLA_DASK__" + "__".join(
            part.upper().replace("-", "_") for part in self.key.split("."))


def settings(path: str = _DEFAULTS_FILE) -> list[Setting]:
    """Every setting of the YAML file ``path``, in its order, with its comment.

    A setting's comment is the run of ``#`` lines just above it; a section
    (a key with settings under it) has none. ``env`` is one setting (a
    mapping of environment variables).

    Parameters
    ----------
    path : str
        A YAML file laid out as ``sacla_dask.yaml`` (default: that file).

    Returns
    -------
    list of Setting
    """
    with open(path) as fh:
        text = fh.read()
    tree = yaml.safe_load(text)
    out: list[Setting] = []
    comment: list[str] = []
    stack: list[tuple[int, str, bool]] = []  # (indent, key, a setting) of enclosing keys
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            comment = []
            continue
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
            continue
        m = re.match(r"([A-Za-z0-9_.-]+):", stripped)
        if m is None:
            comment = []
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if any(leaf for _, _, leaf in stack):  # an entry of a mapping setting (env)
            comment = []
            continue
        keys_ = [k for _, k, _ in stack] + [m.group(1)]
        value: Any = tree
        for k in keys_:
            value = value[k]
        leaf = not isinstance(value, dict) or keys_[-1] == "env"
        if leaf and keys_[0] == "sacla_dask":
            out.append(Setting(".".join(keys_[1:]), value, " ".join(comment)))
        stack.append((indent, keys_[-1], leaf))
        comment = []
    return out


def _default_text(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def markdown_table(path: str = _DEFAULTS_FILE) -> str:
    """The settings of ``path`` as a Markdown table.

    Parameters
    ----------
    path : str
        A YAML file laid out as ``sacla_dask.yaml`` (default: that file).

    Returns
    -------
    str
        One row per setting: key, default, kind, what it changes (its
        comment) and environment variable.
    """
    rows = ["| Setting (`sacla_dask.` ...) | Default | Kind | What it changes "
            "| Environment variable |",
            "|---|---|---|---|---|"]
    for s in settings(path):
        doc = s.doc.replace("|", "\\|")
        rows.append(f"| `{s.key}` | `{_default_text(s.default)}` | {s.kind} | {doc} "
                    f"| `{s.env}` |")
    return "\n".join(rows) + "\n"


_BEGIN = "<!-- settings table: made by `python -m sacla_dask.config FILE`; do not edit -->"
_END = "<!-- end of settings table -->"


def write_table(doc_path: str) -> None:
    """Replace the table between the markers of ``doc_path`` by :func:`markdown_table`."""
    with open(doc_path) as fh:
        text = fh.read()
    start, end = text.index(_BEGIN) + len(_BEGIN), text.index(_END)
    with open(doc_path, "w") as fh:
        fh.write(text[:start] + "\n" + markdown_table() + text[end:])


def table_in(doc_path: str) -> str:
    """The table between the markers of ``doc_path`` (as :func:`write_table` put it)."""
    with open(doc_path) as fh:
        text = fh.read()
    return text[text.index(_BEGIN) + len(_BEGIN):text.index(_END)].lstrip("\n")


if __name__ == "__main__":  # python -m sacla_dask.config [docs/configuration.md]
    if len(sys.argv) > 1:
        write_table(sys.argv[1])
    else:
        print(markdown_table(), end="")
