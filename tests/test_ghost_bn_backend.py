"""One switch for ghost batch norm's code path (BIGBATCH_GBN_BACKEND) and backend_for's answers."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from bigbatch.errors import ConfigError
from bigbatch.layers import (
    _cpu_kernel,
    backend,
    backend_for,
    backend_summary,
    cpu_kernel_status,
    ghost_batch_norm,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")


@pytest.fixture(autouse=True)
def fresh_backend_state(monkeypatch):
    """No switch set, no failed launch or warning remembered from another test."""
    monkeypatch.delenv("BIGBATCH_GBN_BACKEND", raising=False)
    monkeypatch.delenv("BIGBATCH_CPU_KERNEL", raising=False)
    monkeypatch.setattr(backend, "_failed", {})
    monkeypatch.setattr(backend, "_warned", set())


@pytest.fixture
def ran(monkeypatch):
    """Which kernel's forward ran: "c", "triton", or nothing (the PyTorch ops)."""
    calls = []
    modules = {"c": _cpu_kernel}
    if HAS_TRITON:
        from bigbatch.layers import _triton_kernel

        modules["triton"] = _triton_kernel
    for name, module in modules.items():
        original = module.forward

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "forward", spy)
    return calls


def _call(x):
    return ghost_batch_norm(x, None, None, ghost_batch_size=4, training=True)


@pytest.mark.parametrize(
    "value, expected",
    [("torch", "torch"), ("c", "c"), ("auto", "c"), ("", "c"), (" C ", "c"),
     pytest.param("triton", "triton", marks=needs_triton)],
)  # fmt: skip
def test_switch_chooses_the_code_that_runs(monkeypatch, ran, value, expected):
    if not _cpu_kernel.available() and expected == "c":
        pytest.skip(_cpu_kernel.status())
    monkeypatch.setenv("BIGBATCH_GBN_BACKEND", value)
    x = torch.randn(10, 3)
    assert backend_for(x) == (expected, "")
    _call(x)
    assert ran == ([] if expected == "torch" else [expected])


def test_bad_switch_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("BIGBATCH_GBN_BACKEND", "cuda")
    with pytest.raises(ConfigError, match=r"BIGBATCH_GBN_BACKEND='cuda' is not a ghost batch norm "
                       r"backend; use one of auto, c, triton, torch"):  # fmt: skip
        _call(torch.randn(10, 3))


def test_old_cpu_switch_still_works_with_a_deprecation_warning(monkeypatch, ran, caplog):
    monkeypatch.setenv("BIGBATCH_CPU_KERNEL", "0")
    with caplog.at_level(logging.WARNING, logger="bigbatch.layers.backend"):
        assert backend_for(torch.ones(4, 3)) == ("torch", "BIGBATCH_CPU_KERNEL=0")
        _call(torch.randn(10, 3))
        _call(torch.randn(10, 3))
    assert ran == []
    (record,) = caplog.records  # the deprecation, once; the fallback it asked for is not warned
    assert "BIGBATCH_CPU_KERNEL is deprecated; use BIGBATCH_GBN_BACKEND=torch" in record.message


def test_c_kernel_disabled_block_is_the_ops_without_a_warning(ran, caplog):
    with caplog.at_level(logging.WARNING), _cpu_kernel.disabled():
        assert backend_for(torch.ones(4, 3)).name == "torch"
        _call(torch.randn(10, 3))
    assert ran == [] and caplog.records == []


def test_c_asked_for_a_tensor_it_cannot_take(monkeypatch):
    monkeypatch.setenv("BIGBATCH_GBN_BACKEND", "c")
    choice = backend_for(torch.ones(4, 3, device="meta"))
    assert choice == ("torch", "the C kernel runs on CPU tensors, not meta")
    assert backend_for(torch.ones(4, 3, dtype=torch.int64)).reason.startswith("torch.int64 input")


def test_auto_elsewhere_is_the_ops():
    assert backend_for(torch.ones(4, 3, device="meta")) == (
        "torch", "no ghost batch norm kernel for meta tensors"
    )  # fmt: skip


@needs_triton
def test_triton_on_cpu_needs_the_interpreter(monkeypatch, ran, caplog):
    monkeypatch.setenv("BIGBATCH_GBN_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    choice = backend_for(torch.ones(4, 3))
    assert choice.name == "torch" and "TRITON_INTERPRET=1" in choice.reason
    with caplog.at_level(logging.WARNING, logger="bigbatch.layers.backend"):
        _call(torch.randn(10, 3))
        _call(torch.randn(10, 3))
    assert ran == [] and len(caplog.records) == 1
    assert "falls back to the PyTorch ops: Triton runs on CUDA tensors" in caplog.text


def test_summary_line(monkeypatch):
    expected = "c" if _cpu_kernel.available() else "torch"
    assert backend_summary("cpu").startswith(expected)
    if expected == "c":
        assert backend_summary("cpu") == f"c ({_cpu_kernel.status()})"
    monkeypatch.setenv("BIGBATCH_GBN_BACKEND", "torch")
    assert backend_summary("cpu") == "torch"
    assert cpu_kernel_status().startswith("ghost batch norm CPU kernel: ")  # still there

