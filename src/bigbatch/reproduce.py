"""The paper's experiment grid: five cumulative arms × seeds, run from a preset, then reported.

Arms (the columns of Hoffer et al. 2017, Table 1), each adding one measure to the previous:

==============  =====================================================================
SB              batch ``base_batch_size`` with the base regime
LB              batch ``large_batch_size``, same regime (same epochs, fewer updates)
LB+LR           + ``lr_scaling = "sqrt"`` (lr × sqrt(B / B0))
LB+LR+GBN       + ghost batch norm (``ghost_batch_size``)
LB+LR+GBN+RA    + regime adaptation (epochs and milestones × B / B0: as many updates as SB)
==============  =====================================================================

A preset is TOML data (``src/bigbatch/presets/<name>.toml``)::

    name = "demo"
    description = "..."
    [base]            # RunConfig keys shared by all arms (model, dataset, regime, clip_grad_norm)
    [grid]            # seeds (a list, or a count), large_batch_size, ghost_batch_size, arms,
                      # lr_scaling (the +LR rule, default "sqrt")
    [paper]           # optional: published accuracy % per arm ("SB" = 99.23, "LB+LR" = ...)
    [evidence]        # text = what the preset shows, measured on what, how many seeds

Runs go to ``OUT/<slug>/seed<k>/`` and run seed by seed, every arm of a seed before the next seed,
so a complete first seed exists early. Calling :func:`run_grid` again on the same ``OUT`` skips
complete runs and resumes interrupted ones, so an interrupted grid is finished by repeating the
command.

Example:
    >>> from bigbatch.reproduce import list_presets, load_preset
    >>> "demo" in list_presets()
    True
    >>> load_preset("demo")["grid"]["large_batch_size"]
    4096
"""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bigbatch.errors import ConfigError, DivergenceError
from bigbatch.fileio import remove_stale_temp_files, tomllib
from bigbatch.report.tables import ARM_SLUGS, ARMS
from bigbatch.train.keys import drop_none

__all__ = ["ARMS", "ARM_SLUGS", "PRESETS_DIR", "arm_configs", "list_presets", "load_preset",
           "run_grid"]  # fmt: skip

log = logging.getLogger("bigbatch.reproduce")

PRESETS_DIR = Path(__file__).parent / "presets"

# "overrides": what grid.toml records (already applied to [base]/[grid]); a grid.toml is a preset.
_TOP_KEYS = ("name", "description", "base", "grid", "paper", "evidence", "overrides")
_GRID_KEYS = ("seeds", "large_batch_size", "ghost_batch_size", "arms", "lr_scaling")
# RunConfig keys each arm sets itself; a preset's [base] setting them would be silently overridden.
_ARM_KEYS = ("batch_size", "seed", "lr_scaling", "ghost_batch_size", "regime_adaptation")
_PAPER_INFO_KEYS = ("source", "metric")


def _suggest(word: str, choices: list[str]) -> str:
    hint = difflib.get_close_matches(word, choices, n=1)
    return f"did you mean {hint[0]!r}? " if hint else ""


