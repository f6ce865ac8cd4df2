"""What both training stages share: optimizer + warmup, EMA, NaN guard, deterministic per-step noise.

`AutoencoderModule` and `DiffusionModule` subclass `TrainingModule`. The subclass implements
`compute_loss(batch) -> (loss, terms)`; the base turns that into a guarded training step.

Determinism: every random draw a training step makes (noise, timesteps, posterior samples, condition
dropout) comes from `self.step_generator(tag)`, a generator seeded by (seed, global step, rank, tag).
Noise is therefore a pure function of the step, so a resumed run draws exactly what an uninterrupted
run would, with no RNG state to carry (RNG states are still checkpointed for user code that uses
the global generators — see training/checkpointing.py).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal, get_args

import lightning as L
import torch
from torch import nn

from ldm_lightning.finite import check_finite_fields
from ldm_lightning.nn.ema import EMA
from ldm_lightning.nn.posthoc_ema import PosthocEMAConfig, PowerEMA


# Choice fields are Literal types: jsonargparse lists the choices in `--help` and refuses others at parse time;
# __post_init__ repeats the check for configs built in Python.
LRSchedule = Literal["constant", "cosine"]
AdamWImplementation = Literal["auto", "fused", "foreach", "for_loop"]
ADAMW_IMPLEMENTATIONS = get_args(AdamWImplementation)


def adamw_kernel_kwargs(implementation: str, params) -> dict:
    """torch.optim.AdamW keyword arguments selecting the kernel of `OptimConfig.implementation`."""
    if implementation == "auto":
        first = next((p for g in params for p in (g["params"] if isinstance(g, dict) else [g])), None)
        implementation = "fused" if first is not None and first.device.type == "cuda" else "default"
    return {"fused": {"fused": True}, "foreach": {"foreach": True},
            "for_loop": {"foreach": False}}.get(implementation, {})


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warmup from 0 to `lr` over this many optimizer steps."""
    schedule: LRSchedule = "constant"
    """After warmup: 'constant' or 'cosine' (to 0 at trainer.max_steps)."""
    implementation: AdamWImplementation = "auto"
    """AdamW kernel: 'fused' (one kernel for all parameters), 'foreach' (batched ops), 'for_loop', or
    'auto' = fused when the parameters are on CUDA (far fewer kernel launches per step; the same update
    within float rounding), else torch's default. 'auto' is PROVISIONAL pending scripts/gpu_bench.sh."""

    def __post_init__(self):
        check_finite_fields(self, "optim")  # NaN/inf pass every comparison below
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule not in get_args(LRSchedule):
            raise ValueError(f"optim.schedule must be one of {get_args(LRSchedule)}; got {self.schedule!r}")
        if self.implementation not in ADAMW_IMPLEMENTATIONS:
            raise ValueError(f"optim.implementation must be one of {ADAMW_IMPLEMENTATIONS}; got {self.implementation!r}")


@dataclass
class EMAConfig:
    """Exponential moving average of the trained network's weights."""

    enabled: bool = True
    """Keep an EMA copy (used for validation samples and exported by default)."""
    decay: float = 0.9999
    """Target decay; ramps up as (1+n)/(10+n) early in training unless warmup_steps > 0."""
    warmup_steps: int = 0
    """If > 0, decay ramps linearly from 0 to `decay` over this many updates instead."""

    def __post_init__(self):
        check_finite_fields(self, "ema")


@dataclass
class GuardConfig:
    """Non-finite loss / gradient protection."""

    enabled: bool = True
    """Skip optimizer steps whose loss or gradients are NaN/Inf (decided jointly by all ranks)."""
    max_consecutive: int = 20
    """After this many consecutive skipped steps: save `nonfinite-stop.ckpt` and stop with an error."""


class NonFiniteLossError(RuntimeError):
    """Raised after `GuardConfig.max_consecutive` consecutive non-finite steps."""


def _seed_from(*parts) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def is_logging_step(module) -> bool:
    """Whether Lightning sends this training step's `self.log` values to the loggers (every
    log_every_n_steps); on other steps on_step-only values are dropped. True outside a Trainer's fit."""
    trainer = getattr(module, "_trainer", None)
    connector = getattr(trainer, "_logger_connector", None)
    return True if connector is None or not trainer.training else bool(connector.should_update_logs)


