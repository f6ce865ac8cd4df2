"""Layout-to-image and semantic synthesis on MNIST canvases, measured with the MNIST classifier.

    python benchmarks/bench_layout_semantic.py --out runs/bench-layout [--steps 300] [--n 64]

Packs MNIST canvases (`ldm-lightning data pack --source mnist-canvas --class-maps`: train canvases, and test
canvases never seen in training), trains the two shipped configs (configs/diffusion/mnist-layout-pixels.yaml,
mnist-semantic-pixels.yaml) with `ldm-lightning fit` for --steps steps (plus the overrides given below), samples
the first --n test canvases' conditions exactly as `ldm-lightning sample` does (sample_images, seed 0), and scores:

- layout: for every box, the classifier's reading of the generated image inside the box (the crop, padded to a
  square, scaled to 20 px and centred on 28x28 like MNIST) against the box's class (accuracy), and the IoU of the
  box with the extent of the ink (pixels > 0 in [-1, 1]) in the box grown by 4 px each side.
- semantic: per region of the map (a digit's pixels), the classifier's reading of the generated image in the
  region's bounding box against the region's class (agreement), and the foreground IoU of the generated ink
  (pixels > 0) with the map's foreground (ids > 0).

Each is reported three ways: the real test canvases scored against their own conditions (what the measure gives
at best: the classifier on real crops), the samples against their own conditions, and the same samples against
the conditions of another canvas (rolled by one: a shuffled-layout / shuffled-map baseline, what a model that
ignores its condition scores).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm_lightning.data.canvas import compose_canvas  # noqa: E402
from ldm_lightning.data.mnist import load_mnist  # noqa: E402
from ldm_lightning.diffusion.concat import build_c_concat  # noqa: E402
from ldm_lightning.diffusion.sampling import SamplingConfig, load_pipeline  # noqa: E402


def cli(*args: str, log: Path) -> float:
    """Run `ldm-lightning ARGS` (this checkout) in a subprocess, output to `log`; its wall time."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "ldm_lightning", *args], env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"ldm-lightning {' '.join(args[:2])} failed (exit {r.returncode}); see {log}")
    return time.time() - t0