def list_presets() -> list[str]:
    """Names of the presets shipped with bigbatch (``paper-*`` rows of Table 1 and ``demo``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def _read_preset(name_or_path: str | Path) -> tuple[dict[str, Any], str]:
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
                f"unknown preset {text_name!r}; {_suggest(text_name, names)}"
                f"available presets: {', '.join(names)} (or pass the path of a .toml file)"
            )
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")), path.stem
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read preset {str(path)!r}: {e}") from None


def _check_keys(table: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(
                f"unknown key {key!r} in {where}; {_suggest(key, list(allowed))}"
                f"allowed: {', '.join(allowed)}"
            )


def _positive_int(value: Any, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"[grid] {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _seeds(value: Any) -> list[int]:
    """A seed count n (seeds 0..n-1) or an explicit list of distinct seeds >= 0."""
    if isinstance(value, int) and not isinstance(value, bool):
        return list(range(_positive_int(value, "seeds")))
    if isinstance(value, (list, tuple)) and value:
        seeds = [_positive_int(s, "seeds", minimum=0) for s in value]
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds repeat a value: {list(value)}")
        return seeds
    raise ConfigError(f"seeds must be a count >= 1 or a non-empty list of seeds, got {value!r}")


def _arms(value: Any) -> list[str]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"arms must be a non-empty list drawn from {list(ARMS)}, got {value!r}")
    for arm in value:
        if arm not in ARM_SLUGS:
            raise ConfigError(
                f"unknown arm {arm!r}; {_suggest(str(arm), list(ARMS))}arms: {', '.join(ARMS)}"
            )
    if len(set(value)) != len(value):
        raise ConfigError(f"arms repeat a value: {list(value)}")
    return [a for a in ARMS if a in value]  # the paper's order


def _validate(preset: dict[str, Any], default_name: str) -> dict[str, Any]:
    _check_keys(preset, _TOP_KEYS, "the preset")
    for key in ("base", "grid"):
        if not isinstance(preset.get(key), Mapping):
            raise ConfigError(f"the preset needs a [{key}] table")
    base, grid = dict(preset["base"]), dict(preset["grid"])
    for key in _ARM_KEYS:
        if key in base:
            raise ConfigError(
                f"[base] sets {key!r}, which each arm sets itself; use [grid] large_batch_size, "
                "ghost_batch_size, lr_scaling or --seeds instead"
            )
    _check_keys(grid, _GRID_KEYS, "[grid]")
    for key in ("large_batch_size", "ghost_batch_size"):
        if key not in grid:
            raise ConfigError(f"[grid] needs {key}")
        _positive_int(grid[key], key, minimum=2)
    grid["seeds"] = _seeds(grid.get("seeds", 1))
    grid["arms"] = _arms(grid.get("arms", list(ARMS)))
    grid.setdefault("lr_scaling", "sqrt")
    if grid["lr_scaling"] not in ("sqrt", "linear"):
        raise ConfigError(
            f"[grid] lr_scaling must be 'sqrt' or 'linear', got {grid['lr_scaling']!r}"
        )
    paper = dict(preset.get("paper") or {})
    _check_keys(paper, (*ARMS, *_PAPER_INFO_KEYS), "[paper]")
    for arm in ARMS:
        value = paper.get(arm)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value <= 100):  # fmt: skip
            raise ConfigError(f"[paper] {arm!r} must be an accuracy in % (0-100), got {value!r}")
    evidence = preset.get("evidence") or {}
    if isinstance(evidence, str):
        evidence = {"text": evidence}
    if not isinstance(evidence, Mapping) or not all(isinstance(v, str) for v in evidence.values()):
        raise ConfigError("[evidence] must be a table of text values (text = '...')")
    resolved = {
        "name": str(preset.get("name", default_name)),
        "description": str(preset.get("description", "")),
        "base": base,
        "grid": grid,
        "paper": paper,
        "evidence": dict(evidence),
    }
    _base_config(resolved)  # RunConfig validation: unknown keys, models, datasets, the regime
    arm_configs(resolved, seed=grid["seeds"][0])  # arm-specific checks (ghost <= large batch ...)
    return resolved


def load_preset(name_or_path: str | Path) -> dict[str, Any]:
    """Read and validate a preset.

    Args:
        name_or_path: a shipped preset name (see :func:`list_presets`) or the path of a TOML file.

    Returns:
        The resolved preset: ``name``, ``description``, ``base`` (RunConfig keys), ``grid``
        (``seeds`` as a list, ``arms`` in the paper's order, ``large_batch_size``,
        ``ghost_batch_size``, ``lr_scaling``), ``paper`` and ``evidence`` (tables, maybe empty).

    Raises:
        ConfigError: unknown preset name (with the available ones), unknown or invalid keys.
    """
    raw, stem = _read_preset(name_or_path)
    return _validate(raw, stem)


def _base_config(preset: Mapping[str, Any]):
    from bigbatch.train.config import RunConfig

    return RunConfig.from_dict(preset["base"])


def arm_configs(preset: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """The RunConfig of every arm of ``preset`` for one seed (arm name -> RunConfig).

    Each arm adds one measure to the previous one (see the module docstring); the base regime is
    the same for all, so LB keeps SB's epochs and takes B / B0 times fewer updates.
    """
    base = _base_config(preset)
    grid = preset["grid"]
    large = grid["large_batch_size"]
    settings = {
        "SB": {"batch_size": base.base_batch_size},
        "LB": {"batch_size": large},
        "LB+LR": {"batch_size": large, "lr_scaling": grid["lr_scaling"]},
        "LB+LR+GBN": {"batch_size": large, "lr_scaling": grid["lr_scaling"],
                      "ghost_batch_size": grid["ghost_batch_size"]},  # fmt: skip
    }
    settings["LB+LR+GBN+RA"] = {**settings["LB+LR+GBN"], "regime_adaptation": True}
    return {arm: base.replace(seed=seed, **settings[arm]) for arm in grid["arms"]}


def _apply_overrides(preset: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Route flat override keys: grid keys to [grid], RunConfig keys to [base]; None = unset."""
    from bigbatch.train.config import RunConfig

    fields = list(RunConfig.__dataclass_fields__)
    base, grid = dict(preset["base"]), dict(preset["grid"])
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("large_batch_size", "ghost_batch_size", "lr_scaling"):
            grid[key] = value
        elif key == "seeds":
            grid["seeds"] = value
        elif key in _ARM_KEYS:
            raise ConfigError(f"override {key!r} is set by each arm; it cannot be overridden")
        elif key in fields:
            base[key] = value
        else:
            allowed = [*fields, "large_batch_size", "ghost_batch_size", "lr_scaling", "seeds"]
            raise ConfigError(f"unknown override {key!r}; {_suggest(key, allowed)}".rstrip())
    return _validate({**preset, "base": base, "grid": grid}, preset["name"])


