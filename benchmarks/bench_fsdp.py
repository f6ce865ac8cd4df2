"""Per-rank memory of FSDP2 vs DDP on the same model, through `ldm-lightning fit` (2 CPU processes, gloo).

    python benchmarks/bench_fsdp.py [--shards data/mnist/train] [--hidden 384 --depth 8 --steps 3]
    python benchmarks/bench_fsdp.py --stage autoencoder [--ae-ch 96]

Each run is `ldm-lightning fit -c configs/diffusion/mnist-jit-pixels.yaml` with a wider DiT, once with
`--trainer.strategy ddp` and once with `-c configs/trainer/fsdp2.yaml`, both fp32 on the CPU accelerator, with
`MemoryProbe` (below) added as a callback. Per rank it records:
  * tracked bytes: the storage this rank holds for parameters (the trained ones and the EMA copy), their
    gradients and the AdamW state, read just before the last optimizer step (sharded DTensors: the local shard);
  * RSS of the rank's process just before the last optimizer step (/proc/self/statm), and its peak (ru_maxrss):
    everything, including torch/Lightning (~1 GiB here) and activations; the peak includes the full model each
    rank builds on the CPU before `configure_model` shards it (no meta-device init).
Prints one table row per strategy and the FSDP2/DDP ratios (README "Scale-out", docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]


def local_bytes(t) -> int:
    if t is None:
        return 0
    t = getattr(t, "_local_tensor", t)  # a DTensor: this rank's shard
    return t.numel() * t.element_size()


class MemoryProbe(Callback):
    """Writes this rank's tracked bytes and peak RSS to $BENCH_FSDP_OUT/rank<k>.json at the end of training."""

    def __init__(self):
        self.tracked: dict[str, int] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = list(pl_module.parameters())
        state = getattr(optimizer, "_optimizer", optimizer).state
        self.tracked = {
            "params": sum(local_bytes(p) for p in params if p.requires_grad),
            "ema": sum(local_bytes(p) for p in params if not p.requires_grad),
            "grads": sum(local_bytes(p.grad) for p in params),
            "optimizer": sum(local_bytes(v) for s in state.values() for v in s.values() if hasattr(v, "numel")),
            "rss_at_step": int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE"),
        }

    def on_train_end(self, trainer, pl_module) -> None:
        out = Path(os.environ["BENCH_FSDP_OUT"])
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({**self.tracked, "peak_rss": rss}))


def run(strategy: str, args, work: Path) -> list[dict]:
    out = work / strategy
    out.mkdir(parents=True)
    trainer = (["-c", str(REPO / "configs/trainer/fsdp2.yaml")] if strategy == "fsdp2"
               else ["-c", str(REPO / "configs/trainer/cpu-debug.yaml"), "--trainer.strategy", "ddp"])
    if args.stage == "autoencoder":  # tiny-mnist widened to --ae-ch, the GAN (discriminator) on from step 0
        stage = ["-c", str(REPO / "configs/autoencoder/tiny-mnist.yaml"),
                 "--model.init_args.autoencoder", json.dumps({"ch": args.ae_ch, "norm_groups": 8}),
                 "--model.init_args.loss.disc_start", "0", "--model.init_args.scale_batches", "1",
                 "--trainer.limit_val_batches", "0"]
    else:
        backbone = json.dumps({"patch_size": 4, "hidden_size": args.hidden, "depth": args.depth, "num_heads": 4})
        stage = ["-c", str(REPO / "configs/diffusion/mnist-jit-pixels.yaml"),
                 "--model.init_args.backbone_config", backbone, "--model.init_args.val_num", "0"]
    cmd = [sys.executable, "-m", "ldm_lightning", "fit", *stage,
           *trainer, "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true",
           "--trainer.max_steps", str(args.steps), "--trainer.logger", "false",
           "--trainer.default_root_dir", str(out / "run"), "--trainer.callbacks+=bench_fsdp.MemoryProbe",
           "--data.init_args.train_shards", args.shards, "--data.init_args.val_shards", args.shards,
           "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0"]
    # MALLOC_MMAP_THRESHOLD_: large tensors always mmapped, so memory freed (the full model each rank builds
    # before sharding) goes back to the OS and RSS shows what is live, not what glibc's heap kept.
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", **os.environ, "BENCH_FSDP_OUT": str(out), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(REPO / "benchmarks"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{strategy} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", default=None,
                   help="MNIST image shards (ldm-lightning data pack --source mnist); default: 200 images packed here")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--stage", choices=("diffusion", "autoencoder"), default="diffusion",
                   help="autoencoder: configs/autoencoder/tiny-mnist.yaml with base width --ae-ch and the GAN on")
    p.add_argument("--ae-ch", type=int, default=96)
    args = p.parse_args(argv)
    mib = 1 << 20
    with tempfile.TemporaryDirectory() as tmp:
        if args.shards is None:
            from ldm_lightning.data import pack
            args.shards = str(Path(tmp) / "mnist")
            pack.main(["--source", "mnist", "--split", "train", "--out", args.shards, "--limit", "200",
                       "--samples-per-shard", "100", "--no-progress"])
        results = {s: run(s, args, Path(tmp)) for s in ("ddp", "fsdp2")}
    model = (f"tiny-mnist autoencoder, ch {args.ae_ch}, GAN on" if args.stage == "autoencoder"
             else f"DiT hidden {args.hidden}, depth {args.depth}")
    print(f"{model}, 2 CPU ranks (gloo), fp32, {args.steps} steps; per rank (max of 2):")
    print("| strategy | params | EMA | grads | AdamW state | tracked total | RSS at last step | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    totals = {}
    for s, ranks in results.items():
        worst = {k: max(r[k] for r in ranks) for k in ranks[0]}
        total = worst["params"] + worst["ema"] + worst["grads"] + worst["optimizer"]
        totals[s] = (total, worst["rss_at_step"], worst["peak_rss"])
        print(f"| {s} | {worst['params'] / mib:.1f} MiB | {worst['ema'] / mib:.1f} MiB | {worst['grads'] / mib:.1f} MiB | "
              f"{worst['optimizer'] / mib:.1f} MiB | {total / mib:.1f} MiB | {worst['rss_at_step'] / mib:.0f} MiB | "
              f"{worst['peak_rss'] / mib:.0f} MiB |")
    ratio = [f / d for f, d in zip(totals["fsdp2"], totals["ddp"])]
    for name, value in zip(("tracked bytes (params + EMA + grads + AdamW)", "RSS at the last step", "peak RSS"), ratio):
        print(f"ratio FSDP2 / DDP per rank, {name} = {value:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
