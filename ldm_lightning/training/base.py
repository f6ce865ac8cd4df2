"""What both training stages share: optimizer + warmup, EMA, the non-finite guard (training/nonfinite_guard.py),
deterministic per-step noise.

`AutoencoderModule` and `DiffusionModule` subclass `TrainingModule`. The subclass implements
`compute_loss(batch) -> (loss, terms)`; the base turns that into a guarded training step.

Determinism: every random draw a training step makes (noise, timesteps, posterior samples, condition
dropout) comes from `self.step_generator(tag)`, a generator seeded by (seed, global step, rank, tag); with
`data.order: global`, by (seed, global step, tag) and drawn per global row (training/world_independence.py).
Noise is therefore a pure function of the step, so a resumed run draws exactly what an uninterrupted
run would, with no RNG state to carry (RNG states are still checkpointed for user code that uses
the global generators — see training/checkpointing.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import Literal, get_args

import lightning as L
import torch
from torch import nn

from ldm_lightning.choices import check_choices
from ldm_lightning.finite import check_finite_fields
from ldm_lightning.nn.ema import EMA
from ldm_lightning.nn.posthoc_ema import PosthocEMAConfig, PowerEMA
from ldm_lightning.training.logging_steps import is_logging_step
from ldm_lightning.training.nonfinite_guard import GuardConfig, NonFiniteGuard
from ldm_lightning.training.world_independence import GlobalRowDraws


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
        check_choices(self, "optim")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


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


def _seed_from(*parts) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class TrainingModule(NonFiniteGuard, L.LightningModule):
    """Base LightningModule. Subclasses call `self.setup_ema(network)` in `__init__` with the trained
    nn.Module whose weights get an EMA (a direct child), and implement `compute_loss`."""

    def __init__(self, optim: OptimConfig | None = None, ema: EMAConfig | None = None,
                 guard: GuardConfig | None = None, seed: int = 0, posthoc_ema: PosthocEMAConfig | None = None):
        super().__init__()
        self.optim_cfg = optim or OptimConfig()
        self.ema_cfg = ema or EMAConfig()
        self.posthoc_ema_cfg = posthoc_ema  # None: off
        self.seed = seed
        self.ema: EMA | None = None
        self.posthoc_ema: PowerEMA | None = None
        self.init_guard(guard)
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
        if self.guard_on_device():
            # The step's decision is a device tensor: the EMA update is masked by it, with no host read.
            # The post-hoc EMA profiles are not updated on this path.
            ok = self.device_step_ok
            if self.ema is not None and ok is not None and not self._ema_updated_this_batch:
                self.ema.update(getattr(self, self._ema_target_name), ok)
            self._ema_updated_this_batch = True
            return
        if self.ema is not None and not self.step_skipped() and not self._ema_updated_this_batch:
            self.ema.update(getattr(self, self._ema_target_name))
        if self.posthoc_ema is not None and not self.step_skipped() and not self._ema_updated_this_batch:
            self.posthoc_ema.update(getattr(self, self._ema_target_name))
            if int(self.posthoc_ema.num_updates) % self.posthoc_ema_cfg.snapshot_every == 0:
                self._write_posthoc_snapshot()
        self._ema_updated_this_batch = True

    def _write_posthoc_snapshot(self) -> None:
        """Global rank 0 writes the post-hoc EMA profiles of this update to `<checkpoint dir>/posthoc-ema/` (every
        rank holds the same profiles, or under FSDP2 its shards, which every rank then gathers); before this step's
        checkpoint, so a resume finds every earlier snapshot."""
        trainer = self._trainer
        tensors = self.posthoc_ema.snapshot() if self.is_sharded else None  # a collective under FSDP2
        if trainer is None or not trainer.is_global_zero:
            return
        import os

        from ldm_lightning.training.checkpointing import run_checkpoint_dir
        from ldm_lightning.training.posthoc_snapshots import SUBDIR, write_snapshot
        directory = run_checkpoint_dir(trainer)
        meta: dict = {}
        self.on_save_checkpoint(meta)  # the `ldm_lightning` entry of a checkpoint: what an export is built from
        tracker = self.posthoc_ema
        write_snapshot(os.path.join(directory, SUBDIR), tensors if tensors is not None else tracker.snapshot(),
                       int(tracker.num_updates),
                       tracker.sigma_rels, tracker.gammas, meta.get("ldm_lightning", {}))

    def on_train_batch_start(self, batch, batch_idx):
        self._ema_updated_this_batch = False

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # DeepSpeed is handed every micro-batch and steps only at its own accumulation boundaries (strategies.py)
        applied = getattr(self._trainer.strategy, "optimizer_step_applied", None) if self._trainer else None
        if applied is None or applied():
            self.update_ema()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # Automatic optimization updated in optimizer_step (not at all on gradient-accumulation
        # micro-batches, where the weights did not change).
        if not self.automatic_optimization and not self._ema_updated_this_batch:
            self.update_ema()
        super().on_train_batch_end(outputs, batch, batch_idx)  # the guard's look at its device-side counters

    # --- FSDP2 ----------------------------------------------------------------------------------------
    def fsdp2_refusal(self) -> str | None:
        """Why this module cannot train under `trainer.strategy: fsdp2` (None: it can). The stages that support it
        override this."""
        return (f"trainer.strategy fsdp2 is wired for the autoencoder and diffusion stages only; train "
                f"{type(self).__name__} with --trainer.strategy ddp or deepspeed_stage_2_anydevice")

    def configure_model(self) -> None:
        """Under the fsdp2 strategy: shard the trained network and its EMA copy per block (training/fsdp2.py)."""
        from ldm_lightning.training.fsdp2 import FSDP2Error, FSDP2Strategy
        strategy = self._trainer.strategy if self._trainer is not None else None
        if getattr(strategy, "zero_stage_3", False) and self.posthoc_ema is not None:
            # ZeRO-3 partitions the profiles like every other parameter: their snapshots would be written with
            # the large tensors empty (measured: 30 of 370 in a UNet), and a gather per snapshot is not wired.
            from ldm_lightning.errors import UserError
            raise UserError("model.posthoc_ema is not supported with DeepSpeed ZeRO-3 (the profiles are partitioned "
                            "across ranks, so their snapshots cannot be written whole): train with "
                            "--trainer.strategy fsdp2, deepspeed_stage_2_anydevice or ddp, or drop model.posthoc_ema")
        if not isinstance(strategy, FSDP2Strategy):
            return
        why = self.fsdp2_refusal()
        if why:
            raise FSDP2Error(why)
        networks = self.fsdp2_networks()
        strategy.shard(self, networks)
        from torch.distributed.fsdp import register_fsdp_forward_method
        for net in networks:  # methods besides forward() that run the network (e.g. the autoencoder's encode)
            for name in getattr(net, "fsdp_forward_methods", ()):
                register_fsdp_forward_method(net, name)

    def fsdp2_networks(self) -> list[nn.Module]:
        """The networks `fully_shard` wraps (each per block, then its root): the EMA target, every other child with
        trained parameters, the EMA copy. A stage whose trained network sits beside frozen ones in one child
        (the autoencoder's loss: discriminator + LPIPS) overrides this; frozen modules outside stay replicated."""
        target = getattr(self, self._ema_target_name)
        trained = [m for n, m in self.named_children() if n != "ema" and m is not target
                   and any(p.requires_grad for p in m.parameters())]
        return [target, *trained, *([self.ema.module] if self.ema is not None else []), *self.posthoc_profiles()]

    def posthoc_profiles(self) -> list[nn.Module]:
        """The post-hoc EMA's copies of the network (none when it is off): sharded like the EMA under FSDP2."""
        return list(self.posthoc_ema.profiles) if self.posthoc_ema is not None else []

    @property
    def is_sharded(self) -> bool:
        """Whether the weights are FSDP2 shards: every rank must then run each forward (sampling included)."""
        from torch.distributed.tensor import DTensor
        return any(isinstance(p, DTensor) for p in getattr(self, self._ema_target_name).parameters())

    # --- randomness ------------------------------------------------------------------------------
    def step_generator(self, tag: str = "noise", device: torch.device | None = None) -> torch.Generator:
        """A generator seeded by (seed, global_step, global_rank, tag): noise as a pure function of the step."""
        g = torch.Generator(device=device or self.device)
        draws = self.__dict__.get("_row_draws")
        if draws is not None:  # data.order: global: the same stream on every rank, sliced per global row
            g.manual_seed(_seed_from(self.seed, int(self.global_step), "global", tag))
            draws.generators.append(g)
            return g
        g.manual_seed(_seed_from(self.seed, int(self.global_step), int(self.global_rank), tag))
        return g

    @property
    def world_independent(self) -> bool:
        """Inside a training step of a `data.order: global` run (noise per global row)."""
        return self.__dict__.get("_row_draws") is not None

    @contextlib.contextmanager
    def _noise_per_global_row(self):
        """With `data.order: global` (the DataModule's `global_rows`): step noise drawn per global row."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        rows = dm.global_rows() if hasattr(dm, "global_rows") else None
        if rows is None:
            yield
            return
        offset, total = rows
        draws = GlobalRowDraws(int(dm.batch_size), offset, total)
        self.__dict__["_row_draws"] = draws
        try:
            with draws:
                yield
        finally:
            self.__dict__["_row_draws"] = None

    # --- the step --------------------------------------------------------------------------------
    def compute_loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        with self._noise_per_global_row():
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
