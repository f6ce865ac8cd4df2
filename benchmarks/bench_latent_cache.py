"""Training step time with on-the-fly encoding (image shards) vs cached latents (`data encode` shards).

    python benchmarks/bench_latent_cache.py                       # tiny-mnist AE + unet-tiny on MNIST, CPU
    python benchmarks/bench_latent_cache.py --ae kl-f8 --image-size 256 --backbone DiT-B/4 --device cuda

Both paths run the same `DiffusionModule.compute_loss` + backward + AdamW step on the same samples; the
only difference is whether the batch holds `image` (the frozen autoencoder encodes it every step) or
`moments` (read from a latent cache). Prints ms/step for both and the ratio on-the-fly / cached.
Weights are random (timing only): the autoencoder is a fresh preset exported to a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ae", default="tiny-mnist", help="autoencoder preset")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--backbone", default="unet-tiny")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--encode-dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)

    from ldm_lightning.autoencoder import Autoencoder, get_preset
    from ldm_lightning.data.mnist import load_mnist
    from ldm_lightning.diffusion.encode import encode_batch
    from ldm_lightning.diffusion.module import DiffusionModule
    from ldm_lightning.autoencoder.export import export_autoencoder

    torch.manual_seed(0)
    ae_cfg = get_preset(a.ae)
    device = torch.device(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        ae_dir = export_autoencoder(Autoencoder(ae_cfg), f"{tmp}/ae")
        module = DiffusionModule(str(ae_dir), backbone=a.backbone, encode_dtype=a.encode_dtype, val_num=0,
                                 backbone_config={"input_size": a.image_size // ae_cfg.downsample_factor}
                                 if a.backbone.lower().startswith("dit") else None).to(device)
    # Real MNIST digits, replicated to the autoencoder's channels and resized to --image-size.
    imgs, _ = load_mnist("train")
    x = torch.from_numpy(imgs[:a.batch_size].astype(np.float32) / 127.5 - 1)[:, None]  # (B, 1, 28, 28)
    x = torch.nn.functional.interpolate(x, size=(a.image_size, a.image_size), mode="bilinear")
    x = x.expand(-1, ae_cfg.in_channels, -1, -1).contiguous().to(device)  # (B, C, H, W)
    batches = {"on-the-fly": {"image": x},
               "cached": {"moments": encode_batch(module.autoencoder, x, "moments", torch.float32)}}
    opt = torch.optim.AdamW(module.denoiser.parameters(), lr=1e-4)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    ms = {}
    for name, batch in batches.items():
        for i in range(a.warmup + a.steps):
            if i == a.warmup:
                sync()
                t0 = time.perf_counter()
            loss, _ = module.compute_loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync()
        ms[name] = (time.perf_counter() - t0) / a.steps * 1e3
        print(f"{name:>10}: {ms[name]:8.2f} ms/step  (batch {a.batch_size}, {a.ae} @ {a.image_size}px, "
              f"{a.backbone}, {device.type})")
    print(f"ratio on-the-fly / cached: {ms['on-the-fly'] / ms['cached']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
