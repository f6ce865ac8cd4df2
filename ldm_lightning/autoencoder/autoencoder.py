"""`Autoencoder`: one facade over {SD conv, DC-AE, MoVQ, RAE} backbones x {KL, VQ, VQ-VAE-2, none} regularisers.

It is the contract of docs/contracts.md: `.encode(x) -> posterior` (`.mean`, `.logvar`, `.sample(generator=)`,
`.mode()`), `.decode(z)`, `.scale_factor` / `.shift_factor` (buffers, saved with the weights;
`z_normalized = (z - shift) * scale`), `.latent_channels`, `.downsample_factor`, and
`compute_scale_factor(batches)` (LDM's `scale_by_std`, Rombach et al. 2022 sec. 4.3.2 / appendix G).

VQ latents for stage 2 follow LDM (`vq_latent: pre_quant`, the default): `encode` hands stage 2 the
pre-quantisation latent, and `decode` quantises inside (nearest code) before the decoder; training
reconstructs from the quantised codes (`posterior.quantized`) either way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Literal, get_args

import torch
import torch.distributed as dist
from torch import nn

from ldm_lightning.choices import check_choices
from ldm_lightning.finite import check_finite_fields
from ldm_lightning.autoencoder.dcae import DCDecoder, DCEncoder
from ldm_lightning.autoencoder.distributions import DiagonalGaussian, PointPosterior
from ldm_lightning.autoencoder.kl import Decoder, Encoder
from ldm_lightning.autoencoder.movq import MoVQDecoder
from ldm_lightning.autoencoder.vq import VectorQuantizer
from ldm_lightning.autoencoder.vqvae2 import HierarchicalQuantizer
from ldm_lightning.images import model_range

Arch = Literal["kl", "dcae", "movq", "rae"]
ARCHS = get_args(Arch)
Regularizer = Literal["kl", "vq", "vq2", "none"]
REGULARIZERS = get_args(Regularizer)
VQLatent = Literal["pre_quant", "quantized"]
VQ_LATENTS = get_args(VQLatent)


@dataclass
class AutoencoderConfig:
    """Architecture of a stage-1 autoencoder. Field names follow CompVis `ddconfig` where one exists."""

    arch: Arch = "kl"
    """Backbone: 'kl' (SD/LDM conv encoder-decoder), 'dcae' (DC-AE residual space<->channel shortcuts),
    'movq' (the 'kl' encoder + MoVQ's decoder with z_q-conditioned GroupNorms, movq.py) or 'rae' (frozen
    DINOv2 encoder from `rae_encoder` + trained ViT decoder, rae.py)."""
    regularizer: Regularizer = "kl"
    """Latent regulariser: 'kl' (diagonal Gaussian posterior), 'vq' (vector quantisation), 'vq2' (VQ-VAE-2's
    two-level hierarchy, vqvae2.py; latent = 2*embed_dim channels) or 'none'."""
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
    vq_heads: int = 1
    """'vq'/'vq2': multichannel quantisation (MoVQ): the latent split into this many heads sharing one
    codebook of embed_dim/vq_heads-dim codes."""
    vq_latent: VQLatent = "pre_quant"
    """'vq'/'vq2': the latent `encode` gives stage 2: 'pre_quant' (LDM: diffusion on the pre-quantisation
    latent, `decode` quantises) or 'quantized' (the codes themselves)."""
    rae_encoder: str | None = None
    """'rae': local Hugging Face DINOv2 folder (config.json + weights) of the frozen encoder."""
    rae_encoder_config: dict | None = None
    """'rae': the encoder's config.json (filled from `rae_encoder`; lets a saved RAE rebuild without it)."""
    rae_decoder_width: int = 256
    """'rae': ViT decoder width."""
    rae_decoder_depth: int = 4
    """'rae': ViT decoder blocks."""
    rae_decoder_heads: int = 4
    """'rae': ViT decoder attention heads (must divide rae_decoder_width)."""
    rae_noise_tau: float = 0.8
    """'rae': noise augmentation in decoder training: z + |n| eps, n ~ N(0, tau^2) per sample (0 = off)."""
    scale_factor: float = 1.0
    """Initial latent scale (overwritten by compute_scale_factor; SD: 0.18215)."""
    shift_factor: float = 0.0
    """Initial latent shift (overwritten by compute_scale_factor(use_shift=True))."""

    def __post_init__(self):
        check_finite_fields(self, "autoencoder")  # NaN/inf pass every comparison below
        self.ch_mult, self.attn_resolutions = tuple(self.ch_mult), tuple(self.attn_resolutions)
        check_choices(self, "autoencoder")
        if self.arch == "rae":
            self._check_rae()
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
        if self.regularizer in ("vq", "vq2") and self.vq_codebook_size < 2:
            raise ValueError(f"autoencoder.vq_codebook_size must be >= 2; got {self.vq_codebook_size}")
        e = self.embed_dim or self.z_channels
        if self.regularizer in ("vq", "vq2") and (self.vq_heads < 1 or e % self.vq_heads):
            raise ValueError(f"autoencoder.vq_heads={self.vq_heads} must be >= 1 and divide the latent width "
                             f"embed_dim={e}")

    def _check_rae(self) -> None:
        from ldm_lightning.autoencoder.rae import read_encoder_config
        if self.regularizer != "none":
            raise ValueError(f"autoencoder.regularizer must be 'none' for arch 'rae' (its encoder is frozen); "
                             f"got {self.regularizer!r}")
        if self.rae_encoder_config is None:
            if not self.rae_encoder:
                raise ValueError("autoencoder.rae_encoder is required for arch 'rae': a local Hugging Face DINOv2 "
                                 "folder")
            self.rae_encoder_config = read_encoder_config(self.rae_encoder)
        if self.rae_decoder_width % self.rae_decoder_heads:
            raise ValueError(f"autoencoder.rae_decoder_heads={self.rae_decoder_heads} must divide "
                             f"rae_decoder_width={self.rae_decoder_width}")
        if self.rae_noise_tau < 0:
            raise ValueError(f"autoencoder.rae_noise_tau must be >= 0; got {self.rae_noise_tau}")

    @property
    def downsample_factor(self) -> int:
        if self.arch == "rae":
            return int(self.rae_encoder_config["patch_size"])
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_channels(self) -> int:
        if self.arch == "rae":
            return int(self.rae_encoder_config["hidden_size"])
        e = self.embed_dim or self.z_channels
        return 2 * e if self.regularizer == "vq2" else e

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


