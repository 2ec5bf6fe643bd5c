"""The subcommands' handlers: `cmd_<command>(args)`, for the arguments `bigbatch.cli` parsed.

Each returns an exit code; input errors raise bigbatch's own exceptions, which ``cli.main`` prints
as one line. Heavy modules (torch, the engine, the report) are imported inside the handler that
needs them, so that parsing, help and argument errors stay fast.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
from pathlib import Path
from typing import Any

from bigbatch.errors import ConfigError
from bigbatch.fileio import remove_stale_temp_files
from bigbatch.flags import key_values

__all__ = ["REGIME_KEYS", "cmd_advise", "cmd_datasets", "cmd_download", "cmd_eval", "cmd_models",
           "cmd_presets", "cmd_regime", "cmd_report", "cmd_reproduce", "cmd_train", "launcher_rank"]


# -- train ----------------------------------------------------------------------------------------
# The keys `bigbatch regime` takes besides --model, --dataset and --batch-size.
REGIME_KEYS = ("imports", "train_subset", "base_batch_size", "lr_scaling", "regime_adaptation",
               "warmup_epochs", "epochs", "regime")


def _default_run_dir(config: Any) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    ghost = f"-g{config.ghost_batch_size}" if config.ghost_batch_size else ""
    return Path("runs") / (
        f"{config.model}-{config.dataset}-b{config.batch_size}{ghost}-s{config.seed}-{stamp}"
    )


def launcher_rank() -> int:
    """torchrun's rank of this process, 0 outside torchrun (where torch is not imported for it)."""
    if "RANK" not in os.environ:
        return 0
    from bigbatch.distributed import launcher_rank

    return launcher_rank()


def _resumed_config(run_dir: Path, flags: dict[str, Any]) -> Any:
    """The config of the run in ``run_dir``, with the resume-free ``flags`` applied."""
    from bigbatch.train.config import merge_config, read_config_file
    from bigbatch.train.rundir import extend_config, fixed_keys

    flags = dict(flags)
    epochs = flags.pop("epochs", None)  # --epochs N extends the run (rundir.extend_config)
    fixed = fixed_keys(flags)
    if fixed:
        flag = "--" + fixed[0].replace("_", "-")
        raise ConfigError(f"{flag} cannot change on --resume (RUN_DIR/config.toml fixes it); "
                          "start a new run to change it")
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise ConfigError(f"cannot resume {str(run_dir)!r}: {config_path} not found "
                          "(not a bigbatch run directory?)")
    remove_stale_temp_files(run_dir, run_dir / "checkpoints")
    saved = read_config_file(config_path)
    if "imports" in flags:  # added to the run's own (a run started in Python may need one)
        flags["imports"] = [*saved.get("imports", []), *flags["imports"]]
    try:  # one construction: the recorded imports register their names before they are checked
        config = merge_config(saved, flags)
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from None
    return config if epochs is None else extend_config(config, epochs)


def _new_run_dir(config: Any) -> Path:
    """``config.out`` (or a time-stamped default), checked but not created: the engine creates it
    once the run is built, so that a run that fails validation leaves no directory behind."""
    from bigbatch.distributed import under_torchrun

    if config.out is None and under_torchrun():
        # A time-stamped default would differ between processes (and elastic restarts).
        raise ConfigError("under torchrun pass --out RUN_DIR: every process, and every "
                          "restart of the job, must use the same run directory")
    run_dir = Path(config.out) if config.out is not None else _default_run_dir(config)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"cannot write to output directory {str(run_dir)!r}: it is a file; "
                          "choose another --out")
    existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write to output directory {str(run_dir)!r}: "
                          f"{str(existing)!r} is not a writable directory")
    return run_dir


def cmd_train(args: argparse.Namespace) -> int:
    from bigbatch.train.config import config_keys, merge_config, read_config_file
    from bigbatch.train.loop import train

    flags = key_values(args, config_keys())
    if args.resume is not None:
        if args.config is not None or "out" in flags:
            raise ConfigError("--resume RUN_DIR takes the config and the output dir from "
                              "RUN_DIR; drop --config/--out")
        config, run_dir = _resumed_config(args.resume, flags), args.resume
    else:
        base = read_config_file(args.config) if args.config is not None else {}
        config = merge_config(base, flags)
        run_dir = _new_run_dir(config)
    args.run_dir_used = run_dir  # for the interrupt message's --resume hint
    logging.getLogger("bigbatch").info("run directory: %s", run_dir)
    summary = train(config, run_dir, resume=args.resume is not None)
    if launcher_rank() != 0:
        return 0  # under torchrun rank 0 reports for the job
    rate = summary.get("train_samples_per_s")  # absent from summaries before 0.2
    print(
        f"{run_dir}: final val error {summary['final_val_error_pct']:.2f}% "
        f"(best {summary['best_val_error_pct']:.2f}%) after {summary['updates']} updates, "
        f"{summary['wall_time_s']:.1f} s"
        + (f" ({rate:.0f} train samples/s, evaluation excluded)" if rate else "")
    )
    return 0


# -- models, regime, download ---------------------------------------------------------------------
def _regime_summary(regime: dict[str, Any]) -> str:
    phases = regime.get("phases", [])
    lrs = " -> ".join(
        f"{p['lr']:g}" + (f"@{p['epoch']:g}" if i else "")
        for i, p in enumerate(phases)
        if "lr" in p
    )
    return f"{regime.get('optimizer', 'SGD')} {regime.get('epochs', '?'):g} ep, lr {lrs}"


