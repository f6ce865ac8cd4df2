"""Concatenation conditioning (LDM, Rombach et al. 2022, §3.3, §4.4-4.5): `c_concat` channels joined to
the backbone input, for super-resolution and inpainting.

- 'super_resolution': the condition is a low-resolution image (bicubic, antialiased, `sr_factor` smaller);
  it is resized (bicubic) to the latent grid and concatenated. On pixels (the identity autoencoder) the
  latent grid is the image grid, so this is SR3 / LDM-SR's "upsampled low-res input" conditioning.
- 'inpainting' (LDM's inpainting model, as SD-inpainting): the condition is the frozen autoencoder's
  encoding of the masked image (missing pixels set to 0, mid-grey in [-1, 1]; the posterior mode,
  normalised as the training latents) and the mask (1 = to be generated) resized (area: the fraction of
  each latent cell to generate) to the latent grid: latent_channels + 1 channels (4 + 1 on the tiny MNIST
  autoencoder, so the UNet sees 4 + 4 + 1). On pixels (the identity autoencoder) the encoding is the
  masked image itself. Training masks are `conditioning.inpaint_masks`: 'strokes_boxes' (masks.py,
  LaMa-style, LDM's) or 'box' (one random box, the masks of the first version), from the step generator.
  After sampling, `paste_known` puts the known pixels back into the decoded image (the optional overlay
  of SD inpainting tools; the autoencoder's reconstruction of the known region is not exact); the sampler
  itself is not altered: the model is conditioned, as LDM's, with no RePaint-style blending per step.
- 'semantic' (semantic synthesis, §4.3.2): the condition is a per-pixel class map (B, H, W) of ids 0..K-1
  (`map_classes` K, background 0), one-hot encoded and resized (area: each latent cell gets the fraction of its
  pixels in each class) to the latent grid: K channels. Training maps come from the batch (data.members.map_ext).

The same `c_concat` builder serves training (from clean images) and `ldm-lightning sample` (from the
user's low-res images or images + masks), so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

from .masks import stroke_box_masks

ConcatTask = Literal["none", "super_resolution", "inpainting", "semantic"]
CONCAT_TASKS = get_args(ConcatTask)
InpaintMasks = Literal["strokes_boxes", "box"]
INPAINT_MASKS = get_args(InpaintMasks)


def concat_channels(task: str, image_channels: int, latent_channels: int, map_classes: int = 0) -> int:
    """Channels `c_concat` adds to the backbone input."""
    return {"none": 0, "super_resolution": image_channels, "inpainting": latent_channels + 1,
            "semantic": map_classes}[task]


def one_hot_map(class_map: torch.Tensor, map_classes: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) integer class ids -> (B, K, h, w) class fractions on the latent grid (area resize of the one-hot)."""
    ids = class_map.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= map_classes):
        raise ValueError(f"class map holds id {int(ids.max())}; this model takes ids 0-{map_classes - 1} "
                         "(conditioning.map_classes)")
    hot = F.one_hot(ids, map_classes).permute(0, 3, 1, 2).float()  # (B, K, H, W)
    return F.interpolate(hot, size=latent_hw, mode="area")  # (B, K, h, w)


def join_concat(x: torch.Tensor, c_concat: torch.Tensor | None, channels: int, backbone: str) -> torch.Tensor:
    """The backbone input with `c_concat` joined on the channels (x unchanged when `channels` is 0)."""
    if not channels:
        return x
    if c_concat is None or c_concat.shape[1] != channels:
        raise ValueError(f"this {backbone} takes c_concat (B, {channels}, H, W) joined to its input")
    return torch.cat([x, c_concat.to(x.dtype)], dim=1)  # (B, C + C_cat, H, W)


def downsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, C, H/f, W/f): bicubic with antialiasing (PIL's BICUBIC resize)."""
    h, w = images.shape[-2] // factor, images.shape[-1] // factor
    return F.interpolate(images.float(), size=(h, w), mode="bicubic", antialias=True).clamp(-1, 1)


def upsample(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize to `size` (the super-resolution baseline, and the SR condition on the latent grid)."""
    return F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


def random_box_masks(n: int, h: int, w: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu", min_frac: float = 0.25, max_frac: float = 0.6) -> torch.Tensor:
    """(n, 1, h, w) float masks, 1 inside one random box (sides in [min_frac, max_frac] of the image)."""
    u = torch.rand(n, 4, generator=generator, device=device)  # (n, 4): box height, width, top, left
    bh = (h * (min_frac + (max_frac - min_frac) * u[:, 0])).long().clamp(1, h)
    bw = (w * (min_frac + (max_frac - min_frac) * u[:, 1])).long().clamp(1, w)
    top = ((h - bh + 1) * u[:, 2]).long().clamp_max(h - bh)
    left = ((w - bw + 1) * u[:, 3]).long().clamp_max(w - bw)
    rows = torch.arange(h, device=device)[None, :, None]  # (1, h, 1)
    cols = torch.arange(w, device=device)[None, None, :]  # (1, 1, w)
    inside = (rows >= top[:, None, None]) & (rows < (top + bh)[:, None, None]) & \
             (cols >= left[:, None, None]) & (cols < (left + bw)[:, None, None])  # (n, h, w)
    return inside[:, None].float()


def training_masks(kind: str, n: int, h: int, w: int, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, 1, h, w) training masks of `conditioning.inpaint_masks` kind."""
    if kind == "strokes_boxes":
        return stroke_box_masks(n, h, w, generator, device)
    if kind == "box":
        return random_box_masks(n, h, w, generator, device)
    raise ValueError(f"conditioning.inpaint_masks must be one of {INPAINT_MASKS}, got {kind!r}")


def mask_image(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Missing pixels (mask 1) set to 0 (mid-grey in [-1, 1])."""
    return images.float() * (1 - mask)


@torch.no_grad()
def encode_masked(autoencoder, masked: torch.Tensor) -> torch.Tensor:
    """The frozen autoencoder's normalised latent (posterior mode) of masked images (B, C, H, W) -> (B, c, h, w)."""
    masked = masked.to(autoencoder.scale_factor.device)  # every autoencoder kind holds its scale as a buffer
    return autoencoder.normalize_latents(autoencoder.encode(masked.float()).mode().float())


def paste_known(samples: torch.Tensor, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The decoded samples with the known pixels (mask 0) of `images` put back: the known region is kept."""
    mask = mask.to(samples.device, samples.dtype)
    return images.to(samples.device, samples.dtype) * (1 - mask) + samples * mask


def build_c_concat(task: str, latent_hw: tuple[int, int], low_res: torch.Tensor | None = None,
                   masked: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   autoencoder=None, class_map: torch.Tensor | None = None, map_classes: int = 0) -> torch.Tensor:
    """The backbone's extra input channels on the latent grid (B, C_cat, h, w); inpainting encodes `masked`
    with `autoencoder` (the frozen one the model denoises the latents of); semantic one-hots `class_map`."""
    if task == "semantic":
        return one_hot_map(class_map, map_classes, latent_hw)
    if task == "super_resolution":
        return upsample(low_res, latent_hw)  # (B, C, h, w)
    if task == "inpainting":
        z = encode_masked(autoencoder, masked)  # (B, c, h, w)
        if tuple(z.shape[-2:]) != tuple(latent_hw):
            raise ValueError(f"the masked images encode to a {tuple(z.shape[-2:])} latent grid, not {latent_hw}")
        m = F.interpolate(mask.float().to(z.device), size=latent_hw, mode="area")  # (B, 1, h, w)
        return torch.cat([z, m], dim=1)  # (B, c + 1, h, w)
    raise ValueError(f"conditioning.concat must be one of {CONCAT_TASKS[1:]} here, got {task!r}")


def training_c_concat(task: str, images: torch.Tensor, latent_hw: tuple[int, int], sr_factor: int,
                      generator: torch.Generator | None = None, autoencoder=None,
                      inpaint_masks: str = "strokes_boxes") -> torch.Tensor:
    """c_concat for a batch of clean images (B, C, H, W) in [-1, 1]: degrade them as the task says."""
    if task == "super_resolution":
        return build_c_concat(task, latent_hw, low_res=downsample(images, sr_factor))
    mask = training_masks(inpaint_masks, images.shape[0], images.shape[-2], images.shape[-1], generator,
                          images.device)
    return build_c_concat(task, latent_hw, masked=mask_image(images, mask), mask=mask, autoencoder=autoencoder)
