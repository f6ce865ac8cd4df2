"""GPU throughput of the stage-2 training step with each speed lever on and off, in one table.

    bash scripts/gpu_bench.sh                  # all models, all rows (sized for < 8 min on one H100/H200; untimed)
    python benchmarks/gpu_bench.py --models DiT-B/2 --steps 10
    python benchmarks/gpu_bench.py --dry-run   # CPU: build every configuration, one tiny step each

Models (bf16, 32x32x4 latents = 256 px with an f8 autoencoder, precomputed latents as fast-DiT measures):
DiT-B/2 and DiT-XL/2 class-conditional (1000 classes), the SD-1.x-sized UNet with 77x768 text context.
Each row is one training step as `DiffusionModule` runs it between logging steps (objective, the
non-finite guard's two host checks, AdamW, EMA; per-timestep-bin losses are computed on logging steps
only), timed after warm-up with the device synchronised:

  eager           the reference row: bf16 autocast, fused AdamW (optim.implementation auto on CUDA), TF32
                  for fp32 work (speed.tf32), no compile
  fb-DiT          the facebookresearch/DiT train.py recipe: fp32 with TF32 matmuls (its train.py sets
                  allow_tf32), torch's default AdamW, no compile, no guard
  eager tf32=off  the same fp32 recipe with TF32 off: what speed.tf32 buys fp32 work
  eager -fused    foreach AdamW (optim.implementation=foreach)
  eager -guard    without the guard's two host syncs per step: the most speed.sync_free_guard can buy
  eager +chlast   channels_last (speed.channels_last; the convolutional UNet only)
  eager +mask     a text key-padding mask in every cross-attention, half the captions padded (what
                  conditioning.trim_padding removes when no caption is padded): the mask rules out flash
  compile=model   whole-model torch.compile (compile: true);  compile=blocks: regional compile of each
                  DiT block / UNet stage (speed.compile_mode=blocks); warm-up s includes the compile

MFU = images/s x training FLOPs per image / peak dense bf16 FLOP/s of the device (ldm_lightning/
training/flops.py table, datasheet sources there; fp32 rows are still divided by the bf16 peak).
FLOPs per image: 2 x multiply-adds, forward x 3 for training; the DiT counts its adaLN path once per
image (DiT.flops_per_image), the UNet's is counted by torch's FlopCounterMode on the meta device.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field, replace

import torch

from ldm_lightning.diffusion.denoiser import Denoiser
from ldm_lightning.diffusion.loss import DiffusionObjective, ObjectiveConfig
from ldm_lightning.diffusion.presets import build_backbone
from ldm_lightning.diffusion.schedules import build_schedule
from ldm_lightning.nn.ema import EMA
from ldm_lightning.training.base import adamw_kernel_kwargs
from ldm_lightning.training.flops import count_flops, peak_flops
from ldm_lightning.training.speed import compile_network, compile_regions, to_channels_last

# (preset, backbone overrides, batch per GPU, conditioning) of the real models; tiny stand-ins for --dry-run
MODELS = {
    "DiT-B/2": ("DiT-B/2", dict(num_classes=1000, input_size=32), 256, "class"),
    "DiT-XL/2": ("DiT-XL/2", dict(num_classes=1000, input_size=32), 128, "class"),
    "UNet-SD": ("unet-sd15", dict(), 64, "text"),
}
TINY = {
    "DiT-B/2": ("DiT-B/2", dict(num_classes=1000, input_size=8, depth=2, hidden_size=64, num_heads=2), 2, "class"),
    "DiT-XL/2": ("DiT-XL/2", dict(num_classes=1000, input_size=8, depth=2, hidden_size=64, num_heads=2), 2, "class"),
    "UNet-SD": ("unet-sd15", dict(model_channels=16, channel_mult=(1, 2), attention_levels=(1,), head_dim=16,
                                  norm_groups=8, context_dim=16, num_res_blocks=1), 2, "text"),
}
# facebookresearch/DiT models.py with learn_sigma=True (8 output channels) has a frozen nn.Parameter
# pos_embed; ours is a buffer and learn_sigma is off. Published DiT-XL/2: 675,129,632 parameters.
DIT_XL2_PARAMS = 675_129_632 - 256 * 1152 - (1152 * 2 * 2 * 4 + 2 * 2 * 4)
TEXT_LEN, TEXT_DIM = 77, 768


@dataclass(frozen=True)
class Levers:
    bf16: bool = True
    optim: str = "fused"
    compile: str = "model"  # off | model | blocks
    tf32: bool = True
    channels_last: bool = False
    mask: bool = False
    guard: bool = True  # the TrainingModule's non-finite guard (host checks of loss and grad norm)


# The eager levers are measured against `eager` (no compile: one compile per row would not fit 8 minutes);
# compile's two modes against it too. Ratios are images/s over the `eager` row's.
EAGER = Levers(compile="off")
ROWS: list[tuple[str, Levers, tuple[str, ...]]] = [  # (row name, levers, families it applies to)
    ("eager", EAGER, ("dit", "unet")),
    ("fb-DiT", Levers(bf16=False, optim="auto", compile="off", tf32=True, guard=False), ("dit",)),
    ("eager tf32=off", replace(EAGER, bf16=False, optim="auto", tf32=False, guard=False), ("dit",)),
    ("eager -fused", replace(EAGER, optim="foreach"), ("dit", "unet")),
    ("eager -guard", replace(EAGER, guard=False), ("dit", "unet")),
    ("eager +chlast", replace(EAGER, channels_last=True), ("unet",)),
    ("eager +mask", replace(EAGER, mask=True), ("unet",)),
    ("compile=model", replace(EAGER, compile="model"), ("dit", "unet")),
    ("compile=blocks", replace(EAGER, compile="blocks"), ("dit", "unet")),
]


@dataclass
class Run:
    net: Denoiser
    step: callable
    batch: int
    flops_per_image: float
    params: int
    info: dict = field(default_factory=dict)


_FLOPS: dict[str, tuple[float, int]] = {}


def training_flops_per_image(preset: str, overrides: dict, cond: str) -> tuple[float, int]:
    """(training FLOPs per image, parameter count) of a configuration, built on the meta device."""
    key = repr((preset, sorted(overrides.items()), cond))
    if key not in _FLOPS:
        _FLOPS[key] = _count(preset, overrides, cond)
    return _FLOPS[key]


def _count(preset: str, overrides: dict, cond: str) -> tuple[float, int]:
    with torch.device("meta"):
        net = build_backbone(preset, **overrides)
        params = sum(p.numel() for p in net.parameters())
        if hasattr(net, "flops_per_image"):
            return net.flops_per_image(training=True), params
        x, t = torch.zeros(1, 4, 32, 32), torch.ones(1)
        kw = {"context": torch.zeros(1, TEXT_LEN, overrides.get("context_dim", TEXT_DIM))} if cond == "text" else {}
        return 3.0 * count_flops(net, x, t, **kw), params


def build(name: str, lv: Levers, device: torch.device, tiny: bool) -> Run:
    preset, overrides, batch, cond = (TINY if tiny else MODELS)[name]
    torch.manual_seed(0)
    net = build_backbone(preset, **overrides).to(device)
    family = "unet" if preset.startswith("unet") else "dit"
    if lv.channels_last:
        to_channels_last(net)
    schedule = build_schedule("vp")
    denoiser = Denoiser(net, schedule, "eps")
    objective = DiffusionObjective(ObjectiveConfig(), schedule)
    ema = EMA(denoiser, 0.9999)
    if lv.compile != "off":
        if tiny:  # dry run: check the regions exist; compiling is tests/test_gpu_levers.py's job (slow on CPU)
            compile_regions(net) if lv.compile == "blocks" else None
        else:
            compile_network(net, True, lv.compile)
    params = list(denoiser.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, **adamw_kernel_kwargs(lv.optim, params))
    size = overrides.get("input_size", 8 if tiny else 32) if family == "dit" else (8 if tiny else 32)
    g = torch.Generator(device).manual_seed(0)
    moments = torch.randn(batch, 8, size, size, device=device, generator=g)  # (B, 2c, h, w) latent-shard moments
    if cond == "class":
        cond_kw = {"y": torch.randint(0, 1000, (batch,), device=device, generator=g)}
    else:
        ctx_dim = overrides.get("context_dim", TEXT_DIM)
        mask = torch.ones(batch, TEXT_LEN, dtype=torch.bool, device=device)
        mask[: batch // 2, TEXT_LEN // 2:] = False  # half the captions padded: a real key-padding mask
        cond_kw = {"context": torch.randn(batch, TEXT_LEN, ctx_dim, device=device, generator=g),
                   "context_mask": mask if lv.mask else None}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if lv.bf16 else contextlib.nullcontext()

    def step(i: int):
        gen = torch.Generator(device).manual_seed(i)
        mean, logvar = moments.chunk(2, dim=1)
        z0 = (mean + (0.5 * logvar.clamp(-30, 20)).exp() * torch.randn(mean.shape, generator=gen, device=device))
        z0 = z0 * 0.18215  # (B, 4, h, w)
        with autocast:
            out = objective.loss(denoiser, z0, cond_kw, gen)
        loss = out.loss.mean()
        if lv.guard and not bool(torch.isfinite(loss.detach()).item()):
            return
        loss.backward()
        if lv.guard:
            norm = torch.stack([p.grad.detach().float().norm() for p in params if p.grad is not None]).sum()
            if not bool(torch.isfinite(norm).item()):
                opt.zero_grad(set_to_none=True)
                return
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(denoiser)
        return loss

    fpi, n_params = training_flops_per_image(preset, overrides, cond)
    return Run(denoiser, step, batch, fpi, n_params, {"family": family})


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, lv: Levers, device: torch.device, tiny: bool, warmup: int, steps: int) -> dict:
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if lv.tf32 else "highest")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        run = build(name, lv, device, tiny)
        t0 = time.perf_counter()
        for i in range(warmup):
            run.step(i)
        sync(device)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(steps):
            run.step(warmup + i)
        sync(device)
        dt = (time.perf_counter() - t0) / steps
    finally:
        torch.set_float32_matmul_precision(prev)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    ims = run.batch / dt
    pk = peak_flops() if device.type == "cuda" else None
    result = {"images_s": ims, "step_ms": dt * 1e3, "peak_gb": peak, "warmup_s": first, "params": run.params,
              "gflops_img": run.flops_per_image / 1e9, "mfu": ims * run.flops_per_image / pk if pk else float("nan"),
              "batch": run.batch}
    del run
    return result


def h2d_copy(device: torch.device, tiny: bool, repeats: int = 5) -> None:
    """data.loader.pin_memory: a uint8 image batch (256 x 3 x 256 x 256; tiny in the dry run) to the device with
    non_blocking=True, as Lightning copies it, pageable vs pinned: how long the host is blocked (a pinned
    copy returns at once and overlaps the step) and the end-to-end copy rate."""
    shape = (2, 3, 16, 16) if tiny else (256, 3, 256, 256)
    for pinned in (False, True):
        if pinned and device.type != "cuda":
            print("  pinned: skipped (no CUDA: torch cannot page-lock memory here)")
            continue
        x = torch.randint(0, 256, shape, dtype=torch.uint8)
        x = x.pin_memory() if pinned else x
        blocked, total = [], []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            y = x.to(device, non_blocking=True)
            t1 = time.perf_counter()
            sync(device)
            blocked.append(t1 - t0)
            total.append(time.perf_counter() - t0)
        del y
        b, t = sorted(blocked)[repeats // 2], sorted(total)[repeats // 2]
        print(f"  {'pinned  ' if pinned else 'pageable'} host blocked {b * 1e3:7.2f} ms   copy {t * 1e3:7.2f} ms "
              f"({x.numel() / t / 1e9:6.1f} GB/s)")


def rows_for(name: str):
    family = "unet" if MODELS[name][0].startswith("unet") else "dit"
    return [(row, lv) for row, lv, fams in ROWS if family in fams]


def check_real_configs() -> None:
    """Build the real configurations on the meta device: parameter counts against the published ones."""
    for name, (preset, overrides, _, cond) in MODELS.items():
        fpi, n = training_flops_per_image(preset, overrides, cond)
        print(f"  {name:9s} {n / 1e6:8.2f} M params  {fpi / 3e9:7.1f} GFLOPs/img forward (2xMACs)")
        if name == "DiT-XL/2" and n != DIT_XL2_PARAMS:
            raise SystemExit(f"DiT-XL/2 has {n} parameters, expected {DIT_XL2_PARAMS} (facebookresearch/DiT "
                             "675,129,632 less its frozen pos_embed parameter and learn_sigma's 4 extra channels)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rows", nargs="+", default=None, help=f"subset of {[r for r, _, _ in ROWS]}")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (compile happens here)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny stand-ins, one step each: builds every row")
    args = ap.parse_args(argv)
    if args.dry_run:
        device, tiny, warmup, steps = torch.device("cpu"), True, 0, 1
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    else:
        if not torch.cuda.is_available():
            print("gpu_bench: no CUDA GPU visible (use --dry-run on CPU)", file=sys.stderr)
            return 2
        device, tiny, warmup, steps = torch.device("cuda"), False, args.warmup, args.steps
        print(f"gpu_bench: {torch.cuda.get_device_name()} (x{torch.cuda.device_count()} visible, this run uses 1), "
              f"torch {torch.__version__}, peak bf16 {peak_flops() and peak_flops() / 1e12} TFLOP/s")
    print("real configurations (meta device):")
    check_real_configs()
    header = (f"{'model':9s} {'row':15s} {'batch':>5s} {'img/s':>9s} {'step ms':>9s} {'vs eager':>8s} {'peak GB':>8s} "
              f"{'MFU':>6s} {'warm-up s':>9s}")
    print(header)
    print("-" * len(header))
    failures = 0
    for name in args.models:
        results = {}
        for row, lv in rows_for(name):
            if args.rows and row not in args.rows:
                continue
            try:
                results[row] = r = measure(name, lv, device, tiny, warmup, steps)
            except Exception as e:  # one failing row (e.g. out of memory) must not lose the table
                failures += 1
                print(f"{name:9s} {row:15s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            base = results.get("eager")
            ratio = f"{r['images_s'] / base['images_s']:.2f}x" if base else "-"
            print(f"{name:9s} {row:15s} {r['batch']:5d} {r['images_s']:9.1f} {r['step_ms']:9.1f} {ratio:>8s} "
                  f"{r['peak_gb']:8.1f} {r['mfu']:6.1%} {r['warmup_s']:9.1f}", flush=True)
    print("host->device copy of a uint8 batch, non_blocking=True (data.loader.pin_memory):")
    h2d_copy(device, tiny)
    if failures and not args.dry_run:
        print(f"gpu_bench: {failures} row(s) failed", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
