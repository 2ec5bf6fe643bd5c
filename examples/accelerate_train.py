"""The paper's large-batch recipe in a Hugging Face Accelerate loop: large_batch + an Accelerator.

One update is ``--batch-size`` samples: per-process batches of ``--micro-batch-size``, accumulated
over ``batch_size / (micro_batch_size x processes)`` steps. The scheduler is stepped by hand once
per update (not passed to ``prepare``, which would step it once per process). On one process or
several, CPU or GPU:

    accelerate launch --cpu examples/accelerate_train.py
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \
        examples/accelerate_train.py

(the last: two CPU processes, gloo; without ACCELERATE_USE_CPU=1 a machine with no GPU runs two
independent single-process copies).
"""

import argparse

import torch
from accelerate import Accelerator
from torch import nn

import bigbatch
from bigbatch.data import load_split

BASE_REGIME = {"epochs": 2, "phases": [
    {"epoch": 0, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}, {"epoch": 1.5, "lr": 0.01}]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-batch-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256, help="samples per update")
    parser.add_argument("--micro-batch-size", type=int, default=64, help="per process and step")
    parser.add_argument("--max-updates", type=int, default=None, help="stop early (for tests)")
    args = parser.parse_args(argv)
    accelerator = Accelerator()
    steps, rest = divmod(args.batch_size, args.micro_batch_size * accelerator.num_processes)
    if rest or not steps:
        parser.error(f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size x "
                     f"{accelerator.num_processes} processes")
    accelerator.gradient_accumulation_steps = steps  # same as Accelerator(gradient_accumulation_..)
    torch.manual_seed(0)  # the same initial model on every process

    images, labels = load_split("synthetic", split="train")
    data = torch.utils.data.TensorDataset(torch.from_numpy(images).float().div(255).flatten(1),
                                          torch.from_numpy(labels))
    loader = torch.utils.data.DataLoader(data, batch_size=args.micro_batch_size, shuffle=True)
    model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    lb = bigbatch.large_batch(model, optimizer, BASE_REGIME, base_batch_size=args.base_batch_size,
                              batch_size=args.batch_size, dataset_size=len(data))
    model, optimizer, loader = accelerator.prepare(lb.model, optimizer, loader)
    total = lb.num_updates if args.max_updates is None else min(lb.num_updates, args.max_updates)

    update = 0
    while update < total:
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = nn.functional.cross_entropy(model(x), y)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), lb.clip_grad_norm)
                optimizer.step()  # a no-op on accumulation steps
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                lb.scheduler.step()
                update += 1
                if update == total:
                    break
    loss = accelerator.reduce(loss.detach(), reduction="mean").item()
    accelerator.print(f"{accelerator.num_processes} processes x {steps} accumulation steps: "
                      f"{update} updates, last lr {lb.scheduler.get_last_lr()[0]:.6g}, "
                      f"loss {loss:.4f}")


if __name__ == "__main__":
    main()
