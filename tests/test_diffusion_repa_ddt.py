"""Issue 18's REPA and DDT: units (the REPA loss and grid matching, the frozen encoders, DDT's encoder reuse and
presets) and the user path (`ldm-lightning fit` with the shipped mnist-dit-repa / mnist-ddt-pixels configs, then
`ldm-lightning sample --encoder-every`) in subprocesses at tiny scale on real MNIST."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data.init_args.batch_size", "8", "--data.init_args.val_samples", "8", "--data.init_args.num_workers", "0",
        "--trainer.max_steps", "6", "--trainer.log_every_n_steps", "1", "--model.init_args.val_steps", "1",
        "--model.init_args.val_num", "0", "--model.init_args.optim.warmup_steps", "0",
        "--trainer.limit_val_batches", "1"]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "ldm_lightning", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _fit(config: str, shards: dict, root: Path, *extra: str) -> Path:
    _cli(["fit", "-c", str(ROOT / "configs/diffusion" / f"{config}.yaml"),
          "-c", str(ROOT / "configs/trainer/cpu-debug.yaml"),
          "--data.init_args.train_shards", shards["train"], "--data.init_args.val_shards", shards["test"], *TINY,
          "--trainer.default_root_dir", str(root), *extra], root.parent)
    last = sorted(root.rglob("last.ckpt"))
    assert len(last) == 1
    return last[0]


def _dinov2_folder(path: Path) -> str:
    """A DINOv2 with random weights from a small config, saved as a Hugging Face folder (nothing downloaded)."""
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       patch_size=4, image_size=32)
    Dinov2Model(cfg).save_pretrained(path)
    return str(path)


# --- REPA ----------------------------------------------------------------------------------------


def test_repa_loss_is_minus_one_for_identical_features_and_grids_are_matched():
    from ldm_lightning.diffusion.repa import match_grid, repa_loss
    f = torch.randn(2, 16, 8)  # (B, N, C)
    assert repa_loss(f, f).item() == pytest.approx(-1.0, abs=1e-6)
    assert repa_loss(f, -f).item() == pytest.approx(1.0, abs=1e-6)
    assert repa_loss(f, 3 * f).item() == pytest.approx(-1.0, abs=1e-6)  # scale-free
    maps = torch.randn(2, 8, 16, 16)  # (B, C, hf, wf) -> the 4x4 token grid
    tokens = match_grid(maps, 4, 4)
    assert tokens.shape == (2, 16, 8)
    assert torch.allclose(match_grid(maps, 16, 16), maps.flatten(2).transpose(1, 2))  # same grid: unchanged
    const = torch.ones(1, 3, 16, 16)  # a constant map stays constant through the antialiased resize
    assert torch.allclose(match_grid(const, 4, 4), torch.ones(1, 16, 3), atol=1e-5)


def test_frozen_encoders_give_patch_feature_maps(tmp_path):
    from ldm_lightning.diffusion.repa import REPAError, load_repa_encoder
    from ldm_lightning.encoders.mnist_classifier import MNISTClassifier, save_mnist_classifier
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    dino = load_repa_encoder(_dinov2_folder(tmp_path / "dino"))
    # REPA's default grid: 16 patches a side (224 px for a /14 DINOv2), whatever the config's image_size
    assert dino(x).shape == (2, 32, 16, 16) and not any(p.requires_grad for p in dino.parameters())
    assert load_repa_encoder(str(tmp_path / "dino"), resolution=16)(x).shape == (2, 32, 4, 4)
    save_mnist_classifier(MNISTClassifier(), tmp_path / "clf.safetensors")
    clf = load_repa_encoder(f"mnist-classifier:{tmp_path / 'clf.safetensors'}")
    assert clf(x).shape == (2, 64, 8, 8) and clf.feature_dim == 64
    with pytest.raises(REPAError, match="no such folder"):
        load_repa_encoder(str(tmp_path / "missing"))
    with pytest.raises(REPAError, match="mnist-classifier:"):
        load_repa_encoder(f"mnist-classifier:{tmp_path / 'none.safetensors'}")


def test_repa_module_trains_the_projector_and_the_early_blocks_only(tmp_path):
    """In-process: the REPA term reaches the projector and the blocks up to `block`, not the later ones; the
    frozen encoder is outside the module tree (no state_dict keys)."""
    from ldm_lightning.diffusion.module import DiffusionModule
    from ldm_lightning.diffusion.repa import REPAError
    from ldm_lightning.encoders.mnist_classifier import MNISTClassifier, save_mnist_classifier
    save_mnist_classifier(MNISTClassifier(), tmp_path / "clf.safetensors")
    kw = dict(autoencoder="identity:1x32", backbone="dit", backbone_config=dict(
        patch_size=4, hidden_size=32, depth=3, num_heads=2), conditioning={"kind": "class", "num_classes": 10},
        schedule={"kind": "flow"}, objective={"prediction": "x0", "loss_space": "flow"}, val_num=0,
        repa={"encoder": f"mnist-classifier:{tmp_path / 'clf.safetensors'}", "block": 1, "weight": 1.0,
              "projector_dim": 16})
    m = DiffusionModule(**kw)
    assert not any(k.startswith("_repa") or "trunk" in k for k in m.state_dict())
    batch = {"image": torch.rand(4, 1, 32, 32) * 2 - 1, "cls": torch.arange(4)}
    loss, terms = m.compute_loss(batch)
    assert math.isfinite(terms["repa_loss"].item()) and -1 <= terms["repa_loss"].item() <= 1
    from ldm_lightning.diffusion.repa import BlockTap
    with BlockTap(m.denoiser.backbone.blocks[0]) as tap:  # the REPA term alone, from the tapped block
        m.denoiser(torch.randn(4, 1, 32, 32), torch.full((4,), 0.5), {"y": torch.arange(4)})
    m.repa_loss(batch, tap.tokens).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.repa.parameters())
    blocks = m.denoiser.backbone.blocks
    assert blocks[0].adaLN_modulation[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in blocks[1].parameters())  # later blocks: no REPA gradient
    assert {id(p) for p in m.repa.parameters()} <= {id(p) for p in m.optimizer_param_groups()}
    with pytest.raises(REPAError, match="repa.block=4"):
        DiffusionModule(**{**kw, "repa": {**kw["repa"], "block": 4}})
    with pytest.raises(REPAError, match="image batches"):
        m.repa_loss({"moments": torch.zeros(4, 2, 32, 32)}, torch.zeros(4, 64, 32))


def test_repa_aligns_the_image_tokens_not_jits_class_tokens(tmp_path):
    """With in-context class tokens (JiT) the tapped block's output is [class | image]: REPA takes the image tokens
    (it took the first N tokens, class tokens included, before); before the tokens join (block < start) it takes all."""
    from ldm_lightning.diffusion.module import DiffusionModule
    from ldm_lightning.encoders.mnist_classifier import MNISTClassifier, save_mnist_classifier
    save_mnist_classifier(MNISTClassifier(), tmp_path / "clf.safetensors")
    batch = {"image": torch.rand(2, 1, 32, 32) * 2 - 1, "cls": torch.arange(2)}
    for block, lead in ((2, 4), (1, 0)):
        torch.manual_seed(0)
        m = DiffusionModule(autoencoder="identity:1x32", backbone="dit", backbone_config=dict(
            patch_size=4, hidden_size=32, depth=2, num_heads=2, class_tokens=4, class_tokens_start=1),
            conditioning={"kind": "class", "num_classes": 10}, schedule={"kind": "flow"}, val_num=0,
            objective={"prediction": "x0", "loss_space": "flow"},
            repa={"encoder": f"mnist-classifier:{tmp_path / 'clf.safetensors'}", "block": block, "weight": 1.0,
                  "projector_dim": 16})
        tokens = torch.randn(2, lead + 64, 32)
        ref = m.repa_loss(batch, tokens)
        tokens[:, :lead] = 100.0  # the class tokens change nothing
        torch.testing.assert_close(m.repa_loss(batch, tokens), ref)
        tokens[:, lead] = 100.0  # the first image token does
        assert (m.repa_loss(batch, tokens) - ref).abs() > 1e-4


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_repa_fit_logs_a_finite_repa_loss_with_a_dinov2_folder(mnist_shards, tmp_path):
    """The shipped REPA config through `ldm-lightning fit`, its encoder swapped for a random-weight DINOv2 folder:
    train/repa_loss is logged every step, finite and in [-1, 1]; the projector is in the checkpoint and trained,
    the DINOv2 weights are not in it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from wandb_reader import find_runs, read_run
    dino = _dinov2_folder(tmp_path / "dino")
    run = tmp_path / "run"
    ckpt = _fit("mnist-dit-repa", mnist_shards, run, "--model.init_args.repa.encoder", dino,
                "--model.init_args.repa.projector_dim", "32")
    history = [row for row in read_run(find_runs(str(run))[0]).history if "train/repa_loss" in row]
    values = [row["train/repa_loss"] for row in history]
    print("\ntrain/repa_loss:", values)
    assert len(values) == 6 and all(math.isfinite(v) and -1 <= v <= 1 for v in values)
    assert values[-1] < values[0]  # the projector (and the early blocks) align: seeded, so reproducible
    ckpt = torch.load(ckpt, map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    assert "repa.mlp.0.weight" in sd and not any("embeddings" in k or "encoder.layer" in k for k in sd)
    # trained: the optimizer holds Adam moments for every denoiser and projector parameter (all got gradients)
    trained = [k for k in sd if k.startswith(("denoiser.", "repa."))]
    state = ckpt["optimizer_states"][0]["state"]
    assert len(state) == len(trained) and all(float(v["exp_avg_sq"].sum()) > 0 for v in state.values())


# --- DDT ---------------------------------------------------------------------------------------------


def test_ddt_encoder_reuse_counts_and_matches_when_every_is_one():
    from ldm_lightning.diffusion.ddt import DDT, encoder_reuse
    from ldm_lightning.diffusion.presets import build_backbone
    torch.manual_seed(0)
    m = build_backbone("ddt-tiny", in_channels=4, num_classes=10)
    assert isinstance(m, DDT) and m(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 10])).abs().max() == 0
    for p in m.parameters():  # leave AdaLN-Zero's identity: a generic network
        torch.nn.init.normal_(p, std=0.05)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 4])
    ts = [torch.full((2,), v) for v in (900.0, 600.0, 300.0, 100.0, 10.0)]
    plain = [m(x, t, y) for t in ts]
    m.encoder_nfe = m.decoder_nfe = 0
    with encoder_reuse(m, 1):
        assert all(torch.equal(m(x, t, y), p) for t, p in zip(ts, plain))
    with encoder_reuse(m, 2):
        reused = [m(x, t, y) for t in ts]
    assert (m.encoder_nfe, m.decoder_nfe) == (5 + 3, 10)  # every=2 over 5 calls: the encoder on calls 0, 2, 4
    assert torch.equal(reused[0], plain[0]) and torch.equal(reused[2], plain[2])
    assert not torch.allclose(reused[1], plain[1])  # call 1 reused call 0's z_t
    assert m.reuse_every == 1 and m._z is None  # state cleared on exit
    with pytest.raises(ValueError, match="DDT"):
        with encoder_reuse(build_backbone("dit-tiny"), 2):
            pass


