"""GPU checks (skipped without CUDA; run unchanged on a GPU machine): bf16 + compile with the shipped GPU
trainer configs on all visible GPUs, telemetry reports MFU in (0, 1); uint8 batches convert exactly on the
GPU; the loader's batch ring gives exact batches under a CUDA Trainer."""

from __future__ import annotations

import pytest
import torch

from scale_run import TRAINER_CFG, ckpt_every, run_cli, tiny_stage
from wandb_reader import find_runs, read_run

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("config", ["single-gpu.yaml", "ddp-8gpu.yaml", "deepspeed-zero2.yaml"])
def test_gpu_bf16_compile_reports_mfu(config, tmp_path):
    n = 1 if config == "single-gpu.yaml" else torch.cuda.device_count()
    run_cli(["fit", "-c", tiny_stage(tmp_path, compile=True, width=64), "-c", str(TRAINER_CFG / config),
             "-c", ckpt_every(tmp_path, 20), "--trainer.devices", str(n), "--trainer.max_steps", "20",
             "--trainer.log_every_n_steps", "10", "--trainer.limit_val_batches", "1"], tmp_path, timeout=600)
    (run_dir,) = find_runs(str(tmp_path / "run"))
    run = read_run(run_dir)
    mfu = run.values("perf/mfu")
    assert mfu and all(0 < v < 1 for v in mfu), mfu
    assert run.values("perf/peak_mem_gb")[-1] > 0


def test_uint8_batches_convert_on_the_gpu_exactly():
    from ldm_lightning.data import to_model_range
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    y = to_model_range(x.cuda())
    assert y.device.type == "cuda" and y.dtype == torch.float32
    assert torch.equal(y.cpu(), to_model_range(x))  # bitwise the CPU table


def _probe_fit(shards: str, root, reuse: bool, accelerator: str = "cuda"):
    """Two epochs of a do-nothing model that records the keys and pixel sum of every batch it trains on."""
    import lightning as L

    from ldm_lightning.data import ShardDataModule

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            x = batch["image"]  # (B, 1, 32, 32) float32 in [-1, 1], converted on the training device
            assert x.device.type == accelerator and x.dtype == torch.float32
            self.seen.append((list(batch["key"]), x.double().sum().item()))
            return (self.w * x.mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = ShardDataModule(shards, batch_size=100, num_workers=2, loader={"reuse_batch_memory": reuse})
    model = Probe()
    trainer = L.Trainer(max_epochs=2, accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(model, datamodule=dm)
    return model.seen, trainer.train_dataloader.dataset.ring


def test_batch_ring_under_a_cuda_trainer_gives_exact_batches(mnist_shards, tmp_path):
    """The ring lends its buffers without a copy and reuses one once nothing holds it; under CUDA the
    host→device copy must have read it by then. Every batch the model sees on the GPU must equal torch's
    ordinary hand-over, and (nearly) all of them must have come through the ring."""
    seen, ring = _probe_fit(mnist_shards["train"], tmp_path / "ring", reuse=True)
    want, none = _probe_fit(mnist_shards["train"], tmp_path / "plain", reuse=False)
    assert none is None and len(seen) == len(want) == 40
    assert seen == want
    assert ring.handed_out >= 18  # epoch 1's ring: 20 batches