def _check_same_grid(out_dir: Path, preset: dict[str, Any]) -> dict[str, Any] | None:
    """Refuse to mix two different grids in one directory; return the old grid.toml if any."""
    path = out_dir / "grid.toml"
    if not path.is_file():
        return None
    old = tomllib.loads(path.read_text(encoding="utf-8"))
    # Keys that may change between two calls on the same grid: they do not change results.
    from bigbatch.train.rundir import fixed_keys

    old_base = {k: old["base"][k] for k in fixed_keys(old.get("base", {}))}
    new_base = {k: v for k, v in drop_none(preset["base"]).items() if k in fixed_keys([k])}
    diffs = [
        f"[base] {k}: {old_base.get(k)!r} -> {new_base.get(k)!r}"
        for k in sorted(set(old_base) | set(new_base))
        if old_base.get(k) != new_base.get(k)
    ]
    old_grid = old.get("grid", {})
    for key in ("large_batch_size", "ghost_batch_size", "lr_scaling"):
        if old_grid.get(key) != preset["grid"][key]:
            diffs.append(f"[grid] {key}: {old_grid.get(key)!r} -> {preset['grid'][key]!r}")
    if diffs:
        raise ConfigError(
            f"{out_dir} already holds a different grid ({'; '.join(diffs[:3])}); its complete runs "
            "would be mixed with new ones: use another --out, or the original settings"
        )
    return old


def _train(config, run_dir: Path, *, resume: bool) -> dict[str, Any]:
    """Run one training run (an indirection so tests can count and intercept runs)."""
    from bigbatch.train.loop import train

    if resume:
        remove_stale_temp_files(run_dir, run_dir / "checkpoints")
    return train(config, run_dir, resume=resume)


def _one_line(arm: str, seed: int, summary: Mapping[str, Any], what: str) -> str:
    def num(key: str, fmt: str) -> str:
        value = summary.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else "?"

    return (
        f"{arm:<13} seed {seed}: {what}, val error {num('final_val_error_pct', '.2f')}% "
        f"(train {num('final_train_error_pct', '.2f')}%), {num('updates', '.0f')} updates, "
        f"{num('epochs', 'g')} epochs, {num('wall_time_s', '.1f')} s"
    )


