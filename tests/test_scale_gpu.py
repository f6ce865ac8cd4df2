"""GPU checks (skipped without CUDA; run unchanged on a GPU machine): bf16 + compile with the shipped GPU
trainer configs on all visible GPUs, telemetry reports MFU in (0, 1)."""

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
