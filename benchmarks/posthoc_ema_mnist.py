"""Post-hoc EMA on the MNIST class model: class accuracy and MNIST-FID of EMAs of many lengths (sigma_rel), each
synthesised after training from the snapshots of one run. Prints a markdown table.

    nice -n 10 python benchmarks/posthoc_ema_mnist.py --steps 1500 --snapshot-every 50 --num 200 \
        --sweep 0.01,0.02,0.03,0.05,0.07,0.1,0.15,0.2,0.25

The run is the user path: `ldm-lightning data pack` (the first --limit MNIST train images), then `ldm-lightning
fit` with configs/diffusion/mnist-jit-pixels.yaml (the class-conditional pixel DiT; --width overrides its hidden
size) + configs/trainer/cpu-debug.yaml + `posthoc_ema: {sigma_rels: [0.05, 0.1], snapshot_every: N}`, then
`ldm-lightning ema-reconstruct` (its `main`, in this process) for every --sweep value. Every export, the run's
ordinary EMA and its live weights are sampled with the same noise (seed 0), --num samples spread evenly over the
10 classes (flow_heun, --sample-steps, CFG --cfg), and scored with the project's MNIST classifier
(`get_or_train_classifier()`): class accuracy, and MNIST-FID against the first 2000 test images. FID is biased
upwards at small N: compare rows only within one run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LDM = str(Path(sys.executable).parent / "ldm-lightning")
CONFIG = ROOT / "configs" / "diffusion" / "mnist-jit-pixels.yaml"


@torch.no_grad()
def generate(denoiser, conditioner, meta, num: int, steps: int, cfg: float) -> torch.Tensor:
    from ldm_lightning.autoencoder.load import load_autoencoder
    from ldm_lightning.diffusion.sampling import SamplingConfig, sample_images
    ae = load_autoencoder(meta["autoencoder"]["path"])
    labels = [i % 10 for i in range(num)]
    return sample_images(denoiser, conditioner, ae, meta["latent_shape"], num, SamplingConfig("flow_heun", steps, cfg),
                         labels=labels)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/posthoc-ema-bench")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--limit", type=int, default=20000, help="MNIST train images packed")
    p.add_argument("--snapshot-every", type=int, default=50)
    p.add_argument("--sweep", default="0.01,0.02,0.03,0.05,0.07,0.1,0.15,0.2,0.25")
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--plot", default=None, help="also write the sweep as an SVG plot (accuracy and FID over sigma_rel)")
    p.add_argument("--replot", default=None, metavar="MARKDOWN",
                   help="only redraw --plot from the measured table in this markdown file (docs/evaluation.md's "
                        "'| weights | live | EMA ...' table: header sigma_rel values, class accuracy and MNIST-FID rows)")
    a = p.parse_args(argv)
    if a.replot:
        sigmas, acc, fid = table_from_markdown(Path(a.replot).read_text())
        print(plot(a.plot or "posthoc_ema.svg", sigmas, acc, fid))
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    shards, val_shards = out / "mnist-train", out / "mnist-test"
    for split, folder, limit in (("train", shards, a.limit), ("test", val_shards, 500)):
        if not (folder / "manifest.json").exists():
            subprocess.run([LDM, "data", "pack", "--source", "mnist", "--split", split, "--out", str(folder),
                            "--limit", str(limit), "--no-progress"], check=True, env=env)
    run = out / "run"
    cfg = out / "posthoc.yaml"
    # a dict field given again replaces the config's whole dict: repeat it with the width changed
    backbone = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]["backbone_config"]
    cfg.write_text(yaml.safe_dump({"model": {"init_args": {
        "posthoc_ema": {"sigma_rels": [0.05, 0.1], "snapshot_every": a.snapshot_every},
        "backbone_config": {**backbone, "hidden_size": a.width}, "val_num": 0}}}))
    t0 = time.time()
    if not (run / "checkpoints" / "last.ckpt").exists():
        subprocess.run([LDM, "fit", "-c", str(CONFIG),
                        "-c", str(ROOT / "configs/trainer/cpu-debug.yaml"), "-c", str(cfg),
                        "--data.init_args.train_shards", str(shards), "--data.init_args.val_shards", str(val_shards),
                        "--data.init_args.batch_size", str(a.batch), "--trainer.max_steps", str(a.steps),
                        "--trainer.default_root_dir", str(run)], check=True, env=env)
    train_s = time.time() - t0

    from ldm_lightning import ema_reconstruct
    from ldm_lightning.diffusion.load import load_denoiser
    from ldm_lightning.evaluation.mnist_metrics import mnist_fid, sample_accuracy
    from ldm_lightning.encoders.mnist_classifier_cache import get_or_train_classifier
    from ldm_lightning.encoders.mnist_data import load_mnist_32
    clf = get_or_train_classifier(verbose=False)
    real, _ = load_mnist_32("test", limit=2000)
    labels = torch.tensor([i % 10 for i in range(a.num)])

    def score(path, weights="ema"):
        denoiser, conditioner, meta = load_denoiser(path, weights)
        images = generate(denoiser, conditioner, meta, a.num, a.sample_steps, a.cfg)
        return sample_accuracy(clf, images, labels)["accuracy"], mnist_fid(clf, images, real)

    rows = []
    last = run / "checkpoints" / "last.ckpt"
    for label, weights in (("live", "live"), ("EMA (model.ema, decay of the config)", "ema")):
        rows.append((label, *score(last, weights)))
        print(rows[-1], flush=True)
    for s in [float(v) for v in a.sweep.split(",")]:
        export = out / f"sigma_rel-{s:g}"
        rc = ema_reconstruct.main(["--snapshots", str(run / "checkpoints"), "--sigma-rel", str(s), "--out",
                                   str(export), "--overwrite"])
        assert rc == 0
        rows.append((f"post-hoc sigma_rel {s:g}", *score(export)))
        print(rows[-1], flush=True)
    print(f"\n{a.steps} steps at batch {a.batch}, width {a.width}, snapshots every {a.snapshot_every} "
          f"(training {train_s:.0f} s); {a.num} samples, flow_heun {a.sample_steps} steps, CFG {a.cfg}\n")
    print("| weights | class accuracy | MNIST-FID |\n|---|---|---|")
    for label, acc, fid in rows:
        print(f"| {label} | {acc:.3f} | {fid:.2f} |")
    if a.plot:
        sweep = [r for r in rows if r[0].startswith("post-hoc")]
        print(plot(a.plot, [float(r[0].split()[-1]) for r in sweep], [r[1] for r in sweep], [r[2] for r in sweep]))
    return 0


def plot(path: str, sigmas: list[float], acc: list[float], fid: list[float]) -> Path:
    from svg_plot import line_plot
    return line_plot(path, "Post-hoc EMA on the MNIST class model (one run)", "sigma_rel (EMA length, log scale)",
                     sigmas, [("class accuracy", acc), ("MNIST-FID", fid)], log_x=True)


def table_from_markdown(text: str) -> tuple[list[float], list[float], list[float]]:
    """The sweep columns of the wide table this script's numbers were published as (docs/evaluation.md)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in ("weights", "class accuracy", "MNIST-FID") and len(cells) > 3:
            rows.setdefault(cells[0], cells[1:])
    head = rows["weights"]
    first = next(i for i, c in enumerate(head) if c.startswith("σ_rel"))
    sigmas = [float(c.replace("σ_rel", "").strip()) for c in head[first:]]
    return sigmas, [float(v) for v in rows["class accuracy"][first:]], [float(v) for v in rows["MNIST-FID"][first:]]


if __name__ == "__main__":
    sys.exit(main())