def crop_digit(img: torch.Tensor, x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
    """(H, W) in [-1, 1] -> (28, 28): the crop padded to a square (black), scaled to 20 px, centred (MNIST's way)."""
    c = img[y0:y1, x0:x1]
    h, w = c.shape
    s = max(h, w, 1)
    sq = torch.full((s, s), -1.0)
    sq[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = c
    small = F.interpolate(sq[None, None], size=(20, 20), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    return F.pad(small, (4, 4, 4, 4), value=-1.0)


def iou(a, b) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    u = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / u if u > 0 else 0.0


def score_layout(images: torch.Tensor, layouts: list, classifier) -> tuple[float, float]:
    """(accuracy of the classifier inside the boxes, mean box IoU of the ink extent) of images (N, 1, S, S)."""
    crops, classes, ious = [], [], []
    S = images.shape[-1]
    for img, boxes in zip(images[:, 0], layouts):
        for cls, *xy in boxes:
            x0, y0, x1, y1 = (round(v * S) for v in xy)
            crops.append(crop_digit(img, x0, y0, x1, y1))
            classes.append(cls)
            gx0, gy0, gx1, gy1 = max(0, x0 - 4), max(0, y0 - 4), min(S, x1 + 4), min(S, y1 + 4)
            ys, xs = torch.nonzero(img[gy0:gy1, gx0:gx1] > 0, as_tuple=True)
            ink = (gx0 + int(xs.min()), gy0 + int(ys.min()), gx0 + int(xs.max()) + 1, gy0 + int(ys.max()) + 1) \
                if len(xs) else (0, 0, 0, 0)
            ious.append(iou(ink, (x0, y0, x1, y1)))
    pred = classifier.predict(torch.stack(crops)[:, None])
    return float((pred == torch.tensor(classes)).float().mean()), float(np.mean(ious))


def score_semantic(images: torch.Tensor, maps: torch.Tensor, classifier) -> tuple[float, float]:
    """(classifier agreement per map region, foreground IoU) of images (N, 1, S, S) against maps (N, S, S)."""
    crops, classes, fg = [], [], []
    for img, m in zip(images[:, 0], maps):
        for k in m.unique().tolist():
            if k == 0:
                continue
            ys, xs = torch.nonzero(m == k, as_tuple=True)
            crops.append(crop_digit(img, int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
            classes.append(k - 1)
        a, b = img > 0, m > 0
        fg.append(float((a & b).sum()) / max(1, int((a | b).sum())))
    pred = classifier.predict(torch.stack(crops)[:, None])
    return float((pred == torch.tensor(classes)).float().mean()), float(np.mean(fg))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench-layout"))
    p.add_argument("--train-canvases", type=int, default=4000)
    p.add_argument("--steps", type=int, default=300, help="training steps of each model")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-minutes", type=int, default=12, help="stop each fit after this long (Lightning max_time): "
                   "the table then names the steps reached")
    p.add_argument("--n", type=int, default=64, help="test canvases sampled and scored per task")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--tasks", nargs="+", default=["layout", "semantic"], choices=["layout", "semantic"])
    p.add_argument("--layout-overrides", nargs="*", default=["--model.backbone_config", "{patch_size: 8, qk_norm: true}"],
                   help="extra `fit` flags of the layout run (default: patch 8, 64 tokens: CPU budget)")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = out / "canvas"
    cli("data", "pack", "--source", "mnist-canvas", "--split", "train", "--limit", str(a.train_canvases),
        "--samples-per-shard", str(max(1, a.train_canvases // 4)), "--class-maps", "--out", str(data / "train"),
        "--no-progress", log=out / "pack.log")
    from ldm_lightning.evaluation import get_or_train_classifier
    classifier = get_or_train_classifier(verbose=False)
    images, labels = load_mnist("test")
    test = [compose_canvas(images, labels, 0, i) for i in range(a.n)]  # = `data pack --split test`'s first n
    real = torch.from_numpy(np.stack([c for c, _, _ in test])).float()[:, None] / 127.5 - 1  # (n, 1, 64, 64)
    maps = torch.from_numpy(np.stack([m for _, m, _ in test]))  # (n, 64, 64)
    layouts = [b for _, _, b in test]
    rows = []
    for task in a.tasks:
        overrides = a.layout_overrides if task == "layout" else []
        run = out / task
        secs = cli("fit", "-c", str(ROOT / f"configs/diffusion/mnist-{task}-pixels.yaml"),
                   "-c", str(ROOT / "configs/trainer/cpu-debug.yaml"), "--trainer.max_steps", str(a.steps),
                   "--trainer.default_root_dir", str(run), "--data.train_shards", str(data / "train"),
                   "--data.val_shards", "null", "--data.batch_size", str(a.batch), "--data.num_workers", "1", "--model.val_num", "0",
                   "--trainer.logger", "false", "--trainer.max_time", f"00:00:{a.max_minutes:02d}:00", *overrides,
                   log=out / f"fit-{task}.log")
        steps = int(torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"])
        pipe = load_pipeline(run / "checkpoints" / "last.ckpt")
        cfg = SamplingConfig("flow_euler", a.sample_steps, 2.0 if task == "layout" else 1.0, 0)
        t1 = time.time()
        if task == "layout":
            gen = pipe.sample(a.n, cfg, layouts=layouts)
            score, shuffled = score_layout, layouts[1:] + layouts[:1]
            conds = (layouts, shuffled)
        else:
            gen = pipe.sample(a.n, cfg, c_concat=build_c_concat("semantic", (64, 64), class_map=maps, map_classes=11))
            score = score_semantic
            conds = (maps, torch.roll(maps, 1, 0))
        from ldm_lightning.images import save_grid
        save_grid(gen[:16], out / f"{task}-samples.png", nrow=4)
        rows.append((task, "real test canvases, own condition", *score(real, conds[0], classifier), secs, steps))
        rows.append((task, "samples, own condition", *score(gen, conds[0], classifier), secs, steps))
        rows.append((task, "samples, shuffled condition (baseline)", *score(gen, conds[1], classifier), secs, steps))
        print(f"{task}: fit {steps} steps {secs:.0f} s, sampling {a.n} x {a.sample_steps} steps {time.time() - t1:.0f} s",
              flush=True)
    print(f"\n{a.n} test canvases, batch {a.batch}, total {time.time() - t0:.0f} s\n")
    print("| task (training steps, fit time) | images scored | classifier reads the class | IoU (layout: box vs ink "
          "extent; semantic: foreground) |\n|---|---|---|---|")
    for task, what, acc, overlap, secs, steps in rows:
        print(f"| {task} ({steps} steps, {secs:.0f} s) | {what} | {acc:.3f} | {overlap:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
