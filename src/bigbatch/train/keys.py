"""The description of one run-config key, and the checks every kind of key gets.

Each field of :class:`bigbatch.train.config.RunConfig` is declared with :func:`key`, which puts a
:class:`Key` in the field's metadata: its kind (type), bounds, choices, help text, command-line
group, whether it may change on resume, and the names it had before. From that one place come the
validation (:func:`check`), the ``bigbatch train`` flags (``bigbatch.cli``), the docstring of
``RunConfig`` and the set of resume-free keys. Adding a key means adding one field.

Example:
    >>> spec = Key("int", "samples per update", minimum=1)
    >>> check("batch_size", 256.0, spec)
    256
    >>> check("batch_size", 0, spec)
    Traceback (most recent call last):
    ...
    bigbatch.errors.ConfigError: invalid value for 'batch_size': 0; expected an integer >= 1
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bigbatch.errors import ConfigError
from bigbatch.fileio import plain

__all__ = ["KINDS", "Key", "check", "key", "read_table_file"]

# str: any non-empty string; path: a non-empty path string; table: a table of keyword options;
# factor: true/false or a number > 0; regime: a regime table or the path of a regime file;
# modules: a list of dotted Python module names (one name alone is read as a list of one).
_TABLE_SUFFIXES = (".toml", ".yaml", ".yml")
KINDS = ("str", "path", "table", "bool", "int", "float", "choice", "factor", "regime", "device",
         "modules")


@dataclasses.dataclass(frozen=True)
class Key:
    """What bigbatch knows about one config key besides its name and default.

    Attributes:
        kind: one of :data:`KINDS`.
        help: one line for ``--help`` and the ``RunConfig`` docstring.
        minimum: ``int``: the smallest value; ``float``: ``0`` means >= 0, else > 0.
        optional: ``None`` ("unset") is allowed.
        choices: the values a ``choice`` key takes (``None`` written ``none``).
        metavar: the flag's value placeholder.
        group: the ``--help`` section of the flag.
        resume_free: the key may change on resume: it does not change what is computed (the
            device aside, which a user changes knowingly, e.g. to finish a GPU run on a CPU).
        old_names: names the key had before (accepted with a deprecation message).
    """

    kind: str
    help: str
    minimum: float | None = None
    optional: bool = False
    choices: tuple = ()
    metavar: str | None = None
    group: str = "run"
    resume_free: bool = False
    old_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown key kind {self.kind!r}; one of {KINDS}")


def key(default: Any, kind: str, help: str, **spec: Any) -> Any:  # noqa: A002 - argparse's name
    """A dataclass field with ``default`` (a copy per instance for a dict) and its :class:`Key`."""
    metadata = {"key": Key(kind, help, **spec)}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: plain(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"invalid value for {name!r}: {value!r}; expected {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_int(name: str, v: Any, spec: Key) -> int:
    if isinstance(v, float) and v.is_integer():  # YAML/JSON may give 256.0
        v = int(v)
    minimum = int(spec.minimum or 0)
    if not _is_int(v) or v < minimum:
        _fail(name, v, f"an integer >= {minimum}" + (" or none" if spec.optional else ""))
    return v


def _check_float(name: str, v: Any, spec: Key) -> float:
    positive = spec.minimum != 0
    if not _is_number(v) or (v <= 0 if positive else v < 0):
        allowed = "a number > 0" if positive else "a number >= 0"
        _fail(name, v, allowed + (" or none" if spec.optional else ""))
    return float(v)


def _check_choice(name: str, v: Any, spec: Key) -> Any:
    if v == "none" and None in spec.choices:
        return None
    # `1 in (True, ...)` is true in Python: compare types too.
    if not any(v == c and type(v) is type(c) for c in spec.choices):
        if spec.choices == ("auto", True, False):
            _fail(name, v, "'auto', true or false")
        shown = ", ".join("none" if c is None else repr(c) for c in spec.choices)
        _fail(name, v, f"one of {shown}")
    return v


def _check_factor(name: str, v: Any, spec: Key) -> bool | float:
    if isinstance(v, bool):
        return v
    if not _is_number(v) or v <= 0:
        _fail(name, v, "true (x batch_size/base_batch_size), false, or a factor > 0")
    return float(v)


def _check_regime(name: str, v: Any, spec: Key) -> dict:
    from bigbatch.recipes import Regime

    if isinstance(v, (str, Path)) and Path(v).suffix.lower() in _TABLE_SUFFIXES:
        v = read_table_file(v, what="regime file")
    if not isinstance(v, Mapping):
        _fail(name, v, "a regime table (optimizer, epochs, phases, ...), a regime file "
              "(.toml, .yaml) or none")
    v = plain(dict(v))
    try:
        Regime.from_dict(v)
    except ConfigError as e:
        raise ConfigError(f"regime: {e}") from None
    return v


def _check_device(name: str, v: Any, spec: Key) -> str:
    import torch

    if v == "auto":
        return v
    try:
        dev = torch.device(v) if isinstance(v, str) else None
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        _fail(name, v, "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return v


def _check_modules(name: str, v: Any, spec: Key) -> list[str]:
    v = [v] if isinstance(v, str) else v
    files = [m for m in v if isinstance(m, str) and m.endswith(".py")] if isinstance(
        v, (list, tuple)) else []
    if files:  # "my_task.py" reads as the submodule "py" of a package "my_task"
        _fail(name, v, f"Python module names, not files: {files[0][:-3].replace('/', '.')!r} "
              f"for {files[0]!r}")
    if not isinstance(v, (list, tuple)) or not all(
        isinstance(m, str) and m and all(part.isidentifier() for part in m.split(".")) for m in v
    ):
        _fail(name, v, "a list of Python module names, e.g. ['my_models'] (imported by name, "
              "not a file path)")
    return list(dict.fromkeys(v))  # each module once, in order


def _check_simple(name: str, v: Any, spec: Key) -> Any:
    if spec.kind == "bool" and not isinstance(v, bool):
        _fail(name, v, "true or false")
    if spec.kind == "str" and not isinstance(v, str):
        _fail(name, v, "a string")
    if spec.kind == "path":
        v = str(v) if isinstance(v, Path) else v
        if not isinstance(v, str) or not v:
            _fail(name, v, "a path" + (" or none" if spec.optional else ""))
    if spec.kind == "table":
        if not isinstance(v, Mapping) or not all(isinstance(k, str) for k in v):
            _fail(name, v, "a table of keyword options, e.g. {hidden = 64}")
        v = dict(v)
    return v


_CHECKS = {"int": _check_int, "float": _check_float, "choice": _check_choice,
           "factor": _check_factor, "regime": _check_regime, "device": _check_device,
           "modules": _check_modules}  # fmt: skip


def check(name: str, value: Any, spec: Key) -> Any:
    """``value`` checked against ``spec`` and normalised (``256.0`` -> ``256``, ``"none"`` ->
    ``None`` for a choice that includes ``None``, a regime file read into its table).

    Raises:
        ConfigError: naming the key, the value and what is allowed.
    """
    if value is None and (spec.optional or (spec.kind == "choice" and None in spec.choices)):
        return None
    return _CHECKS.get(spec.kind, _check_simple)(name, value, spec)


def read_table_file(path: str | Path, *, what: str) -> dict[str, Any]:
    """Parse a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file holding a table, as plain data.

    Raises:
        ConfigError: missing/unreadable file, unknown extension, a syntax error or a file that
            does not hold a table (each naming the file).
    """
    from bigbatch.fileio import parse_data_text

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _TABLE_SUFFIXES:
        raise ConfigError(f"{what} {str(path)!r} must end in .toml, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from None
    fmt = "toml" if suffix == ".toml" else "yaml"
    d = parse_data_text(text, fmt, f"cannot parse {what} {str(path)!r}")
    d = {} if d is None else d  # an empty YAML file
    if not isinstance(d, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a table of keys, got {type(d).__name__}")
    return d
