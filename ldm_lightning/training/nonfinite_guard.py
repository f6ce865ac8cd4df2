"""The non-finite guard: skip a training step whose loss or gradients are NaN/Inf, stop after too many in a row.

`NonFiniteGuard` is a mixin of `TrainingModule` (training/base.py). It decides each step either

- on the host (default): the loss and the gradient norm are checked with one all-rank reduction each
  (two host syncs per step); a bad step is skipped exactly (no weight, EMA or optimizer update), warned
  about, and counted; or
- on the device (`speed.sync_free_guard`, training/speed.py): the fused AdamW kernel skips the step itself
  (`found_inf`), the EMA update is masked on the device (`EMA.update(model, ok)`), the counters are device
  tensors, and the host reads them on logging steps only.

Both end the same way after `guard.max_consecutive` skipped steps in a row: one stop message
(`NonFiniteLossError`, exit 3 in `ldm-lightning fit`) and one `nonfinite-stop.ckpt` writer
(`save_nonfinite_stop`). The counters (`nonfinite_skipped`, `nonfinite_consecutive`) are buffers of the module,
so they are in every checkpoint and a resume continues them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ldm_lightning.training.checkpointing import atomic_copy, find_step_checkpoint, run_checkpoint_dir
from ldm_lightning.training.logging_steps import is_logging_step


@dataclass
class GuardConfig:
    """Non-finite loss / gradient protection."""

    enabled: bool = True
    """Skip optimizer steps whose loss or gradients are NaN/Inf (decided jointly by all ranks)."""
    max_consecutive: int = 20
    """After this many consecutive skipped steps: save `nonfinite-stop.ckpt` and stop with an error."""


class NonFiniteLossError(RuntimeError):
    """Raised after `GuardConfig.max_consecutive` consecutive non-finite steps."""


class NonFiniteGuard:
    """Mixin of `TrainingModule` (a LightningModule): the guard's Lightning hooks and its stop."""

    guard_cfg: GuardConfig
    sync_free_guard: bool = False
    """Decide on the device (`SpeedLevers` sets it from `speed.sync_free_guard`)."""

    def init_guard(self, guard: GuardConfig | None) -> None:
        """Called by `TrainingModule.__init__`: the config and the two counters (buffers: checkpointed)."""
        self.guard_cfg = guard or GuardConfig()
        self.register_buffer("nonfinite_skipped", torch.zeros((), dtype=torch.long), persistent=True)
        self.register_buffer("nonfinite_consecutive", torch.zeros((), dtype=torch.long), persistent=True)
        self._last_step_skipped = False
        # Under the device-side guard: the step's decision (0-dim, 1 = taken), for the EMA update.
        self.device_step_ok: torch.Tensor | None = None

    def guard_on_device(self) -> bool:
        return self.sync_free_guard and self.guard_cfg.enabled

    def step_skipped(self) -> bool:
        """Whether the host-side guard skipped this step (always False under the device-side guard: the host
        does not know, the optimizer kernel decides)."""
        return self._last_step_skipped

    def _all_ranks_finite(self, value: torch.Tensor) -> bool:
        ok = torch.isfinite(value.detach()).all().float().reshape(1)
        if self.trainer is not None and self.trainer.world_size > 1:
            ok = self.trainer.strategy.reduce(ok, reduce_op="min")
        return bool(ok.item() > 0)

    def _is_deepspeed(self) -> bool:
        return self.trainer is not None and "DeepSpeed" in type(self.trainer.strategy).__name__

    # --- the decision ----------------------------------------------------------------------------
    def guard_loss(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]):
        """Returns the loss to backpropagate, or None / a zero-gradient loss when the step must be skipped."""
        self._last_step_skipped = False
        if self.guard_on_device():
            self._loss_finite = torch.isfinite(loss.detach()).all()  # () bool, on the device
            return loss
        if not self.guard_cfg.enabled or self._all_ranks_finite(loss):
            self.nonfinite_consecutive.zero_()
            return loss
        self._register_bad_step("loss", terms, loss)
        distributed = self.trainer is not None and self.trainer.world_size > 1
        if self._is_deepspeed() or distributed:
            # DeepSpeed's engine must run backward+step every iteration, and Lightning refuses a None
            # training_step under DDP (ranks would disagree on the gradient all-reduce): backprop a
            # graph with all-zero gradients instead. For torch optimizers on_before_optimizer_step
            # then drops those gradients so the step is skipped exactly; DeepSpeed keeps params
            # unchanged apart from optimizer momentum/decay.
            return sum((p * 0).sum() for p in self.parameters() if p.requires_grad)
        return None

    def on_before_optimizer_step(self, optimizer):
        if self.guard_on_device():
            return self._decide_on_device(optimizer)
        # Gradients that are non-finite on any rank: drop them all, so torch optimizers skip every
        # parameter (they ignore params whose .grad is None) — the update is skipped exactly.
        if not self.guard_cfg.enabled or self._is_deepspeed():
            return
        if self._last_step_skipped:  # non-finite loss under DDP: zero gradients, drop them (see guard_loss)
            for p in self.parameters():
                p.grad = None
            return
        # FSDP2 (DTensor) gradients: this rank's shards; _all_ranks_finite's min over ranks covers the others.
        grads = [getattr(p.grad, "_local_tensor", p.grad) for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.stack([g.detach().float().norm() for g in grads]).sum()
        if not self._all_ranks_finite(norm):
            self._register_bad_step("gradients", {"grad_norm": norm}, norm)
            for p in self.parameters():
                p.grad = None

    def _register_bad_step(self, what: str, terms: dict[str, torch.Tensor], value: torch.Tensor) -> None:
        self._last_step_skipped = True
        if int(self.nonfinite_consecutive) == 0:
            # Skipped steps change no weights, EMA or optimizer state: the state now is the state of this step.
            self._streak_start_step = int(self.global_step)
        self.nonfinite_skipped += 1
        self.nonfinite_consecutive += 1
        n = int(self.nonfinite_consecutive)
        term_str = ", ".join(f"{k}={float(v.detach().float().mean()):.4g}" for k, v in terms.items())
        msg = (f"non-finite {what} at global step {self.global_step} ({term_str}); "
               f"step skipped ({n} in a row, {int(self.nonfinite_skipped)} in total)")
        if self.global_rank == 0:
            print(f"[ldm-lightning] WARNING: {msg}", flush=True)
        if n >= self.guard_cfg.max_consecutive:
            self._stop(msg, n)

    def _decide_on_device(self, optimizer) -> None:
        opt = getattr(optimizer, "_optimizer", optimizer)
        if self._is_deepspeed() or not opt.defaults.get("fused"):
            raise ValueError("model.speed.sync_free_guard needs the fused AdamW kernel and a torch optimizer: set "
                             "model.optim.implementation: fused (or auto on CUDA), no DeepSpeed strategy")
        ok = getattr(self, "_loss_finite", None)
        ok = torch.ones((), dtype=torch.bool, device=self.device) if ok is None else ok
        grads = [p.grad.detach() for p in self.parameters() if p.grad is not None]
        if grads:
            ok = ok & torch.isfinite(torch.stack(torch._foreach_norm(grads)).float().sum())
        ok = ok.float().reshape(1)
        if self.trainer.world_size > 1:  # joint decision; an all-reduce is queued, the host does not wait
            ok = self.trainer.strategy.reduce(ok, reduce_op="min")
        ok = ok.reshape(())
        opt.found_inf = 1.0 - ok  # 1: the fused kernel skips every parameter and undoes its step count
        self.device_step_ok, self._loss_finite = ok, None
        self.nonfinite_skipped += (1.0 - ok).long()
        self.nonfinite_consecutive.add_(1).mul_((1.0 - ok).long())  # +1 on a skip, 0 after a good step

    # --- the device-side guard's host look (logging steps only) ------------------------------------
    def on_train_start(self) -> None:
        super().on_train_start()
        if self.guard_on_device():
            self._reported_skipped = int(self.nonfinite_skipped)  # once, after a resume restored the counters

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.guard_on_device() and is_logging_step(self):
            self.check_guard_counters()

    def on_train_end(self) -> None:
        if self.guard_on_device():
            self.check_guard_counters()
        super().on_train_end()

    def check_guard_counters(self) -> None:
        """The host's look at the device-side guard (two syncs, on logging steps only): warn about steps
        skipped since the last look, and stop after guard.max_consecutive in a row."""
        total, run = int(self.nonfinite_skipped), int(self.nonfinite_consecutive)
        new = total - getattr(self, "_reported_skipped", 0)
        self._reported_skipped = total
        if new <= 0:
            return
        step = int(self.global_step)
        msg = (f"{new} non-finite step(s) skipped up to global step {step} ({run} in a row now, {total} in total; "
               "speed.sync_free_guard checks on logging steps only)")
        if self.global_rank == 0:
            print(f"[ldm-lightning] WARNING: {msg}", flush=True)
        if run >= self.guard_cfg.max_consecutive:
            self._streak_start_step = step - run  # skipped steps changed nothing: this state is that step's
            self._stop(msg, run)

    # --- the stop --------------------------------------------------------------------------------
    def _stop(self, msg: str, run: int) -> None:
        """Save `nonfinite-stop.ckpt` and raise the one stop message."""
        saved = self.save_nonfinite_stop() if self.trainer is not None else "nothing (no trainer)"
        raise NonFiniteLossError(
            f"{msg}. Stopped after {run} consecutive non-finite steps "
            f"(guard.max_consecutive={self.guard_cfg.max_consecutive}); saved {saved}. "
            "Resume from it with a lower learning rate (--model.init_args.optim.lr), gradient clipping "
            "(--trainer.gradient_clip_val), or after checking the data for bad samples.")

    def save_nonfinite_stop(self) -> str:
        """Write `nonfinite-stop.ckpt` beside the step checkpoints: a copy of the step checkpoint with the highest
        step from before the first non-finite step of this streak (a known-good point, possibly before a
        divergence that was still finite; its recorded step is its state's), else the live state, whose
        weights equal those before that step (skipped steps change nothing) while its step counter went on;
        then `checkpoint["nonfinite_stop"]` records both steps. Returns what was saved, for the stop message."""
        trainer = self.trainer
        callback = find_step_checkpoint(trainer)
        path = os.path.join(run_checkpoint_dir(trainer), "nonfinite-stop.ckpt")
        first_bad = getattr(self, "_streak_start_step", int(self.global_step))
        source = callback.newest_before(first_bad) if callback is not None else None
        if source is not None and os.path.isfile(source):
            if trainer.is_global_zero:
                atomic_copy(source, path)
            trainer.strategy.barrier("nonfinite-stop")
            return (f"{path} (a copy of {os.path.basename(source)}, the checkpoint with the highest step from before "
                    f"the first non-finite step at global step {first_bad})")
        # The live state: weights, EMA and optimizer moments are those of step `first_bad` (skipped steps change
        # none of them), but Lightning's step counter, the learning-rate schedule and the data position went on
        # counting the skipped steps, and a resume continues from those. `global_step` stays the counter (it
        # is what a resume restores); the record names the step whose weights the file holds.
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        counter = int(checkpoint["global_step"])
        checkpoint["nonfinite_stop"] = {"weights_of_step": first_bad, "global_step": counter,
                                        "skipped_steps": counter - first_bad}
        trainer.strategy.save_checkpoint(checkpoint, path)
        trainer.strategy.barrier("nonfinite-stop")
        counted = (f"; its step counter, learning-rate schedule and data position are at global step {counter} (the "
                   f"{counter - first_bad} skipped step(s) counted), where a resume from it continues"
                   if counter != first_bad else "")
        return (f"{path} (the weights, EMA and optimizer state of global step {first_bad}, before the first "
                f"non-finite step; no earlier step checkpoint existed{counted}; recorded in it as "
                "'nonfinite_stop')")
