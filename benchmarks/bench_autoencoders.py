"""The survey's comparison, measured here: every autoencoder kind at the SAME compression ratio and the SAME
training budget on the same data (MNIST 32x32x1 -> 256 latent floats, i.e. 8x8x4, or 4x4x16 for DC-AE f8).

    python benchmarks/bench_autoencoders.py --quick      # = the README's small CPU budget, ~5 min on 2 cores
    python benchmarks/bench_autoencoders.py --steps 5000 --batch 128 --device cuda --threads 0

Each kind is trained from scratch with the same recipe: AdamW lr 1e-3, batch `--batch`, `--steps` steps over
the same shuffled MNIST train images, loss = mean L1 + its regulariser (KL 1e-6 / VQ codebook+commitment;
no LPIPS: its VGG weights are not available offline; no GAN: a few hundred steps are too short for one).
Then, on the first `--eval` MNIST test images (posterior mode / codes):
  PSNR, SSIM (torchmetrics, [0, 1] range), rFID with the MNIST classifier extractor (the project's
  `mnist_fid`; its classifier is trained once per recipe and cached (`--rfid-epochs`, `--rfid-subset`
  pick the recipe; `--rfid off` skips it), codebook usage (codes
  used at least once / K) and perplexity for VQ kinds (VQ-VAE-2: bottom | top), parameters (trainable /
  frozen), encode and decode images/s (batch 256, no grad, median of 3 after a warm-up).
RAE's frozen encoder here is a RANDOM-weight DINOv2-shaped ViT (hidden 4, patch 4): no pretrained DINOv2
weights are available offline, so its row measures a decoder reading random frozen features, not RAE's
claim; pass `--rae-encoder DIR` (a local DINOv2 folder whose hidden size fixes the latent width) for that.
Speeds on a shared CPU are noisy; compare them within one run only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

from ldm_lightning.autoencoder import Autoencoder, AutoencoderConfig
from ldm_lightning.autoencoder.loss import AutoencoderLoss, LossConfig
from ldm_lightning.evaluation.mnist_data import load_mnist_32

# `--width` sets ch of the convolutional kinds.
BASE = dict(in_channels=1, ch=24, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, resolution=32)
VQ = dict(vq_codebook_size=256, vq_restart_threshold=0.01)
KINDS = {
    "kl": dict(BASE, regularizer="kl", z_channels=4),                                   # 8x8x4
    "vq": dict(BASE, regularizer="vq", z_channels=4, embed_dim=4, **VQ),                # 8x8x4 codes
    "movq": dict(BASE, arch="movq", regularizer="vq", z_channels=4, embed_dim=4, vq_heads=2, **VQ),
    "vqvae2": dict(BASE, regularizer="vq2", z_channels=2, embed_dim=2, mid_attn=False, **VQ),  # 8x8x2 + 4x4x2
    "dcae": dict(BASE, arch="dcae", regularizer="none", ch_mult=(1, 2, 4, 4), z_channels=16),  # 4x4x16
    "rae": dict(arch="rae", regularizer="none", in_channels=1, resolution=32, rae_decoder_width=96,
                rae_decoder_depth=2, rae_decoder_heads=4, rae_noise_tau=0.8),               # 8x8x4 (random DINO)
}


def random_dinov2(out: str) -> str:
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=4, num_hidden_layers=2, num_attention_heads=1, intermediate_size=16,
                             image_size=32, patch_size=4)).save_pretrained(out)
    return out


def train(kind: str, cfg: dict, x: torch.Tensor, steps: int, batch: int, device: str) -> tuple[Autoencoder, float]:
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig.from_dict(cfg)).to(device)
    if ae.config.arch == "rae":  # RAE standardises the frozen representation first (as the fit callback does)
        ae.compute_representation_stats([x[i:i + 256].to(device) for i in range(0, 1024, 256)])
    loss = AutoencoderLoss(LossConfig(rec_reduction="mean", perceptual_weight=0.0, kl_weight=1e-6, disc_weight=0.0),
                           1).to(device)
    opt = torch.optim.AdamW([p for p in ae.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    ae.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = order[(step * batch) % len(x):][:batch]
        xb = x[idx].to(device)
        recon, post = ae(xb, generator=torch.Generator(device).manual_seed(step))
        value, _ = loss(xb, recon, post, step, ae.last_layer)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
    return ae.eval(), time.perf_counter() - t0


def _codebook(indices: torch.Tensor, k: int) -> tuple[float, float]:
    counts = torch.bincount(indices.flatten(), minlength=k).double()
    p = counts / counts.sum()
    return float((counts > 0).double().mean()), float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))


@torch.no_grad()
def evaluate(ae: Autoencoder, x: torch.Tensor, device: str, classifier) -> dict:
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
    recons, idx, idx_top = [], [], []
    for i in range(0, len(x), 250):
        post = ae.encode(x[i:i + 250].to(device))
        recons.append(ae.decode_latent(ae.decoder_input(post)).clamp(-1, 1).cpu())
        if ae.is_vq:
            idx.append(post.indices.cpu())
            if hasattr(post, "indices_top"):
                idx_top.append(post.indices_top.cpu())
    r = torch.cat(recons)
    x01, r01 = (x + 1) / 2, (r + 1) / 2
    out = {"psnr": float(PeakSignalNoiseRatio(data_range=1.0)(r01, x01)),
           "ssim": float(StructuralSimilarityIndexMeasure(data_range=1.0)(r01, x01))}
    if classifier is not None:
        from ldm_lightning.evaluation import mnist_fid
        out["rfid"] = mnist_fid(classifier, r, x)
    if idx:
        k = ae.config.vq_codebook_size
        out["usage"], out["perplexity"] = _codebook(torch.cat(idx), k)
        if idx_top:
            out["usage_top"], out["perplexity_top"] = _codebook(torch.cat(idx_top), k)
    return out


@torch.no_grad()
def speed(ae: Autoencoder, device: str, batch: int = 256) -> tuple[float, float]:
    x = torch.rand(batch, 1, 32, 32, device=device) * 2 - 1
    z = ae.encode(x).mode()

    def rate(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return batch / statistics.median(times)
    return rate(lambda: ae.encode(x).mode()), rate(lambda: ae.decode(z))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--quick", action="store_true", help="the README's CPU budget: --steps 60 --batch 32 --width 16 "
                   "--eval 500 --speed-batch 64 --rfid-epochs 1 --rfid-subset 10000")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train", type=int, default=20000, help="MNIST train images to draw batches from")
    p.add_argument("--eval", type=int, default=2000, help="MNIST test images to evaluate on")
    p.add_argument("--rfid", choices=("on", "off"), default="on",
                   help="rFID with the cached MNIST classifier (trained once, ~1-2 min CPU, if not cached)")
    p.add_argument("--rae-encoder", default=None, help="local DINOv2 folder for the RAE row (default: random)")
    p.add_argument("--width", type=int, default=24, help="base width `ch` of the convolutional kinds")
    p.add_argument("--rfid-epochs", type=int, default=3, help="MNIST classifier recipe: epochs")
    p.add_argument("--rfid-subset", type=int, default=None, help="MNIST classifier recipe: train images")
    p.add_argument("--speed-batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (a shared CPU: 1 per process avoids oversubscription; 0 = torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.batch, a.width, a.eval, a.speed_batch, a.rfid_epochs, a.rfid_subset = 60, 32, 16, 500, 64, 1, 10000
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    x_train, _ = load_mnist_32("train", limit=a.train)         # (N, 1, 32, 32) in [-1, 1]
    x_eval, _ = load_mnist_32("test", limit=a.eval)
    classifier = None
    if a.rfid == "on":
        from ldm_lightning.evaluation import get_or_train_classifier
        extra = {"train_subset": a.rfid_subset} if a.rfid_subset else {}
        classifier = get_or_train_classifier(epochs=a.rfid_epochs, verbose=False, **extra)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in a.kinds:
            cfg = dict(KINDS[kind])
            if "ch" in cfg:
                cfg["ch"] = a.width
            if kind == "rae":
                cfg["rae_encoder"] = a.rae_encoder or random_dinov2(f"{tmp}/dinov2")
            ae, seconds = train(kind, cfg, x_train, a.steps, a.batch, a.device)
            row = {"kind": kind, "latent": "x".join(map(str, ae.encode(x_eval[:1].to(a.device)).mode().shape[1:])),
                   "trainable_M": sum(p.numel() for p in ae.parameters() if p.requires_grad) / 1e6,
                   "frozen_M": sum(p.numel() for p in ae.parameters() if not p.requires_grad) / 1e6,
                   "train_s": seconds, **evaluate(ae, x_eval, a.device, classifier)}
            row["encode_img_s"], row["decode_img_s"] = speed(ae, a.device, a.speed_batch)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    cols = ["kind", "latent", "psnr", "ssim", "rfid", "usage", "perplexity", "trainable_M", "frozen_M",
            "encode_img_s", "decode_img_s", "train_s"]
    head = (f"# {a.steps} steps x batch {a.batch}, width {a.width}, on {a.device} ({torch.get_num_threads()} "
            f"threads); eval on {a.eval} MNIST test images")
    if a.rfid == "on":
        head += f"; rFID classifier: {a.rfid_epochs} epoch(s) on {a.rfid_subset or 60000} train images"
    print(head)
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            if c in ("usage", "perplexity") and f"{c}_top" in r:
                v = f"{v:.3g} / {r[c + '_top']:.3g}"
            elif isinstance(v, float):
                v = f"{v:.3g}" if c not in ("encode_img_s", "decode_img_s") else f"{v:.0f}"
            cells.append(str(v))
        print("| " + " | ".join(cells) + " |")
    by = {r["kind"]: r for r in rows}
    if "movq" in by and "vq" in by:  # what MoVQ's modulated decoder costs and buys over the plain VQ decoder
        print(f"ratio decode img/s movq / vq = {by['movq']['decode_img_s'] / by['vq']['decode_img_s']:.3f}")
        if "rfid" in by["vq"]:
            print(f"ratio rFID movq / vq = {by['movq']['rfid'] / by['vq']['rfid']:.3f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
