"""`ShardDataModule`: the LightningDataModule both training stages read from (see stream.py for the design).

YAML (under `data:` of a `ldm-lightning fit` config):

    data:
      class_path: ldm_lightning.data.ShardDataModule
      init_args: {train_shards: data/mnist/train, val_shards: data/mnist/test, batch_size: 64, image_size: 32}
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections import Counter
from typing import Iterator, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ldm_lightning.data.bucket_stream import BucketStream, _distributed
from ldm_lightning.data.buckets import BucketConfig, Buckets
from ldm_lightning.data.global_buckets import GlobalBucketStream
from ldm_lightning.data.global_order import ORDERS, GlobalOrderStream
from ldm_lightning.data.jpeg import JPEG_DECODERS
from ldm_lightning.data.jpeg import available as jpeg_available
from ldm_lightning.data.datamodule_groups import FLAT_NAMES, LoaderConfig, MembersConfig, regroup
from ldm_lightning.data.members import MemberSpec
from ldm_lightning.data.shard_check import (SHARD_CHECKS, ShardChangedError, changed_message, check_shards, merge_checks,
                                            notes)
from ldm_lightning.data.shards import resolve_shards
from ldm_lightning.data.stream import KEY, BadDataError, ShardStream
from ldm_lightning.data.transforms import RESIZE_MODES, BadSample, ImageTransform, ResizeMode
from ldm_lightning.errors import UserError
from ldm_lightning.hparams import init_hparams
from ldm_lightning.images import to_model_range

KINDS = ("image", "latent")


class ElasticResumeError(UserError):
    """A checkpoint's data position that this run's batch size × world size cannot continue exactly."""


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _as_built(batch: dict) -> dict:
    """The stream builds whole batches; torch's default (`default_convert`) would turn numpy arrays into
    tensors inside the worker, i.e. into shared-memory segments."""
    return batch


class _TrainLoader(DataLoader):
    """A DataLoader that tells its stream where each epoch starts, and strips the per-batch bad count."""

    PREFETCH = 2  # batches in flight per worker

    def __init__(self, dataset: ShardStream, dm: "ShardDataModule", num_workers: int, pin_memory: bool = False):
        super().__init__(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False,
                         pin_memory=pin_memory,
                         prefetch_factor=self.PREFETCH if num_workers else None, collate_fn=_as_built)
        self._dm = dm

    def __iter__(self) -> Iterator[dict]:
        epoch, consumed = self._dm._begin_epoch(len(self.dataset))
        self.dataset.set_position(epoch, consumed)  # pickled into the workers by super().__iter__()
        if self.num_workers and self._dm.reuse_batch_memory:
            self.dataset.use_batch_ring(self.PREFETCH + 2)  # in flight, being built, and one held by the consumer
        return self._wrap(super().__iter__())

    # Lightning treats loaders with state_dict/load_state_dict as resumable (and stores their state in the
    # loop state too). Both paths hold the DataModule's position, so restoring twice is idempotent.
    def state_dict(self) -> dict:
        return self._dm.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._dm.load_state_dict(state)

    def _wrap(self, it) -> Iterator[dict]:
        bad: Counter = Counter()  # this epoch's bad samples per shard
        filtered = 0  # this epoch's samples left out by data.filters
        try:
            for batch in it:
                lent = "ring_slot" in batch
                batch = self.dataset.from_worker(batch)
                if lent and self.pin_memory and torch.cuda.is_available():  # a ring buffer (after the pin thread): its own pinned copy, which
                    batch["image"] = batch["image"].pin_memory()  # also hands the buffer back at once
                self._dm.bad_samples += int(batch.pop("bad_samples"))
                filtered += int(batch.pop("filtered_samples", 0))
                bad.update(batch.pop("bad_shards", {}))
                if self._dm.trainer is None:  # no Lightning: a batch is consumed when it is handed out
                    self._dm._consumed += 1
                yield batch
        except BadDataError as e:  # from a worker, torch wraps it in the worker's traceback: keep the message
            raise BadDataError(str(e).strip().splitlines()[-1].removeprefix(
                f"{BadDataError.__module__}.BadDataError: ").removeprefix("BadDataError: ")) from None
        self._dm.filtered_samples += filtered
        if filtered:
            print(f"data: epoch {self._dm._epoch}: {filtered} samples left out by data.filters (run total "
                  f"{self._dm.filtered_samples})", file=sys.stderr, flush=True)
        if bad:
            shards = ", ".join(f"{os.path.basename(u)} ({n})" for u, n in bad.most_common(5))
            print(f"data: epoch {self._dm._epoch}: {sum(bad.values())} bad samples skipped (run total "
                  f"{self._dm.bad_samples}); shards: {shards}{' ...' if len(bad) > 5 else ''}", file=sys.stderr,
                  flush=True)


class _ValBatches(Dataset):
    """Validation: the first `val_samples` usable samples of the val shards (listed order), split evenly
    across ranks (sample i → rank i % world), batched; decoded on access (deterministic transforms)."""

    def __init__(self, records: list[tuple], stream: ShardStream, batch_size: int):
        self.records, self.stream, self.bs = records, stream, batch_size

    def __len__(self) -> int:
        return (len(self.records) + self.bs - 1) // self.bs

    def __getitem__(self, i: int) -> dict:
        recs = self.records[i * self.bs:(i + 1) * self.bs]
        rows = self.stream.new_batch(len(recs))
        cls, txt, crops = zip(*(self.stream.fill(r, rows, n, None) for n, r in enumerate(recs)))
        batch = self.stream.collate(rows.data, list(cls), list(txt), [r[KEY] for r in recs], None, crops=list(crops),
                                    maps=rows.maps)
        batch.pop("bad_samples")
        batch.pop("filtered_samples")
        return batch


class ShardDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        batch_size: int = 64,
        num_workers: int = 2,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        image_size: int = 32,
        channels: int = 1,
        resize_mode: ResizeMode = "pad",
        random_flip: bool = False,
        val_samples: int = 1000,
        kind: Literal["image", "latent"] = "image",
        max_bad_fraction: float = 0.01,
        alpha_background: int = 255,
        rank: int | None = None,
        world_size: int | None = None,
        bucketing: dict | None = None,
        jpeg_decoder: str = "torchvision",
        shard_check: Literal["strict", "warn", "off"] = "strict",
        order: Literal["slots", "global"] = "slots",
        members: MembersConfig = MembersConfig(),
        loader: LoaderConfig = LoaderConfig(),
        # deprecated flat names of the grouped options (one release; datamodule_groups.regroup)
        val_batch_size: int | None = None,
        normalize_on_device: bool | None = None,
        reuse_batch_memory: bool | None = None,
        pin_memory: bool | None = None,
        image_exts: list[str] | None = None,
        caption_exts: list[str] | None = None,
        caption_key: str | None = None,
        class_exts: list[str] | None = None,
        class_key: str | None = None,
        filters: list[str] | None = None,
        latent_exts: list[str] | None = None,
    ):
        """
        Args:
            train_shards: Training shards: a directory, a glob, a brace pattern
                (`dir/shard-{000000..000011}.tar`), an http(s) URL of a shard or of a directory, a `pipe:`
                command, a manifest file (`.../manifest.json`, e.g. written by `data index --out`), or a
                list of these. Sample counts come from manifest.json next to the shards, else from
                img2dataset's `_stats.json` / `.parquet` or a `sizes.json` (see data/shards.py); for other
                shards run `ldm-lightning data index DIR` once.
            val_shards: Validation shards (same forms); None disables validation.
            batch_size: Samples per batch per rank (batches are built inside the workers).
            num_workers: DataLoader worker processes per rank; needs world_size × num_workers ≤ shards.
            seed: Seed of shard order, sample shuffle and augmentation (the stream is a pure function of
                seed, epoch, rank, world size and worker).
            shuffle_buffer: Size of the seeded sample shuffle buffer per worker (1 = no sample shuffle).
            image_size: Output height = width in pixels.
            channels: 1 (grayscale) or 3 (RGB; grayscale sources are replicated).
            resize_mode: 'pad' (center on a black canvas; MNIST 28 → 32), 'resize' (to image_size²),
                'center_crop' or 'random_crop' (shorter side → image_size, then a square crop).
            random_flip: Random horizontal flip (seeded, part of the deterministic stream).
            val_samples: Size of the fixed validation subset (the first usable samples of val_shards).
            kind: 'image' (batches carry `image`) or 'latent' (batches carry `moments` from moments.npy).
            max_bad_fraction: Stop with an error when more than this fraction of a reader slot's samples
                are unusable (undecodable, missing key, wrong size, or missing from a shard that holds
                fewer samples than its manifest lists, e.g. a truncated one). Bad samples are counted
                (`data/bad_samples`, summed over ranks, logged by the stage modules' `TrainingModule`) and
                summed up per shard in a line at each epoch's end.
            alpha_background: Gray level (0–255) that images with transparency are composited onto
                (255: white, as image viewers show them). 16-bit images are scaled to 8 bits.
            rank: Override the data-parallel rank (tests/tools; default: from the trainer / torch.distributed / RANK).
            world_size: Override the world size (default: from the trainer / torch.distributed / WORLD_SIZE).
            bucketing: Aspect-ratio bucketing (SDXL / NovelAI style), off when null: a mapping
                `{target_pixels, divisor, max_aspect}` (data/buckets.py: pixels per image, the multiple every
                side is of, the largest aspect). Each training sample goes to the bucket nearest its aspect
                (from the image header), is scaled to cover it and cropped (random with resize_mode
                'random_crop', else centered; random_flip applies), and every batch comes from one bucket,
                the same on all ranks at each step. The epoch stays exact and resumable, at a cost printed
                at start-up: samples left over in partially filled buckets each epoch (bucket_stream.py).
                image_size then sizes only validation (square, center crop). Needs a model that takes
                any size divisible by `divisor` (the UNet and DiT do). Optional `header_cache`: where each
                shard's image sizes are kept so the start-up header pass is paid once, not at every start
                ('auto' = beside the shards if writable, else ~/.cache/ldm-lightning/bucket-headers; a
                folder; null = off; data/header_cache.py), and `split_header_pass` (default true: under DDP
                each rank reads 1/world of the shards not yet cached and the counts are all-gathered).
            jpeg_decoder: 'torchvision' (default) decodes 3-channel JPEGs with `torchvision.io.decode_jpeg`
                straight into the batch's (3, H, W) layout: measured faster than PIL and pixel-identical on
                256² photos (benchmarks/bench_loader_foreign.py; docs/benchmarks.md). Grayscale, CMYK or
                truncated JPEGs, other formats, and machines without torchvision's image support use PIL.
                'pil': PIL for everything.
            shard_check: What to do, once at start-up, when a local shard differs from its manifest (missing;
                another size; its first or last 64 KiB differ; another modification time where the manifest
                has no sampled hash to tell a copy from a replacement; data/shard_check.py): 'strict' stops
                with a message naming the shards and the fix (exit 2); 'warn' names them and trains on them as
                they are (their unreadable samples count as bad samples); 'off' only says that nothing is
                checked. Every rank checks (one stat and 128 KiB read per shard). http(s) / pipe: shards are
                not checked; full sha256 is `ldm-lightning data verify`'s job.
            order: 'slots' (default): shards are dealt into world_size × num_workers reader slots, each
                reading only its own shards; the order depends on the number of processes. 'global': one
                sample order per epoch, a function of (seed, epoch, global position), rows handed out by
                global batch (batch_size × processes × accumulation), and training noise drawn per global
                row: runs with the same global batch on 1, 2 or N processes train alike, and a checkpoint
                resumes at another world size (docs/training.md "World-size independence"). Costs I/O: every
                reader reads every shard's bytes and image headers (decoding only its rows). With bucketing, every
                global batch comes from one bucket, in the order the global sequence fills them.
            members: Which tar members and json fields make a sample, and the json filters (MembersConfig:
                image_exts, caption_exts, caption_key, class_exts, class_key, filters, latent_exts).
            loader: How batches reach the step (LoaderConfig: val_batch_size, normalize_on_device,
                reuse_batch_memory, pin_memory).
            val_batch_size / normalize_on_device / reuse_batch_memory / pin_memory / image_exts / caption_exts /
                caption_key / class_exts / class_key / filters / latent_exts: deprecated flat names of the
                `loader.*` and `members.*` fields, kept for one release (one deprecation line each).
        """
        arguments = dict(locals())  # before any other local: what init_hparams records
        super().__init__()
        members, loader = regroup(members, loader, {name: arguments[name] for name in FLAT_NAMES})
        checks = [
            ("batch_size", batch_size >= 1, ">= 1"), ("num_workers", num_workers >= 0, ">= 0"),
            ("shuffle_buffer", shuffle_buffer >= 1, ">= 1"), ("image_size", image_size >= 1, ">= 1"),
            ("channels", channels in (1, 3), "1 or 3"), ("resize_mode", resize_mode in RESIZE_MODES,
                                                          " | ".join(RESIZE_MODES)),
            ("val_samples", val_samples >= 1, ">= 1"), ("kind", kind in KINDS, " | ".join(KINDS)),
            ("max_bad_fraction", 0.0 <= max_bad_fraction <= 1.0, "in [0, 1]"),
            ("alpha_background", 0 <= alpha_background <= 255, "a gray level in [0, 255]"),
            ("jpeg_decoder", jpeg_decoder in JPEG_DECODERS, " | ".join(JPEG_DECODERS)),
            ("shard_check", shard_check in SHARD_CHECKS, " | ".join(SHARD_CHECKS)),
            ("order", order in ORDERS, " | ".join(ORDERS)),
            ("members.map_ext", members.map_ext is None or (kind == "image" and not random_flip and bucketing is None),
             "null with kind=latent, random_flip or bucketing (a class map follows no flip or crop)"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"data.{name} must be {allowed}; got {locals()[name]!r}")
        # every argument but the rank overrides and the deprecated flat names (moved into members / loader)
        self.save_hyperparameters(init_hparams(ShardDataModule.__init__, arguments,
                                               {"members": members, "loader": loader},
                                               ignore=("rank", "world_size", *FLAT_NAMES)))
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.shuffle_buffer, self.kind, self.max_bad_fraction = shuffle_buffer, kind, max_bad_fraction
        self.normalize_on_device, self.reuse_batch_memory = loader.normalize_on_device, loader.reuse_batch_memory
        self.pin_memory = loader.pin_memory
        self.shard_check = shard_check
        self.order = order
        self._checked_shards: set[tuple[str, ...]] = set()  # shard lists already checked: once per start
        self.val_samples, self.val_batch_size = val_samples, loader.val_batch_size or batch_size
        self.bucketing = BucketConfig.parse(bucketing)
        self.members = MemberSpec.build(**dataclasses.asdict(members))
        self.filtered_samples = 0
        jpeg_decoder = jpeg_decoder if jpeg_available() else "pil"
        self.transform = ImageTransform(image_size, channels, resize_mode, random_flip, alpha_background, jpeg_decoder)
        self.val_transform = ImageTransform(image_size, channels, "center_crop" if resize_mode == "random_crop"
                                            else resize_mode, False, alpha_background, jpeg_decoder)
        self._rank, self._world = rank, world_size
        self._epoch, self._consumed, self._resume = -1, 0, None
        self._resume_samples: int | None = None  # order 'global': the loaded position in global samples
        self.bad_samples = 0
        self._noted_workers = False  # the num_workers note is printed once
        self._val_cache: dict[tuple[int, int], list[tuple]] = {}

    # --- topology --------------------------------------------------------------------------------
    def rank_world(self) -> tuple[int, int]:
        if self._rank is not None or self._world is not None:
            return self._rank or 0, self._world or 1
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return _rank_world()

    def _stream(self, shards, transform, shuffle: bool, num_workers: int) -> ShardStream:
        rank, world = self.rank_world()
        resolved = resolve_shards(shards)
        self._check_shards(resolved, rank)
        if num_workers > 1 and self.order == "slots" and len(resolved) >= world and world * num_workers > len(resolved):
            # every reader slot needs a shard of its own: fewer workers rather than a refusal
            fitted = len(resolved) // world
            if rank == 0 and not self._noted_workers:
                self._noted_workers = True
                print(f"data: {len(resolved)} shards for world_size={world} × num_workers={num_workers}: using "
                      f"num_workers={fitted} (re-pack with more, smaller shards to use more)", file=sys.stderr,
                      flush=True)
            num_workers = fitted
        kw = {}
        if self.bucketing is not None:  # training only (validation stays square): batches of one bucket each
            t = self.transform
            kw["buckets"] = Buckets(self.bucketing, t.channels, t.mode == "random_crop", t.flip, t.background)
        if self.order == "global":  # with buckets: each global batch from one bucket (data/global_buckets.py)
            stream_type = GlobalBucketStream if kw else GlobalOrderStream
            kw["accumulation"] = self.accumulation()
        else:
            stream_type = BucketStream if kw else ShardStream
        stream = stream_type(
            resolved, self.batch_size, num_workers=num_workers, rank=rank, world_size=world, seed=self.seed,
            shuffle=shuffle, shuffle_buffer=self.shuffle_buffer, kind=self.kind, transform=transform,
            max_bad_fraction=self.max_bad_fraction, uint8_images=self.normalize_on_device, members=self.members, **kw)
        if stream_type in (BucketStream, GlobalBucketStream) and rank == 0:
            print(stream.summary(), file=sys.stderr, flush=True)
        return stream

    def _check_shards(self, shards, rank: int) -> None:
        """Start-up check of local shards against their manifest (`shard_check`; data/shard_check.py), once per
        shard list. Under torch.distributed rank r checks shards r::world and the results are all-gathered: the
        data is read once in all, not once per rank, and every rank reaches the same verdict (under 'strict'
        all stop at once, none waits in a collective the others left). Rank 0 prints."""
        urls = tuple(s.url for s in shards)
        if urls in self._checked_shards:
            return
        self._checked_shards.add(urls)
        say = (lambda line: print(f"data: {line}", file=sys.stderr, flush=True)) if rank == 0 else (lambda line: None)
        if self.shard_check == "off":
            say(f"shard_check is off: {len(shards)} shard(s) are not compared with their manifest at start-up")
            return
        _, world = self.rank_world()
        if _distributed(rank, world):
            import torch.distributed as dist
            parts: list = [None] * world
            dist.all_gather_object(parts, check_shards(list(shards)[rank::world]))
            check = merge_checks(parts)
        else:
            check = check_shards(shards)
        if check.changed and self.shard_check == "strict":
            raise ShardChangedError(changed_message(check, "strict"))
        if check.changed:
            say(changed_message(check, "warn"))
        for line in notes(check):
            say(line)

    # --- loaders ---------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        stream = self._stream(self.train_shards, self.transform, True, self.num_workers)
        return _TrainLoader(stream, self, stream.workers if self.num_workers else 0, self.pins())

    def val_dataloader(self) -> DataLoader | list:
        if self.val_shards is None:
            return []
        rank, world = self.rank_world()
        if (rank, world) not in self._val_cache:
            shards = resolve_shards(self.val_shards)
            self._check_shards(shards, rank)
            stream = ShardStream(shards, 1, num_workers=1, rank=0, world_size=1, shuffle=False, kind=self.kind,
                                 transform=self.val_transform, uint8_images=self.normalize_on_device,
                                 members=self.members)
            usable, bad = [], 0
            scratch = stream.new_batch(1)
            for shard in shards:  # listed order, no shuffle: the same subset on every run
                for rec in (r for recs in stream.records(shard) for r in recs):
                    try:
                        stream.fill(rec, scratch, 0, None)
                    except BadSample:
                        bad += 1
                        continue
                    usable.append(rec)
                    if len(usable) == self.val_samples:
                        break
                if len(usable) == self.val_samples:
                    break
            n = len(usable) // world * world  # equal per rank
            self.bad_samples += bad
            self._val_cache[(rank, world)] = usable[rank:n:world]
            if n == 0:
                raise ValueError(f"val_shards {self.val_shards!r}: {len(usable)} usable samples cannot be split over "
                                 f"world_size={world} ranks ({bad} bad); give more validation shards")
            self._val_stream = stream  # only its fill/collate are used: batch size 1 is fine here
        ds = _ValBatches(self._val_cache[(rank, world)], self._val_stream, self.val_batch_size)
        return DataLoader(ds, batch_size=None, num_workers=0, pin_memory=self.pins())

    def pins(self) -> bool:
        """Whether loaders pin host memory (`pin_memory`; None: when the training device is CUDA)."""
        if self.pin_memory is not None:
            return bool(self.pin_memory)
        if self.trainer is not None:
            return self.trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    # --- exact position --------------------------------------------------------------------------
    def accumulation(self) -> int:
        """The trainer's accumulate_grad_batches (1 without a trainer)."""
        return int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1) if self.trainer is not None else 1

    def rows_per_micro_batch(self) -> int:
        """Global samples one micro-batch of every rank consumes: batch_size × world size."""
        return self.batch_size * self.rank_world()[1]

    def global_rows(self) -> tuple[int, int] | None:
        """order 'global', during a training step: (this rank's first row within the optimizer step's global
        batch, the global batch); the training noise is drawn for the global batch and sliced here
        (training/world_independence.py). None in order 'slots'."""
        if self.order != "global":
            return None
        rank, world = self.rank_world()
        accumulation = self.accumulation()
        micro = max(self._consumed - 1, 0) % accumulation  # _consumed counts the batch being trained on
        return (micro * world + rank) * self.batch_size, self.batch_size * world * accumulation

    def _begin_epoch(self, batches_per_epoch: int) -> tuple[int, int]:
        if self._resume is not None:
            self._epoch, self._consumed = self._resume
            self._resume = None
            if self.order == "global" and self._resume_samples is not None:  # elastic: samples → micro-batches
                rows = self.rows_per_micro_batch()
                if self._resume_samples % rows:
                    raise ElasticResumeError(
                        f"the checkpoint's data position ({self._resume_samples} samples into epoch {self._epoch}) "
                        f"is not a whole number of micro-batches of {rows} samples (batch_size {self.batch_size} × "
                        f"{self.rank_world()[1]} processes): resume with a batch_size × devices that divides it, "
                        "e.g. the checkpoint's own")
                self._consumed = self._resume_samples // rows
            self._resume_samples = None
            if self._consumed >= batches_per_epoch:  # saved right at an epoch's end
                self._epoch, self._consumed = self._epoch + 1, 0
        else:
            self._epoch, self._consumed = self._epoch + 1, 0
        return self._epoch, self._consumed

    def model_inputs(self, batch):
        """The one place pixels are normalised: uint8 images → float32 in [-1, 1] (then the trainer's input
        precision), on whatever device the batch is on. The models expect this and refuse uint8; code that
        reads this DataModule's loaders outside the training loop (e.g. the latent-statistics pass) calls it."""
        if isinstance(batch, dict) and isinstance(batch.get("image"), torch.Tensor) \
                and batch["image"].dtype == torch.uint8:
            batch["image"] = to_model_range(batch["image"])  # uint8 → float32 [-1, 1], on the device
            if self.trainer is not None:  # Lightning cast float inputs before the transfer ('bf16-true' etc.):
                batch["image"] = self.trainer.precision_plugin.convert_input(batch["image"])  # redo it here
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        batch = self.model_inputs(batch)
        # Counted here, when the training step is about to receive the batch; not when the loader yields
        # (Lightning prefetches one batch ahead, which would make a checkpoint one batch off).
        if self.trainer is not None and self.trainer.training:
            self._consumed += 1  # bad_samples reaches the loggers via TrainingModule.log_data_health
        return batch

    def state_dict(self) -> dict:
        if self._resume is not None:  # loaded but not started yet
            epoch, consumed = self._resume
        else:
            epoch, consumed = max(self._epoch, 0), self._consumed
        state = {"epoch": epoch, "consumed": consumed, "bad_samples": self.bad_samples}
        if self.order == "global":  # the position in global samples: valid at any world size (elastic resume)
            state["samples"] = self._resume_samples if self._resume is not None and self._resume_samples is not None \
                else consumed * self.rows_per_micro_batch()
        if self.filtered_samples:  # only runs with data.filters have the key
            state["filtered_samples"] = self.filtered_samples
        return state

    def load_state_dict(self, state: dict) -> None:
        self._resume = (int(state["epoch"]), int(state["consumed"]))
        self._resume_samples = int(state["samples"]) if "samples" in state else None
        self.bad_samples = int(state.get("bad_samples", 0))
        self.filtered_samples = int(state.get("filtered_samples", 0))
