"""Stage 2 of the compression-zoo benchmark: one fixed small class-conditional DiT trained on each
autoencoder's latents, then sampled per class and scored with the project's MNIST classifier.

What is shared with `ldm-lightning fit` (DiffusionModule): the backbone preset (`build_backbone`), the
`Denoiser`, the VP scaled-linear schedule, the loss (`DiffusionObjective`: eps prediction, min-SNR 5, as
configs/diffusion/mnist-unet-class.yaml), the `Conditioner` (class labels, CFG dropout 0.1), the latent
normalisation ((z - shift) * scale with the scale factor MEASURED per autoencoder by
`Autoencoder.compute_scale_factor`, as the LatentStatistics callback does), posterior sampling for KL,
the pre-quantisation latent for VQ kinds (`encode` gives it; `decode` snaps to the codebook, as LDM), and
sampling (`sample_images`: CFG + sampler + decode). What is not: the Lightning loop (no EMA, guard,
checkpoints) -- a compact loop over a latent cache of `pool` training images encoded once.

The DiT sees the same number of tokens on every latent: patch side = latent side / `tokens_side`
(8x8 latents: patch 2; DC-AE's 4x4: patch 1), so every row gets the same network but for its patch
embedding and output layer, whose widths follow the latent's channels. `DH_HEAD` turns the same network
into RAE's DiT^DH (Zheng et al. 2025): the `DiTDH-*` presets' DDT family (diffusion/ddt.py) with the DiT
as its condition encoder and a 2-block head twice as wide (RAE's DiT^DH-XL: 1152 -> 2048), for the extra
RAE row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ldm_lightning.autoencoder import Autoencoder
from ldm_lightning.autoencoder.distributions import DiagonalGaussian
from ldm_lightning.diffusion import (
    PRESETS,
    Conditioner,
    ConditioningConfig,
    Denoiser,
    DiffusionObjective,
    ObjectiveConfig,
    build_backbone,
    build_schedule,
)
from ldm_lightning.diffusion.presets import TRANSFORMER_FAMILIES
from ldm_lightning.diffusion.sampling import SamplingConfig, sample_images


@dataclass
class Stage2Config:
    """The fixed stage-2 budget every autoencoder gets."""

    steps: int = 300
    """Optimizer steps."""
    batch: int = 64
    """Latents per step."""
    pool: int = 4000
    """Training images encoded once into the latent cache the steps draw from (KL: moments, sampled per step)."""
    backbone: str = "dit-tiny"
    """Preset of diffusion/presets.py (DiT or DDT family: the patch size is set per latent)."""
    overrides: dict | None = None
    """Backbone config fields over the preset's (e.g. `dh_head(...)`)."""
    tokens_side: int = 4
    """Token grid side: patch = latent side // tokens_side (same token count on every latent)."""
    lr: float = 1e-3
    """AdamW peak learning rate, linear warm-up over the first tenth of the steps."""
    per_class: int = 20
    """Samples per class (x 10 classes) scored for accuracy and FID."""
    sampler: str = "dpmpp_2m"
    """Sampler of `ldm_lightning.diffusion.SAMPLERS`."""
    sample_steps: int = 20
    """Sampler steps."""
    cfg: float = 3.0
    """Classifier-free guidance scale."""

    def __post_init__(self):
        if min(self.steps, self.batch, self.pool, self.tokens_side, self.per_class, self.sample_steps) < 1:
            raise ValueError("stage-2 steps, batch, pool, tokens_side, per_class and sample_steps must be >= 1")
        if self.per_class * 10 < 2:
            raise ValueError("stage-2 FID needs at least 2 samples")
        if PRESETS.get(self.backbone, ("",))[0] not in TRANSFORMER_FAMILIES:
            raise ValueError(f"stage-2 backbone must be a DiT / DDT preset; got {self.backbone!r}")


def dh_head(backbone: str) -> tuple[str, dict]:
    """(preset, overrides) of RAE's DiT^DH built on the DiT preset `backbone`: the `DiTDH-S/2` preset (DDT
    family) scaled down to the DiT's blocks as the condition encoder, with its 2-block head at twice the DiT's
    width (DiTDH-XL: 1152 -> 2048)."""
    family, base = PRESETS[backbone]
    if family != "dit":
        raise ValueError(f"the DiT^DH head is built on a DiT preset; got {backbone!r} ({family})")
    from ldm_lightning.diffusion.dit import DiTConfig
    d = {**DiTConfig().__dict__, **base}
    return "DiTDH-S/2", dict(base, depth=d["depth"], hidden_size=d["hidden_size"], num_heads=d["num_heads"],
                             decoder_depth=2, decoder_hidden_size=2 * d["hidden_size"],
                             decoder_num_heads=d["num_heads"])


