"""`AutoencoderModule`: stage-1 training (LDM/VQGAN recipe) as a `TrainingModule`.

One optimiser, automatic optimisation: Lightning's DeepSpeed strategy supports a single optimiser,
and manual optimisation would bypass the base's NaN guard, gradient clipping and accumulation. The
autoencoder and the PatchGAN discriminator are two param groups of that optimiser (separate LRs) and
train in the same backward pass; loss.py explains how the generator/discriminator gradients are kept
apart. Latent statistics (`scale_factor`, ...) have one owner, the `LatentStatistics` callback this
module adds (latent_stats.py): measured after the final step, before the final checkpoint is written,
so checkpoints and exports carry them.

Training phases (DC-AE, arXiv 2410.10733 sec. 3.3): `init_from` starts a run from a previous phase's
weights and `train_only` freezes every autoencoder parameter whose name matches none of its patterns,
e.g. phase 2 (high-resolution latent adaptation: only the layers next to the latent, at a higher
image_size) and phase 3 (local refinement: only the decoder head, with the GAN loss). See
configs/autoencoder/dcae-f32-phase{2,3}.yaml.
"""

from __future__ import annotations

import contextlib
import fnmatch

import torch
from lightning.pytorch.utilities import rank_zero_info

from ldm_lightning.autoencoder.autoencoder import Autoencoder, AutoencoderConfig
from ldm_lightning.autoencoder.latent_stats import DECODER_SIDE, STAT_BUFFERS, LatentStatistics
from ldm_lightning.autoencoder.load import CHECKPOINT_TAG
from ldm_lightning.autoencoder.loss import AutoencoderLoss, LossConfig
from ldm_lightning.autoencoder.overrides import AutoencoderOverrides, autoencoder_overrides
from ldm_lightning.autoencoder.presets import PRESETS, get_preset
from ldm_lightning.hparams import init_hparams
from ldm_lightning.images import image_grid, model_range
from ldm_lightning.nn.posthoc_ema import PosthocEMAConfig
from ldm_lightning.training.base import EMAConfig, OptimConfig, TrainingModule
from ldm_lightning.training.data_settings import datamodule_settings
from ldm_lightning.training.nonfinite_guard import GuardConfig
from ldm_lightning.training.speed import (SpeedConfig, SpeedLevers, as_speed, compile_network, images_channels_last,
                                          to_channels_last)


def _as(cls, value):
    if value is None:
        return cls()
    if isinstance(value, dict):
        return cls(**value)
    return value


