"""`ldm-lightning evaluate`: FID, KID, Inception Score and precision/recall of generated images.

    # score a folder / shards / .npz of samples against reference statistics (ADM's, pytorch-fid's or ours)
    ldm-lightning evaluate --images samples/ --reference VIRTUAL_imagenet256_labeled.npz \
        --extractor inception --weights weights-inception-2015-12-05-6726825d.pth --out fid.json
    # sample 50k images from a diffusion checkpoint (sharded over ranks under torchrun) and score them
    torchrun --nproc_per_node 8 -m ldm_lightning evaluate --checkpoint run/last.ckpt --num 50000 \
        --sampler dpmpp_2m --steps 50 --guidance-scale 1.5 --reference ref.npz --weights inception.pth --out fid.json
    # write reference statistics from real images (mu, sigma and the features, for KID and P/R)
    ldm-lightning evaluate --images data/train --save-stats ref.npz --weights inception.pth

Prints one table line and writes the JSON (`--out`). Deterministic: checkpoint samples are drawn in
chunks of `--batch-size`, chunk c from seed `--seed + 2c` whichever rank draws it, so the image set does
not depend on the number of ranks; class-conditional models get classes 0, 1, ..., K-1, 0, ... in turn.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ldm_lightning.errors import UserError
from ldm_lightning.finite import finite_float
from ldm_lightning.output_paths import prepare_output_dir, prepare_output_file
from ldm_lightning.user_errors import EXIT_USER_ERROR, debug_requested, print_user_error

from .extractors import EXTRACTORS, build_extractor
from .generated import features_of_images, features_of_samples
from .image_sources import source_kind
from .scores import METRICS, score_features, table_line
from .reference import ReferenceStats, load_reference, reference_images_in, save_reference


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-lightning evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="images to score: a folder of image files, shards, or an .npz (arr_0)")
    src.add_argument("--checkpoint", help="diffusion .ckpt or export folder: sample --num images and score them")
    p.add_argument("--reference", help="real set: reference-statistics .npz (mu/sigma), image folder or shards")
    p.add_argument("--save-stats", help="write the statistics of --images (real data) to this .npz and exit")
    p.add_argument("--extractor", default="inception", choices=EXTRACTORS)
    p.add_argument("--weights", help="local weights of the extractor (file; a folder for dinov2)")
    p.add_argument("--metrics", default="fid,kid,is,pr", help=f"comma-separated subset of {','.join(METRICS)}")
    p.add_argument("--num", type=int, default=None, help="images to sample (--checkpoint; default 10000) or to read")
    p.add_argument("--reference-num", type=int, default=None, help="use only the first N reference images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", help="result JSON (default: print only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--is-splits", type=int, default=10)
    s = p.add_argument_group("sampling (--checkpoint)")
    s.add_argument("--sampler", default="ddim")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--guidance-scale", type=finite_float, default=1.0,
                   help="classifier-free guidance scale (1 = conditional only)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--prompts", help="text models: a file of prompts, one a line, used in turn")
    s.add_argument("--autoencoder", help="autoencoder path (default: the one recorded at training)")
    s.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights (default)")
    s.add_argument("--save-samples", help="also write the sampled images to this folder as PNGs")
    return p


def _sampler_from_checkpoint(a, device):
    from ldm_lightning.diffusion import SAMPLERS
    from ldm_lightning.diffusion.sampling import SamplingConfig, load_pipeline
    if a.sampler not in SAMPLERS:
        raise ValueError(f"--sampler must be one of {sorted(SAMPLERS)}; got {a.sampler!r}")
    pipe = load_pipeline(a.checkpoint, a.autoencoder, device, weights="ema" if a.ema else "live")

    def sample_fn(n, seed, **cond):
        return pipe.sample(n, SamplingConfig(a.sampler, a.steps, a.guidance_scale, seed), **cond)
    return sample_fn, pipe.conditioner


# ---------------------------------------------------------------------------------------------- main


def _dist() -> tuple[int, int]:
    """(rank, world) — torchrun's env; initialises the process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _reference(a, extractor, rank, world, metrics) -> ReferenceStats | None:
    if a.reference is None:
        return None
    spec = a.reference
    if spec.endswith(".npz") and not _npz_is_image_set(spec):
        ref = load_reference(spec, extractor.name)
        wants_features = any(m in metrics for m in ("kid", "pr"))
        if ref.features is None and wants_features and reference_images_in(spec):
            f, _ = features_of_images(extractor, spec, a.batch_size, a.reference_num, rank, world)
            ref.features, ref.num_images = f.numpy(), len(f)
        return ref
    f, _ = features_of_images(extractor, spec, a.batch_size, a.reference_num, rank, world)
    return ReferenceStats.from_features(f, extractor.name)


