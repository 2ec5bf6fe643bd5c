"""The paper's large-batch recipe in a plain PyTorch training loop, with one call to large_batch.

A small-batch set-up (model, SGD, a regime tuned at batch 32) becomes the large-batch one: ghost
batch norm, lr x sqrt(B/B0), B/B0 times more epochs (as many updates as at batch 32), a warm-up,
gradient clipping and a scheduler stepped once per update. Runs on bigbatch's synthetic data:

    python examples/plain_loop.py --batch-size 256
"""

import argparse

import torch
from torch import nn

import bigbatch
from bigbatch.data import load_split

# The small-batch regime: 2 epochs at batch 32, lr / 10 for the last half epoch.
BASE_REGIME = {"epochs": 2, "phases": [
    {"epoch": 0, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}, {"epoch": 1.5, "lr": 0.01}]}


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-batch-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-updates", type=int, default=None, help="stop early (for tests)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    images, labels = load_split("synthetic", split="train")  # uint8 (N, 1, 8, 8), int64 (N,)
    x = torch.from_numpy(images).float().div(255).flatten(1)
    y = torch.from_numpy(labels)
    model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    lb = bigbatch.large_batch(model, optimizer, BASE_REGIME, base_batch_size=args.base_batch_size,
                              batch_size=args.batch_size, dataset_size=len(x), warmup_epochs=1.0)
    print(lb.describe())
    model, scheduler = lb.model, lb.scheduler
    total = lb.num_updates if args.max_updates is None else min(lb.num_updates, args.max_updates)

    update = 0
    while update < total:
        for batch in torch.randperm(len(x)).split(args.batch_size):
            if update == total:
                break
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), lb.clip_grad_norm)
            optimizer.step()
            scheduler.step()  # once per update, after optimizer.step()
            update += 1
    print(f"{update} updates, last lr {scheduler.get_last_lr()[0]:.4g}, loss {loss.item():.4f}")
    return loss.item()


if __name__ == "__main__":
    main()
