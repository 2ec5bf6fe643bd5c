"""Reading a preset file: names, TOML, key checks with a did-you-mean, seeds, arms, KEY=VALUE
(and the log line of one grid run, :func:`run_line`).

The generic half of the preset schema (documented in :mod:`bigbatch.reproduce`, which validates
the tables against the grid's arms and the engine's RunConfig).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bigbatch.errors import ConfigError
from bigbatch.fileio import tomllib

__all__ = ["PRESETS_DIR", "check_keys", "list_presets", "parse_arms", "parse_assignment",
           "parse_seeds", "positive_int", "read_preset", "run_line", "suggest",
           "text_tables"]  # fmt: skip

PRESETS_DIR = Path(__file__).parent / "presets"
_PAPER_INFO_KEYS = ("source", "metric")


def suggest(word: str, choices: list[str]) -> str:
    """``"did you mean 'x'? "`` for the closest of ``choices``, or ``""``."""
    hint = difflib.get_close_matches(word, choices, n=1)
    return f"did you mean {hint[0]!r}? " if hint else ""


def list_presets() -> list[str]:
    """Names of the presets shipped with bigbatch (``paper-*`` rows of Table 1 and ``demo``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def read_preset(name_or_path: str | Path) -> tuple[dict[str, Any], str]:
    """The raw TOML tables of a shipped preset name or a file path, and the default name."""
    text_name = str(name_or_path)
    is_path = isinstance(name_or_path, Path) or text_name.endswith(".toml") or "/" in text_name
    if is_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"preset file {text_name!r} not found")
    else:
        path = PRESETS_DIR / f"{text_name}.toml"
        if not path.is_file():
            names = list_presets()
            raise ConfigError(
                f"unknown preset {text_name!r}; {suggest(text_name, names)}"
                f"available presets: {', '.join(names)} (or pass the path of a .toml file)"
            )
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")), path.stem
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read preset {str(path)!r}: {e}") from None


def check_keys(table: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    """Refuse a key of ``table`` not in ``allowed``, naming the closest allowed one."""
    for key in table:
        if key not in allowed:
            raise ConfigError(
                f"unknown key {key!r} in {where}; {suggest(key, list(allowed))}"
                f"allowed: {', '.join(allowed)}"
            )


def positive_int(value: Any, key: str, minimum: int = 1) -> int:
    """``value`` if it is an integer >= ``minimum`` (not a bool), else a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"[grid] {key} must be an integer >= {minimum}, got {value!r}")
    return value


def parse_seeds(value: Any) -> list[int]:
    """A seed count n (seeds 0..n-1) or an explicit list of distinct seeds >= 0."""
    if isinstance(value, int) and not isinstance(value, bool):
        return list(range(positive_int(value, "seeds")))
    if isinstance(value, (list, tuple)) and value:
        seeds = [positive_int(s, "seeds", minimum=0) for s in value]
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds repeat a value: {list(value)}")
        return seeds
    raise ConfigError(f"seeds must be a count >= 1 or a non-empty list of seeds, got {value!r}")




def parse_assignment(text: str) -> tuple[str, Any]:
    """``"KEY=VALUE"`` as ``(key, value)``: the value read as TOML, or as a string if it is not.

    Example:
        >>> parse_assignment("seeds=[0, 1]"), parse_assignment("model=c1")
        (('seeds', [0, 1]), ('model', 'c1'))
    """
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key or not raw:
        raise ConfigError(f"a setting must be KEY=VALUE (e.g. epochs=1), got {text!r}")
    try:
        return key, tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return key, raw  # a bare word (model=c1, dataset=cifar10) is the string it spells


def text_tables(preset: Mapping[str, Any], arms: tuple[str, ...]) -> dict[str, Any]:
    """The preset's ``paper``, ``evidence`` and ``differences``, checked (each may be empty).

    ``paper``: accuracy % (0-100) per arm, plus ``source`` and ``metric`` text. ``evidence``: a
    table of text (a bare string is ``{text = ...}``). ``differences``: grid.toml's lines, carried
    so that a grid.toml used as a preset still says how it differs from the original preset.
    """
    paper = dict(preset.get("paper") or {})
    check_keys(paper, (*arms, *_PAPER_INFO_KEYS), "[paper]")
    for arm in arms:
        value = paper.get(arm)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value <= 100):  # fmt: skip
            raise ConfigError(f"[paper] {arm!r} must be an accuracy in % (0-100), got {value!r}")
    evidence = preset.get("evidence") or {}
    if isinstance(evidence, str):
        evidence = {"text": evidence}
    if not isinstance(evidence, Mapping) or not all(isinstance(v, str) for v in evidence.values()):
        raise ConfigError("[evidence] must be a table of text values (text = '...')")
    differences = preset.get("differences", [])
    if not isinstance(differences, list) or not all(isinstance(d, str) for d in differences):
        raise ConfigError("differences must be a list of text lines (grid.toml writes it)")
    return {"paper": paper, "evidence": dict(evidence), "differences": list(differences)}


def parse_arms(value: Any, arms: tuple[str, ...]) -> list[str]:
    """A non-empty list of distinct names drawn from ``arms``, returned in ``arms``' order."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"arms must be a non-empty list drawn from {list(arms)}, got {value!r}")
    for arm in value:
        if arm not in arms:
            raise ConfigError(
                f"unknown arm {arm!r}; {suggest(str(arm), list(arms))}arms: {', '.join(arms)}"
            )
    if len(set(value)) != len(value):
        raise ConfigError(f"arms repeat a value: {list(value)}")
    return [a for a in arms if a in value]  # the paper's order


def run_line(arm: str, seed: int, summary: Mapping[str, Any], what: str) -> str:
    """One log line for a grid run: arm, seed, what happened, its errors, updates and time."""

    def num(key: str, fmt: str) -> str:
        value = summary.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else "?"

    return (
        f"{arm:<13} seed {seed}: {what}, val error {num('final_val_error_pct', '.2f')}% "
        f"(train {num('final_train_error_pct', '.2f')}%), {num('updates', '.0f')} updates, "
        f"{num('epochs', 'g')} epochs, {num('wall_time_s', '.1f')} s"
    )