@torch.no_grad()
def latent_cache(ae: Autoencoder, x: torch.Tensor, device: str, batch: int = 250) -> DiagonalGaussian:
    """The posterior of every image in x (N, C, H, W), as one (N, 2c, h, w) moments tensor on `device`.
    Also measures the autoencoder's scale factor on them (1 / std of posterior samples, LDM scale_by_std)."""
    moments = []
    for i in range(0, len(x), batch):
        post = ae.encode(x[i:i + batch].to(device))                  # pre-quantisation latent for VQ kinds
        moments.append(torch.cat([post.mean.float(), post.logvar.float()], 1))  # (b, 2c, h, w)
    ae.compute_scale_factor([x[i:i + 256] for i in range(0, min(len(x), 1024), 256)],
                            generator=torch.Generator(device).manual_seed(0))
    return DiagonalGaussian(torch.cat(moments))                       # (N, 2c, h, w)


def train_stage2(ae: Autoencoder, x: torch.Tensor, labels: torch.Tensor, cfg: Stage2Config, device: str):
    """(Denoiser, Conditioner, latent shape, seconds): the DiT trained `cfg.steps` steps on ae's latents of
    the first `cfg.pool` images of x with their labels."""
    post = latent_cache(ae, x[:cfg.pool], device)
    y_all = labels[:cfg.pool].to(device)
    c, h, w = post.mean.shape[1:]
    if h % cfg.tokens_side or h != w:
        raise ValueError(f"stage-2 tokens_side={cfg.tokens_side} must divide the square latent side {h}")
    torch.manual_seed(0)
    backbone = build_backbone(cfg.backbone, **{**(cfg.overrides or {}), "in_channels": c, "input_size": h,
                                               "patch_size": h // cfg.tokens_side, "num_classes": 10})
    denoiser = Denoiser(backbone, build_schedule("vp", beta_schedule="scaled_linear"), "eps").to(device)
    objective = DiffusionObjective(ObjectiveConfig(prediction="eps", weighting="min_snr", snr_gamma=5.0))
    conditioner = Conditioner(ConditioningConfig(kind="class", num_classes=10, drop_prob=0.1)).to(device)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=cfg.lr, weight_decay=0.0)
    warm = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    g = torch.Generator(device).manual_seed(0)
    order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(0)).to(device)
    denoiser.train()
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        idx = order[(step * cfg.batch) % len(order):][:cfg.batch]
        sub = DiagonalGaussian(torch.cat([post.mean[idx], post.logvar[idx]], 1))
        z0 = ae.normalize_latents(sub.sample(generator=g))  # (B, c, h, w), as DiffusionModule
        cond = conditioner({"cls": y_all[idx]}, g)
        loss = objective.loss(denoiser, z0, cond, g).loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return denoiser.eval(), conditioner, (c, h, w), time.perf_counter() - t0


@torch.no_grad()
def score_stage2(ae: Autoencoder, denoiser, conditioner, latent_shape, cfg: Stage2Config, classifier,
                 real: torch.Tensor) -> dict:
    """Class accuracy and MNIST-FID (vs `real`) of per_class samples of each class; 'sample_s' their time."""
    from ldm_lightning.evaluation import mnist_fid, sample_accuracy
    labels = [k for k in range(10) for _ in range(cfg.per_class)]
    t0 = time.perf_counter()
    images = torch.cat([sample_images(denoiser, conditioner, ae, latent_shape, len(chunk),
                                      SamplingConfig(cfg.sampler, cfg.sample_steps, cfg.cfg, seed=i), labels=chunk).cpu()
                        for i, chunk in enumerate(labels[j:j + 250] for j in range(0, len(labels), 250))])
    seconds = time.perf_counter() - t0
    return {"s2_acc": sample_accuracy(classifier, images, torch.tensor(labels))["accuracy"],
            "s2_fid": mnist_fid(classifier, images, real), "sample_s": seconds}


def run_stage2(ae: Autoencoder, x: torch.Tensor, labels: torch.Tensor, cfg: Stage2Config, device: str,
               classifier, real: torch.Tensor) -> dict:
    """Train, sample and score; the row's stage-2 columns."""
    scale_before = float(ae.scale_factor)
    denoiser, conditioner, shape, seconds = train_stage2(ae, x, labels, cfg, device)
    out = {"scale": float(ae.scale_factor), "s2_train_s": seconds,
           "s2_params_M": sum(p.numel() for p in denoiser.parameters()) / 1e6,
           **score_stage2(ae, denoiser, conditioner, shape, cfg, classifier, real)}
    ae.scale_factor.fill_(scale_before)                              # leave the autoencoder as it came
    return out