def run_grid(
    preset: str | Path,
    out_dir: str | Path,
    *,
    seeds: int | list[int] | None = None,
    arms: list[str] | None = None,
    device: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    progress: str = "auto",
) -> Path:
    """Run (or finish) a preset's grid into ``out_dir`` and write its report.

    Runs go to ``out_dir/<slug>/seed<k>/`` seed by seed (all arms of a seed, then the next seed).
    A run whose summary.json says ``complete`` is skipped; one that says ``diverged`` is kept as
    it is (rerunning it would diverge again; delete its directory to retry); any other started
    run is resumed from its last checkpoint. ``out_dir/grid.toml`` records the resolved preset and
    the overrides; the report (report.md, report.html) is written at the end.

    Args:
        preset: a preset name (:func:`list_presets`) or the path of a preset TOML file.
        out_dir: the grid directory.
        seeds: a seed count or a list of seeds instead of the preset's.
        arms: a subset of ``ARMS`` instead of the preset's.
        device: run every arm on this device (``"cpu"``, ``"cuda"`` ...).
        overrides: flat ``{key: value}`` changes: RunConfig keys (``epochs``, ``data_dir``,
            ``train_subset`` ...) go to [base]; ``large_batch_size``, ``ghost_batch_size`` and
            ``lr_scaling`` to [grid]. ``None`` values are ignored.
        progress: the engine's progress mode for each run (``auto``, ``bar``, ``log``, ``none``).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ConfigError: unknown preset, invalid keys or values, or ``out_dir`` holding a different
            grid.
    """
    out_dir = Path(out_dir)
    resolved = load_preset(preset)
    changes = dict(overrides or {})
    if seeds is not None:
        changes["seeds"] = seeds
    if arms is not None:
        changes["arms"] = list(arms)
    if device is not None:
        changes["device"] = device
    changes["progress"] = progress
    arm_list = changes.pop("arms", None)
    resolved = _apply_overrides(resolved, changes)
    if arm_list is not None:
        resolved["grid"]["arms"] = _arms(arm_list)
    old = _check_same_grid(out_dir, resolved)
    from bigbatch.distributed import launcher_rank
    from bigbatch.report.render import FIGURE_DIR

    # Under torchrun every process runs the grid (each run is one DDP job) but only rank 0 writes
    # grid files and the report; the engine itself writes run files on rank 0 only.
    is_main = launcher_rank() == 0
    if is_main:
        remove_stale_temp_files(out_dir, out_dir / FIGURE_DIR)  # from a killed report

    # grid.toml describes everything in the directory: the union with an earlier call's seeds/arms.
    record = drop_none(resolved)
    record["overrides"] = drop_none({k: v for k, v in (overrides or {}).items()})
    if old is not None:
        old_grid = old.get("grid", {})
        seeds_before = set(old_grid.get("seeds", []))
        record["grid"]["seeds"] = sorted(set(record["grid"]["seeds"]) | seeds_before)
        record["grid"]["arms"] = [a for a in ARMS if a in record["grid"]["arms"]
                                  or a in old_grid.get("arms", [])]  # fmt: skip
    import tomli_w

    from bigbatch.report.render import atomic_write
    from bigbatch.train import rundir

    if is_main:
        atomic_write(out_dir / "grid.toml", tomli_w.dumps(record))

    plan = [(seed, arm) for seed in resolved["grid"]["seeds"] for arm in resolved["grid"]["arms"]]
    started = time.perf_counter()
    for index, (seed, arm) in enumerate(plan, 1):
        run_dir = out_dir / ARM_SLUGS[arm] / f"seed{seed}"
        previous = rundir.read_summary(run_dir)
        status = previous.get("status")
        if status == "complete":
            log.info("[%d/%d] %s", index, len(plan),
                     _one_line(arm, seed, previous, "already complete"))  # fmt: skip
            continue
        if status == "diverged":
            log.info("[%d/%d] %s seed %d: diverged earlier (%s); kept, not retried (delete %s to "
                     "retry)", index, len(plan), arm, seed, previous.get("message", "?"), run_dir)
            continue
        config = arm_configs(resolved, seed)[arm]
        resume = run_dir.exists()  # the engine restarts a run dir without a checkpoint cleanly
        log.info("[%d/%d] %s seed %d: %s %s", index, len(plan), arm, seed,
                 "resuming" if resume else "running", run_dir)  # fmt: skip
        try:
            summary = _train(config, run_dir, resume=resume)
        except DivergenceError as e:
            log.warning("[%d/%d] %s seed %d diverged: %s", index, len(plan), arm, seed, e)
            continue
        log.info("[%d/%d] %s", index, len(plan), _one_line(arm, seed, summary, "done"))
    if not is_main:
        return out_dir
    from bigbatch.report import write_report

    md_path, html_path = write_report(out_dir)
    elapsed = time.perf_counter() - started
    log.info("grid %s: %.1f min; report %s and %s", out_dir, elapsed / 60, md_path, html_path)
    return out_dir
