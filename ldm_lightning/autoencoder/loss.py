"""Autoencoder training loss: L1/L2 + LPIPS + KL or VQ + PatchGAN, in ONE backward pass.

Follows LDM's `LPIPSWithDiscriminator` / taming's `VQLPIPSWithDiscriminator` (Esser et al. 2021,
Rombach et al. 2022): nll = rec/exp(logvar) + logvar, adaptive generator weight
||grad_last nll|| / (||grad_last g|| + 1e-4) clamped to [0, 1e4] times disc_weight (VQGAN eq. 7).

Single optimiser (DeepSpeed allows one): the discriminator runs on [x, sg(x_rec), x_rec] (one batched
pass for per-sample norms; one pass each with BatchNorm, whose batch statistics would otherwise mix the
three and leak gradient into x_rec). Its own loss uses the first two; the generator term uses the third.
The generator term would also push gradient into the discriminator's weights (in the wrong direction),
so we add w*(-g(D(sg(x_rec)))): it has the
same value with the opposite sign and the same weight-gradient, but none towards x_rec. The sum is the
two-optimiser taming gradient exactly, with plain autograd: no manual optimisation, no param
detaching (ZeRO-3 safe). A gradient-reversal layer (MosaicML) would instead give the generator the
*saturating* minimax gradient; this keeps taming's non-saturating hinge/BCE generator loss.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ldm_lightning.autoencoder.discriminator import DiscNorm, NLayerDiscriminator
from ldm_lightning.errors import checkpoint_load_error
from ldm_lightning.choices import check_choices
from ldm_lightning.finite import check_finite_fields


RecLoss = Literal["l1", "l2"]
RecReduction = Literal["sum", "mean"]
DiscLoss = Literal["hinge", "vanilla"]


@dataclass
class LossConfig:
    """Weights and schedule of the stage-1 loss (defaults: SD KL-f8)."""

    rec_loss: RecLoss = "l1"
    """Pixel reconstruction: 'l1' or 'l2'."""
    rec_reduction: RecReduction = "sum"
    """'sum' over (C,H,W), mean over batch (LDM KL; kl_weight=1e-6 assumes it) or 'mean' (taming VQ)."""
    perceptual_weight: float = 1.0
    """LPIPS weight (0 disables LPIPS and skips building VGG)."""
    perceptual_start: int = 0
    """Global step at which LPIPS enters the loss."""
    lpips_vgg_weights: str | None = None
    """Path to torchvision's `vgg16-397923af.pth` (ImageNet VGG16). Required when perceptual_weight > 0."""
    lpips_pnet_rand: bool = False
    """Random VGG backbone instead (tests / smoke runs only: the metric is then meaningless)."""
    logvar_init: float = 0.0
    """Fixed log-variance of the Gaussian likelihood (LDM's `logvar`; it is never optimised there either)."""
    kl_weight: float = 1e-6
    """KL(q(z|x) || N(0,I)) weight ('kl' regulariser)."""
    vq_weight: float = 1.0
    """Codebook + commitment loss weight ('vq' regulariser)."""
    disc_weight: float = 0.5
    """Adversarial weight (0: no discriminator at all)."""
    disc_start: int = 50001
    """Global step at which the adversarial term enters the generator loss."""
    disc_warmup_train: int = 0
    """Train the discriminator this many steps before disc_start (taming: 0, it is idle before)."""
    disc_factor: float = 1.0
    """Multiplier on both GAN losses once active."""
    disc_loss: DiscLoss = "hinge"
    """'hinge' or 'vanilla' (non-saturating BCE)."""
    disc_layers: int = 3
    """PatchGAN conv layers (2 for 32x32 images)."""
    disc_ndf: int = 64
    """PatchGAN base width."""
    disc_norm: DiscNorm = "group"
    """'group' (DDP/DeepSpeed-safe, default), 'batch' (taming original: D then runs one pass per real / detached
    fake / fake batch, so BatchNorm statistics stay per pass as in taming; needs SyncBatchNorm under DDP) or
    'none'."""
    disc_lr_scale: float = 1.0
    """Discriminator learning rate = optim.lr * this (its own param group)."""
    adaptive_weight: bool = True
    """Use the adaptive generator weight (else disc_weight alone)."""

    def __post_init__(self):
        check_finite_fields(self, "loss")  # NaN/inf pass every comparison below
        check_choices(self, "loss")
        for name in ("perceptual_weight", "kl_weight", "vq_weight", "disc_weight", "disc_warmup_train"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0; got {getattr(self, name)}")


def build_lpips(cfg: LossConfig) -> nn.Module:
    """LPIPS-VGG (Zhang et al. 2018) with the backbone read from a local file — never downloaded."""
    import lpips
    net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)  # linear heads ship with lpips
    if not cfg.lpips_pnet_rand:
        path = cfg.lpips_vgg_weights
        if not path:
            raise ValueError("loss.lpips_vgg_weights is required when loss.perceptual_weight > 0: the path to "
                             "torchvision's vgg16-397923af.pth (or set loss.perceptual_weight: 0)")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"loss.lpips_vgg_weights={path!r} does not exist; download "
                                    "https://download.pytorch.org/models/vgg16-397923af.pth there")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # refused (a pickle that could run code) or unreadable: one message, the path
            raise checkpoint_load_error(path, err) from err
        # lpips keeps torchvision's feature indices: `net.slice2.5.weight` is `features.5.weight`.
        own = {k: f"features.{k.split('.', 1)[1]}" for k in net.net.state_dict()}
        net.net.load_state_dict({k: sd[v] for k, v in own.items()})
    return net.eval().requires_grad_(False)


