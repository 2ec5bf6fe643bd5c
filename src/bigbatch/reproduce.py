"""The paper's experiment grid: five cumulative arms × seeds, run from a preset, then reported.

Arms (the columns of Hoffer et al. 2017, Table 1), each adding one measure to the previous; they are
defined here (:data:`ARMS`, :func:`arm_configs`) and the report imports them:

==============  =====================================================================
SB              batch ``base_batch_size`` with the base regime
LB              batch ``large_batch_size``, same regime (same epochs, fewer updates)
LB+LR           + the grid's ``lr_scaling`` rule (``"sqrt"``: lr × sqrt(B / B0), or ``"linear"``)
LB+LR+GBN       + ghost batch norm (``ghost_batch_size``)
LB+LR+GBN+RA    + regime adaptation (epochs and milestones × B / B0: as many updates as SB)
==============  =====================================================================

Opt-in arms beyond the paper (``LB+GBN+AS``, ``LB+LARS``, ``LB+LAMB``): :mod:`bigbatch.beyond_arms`.

A preset is TOML data (``src/bigbatch/presets/<name>.toml``), read as data, never executed::

    name = "demo"                 # optional (default: the file name)
    description = "..."           # optional; one line on what the preset shows
    [base]                        # RunConfig keys shared by all arms (config-file names:
                                  # model, dataset, train_subset, base_batch_size, epochs,
                                  # clip ...) except those each arm sets itself:
                                  # batch_size, seed, lr_scaling, ghost_batch_size and
                                  # regime_adaptation
    [base.regime]                 # optional: the base regime (else the model's default):
                                  # optimizer, epochs, schedule, warmup_epochs and
                                  # phases = [{ epoch = 0, lr = ..., momentum = ... }, ...]
    [grid]                        # large_batch_size and ghost_batch_size (required, >= 2),
                                  # seeds (a count or a list, default 1), arms (default all five),
                                  # lr_scaling (the +LR rule: "sqrt", the default, or "linear")
    [paper]                       # optional: published accuracy % per arm ("SB" = 99.23, ...),
                                  # source and metric (text)
    [evidence]                    # optional: text = what the preset shows, measured on what,
                                  # with how many seeds (shown in the report only when the grid
                                  # ran the preset unchanged)

``OUT/grid.toml`` is itself a preset: the resolved one, plus ``overrides`` (what the command
changed) and ``differences`` (each setting that differs from the preset as written, one line each).

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

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bigbatch import beyond_arms
from bigbatch.beyond_arms import LAYERWISE_LRS
from bigbatch.errors import ConfigError, DivergenceError
from bigbatch.fileio import drop_none, remove_stale_temp_files, tomllib
from bigbatch.preset_file import (
    PRESETS_DIR,
    check_keys,
    list_presets,
    parse_arms,
    parse_assignment,
    parse_seeds,
    positive_int,
    read_preset,
    run_line,
    suggest,
    text_tables,
)

__all__ = ["ARMS", "ARM_SLUGS", "PAPER_ARMS", "PRESETS_DIR", "apply_settings", "arm_configs",
           "list_presets", "load_preset", "preset_differences", "run_grid"]  # fmt: skip

log = logging.getLogger("bigbatch.reproduce")

# The paper's five cumulative columns and their directory names (the contract's slugs).
ARM_SLUGS: dict[str, str] = {
    "SB": "sb",
    "LB": "lb",
    "LB+LR": "lb_lr",
    "LB+LR+GBN": "lb_lr_gbn",
    "LB+LR+GBN+RA": "lb_lr_gbn_ra",
}
PAPER_ARMS: tuple[str, ...] = tuple(ARM_SLUGS)
ARM_SLUGS.update(beyond_arms.OPT_IN_ARMS)
ARMS: tuple[str, ...] = tuple(ARM_SLUGS)  # the paper's five, then the opt-in ones

# "overrides", "differences": what grid.toml records (applied to [base]/[grid]; it is a preset).
_TOP_KEYS = ("name", "description", "base", "grid", "paper", "evidence", "overrides", "differences")
_GRID_KEYS = ("seeds", "large_batch_size", "ghost_batch_size", "arms", "lr_scaling", *LAYERWISE_LRS)
# RunConfig keys each arm sets itself; a preset's [base] setting them would be silently overridden.
_ARM_KEYS = ("batch_size", "seed", "lr_scaling", "ghost_batch_size", "regime_adaptation")



def _validate(preset: dict[str, Any], default_name: str) -> dict[str, Any]:
    check_keys(preset, _TOP_KEYS, "the preset")
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
    check_keys(grid, _GRID_KEYS, "[grid]")
    for key in ("large_batch_size", "ghost_batch_size"):
        if key not in grid:
            raise ConfigError(f"[grid] needs {key}")
        positive_int(grid[key], key, minimum=2)
    grid["seeds"] = parse_seeds(grid.get("seeds", 1))
    grid["arms"] = parse_arms(grid.get("arms", list(PAPER_ARMS)), ARMS)
    beyond_arms.check_grid(grid)
    grid.setdefault("lr_scaling", "sqrt")
    if grid["lr_scaling"] not in ("sqrt", "linear"):
        raise ConfigError(
            f"[grid] lr_scaling must be 'sqrt' or 'linear', got {grid['lr_scaling']!r}"
        )
    resolved = {
        "name": str(preset.get("name", default_name)),
        "description": str(preset.get("description", "")),
        "base": base,
        "grid": grid,
        **text_tables(preset, ARMS),  # paper, evidence, differences
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
    raw, stem = read_preset(name_or_path)
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
    settings.update(beyond_arms.arm_settings(base, grid))
    return {arm: base.replace(seed=seed, **settings[arm]) for arm in grid["arms"]}


def _names(value: Any) -> list:
    return [value] if isinstance(value, str) else list(value)


def _apply_overrides(preset: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Route flat override keys: [grid] keys to [grid], RunConfig keys to [base]; None = unset.

    A dotted key sets one entry of a [base] table (``model_options.hidden``, ``regime.epochs``).
    """
    from bigbatch.train.config import RunConfig

    fields = list(RunConfig.__dataclass_fields__)
    base, grid = dict(preset["base"]), dict(preset["grid"])
    for key, value in overrides.items():
        head, _, entry = key.partition(".")
        if value is None:
            continue
        if key in _GRID_KEYS:
            grid[key] = value
        elif key == "imports":  # added to the preset's own modules
            base[key] = [*_names(base.get(key, [])), *_names(value)]
        elif key in _ARM_KEYS:
            raise ConfigError(f"override {key!r} is set by each arm; it cannot be overridden")
        elif entry and head in fields:
            table = base.get(head) or {}
            if not isinstance(table, Mapping):
                raise ConfigError(f"{head!r} is not a table, so {key!r} cannot be set")
            base[head] = {**table, entry: value}
        elif key in fields:
            base[key] = value
        else:
            allowed = [*fields, *_GRID_KEYS]
            raise ConfigError(f"unknown override {key!r}; {suggest(key, allowed)}".rstrip())
    return _validate({**preset, "base": base, "grid": grid}, preset["name"])


