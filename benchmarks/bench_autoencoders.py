"""The survey's comparison, measured here: every autoencoder kind at the SAME compression ratio and the SAME
training budget on the same data, then (MNIST) the same small stage-2 budget on each one's latents.

    python benchmarks/bench_autoencoders.py --quick                # the README's MNIST table (CPU budget)
    python benchmarks/bench_autoencoders.py --quick --data photos  # the README's photo table
    python benchmarks/bench_autoencoders.py --steps 5000 --batch 128 --s2-steps 20000 --device cuda --threads 0
    python benchmarks/bench_autoencoders.py --dry-run [--data photos]   # a few steps per kind (a test runs it)

Data (`--data`): `mnist`, 32x32x1 -> 256 latent floats (8x8x4; 4x4x16 for DC-AE f8); `photos`, random 64x64
RGB crops of scikit-image's bundled photos (benchmarks/zoo_photos.py; evaluation crops from a held-out
photo) -> 1024 latent floats (16x16x4; 8x8x16 for DC-AE).

Stage 1: each kind is trained from scratch with the same recipe: AdamW lr 1e-3, batch `--batch`, `--steps`
steps over the same shuffled training images, loss = mean L1 + its regulariser (KL 1e-6 / VQ
codebook+commitment; no LPIPS loss, no GAN: a few hundred steps are too short for one). Then, on the
`--eval` evaluation images (posterior mode / codes):
  PSNR, SSIM (torchmetrics, [0, 1] range); LPIPS-VGG when torchvision's VGG16 weights are on disk
  (`--vgg-weights`, default $TORCH_HOME/hub/checkpoints/vgg16-397923af.pth; else "n/a"); for MNIST rFID
  with the MNIST classifier extractor (the project's `mnist_fid`; its classifier is trained once per
  recipe and cached: `--rfid-epochs`, `--rfid-subset` pick the recipe, `--rfid off` skips it); codebook
  usage (codes used at least once / K) and perplexity for VQ kinds (VQ-VAE-2: bottom | top); parameters
  (trainable / frozen); encode and decode images/s (no grad, median of 3 after a warm-up).
Stage 2 (MNIST, benchmarks/zoo_stage2.py, `--s2 off` skips it): the same small class-conditional DiT, the
same steps, on each autoencoder's latents normalised by its own measured scale factor (VQ kinds: the
pre-quantisation latent, as LDM), then `--s2-per-class` samples per class -> class accuracy (the MNIST
classifier) and MNIST-FID against the evaluation images, next to the real-image reference at that count
and the classifier's accuracy on each autoencoder's reconstructions (`recon_acc`: what its decoder can
draw, the ceiling for its samples). One more row gives RAE its own recipe, DiT^DH (the same DiT with a
2-block head twice as wide; `--s2-rae-dh off` drops it).
RAE's frozen encoder here is a RANDOM-weight DINOv2-shaped ViT (hidden 4, patch 4): no pretrained DINOv2
weights are available offline, so its row measures a decoder reading random frozen features, not RAE's
claim; pass `--rae-encoder DIR` (a local DINOv2 folder whose hidden size fixes the latent width) for that.
Speeds on a shared CPU are noisy; compare them within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import torch

from ldm_lightning.autoencoder import Autoencoder, AutoencoderConfig
from ldm_lightning.autoencoder.loss import AutoencoderLoss, LossConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # zoo_photos.py, zoo_stage2.py sit next to this file

# `--width` sets ch of the convolutional kinds; `data_kinds` sets channels and resolution per data set.
BASE = dict(ch=24, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8)
VQ = dict(vq_codebook_size=256, vq_restart_threshold=0.01)
KINDS = {
    "kl": dict(BASE, regularizer="kl", z_channels=4),                                   # f4 x 4 channels
    "vq": dict(BASE, regularizer="vq", z_channels=4, embed_dim=4, **VQ),                # f4 x 4 codes
    "movq": dict(BASE, arch="movq", regularizer="vq", z_channels=4, embed_dim=4, vq_heads=2, **VQ),
    "vqvae2": dict(BASE, regularizer="vq2", z_channels=2, embed_dim=2, mid_attn=False, **VQ),  # f4 x 2 + f8 x 2
    "dcae": dict(BASE, arch="dcae", regularizer="none", ch_mult=(1, 2, 4, 4), z_channels=16),  # f8 x 16
    "rae": dict(arch="rae", regularizer="none", rae_decoder_width=96, rae_decoder_depth=2, rae_decoder_heads=4,
                rae_noise_tau=0.8),                                                     # f4 x 4 (random DINO)
}
DATA = {"mnist": dict(in_channels=1, resolution=32), "photos": dict(in_channels=3, resolution=64)}
# --quick per data set (the README's CPU budget); --dry-run: the smallest run that fills every column.
QUICK = {"mnist": dict(steps=60, batch=32, width=16, eval=500, speed_batch=64, rfid_epochs=1, rfid_subset=10000,
                       s2_steps=100, s2_batch=32, s2_pool=2000, s2_per_class=20, s2_sample_steps=10),
         "photos": dict(steps=30, batch=16, width=16, eval=200, speed_batch=32, train=2000)}
DRY = dict(steps=2, batch=8, width=8, train=256, eval=16, speed_batch=8, rfid_epochs=1, rfid_subset=500,
           s2_steps=2, s2_batch=8, s2_pool=64, s2_per_class=2, s2_sample_steps=2)


def random_dinov2(out: str, resolution: int, channels: int) -> str:
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=4, num_hidden_layers=2, num_attention_heads=1, intermediate_size=16,
                             image_size=resolution, patch_size=4, num_channels=channels)).save_pretrained(out)
    return out


def train(cfg: dict, x: torch.Tensor, steps: int, batch: int, device: str) -> tuple[Autoencoder, float]:
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig.from_dict(cfg)).to(device)
    if ae.config.arch == "rae":  # RAE standardises the frozen representation first (as the fit callback does)
        ae.compute_representation_stats([x[i:i + 256].to(device) for i in range(0, min(len(x), 1024), 256)])
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


def build_lpips(path: str | None):
    """The project's LPIPS-VGG (autoencoder/loss.py) when torchvision's VGG16 weights are at `path`, else None."""
    if not path or not os.path.isfile(path):
        return None
    from ldm_lightning.autoencoder.loss import build_lpips as build
    return build(LossConfig(perceptual_weight=1.0, lpips_vgg_weights=path))


@torch.no_grad()
def evaluate(ae: Autoencoder, x: torch.Tensor, y: torch.Tensor, device: str, classifier, lpips_net) -> dict:
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
    if lpips_net is not None:  # LPIPS reads RGB in [-1, 1]; grey images are repeated to 3 channels
        rgb = (lambda t: t.expand(-1, 3, -1, -1)) if x.shape[1] == 1 else (lambda t: t)
        out["lpips"] = float(torch.cat([lpips_net(rgb(x[i:i + 100]), rgb(r[i:i + 100])).flatten()
                                        for i in range(0, len(x), 100)]).mean())
    if classifier is not None:
        from ldm_lightning.evaluation import mnist_fid, sample_accuracy
        out["rfid"] = mnist_fid(classifier, r, x)
        out["recon_acc"] = sample_accuracy(classifier, r, y)["accuracy"]  # what stage-2 accuracy can reach
    if idx:
        k = ae.config.vq_codebook_size
        out["usage"], out["perplexity"] = _codebook(torch.cat(idx), k)
        if idx_top:
            out["usage_top"], out["perplexity_top"] = _codebook(torch.cat(idx_top), k)
    return out


@torch.no_grad()
def speed(ae: Autoencoder, device: str, shape: tuple[int, ...], batch: int = 256) -> tuple[float, float]:
    x = torch.rand(batch, *shape, device=device) * 2 - 1
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


def load_data(a) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, labels, evaluation images, labels): float (N, C, H, W) in [-1, 1], int64 (N,) (photos: 0)."""
    if a.data == "photos":
        from zoo_photos import load_photo_crops
        x_train, x_eval = load_photo_crops(a.train, a.eval)
        return x_train, torch.zeros(len(x_train), dtype=torch.long), x_eval, torch.zeros(len(x_eval), dtype=torch.long)
    from ldm_lightning.encoders.mnist_data import load_mnist_32
    return (*load_mnist_32("train", limit=a.train), *load_mnist_32("test", limit=a.eval))  # (N, 1, 32, 32)


