"""The report's words: its title, what the grid ran, the preset's evidence, and the paragraphs.

Every sentence is computed from the grid (grid.toml and the runs' summaries): batch sizes, epochs,
seeds and the lr-scaling rule are those that ran, never the preset's description of itself. The
preset's own text appears only in :func:`preset_evidence`, labelled as the preset's, and only when
the grid ran the preset unchanged.
"""

from __future__ import annotations

import math

from bigbatch.report.diffusion import DiffusionFit
from bigbatch.report.grid import GridData, RunData, nan0
from bigbatch.report.stats import ArmRow, fmt_count

__all__ = ["description", "narrative", "preset_evidence", "title"]


def title(grid: GridData) -> str:
    """``bigbatch reproduction: <preset name>``."""
    return f"bigbatch reproduction: {grid.preset.get('name', grid.path.name)}"


def _plural(n: float, word: str) -> str:
    return f"{fmt_count(n)} {word}{'s' * (n != 1)}"


def description(grid: GridData, settings: list[dict[str, object]]) -> str:
    """One paragraph on what this grid ran: model, data, batch sizes, epochs, lr rule, seeds."""
    base = grid.preset.get("base", {})
    by_arm = {s["arm"]: s for s in settings}
    first = next((r.summary for a in grid.arms for r in grid.complete_runs(a)), {})
    model = base.get("model", first.get("model"))
    dataset = base.get("dataset", first.get("dataset"))
    parts = [f"{model or 'a model'} on {dataset or 'a dataset'}"]
    if base.get("train_subset"):
        parts[0] += f" (a {base['train_subset']}-sample training subset)"
    sb, lb = by_arm.get("SB"), next((by_arm[a] for a in grid.arms if a != "SB"), None)
    batches = []
    if sb and sb.get("batch_size"):
        batches.append(f"small batch {sb['batch_size']}")
    if lb and lb.get("batch_size"):
        batches.append(f"large batch {lb['batch_size']}")
        if sb and sb.get("batch_size"):
            batches[-1] += f" (×{lb['batch_size'] / sb['batch_size']:g})"
    parts.append(" against ".join(batches) if batches else "batch sizes unknown")
    epochs = [s.get("epochs") for s in settings if s["arm"] != "LB+LR+GBN+RA"]
    ra = by_arm.get("LB+LR+GBN+RA", {}).get("epochs")
    if epochs and epochs[0] is not None:
        ra_text = f" ({fmt_count(ra)} with regime adaptation)" if ra is not None else ""
        parts.append(_plural(epochs[0], "epoch") + ra_text)
    elif ra is not None:
        parts.append(f"{_plural(ra, 'epoch')} with regime adaptation")
    grid_table = grid.preset.get("grid", {})
    if any(a in grid.arms for a in ("LB+LR", "LB+LR+GBN", "LB+LR+GBN+RA")):
        parts.append(f"+LR with {grid_table.get('lr_scaling', 'sqrt')} lr scaling")
    if grid_table.get("ghost_batch_size") and any("GBN" in a for a in grid.arms):
        parts.append(f"ghost batch {grid_table['ghost_batch_size']}")
    seeds = ", ".join(map(str, grid.seeds)) or "none"
    done = sum(len(grid.complete_runs(a)) for a in grid.arms)
    return (
        f"This grid ran {', '.join(parts)}; arms {', '.join(grid.arms) or 'none'}; "
        f"{_plural(len(grid.seeds), 'seed')} ({seeds}); {done} of "
        f"{len(grid.arms) * len(grid.seeds)} runs complete."
    )


