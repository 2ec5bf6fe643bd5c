"""Write a grid's report: report.md (figures beside it) and a self-contained report.html.

The HTML needs nothing but itself: CSS inline, figures embedded as ``data:image/png;base64`` URIs,
no scripts, fonts or links to fetch, so it can be mailed or attached to an issue as one file.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

from bigbatch.fileio import atomic_write_bytes
from bigbatch.report.diffusion import diffusion_fit
from bigbatch.report.grid import GridData, load_grid
from bigbatch.report.prose import description, narrative, preset_evidence, title
from bigbatch.report.stats import (
    ArmRow,
    arm_rows,
    arm_settings,
    markdown_table,
    settings_cells,
    table_cells,
)

__all__ = ["atomic_write", "write_report"]

FIGURE_DIR = "figures"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 60rem;
       margin: 2rem auto; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; }
h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.88rem; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.55rem; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; font-weight: 600; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; } figcaption { font-size: 0.85rem; color: #555; }
code { background: #f5f5f5; padding: 0 0.2rem; } .note { color: #8a4b00; }
"""


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically; returns the path.

    A thin wrapper of :func:`bigbatch.fileio.atomic_write_bytes` (temp file, fsync, rename,
    directory fsync; disk full is a one-line StorageError) that returns the path.
    """
    atomic_write_bytes(path, data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


@dataclass
class _Doc:
    """An ordered list of blocks rendered to both markdown and HTML, so the two never disagree."""

    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def paragraph(self, text: str, note: bool = False) -> None:
        self.blocks.append(("p", text, note))

    def items(self, items: list[str]) -> None:
        self.blocks.append(("ul", items))

    def table(self, header: list[str], cells: list[list[str]]) -> None:
        self.blocks.append(("table", header, cells))

    def image(self, name: str, png: bytes, caption: str) -> None:
        self.blocks.append(("img", name, png, caption))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, *rest in self.blocks:
            if kind == "h2":
                out += [f"## {rest[0]}", ""]
            elif kind == "p":
                out += [f"> {rest[0]}" if rest[1] else rest[0], ""]
            elif kind == "ul":
                out += [f"- {item}" for item in rest[0]] + [""]
            elif kind == "table":
                out += [markdown_table(rest[0], rest[1]), ""]
            elif kind == "img":
                name, _, caption = rest
                out += [f"![{caption}]({FIGURE_DIR}/{name})", "", f"*{caption}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        out = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(self.title)}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>{html.escape(self.title)}</h1>",
        ]
        for kind, *rest in self.blocks:
            if kind == "h2":
                out.append(f"<h2>{html.escape(rest[0])}</h2>")
            elif kind == "p":
                css = ' class="note"' if rest[1] else ""
                out.append(f"<p{css}>{_inline(rest[0])}</p>")
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in rest[0]) + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{html.escape(h)}</th>" for h in rest[0])
                body = "".join(
                    "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                    for row in rest[1]
                )
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif kind == "img":
                name, png, caption = rest
                data = base64.b64encode(png).decode("ascii")
                out.append(
                    f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                )
        out.append("</body></html>")
        return "\n".join(out)


def _inline(text: str) -> str:
    """Escape text for HTML, turning markdown `code` spans into <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def _unique(runs, key: str) -> str:
    values = sorted({str(r.summary.get(key)) for r in runs if r.summary.get(key) is not None})
    return ", ".join(values) if values else "unknown"