class AutoencoderModule(SpeedLevers, TrainingModule):
    def __init__(self, preset: str | None = "tiny-mnist",
                 autoencoder: AutoencoderOverrides = AutoencoderOverrides(),
                 loss: LossConfig | None = None, optim: OptimConfig | None = None, ema: EMAConfig | None = None,
                 guard: GuardConfig | None = None, seed: int = 0, image_size: int | None = None,
                 sample_posterior: bool = True, scale_batches: int = 4, scale_use_shift: bool = False,
                 fid_inception_weights: str | None = None, log_images: int = 8, compile: bool = False,
                 speed: SpeedConfig | dict | None = None, train_only: list[str] | None = None,
                 init_from: str | None = None, keep_latent_stats: bool = False,
                 posthoc_ema: PosthocEMAConfig | dict | None = None):
        """
        Args:
            preset: autoencoder preset name (presets.py) or None for AutoencoderConfig defaults.
            autoencoder: AutoencoderConfig fields overriding the preset (AutoencoderOverrides: each optional,
                unset = the preset's; a plain mapping works as well).
            loss: loss weights and schedule (LossConfig).
            optim / ema / guard / seed: see training/base.py.
            posthoc_ema: PosthocEMAConfig (nn/posthoc_ema.py): EDM2 power-function EMA profiles and their
                snapshots for `ldm-lightning ema-reconstruct`; null (default) = off. Kept beside `ema`.
            image_size: training image size; checked against the downsampling factor at start-up.
            sample_posterior: decode a posterior sample (LDM) rather than its mean while training.
            scale_batches: train batches used to compute the latent scale factor at the end of fit.
            scale_use_shift: also store the latent mean as shift_factor (else shift 0, as LDM/SD).
            fid_inception_weights: local FID Inception weights (pt_inception-2015-12-05); rFID skipped if None.
            log_images: images in the validation reconstruction grid (the logger's `log_image`, else PNGs
                under <log_dir>/reconstructions when a logger is set).
            compile: `torch.compile` the encoder and decoder of the trained (live) autoencoder in place;
                parameter names do not change, so checkpoints load with or without it.
            speed: GPU throughput levers (training/speed.py): channels_last (autoencoder, discriminator and
                their inputs in NHWC), tf32. compile_mode 'blocks' is for the diffusion backbone only.
            train_only: fnmatch patterns over the autoencoder's parameter names (`decoder.conv_out.*`);
                only matching parameters train, the rest are frozen (null: all train). A pattern that
                matches nothing is an error. The discriminator always trains when the GAN is on.
            init_from: weights to start from (a previous phase's .ckpt (EMA weights) or export, anything
                `load_autoencoder` reads); applied at the start of a fresh fit, not on resume.
            keep_latent_stats: keep init_from's latent statistics (scale/shift factor, per-channel mean/std)
                instead of measuring them again after the run. Only with init_from and a frozen latent side
                (every encoder-side parameter outside train_only): the latents are then the previous phase's
                exactly, so a stage-2 model trained on them keeps its scale (DC-AE phase 3 after phase 2,
                which measured at another resolution).
        """
        arguments = dict(locals())  # before any other local: what init_hparams records
        super().__init__(_as(OptimConfig, optim), _as(EMAConfig, ema), _as(GuardConfig, guard), seed,
                         None if posthoc_ema is None else _as(PosthocEMAConfig, posthoc_ema))
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"model.preset must be one of {sorted(PRESETS)} or null; got {preset!r}")
        overrides = autoencoder_overrides(autoencoder)
        cfg = get_preset(preset, **overrides) if preset else AutoencoderConfig.from_dict(overrides)
        self.loss_cfg = _as(LossConfig, loss)
        self.speed = as_speed(speed)
        if self.speed.compile_mode != "model":
            raise ValueError("model.speed.compile_mode must be 'model' for the autoencoder stage ('blocks' compiles "
                             f"DiT/UNet blocks); got {self.speed.compile_mode!r}")
        f = cfg.downsample_factor
        if image_size is not None and image_size % f:
            raise ValueError(f"model.image_size={image_size} is not divisible by the autoencoder's downsampling "
                             f"factor f={f} (2^(len(autoencoder.ch_mult)-1), ch_mult={list(cfg.ch_mult)})")
        self.image_size, self.sample_posterior = image_size, sample_posterior
        self.scale_batches, self.scale_use_shift = scale_batches, scale_use_shift
        self.fid_inception_weights, self.log_images = fid_inception_weights, log_images
        # Every argument, plain (torch.load(weights_only=True)); the preset resolved into the full config.
        self.save_hyperparameters(init_hparams(AutoencoderModule.__init__, arguments, {
            "preset": None, "autoencoder": cfg.to_dict(), "loss": self.loss_cfg, "optim": self.optim_cfg,
            "ema": self.ema_cfg, "guard": self.guard_cfg, "posthoc_ema": self.posthoc_ema_cfg, "speed": self.speed,
            "train_only": list(train_only) if train_only else None}))
        self.autoencoder = Autoencoder(cfg)
        self.train_only, self.init_from, self.keep_latent_stats = train_only, init_from, keep_latent_stats
        if train_only:
            self._freeze_all_but(list(train_only))
        if keep_latent_stats:
            self._check_latent_side_frozen()
        self.loss = AutoencoderLoss(self.loss_cfg, cfg.out_channels or cfg.in_channels)
        if self.speed.channels_last:  # before the EMA copy, so both are NHWC
            to_channels_last(self.autoencoder, self.loss.discriminator)
        self.setup_ema(self.autoencoder)
        # After the EMA copy: the EMA weights only evaluate (validation, scale factor), eagerly.
        # The adaptive GAN weight takes autograd.grad(..., retain_graph=True) through the decoder, and
        # AOTAutograd's donated buffers forbid retaining a compiled backward graph: the training step
        # turns donation off for itself only (compute_loss), where the compiled graphs are built.
        self._keep_buffers = compile and self.loss.discriminator is not None and self.loss_cfg.adaptive_weight
        for part in (self.autoencoder.encoder, self.autoencoder.decoder):
            if any(p.requires_grad for p in part.parameters()):  # a frozen (RAE) encoder runs eagerly
                compile_network(part, compile)
        self._data_checked = False

    def _freeze_all_but(self, patterns: list[str]) -> None:
        names = [n for n, _ in self.autoencoder.named_parameters()]
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            tops = sorted({n.split(".")[0] + "." + n.split(".")[1] + ".*" for n in names if n.count(".") >= 2})
            raise ValueError(f"model.train_only patterns {unmatched} match no autoencoder parameter; names look "
                             f"like {names[0]!r} (groups: {tops[:12]})")
        for n, p in self.autoencoder.named_parameters():
            if p.requires_grad and not any(fnmatch.fnmatchcase(n, pat) for pat in patterns):
                p.requires_grad_(False)

    def _check_latent_side_frozen(self) -> None:
        if not self.init_from:
            raise ValueError("model.keep_latent_stats needs model.init_from: the checkpoint whose latent statistics "
                             "to keep (or set keep_latent_stats: false to measure them)")
        training = [n for n, p in self.autoencoder.named_parameters()
                    if p.requires_grad and not n.startswith(DECODER_SIDE)]
        if training:
            raise ValueError(f"model.keep_latent_stats: the latent side trains ({training[:4]}...), so the latents "
                             "change and their statistics must be measured again: set keep_latent_stats: false, or "
                             "list only decoder parameters in model.train_only")

    def configure_callbacks(self):
        # The one owner of the latent statistics (latent_stats.py); Lightning orders it before checkpoints.
        return [LatentStatistics(self.scale_batches, self.scale_use_shift, keep=self.keep_latent_stats)]

    def on_fit_start(self) -> None:
        data = datamodule_settings(self.trainer)
        if isinstance(data.get("image_size"), int):  # the data's images, checked before the first step
            chans = data.get("channels", self.autoencoder.config.in_channels)
            self.check_images(torch.empty(1, chans, data["image_size"], data["image_size"], device="meta"))
        if self.init_from and self.trainer.ckpt_path is None and self.global_step == 0:
            from ldm_lightning.autoencoder.load import load_autoencoder
            src = load_autoencoder(self.init_from)
            if src.config.to_dict() | {"scale_factor": 0, "shift_factor": 0} != \
                    self.autoencoder.config.to_dict() | {"scale_factor": 0, "shift_factor": 0}:
                raise ValueError(f"model.init_from={self.init_from!r} holds another architecture than this "
                                 "model's autoencoder config; start from a checkpoint of the same preset/overrides")
            sd = {k: v for k, v in src.state_dict().items() if self.keep_latent_stats or k not in STAT_BUFFERS}
            from ldm_lightning.training.fsdp2 import load_full_weights  # sharded under FSDP2: each rank its shard
            for net in {id(m): m for m in (self.autoencoder, self.ema_or_live())}.values():
                load_full_weights(net, sd)

    # --- FSDP2 (training/fsdp2.py) --------------------------------------------------------------------
    def fsdp2_refusal(self) -> str | None:
        if self.hparams.get("compile"):
            return "model.compile is not wired for trainer.strategy fsdp2 yet: set model.compile false"
        if self.autoencoder.config.arch == "rae":
            return ("an RAE autoencoder (frozen representation encoder) is not wired for trainer.strategy fsdp2: train "
                    "it with --trainer.strategy ddp")
        if self.loss.discriminator is not None and self.loss_cfg.disc_norm == "batch":
            # FSDP2 shards parameters, not buffers: each rank's BatchNorm running statistics would drift apart
            return ("loss.disc_norm: batch keeps per-rank BatchNorm statistics, which FSDP2 does not synchronise: set "
                    "loss.disc_norm: group (or train with --trainer.strategy ddp)")
        return None

    def fsdp2_networks(self) -> list:
        # The discriminator (trained) is sharded on its own; LPIPS (frozen, a metric) stays a replicated plain copy.
        nets = [self.autoencoder] + ([self.loss.discriminator] if self.loss.discriminator is not None else [])
        return nets + ([self.ema.module] if self.ema is not None else []) + self.posthoc_profiles()

    # --- start-up checks -------------------------------------------------------------------------
    def check_images(self, x: torch.Tensor) -> None:
        """Fail early, naming the config field, when the data cannot go through this autoencoder."""
        cfg = self.autoencoder.config
        if x.ndim != 4:
            raise ValueError(f"batch['image'] must be (B, C, H, W); got shape {tuple(x.shape)}")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"data images have {x.shape[1]} channels but model.autoencoder.in_channels="
                             f"{cfg.in_channels}: set model.init_args.autoencoder.in_channels: {x.shape[1]}")
        f = cfg.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"data image size {tuple(x.shape[2:])} is not divisible by the downsampling factor "
                             f"f={f} of model.autoencoder.ch_mult={list(cfg.ch_mult)}: resize/pad the data or "
                             "change ch_mult")
        if self.image_size is not None and tuple(x.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(f"data image size {tuple(x.shape[2:])} != model.image_size={self.image_size}")

    # --- training --------------------------------------------------------------------------------
    def compute_loss(self, batch):
        x = model_range(batch["image"])                          # (B, C, H, W) in [-1, 1]
        x = images_channels_last(x, self.speed.channels_last)   # NHWC when speed.channels_last
        if not self._data_checked:
            self.check_images(x)
            self._data_checked = True
        g = self.step_generator("posterior")
        scope = contextlib.nullcontext()
        if self._keep_buffers:
            import torch._functorch.config as functorch_config
            scope = functorch_config.patch(donated_buffer=False)
        with scope:
            recon, posterior = self.autoencoder(x, sample_posterior=self.sample_posterior, generator=g)
            self.loss.average_over_ranks = self.world_independent  # the adaptive GAN weight on the global batch
            return self.loss(x, recon, posterior, int(self.global_step), self.autoencoder.last_layer)

    def optimizer_param_groups(self):
        ae = [p for p in self.autoencoder.parameters() if p.requires_grad]
        groups = [{"params": ae, "name": "autoencoder"}]
        if self.loss.discriminator is not None:
            groups.append({"params": list(self.loss.discriminator.parameters()), "name": "discriminator",
                           "lr": self.optim_cfg.lr * self.loss_cfg.disc_lr_scale})
        return groups

    # --- validation ------------------------------------------------------------------------------
    def on_validation_start(self) -> None:
        from torchmetrics import MeanMetric
        from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
        if not hasattr(self, "_val_metrics"):
            metrics = {"psnr": PeakSignalNoiseRatio(data_range=1.0), "ssim": StructuralSimilarityIndexMeasure(
                data_range=1.0), "lpips": MeanMetric(), "l1": MeanMetric()}
            fid = self._build_fid()
            if fid is not None:
                metrics["rfid"] = fid
            object.__setattr__(self, "_val_metrics", metrics)     # not submodules: kept out of state_dict
        for m in self._val_metrics.values():
            m.to(self.device).reset()
        self._val_first = None

    def _build_fid(self):
        if not self.fid_inception_weights:
            if not getattr(self, "_fid_msg", False):
                rank_zero_info("[ldm-lightning] rFID skipped: set model.init_args.fid_inception_weights to a local "
                               "pt_inception-2015-12-05 weights file to compute it")
                self._fid_msg = True
            return None
        import os
        if not os.path.isfile(self.fid_inception_weights):
            raise FileNotFoundError(
                f"model.init_args.fid_inception_weights={self.fid_inception_weights!r} does not exist; fix: point it "
                "at a local pt_inception-2015-12-05-6726825d.pth (torch-fidelity's FID Inception weights), or "
                "set it to null to skip rFID")
        from torchmetrics.image.fid import FrechetInceptionDistance
        return FrechetInceptionDistance(feature=2048, normalize=True,
                                        feature_extractor_weights_path=self.fid_inception_weights)

    def validation_step(self, batch, batch_idx):
        x = model_range(batch["image"])                          # (B, C, H, W) in [-1, 1]
        net = self.ema_or_live()
        posterior = net.encode(x)
        recon = net.decode_latent(net.decoder_input(posterior)).float()  # (B, C, H, W)
        x01, r01 = (x.float() + 1) / 2, ((recon + 1) / 2).clamp(0, 1)
        m = self._val_metrics
        m["psnr"].update(r01, x01)
        m["ssim"].update(r01, x01)
        m["l1"].update((x.float() - recon).abs().mean())
        if self.loss.lpips is not None:
            m["lpips"].update(self.loss.perceptual(x.float(), recon.clamp(-1, 1)).mean())
        if "rfid" in m:
            rgb = (lambda t: t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t)
            m["rfid"].update(rgb(x01), real=True)
            m["rfid"].update(rgb(r01), real=False)
        if self._val_first is None:
            self._val_first = (x[: self.log_images].float(), recon[: self.log_images], posterior.mode().float())

    def on_validation_epoch_end(self) -> None:
        for name, metric in self._val_metrics.items():
            if name == "lpips" and self.loss.lpips is None:
                continue
            self.log(f"val/{name}", metric.compute(), sync_dist=False, prog_bar=name == "psnr")
        self._log_media()

    def _log_media(self) -> None:
        if self._val_first is None or self.global_rank != 0 or self.trainer.sanity_checking:
            return
        from ldm_lightning.training.media import log_image_grid
        x, r, z = self._val_first
        pairs = torch.stack([x, r.clamp(-1, 1)], 1).flatten(0, 1)  # (2n, C, H, W): input | reconstruction
        log_image_grid(self.trainer, "val/reconstructions", image_grid(pairs, nrow=2 * min(4, len(x))),
                       self.global_step, caption="input | recon",
                       png_dir="reconstructions" if self.logger is not None else None)
        from lightning.pytorch.loggers import WandbLogger
        if isinstance(self.logger, WandbLogger):
            import wandb
            self.logger.experiment.log({"val/latent_hist": wandb.Histogram(z.flatten().cpu().numpy()),
                                        "trainer/global_step": self.global_step})

    def on_save_checkpoint(self, checkpoint) -> None:
        # What `load_autoencoder` and `ldm-lightning export` dispatch on.
        checkpoint["ldm_lightning"] = {"module": CHECKPOINT_TAG, "autoencoder": self.autoencoder.config.to_dict()}
