"""Command-line interface: ``bigbatch train | eval | models | datasets | regime | download |
reproduce | presets | report``; the handlers are in :mod:`bigbatch.commands`.

``main(argv)`` returns an exit code. Errors caused by the user's input (bigbatch's own exception
types, and ``ValueError`` raised inside bigbatch, e.g. by a ghost batch norm layer) are printed as
one line, ``bigbatch: error: <message>``, with exit code 2 and no traceback; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from bigbatch import commands
from bigbatch.errors import BigBatchError
from bigbatch.flags import add_key_flags

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

  # extend a finished run to 8 epochs: the last lr phase runs on, milestones stay where they were
  bigbatch train --resume runs/f1-4096 --epochs 8

  # fine-tune from a run's weights; then evaluate a run (bigbatch eval RUN_DIR --split test)
  bigbatch train --init-from runs/f1-4096/checkpoints/best.pt --dataset mnist --out runs/ft

outputs (in --out): config.toml, metrics.csv/.jsonl (one row per evaluation), diffusion.csv/.jsonl
(weight distance from initialisation), checkpoints/last.pt and best.pt, summary.json.
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=100)


class _Parser(argparse.ArgumentParser):
    """No abbreviations (``--batch`` is not ``--batch-size``): a prefix that happens to match
    today would silently mean another flag once a longer one is added."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _refuse_unknown(parser: argparse.ArgumentParser, command: str | None,
                    extras: list[str]) -> None:  # fmt: skip
    """Exit with the usage of the subcommand the unknown arguments were given to, naming the
    nearest flag of that subcommand (``--batchsize``: did you mean ``--batch-size``?)."""
    import difflib

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    target = sub.choices.get(command, parser) if command else parser
    flags = [o for a in target._actions for o in a.option_strings if o.startswith("--")]
    hints = []
    for extra in extras:
        if extra.startswith("--"):
            close = difflib.get_close_matches(extra.partition("=")[0], flags, n=1, cutoff=0.6)
            hints += [f"did you mean {close[0]}?"] if close else []
    target.error(f"unrecognized arguments: {' '.join(extras)}"
                 + (f" ({'; '.join(hints)})" if hints else ""))


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
                        "config.toml); with --epochs E, extend it to E base epochs: the last "
                        "phase of the schedule runs on, milestones stay where they were")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in config_keys().values():
        if spec.group not in groups:
            groups[spec.group] = p.add_argument_group(spec.group)
    add_key_flags(groups)
    p.set_defaults(handler=commands.cmd_train)


def _add_import_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--import", "--imports", dest="imports", action="append", metavar="MODULE",
                   help="import MODULE first (it registers models or datasets; from sys.path and "
                        "the current directory; repeatable)")


def _add_models_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered models", formatter_class=_HelpFormatter,
                       description="List registered models with their default dataset and regime.")
    _add_import_flag(p)
    p.set_defaults(handler=commands.cmd_models)
    p = sub.add_parser("datasets", help="list the known datasets", formatter_class=_HelpFormatter,
                       description="List built-in and registered datasets with their shapes.")
    _add_import_flag(p)
    p.set_defaults(handler=commands.cmd_datasets)


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
    p.add_argument("--dataset", help="dataset (default: fashion-mnist, as `bigbatch train`)")
    p.add_argument("--dataset-size", type=int, metavar="N",
                   help="training samples (default: --train-subset or the dataset's size)")
    add_key_flags(p.add_argument_group("regime"), commands.REGIME_KEYS)
    p.set_defaults(handler=commands.cmd_regime)


def _add_download_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="download a dataset (SHA-256 verified)",
                       formatter_class=_HelpFormatter,
                       description="Download a dataset's files and verify their SHA-256.")
    p.add_argument("name", help="dataset name, e.g. fashion-mnist, cifar10")
    p.add_argument("--data-dir", required=True, type=Path, metavar="DIR", help="where to put it")
    p.set_defaults(handler=commands.cmd_download)


