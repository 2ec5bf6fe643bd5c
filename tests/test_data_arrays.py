"""load_split's arrays go into torch.from_numpy without a warning (writable, native, contiguous)."""

from __future__ import annotations

import warnings

import pytest
import torch
from datafiles import write_cifar, write_mnist

from bigbatch.data import load_split

CASES = [("mnist", None, True), ("mnist", None, False), ("fashion-mnist", None, True),
         ("cifar10", "python", False), ("cifar10", "binary", True), ("cifar100", "python", True),
         ("cifar100", "binary", False), ("synthetic", None, False)]


@pytest.mark.parametrize("name,version,packed", CASES,
                         ids=[f"{n}-{v or ''}-{'packed' if p else 'plain'}" for n, v, p in CASES])
def test_arrays_are_writable_and_from_numpy_is_silent(tmp_path, name, version, packed):
    if "mnist" in name:
        written = write_mnist(tmp_path / name, gz=packed)
    elif name != "synthetic":
        written = write_cifar(tmp_path / name, int(name[5:]), version, archive=packed)
    for split in ("train", "test"):
        images, labels = load_split(name, tmp_path, split)
        for array in (images, labels):
            assert array.flags.writeable and array.flags.c_contiguous and array.dtype.isnative
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch warns (UserWarning) on a read-only array
            x, y = torch.from_numpy(images), torch.from_numpy(labels)
        x[:1] = 0  # writing through the tensor is allowed and does not touch the file cache
        if name != "synthetic":
            assert y.tolist() == written[split][1].tolist()
        assert load_split(name, tmp_path, split)[0].shape == images.shape