def apply_settings(preset: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """A resolved preset with ``KEY=VALUE`` settings applied (what ``--set`` passes), validated.

    Keys are [grid] keys (``seeds``, ``arms``, ``large_batch_size``, ``ghost_batch_size``,
    ``lr_scaling``), RunConfig keys for [base] (``epochs``, ``train_subset`` ...), or a dotted
    entry of a [base] table (``model_options.hidden``, ``regime.warmup_epochs``). Values are TOML
    (``1``, ``0.5``, ``[0, 1]``, ``"text"``); a bare word that is not TOML is a string.

    Raises:
        ConfigError: no ``=``, an unknown key (with a did-you-mean), a key each arm sets itself,
            or a value the preset's validation refuses.

    Example:
        >>> demo = apply_settings(load_preset("demo"), ["epochs=1", "seeds=[3]"])
        >>> demo["base"]["epochs"], demo["grid"]["seeds"]
        (1, [3])
    """
    return _apply_overrides(preset, dict(parse_assignment(a) for a in assignments))


def _check_same_grid(out_dir: Path, preset: dict[str, Any]) -> dict[str, Any] | None:
    """Refuse to mix two different grids in one directory; return the old grid.toml if any."""
    path = out_dir / "grid.toml"
    if not path.is_file():
        return None
    old = tomllib.loads(path.read_text(encoding="utf-8"))
    # Keys that may change between two calls on the same grid: they do not change results.
    from bigbatch.train.config import RENAMED_KEYS, RESUME_FREE_KEYS

    def comparable(base: Mapping[str, Any]) -> dict[str, Any]:
        # A key under its old name (clip_grad_norm, now clip) is the same setting.
        return {RENAMED_KEYS.get(k, k): v for k, v in drop_none(dict(base)).items()
                if RENAMED_KEYS.get(k, k) not in RESUME_FREE_KEYS}

    old_base, new_base = comparable(old.get("base", {})), comparable(preset["base"])
    diffs = [f"[base] {k}: {old_base.get(k)!r} -> {new_base.get(k)!r}"
             for k in sorted(set(old_base) | set(new_base)) if old_base.get(k) != new_base.get(k)]
    old_grid = old.get("grid", {})
    for key in ("large_batch_size", "ghost_batch_size", "lr_scaling"):
        if old_grid.get(key) != preset["grid"].get(key):
            diffs.append(f"[grid] {key}: {old_grid.get(key)!r} -> {preset['grid'].get(key)!r}")
    diffs += beyond_arms.layerwise_lr_changes(old_grid, preset["grid"], old_grid.get("arms", ()))
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


def run_grid(
    preset: str | Path,
    out_dir: str | Path,
    *,
    seeds: int | list[int] | None = None,
    arms: list[str] | None = None,
    device: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    progress: str = "auto",
    settings: list[str] | None = None,
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
        settings: ``KEY=VALUE`` assignments (``--set``), applied last by :func:`apply_settings`.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ConfigError: unknown preset, invalid keys or values, or ``out_dir`` holding a different
            grid.
    """
    out_dir = Path(out_dir)
    original = load_preset(preset)
    changes = {**(overrides or {}), "seeds": seeds, "arms": arms, "device": device,
               "progress": progress}  # fmt: skip
    assigned = dict(parse_assignment(a) for a in settings or [])  # --set, parsed once
    resolved = _apply_overrides(_apply_overrides(original, changes), assigned)
    overrides = {**(overrides or {}), **assigned}
    old = _check_same_grid(out_dir, resolved)
    from bigbatch.distributed import launcher_rank

    # Under torchrun every process runs the grid (each run is one DDP job) but only rank 0 writes
    # grid files and the report; the engine itself writes run files on rank 0 only.
    is_main = launcher_rank() == 0
    if is_main:
        from bigbatch.report.render import FIGURE_DIR

        remove_stale_temp_files(out_dir, out_dir / FIGURE_DIR)  # from a killed report
        _write_record(out_dir, original, resolved, overrides or {}, old)

    plan = [(seed, arm) for seed in resolved["grid"]["seeds"] for arm in resolved["grid"]["arms"]]
    started = time.perf_counter()
    display = _grid_progress(resolved, out_dir, plan, progress if is_main else "none")
    try:
        for index, (seed, arm) in enumerate(plan, 1):
            _run_one(resolved, out_dir, arm, seed, f"[{index}/{len(plan)}]", display)
    finally:
        display.close()
    if not is_main:
        return out_dir
    from bigbatch.report import write_report

    md_path, html_path = write_report(out_dir)
    elapsed = time.perf_counter() - started
    log.info("grid %s: %.1f min; report %s and %s", out_dir, elapsed / 60, md_path, html_path)
    return out_dir


def preset_differences(preset: Mapping[str, Any], grid: Mapping[str, Any]) -> list[str]:
    """One line per setting in which ``grid`` differs from ``preset`` (both resolved presets).

    Keys that do not change results (device, progress, data_dir ...) are left out. The report
    shows the preset's own evidence only when this list is empty.

    Example:
        >>> demo = load_preset("demo")
        >>> short = {**demo, "base": {**demo["base"], "epochs": 1}}
        >>> preset_differences(demo, short)
        ['[base] epochs: unset -> 1']
    """
    from bigbatch.train.config import RESUME_FREE_KEYS

    lines = []
    for table, keys in (("base", None), ("grid", _GRID_KEYS[:-len(LAYERWISE_LRS)])):
        old, new = drop_none(preset[table]), drop_none(grid[table])
        for key in keys or sorted(set(old) | set(new)):
            pair = old.get(key), new.get(key)
            if key in RESUME_FREE_KEYS or pair[0] == pair[1]:
                continue
            before, after = ("unset" if v is None else repr(v) for v in pair)
            lines.append(f"[{table}] {key}: {before} -> {after}".replace("'", ""))
    return lines + beyond_arms.layerwise_lr_changes(preset["grid"], grid["grid"],
                                                    grid["grid"]["arms"])


def _write_record(out_dir: Path, original: dict[str, Any], resolved: dict[str, Any],
                  overrides: Mapping[str, Any], old: dict[str, Any] | None) -> None:
    """grid.toml: everything in the directory (the union with an earlier call's seeds/arms)."""
    import tomli_w

    from bigbatch.fileio import atomic_write_text

    record = drop_none(resolved)
    record["overrides"] = drop_none(dict(overrides))
    if old is not None:
        old_grid = old.get("grid", {})
        seeds_before = set(old_grid.get("seeds", []))
        record["grid"]["seeds"] = sorted(set(record["grid"]["seeds"]) | seeds_before)
        record["grid"]["arms"] = [a for a in ARMS if a in record["grid"]["arms"]
                                  or a in old_grid.get("arms", [])]  # fmt: skip
    new = [d for d in preset_differences(original, record) if d not in original["differences"]]
    record["differences"] = [*original["differences"], *new]
    atomic_write_text(out_dir / "grid.toml", tomli_w.dumps(record))


def _grid_progress(resolved: dict[str, Any], out_dir: Path, plan: list[tuple[int, str]],
                   progress: str):  # fmt: skip
    """The grid's display (:class:`~bigbatch.train.progress.GridProgress`): each run weighs its
    effective epochs; finished runs (complete or diverged) count as done."""
    from bigbatch.train.config import resolve_regime
    from bigbatch.train.progress import GridProgress, resolve_progress_mode
    from bigbatch.train.rundir import read_summary

    configs = {seed: arm_configs(resolved, seed) for seed in resolved["grid"]["seeds"]}
    weights = [resolve_regime(configs[seed][arm], 1)[1].epochs for seed, arm in plan]
    done = [read_summary(out_dir / ARM_SLUGS[arm] / f"seed{seed}").get("status")
            in ("complete", "diverged") for seed, arm in plan]  # fmt: skip
    return GridProgress(weights, done, resolve_progress_mode(progress), log)


def _run_one(resolved: dict[str, Any], out_dir: Path, arm: str, seed: int, step: str,
             display: Any) -> None:  # fmt: skip
    """Run, resume or skip one (arm, seed) of the grid; a divergence is reported, not raised."""
    from bigbatch.train.config import resolve_regime
    from bigbatch.train.rundir import read_summary

    run_dir = out_dir / ARM_SLUGS[arm] / f"seed{seed}"
    previous = read_summary(run_dir)
    status = previous.get("status")
    if status == "complete":
        display.message(f"{step} {run_line(arm, seed, previous, 'already complete')}")
        return
    if status == "diverged":
        display.message(f"{step} {arm} seed {seed}: diverged earlier "
                        f"({previous.get('message', '?')}); kept, not retried (delete {run_dir} "
                        "to retry)")
        return
    config = arm_configs(resolved, seed)[arm]
    weight = resolve_regime(config, 1)[1].epochs
    resume = run_dir.exists()  # the engine restarts a run dir without a checkpoint cleanly
    if display.quiet_runs:  # under the grid's bar: no bar and no log lines of the run's own
        config = config.replace(progress="none")
    else:
        log.info("%s %s seed %d: %s %s", step, arm, seed,
                 "resuming" if resume else "running", run_dir)  # fmt: skip
    try:
        with display.quiet():
            summary = _train(config, run_dir, resume=resume)
    except DivergenceError as e:
        display.finished(weight, f"{step} {arm} seed {seed} diverged: {e}", warning=True)
        return
    display.finished(weight, f"{step} {run_line(arm, seed, summary, 'done')}")
