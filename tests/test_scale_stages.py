"""The real stages, from their shipped configs, on 2 CPU processes: DDP (gloo) and DeepSpeed ZeRO-2.

Only device and size are overridden. Adding a stage = one entry in STAGES (its config + size overrides, which
may name the `inputs` a stage needs: `{ae}` is a tiny autoencoder export for the diffusion stage).
"""

from __future__ import annotations

import os

import pytest
import torch

from scale_run import REPO, TRAINER_CFG, run_cli
from wandb_reader import find_runs, read_run

STAGES = {
    # name: (stage config, size overrides)
    "autoencoder": ("configs/autoencoder/tiny-mnist.yaml",
                    ["--model.init_args.scale_batches", "1", "--model.init_args.log_images", "4"]),
    # image shards encoded on the fly by the frozen autoencoder; a 2-step validation sample grid
    "diffusion": ("configs/diffusion/mnist-unet-class.yaml",
                  ["--model.init_args.autoencoder", "{ae}", "--model.init_args.val_steps", "2",
                   "--model.init_args.val_num", "4"]),
}
STRATEGIES = {
    "ddp": ["-c", str(TRAINER_CFG / "ddp-8gpu.yaml")],
    "zero2": ["-c", str(TRAINER_CFG / "deepspeed-zero2.yaml")],
}


@pytest.fixture(scope="module")
def inputs(tiny_ae) -> dict[str, str]:
    return {"ae": tiny_ae}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_two_process_cpu(stage, strategy, mnist_shards, inputs, tmp_path):
    config, size = STAGES[stage]
    size = [a.format(**inputs) for a in size]
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
    # the final step, in <default_root_dir>/checkpoints (a DeepSpeed checkpoint is a directory)
    assert os.path.exists(os.path.join(root, "checkpoints", "last.ckpt"))


def _stage_module(stage: str, inputs: dict, compile: bool):
    torch.manual_seed(0)
    if stage == "autoencoder":
        from ldm_lightning.autoencoder import AutoencoderModule
        return AutoencoderModule(preset="tiny-mnist", compile=compile, scale_batches=0,
                                 loss=dict(perceptual_weight=0.0, disc_start=2, disc_warmup_train=0, disc_layers=2,
                                           disc_ndf=16))
    from ldm_lightning.diffusion.module import DiffusionModule
    return DiffusionModule(inputs["ae"], backbone="unet-tiny", compile=compile, val_num=0,
                           conditioning={"kind": "class", "num_classes": 10})


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_compile_flag_trains_and_checkpoints_load_both_ways(stage, inputs, tmp_path):
    """`compile: true` on the real stage modules: a short fit runs through the compiled network (GAN step
    with the adaptive weight's autograd.grad included), and its checkpoint loads strictly into an uncompiled
    module and back, giving the same outputs."""
    import lightning as L

    from test_diffusion_module import loader, mnist_batches
    module = _stage_module(stage, inputs, compile=True)
    net = module.autoencoder.decoder if stage == "autoencoder" else module.denoiser.backbone
    assert net._compiled_call_impl is not None  # compiled in place
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(module, loader(mnist_batches(4, 8)))
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert not any("_orig_mod" in k for k in state)
    plain = _stage_module(stage, inputs, compile=False)
    plain.load_state_dict(state)  # strict: identical keys
    again = _stage_module(stage, inputs, compile=True)
    again.load_state_dict(plain.state_dict())
    with torch.no_grad():
        if stage == "autoencoder":
            x = mnist_batches(1, 4, start=100)[0]["image"]  # (4, 1, 32, 32)
            outs = [m.autoencoder.decode(m.autoencoder.encode(x).mode()) for m in (module, plain, again)]
        else:
            z, t, y = torch.randn(4, 4, 8, 8), torch.full((4,), 500.0), torch.arange(4)
            outs = [m.denoiser.backbone(z, t, y=y) for m in (module, plain, again)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[2], outs[1], rtol=1e-4, atol=1e-4)
