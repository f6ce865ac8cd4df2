"""JiT's block vs DiT's block on MNIST 32² pixels (issue 30), both x-prediction + v-loss, at patch 4 and 8 and the
same training budget. Prints a markdown table.

    python benchmarks/bench_jit_block_mnist.py --steps 800 --batch 32 --num 100   # the docs' table
    # (run there as two processes, --blocks dit and --blocks jit, side by side: the same rows, half the wall time)

Every row is configs/diffusion/mnist-jit-pixels.yaml (identity autoencoder, bottleneck patch embedding, QK-norm,
x-pred + v-loss, logit-normal(+0.8, 0.8) noise levels) with only the block options changed:

- DiT block: AdaLN-Zero, GELU MLP, LayerNorm, fixed sin-cos positions only, the class in AdaLN only;
- JiT block: the same plus SwiGLU MLP (2/3 width: same parameter count), RMSNorm, 2-D RoPE on the image tokens and
  `--class-tokens` in-context class tokens joining before block `--class-tokens-start` (JiT-B: 32 tokens before
  block 4 of 12 on 256 image tokens; here 8 before block 1 of 4 on 64 (patch 4) or 16 (patch 8) image tokens).

Training, sampling and scoring are bench_methods_mnist.py's (same seed, data, sampler, noise; MNIST classifier
accuracy and MNIST-FID against 2000 test images; FID is biased upwards at small N: compare rows within one run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_methods_mnist import MNISTBatches, config_kwargs, generate, scores, train  # noqa: E402

DIT_BLOCK = {"mlp": "gelu", "norm": "layernorm", "rope": False, "class_tokens": 0, "class_tokens_start": 0}


def jit_block(tokens: int, start: int) -> dict:
    return {"mlp": "swiglu", "norm": "rmsnorm", "rope": True, "class_tokens": tokens, "class_tokens_start": start}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per row")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--num", type=int, default=100, help="samples per row (10 per class at 100)")
    p.add_argument("--sampler", default="flow_euler")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--class-tokens", type=int, default=8)
    p.add_argument("--class-tokens-start", type=int, default=1)
    p.add_argument("--blocks", default="dit,jit", help="rows to run (dit, jit): one process per block halves the "
                   "wall time on a shared machine; rows are deterministic, so the tables join")
    p.add_argument("--patches", default="4,8")
    p.add_argument("--train-limit", type=int, default=20000, help="MNIST train images held in memory")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the shared CPU machine: 1)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from ldm_lightning.encoders.mnist_classifier_cache import get_or_train_classifier
    from ldm_lightning.encoders.mnist_data import load_mnist_32
    from ldm_lightning.evaluation.mnist_metrics import mnist_fid
    clf = get_or_train_classifier(verbose=False)
    x, y = load_mnist_32("train", limit=a.train_limit)
    real, _ = load_mnist_32("test", limit=2000)
    data = MNISTBatches(x, y)
    t0 = time.perf_counter()
    print(f"MNIST 32² pixels, depth 4, {a.steps} steps x batch {a.batch} per row, {a.num} samples ({a.sampler} "
          f"{a.sample_steps} steps, CFG {a.cfg}, seed 0), torch threads {a.threads}; FID vs 2000 test images; "
          f"real floor at N={a.num}: {mnist_fid(clf, x[:a.num], real):.2f}\n")
    print("| block (x-pred + v-loss) | patch | width | parameters | class accuracy | MNIST-FID | s/step |")
    print("|---|---|---|---|---|---|---|")
    jit = jit_block(a.class_tokens, a.class_tokens_start)
    sizes = {4: {"hidden_size": 64}, 8: {"patch_size": 8, "hidden_size": 32, "num_heads": 2}}
    blocks = {"dit": ("DiT (AdaLN-Zero, GELU, LayerNorm)", DIT_BLOCK),
              "jit": (f"JiT (SwiGLU, RMSNorm, RoPE, {a.class_tokens} class tokens from block {a.class_tokens_start})",
                      jit)}
    for patch, size in ((int(q), sizes[int(q)]) for q in a.patches.split(",")):
        for label, block in (blocks[b] for b in a.blocks.split(",")):
            kw = config_kwargs("mnist-jit-pixels", backbone_config={**size, **block})
            module, sps = train(kw, data, a.steps, a.batch)
            n_params = sum(q.numel() for q in module.denoiser.backbone.parameters())
            acc, fid = scores(clf, generate(module, a.num, a.sampler, a.sample_steps, a.cfg), real)
            print(f"| {label} | {patch} | {size['hidden_size']} | {n_params / 1e3:.0f} k | {acc:.3f} | {fid:.2f} | "
                  f"{sps:.3f} |", flush=True)
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
