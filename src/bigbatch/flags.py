"""Command-line flags built from the run-config key declarations (``bigbatch.train.keys``).

Every ``RunConfig`` key ``some_key`` is the flag ``--some-key``, typed, described and defaulted by
its declaration: :func:`add_key_flags` adds them to a parser, :func:`key_values` reads them back as
config values. A new key gets its flag without touching the CLI.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_key_flags(parser.add_argument_group("batch"), ["batch_size", "lr_scaling"])
    >>> key_values(parser.parse_args(["--batch-size", "512"]), ["batch_size", "lr_scaling"])
    {'batch_size': 512}
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from bigbatch.fileio import tomllib

__all__ = ["add_key_flags", "key_values", "model_option", "regime_arg", "shown"]


def model_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as a TOML value (``32``, ``0.5``, ``true``, ``"x"``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def shown(value: Any) -> str:
    """How a value is written on the command line (``none``, ``true``, ``128``)."""
    return {None: "none", True: "true", False: "false"}.get(value, str(value)) if not isinstance(
        value, (int, float)) or isinstance(value, bool) else f"{value:g}"


def regime_arg(text: str) -> Any:
    """``--regime``: a regime file, or an inline TOML table (``'{epochs = 2, phases = [...]}'``)."""
    if not text.lstrip().startswith("{"):
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as e:
        raise argparse.ArgumentTypeError(f"not a TOML inline table: {e}") from None


class _DeprecatedFactor(argparse.Action):
    """``--regime-adaptation-factor F``, the old spelling of ``--regime-adaptation F``."""

    def __call__(self, parser, namespace, values, option_string=None):
        logging.getLogger("bigbatch").warning(
            "--regime-adaptation-factor is deprecated; write --regime-adaptation %s", values)
        setattr(namespace, self.dest, values)


def _add_key_flag(group: argparse._ArgumentGroup, name: str, spec: Any, default: Any) -> None:
    """The flag of config key ``name``: ``--name-with-dashes``, typed and described by ``spec``."""
    flag = "--" + name.replace("_", "-")
    default_text = "" if default is None else f" (default: {shown(default)})"
    kw: dict[str, Any] = {"dest": name, "help": spec.help + default_text, "metavar": spec.metavar}
    if spec.kind == "bool":
        kw.pop("metavar")
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
    elif spec.kind == "choice":
        kw.pop("metavar")
        group.add_argument(flag, choices=[shown(c) for c in spec.choices], **kw)
    elif spec.kind == "table":
        # --model-options KEY=VALUE, repeatable; the singular --model-option reads as well.
        aliases = [flag[:-1]] if flag.endswith("s") else []
        group.add_argument(flag, *aliases, type=model_option, action="append", **kw)
    elif spec.kind == "modules":
        # --imports MODULE, repeatable; the singular --import reads as well.
        group.add_argument(flag[:-1], flag, action="append", **kw)
    elif spec.kind == "factor":
        group.add_argument(flag, nargs="?", const=True, type=float, **kw)
        group.add_argument("--no-" + flag[2:], dest=name, action="store_const", const=False,
                           help="do not adapt the regime (the default)")
        group.add_argument(flag + "-factor", dest=name, type=float, action=_DeprecatedFactor,
                           help=argparse.SUPPRESS)
    else:
        types = {"int": int, "float": float, "regime": regime_arg}
        group.add_argument(flag, type=types.get(spec.kind, str), **kw)


def add_key_flags(groups: dict[str, argparse._ArgumentGroup] | argparse._ArgumentGroup,
                   names: Any = None) -> None:
    """Flags for config keys ``names`` (all when ``None``), in ``groups[key.group]``."""
    import dataclasses

    from bigbatch.train.config import RunConfig

    for field in dataclasses.fields(RunConfig):
        if names is not None and field.name not in names:
            continue
        spec = field.metadata["key"]
        group = groups[spec.group] if isinstance(groups, dict) else groups
        # An empty table's default is shown as nothing, like an unset key's.
        default = None if field.default is dataclasses.MISSING else field.default
        _add_key_flag(group, field.name, spec, default)


def key_values(args: argparse.Namespace, names: Any) -> dict[str, Any]:
    """The config keys given on the command line (not ``None``), as config values."""
    from bigbatch.train.config import config_keys

    out: dict[str, Any] = {}
    for name, spec in config_keys().items():
        value = getattr(args, name, None)
        if name not in names or value is None:
            continue
        if spec.kind == "choice":  # "none" stays a string: a None would not override a file
            value = {shown(c): c for c in spec.choices if c is not None}.get(value, value)
        elif spec.kind == "table":
            value = dict(value)
        out[name] = value
    return out
