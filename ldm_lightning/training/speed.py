"""GPU throughput levers of both training stages, each its own flag (`model.init_args.speed.<field>`).

    ldm-lightning fit -c configs/diffusion/... --model.init_args.speed.channels_last true \
        --model.init_args.speed.compile_mode blocks --model.init_args.compile true

Every lever leaves the computed function unchanged (within dtype rounding; tests/test_gpu_levers.py
checks outputs and gradients on CPU); `sync_free_guard` changes only when the guard's warnings and stop
come (on logging steps), not which steps are skipped. Whether each one pays is a GPU question: `scripts/gpu_bench.sh`
measures every lever on and off in one table. Other levers live where they act: fused/foreach AdamW
(`optim.implementation`, training/base.py), the flash-friendly text mask (`conditioning.trim_padding`),
pinned host memory (`data.loader.pin_memory`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from ldm_lightning.choices import check_choices
from ldm_lightning.finite import check_finite_fields

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
        check_choices(self, "speed")


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
    """The repeated blocks of a backbone: a DiT's `blocks`, a UNet's `down` stages, `mid` and `up` stages (an SD
    UNet's down_blocks, mid_block, up_blocks)."""
    if isinstance(getattr(net, "blocks", None), nn.ModuleList):
        return list(net.blocks)
    if all(hasattr(net, a) for a in ("down", "mid", "up")):
        return [*net.down, net.mid, *net.up]
    if all(hasattr(net, a) for a in ("down_blocks", "mid_block", "up_blocks")):  # the SD UNet (diffusers' names)
        return [*net.down_blocks, net.mid_block, *net.up_blocks]
    raise ValueError(f"speed.compile_mode='blocks': {type(net).__name__} has no DiT `blocks` or UNet "
                     "`down`/`mid`/`up` (`down_blocks`/`mid_block`/`up_blocks`) stages; use compile_mode='model'")


def compile_network(net: nn.Module, enabled: bool, mode: str = "model", **compile_kwargs) -> nn.Module:
    """`torch.compile` in place when `enabled`: the whole forward ('model') or each block of `compile_regions`
    ('blocks'). Returns `net`, the same object. The one compile helper of both stages.

    `nn.Module.compile()` compiles the forward without wrapping the module in an `OptimizedModule`, so
    parameter names — and thus checkpoint keys — stay identical: a checkpoint of a compiled run loads into
    an uncompiled model and back (no `_orig_mod.` prefixes; Lightning issue #17415)."""
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


class SpeedLevers:
    """Mixin of the stage modules (before TrainingModule in the bases): applies `self.speed` (a
    SpeedConfig) for the duration of each fit/validate/test — TF32 on the trainer's CUDA device — and
    tells the non-finite guard to decide on the device under `speed.sync_free_guard`."""

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

    @property
    def sync_free_guard(self) -> bool:
        """The non-finite guard (training/nonfinite_guard.py) decides on the device under `speed.sync_free_guard`."""
        return self.speed.sync_free_guard
