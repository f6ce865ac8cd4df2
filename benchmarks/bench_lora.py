"""LoRA vs full fine-tuning of a DiT, one run each: trainable parameters, checkpoint size, training-step time.

    python benchmarks/bench_lora.py [--backbone DiT-S/2] [--rank 16] [--steps 12] [--batch 4] [--device cpu|cuda]

Both runs are `DiffusionModule` + Lightning `Trainer.fit` on the same random 32x32x4 "latents" (the weightless
identity autoencoder at 4 x 32: the shape of SD-VAE latents of 256 px images), class-conditional (1000 classes),
fp32. The full run starts from a random init and its checkpoint is then the LoRA run's `init_from`. Step time is
the median over the steps after the first two (warm-up); checkpoint size is Lightning's .ckpt of the final step
(weights, EMA, optimizer state). Prints one JSON line with both runs and the LoRA / full ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ldm_lightning.diffusion.module import DiffusionModule


class RandomImages(Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 4, 32, 32, generator=g) * 2 - 1
        self.y = torch.randint(0, 1000, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "cls": self.y[i]}


class StepTimer(L.Callback):
    def __init__(self):
        self.times, self._t0 = [], 0.0

    def on_train_batch_start(self, trainer, module, batch, idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t0)


def run(root: Path, name: str, args, **module_kw) -> dict:
    module = DiffusionModule(autoencoder="identity:4x32", backbone=args.backbone, val_num=0, loss_bins=0,
                             conditioning={"kind": "class", "num_classes": 1000}, schedule={"kind": "vp",
                             "beta_schedule": "linear"}, **module_kw)
    timer = StepTimer()
    trainer = L.Trainer(max_steps=args.steps, accelerator=args.device, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer], default_root_dir=root / name)
    trainer.fit(module, DataLoader(RandomImages(args.steps * args.batch), batch_size=args.batch))
    ckpt = root / f"{name}.ckpt"
    trainer.save_checkpoint(ckpt)
    return {"trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in module.denoiser.parameters()),
            "checkpoint_mb": round(ckpt.stat().st_size / 2 ** 20, 2),
            "step_s_median": round(statistics.median(timer.times[2:]), 4), "ckpt": str(ckpt)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="DiT-S/2")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        full = run(root, "full", args)
        lora = run(root, "lora", args, init_from=full["ckpt"], lora={"rank": args.rank})
    ratio = {k: round(lora[k] / full[k], 4) for k in ("trainable_params", "checkpoint_mb", "step_s_median")}
    for r in (full, lora):
        r.pop("ckpt")
    print(json.dumps({"backbone": args.backbone, "rank": args.rank, "batch": args.batch, "steps": args.steps,
                      "device": args.device, "full": full, "lora": lora, "lora_over_full": ratio}))


if __name__ == "__main__":
    main()
