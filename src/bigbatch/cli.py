"""Command-line interface: ``bigbatch train | models | regime | download | reproduce | report``.

``main(argv)`` returns an exit code. Errors caused by the user's input (bigbatch's own exception
types, and ``ValueError`` raised inside bigbatch, e.g. by a ghost batch norm layer) are printed as
one line, ``bigbatch: error: <message>``, with exit code 2 and no traceback; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from bigbatch.errors import BigBatchError, ConfigError
from bigbatch.fileio import remove_stale_temp_files
from bigbatch.flags import add_key_flags, key_values

__all__ = ["build_parser", "main"]

_PACKAGE_DIR = Path(__file__).resolve().parent

_TRAIN_EPILOG = """\
examples:
  # the paper's recipe for F1 at batch 4096: +LR (sqrt), +GBN (ghost 128), +RA, clipping at 5
  bigbatch train --model f1 --dataset fashion-mnist --batch-size 4096 --ghost-batch-size 128 \\
      --lr-scaling sqrt --regime-adaptation --clip 5

  # a quick run on the built-in synthetic data, with a small model
  bigbatch train --model f1 --model-option hidden=32 --dataset synthetic --epochs 2

  # a config file sets the defaults, flags override it
  bigbatch train --config run.toml --seed 1

  # continue a run that was interrupted (reads RUN_DIR/config.toml)
  bigbatch train --resume runs/f1-fashion-mnist-b4096-g128-s0-20261126-120000

outputs (in --out): config.toml, metrics.csv/.jsonl (one row per evaluation), diffusion.csv/.jsonl
(weight distance from initialisation), checkpoints/last.pt and best.pt, summary.json.
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=100)


# -- parser ---------------------------------------------------------------------------------------
def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    from bigbatch.train.config import config_keys

    p = sub.add_parser(
        "train", help="train one model (one run directory)", formatter_class=_HelpFormatter,
        description="Train one model with large-batch recipes; writes a run directory. Every "
                    "flag --some-key is the config-file key some_key.",
        epilog=_TRAIN_EPILOG,
    )
    g = p.add_argument_group("configuration")
    g.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML or YAML run config; flags below override its values")
    g.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint (uses its "
                        "config.toml)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in config_keys().values():
        if spec.group not in groups:
            groups[spec.group] = p.add_argument_group(spec.group)
    add_key_flags(groups)
    p.set_defaults(handler=_cmd_train)


def _add_models_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered models", formatter_class=_HelpFormatter,
                       description="List registered models with their default dataset and regime.")
    p.set_defaults(handler=_cmd_models)


def _add_regime_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "regime", help="show how a regime is adapted to a batch size",
        formatter_class=_HelpFormatter,
        description="Print the model's regime before and after adaptation to --batch-size, as "
                    "`bigbatch train` with the same flags would run it.",
        epilog="example:\n  bigbatch regime --model resnet44 --batch-size 4096 --lr-scaling sqrt "
               "--regime-adaptation",
    )
    p.add_argument("--model", required=True, help="registered model")
    p.add_argument("--batch-size", type=int, required=True, metavar="B", help="large batch size")
    p.add_argument("--dataset", help="dataset (default: the model's)")
    p.add_argument("--dataset-size", type=int, metavar="N",
                   help="training samples (default: --train-subset or the dataset's size)")
    add_key_flags(p.add_argument_group("regime"), _REGIME_KEYS)
    p.set_defaults(handler=_cmd_regime)


def _add_download_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="download a dataset (SHA-256 verified)",
                       formatter_class=_HelpFormatter,
                       description="Download a dataset's files and verify their SHA-256.")
    p.add_argument("name", help="dataset name, e.g. fashion-mnist, cifar10")
    p.add_argument("--data-dir", required=True, type=Path, metavar="DIR", help="where to put it")
    p.set_defaults(handler=_cmd_download)


