"""`AutoencoderModule`: stage-1 training (LDM/VQGAN recipe) as a `TrainingModule`.

One optimiser, automatic optimisation: Lightning's DeepSpeed strategy supports a single optimiser,
and manual optimisation would bypass the base's NaN guard, gradient clipping and accumulation. The
autoencoder and the PatchGAN discriminator are two param groups of that optimiser (separate LRs) and
train in the same backward pass; loss.py explains how the generator/discriminator gradients are kept
apart. Latent statistics (`scale_factor`, ...) are computed at the end of training, before the
final checkpoint is written, so checkpoints and exports carry them.
"""

from __future__ import annotations

import dataclasses

import torch
from lightning.pytorch.utilities import rank_zero_info

from ldm_lightning.autoencoder.autoencoder import Autoencoder, AutoencoderConfig
from ldm_lightning.autoencoder.loss import AutoencoderLoss, LossConfig
from ldm_lightning.autoencoder.presets import PRESETS, get_preset
from ldm_lightning.data.transforms import ensure_model_range
from ldm_lightning.training.base import EMAConfig, GuardConfig, OptimConfig, TrainingModule
from ldm_lightning.training.speed import SpeedConfig, SpeedLevers, as_speed, images_channels_last, to_channels_last
from ldm_lightning.training.strategies import maybe_compile

CHECKPOINT_TAG = "ldm_lightning.autoencoder.AutoencoderModule"


def _as(cls, value):
    if value is None:
        return cls()
    if isinstance(value, dict):
        return cls(**value)
    return value