def _npz_is_image_set(spec: str) -> bool:
    with np.load(spec) as z:
        return "mu" not in z.files and "arr_0" in z.files


def run(a) -> dict | None:
    metrics = tuple(m.strip() for m in a.metrics.split(",") if m.strip())
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"--metrics must be a comma-separated subset of {','.join(METRICS)}; got {bad}")
    for name in ("batch_size", "kid_subsets", "kid_subset_size", "is_splits", "steps"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(a, name)}")
    if a.num is not None and a.num < 2:
        raise ValueError(f"--num must be >= 2 (scores need a covariance); got {a.num}")
    if a.save_stats and a.images is None:
        raise ValueError("--save-stats writes the statistics of real images: give them with --images")
    for spec in (a.images, a.reference):
        if spec is not None:
            source_kind(spec)  # a clear error before any model loads
    for option, path in (("--out", a.out), ("--save-stats", a.save_stats)):
        if path:
            prepare_output_file(path, option)  # before the work: an hour of sampling must not end in "is a folder"
    if a.save_samples:
        prepare_output_dir(a.save_samples, "--save-samples")
    rank, world = _dist()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if a.device == "cuda" and world > 1
                          else a.device)
    extractor = build_extractor(a.extractor, a.weights, device)
    t0 = time.perf_counter()
    if a.save_stats:
        f, _ = features_of_images(extractor, a.images, a.batch_size, a.num, rank, world)
        if rank == 0:
            save_reference(ReferenceStats.from_features(f, extractor.name), a.save_stats)
            print(f"wrote {a.extractor} statistics of {len(f)} images to {a.save_stats} "
                  f"({time.perf_counter() - t0:.1f}s)")
        return None
    reference = _reference(a, extractor, rank, world, metrics)
    if a.checkpoint is not None:
        sample_fn, conditioner = _sampler_from_checkpoint(a, device)
        prompts = Path(a.prompts).read_text().splitlines() if a.prompts else None
        fake, logits = features_of_samples(extractor, sample_fn, conditioner, a.num or 10000, a.batch_size, a.seed,
                                           rank, world, prompts, a.save_samples)
    else:
        fake, logits = features_of_images(extractor, a.images, a.batch_size, a.num, rank, world)
    result = score_features(fake, logits, reference, metrics, a.kid_subsets, a.kid_subset_size, a.is_splits)
    result.update({"extractor": a.extractor, "weights": str(a.weights), "images": a.images or a.checkpoint,
                   "reference": a.reference, "seconds": time.perf_counter() - t0, "world_size": world})
    if a.checkpoint is not None:
        result.update({"sampler": a.sampler, "steps": a.steps, "guidance_scale": a.guidance_scale, "seed": a.seed,
                       "ema": a.ema})
    if rank == 0:
        print(table_line(result))
        for m, why in result.get("skipped", {}).items():
            print(f"  ({m} skipped: {why})")
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        run(a)
    except (FileNotFoundError, ValueError, UserError) as e:  # the others: user_errors.run_tool (cli.py)
        if debug_requested():
            raise
        print_user_error("ldm-lightning evaluate", str(e))
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
