"""Shared test settings: CPU, two threads, deterministic, hypothesis profile sized for CI."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(min(2, os.cpu_count() or 1))
# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter (tests ask for them
# with BIGBATCH_GBN_BACKEND=triton). Set before anything imports triton: @triton.jit reads it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# "ci" (the default) is derandomized so that a green suite stays green on the same code; run
# `HYPOTHESIS_PROFILE=explore pytest` to search with fresh random examples (and more of them).
_COMMON = dict(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile("ci", max_examples=40, derandomize=True, **_COMMON)
settings.register_profile("explore", max_examples=300, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):  # not `"gpu" in item.keywords`: a directory named gpu
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def torch_without_batchnorm_bias(monkeypatch):
    """Make this torch behave like one whose _BatchNorm.__init__ has no ``bias=`` (torch 2.11, seen
    on a GPU machine): passing it raises TypeError, and bigbatch's feature flag says so."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from bigbatch.layers import ghost_bn

    original = _BatchNorm.__init__

    def old_init(self, *args, **kwargs):
        if "bias" in kwargs:
            raise TypeError("_BatchNorm.__init__() got an unexpected keyword argument 'bias'")
        original(self, *args, **kwargs)

    monkeypatch.setattr(_BatchNorm, "__init__", old_init)
    monkeypatch.setattr(ghost_bn, "_BN_TAKES_BIAS", False)
