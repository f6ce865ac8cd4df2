"""`ldm-lightning data encode`: image shards -> latent shards through a frozen autoencoder (LDM's latent cache).

    ldm-lightning data encode --autoencoder ae.ckpt --shards data/mnist/train --out data/mnist-latents/train

Every sample keeps its key, `cls`, `txt` and `json` members and gains `moments.npy`: float32 (2c, h, w),
the posterior mean ‖ logvar, UNSCALED (the trainer applies (z - shift) * scale, so a latent cache stays
valid if only the scale factor changes). `--mode sample` stores one posterior sample as the mean with the
logvar at the clamp floor (a point mass), so readers see one format.

The manifest records the cache's key: the autoencoder's content hash (`autoencoder_hash`: sha256 over its
config and every tensor of its state dict, independent of the file format it was loaded from), its scale /
shift factor and the latent shape, and `preprocess`: how the images were made into the encoder's input
(image_size, resize_mode, random_flip, bucketing). `DiffusionModule` refuses latent shards whose key
differs from its configuration (`check_latent_manifest`): another autoencoder, or a data config that asks
for another resolution, crop, flip or bucketing than the cache was encoded with, which would otherwise
train silently on latents of the wrong geometry (kohya-ss/sd-scripts #1771).

Distributed: rank r of W (RANK / WORLD_SIZE, as torchrun and Slurm set them) encodes input shards
r, r + W, ...; each shard is written to a temporary name and renamed (atomic), with a per-shard record
in `.encode-state/`. Whichever rank sees all records first writes the manifest (the same bytes from any
rank, written atomically), so no rank waits for another and nothing is rank-0-only.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from ldm_lightning.autoencoder.hashing import autoencoder_hash
from ldm_lightning.data.shards import MANIFEST
from ldm_lightning.errors import UserError

STATE_DIR = ".encode-state"
LATENT_FORMAT = "ldm-lightning-latents/1"
MODES = ("moments", "sample")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------
# the check the trainer runs (the autoencoder's identity is autoencoder/hashing.py)
# ------------------------------------------------------------------------------------------------
class LatentCacheMismatch(UserError, ValueError):
    """A latent cache whose key (autoencoder, resolution, crop, flip, buckets) differs from the configuration."""


# The data config fields a latent cache is keyed by, and the `data encode` option that sets each.
PREPROCESS_OPTIONS = {"image_size": "--image-size", "resize_mode": "--resize-mode", "random_flip": None,
                      "bucketing": None}


def check_preprocess(manifest: dict, want: dict, where: str = "latent shards") -> None:
    """Raise LatentCacheMismatch naming both values and the fix when the data config `want` ({image_size,
    resize_mode, random_flip, bucketing} of data.init_args) asks for images made otherwise than the cached
    ones. Manifests written before `preprocess` was recorded are checked on image_size only."""
    have = dict(manifest.get("preprocess") or {"image_size": manifest.get("image_size")})
    diffs = [(k, want[k], have[k]) for k in PREPROCESS_OPTIONS if k in want and k in have and have[k] != want[k]]
    if not diffs:
        return
    what = "; ".join(f"data.{k}={w!r}, but the cache was encoded with {k}={h!r}" for k, w, h in diffs)
    redo = " ".join(f"{PREPROCESS_OPTIONS[k]} {w}" for k, w, _ in diffs if PREPROCESS_OPTIONS[k])
    fixes = [f"re-encode with `ldm-lightning data encode --autoencoder AE --shards IMAGES --out DIR {redo}`"] \
        if redo else []
    fixes.append("set " + ", ".join(f"data.{k}: {h!r}" for k, _, h in diffs) + " to train on the cache as it is"
                 + (" (a cache holds one unflipped, unbucketed encoding of each image)" if len(fixes) == 0 else ""))
    raise LatentCacheMismatch(f"{where} do not match the data config: {what}. Training on them would silently "
                              f"use latents of another resolution, crop or augmentation. Fix: {', or '.join(fixes)}")


def check_latent_manifest(manifest: dict | str | os.PathLike, ae_hash: str, autoencoder: str = "",
                          preprocess: dict | None = None) -> dict:
    """Raise LatentCacheMismatch (a ValueError) naming both values when latent shards were encoded by another
    autoencoder, or (`preprocess`: the data config's image_size, resize_mode, random_flip, bucketing) from
    images made otherwise (`check_preprocess`)."""
    where = str(manifest) if not isinstance(manifest, dict) else "latent shards"
    if not isinstance(manifest, dict):
        manifest = json.loads(Path(manifest).read_text())
    enc = manifest.get("autoencoder")
    if not isinstance(enc, dict) or "hash" not in enc:
        raise ValueError(f"{where}: not a latent-shard manifest (no 'autoencoder.hash'); latent shards must be "
                         "written by `ldm-lightning data encode`, or train on image shards (data.kind='image')")
    if enc["hash"] != ae_hash:
        raise LatentCacheMismatch(
            f"{where} were encoded by autoencoder hash {enc['hash'][:16]}... ({enc.get('path', '?')}), but the "
            f"configured model.autoencoder {autoencoder!r} has hash {ae_hash[:16]}...; the latents would be "
            "meaningless to its decoder. Re-encode with `ldm-lightning data encode --autoencoder "
            f"{autoencoder or 'AE'} ...`, or set model.autoencoder to the autoencoder the shards were made with")
    if preprocess is not None:
        check_preprocess(manifest, preprocess, where)
    return manifest


# ------------------------------------------------------------------------------------------------
# shard writing
# ------------------------------------------------------------------------------------------------
def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


@torch.no_grad()
def encode_batch(ae, images: torch.Tensor, mode: str, dtype: torch.dtype,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, 2c, h, w) float32 moments (mean ‖ logvar), unscaled.

    bf16 runs the encoder under autocast (never fp16: its range overflows in VAE encoders)."""
    from ldm_lightning.autoencoder.distributions import LOGVAR_MIN
    dev = images.device
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
        post = ae.encode(images)
    if mode == "moments":
        return torch.cat([post.mean.float(), post.logvar.float()], dim=1)  # (B, 2c, h, w)
    z = post.sample(generator=generator).float()  # (B, c, h, w)
    return torch.cat([z, torch.full_like(z, LOGVAR_MIN)], dim=1)


def _encode_shard(ae, url: str, final: Path, transform, args, device) -> dict:
    from ldm_lightning.data.shardwriter import ShardWriter, UnsafeName, check_key
    from ldm_lightning.data.tario import iter_samples
    from ldm_lightning.data.transforms import BadSample
    from ldm_lightning.images import to_model_range

    # Posterior samples (--mode sample) are a pure function of (seed, shard name): re-runs are identical.
    g = torch.Generator(device=device).manual_seed(int.from_bytes(
        hashlib.blake2b(f"{args.seed}|{final.name}".encode(), digest_size=7).digest(), "little"))
    skipped, latent_shape = [], None

    def flush(writer, pending):
        nonlocal latent_shape
        x = to_model_range(np.stack([p[1] for p in pending])).to(device)  # (B, C, H, W) in [-1, 1]
        m = encode_batch(ae, x, args.mode, DTYPES[args.dtype], g).cpu().numpy()  # (B, 2c, h, w)
        latent_shape = [m.shape[1] // 2, m.shape[2], m.shape[3]]
        for (s, _), mom in zip(pending, m):
            members = {ext: s[ext] for ext in ("cls", "txt", "json") if ext in s}
            writer.add(s["__key__"], {"moments.npy": _npy_bytes(np.ascontiguousarray(mom)), **members})

    with ShardWriter(final) as writer:
        pending = []
        try:
            for s in iter_samples(url):
                try:
                    check_key(s["__key__"])  # a hostile input shard's '../x' or '/etc/x' is not copied
                    pending.append((s, transform(s, None)))  # uint8 (C, H, W)
                except (BadSample, UnsafeName) as e:
                    skipped.append({"source": s["__key__"], "reason": str(e)})
                    continue
                if len(pending) == args.batch_size:
                    flush(writer, pending)
                    pending = []
        except (EOFError, ValueError, OSError) as e:  # a truncated or damaged input shard: keep what was read
            print(f"warning: {url}: {e}; the rest of this shard is skipped (listed in the manifest)", file=sys.stderr)
            skipped.append({"source": url, "reason": f"unreadable after this point: {e}"})
        if pending:
            flush(writer, pending)
    return {**writer.record, "skipped": skipped, "latent_shape": latent_shape}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-lightning data encode", description=__doc__.split("\n\n")[0])
    p.add_argument("--autoencoder", required=True, help="autoencoder: .ckpt, export folder, diffusers folder")
    p.add_argument("--shards", required=True, help="image shards: a directory with manifest.json, glob or list")
    p.add_argument("--out", required=True, help="output directory for the latent shards + manifest.json")
    p.add_argument("--mode", default="moments", choices=MODES,
                   help="store posterior moments (default; the trainer samples each step) or one sample")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=None, help="default: the autoencoder's resolution")
    p.add_argument("--resize-mode", default="pad", help="as ShardDataModule.resize_mode (default pad)")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="encoder precision (never fp16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of --mode sample draws")
    p.add_argument("--text-encoders", default=None,
                   help="also cache each caption's text-encoder outputs (diffusion/text_cache.py): the model's "
                        "conditioning.text_encoders as YAML, e.g. '[{path: models/clip, layer: penultimate}]', or "
                        "'default' for the bundled MiniLM (conditioning.text_encoder unset)")
    p.add_argument("--text-max-length", type=int, default=32,
                   help="conditioning.max_length: tokens of an encoder whose entry sets no max_length")
    p.add_argument("--text-dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                   help="stored dtype of cached token states and pooled vectors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    from ldm_lightning.autoencoder.load import load_autoencoder
    from ldm_lightning.data.shards import resolve_shards
    from ldm_lightning.data.shardwriter import atomic_write_json, manifest_entry
    from ldm_lightning.data.transforms import ImageTransform

    device = torch.device(args.device)
    ae = load_autoencoder(args.autoencoder, device=device).eval().requires_grad_(False)
    ae_hash = autoencoder_hash(ae)
    size = args.image_size or int(ae.config.resolution)
    if size % ae.downsample_factor:
        raise SystemExit(f"--image-size {size} is not divisible by the autoencoder's downsampling factor "
                         f"{ae.downsample_factor}")
    transform = ImageTransform(size, int(ae.config.in_channels), args.resize_mode, False)
    shards = resolve_shards(args.shards)
    if not shards:
        raise SystemExit(f"--shards {args.shards!r} names no shards")
    names = [os.path.basename(s.url.split()[-1] if s.url.startswith("pipe:") else s.url) for s in shards]
    if len(set(names)) != len(names):
        raise SystemExit("--shards: input shard names must be unique (outputs keep the input names)")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    out = Path(args.out)
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    text = None
    if args.text_encoders:
        from . import text_cache
        text = text_cache.text_encoders_from_option(args.text_encoders, args.text_max_length)
        text_cache.write_table(text, [""], out / text_cache.TEXT_CACHE_DIR / text_cache.EMPTY_TABLE, device,
                               args.text_dtype)
    for i in range(rank, len(shards), world):
        rec = _encode_shard(ae, shards[i].url, out / names[i], transform, args, device)
        if text is not None:  # the shard's distinct captions, read back from the latent shard just written
            table = out / text_cache.TEXT_CACHE_DIR / f"{names[i]}.safetensors"
            rec["text_captions"] = text_cache.write_table(text, text_cache.shard_captions(str(out / names[i])),
                                                          table, device, args.text_dtype)
        atomic_write_json(out / STATE_DIR / f"{names[i]}.json", rec, indent=1)
        print(f"[rank {rank}] encoded {names[i]}: {rec['num_samples']} samples", flush=True)

    recs = [out / STATE_DIR / f"{n}.json" for n in names]
    if not all(r.is_file() for r in recs):
        return 0  # another rank is still encoding; the last one to finish writes the manifest
    recs = [json.loads(r.read_text()) for r in recs]
    shapes = {tuple(r["latent_shape"]) for r in recs if r["latent_shape"]}
    if len(shapes) > 1:
        raise SystemExit(f"latent shapes differ between shards: {sorted(shapes)}")
    manifest = {
        "format": LATENT_FORMAT,
        "kind": "latent",
        "num_samples": sum(r["num_samples"] for r in recs),
        "shards": [manifest_entry(r) for r in recs],
        "latent_shape": list(shapes.pop()) if shapes else None,
        "mode": args.mode,
        "autoencoder": {"hash": ae_hash, "path": str(args.autoencoder), "scale_factor": float(ae.scale_factor),
                        "shift_factor": float(ae.shift_factor), "config": ae.config.to_dict()},
        "image_size": size,
        "preprocess": {"image_size": size, "resize_mode": args.resize_mode, "random_flip": False, "bucketing": None},
        "source": str(args.shards),
        "skipped": [s for r in recs for s in r["skipped"]],
    }
    if text is not None:
        manifest["text"] = text_cache.manifest_section(text, args.text_dtype)
    atomic_write_json(out / MANIFEST, manifest, indent=1)
    skipped = manifest["skipped"]
    print(f"encoded {manifest['num_samples']} samples into {len(recs)} latent shards in {out} "
          f"(latent {manifest['latent_shape']}, autoencoder {ae_hash[:12]}); skipped {len(skipped)}")
    if text is not None:
        t = manifest["text"]
        print(f"cached text embeddings of {sum(r.get('text_captions', 0) for r in recs)} distinct captions in "
              f"{out / t['dir']} ({t['bytes_per_caption']} bytes each, {args.text_dtype})")
    for s in skipped[:10]:  # never silently: the reasons, as `data pack` prints them
        print(f"  skipped {s['source']}: {s['reason']}")
    if skipped and manifest["num_samples"] == 0:
        print(f"error: every sample was skipped (first reason above); nothing usable in {out}. Fix the input or "
              "the options (e.g. --resize-mode center_crop for images larger than --image-size)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
