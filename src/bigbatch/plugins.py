"""User code that registers models and datasets: ``--import`` modules and installed entry points.

Two ways to bring your own model or dataset to ``bigbatch train`` and ``bigbatch reproduce``:

* ``--import my_module`` (the config key ``imports``): the module is imported by name before the
  config is validated, from ``sys.path`` plus the current directory; at import time it calls
  :func:`bigbatch.models.register` / :func:`bigbatch.data.register_dataset`. The module names
  are recorded in ``config.toml``, so ``bigbatch train --resume`` (another process) imports them.
* An installed package declares an entry point in the group ``bigbatch.models`` or
  ``bigbatch.datasets`` (``[project.entry-points."bigbatch.models"] mine = "my_pkg.models"``).
  The groups are loaded lazily, once per process, the first time a name is looked up and not found
  (and when every name is listed). An entry point names a module (importing it registers) or a
  function of no arguments (called once).

Example:
    >>> import_modules(["json"])  # any importable module; registration happens at its import
    >>> import_modules(["no_such_module_xyz"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    bigbatch.errors.ConfigError: cannot import module 'no_such_module_xyz' (ModuleNotFoundError: ...
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from collections.abc import Iterable

from bigbatch.errors import ConfigError

__all__ = ["import_modules", "load_entry_points"]

_LOADED_GROUPS: set[str] = set()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def import_modules(names: Iterable[str]) -> None:
    """Import each module of ``names`` (dotted names), from ``sys.path`` and the current directory.

    The current directory is appended to ``sys.path`` (after everything else, so it never shadows
    an installed package) when it is not there: a console script such as ``bigbatch`` does not put
    it there itself. A module already imported is not imported again.

    Raises:
        ConfigError: one line naming the module and the exception its import raised.
    """
    names = list(names)
    if not names:
        return
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure of user code becomes one line
            hint = ""
            if isinstance(e, ModuleNotFoundError) and e.name == name.split(".")[0]:
                hint = (
                    "; modules are imported by name from sys.path and the current directory: "
                    "check the name, run from the module's folder or add it to PYTHONPATH"
                )
            raise ConfigError(f"cannot import module {name!r} ({_one_line(e)}){hint}") from None


def load_entry_points(group: str) -> None:
    """Load every entry point of ``group`` (once per process; later calls return at once).

    Raises:
        ConfigError: one line naming the entry point, its package and the exception.
    """
    if group in _LOADED_GROUPS:
        return
    # Marked first: a plugin that looks a name up while it registers must not load itself again.
    _LOADED_GROUPS.add(group)
    for ep in importlib.metadata.entry_points(group=group):
        dist = getattr(ep.dist, "name", None) or "an installed package"
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, type(sys)):
                obj()
        except Exception as e:  # noqa: BLE001 - a broken plugin becomes one line
            raise ConfigError(
                f"entry point {ep.name!r} = {ep.value!r} of {dist} (group {group}) failed: "
                f"{_one_line(e)}; fix or uninstall that package"
            ) from None