def test_ddt_and_ditdh_presets():
    from ldm_lightning.diffusion.presets import PRESETS, build_backbone
    assert PRESETS["DDT-XL/2"][1]["depth"] == 22 and PRESETS["DDT-XL/2"][1]["decoder_depth"] == 6
    m = build_backbone("DiTDH-S/1", in_channels=4, input_size=4)
    assert len(m.blocks) == 12 and len(m.decoder_blocks) == 2
    assert m.decoder_blocks[0].mlp.fc1.in_features == 2048 and m.s_projector.in_features == 384
    assert m(torch.randn(1, 4, 4, 4), torch.rand(1)).shape == (1, 4, 4, 4)
    with pytest.raises(ValueError, match="decoder_hidden_size=102"):
        build_backbone("ddt-tiny", decoder_hidden_size=102)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ddt_fit_and_sample_with_encoder_reuse(mnist_shards, tmp_path):
    """The shipped DDT config through `ldm-lightning fit`, then `sample --encoder-every 2`; a DiT checkpoint
    refuses the option."""
    ckpt = _fit("mnist-ddt-pixels", mnist_shards, tmp_path / "run")
    meta = torch.load(ckpt, map_location="cpu", weights_only=True)["ldm_lightning"]
    assert meta["backbone_family"] == "ddt" and meta["backbone"]["decoder_depth"] == 1
    r = _cli(["sample", "--checkpoint", str(ckpt), "--classes", "0-1", "--num", "2", "--steps", "4",
              "--sampler", "flow_euler", "--encoder-every", "2", "--out", str(tmp_path / "s")], tmp_path)
    assert "wrote 4 samples" in r.stdout and (tmp_path / "s" / "1_1.png").is_file()
    from ldm_lightning.diffusion.sample import main
    with pytest.raises(SystemExit, match="--encoder-every must be >= 1"):
        main(["--checkpoint", str(ckpt), "--class", "1", "--encoder-every", "0", "--out", str(tmp_path / "x")])