def preset_evidence(grid: GridData) -> tuple[str, bool]:
    """The preset's own description and evidence, labelled, or the line that says what differs.

    Returns:
        ``(text, is_note)``: ``text`` is empty when the preset states nothing; ``is_note`` marks
        the text that says the preset's numbers do not apply to this grid.
    """
    preset = grid.preset
    evidence = preset.get("evidence")
    texts = (preset.get("description"),
             evidence.get("text") if isinstance(evidence, dict) else evidence)  # fmt: skip
    own = " ".join(" ".join(str(t).split()) for t in texts if t)
    if not own:
        return "", False
    name = preset.get("name", "?")
    differences = preset.get("differences")
    if differences:
        return (
            f"Not the preset's setting: this grid differs from preset {name!r} in "
            f"{'; '.join(differences)}. The preset's own evidence was measured with its settings, "
            "so it is not shown here; the numbers below are this grid's only.",
            True,
        )
    checked = (
        "this grid runs it unchanged"
        if differences is not None
        else "grid.toml does not record whether this grid changed it"
    )
    return (
        f"Preset evidence (the preset's own text, written by its authors for preset {name!r}; "
        f"{checked}; not computed from these runs): {own}",
        differences is None,
    )


def narrative(grid: GridData, rows: list[ArmRow], fits: dict[str, DiffusionFit]) -> list[str]:
    """Sentences computed from the numbers (one paragraph per returned string).

    "Within the seed spread of SB" means mean validation error <= SB's mean + SB's standard
    deviation over seeds (with one SB seed: <= SB's error). A gap counts as clear when it exceeds
    twice the pooled seed standard deviation of SB and LB.
    """
    by_arm = {r.arm: r for r in rows if r.n_seeds > 0}
    paragraphs: list[str] = []
    missing = grid.missing_runs()
    if missing:
        names = ", ".join(f"{r.arm} seed {r.seed} ({r.status})" for r in missing)
        diverged = any(r.status == "diverged" for r in missing)
        paragraphs.append(
            f"This grid is incomplete: {len(missing)} of {len(grid.arms) * len(grid.seeds)} runs "
            f"are not complete: {names}. Statistics below use the complete runs only; run the same "
            "`bigbatch reproduce` command again to finish the missing runs."
            + (" Diverged runs are not retried and are left out of their arm's statistics, "
               "which makes that arm look better than it is." if diverged else "")  # fmt: skip
        )
    sb, lb = by_arm.get("SB"), by_arm.get("LB")
    if sb is None or lb is None:
        paragraphs.append(
            "The generalization gap cannot be measured: SB and LB each need at least one "
            "complete run."
        )
    else:
        paragraphs.append(" ".join(_gap_sentences(grid, by_arm, sb, lb)))
    for text in (_diffusion_sentences(fits), _paper_sentence(grid, by_arm)):
        if text:
            paragraphs.append(text)
    return paragraphs


def _spread(*stds: float) -> float:
    """Pooled seed standard deviation of the given arms (0 when no arm has two seeds)."""
    known = [s for s in stds if not math.isnan(s)]
    return math.sqrt(sum(s * s for s in known) / len(known)) if known else 0.0


def _ran(grid: GridData, arm: str, key: str) -> object:
    """A setting as the arm's complete runs recorded it (their summary.json), or None."""
    values = {r.summary.get(key) for r in grid.complete_runs(arm)} - {None}
    return values.pop() if len(values) == 1 else None