def _plain(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


class AutoencoderModule(SpeedLevers, TrainingModule):
    def __init__(self, preset: str | None = "tiny-mnist", autoencoder: dict | None = None,
                 loss: LossConfig | None = None, optim: OptimConfig | None = None, ema: EMAConfig | None = None,
                 guard: GuardConfig | None = None, seed: int = 0, image_size: int | None = None,
                 sample_posterior: bool = True, scale_batches: int = 4, scale_use_shift: bool = False,
                 fid_inception_weights: str | None = None, log_images: int = 8, compile: bool = False,
                 speed: SpeedConfig | dict | None = None):
        """
        Args:
            preset: autoencoder preset name (presets.py) or None for AutoencoderConfig defaults.
            autoencoder: AutoencoderConfig fields overriding the preset.
            loss: loss weights and schedule (LossConfig).
            optim / ema / guard / seed: see training/base.py.
            image_size: training image size; checked against the downsampling factor at start-up.
            sample_posterior: decode a posterior sample (LDM) rather than its mean while training.
            scale_batches: train batches used to compute the latent scale factor at the end of fit.
            scale_use_shift: also store the latent mean as shift_factor (else shift 0, as LDM/SD).
            fid_inception_weights: local FID Inception weights (pt_inception-2015-12-05); rFID skipped if None.
            log_images: images in the validation reconstruction grid (W&B only).
            compile: `torch.compile` the encoder and decoder of the trained (live) autoencoder in place;
                parameter names do not change, so checkpoints load with or without it.
            speed: GPU throughput levers (training/speed.py): channels_last (autoencoder, discriminator and
                their inputs in NHWC), tf32. compile_mode 'blocks' is for the diffusion backbone only.
        """
        super().__init__(_as(OptimConfig, optim), _as(EMAConfig, ema), _as(GuardConfig, guard), seed)
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"model.preset must be one of {sorted(PRESETS)} or null; got {preset!r}")
        overrides = dict(autoencoder or {})
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
        # Plain values only: checkpoints stay loadable with torch.load(weights_only=True).
        self.save_hyperparameters({
            "preset": None, "autoencoder": cfg.to_dict(), "loss": _plain(self.loss_cfg),
            "optim": _plain(self.optim_cfg), "ema": _plain(self.ema_cfg), "guard": _plain(self.guard_cfg),
            "seed": seed, "image_size": image_size, "sample_posterior": sample_posterior,
            "scale_batches": scale_batches, "scale_use_shift": scale_use_shift,
            "fid_inception_weights": fid_inception_weights, "log_images": log_images, "compile": compile,
            "speed": _plain(self.speed)})
        self.autoencoder = Autoencoder(cfg)
        self.loss = AutoencoderLoss(self.loss_cfg, cfg.out_channels or cfg.in_channels)
        if self.speed.channels_last:  # before the EMA copy, so both are NHWC
            to_channels_last(self.autoencoder, self.loss.discriminator)
        self.setup_ema(self.autoencoder)
        # After the EMA copy: the EMA weights only evaluate (validation, scale factor), eagerly.
        if compile and self.loss.discriminator is not None and self.loss_cfg.adaptive_weight:
            # The adaptive GAN weight takes autograd.grad(..., retain_graph=True) through the decoder;
            # AOTAutograd's donated buffers forbid retaining a compiled backward graph. Process-wide,
            # and it only costs the memory that buffer donation would have saved.
            import torch._functorch.config
            torch._functorch.config.donated_buffer = False
        for part in (self.autoencoder.encoder, self.autoencoder.decoder):
            maybe_compile(part, compile)
        self._data_checked = False
        self._scale_done = False

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

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        for size_attr in ("image_size", "resolution"):
            size = getattr(dm, size_attr, None)
            if isinstance(size, int):
                chans = next((getattr(dm, a) for a in ("channels", "image_channels", "in_channels")
                              if isinstance(getattr(dm, a, None), int)), self.autoencoder.config.in_channels)
                self.check_images(torch.empty(1, chans, size, size, device="meta"))
                break

    # --- training --------------------------------------------------------------------------------
    def compute_loss(self, batch):
        x = ensure_model_range(batch["image"])                   # (B, C, H, W) in [-1, 1]
        x = images_channels_last(x, self.speed.channels_last)   # NHWC when speed.channels_last
        if not self._data_checked:
            self.check_images(x)
            self._data_checked = True
        g = self.step_generator("posterior")
        recon, posterior = self.autoencoder(x, sample_posterior=self.sample_posterior, generator=g)
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
        x = ensure_model_range(batch["image"])                   # (B, C, H, W) in [-1, 1]
        net = self.ema_or_live()
        posterior = net.encode(x)
        recon = net.decode_latent(posterior.mode()).float()      # (B, C, H, W)
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
        from lightning.pytorch.loggers import WandbLogger
        if self._val_first is None or not isinstance(self.logger, WandbLogger) or self.global_rank != 0:
            return
        import torchvision
        import wandb
        x, r, z = self._val_first
        pairs = torch.stack([x, r.clamp(-1, 1)], 1).flatten(0, 1)  # (2n, C, H, W): input | reconstruction
        grid = torchvision.utils.make_grid((pairs + 1) / 2, nrow=2 * min(4, len(x)))
        self.logger.log_image("val/reconstructions", [grid], step=self.global_step, caption=["input | recon"])
        self.logger.experiment.log({"val/latent_hist": wandb.Histogram(z.flatten().cpu().numpy()),
                                    "trainer/global_step": self.global_step})

    # --- latent scale factor ---------------------------------------------------------------------
    @torch.no_grad()
    def update_scale_factor(self, loader=None) -> dict[str, torch.Tensor]:
        """Compute latent statistics with the exported (EMA) weights on `scale_batches` batches of
        `loader` (default: the train loader) and store them in both the live and EMA autoencoder."""
        dm, data_state = None, None
        if loader is None:
            dm = getattr(self.trainer, "datamodule", None)
            loader = dm.train_dataloader() if dm is not None else self.trainer.train_dataloader
            # A fresh pass over a resumable loader (ShardDataModule) moves its position: put it back,
            # so the checkpoint's data position is the training run's, not this side pass's.
            if dm is not None and hasattr(dm, "state_dict") and hasattr(dm, "load_state_dict"):
                data_state = dm.state_dict()
        net = self.ema_or_live()
        batches = ({"image": ensure_model_range(b["image"].to(self.device))} for b in loader)
        try:
            stats = net.compute_scale_factor(batches, max_batches=self.scale_batches,
                                             use_shift=self.scale_use_shift, generator=self.step_generator("scale"))
        finally:
            if data_state is not None:
                dm.load_state_dict(data_state)
        for m in (self.autoencoder, net):
            for k in ("scale_factor", "shift_factor", "latent_mean", "latent_std"):
                getattr(m, k).copy_(stats[k])
        rank_zero_info(f"[ldm-lightning] latent scale_factor={float(stats['scale_factor']):.5f} "
                       f"shift_factor={float(stats['shift_factor']):.5f} "
                       f"per-channel std={[round(v, 4) for v in stats['latent_std'].tolist()]}")
        self._scale_done = True
        return stats

    def _at_last_step(self, epoch_done: bool = False) -> bool:
        """After the run's final optimizer step (max_steps reached, or the last batch of max_epochs)."""
        t = self.trainer
        if t is None:
            return False
        by_epochs = epoch_done and t.max_epochs not in (None, -1) and t.current_epoch + 1 >= t.max_epochs
        return (0 < t.max_steps <= t.global_step) or by_epochs

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        # After the final optimizer step and before the end-of-run validation and checkpoints
        # (ModelCheckpoint saves on validation end or train-epoch end), so they carry the factor.
        epoch_done = batch_idx + 1 >= self.trainer.num_training_batches
        if not self._scale_done and self.scale_batches > 0 and self._at_last_step(epoch_done):
            self.update_scale_factor()

    def on_train_epoch_end(self) -> None:
        if not self._scale_done and self.scale_batches > 0 and self._at_last_step(epoch_done=True):
            self.update_scale_factor()

    def on_fit_end(self) -> None:
        if not self._scale_done and self.scale_batches > 0:
            self.update_scale_factor()

    def on_save_checkpoint(self, checkpoint) -> None:
        # A checkpoint written at the final step by a callback that ran before our batch-end hook
        # (e.g. ModelCheckpoint(every_n_train_steps)): compute the factor now and patch it in.
        if not self._scale_done and self.scale_batches > 0 and self._at_last_step():
            self.update_scale_factor()
            sd = checkpoint.get("state_dict", {})
            for prefix, net in (("autoencoder.", self.autoencoder), ("ema.module.", self.ema_or_live())):
                for k in ("scale_factor", "shift_factor", "latent_mean", "latent_std"):
                    if prefix + k in sd:
                        sd[prefix + k] = getattr(net, k).detach().clone()
        # What `load_autoencoder` and `ldm-lightning export` dispatch on.
        checkpoint["ldm_lightning"] = {"module": CHECKPOINT_TAG, "autoencoder": self.autoencoder.config.to_dict()}