def test_ddt_counted_flops_match_its_analytic_count():
    """DDT.flops_per_image (what gpu_bench reports MFU with) against torch's FLOP counter, with and without the
    encoder (a reused z_t); a wide DiT^DH-like head included."""
    from ldm_lightning.diffusion.ddt import DDT, DDTConfig, encoder_reuse
    from ldm_lightning.training.flops import count_flops
    m = DDT(DDTConfig(input_size=16, in_channels=4, patch_size=2, hidden_size=64, depth=2, num_heads=4,
                      num_classes=10, decoder_depth=2, decoder_hidden_size=128))
    x, t, y = torch.randn(1, 4, 16, 16), torch.tensor([10.0]), torch.tensor([1])
    assert count_flops(lambda: m(x, t, y)) == pytest.approx(m.flops_per_image(), rel=0.01)
    with encoder_reuse(m, 2):
        m(x, t, y)  # call 0 computes z_t, call 1 (counted) reuses it
        reused = count_flops(lambda: m(x, t, y))
    assert reused == pytest.approx(m.flops_per_image(encoder=False), rel=0.01)


def test_repa_on_a_ddt_aligns_an_encoder_block(tmp_path):
    """REPA's block index counts a DDT's condition-encoder blocks; the projector reads the encoder's width."""
    from ldm_lightning.diffusion import DDT, REPAConfig
    from ldm_lightning.diffusion.module import DiffusionModule
    from ldm_lightning.encoders.mnist_classifier import MNISTClassifier, save_mnist_classifier
    save_mnist_classifier(MNISTClassifier(), tmp_path / "clf.safetensors")
    m = DiffusionModule("identity:1x32", backbone="ddt-tiny", backbone_config=dict(
        input_size=32, patch_size=4, hidden_size=32, num_heads=2, decoder_hidden_size=64),
        conditioning={"kind": "class", "num_classes": 10}, schedule={"kind": "flow"}, val_num=0,
        objective={"prediction": "x0", "loss_space": "flow"},
        repa=REPAConfig(encoder=f"mnist-classifier:{tmp_path / 'clf.safetensors'}", block=3, projector_dim=16))
    assert isinstance(m.denoiser.backbone, DDT) and m.repa.mlp[0].in_features == 32
    loss, terms = m.compute_loss({"image": torch.rand(2, 1, 32, 32) * 2 - 1, "cls": torch.tensor([1, 2])})
    loss.backward()
    assert math.isfinite(terms["repa_loss"].item()) and m.repa.mlp[0].weight.grad.abs().sum() > 0
