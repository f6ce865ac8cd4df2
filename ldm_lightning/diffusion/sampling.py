"""Sampling as a library: a trained denoiser + its conditioner + the frozen autoencoder -> images.

`load_pipeline(checkpoint)` rebuilds that bundle from a training .ckpt or a denoiser export (the autoencoder
recorded at training unless another is given); `sample_images(..., SamplingConfig(...))` draws latents with a
sampler under classifier-free guidance and decodes them. Used by `ldm-lightning sample` (sample.py, the CLI),
the training module's validation grids, `SampleQualityCallback`, `ldm-lightning evaluate` and the demo.

Deterministic for a seed: the initial noise is drawn on the CPU from `seed` (so it does not depend on the
device), ancestral noise from a generator on the device seeded by `seed + 1`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ldm_lightning.errors import UserError

from .ddt import encoder_reuse
from .guidance import cfg_denoiser
from .samplers import SAMPLERS, get_sampler


def default_device() -> str:
    """'cuda' when a GPU is visible, else 'cpu': the `--device` default of the sampling tools."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's parameters, or of its buffers when it has none (the identity autoencoder)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


@dataclass
class SamplingConfig:
    """How to draw samples; the same fields in every entry point (CLI flags, validation, the callback)."""

    sampler: str = "ddim"
    """Sampler name, one of samplers.SAMPLERS."""
    steps: int = 25
    """Sampler steps (network evaluations per step depend on the sampler: Heun takes two)."""
    guidance_scale: float = 1.0
    """Classifier-free guidance scale w: uncond + w * (cond - uncond); 1 = conditional only."""
    seed: int = 0
    """Seed of the initial noise (CPU) and, + 1, of the sampler's ancestral noise (device)."""
    encoder_every: int = 1
    """DDT backbones: run the condition encoder on every k-th network call and reuse its output on the others
    (ddt.encoder_reuse); 1 = always recompute. The sampler itself is unchanged."""
    sampler_options: dict = field(default_factory=dict)
    """Extra keyword arguments of the sampler function (samplers.py), e.g. DDIM's eta."""

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}; got {self.sampler!r}")
        if self.steps < 1 or self.encoder_every < 1:
            raise ValueError(f"steps and encoder_every must be >= 1; got {self.steps}, {self.encoder_every}")


@torch.no_grad()
def sample_images(denoiser, conditioner, autoencoder, latent_shape, num: int, config: SamplingConfig | None = None,
                  labels: list[int] | None = None, prompts: list[str] | None = None,
                  c_concat: torch.Tensor | None = None, layouts: list | None = None) -> torch.Tensor:
    """(num, C, H, W) images in [-1, 1]: sample latents (c, h, w) = `latent_shape` as `config` says, decode them.

    labels / prompts / layouts: one condition per sample (class / text / layout kind: a list of [class, x0, y0, x1,
    y1] boxes, diffusion/layout.py); none of them for unconditional models.
    c_concat: (num, C_cat, h, w) concatenation condition (concat.build_c_concat), kept in both CFG branches."""
    config = config or SamplingConfig()
    device = module_device(denoiser)
    kind = conditioner.cfg.kind
    if kind == "class" and labels is None:
        raise ValueError("this model is class-conditional: give labels (--class K or --classes A-B)")
    if kind == "text" and prompts is None:
        raise ValueError("this model is text-conditional: give prompts (--prompt TEXT)")
    if kind == "layout" and layouts is None:
        raise ValueError("this model is layout-conditional: give layouts (--layout JSON or FILE)")
    if kind == "none" and (labels is not None or prompts is not None or layouts is not None):
        raise ValueError("this model is unconditional: drop --class / --classes / --prompt / --layout")
    if kind == "class":
        cond = conditioner.from_labels(torch.as_tensor(labels, dtype=torch.long))
    elif kind == "text":
        cond = conditioner.from_prompts(list(prompts))
    elif kind == "layout":
        cond = conditioner.from_layouts(list(layouts), "--layout")
    else:
        cond = {}
    uncond = conditioner.null(num) if kind != "none" else None
    if c_concat is not None:
        c_concat = c_concat.to(device)
        cond = {**cond, "c_concat": c_concat}
        uncond = None if uncond is None else {**uncond, "c_concat": c_concat}
    fn = cfg_denoiser(denoiser, cond, uncond, float(config.guidance_scale))
    noise = torch.Generator().manual_seed(config.seed)
    x_T = torch.randn((num, *latent_shape), generator=noise).to(device)  # (N, c, h, w)
    g = torch.Generator(device).manual_seed(config.seed + 1)
    with encoder_reuse(denoiser.backbone, config.encoder_every):
        z = get_sampler(config.sampler)(fn, x_T, denoiser.schedule, config.steps, generator=g,
                                        **config.sampler_options)  # (N, c, h, w)
    z = autoencoder.denormalize_latents(z.float())  # undo the training side's (z - shift) * scale
    return autoencoder.decode(z.to(module_device(autoencoder))).float().clamp(-1, 1)  # (N, C, H, W)


@dataclass
class SamplingPipeline:
    """A trained denoiser with what sampling it needs: its conditioner, its autoencoder and its metadata."""

    denoiser: torch.nn.Module
    conditioner: torch.nn.Module
    autoencoder: torch.nn.Module
    meta: dict
    """The checkpoint's `ldm_lightning` metadata (backbone, schedule, conditioning, latent_shape, autoencoder)."""

    @property
    def latent_shape(self) -> list[int]:
        """(c, h, w) of the latents the model was trained on: what `sample_images` draws by default."""
        return list(self.meta["latent_shape"])

    def sample(self, num: int, config: SamplingConfig | None = None, latent_shape=None, **condition) -> torch.Tensor:
        """`sample_images` with this bundle; `condition`: labels=, prompts=, layouts=, c_concat=."""
        return sample_images(self.denoiser, self.conditioner, self.autoencoder, latent_shape or self.latent_shape,
                             num, config, **condition)


def load_pipeline(checkpoint: str | os.PathLike, autoencoder: str | os.PathLike | None = None,
                  device: str | torch.device = "cpu", weights: str = "ema") -> SamplingPipeline:
    """The denoiser of `checkpoint` (a DiffusionModule .ckpt or a denoiser export; `weights` 'ema' or 'live'), its
    conditioner and its autoencoder (`autoencoder`, else the one recorded at training), in eval mode on `device`.

    An autoencoder that does not exist here is a UserError naming the path and the fix."""
    from ldm_lightning.autoencoder.load import load_autoencoder

    from .load import load_denoiser
    device = torch.device(device)
    denoiser, conditioner, meta = load_denoiser(checkpoint, weights=weights)
    denoiser, conditioner = denoiser.to(device).eval(), conditioner.to(device)
    ae_path = autoencoder or (meta.get("autoencoder") or {}).get("path")
    if ae_path is None:
        raise UserError(f"{checkpoint} records no autoencoder (an import without --autoencoder): pass --autoencoder "
                        "PATH, the autoencoder whose latents the model denoises")
    try:
        ae = load_autoencoder(ae_path, device=device)
    except FileNotFoundError as err:
        if autoencoder is not None:
            raise UserError(str(err)) from None
        raise UserError(f"the autoencoder recorded in the checkpoint ({ae_path}) does not exist here: "
                        "pass --autoencoder PATH") from None
    return SamplingPipeline(denoiser, conditioner, ae, meta)


__all__ = ["SamplingConfig", "SamplingPipeline", "default_device", "load_pipeline", "module_device", "sample_images"]
