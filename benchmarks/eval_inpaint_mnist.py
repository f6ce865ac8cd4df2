"""LDM inpainting on MNIST against mean-fill and the first (pixel, resized-image, box-mask) model, in one run.

    python benchmarks/eval_inpaint_mnist.py --ae-steps 150 --steps 150 --n 128 --k 8 --pixel-strokes  # docs table

One process: (1) the tiny autoencoder (configs/autoencoder/tiny-mnist.yaml) trained `--ae-steps` and saved as a
Lightning checkpoint, which the latent model then loads by path (`load_autoencoder`, as `fit` does); (2) the
inpainting models trained the same `--steps` at the same batch and seed from shipped configs:
  - old: configs/diffusion/mnist-inpaint-pixels.yaml with `inpaint_masks: box` (the first version: pixel UNet,
    the masked image itself as condition, one random box per image);
  - LDM: configs/diffusion/mnist-inpaint-latents.yaml (UNet on 8x8x4 latents, condition = the autoencoder's
    latent of the masked image + the mask on the 8x8 grid, LaMa-style stroke / box masks);
  - with --pixel-strokes, configs/diffusion/mnist-inpaint-pixels.yaml as shipped (pixel UNet, stroke / box
    masks): the masks' share of the difference, apart from the latent condition's.
All train on the MNIST train split held in memory (Lightning Trainer on the CPU, the module's own loss).

Scored on the first `--n` MNIST test images (held out), each with one stroke / box mask (masks.py, seed 1234:
the same masks for every method), PSNR on the masked pixels only (images in [-1, 1] scored on [0, 1], peak 1):
  - mean fill: the masked pixels set to the mean of the known pixels of the image;
  - autoencoder reconstruction of the whole clean image (not an inpainting method: the latent model's ceiling);
  - each model, one sample (the PSNR averaged over `--k` independent draws) and the pixel mean of `--k` samples
    (PSNR rewards the conditional mean; a single sample of a sharp digit is penalised for every misplaced stroke).
Samples are drawn as `ldm-lightning sample` draws them (build_c_concat + sample_images, flow Euler, seeds 0..k-1).
The EMA decay is lowered for these short runs (`--ema-decay`; the configs' 0.99 / 0.999 lag a 150-step run).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class Images(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i]}


def init_args(config: str, **overrides) -> dict:
    kw = copy.deepcopy(yaml.safe_load((CONFIGS / config).read_text())["model"]["init_args"])
    for k, v in overrides.items():
        kw[k] = {**kw[k], **v} if isinstance(v, dict) and isinstance(kw.get(k), dict) else v
    return kw


def train(module, data: Images, steps: int, batch: int, seed: int = 0):
    """Fit `module` for `steps` optimizer steps; returns (trainer, seconds per step)."""
    import lightning as L
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(seed))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        gradient_clip_val=1.0, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    return trainer, (time.perf_counter() - t0) / steps


def psnr_masked(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) over the masked pixels of images in [-1, 1], scored on [0, 1]."""
    d = ((a - b) / 2).pow(2) * mask
    mse = d.flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


