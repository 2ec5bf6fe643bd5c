"""The paper's large-batch recipe on a LightningModule, with the LargeBatch callback.

The module and its optimizer are the small-batch ones; the callback converts BatchNorm to ghost
batch norm, scales the lr, stretches the regime (+RA), warms up, clips, steps the schedule once per
optimizer step and logs ||w_t - w_0||. Gradient accumulation makes the large batch:

    python examples/lightning_train.py --batch-size 256
"""

import argparse

import lightning as L
import torch
from torch import nn

from bigbatch.data import load_split
from bigbatch.integrations.lightning import LargeBatch

BASE_REGIME = {"epochs": 2, "phases": [
    {"epoch": 0, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}, {"epoch": 1.5, "lr": 0.01}]}


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
                                 nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=True, prog_bar=True)
        return loss

    def configure_optimizers(self):  # the small-batch optimizer; the callback schedules it
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def main(argv=None) -> L.Trainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-batch-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256, help="samples per update")
    parser.add_argument("--micro-batch-size", type=int, default=64, help="samples per step")
    parser.add_argument("--max-updates", type=int, default=-1, help="stop early (for tests)")
    parser.add_argument("--out", default="lightning_logs_example")
    args = parser.parse_args(argv)
    L.seed_everything(0, verbose=False)

    images, labels = load_split("synthetic", split="train")
    data = torch.utils.data.TensorDataset(torch.from_numpy(images).float().div(255).flatten(1),
                                          torch.from_numpy(labels))
    loader = torch.utils.data.DataLoader(data, batch_size=args.micro_batch_size, shuffle=True)
    callback = LargeBatch(BASE_REGIME, base_batch_size=args.base_batch_size,
                          batch_size=args.batch_size, warmup_epochs=1.0, clip_grad_norm=5.0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, max_steps=args.max_updates,
                        accumulate_grad_batches=args.batch_size // args.micro_batch_size,
                        callbacks=[callback], default_root_dir=args.out, log_every_n_steps=4,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Classifier(), loader)  # stops when the adapted regime's updates are done
    print(f"{trainer.global_step} updates of {callback.num_updates}, "
          f"loss {float(trainer.callback_metrics['train_loss']):.4f}")
    return trainer


if __name__ == "__main__":
    main()
