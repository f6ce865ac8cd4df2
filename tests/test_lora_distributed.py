"""LoRA fine-tuning under 2-process DDP (gloo) and DeepSpeed ZeRO-2 on the CPU accelerator, each through
`ldm-lightning fit -c dit-xl2-lora.yaml` with a shipped trainer config (only device/size overridden), from a tiny
random diffusers DiT folder: only the adapters train (the frozen base is identical on every rank and never in the
optimizer or a ZeRO partition), the checkpoint holds adapters + training state, and the run resumes."""

from __future__ import annotations

import glob
import json
import os

import diffusers
import pytest
import torch

from scale_run import TRAINER_CFG, run_cli
from test_import_finetune import random_diffusers_dit

TINY_DIT_CONFIG = json.dumps({"hidden_size": 64, "depth": 2, "num_heads": 4, "patch_size": 2, "input_size": 8})
CPU2 = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true",
        "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]


def _lora_fit(tmp_path, tiny_ae, shards, trainer_cfg: str, root: str, steps: int, *extra: str):
    return run_cli(["fit", "-c", "ldm_lightning:diffusion/dit-xl2-lora.yaml", "-c", str(TRAINER_CFG / trainer_cfg),
                    "-c", "ldm_lightning:data/mnist.yaml", *CPU2,
                    "--model.init_args.autoencoder", tiny_ae, "--model.init_args.init_from", str(tmp_path / "pipe"),
                    "--model.init_args.backbone", "dit", "--model.init_args.backbone_config", TINY_DIT_CONFIG,
                    "--model.init_args.conditioning.num_classes", "10", "--model.init_args.encode_dtype", "fp32",
                    "--model.init_args.optim.warmup_steps", "1", "--model.init_args.lora.rank", "4",
                    "--data.init_args.train_shards", shards["train"], "--data.init_args.val_shards", shards["test"],
                    "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
                    "--data.init_args.shuffle_buffer", "16", "--trainer.max_steps", str(steps),
                    "--trainer.default_root_dir", str(tmp_path / root), *extra], tmp_path, timeout=400)


def _adapter_keys(state_dict) -> list[str]:
    return [k for k in state_dict if k.startswith("denoiser.")]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lora_trains_adapters_only_under_ddp_and_zero2(tiny_ae, mnist_shards, tmp_path):
    random_diffusers_dit(seed=4).save_pretrained(tmp_path / "pipe" / "transformer")
    diffusers.DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                            prediction_type="epsilon").save_pretrained(tmp_path / "pipe" / "scheduler")

    # DDP, 2 processes: one checkpoint of adapters + optimizer state for the adapters only, B moved off zero
    _lora_fit(tmp_path, tiny_ae, mnist_shards, "ddp-8gpu.yaml", "ddp", 2)
    (last,) = glob.glob(str(tmp_path / "ddp" / "**" / "last.ckpt"), recursive=True)
    state = torch.load(last, map_location="cpu", weights_only=True)
    trainable = _adapter_keys(state["state_dict"])
    assert trainable and all(".lora_A." in k or ".lora_B." in k for k in trainable), trainable[:5]
    assert len(state["optimizer_states"][0]["state"]) == len(trainable)
    assert any(v.abs().sum() > 0 for k, v in state["state_dict"].items() if ".lora_B." in k)
    assert state["global_step"] == 2

    # ZeRO-2, 2 processes: the partitions hold only adapter parameters; resume continues to step 4
    _lora_fit(tmp_path, tiny_ae, mnist_shards, "deepspeed-zero2.yaml", "zero", 2)
    (ds_last,) = glob.glob(str(tmp_path / "zero" / "**" / "last.ckpt"), recursive=True)
    assert os.path.isdir(ds_last)
    shards = sorted(glob.glob(os.path.join(ds_last, "checkpoint", "*optim_states.pt")))
    assert len(shards) == 2
    adapter_numel = sum(v.numel() for k, v in state["state_dict"].items() if k in trainable)
    partitioned = 0
    for shard in shards:
        opt = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        partitioned += sum(t.numel() for t in opt["single_partition_of_fp32_groups"])
    # ZeRO pads each rank's partition to an alignment; the frozen base (~100x the adapters here) is not in it
    assert adapter_numel <= partitioned < adapter_numel + 2 * 64, (adapter_numel, partitioned)
    _lora_fit(tmp_path, tiny_ae, mnist_shards, "deepspeed-zero2.yaml", "zero", 4, "--ckpt_path", "last")
    states_file = os.path.join(ds_last, "checkpoint", "mp_rank_00_model_states.pt")
    ds_state = torch.load(states_file, weights_only=True, map_location="cpu", mmap=True)  # as resume.py reads the step
    assert ds_state["global_step"] == 4, {k: v for k, v in ds_state.items() if "step" in k}
