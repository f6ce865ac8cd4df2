"""Stage-1 train-step throughput (img/s) and peak memory: presets x {eager, torch.compile}.

    python benchmarks/bench_autoencoder.py --quick              # CPU, a few minutes
    python benchmarks/bench_autoencoder.py --presets tiny-mnist kl-f8 --batch 8 --size 256 --steps 20

One step = forward + the full stage-1 loss (L1 + KL + PatchGAN with adaptive weight, no LPIPS: its
VGG weights are not available offline) + backward + AdamW step, exactly AutoencoderModule's graph.
Peak memory: torch.cuda.max_memory_allocated on CUDA; process RSS peak (ru_maxrss) on CPU, which
is monotone over the process, so the CPU column is "peak so far" and rows are run smallest first.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from ldm_lightning.autoencoder import Autoencoder, get_preset
from ldm_lightning.autoencoder.loss import AutoencoderLoss, LossConfig


def bench(preset: str, batch: int, size: int, steps: int, warmup: int, compile_: bool, device: str,
          dtype: torch.dtype | None) -> dict:
    torch.manual_seed(0)
    cfg = get_preset(preset)
    ae = Autoencoder(cfg).to(device)
    loss_mod = AutoencoderLoss(LossConfig(perceptual_weight=0.0, disc_start=0, disc_layers=2 if size <= 64 else 3),
                               cfg.in_channels).to(device)
    opt = torch.optim.AdamW(list(ae.parameters()) + list(loss_mod.parameters()), lr=1e-5)
    if compile_:
        torch._dynamo.reset()  # fresh caches per preset: no recompiles with dynamic shapes across rows
    fwd = torch.compile(ae, dynamic=False) if compile_ else ae
    x = torch.rand(batch, cfg.in_channels, size, size, device=device) * 2 - 1

    gen = torch.Generator(device)  # one object: a new Generator per call would fail dynamo's guards (recompile)

    def step():
        gen.manual_seed(0)
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            recon, post = fwd(x, generator=gen)
            loss, _ = loss_mod(x, recon, post, 1, ae.last_layer)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    for _ in range(warmup):  # includes compilation
        step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    warm_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = time.perf_counter() - t0
    mem = (torch.cuda.max_memory_allocated() if device == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"preset": preset, "mode": "compile" if compile_ else "eager", "img_s": batch * steps / dt,
            "step_ms": 1000 * dt / steps, "warmup_s": warm_s, "peak_mib": mem / 2 ** 20,
            "params_m": sum(p.numel() for p in ae.parameters()) / 1e6}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny-mnist", "kl-f8"])
    p.add_argument("--batch", type=int, default=None, help="default: 16 tiny / 2 others (CPU), 64 / 8 (CUDA)")
    p.add_argument("--size", type=int, default=None, help="default: 32 tiny; 256 others (64 with --quick)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--quick", action="store_true", help="CPU smoke: 3 steps, kl-f8 at 64x64 batch 1")
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.quick:
        a.steps, a.warmup = 3, 2
    rows = []
    for preset in a.presets:
        tiny = preset == "tiny-mnist"
        size = a.size or (32 if tiny else (64 if a.quick else 256))
        batch = a.batch or ((64 if device == "cuda" else 16) if tiny else (8 if device == "cuda" else (1 if a.quick else 2)))
        for comp in ([False] if a.no_compile else [False, True]):
            try:
                r = bench(preset, batch, size, a.steps, a.warmup, comp, device, torch.bfloat16 if a.bf16 else None)
            except Exception as err:  # report the row as failed, keep the table
                print(f"  {preset} {'compile' if comp else 'eager'} FAILED: {type(err).__name__}: {str(err)[:200]}")
                continue
            r.update(batch=batch, size=size)
            rows.append(r)
            print(f"  {preset} {r['mode']}: {r['img_s']:.2f} img/s", flush=True)
    print(f"\ndevice={device} torch={torch.__version__} threads={torch.get_num_threads()} bf16={a.bf16}")
    print(f"{'preset':<12}{'params(M)':>10}{'batch':>6}{'size':>6}{'mode':>9}{'img/s':>10}{'ms/step':>10}"
          f"{'warmup s':>10}{'peak MiB':>10}{'vs eager':>9}")
    eager = {r["preset"]: r["img_s"] for r in rows if r["mode"] == "eager"}
    for r in rows:
        print(f"{r['preset']:<12}{r['params_m']:>10.2f}{r['batch']:>6}{r['size']:>6}{r['mode']:>9}{r['img_s']:>10.2f}"
              f"{r['step_ms']:>10.1f}{r['warmup_s']:>10.1f}{r['peak_mib']:>10.0f}{r['img_s'] / eager[r['preset']]:>8.2f}x")


if __name__ == "__main__":
    main()
