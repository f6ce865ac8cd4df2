"""load_autoencoder / export vs diffusers' own AutoencoderKL (diffusers is a test-only dependency here)."""

from __future__ import annotations

import pytest
import torch

from float_paths import assert_close_for, sum_length
from ldm_lightning.autoencoder import Autoencoder, AutoencoderConfig, load_autoencoder

diffusers = pytest.importorskip("diffusers")

SMALL = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
             up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[32, 64, 64], layers_per_block=1,
             latent_channels=4, norm_num_groups=8, sample_size=32)


def _random_diffusers_vae(seed=0):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(**SMALL).eval()
    with torch.no_grad():  # diffusers zero-inits nothing here, but randomise norms/biases too
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


def _compare(ae, vae, x):
    with torch.no_grad():
        d = vae.encode(x).latent_dist
        post = ae.encode(x)
        # two implementations of the same network: equal up to fp32 rounding (tests/float_paths.py)
        n = sum_length(vae)
        assert_close_for(post.mean, d.mean, n, "posterior mean")
        assert_close_for(post.logvar, d.logvar, n, "posterior logvar")
        z = d.mean
        assert_close_for(ae.decode(z), vae.decode(z).sample, n, "decoded")


def test_diffusers_folder_loads_identically(tmp_path):
    vae = _random_diffusers_vae()
    vae.save_pretrained(tmp_path / "vae")
    ae = load_autoencoder(tmp_path / "vae")
    assert not ae.training and ae.latent_channels == 4 and ae.downsample_factor == 4
    assert float(ae.scale_factor) == pytest.approx(0.18215)
    _compare(ae, vae, torch.randn(2, 3, 32, 32))


def test_sd_state_dict_loads_identically(tmp_path):
    """A CompVis/SD checkpoint is our state dict under `first_stage_model.`: build one from diffusers
    weights via our mapping and check it against diffusers on the same weights."""
    from safetensors.torch import save_file
    vae = _random_diffusers_vae(1)
    vae.save_pretrained(tmp_path / "vae")
    ours = load_autoencoder(tmp_path / "vae").state_dict()
    sd = {f"first_stage_model.{k}": v for k, v in ours.items() if k not in ("latent_mean", "latent_std",
                                                                           "scale_factor", "shift_factor")}
    sd["model.diffusion_model.dummy"] = torch.zeros(1)  # the rest of an SD checkpoint is ignored
    torch.save({"state_dict": sd}, tmp_path / "sd.ckpt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "sd.safetensors"))
    x = torch.randn(1, 3, 32, 32)
    for name in ("sd.ckpt", "sd.safetensors"):
        # SD sizes cannot be read from a state dict's shapes alone (GroupNorm groups): pass them.
        cfg = AutoencoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, resolution=32,
                                scale_factor=0.18215)
        _compare(load_autoencoder(tmp_path / name, config=cfg), vae, x)


def test_export_diffusers_round_trip(tmp_path):
    from ldm_lightning.autoencoder.export import export_autoencoder
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8, resolution=16,
                                       in_channels=1)).eval()
    ae.scale_factor.fill_(0.7)
    export_autoencoder(ae, tmp_path / "d", "diffusers")
    vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "d").eval()
    assert vae.config.scaling_factor == pytest.approx(0.7)
    _compare(ae, vae, torch.randn(2, 1, 16, 16))
    again = load_autoencoder(tmp_path / "d")
    assert float(again.scale_factor) == pytest.approx(0.7)


@pytest.mark.parametrize("reg", ["kl", "vq"])
def test_export_safetensors_round_trip(tmp_path, reg):
    from ldm_lightning.autoencoder.export import export_autoencoder
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8, resolution=16,
                                       in_channels=1, regularizer=reg, vq_codebook_size=32,
                                       attn_resolutions=(8,))).eval()
    ae.scale_factor.fill_(1.3)
    ae.latent_std.fill_(0.5)
    export_autoencoder(ae, tmp_path / "s", "safetensors")
    back = load_autoencoder(tmp_path / "s")
    assert float(back.scale_factor) == pytest.approx(1.3) and torch.equal(back.latent_std, ae.latent_std)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(back.decode(back.encode(x).mode()), ae.decode(ae.encode(x).mode()))
    with pytest.raises(ValueError, match="diffusers"):
        export_autoencoder(ae, tmp_path / "d", "diffusers")


def test_missing_and_truncated_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_autoencoder(tmp_path / "nope.ckpt")
    ae = Autoencoder(AutoencoderConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8, resolution=16))
    torch.save(ae.state_dict(), tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="truncated"):
        load_autoencoder(tmp_path / "cut.ckpt")
