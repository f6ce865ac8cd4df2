"""GPU throughput levers of both training stages, each its own flag (`model.init_args.speed.<field>`).

    ldm-lightning fit -c configs/diffusion/... --model.init_args.speed.channels_last true \
        --model.init_args.speed.compile_mode blocks --model.init_args.compile true

Every lever leaves the computed function unchanged (within dtype rounding; tests/test_gpu_levers.py
checks outputs and gradients on CPU); `sync_free_guard` changes only when the guard's warnings and stop
come (on logging steps), not which steps are skipped. Whether each one pays is a GPU question: `scripts/gpu_bench.sh`
measures every lever on and off in one table. Other levers live where they act: fused/foreach AdamW
(`optim.implementation`, training/base.py), the flash-friendly text mask (`conditioning.trim_padding`),
pinned host memory (`data.pin_memory`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from ldm_lightning.finite import check_finite_fields
from ldm_lightning.training.base import NonFiniteLossError, is_logging_step

CompileMode = Literal["model", "blocks"]
COMPILE_MODES = get_args(CompileMode)


@dataclass
class SpeedConfig:
    """Throughput levers that do not change what is computed."""

    channels_last: bool = False
    """Keep the convolutional networks (autoencoder, discriminator, UNet; the frozen autoencoder that
    encodes stage-2 images) and their image inputs in NHWC memory format, which cuDNN's bf16 tensor-core
    convolutions use natively. Default off, PROVISIONAL pending `scripts/gpu_bench.sh` (row 'eager +chlast'):
    GroupNorm (in every block of these networks) has no NHWC CUDA kernel in every torch version, and the
    format conversions around it can cost more than the convolutions gain. No CPU measurement decides it."""
    tf32: bool = True
    """Let float32 matmuls/convolutions use TF32 tensor cores on CUDA (torch.set_float32_matmul_precision
    ('high')), set when fit/validate starts and restored when it ends — never at import. Touches only work
    done in fp32 (an fp32 trainer, `encode_dtype: fp32` VAE encoding, fp32 optimizer math is elementwise
    and unaffected); bf16 autocast already runs on tensor cores. Default on: TF32 keeps fp32's range with a
    10-bit mantissa, the precision bf16 training already accepts (PyTorch's and Lightning's own advice on
    Ampere+); no effect on CPU."""
    compile_mode: CompileMode = "model"
    """How `compile: true` compiles the trained network: 'model' (one graph of the whole forward) or
    'blocks' (each DiT block / UNet stage compiled on its own, i.e. regional compilation: repeated blocks
    share one compiled code, so compile time no longer grows with depth; the small glue between blocks
    stays eager). Default 'model', PROVISIONAL pending the GPU bench (whole-model graphs can fuse across
    block boundaries)."""
    sync_free_guard: bool = False
    """Decide the non-finite guard on the device, with no host read per step (CUDA-graph friendly): the
    fused AdamW kernel skips a non-finite step itself (`found_inf`, exact: weights, moments and step count
    unchanged), the EMA and the skip counters update on the device, and the host reads the counters only
    on logging steps (every trainer.log_every_n_steps). Semantic changes, hence off by default: warnings
    and the `guard.max_consecutive` stop come up to log_every_n_steps late, and a skipped step still
    counts as a global step (as the guard under DDP already does). Needs optim.implementation 'fused'
    ('auto' on CUDA) and a torch optimizer (not DeepSpeed)."""

    def __post_init__(self):
        check_finite_fields(self, "speed")  # NaN/inf pass every comparison below
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"speed.compile_mode must be one of {COMPILE_MODES}; got {self.compile_mode!r}")


def as_speed(value) -> SpeedConfig:
    """A SpeedConfig from None / a dict (YAML) / a SpeedConfig."""
    if value is None:
        return SpeedConfig()
    return value if isinstance(value, SpeedConfig) else SpeedConfig(**dict(value))


def to_channels_last(*modules: nn.Module | None) -> None:
    """Convert every 4-D parameter/buffer of `modules` to NHWC in place. A convolution whose weight is
    channels_last produces channels_last output (cuDNN and oneDNN follow the weight or the input), so
    the format propagates through the network without touching the inputs."""
    for m in modules:
        if m is not None:
            m.to(memory_format=torch.channels_last)


def images_channels_last(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """(B, C, H, W) input in NHWC when `enabled` (one copy, instead of one inside the first conv)."""
    return x.contiguous(memory_format=torch.channels_last) if enabled and x.ndim == 4 else x


def compile_regions(net: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a backbone: a DiT's `blocks`, a UNet's `down` stages, `mid` and `up` stages."""
    if isinstance(getattr(net, "blocks", None), nn.ModuleList):
        return list(net.blocks)
    if all(hasattr(net, a) for a in ("down", "mid", "up")):
        return [*net.down, net.mid, *net.up]
    raise ValueError(f"speed.compile_mode='blocks': {type(net).__name__} has no DiT `blocks` or UNet "
                     "`down`/`mid`/`up` stages; use compile_mode='model'")


