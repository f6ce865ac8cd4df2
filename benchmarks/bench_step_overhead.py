"""Lightning training-step overhead vs a plain PyTorch loop, same model, batch, optimizer and step count.

    python benchmarks/bench_step_overhead.py [--steps 60] [--width 256] [--batch 32] [--device cpu|cuda]

Both loops: AdamW step on a small conv net over one fixed in-memory batch (no data loading, so the
ratio isolates the trainer's per-step cost: hooks, logging, progress, the step-time telemetry).
Target: Lightning / plain <= 1.05. Prints both median step times and the ratio (measured, never assumed).
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


def make_net(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.SiLU(), nn.Conv2d(width, 3, 3, padding=1))


class Repeat(Dataset):
    def __init__(self, x, n):
        self.x, self.n = x, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return 0


class Module(L.LightningModule):
    def __init__(self, net, x):
        super().__init__()
        self.net, self.x, self.times = net, x, []

    def training_step(self, _, __):
        return (self.net(self.x) - self.x).pow(2).mean()

    def on_train_batch_start(self, *_):
        # start-to-start: the step AND everything Lightning does between steps (hooks, loop, fetch)
        if self.x.is_cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def plain(net, x, steps):
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = (net(x) - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()  # Lightning reads the loss every step (progress/logging): same sync here
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def lightning_wall(net, x, steps, device):
    """Whole-loop wall time per step (includes everything between steps, not only the step body)."""
    module = Module(net, x)
    trainer = L.Trainer(accelerator=device, devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    loader = DataLoader(Repeat(x, steps), batch_size=1)
    t = time.perf_counter()
    trainer.fit(module, loader)
    return (time.perf_counter() - t) / steps, module.times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(a.batch, 3, a.size, a.size, device=a.device)
    warm = 5
    t_plain = plain(make_net(a.width).to(a.device), x, a.steps + warm)[warm:]
    wall_plain = sum(t_plain) / len(t_plain)
    wall_l, t_l = lightning_wall(make_net(a.width).to(a.device), x, a.steps + warm, a.device)
    t_l = [b - a for a, b in zip(t_l[warm:], t_l[warm + 1:])]
    med_p, med_l = statistics.median(t_plain), statistics.median(t_l)
    print(f"device={a.device} width={a.width} batch={a.batch} size={a.size} steps={a.steps}")
    print(f"plain PyTorch   median step {med_p * 1e3:8.2f} ms   mean {wall_plain * 1e3:8.2f} ms")
    print(f"Lightning       median step {med_l * 1e3:8.2f} ms   wall/step (incl. loop, fit setup) {wall_l * 1e3:8.2f} ms")
    print(f"ratio (median start-to-start step, Lightning / plain) = {med_l / med_p:.3f}   (target <= 1.05)")


if __name__ == "__main__":
    main()
