"""Readers: every exact on-disk format round-trips; bad files raise a DataError naming the file."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from datafiles import (
    cifar_pickle_bytes,
    idx_bytes,
    write_bytes,
    write_cifar,
    write_mnist,
    write_tar_gz,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from bigbatch.data import load_cifar_split, load_idx_split, load_split
from bigbatch.data.cifar import parse_cifar_binary, parse_cifar_pickle, safe_unpickle
from bigbatch.data.idx import parse_idx, read_idx
from bigbatch.errors import DataError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------- round trips of every exact format


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_idx_round_trip(tmp_path, gz):
    written = write_mnist(tmp_path, gz=gz)
    for split in ("train", "test"):
        images, labels = load_idx_split(tmp_path, split)
        assert images.dtype == np.uint8 and images.shape == (len(labels), 1, 28, 28)
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(images, written[split][0])
        np.testing.assert_array_equal(labels, written[split][1])


def test_mnist_through_load_split_and_subdir(tmp_path):
    written = write_mnist(tmp_path / "mnist", gz=False)
    images, labels = load_split("mnist", tmp_path, "test")  # found in data_dir/<name>
    np.testing.assert_array_equal(labels, written["test"][1])


def test_idx_other_dtypes():
    array = np.arange(6, dtype=">i4").reshape(2, 3)
    out = parse_idx(idx_bytes(array))
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


CIFAR_CASES = [(n, v, a) for n in (10, 100) for v in ("python", "binary") for a in (False, True)]


@pytest.mark.parametrize(
    "num_classes,version,archive",
    CIFAR_CASES,
    ids=[f"cifar{n}-{v}-{'tgz' if a else 'dir'}" for n, v, a in CIFAR_CASES],
)
def test_cifar_round_trip(tmp_path, num_classes, version, archive):
    written = write_cifar(tmp_path, num_classes, version, archive=archive)
    for split in ("train", "test"):
        images, labels = load_cifar_split(tmp_path, split, num_classes)
        assert images.dtype == np.uint8 and images.shape == (len(labels), 3, 32, 32)
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(images, written[split][0])
        np.testing.assert_array_equal(labels, written[split][1])


def test_cifar_through_load_split(tmp_path):
    written = write_cifar(tmp_path / "cifar100", 100, "python", archive=True)
    images, labels = load_split("cifar100", tmp_path, "train")
    np.testing.assert_array_equal(labels, written["train"][1])
    assert images.shape == (4, 3, 32, 32)


def test_cifar_pixel_layout_is_channel_major():
    """The 3072 bytes are 1024 red, then 1024 green, then 1024 blue values, rows first."""
    flat = np.zeros((1, 3072), np.uint8)
    flat[0, 1024 + 32 * 2 + 5] = 200  # green channel, row 2, column 5
    images, _ = parse_cifar_pickle(
        cifar_pickle_bytes(flat, np.array([3]), "labels"), "x", "labels", 10
    )
    assert images[0, 1, 2, 5] == 200 and images.sum() == 200


def test_pickle_names_real_numpy_core_module():
    data = cifar_pickle_bytes(np.zeros((1, 3072), np.uint8), np.array([0]), "labels")
    assert b"numpy.core.multiarray\n_reconstruct" in data


# ---------------------------------------------------------------- hostile pickles


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class _WriteFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "owned"))


@pytest.mark.parametrize("payload", [_Exploit, _WriteFile])
def test_malicious_pickle_refused_and_runs_nothing(tmp_path, payload):
    target = tmp_path / "pwned"
    data = pickle.dumps({"data": payload(target), "labels": [0]}, protocol=2)
    pickle.loads(data)  # positive control: an ordinary unpickler does run the payload
    assert target.exists()
    target.unlink()
    folder = tmp_path / "cifar-10-batches-py"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write_bytes(folder / name, data)
    with pytest.raises(
        DataError, match=r"data_batch_1: refusing to load (posix.system|__builtin__.getattr)"
    ):
        load_cifar_split(tmp_path, "train", 10)
    assert not target.exists()


def test_pickle_builtins_eval_refused():
    data = b"cbuiltins\neval\n(S'1+1'\ntR."
    with pytest.raises(DataError, match="refusing to load builtins.eval"):
        safe_unpickle(data, "evil")


# ---------------------------------------------------------------- corrupt files: clear messages


def _idx_dir(tmp_path, images_bytes, labels_bytes):
    write_bytes(tmp_path / "train-images-idx3-ubyte", images_bytes)
    write_bytes(tmp_path / "train-labels-idx1-ubyte", labels_bytes)
    return tmp_path


def test_idx_wrong_magic(tmp_path):
    labels = idx_bytes(np.zeros(3, np.uint8))
    _idx_dir(tmp_path, labels, labels)  # labels where the images belong
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: wrong magic number 0x00000801"):
        load_idx_split(tmp_path, "train")


def test_idx_truncated(tmp_path):
    images = idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-10]
    _idx_dir(tmp_path, images, idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(
        DataError,
        match=r"train-images-idx3-ubyte: header says shape \(3, 28, 28\).*"
        r"truncated",
    ):
        load_idx_split(tmp_path, "train")


def test_idx_count_mismatch(tmp_path):
    _idx_dir(tmp_path, idx_bytes(np.zeros((3, 28, 28), np.uint8)), idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DataError, match="holds 3 images but .* holds 4 labels"):
        load_idx_split(tmp_path, "train")


def test_idx_corrupt_gzip(tmp_path):
    good = gzip.compress(idx_bytes(np.zeros((3, 28, 28), np.uint8)))
    (tmp_path / "x.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"x.gz: the gzip stream is truncated"):
        read_idx(tmp_path / "x.gz")
    (tmp_path / "y.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"y.gz: not a valid gzip file"):
        read_idx(tmp_path / "y.gz")


def test_idx_missing_labels_file(tmp_path):
    write_bytes(tmp_path / "train-images-idx3-ubyte.gz", idx_bytes(np.zeros((3, 28, 28), np.uint8)))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\[.gz\]: file not found"):
        load_idx_split(tmp_path, "train")


def test_cifar_truncated_binary(tmp_path):
    write_cifar(tmp_path, 10, "binary")
    path = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(
        DataError, match=r"test_batch.bin: .* not a whole number of 3073-byte records"
    ):
        load_cifar_split(tmp_path, "test", 10)


def test_cifar_truncated_archive(tmp_path):
    write_cifar(tmp_path, 10, "python", archive=True)
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"cifar-10-python.tar.gz: corrupt or truncated archive"):
        load_cifar_split(tmp_path, "train", 10)


def test_cifar_archive_missing_member(tmp_path):
    write_tar_gz(tmp_path / "cifar-10-python.tar.gz", {"cifar-10-batches-py/test_batch": b"x"})
    with pytest.raises(DataError, match=r"no member 'cifar-10-batches-py/data_batch_1'"):
        load_cifar_split(tmp_path, "train", 10)


def test_cifar_wrong_version_keys(tmp_path):
    write_cifar(tmp_path, 10, "python")  # CIFAR-10 files have 'labels', not 'fine_labels'
    folder = tmp_path / "cifar-10-batches-py"
    with pytest.raises(DataError, match=r"test_batch: no 'fine_labels' entry"):
        parse_cifar_pickle(
            (folder / "test_batch").read_bytes(), str(folder / "test_batch"), "fine_labels", 100
        )


def test_cifar_label_out_of_range():
    data = cifar_pickle_bytes(np.zeros((2, 3072), np.uint8), np.array([0, 10]), "labels")
    with pytest.raises(DataError, match=r"labels must lie in \[0, 10\), found \[0, 10\]"):
        parse_cifar_pickle(data, "b", "labels", 10)


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"cifar10 train files not found .*--download"):
        load_split("cifar10", tmp_path)
    with pytest.raises(DataError, match=r"mnist .*--data-dir DIR"):
        load_split("mnist", tmp_path / "does-not-exist")


def test_explicit_data_dir_never_falls_back_to_the_default(tmp_path):
    # Fashion-MNIST has a default directory (the Debian package); a --data-dir typo must not
    # silently train on it instead.
    with pytest.raises(DataError, match=r"fashion-mnist train files not found .*typo"):
        load_split("fashion-mnist", tmp_path / "typo")


def test_data_dir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(DataError, match=r"file: is a file, but --data-dir must be a directory"):
        load_split("mnist", path)


def test_fashion_mnist_message_names_debian_package(tmp_path, monkeypatch):
    from bigbatch.data import registry

    info = registry.DATASETS["fashion-mnist"]
    monkeypatch.setitem(
        registry.DATASETS,
        "fashion-mnist",
        registry.replace(info, default_dir=str(tmp_path / "absent")),
    )
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_split("fashion-mnist")


# ---------------------------------------------------------------- fuzz: only DataError, never a
# hang

_GOOD_IDX = idx_bytes(np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4))
_GOOD_PICKLE = cifar_pickle_bytes(np.zeros((2, 3072), np.uint8), np.array([1, 2]), "labels")


def _mutate(data: bytes, edits) -> bytes:
    buf = bytearray(data)
    for position, value in edits:
        if buf:
            buf[position % len(buf)] = value
    return bytes(buf)


_edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4)


@settings(max_examples=150)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.builds(_mutate, st.just(_GOOD_IDX), _edits),
        st.builds(lambda d, n: d[:n], st.just(_GOOD_IDX), st.integers(0, len(_GOOD_IDX))),
    )
)
def test_fuzz_idx(data):
    try:
        array = parse_idx(data, "fuzz")
    except DataError:
        return
    assert array.size * array.dtype.itemsize <= len(data)


@settings(max_examples=150)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.builds(_mutate, st.just(_GOOD_PICKLE), _edits),
        st.builds(lambda d, n: d[:n], st.just(_GOOD_PICKLE), st.integers(0, len(_GOOD_PICKLE))),
    )
)
def test_fuzz_cifar_pickle(data):
    try:
        images, labels = parse_cifar_pickle(data, "fuzz", "labels", 10)
    except DataError:
        return
    assert images.shape == (len(labels), 3, 32, 32) and images.dtype == np.uint8


@settings(max_examples=60)
@given(st.binary(max_size=7000), st.sampled_from([1, 2]))
def test_fuzz_cifar_binary(data, label_bytes):
    try:
        images, labels = parse_cifar_binary(
            data, "fuzz", label_bytes, 10 if label_bytes == 1 else 100
        )
    except DataError:
        return
    assert len(images) == len(labels) == len(data) // (3072 + label_bytes)


# ---------------------------------------------------------------- the real embedded default


@pytest.mark.skipif(
    not FASHION_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist():
    train_x, train_y = load_split("fashion-mnist", split="train")
    test_x, test_y = load_split("fashion-mnist", split="test")
    assert train_x.shape == (60000, 1, 28, 28) and test_x.shape == (10000, 1, 28, 28)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int64
    assert set(np.unique(train_y)) == set(range(10)) and set(np.unique(test_y)) == set(range(10))
    assert np.bincount(train_y).tolist() == [6000] * 10  # Fashion-MNIST is exactly balanced
    mean, std = train_x.mean() / 255, (train_x / 255).std()
    assert abs(mean - 0.2860) < 1e-3 and abs(std - 0.3530) < 1e-3  # the registered constants
