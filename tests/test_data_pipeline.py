"""Loaders: determinism from (seed, epoch, step), resume, shards, augmentation, splits, folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datafiles import write_image_folder
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from bigbatch.data import DATASETS, FolderLoader, InMemoryLoader, build_loaders, load_split
from bigbatch.data.folder import scan_folder
from bigbatch.data.pipeline import apply_crop_flip, shard_bounds
from bigbatch.data.registry import split_indices
from bigbatch.errors import ConfigError, DataError


def _cifar_like(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(
        n
    ) % 10


def _loader(n=50, batch_size=16, seed=0, augmentation="crop_flip", **kw):
    x, y = _cifar_like(n)
    return InMemoryLoader(
        x,
        y,
        batch_size=batch_size,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        augmentation=augmentation,
        seed=seed,
        **kw,
    )


def _epoch(loader, epoch, **kw):
    return [(x.clone(), y.clone()) for x, y in loader.iterate(epoch, **kw)]


def _same(a, b):
    return len(a) == len(b) and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True)
    )


def test_same_seed_same_batches_and_different_epochs_or_seeds_differ():
    a, b = _loader(), _loader()
    assert _same(_epoch(a, 0), _epoch(b, 0))
    assert not _same(_epoch(a, 0), _epoch(a, 1))
    assert not _same(_epoch(a, 0), _epoch(_loader(seed=1), 0))


def test_resume_at_start_step_equals_tail_of_full_epoch():
    loader = _loader()
    full = _epoch(loader, 3)
    assert _same(_epoch(loader, 3, start_step=2), full[2:])
    assert not _same(_epoch(loader, 3, start_step=2), full[1:-1])  # negative control
    assert _epoch(loader, 3, start_step=len(loader)) == []


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_shards_concatenate_to_global_batch(world_size):
    loader = _loader(batch_size=16)
    full = _epoch(loader, 1)
    shards = [_epoch(loader, 1, shard=(r, world_size)) for r in range(world_size)]
    for step, (x, y) in enumerate(full):
        assert torch.equal(torch.cat([s[step][0] for s in shards]), x)
        assert torch.equal(torch.cat([s[step][1] for s in shards]), y)
        sizes = [s[step][0].shape[0] for s in shards]
        assert max(sizes) - min(sizes) <= 1


def test_batch_count_and_single_sample_trim():
    assert [b.numel() for b in _loader(n=50, batch_size=16).batch_indices(0)] == [16, 16, 16, 2]
    trimmed = _loader(n=49, batch_size=16)  # 16+16+16+1: the lone sample is dropped
    assert len(trimmed) == 3 and [b.numel() for b in trimmed.batch_indices(0)] == [16, 16, 16]
    evaluation = _loader(
        n=49, batch_size=16, train=False
    )  # evaluation keeps every sample, in order
    assert len(evaluation) == 4
    assert torch.equal(torch.cat(evaluation.batch_indices(0)), torch.arange(49))


def test_every_sample_once_per_epoch():
    loader = _loader(n=50, batch_size=16)
    for epoch in range(3):
        assert sorted(torch.cat(loader.batch_indices(epoch)).tolist()) == list(range(50))


def test_shapes_dtypes_and_normalisation_without_augmentation():
    x, y = _cifar_like(20)
    loader = InMemoryLoader(
        x,
        y,
        batch_size=8,
        mean=(0.5, 0.4, 0.3),
        std=(0.2, 0.25, 0.3),
        augmentation="none",
        train=False,
    )
    xb, yb = next(loader.iterate(0))
    assert xb.shape == (8, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(xb, (x[:8].float() / 255 - mean) / std)
    assert torch.equal(yb, y[:8])


def _reference_crop_flip(image, dy, dx, flip, padding=4):
    """Per-sample reference, written from the definition: zero-pad, slice, mirror."""
    c, h, w = image.shape
    padded = torch.zeros(c, h + 2 * padding, w + 2 * padding, dtype=image.dtype)
    padded[:, padding : padding + h, padding : padding + w] = image
    out = padded[:, dy : dy + h, dx : dx + w]
    return out.flip(2) if flip else out


def test_crop_flip_matches_per_sample_reference():
    x, _ = _cifar_like(12)
    g = torch.Generator().manual_seed(3)
    dy, dx = torch.randint(0, 9, (12,), generator=g), torch.randint(0, 9, (12,), generator=g)
    flip = torch.rand(12, generator=g) < 0.5
    flip[:2] = torch.tensor([True, False])
    dy[0], dx[0] = 0, 8  # extreme offsets: zero padding enters the crop
    out = apply_crop_flip(x, dy, dx, flip)
    for i in range(12):
        assert torch.equal(
            out[i], _reference_crop_flip(x[i], int(dy[i]), int(dx[i]), bool(flip[i]))
        )


def test_augmentation_changes_images_but_not_labels():
    plain = _epoch(_loader(augmentation="none"), 0)
    augmented = _epoch(_loader(augmentation="crop_flip"), 0)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(plain, augmented, strict=True))
    assert not torch.equal(plain[0][0], augmented[0][0])


def test_synthetic_dataset_is_deterministic_and_learnable():
    x1, y1 = load_split("synthetic", split="train")
    x2, _ = load_split("synthetic", split="train")
    assert x1.shape == (2048, 1, 8, 8) and np.array_equal(x1, x2)
    assert np.bincount(y1).min() >= 200
    train, val, info = build_loaders("synthetic", batch_size=64, seed=0)
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 8)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(3):
        for xb, yb in train.iterate(epoch):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    with torch.no_grad():
        correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in val.iterate(0))
    assert correct / val.num_samples > 0.5  # chance is 0.1


def test_held_out_and_subset_fixed_disjoint_and_seed_independent():
    train, val = split_indices(100, held_out=20, train_subset=30)
    assert len(train) == 30 and len(val) == 20 and not set(train.tolist()) & set(val.tolist())
    train2, val2 = split_indices(100, held_out=20, train_subset=30)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    a, va, _ = build_loaders("synthetic", batch_size=32, seed=0, held_out=100, train_subset=500)
    b, vb, _ = build_loaders("synthetic", batch_size=32, seed=7, held_out=100, train_subset=500)
    assert a.num_samples == 500 and va.num_samples == 100
    assert torch.equal(a.images, b.images) and torch.equal(va.images, vb.images)
    assert not torch.equal(
        a.batch_indices(0)[0], b.batch_indices(0)[0]
    )  # the run seed still shuffles
    with pytest.raises(ConfigError, match="held_out"):
        split_indices(10, held_out=10)
    with pytest.raises(ConfigError, match="train_subset"):
        split_indices(10, held_out=5, train_subset=6)


def test_registry_entries():
    assert set(DATASETS) == {
        "mnist",
        "fashion-mnist",
        "cifar10",
        "cifar100",
        "imagenet",
        "synthetic",
    }
    for info in DATASETS.values():
        assert len(info.mean) == len(info.std) == info.in_channels
        assert info.augmentation in ("none", "crop_flip", "imagenet")
    with pytest.raises(ConfigError, match="unknown dataset 'cifar'"):
        build_loaders("cifar", batch_size=8)


def test_loader_rejects_bad_arguments():
    loader = _loader()
    with pytest.raises(ValueError, match="start_step"):
        next(loader.iterate(0, start_step=len(loader) + 1))
    with pytest.raises(ValueError, match="shard"):
        next(loader.iterate(0, shard=(2, 2)))
    with pytest.raises(ValueError, match="uint8"):
        InMemoryLoader(torch.zeros(2, 1, 2, 2), torch.zeros(2), batch_size=1, mean=(0,), std=(1,))


# ---------------------------------------------------------------- image folders (ImageNet style)


def test_folder_scan_and_eval_decoding(tmp_path):
    written = write_image_folder(tmp_path)
    samples = scan_folder(tmp_path / "val")
    assert [(p, lab) for p, lab, _ in written["val"]] == samples
    # image_size larger than the image: eval resize is exact enough to check the mean colour.
    loader = FolderLoader(
        samples,
        batch_size=4,
        mean=(0.0,) * 3,
        std=(1.0,) * 3,
        image_size=8,
        train=False,
        num_workers=0,
    )
    batches = list(loader.iterate(0))
    assert [x.shape for x, _ in batches] == [(4, 3, 8, 8), (2, 3, 8, 8)]
    assert torch.cat([y for _, y in batches]).tolist() == [lab for _, lab, _ in written["val"]]
    assert all(0.0 <= x.min() and x.max() <= 1.0 for x, _ in batches)


def test_folder_loader_workers_deterministic_resume_and_shards(tmp_path):
    write_image_folder(tmp_path)
    train, val, info = build_loaders(
        "imagenet", data_dir=tmp_path, batch_size=6, seed=1, image_size=12, num_workers=2
    )
    assert info.num_classes == 3 and info.image_size == 12 and len(train) == 3  # 15 = 6 + 6 + 3
    full = _epoch(train, 0)
    assert [x.shape[1:] for x, _ in full] == [(3, 12, 12)] * 3
    single = FolderLoader(
        scan_folder(tmp_path / "train"),
        batch_size=6,
        mean=info.mean,
        std=info.std,
        image_size=12,
        seed=1,
        num_workers=0,
    )
    assert _same(full, _epoch(single, 0))  # worker count changes nothing
    assert _same(_epoch(single, 0, start_step=1), full[1:])
    halves = [_epoch(single, 0, shard=(r, 2)) for r in range(2)]
    assert torch.equal(torch.cat([halves[0][0][0], halves[1][0][0]]), full[0][0])
    assert not _same(full, _epoch(single, 1))


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="needs --data-dir"):
        build_loaders("imagenet", batch_size=4)
    with pytest.raises(DataError, match=r"train: directory not found"):
        build_loaders("imagenet", data_dir=tmp_path, batch_size=4)
    write_image_folder(tmp_path, per_class={"train": 2, "val": 1})
    bad = tmp_path / "train" / "cat" / "broken.png"
    bad.write_bytes(b"not a png")
    loader = FolderLoader(
        scan_folder(tmp_path / "train"),
        batch_size=8,
        mean=(0,) * 3,
        std=(1,) * 3,
        image_size=4,
        train=False,
        num_workers=0,
    )
    with pytest.raises(DataError, match=r"broken.png: cannot decode image"):
        list(loader.iterate(0))


def test_random_resized_crop_output_size():
    from bigbatch.data.folder import center_crop, random_resized_crop

    image = Image.fromarray(np.zeros((30, 50, 3), np.uint8))
    rng = np.random.default_rng(0)
    assert random_resized_crop(image, 16, rng).size == (16, 16)
    assert center_crop(image, 16).size == (16, 16)


def test_read_only_reader_arrays_load_without_warning():
    # IDX readers hand out read-only np.frombuffer views; the loader must accept them silently
    # (pytest turns warnings into errors) and must not alias the caller's buffer.
    raw = np.frombuffer(bytes(range(256)) * 3, dtype=np.uint8)[: 3 * 1 * 8 * 8].reshape(3, 1, 8, 8)
    labels = np.frombuffer(np.arange(3, dtype=np.int64).tobytes(), dtype=np.int64)
    assert not raw.flags.writeable
    loader = InMemoryLoader(raw, labels, batch_size=2, mean=(0.0,), std=(1.0,))
    (x, y), *_ = loader.iterate(0)
    assert x.shape == (2, 1, 8, 8) and y.dtype == torch.int64


@given(st.integers(1, 200), st.integers(1, 9))
def test_shard_bounds_partition_a_batch_in_rank_order(n, world_size):
    # The one sharding formula (training batches, evaluation batches, the set-up checks).
    bounds = [shard_bounds(n, (r, world_size)) for r in range(world_size)]
    assert [i for start, stop in bounds for i in range(start, stop)] == list(range(n))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1
    assert shard_bounds(n, None) == (0, n)


def test_batch_size_at_is_the_global_batch_of_each_step():
    x = torch.zeros(10, 1, 2, 2, dtype=torch.uint8)
    loader = InMemoryLoader(x, torch.arange(10), batch_size=3, mean=(0.0,), std=(1.0,))
    # 10 = 3 + 3 + 3 + 1: the last sample is dropped, as batch_indices does
    assert [loader.batch_size_at(k) for k in range(len(loader))] == [
        b.numel() for b in loader.batch_indices(0)] == [3, 3, 3]
    # under DDP each process sees its slice (1 and 2 of 3 samples); the mean divides by 3
    assert [len(y) for _, y in loader.iterate(0, shard=(0, 2))] == [1, 1, 1]
    assert [len(y) for _, y in loader.iterate(0, shard=(1, 2))] == [2, 2, 2]
    with pytest.raises(ValueError, match=r"step must be in \[0, 3\)"):
        loader.batch_size_at(3)
