"""`LatentStatistics`: the one owner of an autoencoder's latent statistics during `fit`.

- RAE's representation normalisation (`rep_mean` / `rep_std`): measured once at the start of a fresh run
  (the encoder is frozen, so the statistics hold for the whole run), before the first step.
- The latent scale / shift factor (LDM's `scale_by_std`): measured after the final optimizer step with
  the exported (EMA) weights and stored in both the live and the EMA autoencoder.

`AutoencoderModule.configure_callbacks` adds this callback. Lightning runs checkpoint callbacks after
all others, so the end-of-run checkpoints (ModelCheckpoint / StepCheckpoint at the last step, epoch end
or validation end) already hold the factor, and so do exports made from them. A run that stops early
(e.g. an exception-free `trainer.should_stop`) still gets the factor at `on_train_end`, in memory.
Each side pass over the train loader restores a resumable DataModule's position afterwards, so the
checkpointed data position is the run's, not the pass's.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

STAT_BUFFERS = ("scale_factor", "shift_factor", "latent_mean", "latent_std")
DECODER_SIDE = ("decoder.", "post_quant_conv.")
"""Autoencoder parameter-name prefixes that do not change the latents (everything else is the latent side)."""


class LatentStatistics(L.Callback):
    def __init__(self, batches: int = 4, use_shift: bool = False, keep: bool = False):
        """
        Args:
            batches: train batches each statistics pass reads.
            use_shift: also store the latent mean as shift_factor (else shift 0, as LDM/SD).
            keep: keep the statistics the module started with (model.keep_latent_stats: the previous phase's,
                the latent side frozen) instead of measuring them after the final step.
        """
        self.batches, self.use_shift, self.keep = batches, use_shift, keep
        self.done = False

    # --- when ------------------------------------------------------------------------------------
    @staticmethod
    def _at_last_step(trainer, epoch_done: bool = False) -> bool:
        """After the run's final optimizer step (max_steps reached, or the last batch of max_epochs)."""
        by_epochs = epoch_done and trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= \
            trainer.max_epochs
        return (0 < trainer.max_steps <= trainer.global_step) or by_epochs

    def on_train_start(self, trainer, pl_module) -> None:
        self.done = False
        ae = pl_module.autoencoder
        if ae.config.arch == "rae" and trainer.global_step == 0:
            self._pass(trainer, pl_module, lambda batches: self._representation(pl_module, batches))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.done and self._at_last_step(trainer, batch_idx + 1 >= trainer.num_training_batches):
            self.update(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.done and self._at_last_step(trainer, epoch_done=True):
            self.update(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.done:
            self.update(trainer, pl_module)

    # --- what ------------------------------------------------------------------------------------
    def _pass(self, trainer, pl_module, fn):
        """Run fn(batches) over up to `self.batches` train batches on the module's device, then put a
        resumable DataModule back where it was."""
        dm = getattr(trainer, "datamodule", None)
        loader = dm.train_dataloader() if dm is not None else trainer.train_dataloader
        state = dm.state_dict() if dm is not None and hasattr(dm, "load_state_dict") else None
        # The DataModule owns pixel normalisation (uint8 → [-1, 1]); a plain loader must already yield floats.
        prepare = getattr(dm, "model_inputs", lambda b: b)
        batches = (prepare({"image": b["image"].to(pl_module.device)}) for b in loader)
        try:
            return fn(batches)
        finally:
            if state is not None:
                dm.load_state_dict(state)

    def _representation(self, pl_module, batches) -> None:
        live, net = pl_module.autoencoder, pl_module.ema_or_live()
        live.compute_representation_stats(batches, max_batches=self.batches)
        for k in ("rep_mean", "rep_std"):
            getattr(net.encoder, k).copy_(getattr(live.encoder, k))
        rank_zero_info(f"[ldm-lightning] RAE latent normalisation from {self.batches} batches: mean |mu| "
                       f"{float(live.encoder.rep_mean.abs().mean()):.4f}, mean std "
                       f"{float(live.encoder.rep_std.mean()):.4f}")

    @torch.no_grad()
    def update(self, trainer, pl_module) -> dict[str, torch.Tensor] | None:
        """Measure the latent statistics with the EMA (exported) weights; store them in both copies."""
        self.done = True
        if self.keep:
            rank_zero_info(f"[ldm-lightning] latent statistics kept from model.init_from (keep_latent_stats): "
                           f"scale_factor={float(pl_module.autoencoder.scale_factor):.5f}")
            return None
        if self.batches <= 0:
            return None
        net = pl_module.ema_or_live()
        stats = self._pass(trainer, pl_module, lambda batches: net.compute_scale_factor(
            batches, max_batches=self.batches, use_shift=self.use_shift,
            generator=pl_module.step_generator("scale")))
        for m in (pl_module.autoencoder, net):
            for k in STAT_BUFFERS:
                getattr(m, k).copy_(stats[k])
        rank_zero_info(f"[ldm-lightning] latent scale_factor={float(stats['scale_factor']):.5f} "
                       f"shift_factor={float(stats['shift_factor']):.5f} "
                       f"per-channel std={[round(v, 4) for v in stats['latent_std'].tolist()[:16]]}")
        return stats