def _conv_backbone(c: AutoencoderConfig, enc_out: int, out_ch: int) -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder) of the convolutional archs."""
    if c.arch in ("kl", "movq"):
        common = dict(ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks, attn_resolutions=c.attn_resolutions,
                      resolution=c.resolution, z_channels=c.z_channels, groups=c.norm_groups, dropout=c.dropout,
                      mid_attn=c.mid_attn)
        encoder = Encoder(in_channels=c.in_channels, double_z=c.double_z, **common)
        if c.arch == "movq":
            return encoder, MoVQDecoder(out_ch=out_ch, zq_channels=c.latent_channels, **common)
        return encoder, Decoder(out_ch=out_ch, **common)
    levels = tuple(i for i in range(len(c.ch_mult)) if c.resolution // 2 ** i in c.attn_resolutions)
    common = dict(ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks, attn_levels=levels,
                  groups=c.norm_groups, dropout=c.dropout, shortcut=c.dcae_shortcut)
    return (DCEncoder(in_channels=c.in_channels, z_out=enc_out, **common),
            DCDecoder(out_ch=out_ch, z_channels=c.z_channels, **common))


class Autoencoder(nn.Module):
    def __init__(self, config: AutoencoderConfig | dict):
        super().__init__()
        c = config if isinstance(config, AutoencoderConfig) else AutoencoderConfig.from_dict(config)
        self.config = c
        out_ch = c.out_channels or c.in_channels
        enc_out = 2 * c.z_channels if c.double_z else c.z_channels
        e = c.embed_dim or c.z_channels                          # width of one level's codes
        if c.arch == "rae":
            from ldm_lightning.autoencoder.rae import RepresentationEncoder, ViTDecoder, decoder_grid
            self.encoder = RepresentationEncoder(c.rae_encoder_config, c.rae_encoder, c.in_channels)
            f = c.downsample_factor
            self.decoder = ViTDecoder(c.latent_channels, c.rae_decoder_width, c.rae_decoder_depth,
                                      c.rae_decoder_heads, f, out_ch, decoder_grid(c.resolution, f))
            # The frozen encoder's tokens are the latent: no trainable projection in between.
            self.quant_conv, self.post_quant_conv = nn.Identity(), nn.Identity()
        else:
            self.encoder, self.decoder = _conv_backbone(c, enc_out, out_ch)
            self.quant_conv = nn.Conv2d(enc_out, 2 * e if c.double_z else e, 1)
            self.post_quant_conv = nn.Conv2d(c.latent_channels, c.z_channels, 1)
        vq = dict(beta=c.vq_beta, l2_normalize=c.vq_l2_normalize, ema=c.vq_ema, ema_decay=c.vq_ema_decay,
                  restart_threshold=c.vq_restart_threshold, heads=c.vq_heads)
        if c.regularizer == "vq":
            self.quantize = VectorQuantizer(c.vq_codebook_size, e, **vq)
        elif c.regularizer == "vq2":
            self.quantize = HierarchicalQuantizer(e, c.ch, c.norm_groups, c.vq_codebook_size, **vq)
        # Latent normalisation travels with the weights (state dict, checkpoints, exports).
        self.register_buffer("scale_factor", torch.tensor(float(c.scale_factor)))
        self.register_buffer("shift_factor", torch.tensor(float(c.shift_factor)))
        self.register_buffer("latent_mean", torch.zeros(c.latent_channels))
        self.register_buffer("latent_std", torch.ones(c.latent_channels))

    # --- contract --------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    # Entry points besides forward() that use the weights: under FSDP2 (training/fsdp2.py) they gather the
    # sharded parameters of the network's root as forward() does (validation and the latent statistics call them).
    # None of them calls another or is called by forward() (which uses the _-twins): FSDP2's hooks do not nest.
    fsdp_forward_methods = ("encode", "decode", "decode_latent")

    @property
    def is_vq(self) -> bool:
        return self.config.regularizer in ("vq", "vq2")

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight the adaptive GAN weight differentiates through (decoder output layer)."""
        return self.decoder.conv_out.weight

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> DiagonalGaussian:
        """x (B, C, H, W) in [-1, 1] -> posterior over the stage-2 latent (B, latent_channels, H/f, W/f).
        VQ posteriors also carry `quantized` (the codes the decoder trains on), `vq_loss` and code stats."""
        return self._encode(x, generator)

    def _encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> DiagonalGaussian:
        h = self.quant_conv(self.encoder(x))                     # (B, 2e or e, h, w)
        if self.config.regularizer == "kl":
            return DiagonalGaussian(h)
        if self.is_vq:
            zq, vq_loss, stats = self.quantize(h, generator=generator)
            pre = stats.pop("pre_quant", h)
            z = pre if self.config.vq_latent == "pre_quant" else zq
            return PointPosterior(z, vq_loss=vq_loss, quantized=zq, **stats)
        return PointPosterior(h)

    def decoder_input(self, posterior: DiagonalGaussian, sample: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """The latent the decoder reconstructs from: the codes for VQ (straight-through gradients), a
        posterior sample or its mode otherwise."""
        if self.is_vq:
            return posterior.quantized
        return posterior.sample(generator=generator) if sample else posterior.mode()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """A stage-2 latent (B, latent_channels, h, w) -> images (B, C, H, W)."""
        if self.is_vq:
            # Latents from a diffusion model are off the codebook: snap them (LDM's VQModelInterface).
            z = self.quantize.snap(z)
        return self._decode_latent(z)

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Decode without re-quantising (training path: z is already quantised, gradients flow)."""
        return self._decode_latent(z)

    def _decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        if self.config.arch == "movq":
            return self.decoder(self.post_quant_conv(z), z)      # MoVQ: every norm also reads z_q
        return self.decoder(self.post_quant_conv(z))             # (B, C, H, W)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None):
        posterior = self._encode(x, generator=generator)
        z = self.decoder_input(posterior, sample_posterior, generator)
        tau = self.config.rae_noise_tau if self.config.arch == "rae" else 0.0
        if self.training and tau > 0:
            # RAE: the decoder learns to read noisy latents, as a diffusion model's samples will be.
            g = dict(generator=generator, device=z.device, dtype=z.dtype)
            sigma = (torch.randn(z.shape[0], 1, 1, 1, **g) * tau).abs()  # (B, 1, 1, 1)
            z = z + sigma * torch.randn(z.shape, **g)
        return self._decode_latent(z), posterior

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(z - shift) * scale: the latents a denoiser trains on (the one place the scale factor is applied)."""
        return (z - self.shift_factor) * self.scale_factor

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of `normalize_latents`: a sampled latent back to what `decode` takes."""
        return z / self.scale_factor + self.shift_factor

    # --- latent statistics -----------------------------------------------------------------------
    @torch.no_grad()
    def compute_representation_stats(self, batches: Iterable, max_batches: int | None = None) -> None:
        """'rae': per-channel mean / std of the frozen encoder's raw tokens over `batches`, stored as the
        encoder's latent normalisation (RAE standardises the representation before decoding/diffusion).
        Summed over DDP ranks."""
        if self.config.arch != "rae":
            return
        device = self.scale_factor.device
        s1 = s2 = None
        n = 0
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x = model_range(batch["image"] if isinstance(batch, dict) else batch)
            h = self.encoder.features(x.to(device=device, dtype=torch.float32)).double()  # (B, D, h, w)
            s1 = h.sum(dim=(0, 2, 3)) if s1 is None else s1 + h.sum(dim=(0, 2, 3))
            s2 = h.pow(2).sum(dim=(0, 2, 3)) if s2 is None else s2 + h.pow(2).sum(dim=(0, 2, 3))
            n += h.shape[0] * h.shape[2] * h.shape[3]
        if n == 0:
            raise ValueError("compute_representation_stats got no batches: pass a non-empty loader")
        stats = torch.cat([s1, s2, torch.tensor([float(n)], dtype=torch.float64, device=device)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        d = s1.shape[0]
        mean = stats[:d] / stats[-1]
        std = (stats[d:2 * d] / stats[-1] - mean.pow(2)).clamp_min(1e-12).sqrt()
        self.encoder.rep_mean.copy_(mean.float())
        self.encoder.rep_std.copy_(std.float())

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
            x = model_range(batch["image"] if isinstance(batch, dict) else batch)
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
