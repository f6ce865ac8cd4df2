"""Issue 30's LDM inpainting: the stroke / box mask generator, the latent condition (the autoencoder's latent of
the masked image + the mask on the latent grid), and `ldm-lightning fit` + `sample` with the shipped latent
inpainting config in subprocesses, on real MNIST with the tiny autoencoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_diffusion_methods import _cli, _fit, _mnist_test, _read, _write_pngs


def test_stroke_box_masks_are_deterministic_and_cover_the_stated_area():
    from ldm_lightning.diffusion.masks import MAX_AREA, MIN_AREA, stroke_box_masks
    m = stroke_box_masks(200, 32, 32, torch.Generator().manual_seed(0))
    assert m.shape == (200, 1, 32, 32) and set(m.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(m, stroke_box_masks(200, 32, 32, torch.Generator().manual_seed(0)))  # same seed, same masks
    assert not torch.equal(m, stroke_box_masks(200, 32, 32, torch.Generator().manual_seed(1)))
    area = m.mean((1, 2, 3))
    assert MIN_AREA == 0.1 and MAX_AREA == 0.6 and ((area >= MIN_AREA) & (area <= MAX_AREA)).all()
    assert 0.2 < float(area.mean()) < 0.4  # large masks: ~30% on average (the old boxes: 17%)
    # both kinds occur: a mask that fills its bounding box is one box (a sixth of the masks: half are 1-3 boxes),
    # strokes never do
    rows, cols = m[:, 0].amax(2), m[:, 0].amax(1)  # (n, 32): masked rows / columns
    fills_bbox = m.flatten(1).sum(1) == rows.sum(1) * cols.sum(1)
    assert 0.05 < float(fills_bbox.float().mean()) < 0.4
    big = stroke_box_masks(8, 48, 40, torch.Generator().manual_seed(0))  # any size, same area guarantee
    assert big.shape == (8, 1, 48, 40) and (big.mean((1, 2, 3)) >= MIN_AREA).all()


def test_latent_inpainting_condition_is_the_masked_images_latent_and_the_mask(tiny_ae):
    from ldm_lightning.autoencoder.load import load_autoencoder
    from ldm_lightning.diffusion.concat import mask_image, random_box_masks, training_c_concat
    from ldm_lightning.diffusion.masks import stroke_box_masks
    x = _mnist_test(4)
    ae = load_autoencoder(tiny_ae)
    c = training_c_concat("inpainting", x, (8, 8), 4, torch.Generator().manual_seed(0), ae)
    mask = stroke_box_masks(4, 32, 32, torch.Generator().manual_seed(0))
    z = ae.normalize_latents(ae.encode(mask_image(x, mask)).mode())  # (4, 4, 8, 8)
    assert c.shape == (4, 5, 8, 8) and torch.allclose(c[:, :4], z)
    assert torch.allclose(c[:, 4:], mask.unflatten(2, (8, 4)).unflatten(4, (8, 4)).mean((3, 5)))  # masked fraction
    c = training_c_concat("inpainting", x, (8, 8), 4, torch.Generator().manual_seed(0), ae, "box")
    assert torch.allclose(c[:, 4:].mean((1, 2, 3)), random_box_masks(4, 32, 32, torch.Generator().manual_seed(0))
                          .mean((1, 2, 3)))  # the first version's box masks stay selectable


@pytest.mark.slow
def test_latent_inpainting_fit_and_sample_keep_the_known_region(mnist_shards, tiny_ae, tmp_path):
    """Shipped latent inpainting config on the tiny autoencoder: fit 2 steps, the UNet takes 4 + 4 + 1 channels;
    `sample` with images + masks writes samples whose known pixels are the input's, and whose masked pixels
    are the model's (they differ between two samples of one image)."""
    from ldm_lightning.diffusion.masks import stroke_box_masks
    ckpt = _fit("mnist-inpaint-latents", mnist_shards, tmp_path / "run", "--model.init_args.autoencoder", tiny_ae,
                "--model.init_args.val_num", "0")
    meta = torch.load(ckpt, map_location="cpu", weights_only=True)["ldm_lightning"]
    assert meta["backbone"]["in_channels"] == 4 and meta["backbone"]["concat_channels"] == 5
    assert meta["conditioning"]["inpaint_masks"] == "strokes_boxes" and meta["latent_shape"] == [4, 8, 8]
    x, mask = _mnist_test(2), stroke_box_masks(2, 32, 32, torch.Generator().manual_seed(3))
    _write_pngs(x, tmp_path / "img")
    _write_pngs(mask * 2 - 1, tmp_path / "mask")
    _cli(["sample", "--checkpoint", str(ckpt), "--cond-images", str(tmp_path / "img"), "--masks", str(tmp_path / "mask"),
          "--num", "2", "--steps", "2", "--sampler", "flow_euler", "--out", str(tmp_path / "filled")], tmp_path)
    for i in range(2):
        known = mask[i, 0].numpy() == 0
        given = _read(tmp_path / "img" / f"digit{i}.png")
        a, b = (_read(tmp_path / "filled" / f"digit{i}_{k}.png") for k in range(2))
        assert a.shape == (32, 32)
        assert np.array_equal(a[known], given[known]) and np.array_equal(b[known], given[known])
        assert not np.array_equal(a[~known], b[~known])  # two draws of the masked region