def _add_reproduce_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce", help="run the paper's experiment grid from a preset, then the report",
        formatter_class=_HelpFormatter,
        description="Run every arm (SB, LB, +LR, +GBN, +RA) and seed of a preset, skipping "
                    "complete runs, then write the report.",
        epilog=_reproduce_epilog(),
    )
    p.add_argument("--preset", required=True,
                   help="preset name (`bigbatch presets` lists them) or a preset TOML file")
    p.add_argument("--seeds", type=int, metavar="N", help="number of seeds (default: the preset's)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="grid directory (default: runs/<preset>)")
    p.add_argument("--device", help="device for every run (default: auto)")
    p.add_argument("--arms", nargs="+", metavar="ARM",
                   help="run only these arms (SB LB LB+LR LB+LR+GBN LB+LR+GBN+RA; opt-in: "
                        "LB+GBN+AS LB+LARS LB+LAMB)")
    p.add_argument("--epochs", type=float, metavar="E", help="override the base regime's epochs")
    p.add_argument("--batch-size", type=int, metavar="B", help="override the large batch size")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                   help="set any preset key (repeatable; applied last): a [grid] key, a [base] "
                        "run key, or a dotted entry of a [base] table, e.g. --set "
                        "train_subset=2000 --set regime.warmup_epochs=1 (VALUE is TOML)")
    p.add_argument("--data-dir", type=Path, metavar="DIR",
                   help="dataset directory for every run (default: the dataset's own)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=None,
                   help="download the dataset into --data-dir if missing (SHA-256 verified)")
    from bigbatch.train.config import config_keys

    p.add_argument("--progress", choices=config_keys()["progress"].choices, default="auto",
                   help="bar: one display for the whole grid (runs done, time left), the runs "
                        "quiet; log: every run's own log lines; auto: bar on a terminal, else log")
    _add_import_flag(p)
    p.set_defaults(handler=commands.cmd_reproduce)


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a run's checkpoint on its validation or test split",
        formatter_class=_HelpFormatter,
        description="Load RUN_DIR's best.pt (or last.pt) and print its loss and errors. In "
                    "Python, bigbatch.load_model(RUN_DIR) returns the trained model.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a `bigbatch train` run directory")
    p.add_argument("--split", choices=("val", "test"), default="val",
                   help="val: what the run validated on (its --held-out samples, else the test "
                        "set); test: the test set (default: val)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="best.pt (lowest validation error; last.pt if absent) or last.pt")
    p.add_argument("--device", default="auto", help="device (default: auto)")
    p.add_argument("--data-dir", type=Path, metavar="DIR",
                   help="dataset directory (default: the run's)")
    p.set_defaults(handler=commands.cmd_eval)


def _reproduce_epilog() -> str:
    """Examples, then the preset schema as ``bigbatch.reproduce``'s docstring gives it."""
    import bigbatch.reproduce

    doc = bigbatch.reproduce.__doc__ or ""
    start = doc.index("A preset is TOML data")
    schema = doc[start:doc.index("``OUT/grid.toml``", start)].rstrip()
    schema = schema.replace("``", "`").replace("::\n", ":\n")
    return ("examples:\n  bigbatch reproduce --preset demo --out runs/demo\n"
            "  bigbatch reproduce --preset demo --seeds 1 --set train_subset=4000 "
            "--set ghost_batch_size=64\n  bigbatch presets   # the shipped presets\n\n"
            f"{schema}\n")


def _add_presets_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the shipped presets of `bigbatch reproduce`",
                       description="List the presets `bigbatch reproduce --preset NAME` reads, "
                                   "with their grid and description.")
    p.set_defaults(handler=commands.cmd_presets)


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write the report of a grid directory",
                       formatter_class=_HelpFormatter,
                       description="Write report.md and report.html for a `reproduce` grid.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="grid directory")
    p.set_defaults(handler=commands.cmd_report)


def _add_advise_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("advise", help="what a run's measured noise scale says about its batch size",
                       formatter_class=_HelpFormatter,
                       description="Print B_simple over training, the critical batch it implies, "
                                   "the trade-off at the run's batch size and AdaScale's gain "
                                   "(a run trained with --noise-scale).")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory")
    p.set_defaults(handler=commands.cmd_advise)


def build_parser() -> argparse.ArgumentParser:
    """The ``bigbatch`` argument parser with all subcommands."""
    import bigbatch

    parser = _Parser(
        prog="bigbatch",
        description="Train with very large batches without losing accuracy (Hoffer et al. 2017: "
                    "ghost batch norm, lr scaling, regime adaptation).",
        epilog="Run `bigbatch COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"bigbatch {bigbatch.__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)

    for add in (_add_train_parser, _add_eval_parser, _add_models_parser, _add_regime_parser,
                _add_download_parser, _add_reproduce_parser, _add_presets_parser,
                _add_report_parser, _add_advise_parser):
        add(sub)
    return parser


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


def _resume_hint(args: argparse.Namespace) -> str:
    """How to continue what was interrupted, naming its directory."""
    if args.command == "reproduce":
        return "repeat the same `bigbatch reproduce` command to finish the grid"
    run_dir = getattr(args, "run_dir_used", None)
    if run_dir is None:
        return "a run continues with `bigbatch train --resume RUN_DIR`"
    return f"continue with `bigbatch train --resume {run_dir}`"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input or divergence, 130 interrupted)."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        _refuse_unknown(parser, args.command, extras)
    # Under torchrun only rank 0 logs progress; the other processes still report warnings.
    quiet = args.quiet or commands.launcher_rank() != 0
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
        print(f"bigbatch: interrupted ({_resume_hint(args)})", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
