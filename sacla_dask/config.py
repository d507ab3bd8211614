"""sacla_dask's tunables, kept in Dask's own configuration.

Every knob has a default in ``sacla_dask/sacla_dask.yaml`` (shipped with
the package, registered with :func:`dask.config.update_defaults` when this
module is imported) under the key ``sacla_dask``, and is read when it is
used, so all of Dask's ways of changing a setting apply::

    dask.config.set({"sacla_dask.chunks.auto-bytes": "64MiB"})   # in Python
    # ~/.config/dask/sacla_dask.yaml, or the environment:
    DASK_SACLA_DASK__READ__DIRECT=false sacla-dask process ...

Worker processes started by a LocalCluster receive the configuration of the
process that starts them.
"""

from __future__ import annotations

import os
from typing import Any

import dask.config
import yaml

_DEFAULTS_FILE = os.path.join(os.path.dirname(__file__), "sacla_dask.yaml")

with open(_DEFAULTS_FILE) as _fh:
    DEFAULTS: dict[str, Any] = yaml.safe_load(_fh)

# (values already set, from the environment, a YAML file or dask.config.set, stay)
dask.config.update_defaults(DEFAULTS)

#: keys renamed: dask.config.set of the old one warns and sets the new one; a value
#: given under the old one in a YAML file or the environment is moved to the new one
#: (the old names are spelled with "-" for "_": Dask's check compares them so)
RENAMED = {"sacla-dask.worker-saturation": "sacla_dask.worker.saturation"}
dask.config.deprecations.update(RENAMED)
dask.config.rename(RENAMED)


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