def print_table(rows: list[dict], cols: list[str], na: dict[str, str]) -> None:
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, na.get(c, ""))
            if c in ("usage", "perplexity") and f"{c}_top" in r:
                v = f"{v:.3g} / {r[c + '_top']:.3g}"
            elif isinstance(v, float):
                v = f"{v:.0f}" if c.endswith("img_s") else f"{v:.3g}"
            cells.append(str(v))
        print("| " + " | ".join(cells) + " |")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=tuple(DATA), default="mnist",
                   help="mnist (32x32 digits) or photos (64x64 RGB crops of scikit-image's bundled photos)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--quick", action="store_true", help="the README's CPU budget for --data: " + "; ".join(
        f"{d}: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in q.items()) for d, q in QUICK.items()))
    p.add_argument("--dry-run", action="store_true", help="the smallest run that prints every column: "
                   + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in DRY.items()))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train", type=int, default=20000, help="training images to draw batches from")
    p.add_argument("--eval", type=int, default=2000, help="evaluation images (MNIST test / held-out photo crops)")
    p.add_argument("--rfid", choices=("on", "off"), default="on",
                   help="MNIST: rFID with the cached MNIST classifier (trained once, ~1-2 min CPU, if not cached)")
    p.add_argument("--vgg-weights", default=os.path.join(torch.hub.get_dir(), "checkpoints", "vgg16-397923af.pth"),
                   help="torchvision's VGG16 weights for LPIPS (never downloaded; absent: LPIPS n/a)")
    p.add_argument("--rae-encoder", default=None, help="local DINOv2 folder for the RAE row (default: random)")
    p.add_argument("--width", type=int, default=24, help="base width `ch` of the convolutional kinds")
    p.add_argument("--rfid-epochs", type=int, default=3, help="MNIST classifier recipe: epochs")
    p.add_argument("--rfid-subset", type=int, default=None, help="MNIST classifier recipe: train images")
    p.add_argument("--speed-batch", type=int, default=256)
    s2 = p.add_argument_group("stage 2 (MNIST): one DiT per autoencoder, benchmarks/zoo_stage2.py")
    s2.add_argument("--s2", choices=("on", "off"), default="on", help="train and score stage 2 (MNIST only)")
    s2.add_argument("--s2-steps", type=int, default=1000, help="DiT optimizer steps per autoencoder")
    s2.add_argument("--s2-batch", type=int, default=64, help="latents per DiT step")
    s2.add_argument("--s2-pool", type=int, default=10000, help="training images encoded once for stage 2")
    s2.add_argument("--s2-backbone", default="dit-tiny", help="DiT preset (patch size set per latent)")
    s2.add_argument("--s2-per-class", type=int, default=50, help="samples per class scored")
    s2.add_argument("--s2-sampler", default="dpmpp_2m")
    s2.add_argument("--s2-sample-steps", type=int, default=20)
    s2.add_argument("--s2-cfg", type=float, default=3.0, help="classifier-free guidance scale")
    s2.add_argument("--s2-rae-dh", choices=("on", "off"), default="on",
                    help="one more RAE row with RAE's DiT^DH: the same DiT + a 2-block head twice as wide (DDT family)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (a shared CPU: 1 per process avoids oversubscription; 0 = torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = p.parse_args(argv)
    for preset in ([QUICK[a.data]] if a.quick else []) + ([DRY] if a.dry_run else []):
        for k, v in preset.items():
            setattr(a, k, v)
    if a.data != "mnist":
        a.rfid, a.s2 = "off", "off"
    if a.s2 == "on" and a.rfid == "off":
        p.error("stage 2 is scored with the MNIST classifier: --s2 on needs --rfid on (or pass --s2 off)")
    from ldm_lightning.diffusion import PRESETS
    if PRESETS.get(a.s2_backbone, ("",))[0] != "dit":
        p.error(f"--s2-backbone {a.s2_backbone!r} is not a DiT preset; choose one of "
                f"{sorted(k for k, v in PRESETS.items() if v[0] == 'dit')}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    x_train, y_train, x_eval, y_eval = load_data(a)
    classifier = None
    if a.rfid == "on":
        from ldm_lightning.evaluation import get_or_train_classifier
        extra = {"train_subset": a.rfid_subset} if a.rfid_subset else {}
        classifier = get_or_train_classifier(epochs=a.rfid_epochs, verbose=False, **extra)
    lpips_net = build_lpips(a.vgg_weights)
    if lpips_net is not None:
        lpips_net.to(a.device)
    s2cfg = None
    if a.s2 == "on":
        from zoo_stage2 import Stage2Config
        s2cfg = Stage2Config(steps=a.s2_steps, batch=a.s2_batch, pool=min(a.s2_pool, len(x_train)),
                             backbone=a.s2_backbone, per_class=a.s2_per_class, sampler=a.s2_sampler,
                             sample_steps=a.s2_sample_steps, cfg=a.s2_cfg)
    rows, s2_extra = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in a.kinds:
            cfg = {**KINDS[kind], **DATA[a.data]}
            if "ch" in cfg:
                cfg["ch"] = a.width
            if kind == "rae":
                cfg["rae_encoder"] = a.rae_encoder or random_dinov2(f"{tmp}/dinov2", cfg["resolution"], 3)
            ae, seconds = train(cfg, x_train, a.steps, a.batch, a.device)
            row = {"kind": kind, "latent": "x".join(map(str, ae.encode(x_eval[:1].to(a.device)).mode().shape[1:])),
                   "trainable_M": sum(p.numel() for p in ae.parameters() if p.requires_grad) / 1e6,
                   "frozen_M": sum(p.numel() for p in ae.parameters() if not p.requires_grad) / 1e6,
                   "train_s": seconds, **evaluate(ae, x_eval, y_eval, a.device, classifier, lpips_net)}
            row["encode_img_s"], row["decode_img_s"] = speed(ae, a.device, tuple(x_eval.shape[1:]), a.speed_batch)
            if s2cfg is not None:
                from zoo_stage2 import run_stage2
                row.update(run_stage2(ae, x_train, y_train, s2cfg, a.device, classifier, x_eval))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if s2cfg is not None and kind == "rae" and a.s2_rae_dh == "on":  # RAE's own stage-2 recipe, one more row
                from zoo_stage2 import dh_head, run_stage2
                name, over = dh_head(s2cfg.backbone)
                dh = {"kind": "rae + DiT^DH", "latent": row["latent"], "recon_acc": row["recon_acc"],
                      **run_stage2(ae, x_train, y_train, replace(s2cfg, backbone=name, overrides=over), a.device,
                                   classifier, x_eval)}
                s2_extra.append(dh)
                print(json.dumps(dh), file=sys.stderr, flush=True)
    report(a, rows, s2_extra, classifier, x_train, x_eval, lpips_net is not None)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows + s2_extra, f, indent=2)
    return 0


def report(a, rows: list[dict], s2_extra: list[dict], classifier, x_train: torch.Tensor, x_eval: torch.Tensor, has_lpips: bool) -> None:
    what = "MNIST test images" if a.data == "mnist" else "64x64 crops of the held-out photo"
    print(f"# stage 1 ({a.data}): {a.steps} steps x batch {a.batch}, width {a.width}, on {a.device} "
          f"({torch.get_num_threads()} threads); eval on {a.eval} {what}")
    if classifier is not None:
        print(f"# rFID classifier: {a.rfid_epochs} epoch(s) on {a.rfid_subset or 60000} MNIST train images")
    na = {} if has_lpips else {"lpips": "n/a"}
    if not has_lpips:
        print(f"# LPIPS: n/a (no VGG weights at {a.vgg_weights})")
    cols = ["kind", "latent", "psnr", "ssim", "lpips"] + (["rfid"] if classifier is not None else []) + [
        "usage", "perplexity", "trainable_M", "frozen_M", "encode_img_s", "decode_img_s", "train_s"]
    print_table(rows, cols, na)
    if a.s2 == "on":
        from ldm_lightning.evaluation import mnist_fid, sample_accuracy
        from ldm_lightning.encoders.mnist_data import load_mnist_32
        n = 10 * a.s2_per_class
        x_ref, y_ref = load_mnist_32("test", limit=n)
        ref_fid = mnist_fid(classifier, x_train[:n], x_eval)
        print(f"\n# stage 2 (MNIST): {a.s2_backbone} (patch = latent side / 4: 16 tokens on every latent), "
              f"{a.s2_steps} steps x batch {a.s2_batch} on the latents of {min(a.s2_pool, len(x_train))} train "
              f"images, eps + min-SNR 5, VP scaled-linear; {a.s2_per_class} samples per class, {a.s2_sampler} "
              f"{a.s2_sample_steps} steps, CFG {a.s2_cfg}; FID of {n} samples vs the {a.eval} eval images")
        print(f"# reference at this count: real train images FID {ref_fid:.3g}, classifier accuracy on "
              f"{n} real test images {sample_accuracy(classifier, x_ref, y_ref)['accuracy']:.3g}")
        print_table(rows + s2_extra, ["kind", "latent", "recon_acc", "scale", "s2_acc", "s2_fid", "s2_params_M",
                                      "s2_train_s", "sample_s"], {})
    by = {r["kind"]: r for r in rows}
    if "movq" in by and "vq" in by:  # what MoVQ's modulated decoder costs and buys over the plain VQ decoder
        print(f"ratio decode img/s movq / vq = {by['movq']['decode_img_s'] / by['vq']['decode_img_s']:.3f}")
        if "rfid" in by["vq"]:
            print(f"ratio rFID movq / vq = {by['movq']['rfid'] / by['vq']['rfid']:.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