def compile_network(net: nn.Module, enabled: bool, mode: str = "model", **compile_kwargs) -> nn.Module:
    """`torch.compile` in place (parameter names unchanged: checkpoints load either way): the whole
    forward ('model') or each block of `compile_regions` ('blocks'). Returns `net`."""
    if not enabled:
        return net
    regions = compile_regions(net) if mode == "blocks" else [net]
    if mode == "blocks":
        import torch._dynamo
        # UNet stages differ in structure but share one forward (Stage.forward): dynamo keeps one compiled
        # variant per code object up to `recompile_limit` (default 8) and runs the rest EAGERLY (measured:
        # the SD UNet's 25 stages hit it). Allow a variant per region (x2: train and eval/no-grad).
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, 2 * len(regions) + 8)
    for m in regions:
        m.compile(**compile_kwargs)
    return net


class MatmulPrecision:
    """Sets torch's float32 matmul precision for the duration of a fit and puts it back afterwards."""

    def __init__(self, tf32: bool):
        self.tf32, self._saved = tf32, None

    def enter(self, device: torch.device) -> None:
        if self.tf32 and device.type == "cuda" and self._saved is None:
            self._saved = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high")

    def exit(self) -> None:
        if self._saved is not None:
            torch.set_float32_matmul_precision(self._saved)
            self._saved = None


@torch.no_grad()
def ema_update_on_device(ema, model: nn.Module, ok: torch.Tensor) -> None:
    """`EMA.update` with its decay ramp computed on the device and no update where `ok` (0-dim) is 0."""
    n = ema.num_updates.float()
    if ema.warmup_steps > 0:
        decay = ema.decay * (n / ema.warmup_steps).clamp(max=1.0)
    else:
        decay = ((1 + n) / (10 + n)).clamp(max=ema.decay)
    weight = (1.0 - decay) * ok.float()  # 0 for a skipped step: the average stays
    ema_params = dict(ema.module.named_parameters())
    for name, p in model.named_parameters():
        e = ema_params[name]
        e.lerp_(p.detach().to(e.dtype), weight.to(e.dtype))
    ema_buffers = dict(ema.module.named_buffers())
    for name, b in model.named_buffers():
        ema_buffers[name].copy_(b)
    ema.num_updates += ok.long()


class SpeedLevers:
    """Mixin of the stage modules (before TrainingModule in the bases): applies `self.speed` (a
    SpeedConfig) for the duration of each fit/validate/test — TF32 on the trainer's CUDA device — and
    replaces the host-side non-finite guard by the device-side one under `speed.sync_free_guard`."""

    speed: SpeedConfig

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self._matmul_precision = MatmulPrecision(self.speed.tf32)
        self._matmul_precision.enter(self.trainer.strategy.root_device)

    def teardown(self, stage: str) -> None:
        precision = getattr(self, "_matmul_precision", None)
        if precision is not None:
            precision.exit()
        super().teardown(stage)

    # --- speed.sync_free_guard: the TrainingModule guard decided on the device -----------------------
    def _sync_free(self) -> bool:
        return self.speed.sync_free_guard and self.guard_cfg.enabled

    def guard_loss(self, loss: torch.Tensor, terms: dict):
        if not self._sync_free():
            return super().guard_loss(loss, terms)
        self._last_step_skipped = False  # the host does not know; the optimizer kernel decides
        self._loss_finite = torch.isfinite(loss.detach()).all()  # () bool, on the device
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        if not self._sync_free():
            return super().on_before_optimizer_step(optimizer)
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
        self._step_ok, self._loss_finite = ok, None
        self.nonfinite_skipped += (1.0 - ok).long()
        self.nonfinite_consecutive.add_(1).mul_((1.0 - ok).long())  # +1 on a skip, 0 after a good step

    def update_ema(self) -> None:
        if not self._sync_free():
            return super().update_ema()
        ok = getattr(self, "_step_ok", None)
        if self.ema is not None and ok is not None and not self._ema_updated_this_batch:
            ema_update_on_device(self.ema, getattr(self, self._ema_target_name), ok)
        self._ema_updated_this_batch = True

    def on_train_start(self) -> None:
        super().on_train_start()
        self._reported_skipped = int(self.nonfinite_skipped)  # once, after a resume restored the counters

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self._sync_free() and is_logging_step(self):
            self.check_guard_counters()

    def on_train_end(self) -> None:
        if self._sync_free():
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
            saved = self._save_nonfinite_stop()
            raise NonFiniteLossError(
                f"{msg}. Stopped after {run} consecutive non-finite steps (guard.max_consecutive="
                f"{self.guard_cfg.max_consecutive}); saved {saved}. Resume from it with a lower learning rate "
                "(--model.init_args.optim.lr), gradient clipping (--trainer.gradient_clip_val), or after checking "
                "the data for bad samples.")
