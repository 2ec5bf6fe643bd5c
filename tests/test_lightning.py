"""The Lightning callback on a real lightning.Trainer (CPU): schedule, ghost BN, logs, resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.loggers import Logger  # noqa: E402

import bigbatch  # noqa: E402
from bigbatch.integrations.lightning import LargeBatch  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
    # lightning 2.6 on torch 2.13: its pytree helper uses a deprecated torch name
    pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec.:FutureWarning"),
]
REGIME = {"epochs": 1, "schedule": "cosine", "phases": [
    {"epoch": 0, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    {"epoch": 0.5, "momentum": 0.5}]}


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        bn = list(self.net[1].parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in bn)]
        return torch.optim.SGD([{"params": rest}, {"params": bn, "weight_decay": 0.0}],
                               lr=0.1, momentum=0.9, weight_decay=5e-4)


class Recorder(L.Callback, Logger):
    """Optimizer settings at each step, and what was logged."""

    def __init__(self):
        super().__init__()
        self.settings, self.metrics = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.settings.append([(g["lr"], g["momentum"], g["weight_decay"])
                              for g in optimizer.param_groups])

    name, version = "recorder", 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))


def _loader():
    gen = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4, generator=gen),
                                          torch.randint(0, 3, (64,), generator=gen))
    return torch.utils.data.DataLoader(data, batch_size=16)  # 4 batches an epoch, not shuffled


def _fit(module, tmp_path, max_epochs=-1, ckpt_path=None):
    recorder = Recorder()
    callback = LargeBatch(REGIME, base_batch_size=8, batch_size=32, warmup_epochs=1.0,
                          clip_grad_norm=1.0)
    trainer = L.Trainer(accelerator="cpu", devices=1, accumulate_grad_batches=2,
                        max_epochs=max_epochs, callbacks=[callback, recorder], logger=recorder,
                        log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, _loader(), ckpt_path=ckpt_path)
    return trainer, callback, recorder


def test_the_callback_runs_the_adapted_regime(tmp_path):
    module = Tiny()
    trainer, callback, recorder = _fit(module, tmp_path)
    assert isinstance(module.net[1], bigbatch.GhostBatchNorm1d)
    assert module.net[1].ghost_batch_size == 8
    # +RA: 1 epoch at batch 8 -> 4 epochs at batch 32 (2 updates of 2 x 16 an epoch) = 8 updates.
    assert callback.regime.epochs == 4 and callback.num_updates == trainer.global_step == 8
    for update, groups in enumerate(recorder.settings):
        s = callback.regime.settings_at(update / 2)
        assert groups[0] == (s["lr"], s["momentum"], s["weight_decay"])
        assert groups[1] == (s["lr"], s["momentum"], 0.0)  # the BN group keeps weight_decay=0
    assert recorder.settings[0][0][0] == pytest.approx(0.1)  # warm-up starts at the base lr
    assert len({g[0][0] for g in recorder.settings}) >= 6  # ramp and cosine, not a constant
    logged = [m for _, m in recorder.metrics if "weight_distance" in m]
    assert len(logged) == 8 and 0 < logged[0]["weight_distance"] < logged[-1]["weight_distance"]


def test_resume_from_a_lightning_checkpoint_continues_exactly(tmp_path):
    reference = Tiny()
    _, _, full = _fit(reference, tmp_path / "full")
    first = Tiny()
    trainer, _, _ = _fit(first, tmp_path / "first", max_epochs=2)  # 4 of the 8 updates
    assert trainer.global_step == 4
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = Tiny()
    trainer, _, rest = _fit(resumed, tmp_path / "rest", ckpt_path=ckpt)
    assert trainer.global_step == 8
    assert rest.settings == full.settings[4:]
    for p, q in zip(resumed.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
    distances = [m["weight_distance"] for _, m in rest.metrics if "weight_distance" in m]
    reference_distances = [m["weight_distance"] for _, m in full.metrics if "weight_distance" in m]
    assert distances == reference_distances[4:]  # w_0 came back from the checkpoint