def _evidence(grid: GridData) -> list[str]:
    runs = [r for a in grid.arms for r in grid.complete_runs(a)]
    wall = sum(float(r.summary.get("wall_time_s") or 0.0) for r in runs)
    finished = sorted(
        dt.datetime.fromtimestamp((r.path / "summary.json").stat().st_mtime, dt.timezone.utc)
        for r in runs
    )
    items = [
        f"seeds: {', '.join(map(str, grid.seeds)) or 'none'} ({len(runs)} complete runs of "
        f"{len(grid.arms) * len(grid.seeds)})",
        f"device: {_unique(runs, 'device')} ({_unique(runs, 'device_name')})",
        f"torch: {_unique(runs, 'torch_version')}",
        f"bigbatch: {_unique(runs, 'bigbatch_version')}",
        f"git commit: {_unique(runs, 'git_commit')}",
        f"total wall time of the runs: {wall:.1f} s ({wall / 60:.1f} min)",
    ]
    if finished:
        items.append(
            f"runs finished between {finished[0]:%Y-%m-%d %H:%M} and "
            f"{finished[-1]:%Y-%m-%d %H:%M} UTC"
        )
    items.append(f"report written {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
    return items


def _setup(grid: GridData) -> list[str]:
    base, spec = grid.preset.get("base", {}), grid.preset.get("grid", {})
    items = []
    for key in (
        "model",
        "model_options",
        "dataset",
        "train_subset",
        "held_out",
        "base_batch_size",
        "epochs",
        "clip",
        "clip_grad_norm",  # its old name, in grids written before 0.2
    ):
        if key in base:
            items.append(f"{key}: {base[key]}")
    for key in ("large_batch_size", "ghost_batch_size"):
        if key in spec:
            items.append(f"{key}: {spec[key]}")
    regime = base.get("regime")
    if isinstance(regime, dict):
        phases = "; ".join(
            ", ".join(f"{k} {v}" for k, v in phase.items()) for phase in regime.get("phases", [])
        )
        rescaled = (
            f" (rescaled to {base['epochs']} epochs by `epochs`, milestones in proportion)"
            if "epochs" in base
            else ""
        )
        items.append(f"regime: {regime.get('epochs', '?')} epochs, {phases}{rescaled}")
    elif "model" in base:
        items.append("regime: the model's default (see each run's config.toml)")
    if grid.preset.get("overrides"):
        items.append(f"overrides: {grid.preset['overrides']}")
    return items


def write_report(grid_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.md`` (figures in ``figures/``) and a self-contained ``report.html``.

    Works on incomplete grids: missing runs are listed and the statistics use the complete runs.

    Args:
        grid_dir: the directory :func:`bigbatch.reproduce.run_grid` wrote (grid.toml + run dirs).

    Returns:
        (path of report.md, path of report.html).

    Example:
        >>> md, html_path = write_report("runs/demo")  # doctest: +SKIP
    """
    grid = load_grid(grid_dir)
    rows = arm_rows(grid)
    fits = {
        arm: fit
        for arm in ("SB", "LB")
        if arm in grid.arms
        if (fit := diffusion_fit(grid, arm)) is not None
    }
    settings = arm_settings(grid)
    doc = _Doc(title(grid))
    doc.paragraph(description(grid, settings))
    evidence, is_note = preset_evidence(grid)
    if evidence:
        doc.paragraph(evidence, note=is_note)

    doc.heading("Results")
    doc.table(*table_cells(rows))
    doc.paragraph(_RESULTS_NOTE + (_PAPER_NOTE if grid.paper else ""))
    doc.heading("What each arm changes")
    doc.table(*settings_cells(settings))
    doc.paragraph(_SETTINGS_NOTE)
    for text in narrative(grid, rows, fits):
        doc.paragraph(text, note=text.startswith("This grid is incomplete"))

    doc.heading("Figures")
    for file_name, png, caption in _figures(grid, rows, fits):
        if png is None:
            doc.paragraph(f"({file_name}: no data yet.)", note=True)
            continue
        atomic_write(grid.path / FIGURE_DIR / file_name, png)
        doc.image(file_name, png, caption)

    _noise_section(doc, grid)
    doc.heading("Setup")
    doc.items(_setup(grid))
    if (grid.path / "grid.toml").is_file():
        doc.paragraph(
            f"Reproduce with `bigbatch reproduce --preset {grid.path / 'grid.toml'} "
            "--out NEW_DIR`: grid.toml holds the resolved preset with every override applied."
        )
    doc.heading("Evidence")
    doc.items(_evidence(grid))
    md_path = atomic_write(grid.path / "report.md", doc.markdown())
    html_path = atomic_write(grid.path / "report.html", doc.html())
    return md_path, html_path


def _noise_section(doc: _Doc, grid: GridData) -> None:
    """B_simple, AdaScale beside +RA and the batch-size advice, when some arm measured them."""
    from bigbatch.report import noise

    if not noise.measured_arms(grid):
        return
    doc.heading("Gradient noise scale and AdaScale")
    doc.table(*noise.noise_cells(grid))
    doc.paragraph(_NOISE_NOTE)
    doc.items(noise.advice_lines(grid))
    png = noise.plot_noise_scale(grid)
    if png is not None:
        atomic_write(grid.path / FIGURE_DIR / "b_simple_updates.png", png)
        doc.image("b_simple_updates.png", png, "Gradient noise scale B_simple (running estimate) "
                  "vs updates per arm that measured it, and AdaScale's gain where it ran.")


_NOISE_NOTE = (
    "B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018) from the squared gradient norms of "
    "micro-batches (or processes) and of the whole batch, as moving averages; AdaScale's gain r "
    "multiplies the base lr and its progress tau counts small-batch updates, so its run ends "
    "when tau reaches SB's updates (+RA takes all of them). The advice lines are what `bigbatch "
    "advise RUN_DIR` prints for the arm's first complete seed."
)


_RESULTS_NOTE = (
    "Validation error: final evaluation of each run, mean ± sample standard deviation over seeds "
    "(complete runs only). Wall time: each run's wall-clock time, evaluation and checkpoints "
    "included, mean per run. Train samples/s: training samples per second of training time "
    "(each update timed with the loading of its batch; evaluation and checkpoints excluded), "
    "from metrics.csv, mean per run."
)
_PAPER_NOTE = " Paper accuracy: the published Table 1 number (validation accuracy %)."
_SETTINGS_NOTE = (
    "Settings from grid.toml, resolved as the engine resolves them (lr after the arm's scaling "
    "rule; epochs, lr drops and warm-up after regime adaptation); updates and samples as the "
    "runs counted them (mean over complete runs)."
)


def _figures(grid: GridData, rows: list[ArmRow], fits: dict) -> list[tuple[str, bytes | None, str]]:
    """(file name, PNG bytes or None, caption) of every figure, in the report's order."""
    from bigbatch.report import plots

    band = "line: mean over seeds; band: min to max"
    return [
        ("val_error_epochs.png", plots.plot_curves(grid, "val_error_pct", "epoch"),
         f"Validation error vs epochs per arm ({band}); beside the linear axis a log axis when "
         "one arm trains much longer, so neither the short nor the long arms are squeezed."),
        ("val_error_time.png", plots.plot_curves(grid, "val_error_pct", "wall_time_s"),
         f"Validation error vs wall-clock time of the run, evaluation included ({band})."),
        ("val_error_updates.png", plots.plot_curves(grid, "val_error_pct", "updates"),
         f"Validation error vs updates (log scale) per arm ({band})."),
        ("losses.png", plots.plot_losses(grid),
         f"Training loss (running mean over each evaluation interval, in training mode) and "
         f"validation loss vs epochs ({band})."),
        ("lr_schedule.png", plots.plot_lr_schedules(grid),
         "Learning rate of each arm vs updates, as logged in metrics.csv and diffusion.csv "
         "(first complete seed)."),
        ("weight_distance.png", plots.plot_diffusion(grid, fits),
         "||w_t − w_0|| vs updates for SB and LB, with a + b·ln t (solid) and a + b·√t (dotted) "
         "fitted over the updates before the first lr drop."),
        ("generalization_gap.png", plots.plot_generalization_gap(rows),
         "Final training vs validation error per arm (mean ± std over seeds). The training "
         "error is the engine's running average over the last evaluation interval, in training "
         "mode (dropout, batch statistics), so it can exceed the validation error."),
    ]  # fmt: skip
