"""`ldm-lightning sample`: images from a trained denoiser (a training .ckpt or a `export` folder).

    ldm-lightning sample --checkpoint run/last.ckpt --sampler dpmpp_2m --steps 20 --guidance-scale 3 \
        --classes 0-9 --num 4 --seed 0 --out samples/
    ldm-lightning sample --checkpoint t2i.ckpt --prompts-file prompts.txt --num 4 --out gallery/  # text
    ldm-lightning sample --checkpoint sr.ckpt --cond-images low_res/ --out up/           # super-resolution
    ldm-lightning sample --checkpoint inpaint.ckpt --cond-images imgs/ --masks masks/ --out filled/
    ldm-lightning sample --checkpoint run/last.ckpt --classes 0-9 --size 48 --out big/   # another resolution
    ldm-lightning sample --checkpoint layout.ckpt --layout '[[3, 0.1, 0.1, 0.45, 0.5], [7, 0.5, 0.4, 0.9, 0.9]]' \
        --out laid/                                                                      # layout-to-image
    ldm-lightning sample --checkpoint semantic.ckpt --cond-images maps/ --out synth/     # semantic synthesis

Writes one PNG per sample, `{condition}_{index}.png` (the class index, a slug of the prompt, the
conditioning image's name, or `sample` for an unconditional model), and `grid.png` (one row per condition).
`--size` samples at another resolution than training (convolutional UNet; DiT recomputes its positions).
Concatenation-conditioned models (diffusion/concat.py) take `--cond-images DIR` (PNGs: the low-res images
for super-resolution, the images for inpainting) and, for inpainting, `--masks DIR` (same file names;
white = the pixels to generate), semantic-synthesis models `--cond-images DIR` of class-map PNGs (one class id
per pixel, e.g. the `seg.png` members of `data pack --class-maps`); the output size follows the conditioning images.
Layout models take `--layout` (JSON or a .json file: one layout [[class, x0, y0, x1, y1], ...], {"boxes": ...}, or
a list of layouts, one grid row each; coordinates in [0, 1]). Inpainting encodes the masked images with the
model's autoencoder (its condition) and, unless --no-paste-known, puts the known pixels back into the decoded
samples. Deterministic for a seed: the
initial noise is drawn on the CPU from `--seed` (so it does not depend on the device), ancestral noise
from a generator seeded by `--seed + 1`. This file is the command line only; sampling itself is sampling.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import torch

from ldm_lightning.errors import UserError
from ldm_lightning.finite import finite_float
from ldm_lightning.images import image_grid, read_png, save_png, to_hwc_uint8
from ldm_lightning.output_paths import prepare_output_dir

from .presets import latent_grid_step
from .concat import paste_known
from .samplers import SAMPLERS
from .sampling import SamplingConfig, default_device, load_pipeline


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


def read_concat_inputs(a, cond_cfg, autoencoder, step: int) -> tuple[torch.Tensor, list[str], list[int], tuple | None]:
    """(c_concat (n, C_cat, h, w), file stems, [h, w], known) from --cond-images (and --masks for inpainting);
    `step`: the output side must be a multiple of it (autoencoder factor x the backbone's grid step); `known`:
    inpainting's (images (n, C, H, W), masks (n, 1, H, W)) for pasting the known pixels back, else None."""
    from .concat import build_c_concat, mask_image
    task = cond_cfg.concat
    what = {"super_resolution": "low-resolution images", "inpainting": "images to inpaint",
            "semantic": "class maps (one class id per pixel)"}[task]
    if a.cond_images is None:
        raise SystemExit(f"this model is conditioned on {what} ({task}): give --cond-images DIR of PNGs")
    files = sorted(Path(a.cond_images).glob("*.png")) if Path(a.cond_images).is_dir() else []
    if not files:
        raise SystemExit(f"--cond-images {a.cond_images}: no .png files there (expected the {what})")
    if task == "semantic":
        return read_class_maps(files, cond_cfg.map_classes, step, a.ae_factor)
    imgs = [read_png(p, int(autoencoder.config.in_channels)) for p in files]
    if len({tuple(i.shape) for i in imgs}) != 1:
        raise SystemExit(f"--cond-images {a.cond_images}: the images differ in size; give images of one size")
    x = torch.stack(imgs)  # (n, C, H, W)
    H, W = x.shape[-2:]
    if task == "super_resolution":
        H, W = H * cond_cfg.sr_factor, W * cond_cfg.sr_factor  # output size
    if H % step or W % step:
        raise SystemExit(f"--cond-images: output size {H}x{W} is not a multiple of {step} for this model")
    f = a.ae_factor
    hw = [H // f, W // f]
    if task == "super_resolution":
        if a.masks is not None:
            raise SystemExit("--masks is for inpainting models; this one does super-resolution")
        return build_c_concat(task, tuple(hw), low_res=x), [p.stem for p in files], hw, None
    if a.masks is None:
        raise SystemExit("this model inpaints: give --masks DIR (PNGs named as the --cond-images; white = generate)")
    masks = []
    for p in files:
        mp = Path(a.masks) / p.name
        if not mp.is_file():
            raise SystemExit(f"--masks {a.masks}: no mask {p.name} for --cond-images {p}")
        m = (read_png(mp, 1) > 0).float()  # (1, H, W): white (> mid-grey) = generate
        if m.shape[-2:] != x.shape[-2:]:
            raise SystemExit(f"mask {mp} is {m.shape[-1]}x{m.shape[-2]}, its image {W}x{H}: give masks of the same size")
        masks.append(m)
    mask = torch.stack(masks)  # (n, 1, H, W)
    c = build_c_concat(task, tuple(hw), masked=mask_image(x, mask), mask=mask, autoencoder=autoencoder)
    return c, [p.stem for p in files], hw, (x, mask)


def read_class_maps(files: list[Path], map_classes: int, step: int, f: int):
    """Semantic synthesis: (c_concat, stems, [h, w], None) of class-map PNGs (8-bit, one class id per pixel); None:
    no known pixels to paste back (read_concat_inputs' `known`)."""
    import numpy as np
    from PIL import Image

    from .concat import build_c_concat
    maps = []
    for p in files:
        with Image.open(p) as img:
            if img.mode not in ("L", "P"):
                raise UserError(f"class map {p} is a {img.mode} image; give 8-bit single-channel PNGs holding one "
                                "class id per pixel (e.g. the seg.png of `data pack --class-maps`)")
            m = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W)
        if int(m.max()) >= map_classes:
            raise UserError(f"class map {p} holds class id {int(m.max())}; this model knows ids 0-{map_classes - 1} "
                            "(0 = background)")
        maps.append(m)
    if len({tuple(m.shape) for m in maps}) != 1:
        raise UserError("--cond-images: the class maps differ in size; give maps of one size")
    H, W = maps[0].shape
    if H % step or W % step:
        raise UserError(f"--cond-images: class maps of {W}x{H} px; this model needs sides that are multiples of {step}")
    hw = [H // f, W // f]
    return build_c_concat("semantic", tuple(hw), class_map=torch.stack(maps), map_classes=map_classes), \
        [p.stem for p in files], hw, None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-lightning sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="diffusion .ckpt from `ldm-lightning fit`, or an export folder")
    p.add_argument("--autoencoder", default=None, help="autoencoder path (default: the one recorded at training)")
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", "--cfg", dest="guidance_scale", type=finite_float, default=1.0,
                   help="classifier-free guidance scale (1 = conditional only); --cfg is the short alias")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--class", dest="cls", type=int, default=None, help="one class index")
    cond.add_argument("--classes", default=None, help="classes, e.g. 0-9 or 1,3,5 (--num samples each)")
    cond.add_argument("--prompt", default=None, help="a text prompt")
    cond.add_argument("--prompts-file", "--prompts_file", dest="prompts_file", default=None,
                      help="a file of text prompts, one a line: --num samples each, every prompt with the same "
                           "seeds (a row per prompt; the validation gallery's layout)")
    cond.add_argument("--layout", default=None,
                      help="layout models: boxes [[class, x0, y0, x1, y1], ...] (coordinates in [0, 1]) as JSON, or "
                           "a .json file of one layout, {\"boxes\": ...}, or a list of layouts (one grid row each)")
    p.add_argument("--num", type=int, default=4, help="samples per condition")
    p.add_argument("--size", type=int, default=None,
                   help="image side in pixels (default: the training size); a multiple of the latent grid's step")
    p.add_argument("--cond-images", default=None,
                   help="folder of PNGs for a concatenation-conditioned model: low-res images (super-resolution) "
                        "or the images to inpaint")
    p.add_argument("--masks", default=None, help="inpainting: folder of mask PNGs named as --cond-images "
                                                 "(white = generate)")
    p.add_argument("--paste-known", action=argparse.BooleanOptionalAction, default=True,
                   help="inpainting: put the known pixels of --cond-images back into the decoded samples (default; "
                        "the model is conditioned on them, this makes the kept region exact); --no-paste-known "
                        "writes the decoded samples as they are")
    p.add_argument("--encoder-every", type=int, default=1,
                   help="DDT backbones: recompute the condition encoder every K network calls, reuse it between "
                        "(fewer encoder evaluations; 1 = every call)")
    p.add_argument("--time-shift", type=finite_float, default=None,
                   help="flow models: shift s of the sampling grid only, t' = s t / (1 + (s - 1) t) (s > 1: more "
                        "steps at high noise); default: the checkpoint's schedule.sample_shift, else its shift")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights (default) or the live ones (--no-ema)")
    p.add_argument("--device", default=default_device())
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.encoder_every < 1:
        raise SystemExit(f"--encoder-every must be >= 1, got {a.encoder_every}")
    if a.num < 1 or a.steps < 1:
        raise SystemExit(f"--num and --steps must be >= 1 (got --num {a.num}, --steps {a.steps})")
    prepare_output_dir(a.out)  # before the model loads: a bad --out must not cost a sampling run
    pipe = load_pipeline(a.checkpoint, a.autoencoder, a.device, weights="ema" if a.ema else "live")
    denoiser, conditioner, ae, meta = pipe.denoiser, pipe.conditioner, pipe.autoencoder, pipe.meta
    if a.time_shift is not None:  # the sampling grid only (schedules.FlowSchedule.sample_shift)
        if denoiser.schedule.kind != "flow" or a.time_shift <= 0:
            raise UserError(f"--time-shift {a.time_shift}: " + ("give a shift > 0" if denoiser.schedule.kind == "flow"
                            else "this model's schedule is VP (discrete timesteps); drop --time-shift"))
        denoiser.schedule.sample_shift = a.time_shift
    if a.encoder_every > 1 and meta["backbone_family"] != "ddt":
        raise SystemExit(f"--encoder-every {a.encoder_every} reuses a DDT's condition encoder; this checkpoint's "
                         f"backbone is a {meta['backbone_family']} (drop the option)")
    kind = conditioner.cfg.kind
    latent_shape = pipe.latent_shape
    f = ae.downsample_factor
    bb = denoiser.backbone.cfg  # the latent grid step: DiT patches, UNet halvings
    step = f * latent_grid_step(meta["backbone_family"], dataclasses.asdict(bb))
    if a.size is not None:
        if conditioner.cfg.concat != "none":
            raise SystemExit("--size: a concatenation-conditioned model samples at the size its --cond-images give")
        if a.size < step or a.size % step:
            raise SystemExit(f"--size {a.size} must be a positive multiple of {step} for this model (autoencoder "
                             f"factor {f} x the {meta['backbone_family']}'s grid step)")
        latent_shape[1:] = [a.size // f, a.size // f]
    c_concat, stems, known = None, None, None
    a.ae_factor = f
    if conditioner.cfg.concat != "none":
        c_concat, stems, latent_shape[1:], known = read_concat_inputs(a, conditioner.cfg, ae, step)
    elif a.cond_images is not None or a.masks is not None:
        raise SystemExit("--cond-images / --masks: this model has no concatenation conditioning "
                         "(conditioning.concat is 'none')")
    names, labels, prompts, layouts = [], None, None, None
    if stems is not None:  # one row per conditioning image, --num samples each
        names = [f"{s}_{i}" for s in stems for i in range(a.num)]
        c_concat = c_concat.repeat_interleave(a.num, 0)  # (N, C_cat, h, w)
        rows = len(stems)
        if kind == "class":
            if a.cls is None:
                raise SystemExit("this model is also class-conditional: give --class K (applied to every image)")
            labels = [a.cls] * len(names)
        elif kind == "text":
            if a.prompt is None:
                raise SystemExit("this model is also text-conditional: give --prompt TEXT (applied to every image)")
            prompts = [a.prompt] * len(names)
        elif kind == "layout":
            if a.layout is None:
                raise SystemExit("this model is also layout-conditional: give --layout (applied to every image)")
            from .layout import read_layouts
            layouts = [read_layouts(a.layout)[0]] * len(names)
    elif a.cls is not None or a.classes is not None:
        classes = [a.cls] if a.cls is not None else parse_classes(a.classes)
        names = [f"{c}_{i}" for c in classes for i in range(a.num)]
        labels = [c for c in classes for _ in range(a.num)]
        rows = len(classes)
    elif a.prompts_file is not None:
        if kind != "text":
            what = "unconditional" if kind == "none" else kind + "-conditional"
            raise UserError(f"--prompts-file: this model is {what}, not text-conditional: drop --prompts-file")
        from .prompt_gallery import read_prompts_file
        gallery = read_prompts_file(a.prompts_file, "--prompts-file")
        prompts = [p for p in gallery for _ in range(a.num)]
        names = [f"{r:03d}-{slug(p)}_{i}" for r, p in enumerate(gallery) for i in range(a.num)]
        rows = len(gallery)
    elif a.layout is not None:
        if kind != "layout":
            raise UserError(f"--layout: this model is {'unconditional' if kind == 'none' else kind + '-conditional'}, "
                            "not layout-conditional: drop --layout")
        from .layout import read_layouts
        given = read_layouts(a.layout)
        for i, lay in enumerate(given):  # every layout checked before sampling: one message for the first bad one
            conditioner.from_layouts([lay], "--layout" if len(given) == 1 else f"--layout {i}")
        layouts = [lay for lay in given for _ in range(a.num)]
        names = [f"layout{r}_{i}" for r in range(len(given)) for i in range(a.num)]
        rows = len(given)
    elif a.prompt is not None:
        if kind != "text":
            raise UserError(f"--prompt: this model is {'unconditional' if kind == 'none' else kind + '-conditional'}, "
                            "not text-conditional: drop --prompt" + (" and give --class K or --classes A-B"
                                                                      if kind == "class" else ""))
        prompts = [a.prompt] * a.num
        names = [f"{slug(a.prompt)}_{i}" for i in range(a.num)]
        rows = 1
    else:
        if kind != "none":
            raise SystemExit(f"this model is {kind}-conditional: give " +
                             {"class": "--class K or --classes A-B", "text": "--prompt TEXT",
                              "layout": "--layout '[[class, x0, y0, x1, y1], ...]' (or a .json file)"}[kind])
        names = [f"sample_{i}" for i in range(a.num)]
        rows = 1
    if labels is not None:
        if kind != "class":
            raise SystemExit(f"this model is {'unconditional' if kind == 'none' else kind + '-conditional'}: "
                             "drop --class / --classes" + (" and give --prompt TEXT" if kind == "text" else ""))
        n_cls = conditioner.cfg.num_classes
        bad = [c for c in labels if not 0 <= c < n_cls]
        if bad:
            raise SystemExit(f"--class {bad[0]} is out of range: this model has {n_cls} classes, "
                             f"give 0-{n_cls - 1} (e.g. --classes 0-{n_cls - 1})")
    config = SamplingConfig(a.sampler, a.steps, a.guidance_scale, a.seed, a.encoder_every)
    if a.prompts_file is not None:  # one call per prompt: column k is the same noise in every row
        images = torch.cat([pipe.sample(a.num, config, latent_shape, prompts=prompts[r * a.num:(r + 1) * a.num])
                            for r in range(rows)])
    else:
        images = pipe.sample(len(names), config, latent_shape, labels=labels, prompts=prompts, c_concat=c_concat,
                             layouts=layouts)
    if known is not None and a.paste_known:  # (N, C, H, W): each image's samples keep its known pixels
        images = paste_known(images, *(t.repeat_interleave(a.num, 0) for t in known))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, img in zip(names, to_hwc_uint8(images)):
        save_png(img, out / f"{name}.png")
    save_png(image_grid(images, nrow=len(names) // rows), out / "grid.png")
    print(f"wrote {len(names)} samples + grid.png to {out} ({a.sampler}, {a.steps} steps, guidance scale "
          f"{a.guidance_scale}, seed {a.seed}, {images.shape[-1]}x{images.shape[-2]} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
