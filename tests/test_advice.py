"""Batch-size advice from a B_simple series: McCandlish's trade-off, the AdaScale gain, verdicts."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigbatch.diagnostics import advise_batch_size


@given(b_crit=st.floats(1.0, 1e6), batch=st.integers(1, 10**6))
def test_the_trade_off_curve_holds(b_crit, batch):
    advice = advise_batch_size([b_crit], batch)
    assert advice.b_crit == b_crit
    # (S / S_min - 1) (E / E_min - 1) = 1
    assert (advice.steps_ratio - 1) * (advice.samples_ratio - 1) == pytest.approx(1.0)
    assert 0.5 <= advice.doubling_steps_ratio < 1.0
    assert advice.adascale_gain is None


def test_hand_computed_example():
    series = [math.nan, -3.0, 100.0, 300.0, 1000.0, 1200.0, 800.0]  # NaN and <= 0 are skipped
    advice = advise_batch_size(series, batch_size=2000, base_batch_size=125)
    assert advice.b_crit == 1000.0  # median of the last half: 1000, 1200, 800
    assert (advice.b_simple_first, advice.b_simple_last) == (100.0, 800.0)
    assert advice.steps_ratio == 1.5 and advice.samples_ratio == 3.0
    assert advice.doubling_steps_ratio == pytest.approx(1.25 / 1.5)
    assert advice.adascale_gain == pytest.approx((1 + 1000 / 125) / (1 + 1000 / 2000))  # 6
    lines = advice.lines()
    assert lines[0].startswith("B_simple: 100 at the start, 800 at the end; critical batch")
    assert "1.5 x the fewest updates" in lines[1] and "3 x the fewest examples" in lines[1]
    assert lines[3] == "AdaScale gain at B = 2000 over B0 = 125: 6 (of at most 16)"
    assert lines[-1] == advice.verdict


@pytest.mark.parametrize(("batch", "start"), [
    (100, "B = 100 is below the critical batch (0.1 x B_crit)"),
    (1000, "B = 1000 is near the critical batch (1 x B_crit)"),
    (5000, "B = 5000 is above the critical batch (5 x B_crit)"),
])
def test_verdicts(batch, start):
    assert advise_batch_size([1000.0], batch).verdict.startswith(start)


@pytest.mark.parametrize(("args", "match"), [
    (([math.nan, 0.0], 128), "no finite, positive B_simple in the series"),
    (([], 128), "no finite, positive B_simple"),
    (([10.0], 0), "batch_size must be an integer >= 1, got 0"),
    (([10.0], 128, 1.5), "base_batch_size must be an integer >= 1, got 1.5"),
    (([10.0], 128, 256), r"batch_size \(128\) must be >= base_batch_size \(256\)"),
])
def test_errors(args, match):
    with pytest.raises(ValueError, match=match):
        advise_batch_size(*args)