def _gap_sentences(grid: GridData, by_arm: dict[str, ArmRow], sb: ArmRow, lb: ArmRow) -> list[str]:
    """The gap LB − SB and what each remedy arm does to it."""
    spread = _spread(sb.val_error_std, lb.val_error_std)
    gap = lb.val_error_mean - sb.val_error_mean
    sentences = [] if sb.n_seeds > 1 and lb.n_seeds > 1 else [
        "SB or LB has a single seed, so there is no seed spread; the comparisons below are of "
        "single runs and can be noise."
    ]  # fmt: skip
    clear_gap = gap > 2 * spread and gap > 0
    sentences.append(_gap_verdict(grid, sb, lb, gap, spread))
    if lb.updates > 0 and sb.updates > 0:
        if lb.epochs == sb.epochs:
            when = f"In the same number of epochs ({fmt_count(lb.epochs)}) LB takes"
        else:
            when = f"LB takes, in {_plural(lb.epochs, 'epoch')} against SB's "
            when += f"{fmt_count(sb.epochs)},"
        sentences.append(
            f"{when} {fmt_count(lb.updates)} updates against SB's {fmt_count(sb.updates)}."
        )
    tol = nan0(sb.val_error_std)
    remedies = [by_arm[a] for a in ("LB+LR", "LB+LR+GBN", "LB+LR+GBN+RA") if a in by_arm]
    sentences += [_remedy_sentence(grid, row, sb, lb, clear_gap) for row in remedies]
    if clear_gap:
        closed = [r.arm for r in remedies if r.val_error_mean - sb.val_error_mean <= tol]
        where = "within SB's seed spread" if tol > 0 else "at or below SB's error"
        spread_text = " within its seed spread" if tol > 0 else ""
        sentences.append(
            f"Arms {where}: {', '.join(closed)}." if closed
            else f"No arm reaches SB's error{spread_text}."
        )  # fmt: skip
    ra = by_arm.get("LB+LR+GBN+RA")
    if ra is not None and sb.wall_time_s > 0 and not math.isnan(ra.wall_time_s):
        sentences.append(
            f"Regime adaptation costs {fmt_count(ra.updates)} updates over "
            f"{_plural(ra.epochs, 'epoch')} "
            f"({ra.wall_time_s / sb.wall_time_s:.1f}× SB's wall time)."
        )
    return sentences


def _gap_verdict(grid: GridData, sb: ArmRow, lb: ArmRow, gap: float, spread: float) -> str:
    """Whether LB ends clearly worse than SB, clearly better, or within the seed spread."""
    seeds = (
        f"{_plural(sb.n_seeds, 'seed')} each" if sb.n_seeds == lb.n_seeds
        else f"{lb.n_seeds} and {sb.n_seeds} seeds"
    )  # fmt: skip
    units = f", {abs(gap) / spread:.1f}× the pooled seed standard deviation" if spread > 0 else ""
    versus = (
        f"(LB {lb.val_error_mean:.2f} vs SB {sb.val_error_mean:.2f} % validation error, "
        f"{seeds}{units})"
    )
    batches = [_ran(grid, a, "batch_size") for a in ("LB", "SB")]
    named = f" (LB, batch {batches[0]}, against SB's {batches[1]})" if all(batches) else " (LB)"
    if gap > 2 * spread and gap > 0:
        return f"Large-batch training{named} ends {gap:.2f} points worse than SB {versus}: " \
            "a generalization gap."  # fmt: skip
    if gap < -2 * spread and gap < 0:
        return f"LB ends {-gap:.2f} points better than SB {versus}: no generalization gap in " \
            "this setting, so the remedies have nothing to close."  # fmt: skip
    return f"LB ends {_versus(gap, 'SB')} {versus}, within twice the seed " \
        "spread: no clear generalization gap in this setting, so the remedies have nothing " \
        "to close."  # fmt: skip


def _versus(delta: float, other: str) -> str:
    """``"1.23 points worse than SB"`` for an error difference, in words rather than a sign."""
    if f"{abs(delta):.2f}" == "0.00":
        return f"level with {other}"  # to the 0.01 points the report shows
    return f"{abs(delta):.2f} points {'worse' if delta > 0 else 'better'} than {other}"


def _remedy_sentence(grid: GridData, row: ArmRow, sb: ArmRow, lb: ArmRow, clear_gap: bool) -> str:
    """What one remedy arm does to the gap, with "worse"/"better" said in words, not signs."""
    delta = row.val_error_mean - sb.val_error_mean
    tol = nan0(sb.val_error_std)
    versus_sb = _versus(delta, "SB")
    if not clear_gap:
        return f"{row.arm} ends {versus_sb}."
    if delta < -tol:
        return f"{row.arm} closes the gap and ends {versus_sb}."
    if delta <= tol:
        return f"{row.arm} closes the gap: it ends {versus_sb}, within SB's seed spread."
    if row.val_error_mean < lb.val_error_mean:
        share = 100 * (lb.val_error_mean - row.val_error_mean) / (lb.val_error_mean
                                                                   - sb.val_error_mean)
        return f"{row.arm} recovers {share:.0f}% of the gap but still ends {versus_sb} " \
            f"({_versus(row.val_error_mean - lb.val_error_mean, 'LB')})."  # fmt: skip
    if row.val_error_mean > lb.val_error_mean + max(tol, nan0(row.val_error_std)):
        return _below_lb(row, lb, grid)
    return f"{row.arm} does not narrow the gap: it ends {versus_sb}, as LB does."


