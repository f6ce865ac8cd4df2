"""`Autoencoder`: one facade over {SD conv, DC-AE} backbones x {KL, VQ, none} regularisers.

It is the README contract: `.encode(x) -> posterior` (`.mean`, `.logvar`, `.sample(generator=)`,
`.mode()`), `.decode(z)`, `.scale_factor` / `.shift_factor` (buffers, saved with the weights;
`z_normalized = (z - shift) * scale`), `.latent_channels`, `.downsample_factor`, and
`compute_scale_factor(batches)` (LDM's `scale_by_std`, Rombach et al. 2022 sec. 4.3.2 / appendix G).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ldm_lightning.autoencoder.dcae import DCDecoder, DCEncoder
from ldm_lightning.autoencoder.distributions import DiagonalGaussian, PointPosterior
from ldm_lightning.autoencoder.kl import Decoder, Encoder
from ldm_lightning.autoencoder.vq import VectorQuantizer
from ldm_lightning.data.transforms import ensure_model_range

ARCHS = ("kl", "dcae")
REGULARIZERS = ("kl", "vq", "none")


@dataclass
class AutoencoderConfig:
    """Architecture of a stage-1 autoencoder. Field names follow CompVis `ddconfig` where one exists."""

    arch: str = "kl"
    """Backbone: 'kl' (SD/LDM conv encoder-decoder) or 'dcae' (DC-AE residual space<->channel shortcuts)."""
    regularizer: str = "kl"
    """Latent regulariser: 'kl' (diagonal Gaussian posterior), 'vq' (vector quantisation) or 'none'."""
    in_channels: int = 3
    """Image channels in."""
    out_channels: int | None = None
    """Image channels out (None: same as in_channels)."""
    resolution: int = 256
    """Nominal training resolution; only used to place attention (`attn_resolutions`). Any multiple of f works."""
    ch: int = 128
    """Base width."""
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Width multipliers per level; downsampling factor f = 2^(len(ch_mult)-1)."""
    num_res_blocks: int = 2
    """ResnetBlocks per encoder level (the decoder has one more, as in CompVis)."""
    attn_resolutions: tuple[int, ...] = ()
    """Feature-map sizes (at `resolution`) that get self-attention after each ResnetBlock."""
    mid_attn: bool = True
    """Self-attention in the middle block ('kl' arch)."""
    z_channels: int = 4
    """Encoder output / decoder input width."""
    double_z: bool | None = None
    """Encoder emits mean and logvar (2*z_channels). None: True iff regularizer == 'kl'."""
    embed_dim: int | None = None
    """Latent channels after quant_conv (None: z_channels). This is `latent_channels`."""
    norm_groups: int = 32
    """GroupNorm groups; must divide every width (use 8 or fewer for tiny models)."""
    dropout: float = 0.0
    """Dropout inside ResnetBlocks."""
    dcae_shortcut: bool = True
    """'dcae' arch: the residual space<->channel shortcuts (off = the naive deep autoencoder DC-AE ablates)."""
    vq_codebook_size: int = 8192
    """'vq': number of codes."""
    vq_beta: float = 0.25
    """'vq': commitment weight beta."""
    vq_l2_normalize: bool = False
    """'vq': cosine-similarity code lookup on unit vectors."""
    vq_ema: bool = False
    """'vq': EMA codebook updates instead of the codebook loss."""
    vq_ema_decay: float = 0.99
    """'vq': EMA decay for the codebook statistics."""
    vq_restart_threshold: float = 0.0
    """'vq': restart codes whose EMA assignment count per step is below this (0 = never)."""
    scale_factor: float = 1.0
    """Initial latent scale (overwritten by compute_scale_factor; SD: 0.18215)."""
    shift_factor: float = 0.0
    """Initial latent shift (overwritten by compute_scale_factor(use_shift=True))."""

    def __post_init__(self):
        self.ch_mult, self.attn_resolutions = tuple(self.ch_mult), tuple(self.attn_resolutions)
        if self.arch not in ARCHS:
            raise ValueError(f"autoencoder.arch must be one of {ARCHS}; got {self.arch!r}")
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"autoencoder.regularizer must be one of {REGULARIZERS}; got {self.regularizer!r}")
        if self.double_z is None:
            self.double_z = self.regularizer == "kl"
        if self.double_z != (self.regularizer == "kl"):
            raise ValueError(f"autoencoder.double_z={self.double_z} is inconsistent with regularizer="
                             f"{self.regularizer!r}: only 'kl' emits mean and logvar (set double_z to null)")
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ValueError(f"autoencoder.ch_mult must be a non-empty list of positive ints; got {list(self.ch_mult)}")
        for name in ("in_channels", "ch", "z_channels", "num_res_blocks", "norm_groups"):
            if getattr(self, name) <= 0 and not (name == "num_res_blocks" and self.arch == "dcae"):
                raise ValueError(f"autoencoder.{name} must be > 0; got {getattr(self, name)}")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % self.norm_groups]
        if bad:
            raise ValueError(f"autoencoder.norm_groups={self.norm_groups} must divide every width ch*ch_mult; "
                             f"it does not divide {bad}")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"autoencoder.resolution={self.resolution} is not divisible by the downsampling "
                             f"factor f={self.downsample_factor} (from ch_mult)")
        if self.regularizer == "vq" and self.vq_codebook_size < 2:
            raise ValueError(f"autoencoder.vq_codebook_size must be >= 2; got {self.vq_codebook_size}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.embed_dim or self.z_channels

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ch_mult"], d["attn_resolutions"] = list(self.ch_mult), list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown autoencoder config field(s) {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**d)


class Autoencoder(nn.Module):
    def __init__(self, config: AutoencoderConfig | dict):
        super().__init__()
        c = config if isinstance(config, AutoencoderConfig) else AutoencoderConfig.from_dict(config)
        self.config = c
        out_ch = c.out_channels or c.in_channels
        enc_out = 2 * c.z_channels if c.double_z else c.z_channels
        e = c.latent_channels
        if c.arch == "kl":
            common = dict(ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks,
                          attn_resolutions=c.attn_resolutions, resolution=c.resolution,
                          z_channels=c.z_channels, groups=c.norm_groups, dropout=c.dropout, mid_attn=c.mid_attn)
            self.encoder = Encoder(in_channels=c.in_channels, double_z=c.double_z, **common)
            self.decoder = Decoder(out_ch=out_ch, **common)
        else:
            levels = tuple(i for i in range(len(c.ch_mult)) if c.resolution // 2 ** i in c.attn_resolutions)
            common = dict(ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks, attn_levels=levels,
                          groups=c.norm_groups, dropout=c.dropout, shortcut=c.dcae_shortcut)
            self.encoder = DCEncoder(in_channels=c.in_channels, z_out=enc_out, **common)
            self.decoder = DCDecoder(out_ch=out_ch, z_channels=c.z_channels, **common)
        self.quant_conv = nn.Conv2d(enc_out, 2 * e if c.double_z else e, 1)
        self.post_quant_conv = nn.Conv2d(e, c.z_channels, 1)
        if c.regularizer == "vq":
            self.quantize = VectorQuantizer(c.vq_codebook_size, e, c.vq_beta, c.vq_l2_normalize, c.vq_ema,
                                            c.vq_ema_decay, c.vq_restart_threshold)
        # Latent normalisation travels with the weights (state dict, checkpoints, exports).
        self.register_buffer("scale_factor", torch.tensor(float(c.scale_factor)))
        self.register_buffer("shift_factor", torch.tensor(float(c.shift_factor)))
        self.register_buffer("latent_mean", torch.zeros(e))
        self.register_buffer("latent_std", torch.ones(e))

    # --- contract --------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight the adaptive GAN weight differentiates through (decoder output conv)."""
        return self.decoder.conv_out.weight

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> DiagonalGaussian:
        h = self.quant_conv(self.encoder(x))                     # (B, 2e or e, h, w)
        if self.config.regularizer == "kl":
            return DiagonalGaussian(h)
        if self.config.regularizer == "vq":
            zq, vq_loss, stats = self.quantize(h, generator=generator)
            return PointPosterior(zq, vq_loss=vq_loss, **stats)
        return PointPosterior(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.config.regularizer == "vq":
            # Latents from a diffusion model are off the codebook: snap them (LDM's VQModelInterface).
            z = self.quantize.embed(self.quantize.lookup(z)).to(z.dtype)
        return self.decode_latent(z)

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Decode without re-quantising (training path: z is already quantised, gradients flow)."""
        return self.decoder(self.post_quant_conv(z))             # (B, C, H, W)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None):
        posterior = self.encode(x, generator=generator)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode_latent(z), posterior

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift_factor) * self.scale_factor

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scale_factor + self.shift_factor

    # --- latent statistics -----------------------------------------------------------------------
    @torch.no_grad()
    def compute_scale_factor(self, batches: Iterable, max_batches: int | None = None, use_shift: bool = False,
                             sample: bool = True, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Set `scale_factor` = 1 / std of latents over `batches` (LDM `scale_by_std`; SD's 0.18215 came
        from this), and `shift_factor` = their mean if `use_shift` (SD3/Flux-style), else 0. Also records
        per-channel `latent_mean` / `latent_std`. Batches are tensors (B, C, H, W) or dicts with 'image'.
        Statistics are summed over DDP ranks, so every rank stores the same factors."""
        was_training = self.training
        self.eval()
        device = self.scale_factor.device
        e = self.latent_channels
        s1, s2, n = torch.zeros(e, dtype=torch.float64, device=device), torch.zeros(e, dtype=torch.float64,
                                                                                    device=device), 0
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x = ensure_model_range(batch["image"] if isinstance(batch, dict) else batch)  # uint8 pixels too
            post = self.encode(x.to(device=device, dtype=torch.float32))
            z = (post.sample(generator=generator) if sample else post.mode()).double()  # (B, e, h, w)
            s1 += z.sum(dim=(0, 2, 3))
            s2 += z.pow(2).sum(dim=(0, 2, 3))
            n += z.shape[0] * z.shape[2] * z.shape[3]
        self.train(was_training)
        if n == 0:
            raise ValueError("compute_scale_factor got no batches: pass a non-empty loader or list of images")
        stats = torch.cat([s1, s2, torch.tensor([float(n)], dtype=torch.float64, device=device)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        s1, s2, n = stats[:e], stats[e:2 * e], stats[-1]
        mean_c = s1 / n
        std_c = (s2 / n - mean_c.pow(2)).clamp_min(0).sqrt()
        mean = s1.sum() / (n * e)
        # LDM: scale = 1 / z.flatten().std() (centred std) whether or not the mean is subtracted.
        std = (s2.sum() / (n * e) - mean.pow(2)).clamp_min(1e-12).sqrt()
        self.latent_mean.copy_(mean_c.float())
        self.latent_std.copy_(std_c.float())
        self.scale_factor.fill_(float(1.0 / std))
        self.shift_factor.fill_(float(mean) if use_shift else 0.0)
        return {"scale_factor": self.scale_factor.clone(), "shift_factor": self.shift_factor.clone(),
                "latent_mean": self.latent_mean.clone(), "latent_std": self.latent_std.clone()}