def _print_columns(rows: list[tuple[str, ...]]) -> None:
    """Rows as aligned columns; the last column is free text and is not padded."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(f"{c:<{w}}" for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])


def cmd_models(args: argparse.Namespace) -> int:
    from bigbatch import models
    from bigbatch.plugins import import_modules

    import_modules(args.imports or [])
    rows = [("model", "dataset", "regime", "clip", "description")]
    for name in models.names():
        spec = models.get_spec(name)
        clip = "-" if spec.default_clip_grad_norm is None else f"{spec.default_clip_grad_norm:g}"
        rows.append((name, spec.default_dataset, _regime_summary(spec.default_regime), clip,
                     spec.description))
    _print_columns(rows)
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from bigbatch import data
    from bigbatch.plugins import import_modules

    import_modules(args.imports or [])
    rows = [("dataset", "classes", "input", "train samples", "storage")]
    for name in data.dataset_names():
        info = data.get_info(name)
        storage = "in memory" if info.in_memory else f"folder {info.default_dir or '--data-dir'}"
        rows.append((name, str(info.num_classes), "x".join(map(str, info.input_shape)),
                     str(info.num_train), storage))
    _print_columns(rows)
    return 0


def _dataset_size(args: argparse.Namespace, dataset: str) -> int:
    if args.dataset_size is not None:
        return args.dataset_size
    if args.train_subset is not None:
        return args.train_subset
    from bigbatch import data

    return data.get_info(dataset).num_train


def cmd_regime(args: argparse.Namespace) -> int:
    from bigbatch import models
    from bigbatch.plugins import import_modules
    from bigbatch.recipes import format_adaptation_table
    from bigbatch.train.config import RunConfig, resolve_regime

    import_modules(args.imports or [])  # before the model's spec is looked up
    models.get_spec(args.model)  # an unknown model fails first, with a did-you-mean
    dataset = args.dataset or RunConfig().dataset  # the dataset `train` would use
    keys = {"model": args.model, "dataset": dataset, "batch_size": args.batch_size}
    values = key_values(args, REGIME_KEYS)
    if values.get("lr_scaling") == "adascale":
        keys["noise_scale"] = True  # what a run needs; here only its longest schedule is shown
    config = RunConfig.from_dict({**keys, **values})
    size = _dataset_size(args, dataset)
    before, after = resolve_regime(config, size)
    print(f"{config.model} on {dataset} ({size} training samples), lr scaling "
          f"{config.lr_scaling}, regime adaptation {config.regime_adaptation}")
    if config.lr_scaling == "adascale":
        scale = config.batch_size / config.base_batch_size
        print(f"AdaScale decides during training (with --noise-scale): lr = gain x the base lr, "
              f"the gain between 1 and {scale:g} from the measured noise, and the run ends when "
              f"its progress reaches the small batch's updates. The large-batch column is its "
              f"longest run (gain 1 throughout); an all-noise gradient needs {scale:g}x fewer "
              f"updates.")
    print(format_adaptation_table(before, after, base_batch_size=config.base_batch_size,
                                  batch_size=config.batch_size, dataset_size=size))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from bigbatch import data

    path = data.download(args.name, args.data_dir)
    print(f"{args.name}: verified files in {path}")
    return 0


# -- reproduce, report (issue 5's modules, imported when used) -------------------------------------
def cmd_reproduce(args: argparse.Namespace) -> int:
    from bigbatch.plugins import import_modules
    from bigbatch.reproduce import run_grid

    import_modules(args.imports or [])  # before the preset's models and datasets are checked
    overrides = {"imports": args.imports} if args.imports else {}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.batch_size is not None:
        overrides["large_batch_size"] = args.batch_size
    if args.data_dir is not None:
        overrides["data_dir"] = str(args.data_dir)
    if args.download is not None:
        overrides["download"] = args.download
    out = args.out if args.out is not None else Path("runs") / Path(args.preset).stem
    grid_dir = run_grid(args.preset, out, seeds=args.seeds, arms=args.arms, device=args.device,
                        overrides=overrides or None, progress=args.progress,
                        settings=args.settings)
    if launcher_rank() == 0:
        print(f"grid: {grid_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from bigbatch.train.trained import evaluate_run

    m = evaluate_run(args.run_dir, split=args.split, checkpoint=args.checkpoint,
                     device=args.device,
                     data_dir=None if args.data_dir is None else str(args.data_dir))
    top5 = m.get("val_top5_error_pct")
    print(f"{args.run_dir}: {m['checkpoint']} (update {m['updates']}) on the {m['split']} split "
          f"({m['samples']} samples): loss {m['val_loss']:.4f}, error {m['val_error_pct']:.2f}%"
          + (f", top-5 error {top5:.2f}%" if top5 is not None else ""))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from bigbatch.reproduce import list_presets, load_preset

    rows = []
    for name in list_presets():
        preset = load_preset(name)
        base, grid = preset["base"], preset["grid"]
        what = (f"{base.get('model', 'f1')} on {base.get('dataset', 'fashion-mnist')}, batch "
                f"{base.get('base_batch_size', 128)} vs {grid['large_batch_size']}")
        rows.append((name, what, preset["description"]))
    _print_columns(rows)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bigbatch.report import write_report

    md_path, html_path = write_report(args.run_dir)
    print(f"report: {md_path} and {html_path}")
    return 0


def cmd_advise(args: argparse.Namespace) -> int:
    from bigbatch.train.noise import advise_run_dir

    print("\n".join(advise_run_dir(args.run_dir)))
    return 0
