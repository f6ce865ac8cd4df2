"""`ldm-lightning sample`: images from a trained denoiser (a training .ckpt or a `export` folder).

    ldm-lightning sample --checkpoint run/last.ckpt --sampler dpmpp_2m --steps 20 --cfg 3 \
        --classes 0-9 --num 4 --seed 0 --out samples/

Writes one PNG per sample, `{condition}_{index}.png` (the class index, a slug of the prompt, or `sample`
for an unconditional model), and `grid.png` (one row per condition). Deterministic for a seed: the
initial noise is drawn on the CPU from `--seed` (so it does not depend on the device), ancestral noise
from a generator seeded by `--seed + 1`.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch

from .guidance import cfg_denoiser
from .samplers import SAMPLERS, get_sampler


@torch.no_grad()
def sample_images(denoiser, conditioner, autoencoder, latent_shape, num: int, sampler: str = "ddim",
                  steps: int = 25, cfg: float = 1.0, seed: int = 0, labels: list[int] | None = None,
                  prompts: list[str] | None = None, **sampler_options) -> torch.Tensor:
    """(num, C, H, W) images in [-1, 1]: sample latents with `sampler` (CFG scale `cfg`), decode them.

    labels / prompts: one condition per sample (class kind / text kind); neither for unconditional models."""
    device = next(denoiser.parameters()).device
    kind = conditioner.cfg.kind
    if kind == "class" and labels is None:
        raise ValueError("this model is class-conditional: give labels (--class K or --classes A-B)")
    if kind == "text" and prompts is None:
        raise ValueError("this model is text-conditional: give prompts (--prompt TEXT)")
    if kind == "none" and (labels is not None or prompts is not None):
        raise ValueError("this model is unconditional: drop --class / --classes / --prompt")
    if kind == "class":
        cond = conditioner.from_labels(torch.as_tensor(labels, dtype=torch.long))
    elif kind == "text":
        cond = conditioner.from_prompts(list(prompts))
    else:
        cond = {}
    uncond = conditioner.null(num) if kind != "none" else None
    fn = cfg_denoiser(denoiser, cond, uncond, float(cfg))
    x_T = torch.randn((num, *latent_shape), generator=torch.Generator().manual_seed(seed)).to(device)  # (N, c, h, w)
    g = torch.Generator(device).manual_seed(seed + 1)
    z = get_sampler(sampler)(fn, x_T, denoiser.schedule, steps, generator=g, **sampler_options)  # (N, c, h, w)
    z = z.float() / autoencoder.scale_factor + autoencoder.shift_factor  # undo (z - shift) * scale
    return autoencoder.decode(z.to(next(autoencoder.parameters()).device)).float().clamp(-1, 1)  # (N, C, H, W)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    return ((images.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one (rows*(H+pad)+pad, ...) uint8 (H', W', C) grid, `nrow` images a row."""
    a = to_uint8(images)  # (N, H, W, C)
    n, h, w, c = a.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = a[i]
    return grid


def save_png(a: np.ndarray, path: Path) -> None:
    from PIL import Image
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(path)


def slug(text: str, max_len: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].strip("-")
    return s or "empty"


def parse_classes(spec: str) -> list[int]:
    """'0-9' -> [0..9]; '1,3,5' -> [1, 3, 5]; '0-2,7' -> [0, 1, 2, 7]."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"--classes {spec!r}: expected ranges like '0-9' or lists like '1,3,5'")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise ValueError(f"--classes {spec!r}: range {a}-{b} is empty")
        out.extend(range(a, b + 1))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-lightning sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="diffusion .ckpt from `ldm-lightning fit`, or an export folder")
    p.add_argument("--autoencoder", default=None, help="autoencoder path (default: the one recorded at training)")
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = conditional only)")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--class", dest="cls", type=int, default=None, help="one class index")
    cond.add_argument("--classes", default=None, help="classes, e.g. 0-9 or 1,3,5 (--num samples each)")
    cond.add_argument("--prompt", default=None, help="a text prompt")
    p.add_argument("--num", type=int, default=4, help="samples per condition")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights (default) or the live ones (--no-ema)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.num < 1 or a.steps < 1:
        raise SystemExit(f"--num and --steps must be >= 1 (got --num {a.num}, --steps {a.steps})")
    from ldm_lightning.autoencoder.load import load_autoencoder

    from .load import load_denoiser
    device = torch.device(a.device)
    denoiser, conditioner, meta = load_denoiser(a.checkpoint, weights="ema" if a.ema else "live")
    denoiser, conditioner = denoiser.to(device).eval(), conditioner.to(device)
    ae_path = a.autoencoder or meta["autoencoder"]["path"]
    if a.autoencoder is None and not Path(ae_path).exists():
        raise SystemExit(f"the autoencoder recorded in the checkpoint ({ae_path}) does not exist here: "
                         "pass --autoencoder PATH")
    ae = load_autoencoder(ae_path, device=device)
    kind = conditioner.cfg.kind
    names, labels, prompts = [], None, None
    if a.cls is not None or a.classes is not None:
        classes = [a.cls] if a.cls is not None else parse_classes(a.classes)
        if kind != "class":
            raise SystemExit(f"this model is {'unconditional' if kind == 'none' else kind + '-conditional'}: "
                             "drop --class / --classes" + (" and give --prompt TEXT" if kind == "text" else ""))
        n_cls = conditioner.cfg.num_classes
        bad = [c for c in classes if not 0 <= c < n_cls]
        if bad:
            raise SystemExit(f"--class {bad[0]} is out of range: this model has {n_cls} classes, "
                             f"give 0-{n_cls - 1} (e.g. --classes 0-{n_cls - 1})")
        labels = [c for c in classes for _ in range(a.num)]
        names = [f"{c}_{i}" for c in classes for i in range(a.num)]
        rows = len(classes)
    elif a.prompt is not None:
        prompts = [a.prompt] * a.num
        names = [f"{slug(a.prompt)}_{i}" for i in range(a.num)]
        rows = 1
    else:
        if kind != "none":
            raise SystemExit(f"this model is {kind}-conditional: give " +
                             ("--class K or --classes A-B" if kind == "class" else "--prompt TEXT"))
        names = [f"sample_{i}" for i in range(a.num)]
        rows = 1
    images = sample_images(denoiser, conditioner, ae, meta["latent_shape"], len(names), a.sampler, a.steps, a.cfg,
                           a.seed, labels=labels, prompts=prompts)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, img in zip(names, to_uint8(images)):
        save_png(img, out / f"{name}.png")
    save_png(make_grid(images, nrow=len(names) // rows), out / "grid.png")
    print(f"wrote {len(names)} samples + grid.png to {out} ({a.sampler}, {a.steps} steps, cfg {a.cfg}, seed {a.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
