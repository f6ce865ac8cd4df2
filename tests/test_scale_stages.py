"""The real stages, from their shipped configs, on 2 CPU processes: DDP (gloo) and DeepSpeed ZeRO-2.

Only device and size are overridden. Adding a stage = one entry in STAGES (its config + size overrides).
"""

from __future__ import annotations

import glob
import os

import pytest

from scale_run import REPO, TRAINER_CFG, run_cli
from wandb_reader import find_runs, read_run

STAGES = {
    # name: (stage config, size overrides)
    "autoencoder": ("configs/autoencoder/tiny-mnist.yaml",
                    ["--model.init_args.scale_batches", "1", "--model.init_args.log_images", "4"]),
    # "diffusion": ("configs/diffusion/tiny-mnist.yaml", [...]),   <- add when the diffusion stage lands
}
STRATEGIES = {
    "ddp": ["-c", str(TRAINER_CFG / "ddp-8gpu.yaml")],
    "zero2": ["-c", str(TRAINER_CFG / "deepspeed-zero2.yaml")],
}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_two_process_cpu(stage, strategy, mnist_shards, tmp_path):
    config, size = STAGES[stage]
    if not (REPO / config).exists():
        pytest.skip(f"{config} not written yet")
    root = tmp_path / "run"
    args = ["fit", "-c", str(REPO / config), *STRATEGIES[strategy],
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true",
            "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "2", "--trainer.val_check_interval", "4",
            "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false",
            "--data.init_args.train_shards", mnist_shards["train"], "--data.init_args.val_shards", mnist_shards["test"],
            "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "1",
            "--data.init_args.val_samples", "16", *size]
    run_cli(args, tmp_path, timeout=600)
    (run_dir,) = find_runs(str(root))
    run = read_run(run_dir)
    assert run.values("train/loss"), sorted({k for row in run.history for k in row})
    assert run.values("perf/samples_seen")[-1] == 4 * 2 * 8  # 4 steps × 2 ranks × batch 8
    assert run.config["model"]["class_path"].endswith("Module")
    assert glob.glob(os.path.join(root, "ldm-lightning", run.run_id, "checkpoints", "*.ckpt"))