def _rank_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over the torch.distributed ranks (itself without a process group)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)  # SUM: gloo has no AVG
    return t / dist.get_world_size()


class AutoencoderLoss(nn.Module):
    def __init__(self, cfg: LossConfig, image_channels: int):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("logvar", torch.tensor(float(cfg.logvar_init)))
        self.lpips = build_lpips(cfg) if cfg.perceptual_weight > 0 else None
        self.discriminator = (NLayerDiscriminator(image_channels, cfg.disc_ndf, cfg.disc_layers, cfg.disc_norm)
                              if cfg.disc_weight > 0 else None)
        # data.order: global (set per step by the module): the adaptive weight from the gradients averaged
        # over ranks, i.e. from the whole global micro-batch, as one process with the doubled batch computes it
        self.average_over_ranks = False

    def train(self, mode: bool = True):
        super().train(mode)
        if self.lpips is not None:
            self.lpips.eval()                                    # frozen metric network, always eval
        return self

    def perceptual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        with torch.autocast(x.device.type, enabled=False):
            return self.lpips(x.float(), y.float())              # (B, 1, 1, 1)

    def _gen(self, logits: torch.Tensor) -> torch.Tensor:
        return -logits.mean() if self.cfg.disc_loss == "hinge" else F.softplus(-logits).mean()

    def _disc(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        if self.cfg.disc_loss == "hinge":
            return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
        return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())

    def forward(self, x: torch.Tensor, recon: torch.Tensor, posterior, step: int, last_layer: torch.Tensor):
        c = self.cfg
        x, recon = x.float(), recon.float()                      # losses in fp32 under bf16 autocast
        diff = (x - recon).abs() if c.rec_loss == "l1" else (x - recon).pow(2)  # (B, C, H, W)
        terms = {"rec": diff.mean().detach()}
        rec = diff
        if self.lpips is not None and step >= c.perceptual_start:
            p = self.perceptual(x, recon)                        # (B, 1, 1, 1)
            rec = rec + c.perceptual_weight * p
            terms["lpips"] = p.mean().detach()
        nll = rec / torch.exp(self.logvar) + self.logvar
        nll = nll.sum() / nll.shape[0] if c.rec_reduction == "sum" else nll.mean()
        loss, terms["nll"] = nll, nll.detach()
        if hasattr(posterior, "vq_loss"):
            loss = loss + c.vq_weight * posterior.vq_loss
            terms.update(vq=posterior.vq_loss.detach(), perplexity=posterior.perplexity, usage=posterior.usage)
        else:
            kl = posterior.kl().mean()
            loss, terms["kl"] = loss + c.kl_weight * kl, kl.detach()
        D = self.discriminator
        if D is None:
            return loss, terms
        train_d, train_g = step >= c.disc_start - c.disc_warmup_train, step >= c.disc_start
        if not train_d:
            # Keep every discriminator weight in the graph with a zero gradient: DDP (without
            # find_unused_parameters) and DeepSpeed expect all trainable params to receive one.
            return loss + 0.0 * D(x[:1]).sum(), terms
        parts = [x, recon.detach()] + ([recon] if train_g else [])
        if c.disc_norm == "batch":
            # BatchNorm's batch statistics couple the samples of one forward: on cat[x, sg(x_rec), x_rec] they
            # would carry gradient from x and sg(x_rec) into x_rec. One pass per part, as taming's two
            # optimisers run D (real and fake apart); sg(x_rec) and x_rec then see identical statistics, so
            # the cancelling term below still cancels exactly.
            logits = [D(p).float() for p in parts]               # each (B, 1, h', w')
        else:
            logits = D(torch.cat(parts)).float().chunk(len(parts))  # per-sample norms: one batched pass
        d_loss = self._disc(logits[0], logits[1])
        loss = loss + c.disc_factor * d_loss
        terms.update(d_loss=d_loss.detach(), logits_real=logits[0].mean().detach(),
                     logits_fake=logits[1].mean().detach())
        if train_g:
            g_loss = self._gen(logits[2])
            w = torch.tensor(c.disc_weight, device=x.device)
            # A frozen decoder head (e.g. a DC-AE phase training other layers) has no gradient to balance.
            if c.adaptive_weight and torch.is_grad_enabled() and last_layer.requires_grad:
                g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
                g_g = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
                if self.average_over_ranks:
                    g_nll, g_g = _rank_mean(g_nll), _rank_mean(g_g)
                w = (g_nll.float().norm() / (g_g.float().norm() + 1e-4)).clamp(0.0, 1e4).detach() * c.disc_weight
            # + w*g(D(x_rec)) trains the decoder; - w*g(D(sg(x_rec))) cancels its pull on D's weights.
            loss = loss + c.disc_factor * w * (g_loss - self._gen(logits[1]))
            terms.update(g_loss=g_loss.detach(), d_weight=w)
        return loss, terms