@torch.no_grad()
def inpaint(module, x: torch.Tensor, mask: torch.Tensor, k: int, steps: int) -> list[torch.Tensor]:
    """`k` samples (each (n, 1, 32, 32)) of every image, drawn as `ldm-lightning sample` does."""
    from ldm_lightning.diffusion.concat import build_c_concat, mask_image
    from ldm_lightning.diffusion.sampling import SamplingConfig, sample_images
    ae, shape = module.autoencoder, module.meta["latent_shape"]
    c = build_c_concat("inpainting", tuple(shape[1:]), masked=mask_image(x, mask), mask=mask, autoencoder=ae)
    return [sample_images(module.ema_or_live(), module.conditioner, ae, shape, len(x),
                          SamplingConfig("flow_euler", steps, 1.0, seed), c_concat=c) for seed in range(k)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ae-steps", type=int, default=150)
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of each inpainting model")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--n", type=int, default=128, help="held-out MNIST test images scored")
    p.add_argument("--k", type=int, default=8, help="samples per image")
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--ema-decay", type=float, default=0.95)
    p.add_argument("--train-limit", type=int, default=20000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-old", action="store_true", help="leave out the pixel box-mask model (the slow one)")
    p.add_argument("--pixel-strokes", action="store_true",
                   help="also the shipped pixel config (stroke / box masks): the same masks as the LDM model")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import lightning as L

    from ldm_lightning.autoencoder.load import load_autoencoder
    from ldm_lightning.autoencoder.module import AutoencoderModule
    from ldm_lightning.diffusion.masks import stroke_box_masks
    from ldm_lightning.diffusion.module import DiffusionModule
    from ldm_lightning.encoders.mnist_data import load_mnist_32
    t_start = time.time()
    data = Images(load_mnist_32("train", limit=a.train_limit)[0])
    x = load_mnist_32("test", limit=a.n)[0]  # (n, 1, 32, 32) held out
    mask = stroke_box_masks(a.n, 32, 32, torch.Generator().manual_seed(1234))  # (n, 1, 32, 32), one per image
    known = 1 - mask
    fill = x * known + ((x * known).flatten(1).sum(1) / known.flatten(1).sum(1)).view(-1, 1, 1, 1) * mask
    rows = [("fill with the mean of known pixels", psnr_masked(fill, x, mask), None, "-")]

    with tempfile.TemporaryDirectory() as tmp:
        L.seed_everything(0, verbose=False)
        ae_module = AutoencoderModule(**init_args("autoencoder/tiny-mnist.yaml", ema={"decay": a.ema_decay}))
        trainer, sec = train(ae_module, data, a.ae_steps, a.batch)
        ae_ckpt = f"{tmp}/ae.ckpt"
        trainer.save_checkpoint(ae_ckpt)
        ae = load_autoencoder(ae_ckpt).eval()
        with torch.no_grad():
            rec = ae.decode(ae.encode(x).mode()).clamp(-1, 1)
        rows.append((f"autoencoder reconstruction of the clean image ({a.ae_steps} steps; the latent model's ceiling)",
                     psnr_masked(rec, x, mask), None, f"{sec:.2f}"))
        print(f"autoencoder: {a.ae_steps} steps, {sec:.2f} s/step", flush=True)
        variants = [("LDM: latent UNet, masked image's latent + mask, stroke/box masks",
                     init_args("diffusion/mnist-inpaint-latents.yaml", autoencoder=ae_ckpt))]
        if not a.skip_old:
            variants.append(("old: pixel UNet, masked image + mask, box masks",
                             init_args("diffusion/mnist-inpaint-pixels.yaml", conditioning={"inpaint_masks": "box"})))
        if a.pixel_strokes:  # separates the masks' share of the lead from the latent condition's
            variants.append(("pixel UNet, masked image + mask, stroke/box masks",
                             init_args("diffusion/mnist-inpaint-pixels.yaml")))
        for name, kw in variants:
            kw.update(val_num=0, ema={**kw["ema"], "decay": a.ema_decay})
            L.seed_everything(0, verbose=False)
            module = DiffusionModule(**kw)
            _, sec = train(module, data, a.steps, a.batch)
            module.eval()
            t0 = time.time()
            outs = inpaint(module, x, mask, a.k, a.sample_steps)
            single = sum(psnr_masked(o, x, mask) for o in outs) / len(outs)
            mean = psnr_masked(torch.stack(outs).mean(0), x, mask)
            print(f"{name}: {a.steps} steps, {sec:.2f} s/step; sampling {time.time() - t0:.0f} s; PSNR masked "
                  f"{single:.2f} dB (1 sample), {mean:.2f} dB (mean of {a.k})", flush=True)
            rows.append((name, single, mean, f"{sec:.2f}"))

    frac = float(mask.mean())
    print(f"\n{a.n} MNIST test images, stroke/box masks (masked fraction {frac:.2f}); models: {a.steps} steps at batch "
          f"{a.batch}, flow Euler {a.sample_steps} steps, k = {a.k}; wall {time.time() - t_start:.0f} s\n")
    print(f"| method | PSNR masked, 1 sample (dB) | PSNR masked, mean of {a.k} samples (dB) | train s/step |")
    print("|---|---|---|---|")
    for name, single, mean, sec in rows:
        print(f"| {name} | {single:.2f} | {'-' if mean is None else f'{mean:.2f}'} | {sec} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
