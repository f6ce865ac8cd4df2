"""Super-resolution and inpainting quality of a concatenation-conditioned checkpoint on held-out MNIST.

    python benchmarks/eval_concat_mnist.py --checkpoint runs/sr/checkpoints/last.ckpt [--n 256] [--steps 20]

The first `--n` MNIST test images (never seen in training: the configs train on the train split), padded to
32². Super-resolution: each is bicubic-downsampled by the model's sr_factor (the training degradation,
concat.downsample), the model upsamples it; PSNR and SSIM against the original, beside the bicubic
upsampling of the same low-res input. Inpainting: a fixed mask per image (seed 0; `--masks box`, the first
version's, or `strokes_boxes`), PSNR on the masked pixels only, beside filling them with the mean of the known
pixels (benchmarks/eval_inpaint_mnist.py trains and compares the inpainting models in one run).
Images in [-1, 1] are scored on [0, 1] (PSNR peak 1). Samples are drawn exactly as `ldm-lightning sample`
draws them (`sample_images`, seed 0, batches of 128).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_lightning.autoencoder.load import load_autoencoder  # noqa: E402
from ldm_lightning.data.mnist import load_mnist  # noqa: E402
from ldm_lightning.diffusion.concat import (build_c_concat, downsample, mask_image, random_box_masks,  # noqa: E402
                                            upsample)
from ldm_lightning.diffusion.load import load_denoiser  # noqa: E402
from ldm_lightning.diffusion.masks import stroke_box_masks  # noqa: E402
from ldm_lightning.diffusion.sampling import SamplingConfig, sample_images  # noqa: E402


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean per-image PSNR (dB) of images in [-1, 1], scored on [0, 1]; over `mask` pixels only if given."""
    d = ((a - b) / 2).pow(2)  # (N, C, H, W) on [0, 1]
    m = torch.ones_like(d) if mask is None else mask.expand_as(d)
    mse = (d * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    from skimage.metrics import structural_similarity
    return float(np.mean([structural_similarity(x[0].numpy(), y[0].numpy(), data_range=2.0) for x, y in zip(a, b)]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="flow_heun")
    p.add_argument("--masks", default="box", choices=("box", "strokes_boxes"),
                   help="inpainting: the evaluation masks (box: the first version's table; eval_inpaint_mnist.py "
                        "compares methods on strokes_boxes)")
    a = p.parse_args(argv)
    den, cond, meta = load_denoiser(a.checkpoint)
    ae = load_autoencoder(meta["autoencoder"]["path"])
    task, f = cond.cfg.concat, ae.downsample_factor
    x, _ = load_mnist("test")
    x = torch.from_numpy(np.pad(x[:a.n], ((0, 0), (2, 2), (2, 2)))).float()[:, None] / 127.5 - 1  # (n, 1, 32, 32)
    hw = (x.shape[-2] // f, x.shape[-1] // f)
    t0 = time.time()
    if task == "super_resolution":
        low = downsample(x, cond.cfg.sr_factor)
        c = build_c_concat(task, hw, low_res=low)
    elif task == "inpainting":
        make = stroke_box_masks if a.masks == "strokes_boxes" else random_box_masks
        mask = make(len(x), x.shape[-2], x.shape[-1], torch.Generator().manual_seed(0))
        c = build_c_concat(task, hw, masked=mask_image(x, mask), mask=mask, autoencoder=ae)
    else:
        raise SystemExit(f"{a.checkpoint}: not a concatenation-conditioned model (conditioning.concat={task!r})")
    out = torch.cat([sample_images(den, cond, ae, [meta["latent_shape"][0], *hw], len(c[i:i + 128]),
                                   SamplingConfig(a.sampler, a.steps, 1.0, i), c_concat=c[i:i + 128])
                     for i in range(0, len(c), 128)])
    secs = time.time() - t0
    print(f"{Path(a.checkpoint)}: {task}, {a.n} MNIST test images, {a.sampler} {a.steps} steps ({secs:.0f} s)")
    if task == "super_resolution":
        bic = upsample(low, x.shape[-2:])
        print(f"| method | PSNR (dB) | SSIM |\n|---|---|---|")
        print(f"| bicubic x{cond.cfg.sr_factor} | {psnr(bic, x):.2f} | {ssim(bic, x):.3f} |")
        print(f"| diffusion SR | {psnr(out, x):.2f} | {ssim(out, x):.3f} |")
    else:
        known = 1 - mask
        mean_fill = (x * known).flatten(1).sum(1) / known.flatten(1).sum(1)  # (n,)
        fill = x * known + mean_fill.view(-1, 1, 1, 1) * mask
        print(f"| method | PSNR on the masked pixels (dB) | masked fraction |\n|---|---|---|")
        frac = float(mask.mean())
        print(f"| fill with the mean of known pixels | {psnr(fill, x, mask):.2f} | {frac:.2f} |")
        print(f"| diffusion inpainting | {psnr(out, x, mask):.2f} | {frac:.2f} |")
    assert math.isfinite(psnr(out, x))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
