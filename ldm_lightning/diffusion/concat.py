"""Concatenation conditioning (LDM, Rombach et al. 2022, §3.3, §4.4-4.5): `c_concat` channels joined to
the backbone input, for super-resolution and inpainting.

- 'super_resolution': the condition is a low-resolution image (bicubic, antialiased, `sr_factor` smaller);
  it is resized (bicubic) to the latent grid and concatenated. On pixels (the identity autoencoder) the
  latent grid is the image grid, so this is SR3 / LDM-SR's "upsampled low-res input" conditioning.
- 'inpainting': the condition is the masked image (missing pixels set to 0, mid-grey in [-1, 1]) and the
  mask (1 = to be generated), both resized (area) to the latent grid: C + 1 channels. Training masks are
  random boxes drawn from the step generator. (LDM encodes the masked image with the autoencoder; here
  it is resized, which is the same thing on pixels and keeps the frozen autoencoder out of the condition.)
- 'semantic' (semantic synthesis, §4.3.2): the condition is a per-pixel class map (B, H, W) of ids 0..K-1
  (`map_classes` K, background 0), one-hot encoded and resized (area: each latent cell gets the fraction of its
  pixels in each class) to the latent grid: K channels. Training maps come from the batch (data.map_ext).

The same `c_concat` builder serves training (from clean images) and `ldm-lightning sample` (from the
user's low-res images or images + masks), so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

ConcatTask = Literal["none", "super_resolution", "inpainting", "semantic"]
CONCAT_TASKS = get_args(ConcatTask)


def concat_channels(task: str, image_channels: int, map_classes: int = 0) -> int:
    """Channels `c_concat` adds to the backbone input."""
    return {"none": 0, "super_resolution": image_channels, "inpainting": image_channels + 1,
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


def mask_image(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Missing pixels (mask 1) set to 0 (mid-grey in [-1, 1])."""
    return images.float() * (1 - mask)


def build_c_concat(task: str, latent_hw: tuple[int, int], low_res: torch.Tensor | None = None,
                   masked: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   class_map: torch.Tensor | None = None, map_classes: int = 0) -> torch.Tensor:
    """The backbone's extra input channels on the latent grid (B, C_cat, h, w)."""
    if task == "semantic":
        return one_hot_map(class_map, map_classes, latent_hw)
    if task == "super_resolution":
        return upsample(low_res, latent_hw)  # (B, C, h, w)
    if task == "inpainting":
        return torch.cat([F.interpolate(masked.float(), size=latent_hw, mode="area"),
                          F.interpolate(mask.float(), size=latent_hw, mode="area")], dim=1)  # (B, C + 1, h, w)
    raise ValueError(f"conditioning.concat must be one of {CONCAT_TASKS[1:]} here, got {task!r}")


def training_c_concat(task: str, images: torch.Tensor, latent_hw: tuple[int, int], sr_factor: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """c_concat for a batch of clean images (B, C, H, W) in [-1, 1]: degrade them as the task says."""
    if task == "super_resolution":
        return build_c_concat(task, latent_hw, low_res=downsample(images, sr_factor))
    mask = random_box_masks(images.shape[0], images.shape[-2], images.shape[-1], generator, images.device)
    return build_c_concat(task, latent_hw, masked=mask_image(images, mask), mask=mask)
