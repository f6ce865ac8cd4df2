"""2-process DDP (gloo) and DeepSpeed ZeRO-2/3 on the CPU accelerator, each in a subprocess through
`ldm-lightning fit` with the shipped trainer configs (only device/size overridden)."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from scale_run import TRAINER_CFG, ckpt_every, run_cli, tiny_stage
from wandb_reader import find_runs, read_run

CPU2 = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.log_every_n_steps", "5",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]


def _ckpts(root, pattern="*"):
    return sorted(glob.glob(os.path.join(root, "ldm-lightning", "*", "checkpoints", pattern)))


def test_ddp_two_processes_gloo(tmp_path):
    cfgs = ["-c", tiny_stage(tmp_path), "-c", str(TRAINER_CFG / "ddp-8gpu.yaml"), "-c", ckpt_every(tmp_path, 10)]
    run_cli(["fit", *cfgs, *CPU2, "--trainer.precision", "32-true", "--trainer.max_steps", "10"], tmp_path)
    root = str(tmp_path / "run")
    (ckpt,) = _ckpts(root, "*step=10.ckpt")  # 8 steps per epoch per rank: epoch 1
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 10 and "net.conv.weight" in state["state_dict"]
    # one W&B run (rank 0 only), global throughput counts both ranks: 10 steps × 2 ranks × batch 4
    (run_dir,) = find_runs(root)
    run = read_run(run_dir)
    assert run.values("perf/samples_seen")[-1] == 80
    assert all(v > 0 for v in run.values("perf/images_per_sec"))


def _deepspeed_roundtrip(tmp_path, config: str, precision: str, refused_at_one: str):
    cfgs = ["-c", tiny_stage(tmp_path), "-c", str(TRAINER_CFG / config), "-c", ckpt_every(tmp_path, 5)]
    run_cli(["fit", *cfgs, *CPU2, "--trainer.precision", precision, "--trainer.max_steps", "5"], tmp_path, timeout=500)
    root = str(tmp_path / "run")
    (ckpt,) = _ckpts(root, "*step=5.ckpt")
    assert os.path.isdir(ckpt)  # DeepSpeed writes a sharded checkpoint directory (one shard per rank)
    assert len(glob.glob(os.path.join(ckpt, "checkpoint", "*optim_states.pt"))) == 2
    # resume from it: training continues at step 5 and reaches 10
    run_cli(["fit", *cfgs, *CPU2, "--trainer.precision", precision, "--trainer.max_steps", "10",
             "--ckpt_path", ckpt], tmp_path, timeout=500)
    assert _ckpts(root, "*step=10.ckpt"), _ckpts(root)
    # the sharded checkpoint converts to one fp32 state dict that loads into a plain (non-DeepSpeed) model
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    out = tmp_path / "fp32.ckpt"
    convert_zero_checkpoint_to_fp32_state_dict(_ckpts(root, "*step=10.ckpt")[0], str(out))
    state = torch.load(out, map_location="cpu", weights_only=False)
    from scale_tiny import TinyModule

    model = TinyModule(width=8)
    model.load_state_dict(state["state_dict"])
    assert state["global_step"] == 10
    runs = [read_run(r) for r in find_runs(root)]
    assert len({r.run_id for r in runs}) == 1 and runs[1].values("trainer/global_step")[0] >= 5
    # a resume at 1 process is refused before anything is converted: this run has data.order slots (an elastic
    # resume, training/deepspeed_elastic.py, needs data.order global)
    refused = run_cli(["fit", *cfgs, *CPU2, "--trainer.devices", "1", "--trainer.precision", precision,
                       "--trainer.max_steps", "15", "--ckpt_path", ckpt], tmp_path, timeout=500, check=False)
    assert refused.returncode == 2 and refused_at_one in refused.stderr, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr and not glob.glob(os.path.join(os.path.dirname(ckpt), "*universal*"))


@pytest.mark.slow
def test_deepspeed_zero2_cpu_save_resume(tmp_path):
    _deepspeed_roundtrip(tmp_path, "deepspeed-zero2.yaml", "32-true", "it was saved by a run of another shape")


@pytest.mark.slow
def test_deepspeed_zero3_cpu_bf16_save_resume(tmp_path):
    _deepspeed_roundtrip(tmp_path, "deepspeed-zero3.yaml", "bf16-mixed", "it was saved by a run of another shape")
