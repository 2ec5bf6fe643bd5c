"""The report says what ran, not what the preset said (issue 15): a grid with overrides, through
the CLI and run_grid, with a stand-in engine (no training)."""

from __future__ import annotations

from test_reproduce import MINI_PRESET, FakeEngine

from bigbatch import reproduce
from bigbatch.reproduce import load_preset, run_grid


def test_preset_differences_name_every_changed_setting():
    demo = load_preset("demo")
    assert reproduce.preset_differences(demo, demo) == []
    changed = {**demo, "base": {**demo["base"], "epochs": 1.0, "device": "cpu"},
               "grid": {**demo["grid"], "seeds": [0], "large_batch_size": 1024}}  # fmt: skip
    assert reproduce.preset_differences(demo, changed) == [
        "[base] epochs: unset -> 1.0",  # device does not change results: not listed
        "[grid] seeds: [0, 1, 2] -> [0]",
        "[grid] large_batch_size: 4096 -> 1024",
    ]


def _report_head(md: str) -> str:
    return md.split("## Results")[0]


def test_report_header_is_computed_from_the_grid_that_ran(tmp_path, monkeypatch):
    from bigbatch.cli import main

    monkeypatch.setattr(reproduce, "_train", FakeEngine())
    out = tmp_path / "grid"
    code = main(["-q", "reproduce", "--preset", "demo", "--out", str(out), "--seeds", "1",
                 "--epochs", "1", "--batch-size", "1024", "--progress", "none"])  # fmt: skip
    assert code == 0
    title, ran, differs = _report_head((out / "report.md").read_text()).split("\n\n")[:3]
    assert title == "# bigbatch reproduction: demo"
    assert "small batch 128 against large batch 1024 (×8)" in ran
    assert "1 epoch (8 with regime adaptation)" in ran and "1 seed (0)" in ran
    # nothing the preset says about itself: not its batch, epochs, seeds or measured numbers
    for preset_fact in ("4096", "5 epochs", "3 seeds", "12.91", "Measured 2026-11-26"):
        assert preset_fact not in title + ran
    assert "differs from preset 'demo' in [base] epochs: unset -> 1.0" in differs
    assert "[grid] seeds: [0, 1, 2] -> [0]; [grid] large_batch_size: 4096 -> 1024" in differs
    assert "Measured 2026-11-26" not in (out / "report.md").read_text()  # nowhere, not only on top
    # the arm table says what each arm ran with, computed the engine's way
    line = next(li for li in (out / "report.md").read_text().splitlines()
                if li.startswith("| LB+LR+GBN+RA | epochs"))  # fmt: skip
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2:9] == ["1024", "128", f"{0.02 * 8 ** 0.5:.4g}", "sqrt", "8", "4.8, 6.4", "0"]


def test_unchanged_preset_shows_its_evidence_labelled(tmp_path, monkeypatch):
    preset = tmp_path / "mini.toml"
    preset.write_text(MINI_PRESET + '[evidence]\ntext = "Measured by the test: SB 10 %."\n')
    monkeypatch.setattr(reproduce, "_train", FakeEngine())
    out = run_grid(preset, tmp_path / "grid", device="cpu", progress="none")
    head = _report_head((out / "report.md").read_text())
    assert "Preset evidence (the preset's own text" in head and "runs it unchanged" in head
    assert "Measured by the test: SB 10 %." in head and "differs from preset" not in head
    # a grid.toml reused as a preset keeps the record of how it differs from the original
    run_grid(preset, tmp_path / "short", device="cpu", progress="none", overrides={"epochs": 1})
    again = run_grid(tmp_path / "short" / "grid.toml", tmp_path / "again", progress="none")
    head = _report_head((again / "report.md").read_text())
    assert "differs from preset 'mini' in [base] epochs: unset -> 1" in head
    assert "Measured by the test" not in head