class TrainingModule(L.LightningModule):
    """Base LightningModule. Subclasses call `self.setup_ema(network)` in `__init__` with the trained
    nn.Module whose weights get an EMA (a direct child), and implement `compute_loss`."""

    def __init__(self, optim: OptimConfig | None = None, ema: EMAConfig | None = None,
                 guard: GuardConfig | None = None, seed: int = 0, posthoc_ema: PosthocEMAConfig | None = None):
        super().__init__()
        self.optim_cfg = optim or OptimConfig()
        self.ema_cfg = ema or EMAConfig()
        self.guard_cfg = guard or GuardConfig()
        self.posthoc_ema_cfg = posthoc_ema  # None: off
        self.seed = seed
        self.ema: EMA | None = None
        self.posthoc_ema: PowerEMA | None = None
        self.register_buffer("nonfinite_skipped", torch.zeros((), dtype=torch.long), persistent=True)
        self.register_buffer("nonfinite_consecutive", torch.zeros((), dtype=torch.long), persistent=True)
        self._last_step_skipped = False
        self._ema_updated_this_batch = False

    # --- EMA -------------------------------------------------------------------------------------
    def setup_ema(self, target: nn.Module) -> None:
        self._ema_target_name = next(n for n, m in self.named_children() if m is target)
        if self.ema_cfg.enabled:
            self.ema = EMA(target, self.ema_cfg.decay, self.ema_cfg.warmup_steps)
        if self.posthoc_ema_cfg is not None:  # an addition to the EMA above, which stays as it is
            self.posthoc_ema = PowerEMA(target, self.posthoc_ema_cfg.sigma_rels)

    def ema_or_live(self) -> nn.Module:
        """The network to evaluate with: EMA weights when kept, else the live weights."""
        target = getattr(self, self._ema_target_name)
        return self.ema.module if self.ema is not None else target

    def update_ema(self) -> None:
        """One EMA update for the optimizer step just taken (none when the guard skipped it).

        Runs inside `optimizer_step` (automatic optimization), i.e. before any callback's
        `on_train_batch_end` — where ModelCheckpoint saves — so a checkpoint holds the weights and the
        EMA of the same step and a resume is exact. Manual-optimization subclasses call it right after
        their last `opt.step()`; otherwise it runs (later) in `on_train_batch_end`.
        """
        if self.ema is not None and not self._last_step_skipped and not self._ema_updated_this_batch:
            self.ema.update(getattr(self, self._ema_target_name))
        if self.posthoc_ema is not None and not self._last_step_skipped and not self._ema_updated_this_batch:
            self.posthoc_ema.update(getattr(self, self._ema_target_name))
            if int(self.posthoc_ema.num_updates) % self.posthoc_ema_cfg.snapshot_every == 0:
                self._write_posthoc_snapshot()
        self._ema_updated_this_batch = True

    def _write_posthoc_snapshot(self) -> None:
        """Global rank 0 writes the post-hoc EMA profiles of this update to `<checkpoint dir>/posthoc-ema/` (every
        rank holds the same profiles); before this step's checkpoint, so a resume finds every earlier snapshot."""
        trainer = self._trainer
        if trainer is None or not trainer.is_global_zero:
            return
        import os

        from ldm_lightning.training.checkpointing import run_checkpoint_dir
        from ldm_lightning.training.posthoc_snapshots import SUBDIR, write_snapshot
        directory = run_checkpoint_dir(trainer)
        meta: dict = {}
        self.on_save_checkpoint(meta)  # the `ldm_lightning` entry of a checkpoint: what an export is built from
        tracker = self.posthoc_ema
        write_snapshot(os.path.join(directory, SUBDIR), tracker.snapshot(), int(tracker.num_updates),
                       tracker.sigma_rels, tracker.gammas, meta.get("ldm_lightning", {}))

    def on_train_batch_start(self, batch, batch_idx):
        self._ema_updated_this_batch = False

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # Automatic optimization updated in optimizer_step (not at all on gradient-accumulation
        # micro-batches, where the weights did not change).
        if not self.automatic_optimization and not self._ema_updated_this_batch:
            self.update_ema()

    # --- randomness ------------------------------------------------------------------------------
    def step_generator(self, tag: str = "noise", device: torch.device | None = None) -> torch.Generator:
        """A generator seeded by (seed, global_step, global_rank, tag): noise as a pure function of the step."""
        g = torch.Generator(device=device or self.device)
        g.manual_seed(_seed_from(self.seed, int(self.global_step), int(self.global_rank), tag))
        return g

    # --- the step --------------------------------------------------------------------------------
    def compute_loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        loss, terms = self.compute_loss(batch)
        loss = self.guard_loss(loss, terms)
        if loss is not None:
            self.log_dict({f"train/{k}": v.detach().float() for k, v in terms.items()},
                          prog_bar=False, sync_dist=False)
            self.log("train/loss", loss.detach().float(), prog_bar=True)
        self.log("train/nonfinite_skipped", self.nonfinite_skipped.float())
        self.log_data_health()
        return loss

    def log_data_health(self) -> None:
        """The DataModule's bad-sample count (skipped corrupt or unreadable samples), summed over ranks, through
        the same `self.log` route as every other metric. Only on logging steps: the sum is a collective."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "bad_samples") and is_logging_step(self):
            self.log("data/bad_samples", float(dm.bad_samples), reduce_fx="sum", sync_dist=True)

    def _all_ranks_finite(self, value: torch.Tensor) -> bool:
        ok = torch.isfinite(value.detach()).all().float().reshape(1)
        if self.trainer is not None and self.trainer.world_size > 1:
            ok = self.trainer.strategy.reduce(ok, reduce_op="min")
        return bool(ok.item() > 0)

    def _is_deepspeed(self) -> bool:
        return self.trainer is not None and "DeepSpeed" in type(self.trainer.strategy).__name__

    def guard_loss(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]):
        """Returns the loss to backpropagate, or None / a zero-gradient loss when the step must be skipped."""
        self._last_step_skipped = False
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
        # Gradients that are non-finite on any rank: drop them all, so torch optimizers skip every
        # parameter (they ignore params whose .grad is None) — the update is skipped exactly.
        if not self.guard_cfg.enabled or self._is_deepspeed():
            return
        if self._last_step_skipped:  # non-finite loss under DDP: zero gradients, drop them (see guard_loss)
            for p in self.parameters():
                p.grad = None
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
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
            saved = self._save_nonfinite_stop() if self.trainer is not None else "nothing (no trainer)"
            raise NonFiniteLossError(
                f"{msg}. Stopped after {n} consecutive non-finite steps "
                f"(guard.max_consecutive={self.guard_cfg.max_consecutive}); saved {saved}. "
                "Resume from it with a lower learning rate (--model.init_args.optim.lr), gradient clipping "
                "(--trainer.gradient_clip_val), or after checking the data for bad samples.")

    def _save_nonfinite_stop(self) -> str:
        """Write `nonfinite-stop.ckpt` beside the step checkpoints: a copy of the step checkpoint with the highest
        step from before the first non-finite step of this streak (a known-good point, possibly before a
        divergence that was still finite; its recorded step is its state's), else the live state, whose
        weights equal those before that step (skipped steps change nothing) while its step counter went on;
        then `checkpoint["nonfinite_stop"]` records both steps."""
        import os

        from ldm_lightning.training.checkpointing import atomic_copy, find_step_checkpoint, run_checkpoint_dir
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

    # --- optimizer -------------------------------------------------------------------------------
    def optimizer_param_groups(self):
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        c = self.optim_cfg
        params = self.optimizer_param_groups()  # configured after the move to the device: 'auto' sees CUDA
        opt = torch.optim.AdamW(params, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay, eps=c.eps,
                                **adamw_kernel_kwargs(c.implementation, params))
        total = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else None

        def factor(step: int) -> float:
            if c.warmup_steps and step < c.warmup_steps:
                return (step + 1) / c.warmup_steps
            if c.schedule == "cosine" and total:
                progress = min(1.0, (step - c.warmup_steps) / max(1, total - c.warmup_steps))
                return 0.5 * (1 + math.cos(math.pi * progress))
            return 1.0

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