def _add_reproduce_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce", help="run the paper's experiment grid from a preset, then the report",
        formatter_class=_HelpFormatter,
        description="Run every arm (SB, LB, +LR, +GBN, +RA) and seed of a preset, skipping "
                    "complete runs, then write the report.",
        epilog="example:\n  bigbatch reproduce --preset demo --out runs/demo",
    )
    p.add_argument("--preset", required=True, help="preset name (e.g. demo) or a preset TOML file")
    p.add_argument("--seeds", type=int, metavar="N", help="number of seeds (default: the preset's)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="grid directory (default: runs/<preset>)")
    p.add_argument("--device", help="device for every run (default: auto)")
    p.add_argument("--arms", nargs="+", metavar="ARM",
                   help="run only these arms (SB LB LB+LR LB+LR+GBN LB+LR+GBN+RA; opt-in: "
                        "LB+GBN+AS LB+LARS LB+LAMB)")
    p.add_argument("--epochs", type=float, metavar="E", help="override the base regime's epochs")
    p.add_argument("--batch-size", type=int, metavar="B", help="override the large batch size")
    p.add_argument("--data-dir", type=Path, metavar="DIR",
                   help="dataset directory for every run (default: the dataset's own)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=None,
                   help="download the dataset into --data-dir if missing (SHA-256 verified)")
    from bigbatch.train.config import config_keys

    p.add_argument("--progress", choices=config_keys()["progress"].choices, default="auto",
                   help="progress display of each run")
    p.set_defaults(handler=_cmd_reproduce)


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write the report of a grid directory",
                       formatter_class=_HelpFormatter,
                       description="Write report.md and report.html for a `reproduce` grid.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="grid directory")
    p.set_defaults(handler=_cmd_report)


def _add_advise_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("advise", help="what a run's measured noise scale says about its batch size",
                       formatter_class=_HelpFormatter,
                       description="Print B_simple over training, the critical batch it implies, "
                                   "the trade-off at the run's batch size and AdaScale's gain "
                                   "(a run trained with --noise-scale).")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory")
    p.set_defaults(handler=_cmd_advise)


def build_parser() -> argparse.ArgumentParser:
    """The ``bigbatch`` argument parser with all subcommands."""
    import bigbatch

    parser = argparse.ArgumentParser(
        prog="bigbatch", formatter_class=_HelpFormatter,
        description="Train with very large batches without losing accuracy (Hoffer et al. 2017: "
                    "ghost batch norm, lr scaling, regime adaptation).",
        epilog="Run `bigbatch COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"bigbatch {bigbatch.__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for add in (_add_train_parser, _add_models_parser, _add_regime_parser, _add_download_parser,
                _add_reproduce_parser, _add_report_parser, _add_advise_parser):
        add(sub)
    return parser


# -- train ----------------------------------------------------------------------------------------
# The keys `bigbatch regime` takes besides --model, --dataset and --batch-size.
_REGIME_KEYS = ("train_subset", "base_batch_size", "lr_scaling", "regime_adaptation",
                "warmup_epochs", "epochs", "regime")


def _default_run_dir(config: Any) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    ghost = f"-g{config.ghost_batch_size}" if config.ghost_batch_size else ""
    return Path("runs") / (
        f"{config.model}-{config.dataset}-b{config.batch_size}{ghost}-s{config.seed}-{stamp}"
    )


def _launcher_rank() -> int:
    """torchrun's rank of this process, 0 outside torchrun (where torch is not imported for it)."""
    if "RANK" not in os.environ:
        return 0
    from bigbatch.distributed import launcher_rank

    return launcher_rank()


def _resumed_config(run_dir: Path, flags: dict[str, Any]) -> Any:
    """The config of the run in ``run_dir``, with the resume-free ``flags`` applied."""
    from bigbatch.train.config import load_config, merge_config
    from bigbatch.train.rundir import fixed_keys

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
    return merge_config(load_config(config_path), flags)


def _new_run_dir(config: Any) -> Path:
    """``config.out`` (or a time-stamped default), created and checked to be writable."""
    from bigbatch.distributed import under_torchrun

    if config.out is None and under_torchrun():
        # A time-stamped default would differ between processes (and elastic restarts).
        raise ConfigError("under torchrun pass --out RUN_DIR: every process, and every "
                          "restart of the job, must use the same run directory")
    run_dir = Path(config.out) if config.out is not None else _default_run_dir(config)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # One probe per process: torchrun's processes probe the same directory at once.
        probe = run_dir / f".bigbatch-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to output directory {str(run_dir)!r}: "
                          f"{e.strerror or e}") from None
    return run_dir


def _cmd_train(args: argparse.Namespace) -> int:
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
    logging.getLogger("bigbatch").info("run directory: %s", run_dir)
    summary = train(config, run_dir, resume=args.resume is not None)
    if _launcher_rank() != 0:
        return 0  # under torchrun rank 0 reports for the job
    print(
        f"{run_dir}: final val error {summary['final_val_error_pct']:.2f}% "
        f"(best {summary['best_val_error_pct']:.2f}%) after {summary['updates']} updates, "
        f"{summary['wall_time_s']:.1f} s"
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


def _cmd_models(args: argparse.Namespace) -> int:
    from bigbatch import models

    rows = [("model", "dataset", "regime", "clip", "description")]
    for name in models.names():
        spec = models.get_spec(name)
        clip = "-" if spec.default_clip_grad_norm is None else f"{spec.default_clip_grad_norm:g}"
        rows.append((name, spec.default_dataset, _regime_summary(spec.default_regime), clip,
                     spec.description))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(f"{c:<{w}}" for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    return 0


def _dataset_size(args: argparse.Namespace, dataset: str) -> int:
    if args.dataset_size is not None:
        return args.dataset_size
    if args.train_subset is not None:
        return args.train_subset
    from bigbatch import data

    return data.get_info(dataset).num_train


def _cmd_regime(args: argparse.Namespace) -> int:
    from bigbatch import models
    from bigbatch.recipes import format_adaptation_table
    from bigbatch.train.config import RunConfig, resolve_regime

    dataset = args.dataset or models.get_spec(args.model).default_dataset
    keys = {"model": args.model, "dataset": dataset, "batch_size": args.batch_size}
    config = RunConfig.from_dict({**keys, **key_values(args, _REGIME_KEYS)})
    size = _dataset_size(args, dataset)
    before, after = resolve_regime(config, size)
    print(f"{config.model} on {dataset} ({size} training samples), lr scaling "
          f"{config.lr_scaling}, regime adaptation {config.regime_adaptation}")
    print(format_adaptation_table(before, after, base_batch_size=config.base_batch_size,
                                  batch_size=config.batch_size, dataset_size=size))
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from bigbatch import data

    path = data.download(args.name, args.data_dir)
    print(f"{args.name}: verified files in {path}")
    return 0


# -- reproduce, report (issue 5's modules, imported when used) -------------------------------------
def _cmd_reproduce(args: argparse.Namespace) -> int:
    from bigbatch.reproduce import run_grid

    overrides = {}
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
                        overrides=overrides or None, progress=args.progress)
    if _launcher_rank() == 0:
        print(f"grid: {grid_dir}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from bigbatch.report import write_report

    md_path, html_path = write_report(args.run_dir)
    print(f"report: {md_path} and {html_path}")
    return 0


def _cmd_advise(args: argparse.Namespace) -> int:
    from bigbatch.train.noise import advise_run_dir

    print("\n".join(advise_run_dir(args.run_dir)))
    return 0


# -- entry point ----------------------------------------------------------------------------------
def _raised_inside_bigbatch(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is bigbatch code (not torch, not ours
    by accident of a library): our layers raise ValueError for user input such as ghost sizes."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    try:
        return Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE_DIR)
    except (OSError, ValueError):
        return False


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input or divergence, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Under torchrun only rank 0 logs progress; the other processes still report warnings.
    quiet = args.quiet or _launcher_rank() != 0
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    try:
        return int(args.handler(args) or 0)
    except BigBatchError as e:
        print(f"bigbatch: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except ValueError as e:
        if not _raised_inside_bigbatch(e):
            raise
        print(f"bigbatch: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bigbatch: interrupted (a run continues with `bigbatch train --resume RUN_DIR`)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
