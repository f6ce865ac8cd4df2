"""FSDP2 (`configs/trainer/fsdp2.yaml`, training/fsdp2.py) on 2 CPU processes (gloo), through the user path:
`ldm-lightning fit` -> sharded DCP checkpoint -> `fit --ckpt_path last` -> `export` (gathers the shards) ->
`sample`, for the diffusion stage (with post-hoc EMA profiles, resumed compiled) and the autoencoder stage (GAN
on, resume bit-exact); plus the checks of the sharded folder (dcp_files.py) and the refusals."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from scale_run import REPO, TRAINER_CFG, run_cli

TINY_DIT = json.dumps({"patch_size": 4, "bottleneck_dim": 8, "hidden_size": 32, "depth": 2, "num_heads": 2,
                       "qk_norm": True})


def _fsdp2_fit(config: str, shards, root: Path, tmp_path, keep_last_k: int, *extra: str):
    """`ldm-lightning fit -c <config> -c configs/trainer/fsdp2.yaml` on 2 CPU ranks, a checkpoint every step."""
    every_step = tmp_path / "every_step.yaml"  # a test-size override of the config's checkpoint cadence
    every_step.write_text("trainer:\n  callbacks:\n    - class_path: ldm_lightning.training.checkpointing.StepCheckpoint"
                          f"\n      init_args: {{every_n_train_steps: 1, keep_last_k: {keep_last_k}}}\n")
    return run_cli(["fit", "-c", str(REPO / config), "-c", str(TRAINER_CFG / "fsdp2.yaml"), "-c", str(every_step),
                    "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                    "--trainer.logger.init_args.offline", "true", "--trainer.default_root_dir", str(root),
                    "--data.init_args.train_shards", shards["train"], "--data.init_args.val_shards", shards["test"],
                    "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0", *extra],
                   tmp_path, timeout=400)


def _fit(shards, root: Path, tmp_path, *extra: str):
    return _fsdp2_fit("configs/diffusion/mnist-jit-pixels.yaml", shards, root, tmp_path, 2,
                      "--trainer.log_every_n_steps", "2",
                      "--model.init_args.backbone_config", TINY_DIT, "--model.init_args.val_num", "0",
                      "--model.init_args.posthoc_ema", '{"sigma_rels": [0.05, 0.1], "snapshot_every": 2}', *extra)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fsdp2_two_cpu_processes_fit_resume_export_sample(mnist_shards, tmp_path):
    from ldm_lightning.dcp_files import read_full_state_dict, read_metadata
    from ldm_lightning.diffusion.load import load_denoiser
    from ldm_lightning.training.posthoc_snapshots import list_snapshots, read_profile
    from ldm_lightning.training.resume import resolve_resume_checkpoint

    root = tmp_path / "run"
    ckpts = root / "checkpoints"
    _fit(mnist_shards, root, tmp_path, "--trainer.max_steps", "3")
    last = ckpts / "last.ckpt"
    names = lambda: sorted(p.name for p in ckpts.iterdir()  # noqa: E731
                           if not p.name.startswith(".ldm") and p.name != "posthoc-ema")
    assert names() == ["last.ckpt", "step=00000002.ckpt", "step=00000003.ckpt"]  # keep_last_k=2 prunes folders too
    # a DCP folder: one shard file per rank, each holding half of every weight (EMA included) and optimizer state
    assert sorted(p.name for p in last.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    index = read_metadata(last).state_dict_metadata
    ema_key = "state_dict.ema.module.backbone.blocks.0.attn.proj.weight"
    assert len(index[ema_key].chunks) == 2 and len(index["optimizer_0.state.denoiser.backbone.blocks.0.attn.proj."
                                                         "weight.exp_avg"].chunks) == 2
    at3 = read_full_state_dict(last)["state_dict"]

    # resume: `--ckpt_path last` picks the folder by its recorded step, continues to step 5; compiled per block
    # before fully_shard (as torchtitan): a compiled run keeps the parameter names, so the eager run's folder loads
    proc = _fit(mnist_shards, root, tmp_path, "--trainer.max_steps", "5", "--ckpt_path", "last",
                "--model.init_args.compile", "true", "--model.init_args.speed", '{"compile_mode": "blocks"}')
    assert "resuming from" in proc.stdout and "(global step 3)" in proc.stdout
    assert resolve_resume_checkpoint(ckpts, verbose=False).global_step == 5
    # post-hoc EMA profiles sharded like the EMA; each snapshot gathers them: the step-4 one is the step-4 folder's
    snaps = list_snapshots(ckpts)
    assert [x.t for x in snaps] == [2, 4]
    at4 = read_full_state_dict(ckpts / "step=00000004.ckpt")["state_dict"]
    assert len(read_metadata(last).state_dict_metadata["state_dict.posthoc_ema.profiles.1.backbone.blocks.0.attn.proj."
                                                      "weight"].chunks) == 2
    for i in range(2):
        prof = read_profile(snaps[-1], i)
        assert prof and all(torch.equal(v, at4[f"posthoc_ema.profiles.{i}.{k}"]) for k, v in prof.items())
    assert names() == ["last.ckpt", "step=00000004.ckpt", "step=00000005.ckpt"]  # no temp folder left behind
    full = read_full_state_dict(last)
    sd = full["state_dict"]
    assert full["global_step"] == 5 and not torch.equal(sd["denoiser.backbone.blocks.0.attn.proj.weight"],
                                                        at3["denoiser.backbone.blocks.0.attn.proj.weight"])

    # export gathers the full EMA weights into the single-file format load_denoiser reads; sample from it
    out = tmp_path / "export"
    run_cli(["export", "--checkpoint", str(last), "--out", str(out)], tmp_path)
    denoiser, _, meta = load_denoiser(out)
    ema = {k[len("ema.module."):]: v for k, v in sd.items() if k.startswith("ema.module.")}
    assert meta["backbone"]["depth"] == 2 and denoiser.state_dict().keys() == ema.keys()
    assert all(torch.equal(v, ema[k]) for k, v in denoiser.state_dict().items())
    assert not torch.equal(ema["backbone.blocks.0.attn.proj.weight"], sd["denoiser.backbone.blocks.0.attn.proj.weight"])
    run_cli(["sample", "--checkpoint", str(out), "--classes", "0-1", "--num", "1", "--sampler", "flow_euler",
             "--steps", "2", "--out", str(tmp_path / "samples")], tmp_path)
    assert sorted(os.listdir(tmp_path / "samples")) == ["0_0.png", "1_0.png", "grid.png"]

    # a truncated shard: one message naming the file, exit 2, nothing written
    broken = tmp_path / "broken.ckpt"
    shutil.copytree(ckpts / "step=00000004.ckpt", broken)
    with open(broken / "__1_0.distcp", "r+b") as f:
        f.truncate(1000)
    proc = run_cli(["export", "--checkpoint", str(broken), "--out", str(tmp_path / "bad")], tmp_path, check=False)
    assert proc.returncode == 2 and "__1_0.distcp is truncated" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_sharded_checkpoint_checks_refuse_damage_and_code(tmp_path):
    """dcp_files' checks on a hand-made DCP folder (one process, no process group): a missing meta.pt or index, a
    truncated shard and an index naming a callable are each refused with the file named."""
    import pickle

    from torch.distributed.checkpoint import FileSystemWriter, save

    from ldm_lightning.dcp_files import ShardedCheckpointError, read_full_state_dict, validate_sharded_checkpoint
    from ldm_lightning.training.resume import CorruptCheckpointError, validate_checkpoint

    good = tmp_path / "last.ckpt"
    save({"state_dict": {"w": torch.arange(6.0)}}, storage_writer=FileSystemWriter(good), no_dist=True)
    with pytest.raises(ShardedCheckpointError, match="meta.pt"):  # not yet a checkpoint: meta.pt comes last
        validate_sharded_checkpoint(good)
    torch.save({"global_step": 7, "epoch": 0, "loops": {}, "lr_schedulers": [], "ldm_lightning": {}}, good / "meta.pt")
    assert validate_checkpoint(good)["global_step"] == 7
    assert torch.equal(read_full_state_dict(good)["state_dict"]["w"], torch.arange(6.0))

    truncated = shutil.copytree(good, tmp_path / "t.ckpt")
    shard = next(truncated.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(CorruptCheckpointError, match="is truncated"):
        validate_checkpoint(truncated)

    crafted = shutil.copytree(good, tmp_path / "c.ckpt")
    (crafted / ".metadata").write_bytes(pickle.dumps(os.system))  # a pickle that names a callable
    with pytest.raises(CorruptCheckpointError, match="refused: loading it could run code"):
        validate_checkpoint(crafted)
    (crafted / ".metadata").unlink()
    with pytest.raises(CorruptCheckpointError, match="no .metadata"):
        validate_checkpoint(crafted)


def test_fsdp2_refuses_modules_it_does_not_shard():
    """The autoencoder options FSDP2 is not wired for: one message naming the fix."""
    from ldm_lightning.autoencoder.module import AutoencoderModule
    from ldm_lightning.training.fsdp2 import FSDP2Error, FSDP2Strategy

    trainer = SimpleNamespace(strategy=FSDP2Strategy())
    ae = AutoencoderModule(preset="tiny-mnist", loss=dict(perceptual_weight=0.0, disc_norm="batch"))
    ae._trainer = trainer
    with pytest.raises(FSDP2Error, match="set loss.disc_norm: group"):  # per-rank BatchNorm statistics
        ae.configure_model()
    ae = AutoencoderModule(preset="tiny-mnist", loss=dict(perceptual_weight=0.0), compile=True)
    ae._trainer = trainer
    with pytest.raises(FSDP2Error, match="set model.compile false"):
        ae.configure_model()


def _fit_autoencoder(shards, root: Path, tmp_path, *extra: str):
    """The shipped tiny-mnist autoencoder config under configs/trainer/fsdp2.yaml on 2 CPU ranks, the GAN phase on
    from step 2 (the discriminator trains from step 1), a checkpoint every step."""
    return _fsdp2_fit("configs/autoencoder/tiny-mnist.yaml", shards, root, tmp_path, 4,
                      "--trainer.log_every_n_steps", "1",
                      "--model.init_args.loss.disc_start", "2", "--model.init_args.loss.disc_warmup_train", "1",
                      "--model.init_args.optim.warmup_steps", "0", "--model.init_args.scale_batches", "2", *extra)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fsdp2_autoencoder_gan_fit_resume_exact_export(mnist_shards, tmp_path):
    """The autoencoder stage under FSDP2 (encoder/decoder blocks, discriminator and EMA sharded; LPIPS would stay
    replicated): 4 steps with the GAN on; a second run resumed from the first's step-2 folder ends bit-equal to
    it (weights, EMA, discriminator, latent statistics); `export` gathers the EMA into a loadable folder."""
    from ldm_lightning.autoencoder.load import load_autoencoder
    from ldm_lightning.dcp_files import read_full_state_dict, read_metadata

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    proc = _fit_autoencoder(mnist_shards, whole, tmp_path, "--trainer.max_steps", "4")
    assert "latent scale_factor=" in proc.stdout + proc.stderr
    ckpts = whole / "checkpoints"
    index = read_metadata(ckpts / "last.ckpt").state_dict_metadata
    for key in ("state_dict.autoencoder.decoder.up.0.block.0.conv1.weight",  # a block, its EMA, the discriminator
                "state_dict.ema.module.decoder.up.0.block.0.conv1.weight",
                "state_dict.loss.discriminator.main.2.weight",
                "optimizer_0.state.loss.discriminator.main.2.weight.exp_avg"):
        assert len(index[key].chunks) == 2, key  # one half per rank

    proc = _fit_autoencoder(mnist_shards, resumed, tmp_path, "--trainer.max_steps", "4",
                            "--trainer.num_sanity_val_steps", "0", "--ckpt_path", str(ckpts / "step=00000002.ckpt"))
    assert "(global step 2)" in proc.stdout
    a, b = (read_full_state_dict(p / "checkpoints" / "last.ckpt") for p in (whole, resumed))
    assert a["global_step"] == b["global_step"] == 4
    sd, at2 = a["state_dict"], read_full_state_dict(ckpts / "step=00000002.ckpt")["state_dict"]
    assert sd.keys() == b["state_dict"].keys() and not any(k.startswith("loss.lpips") for k in sd)
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in sd.items())  # exact: same ranks, same reductions
    d = "loss.discriminator.main.0.weight"
    assert not torch.equal(sd[d], at2[d]) and float(sd["autoencoder.scale_factor"]) != 1.0  # trained; measured

    out = tmp_path / "export"
    run_cli(["export", "--checkpoint", str(ckpts / "last.ckpt"), "--out", str(out)], tmp_path)
    ema = {k[len("ema.module."):]: v for k, v in sd.items() if k.startswith("ema.module.")}
    for ae in (load_autoencoder(out), load_autoencoder(ckpts / "last.ckpt")):  # the folder itself loads too
        assert ae.state_dict().keys() == ema.keys() and all(torch.equal(v, ema[k]) for k, v in ae.state_dict().items())