def _peak_lr(runs: list[RunData]) -> float:
    lrs = [r.get("lr", math.nan) for run in runs for r in run.diffusion + run.metrics]
    lrs = [lr for lr in lrs if not math.isnan(lr)]
    return max(lrs) if lrs else math.nan


def _below_lb(row: ArmRow, lb: ArmRow, grid: GridData) -> str:
    """The honest sentence for a remedy that made things worse than plain LB."""
    worse = row.val_error_mean - lb.val_error_mean
    text = f"{row.arm} is below LB ({worse:.2f} points more validation error)"
    if math.isnan(row.train_error_mean) or row.train_error_mean <= lb.train_error_mean + 1.0:
        return text + (
            f", although it fits the training set as well as LB (train error "
            f"{row.train_error_mean:.2f} vs {lb.train_error_mean:.2f} %)."
        )
    rule = _ran(grid, row.arm, "lr_scaling") or grid.preset.get("grid", {}).get("lr_scaling")
    lr = _peak_lr(grid.complete_runs(row.arm))
    what = f"the {rule}-scaled lr" if rule and rule != "none" else "the lr"
    if not math.isnan(lr):
        what += f" {lr:.3g}"
    return text + (
        f": its training error is also higher ({row.train_error_mean:.2f} vs "
        f"{lb.train_error_mean:.2f} % for LB), so it fails to fit rather than to generalize — "
        f"with only {fmt_count(row.updates)} updates {what} is unstable (warm-up or more updates "
        "are the levers)."
    )


def _diffusion_sentences(fits: dict[str, DiffusionFit]) -> str:
    parts = []
    for arm, fit in fits.items():
        better = "log t fits better" if fit.log_r2 >= fit.sqrt_r2 else "sqrt t fits better"
        # A regime without an lr drop has no "initial phase" end: the fit covers the whole run.
        span = (
            f"before update {fmt_count(fit.end_update)}"
            if math.isfinite(fit.end_update)
            else "over the whole run (no lr drop)"
        )
        parts.append(
            f"{arm}: ||w_t − w_0|| ≈ {fit.log_a:.3g} + {fit.log_b:.3g}·ln t with "
            f"R² = {fit.log_r2:.3f} against R² = {fit.sqrt_r2:.3f} for a + b·sqrt t ({better}; "
            f"{fit.num_points} points {span})"
        )
    if not parts:
        return ""
    return "Weight distance in the initial high-lr phase — " + "; ".join(parts) + "."


def _paper_sentence(grid: GridData, by_arm: dict[str, ArmRow]) -> str:
    paper = grid.paper
    if "SB" not in paper or "LB" not in paper:
        return ""
    ours = ""
    if "SB" in by_arm and "LB" in by_arm:
        here = by_arm["SB"].val_accuracy_mean - by_arm["LB"].val_accuracy_mean
        ours = f"; here SB−LB accuracy is {here:.2f} points"
    text = (
        f"The paper reports {paper['SB']:.2f} % (SB) and {paper['LB']:.2f} % (LB) accuracy, "
        f"a gap of {paper['SB'] - paper['LB']:.2f} points{ours}."
    )
    if "LB+LR+GBN+RA" in paper and "LB+LR+GBN+RA" in by_arm:
        text += (
            f" With all three remedies the paper reaches {paper['LB+LR+GBN+RA']:.2f} %; this grid "
            f"{by_arm['LB+LR+GBN+RA'].val_accuracy_mean:.2f} %."
        )
    source = (grid.preset.get("paper") or {}).get("source")
    if source:
        text += f" (Paper numbers: {source}.)"
    return text
