"""torch.compile vs eager: training step time of the same network (fwd + bwd + AdamW).

    python benchmarks/bench_compile.py [--width 256] [--depth 4] [--tokens 64] [--batch 16] [--bf16]

Compilation goes through `ldm_lightning.training.speed.compile_network` (in-place `module.compile()`,
what both stages use behind their `compile` flag). Reports the cold compile time (first steps) and the
median warm step time of each, and the speedup. A small pre-norm transformer block stack stands in for
the DiT/UNet attention blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch import nn

from ldm_lightning.training.speed import compile_network


class Block(nn.Module):
    def __init__(self, d: int, heads: int = 4):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))

    def forward(self, x):  # (B, T, D)
        h = self.n1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.n2(x))  # (B, T, D)


def run(net, x, steps, bf16):
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with ctx:
            loss = net(x).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    x = torch.randn(a.batch, a.tokens, a.width, device=a.device)
    result = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(*[Block(a.width) for _ in range(a.depth)]).to(a.device)
        for blk in net:
            compile_network(blk, compiled)
        t = run(net, x, a.warmup + a.steps, a.bf16)
        result[compiled] = (sum(t[:a.warmup]), statistics.median(t[a.warmup:]))
    (c_e, e), (c_c, c) = result[False], result[True]
    print(f"device={a.device} bf16={a.bf16} width={a.width} depth={a.depth} tokens={a.tokens} batch={a.batch}")
    print(f"eager     first {a.warmup} steps {c_e:7.2f} s   median step {e * 1e3:8.2f} ms")
    print(f"compiled  first {a.warmup} steps {c_c:7.2f} s   median step {c * 1e3:8.2f} ms")
    print(f"speedup (eager / compiled median step) = {e / c:.2f}x")


if __name__ == "__main__":
    main()
