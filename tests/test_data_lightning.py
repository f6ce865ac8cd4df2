"""ShardDataModule inside a real `lightning.Trainer`: training on MNIST shards and exact resume."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ldm_lightning.data import ShardDataModule
from ldm_lightning.training.base import EMAConfig, TrainingModule


class _Tiny(L.LightningModule):
    """A 10-class linear classifier on the 32×32 images; records the keys of every batch it trains on."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(32 * 32, 10)
        self.seen: list[list[str]] = []
        self.val_keys: list[str] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(list(batch["key"]))
        loss = torch.nn.functional.cross_entropy(self.net(batch["image"].flatten(1)), batch["cls"])
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.val_keys += batch["key"]
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(batch["image"].flatten(1)), batch["cls"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(shards, root, max_steps, ckpt_path=None, callbacks=(), precision="32-true"):
    dm = ShardDataModule(shards["train"], shards["test"], batch_size=100, num_workers=2, val_samples=100,
                         shuffle_buffer=200)
    model = _Tiny()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        precision=precision,
                        enable_model_summary=False, default_root_dir=root, callbacks=list(callbacks),
                        num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, trainer


def test_fit_trains_and_resumes_exactly(mnist_shards, tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=7, save_top_k=-1,
                           filename="{step}")
    full, trainer = _fit(mnist_shards, tmp_path, 30, callbacks=[ckpt])
    assert trainer.num_training_batches == 20 and len(full.seen) == 30  # 2000 / 100 per epoch; crosses epoch 1
    first = {k for b in full.seen[:20] for k in b}
    assert len(first) == 2000  # epoch 0 saw every sample once
    assert full.seen[20:] != full.seen[:10]  # epoch 1 is reshuffled
    assert len(full.val_keys) == 100 and torch.isfinite(trainer.callback_metrics["loss"])
    ring = trainer.train_dataloader.dataset.ring  # epoch 1's: under a Trainer, every batch came through it
    assert ring is not None and ring.handed_out >= 10
    for step in (7, 21):  # mid-epoch at an odd batch count; and just after an epoch boundary
        state = torch.load(tmp_path / "ckpt" / f"step={step}.ckpt", weights_only=False)["ShardDataModule"]
        assert state["consumed"] == step % 20 and state["epoch"] == step // 20
        resumed, _ = _fit(mnist_shards, tmp_path / f"r{step}", 30,
                          ckpt_path=str(tmp_path / "ckpt" / f"step={step}.ckpt"))
        assert resumed.seen == full.seen[step:], f"resume from step {step} diverged"


class _TinyTraining(TrainingModule):
    """_Tiny on the shared TrainingModule, which logs the DataModule's bad-sample count."""

    def __init__(self):
        super().__init__(ema=EMAConfig(enabled=False))
        self.net = torch.nn.Linear(32 * 32, 10)
        self.setup_ema(self.net)
        self.seen: list[list[str]] = []

    def compute_loss(self, batch):
        self.seen.append(list(batch["key"]))
        loss = torch.nn.functional.cross_entropy(self.net(batch["image"].flatten(1)), batch["cls"])
        return loss, {}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_bad_samples_logged_in_fit(mnist_shards, tmp_path):
    from lightning.pytorch.loggers import CSVLogger
    from test_data_stream import _corrupt_copy

    from pathlib import Path

    bad_dir = tmp_path / "bad"
    _corrupt_copy(Path(mnist_shards["test"]), bad_dir)
    dm = ShardDataModule(str(bad_dir), batch_size=25, num_workers=2, shuffle_buffer=50)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=CSVLogger(tmp_path / "logs"), log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    model = _TinyTraining()
    trainer.fit(model, datamodule=dm)
    assert len(model.seen) == 20 and dm.bad_samples == 2
    import csv

    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    logged = [float(r["data/bad_samples"]) for r in rows if r.get("data/bad_samples")]
    assert logged and logged[-1] == 2.0


def test_uint8_batches_reach_the_model_in_its_precision(mnist_shards, tmp_path):
    # 'bf16-true' casts float inputs before the device transfer, when images are still uint8: the
    # DataModule must cast them after converting, or the bf16 Linear gets float32 input and fails.
    model, trainer = _fit(mnist_shards, tmp_path, 3, precision="bf16-true")
    assert model.net.weight.dtype == torch.bfloat16 and len(model.seen) == 3


def test_pixels_are_normalised_once_by_the_datamodule(mnist_shards, tiny_ae):
    """The DataModule's model_inputs is the one uint8 -> [-1, 1] path: both stage modules refuse raw uint8 pixels
    (a loader read outside a Trainer) with a message naming that fix, and take what model_inputs gives."""
    import pytest

    from ldm_lightning.autoencoder import AutoencoderModule
    from ldm_lightning.diffusion.module import DiffusionModule
    dm = ShardDataModule(mnist_shards["test"], batch_size=8, num_workers=0, shuffle_buffer=1)
    raw = next(iter(dm.train_dataloader()))
    assert raw["image"].dtype == torch.uint8
    ae = AutoencoderModule(preset="tiny-mnist", image_size=32, loss=dict(perceptual_weight=0.0))
    dit = DiffusionModule(autoencoder=tiny_ae, backbone="dit-tiny", val_num=0,
                          conditioning={"kind": "class", "num_classes": 10})
    for module in (ae, dit):
        with pytest.raises(TypeError, match="model_inputs"):
            module.compute_loss(dict(raw))
    batch = dm.model_inputs(dict(raw))
    assert batch["image"].dtype == torch.float32 and batch["image"].min() == -1 and batch["image"].max() == 1
    for module in (ae, dit):
        assert torch.isfinite(module.compute_loss(batch)[0])
