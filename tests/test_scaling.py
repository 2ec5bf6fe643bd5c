"""Learning-rate scaling rules: values, algebraic properties and error messages."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigbatch.errors import ConfigError
from bigbatch.recipes import SCALING_RULES, lr_scale_factor, scale_lr

batch_sizes = st.integers(1, 1 << 16)


@pytest.mark.parametrize(
    ("rule", "base", "batch", "expected"),
    [
        ("sqrt", 128, 4096, math.sqrt(32)),
        ("sqrt", 128, 512, 2.0),
        ("linear", 128, 4096, 32.0),
        ("linear", 256, 128, 0.5),
        ("none", 128, 4096, 1.0),
        ("sqrt", 128, 128, 1.0),
    ],
)
def test_factor_values(rule, base, batch, expected):
    assert lr_scale_factor(base, batch, rule) == pytest.approx(expected, rel=1e-15)


def test_scale_lr_paper_example():
    # Official code: lr = lr0 * (B / 128) ** 0.5 -> 0.1 at 128 becomes 0.1 * sqrt(32) at 4096.
    assert scale_lr(0.1, 128, 4096) == pytest.approx(0.565685424949238)
    assert scale_lr(0.1, 128, 4096, "linear") == pytest.approx(3.2)
    assert scale_lr(0.1, 128, 4096, "none") == 0.1


@given(base=batch_sizes, batch=batch_sizes)
def test_sqrt_is_square_root_of_linear(base, batch):
    assert lr_scale_factor(base, batch, "sqrt") ** 2 == pytest.approx(
        lr_scale_factor(base, batch, "linear"), rel=1e-12
    )


@given(a=batch_sizes, b=batch_sizes, c=batch_sizes, rule=st.sampled_from(SCALING_RULES))
def test_factors_compose(a, b, c, rule):
    # Scaling 128 -> 1024 -> 4096 must equal scaling 128 -> 4096 directly.
    direct = lr_scale_factor(a, c, rule)
    assert lr_scale_factor(a, b, rule) * lr_scale_factor(b, c, rule) == pytest.approx(direct)


rules = st.sampled_from(SCALING_RULES)


@given(lr=st.floats(0, 10), base=batch_sizes, batch=batch_sizes, rule=rules)
def test_scale_lr_is_lr_times_factor(lr, base, batch, rule):
    assert scale_lr(lr, base, batch, rule) == pytest.approx(lr * lr_scale_factor(base, batch, rule))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: lr_scale_factor(128, 256, "cube"), r"rule 'cube'; allowed: 'sqrt', 'linear'"),
        (lambda: lr_scale_factor(0, 256), r"base_batch_size must be a positive integer, got 0"),
        (lambda: lr_scale_factor(128, -4), r"batch_size must be a positive integer, got -4"),
        (lambda: lr_scale_factor(128, 256.0), r"batch_size must be a positive integer, got 256.0"),
        (lambda: lr_scale_factor(True, 256), r"base_batch_size must be a positive int.*True"),
        (lambda: scale_lr(-0.1, 128, 256), r"lr must be a finite number >= 0, got -0.1"),
        (lambda: scale_lr(float("nan"), 128, 256), r"lr must be a finite number >= 0, got nan"),
    ],
)
def test_errors_name_the_value(call, match):
    with pytest.raises(ConfigError, match=match):
        call()
