"""Deterministic, resumable streaming of WebDataset shards, batched inside the workers.

The stream is a pure function of (seed, epoch, rank, world_size, worker):

1. Shards are dealt once into S = world_size × num_workers *groups* of near-equal sample counts
   (longest-processing-time greedy on the manifest counts). Every epoch a seeded permutation says which
   group each (rank, worker) slot plays, so data moves between ranks across epochs while every slot's
   sample count — and hence the epoch length — stays fixed.
2. A slot reads its group's shards in a seeded order, passes the raw (undecoded) samples through a
   seeded shuffle buffer, decodes after the buffer, and batches. Every slot yields exactly
   B = floor(min group samples / batch_size) batches, so all ranks have the same `len()` (no uneven-batch
   DDP hang) and no sample is seen twice in an epoch. A slot that runs short because bad samples were
   skipped, or samples were left out by the json filters (members.py; counted apart, never an error),
   wraps around to its own first samples (deterministically) to fill its last batches. A sample split
   across two tars belongs to the shard it starts in (tario.shard_blocks; the manifest of `data index`
   says which), so counts and slots stay exact.
3. Resume: after n consumed batches (the DataLoader hands out batches round-robin over workers, so
   batch i came from worker i % W), physical worker p plays logical slot (p + n) % W and skips the
   batches that slot already produced. Skipping reads raw tar samples and only parses image headers
   (to tell bad samples apart), never decodes pixels; transforms draw from a generator seeded by the
   sample's position, so the continued stream equals the uninterrupted one.

Per sample, everything but the decode is kept small (~12 µs at MNIST size, where the PNG decode
itself takes ~22 µs; see docs/benchmarks.md): the tar reader indexes a chunk of a shard at a
time (tario.py), samples travel as plain tuples ("records"), the shuffle buffer permutes a whole block
at once, each image is decoded straight into its batch row, and batches reach the main process through
a ring of reused shared-memory buffers (batch_ring.py).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ldm_lightning.data import batch_ring
from ldm_lightning.data.captions import choose_caption
from ldm_lightning.data.members import Filtered, MemberSpec
from ldm_lightning.data.shards import Shard, ShardSpecError, unsafe_reason
from ldm_lightning.data.tario import shard_blocks
from ldm_lightning.data.transforms import (BadSample, ImageTransform, decode_class_map, decode_moments, missing_payload,
                                           quick_check)
from ldm_lightning.errors import UserError
from ldm_lightning.images import to_model_range


log = logging.getLogger(__name__)


class Record(NamedTuple):
    """One raw sample of a shard: the field layout of the plain tuples the stream passes around (a tuple is
    cheaper than a dict, which matters at ~25 µs a decode). The hot paths build plain tuples with `zip`
    and read them through the index constants below: building NamedTuples and reading attributes costs a
    few percent of a 28² MNIST sample's whole cost (measured: benchmarks/README.md).

    cls and txt are parsed a block at a time (members.py: which members or json fields give them); an
    unreadable one is a BadSample there, and a sample a json filter leaves out a `Filtered`, raised when
    the record is used (`_raise_unreadable`). So is a sample a shard was supposed to hold but does not (a
    truncated or unreadable shard, or a manifest count above what the shard holds): the stream counts
    it as bad instead of crashing or silently re-reading other samples."""

    key: str
    url: str
    ext: str | None
    """The payload member's extension; None when the sample has none (then `payload` lists what it has)."""
    payload: bytes | list
    cls: int | BadSample
    """-1 when absent; a BadSample (or Filtered) when the sample is not to be used."""
    txt: str | tuple | BadSample
    """The caption, or a tuple of the sample's several captions (one is chosen per epoch: captions.py)."""


KEY, URL, EXT, PAYLOAD, CLS, TXT = range(6)  # Record's fields, for reads by position with a name
MAP = 6  # a stream that reads class maps (members.map_ext) appends the map member's bytes as a 7th element


def _raise_unreadable(rec: Record) -> None:
    if type(rec[CLS]) is not int or type(rec[TXT]) is BadSample:  # BadSample or Filtered in place of cls
        raise rec[CLS] if isinstance(rec[CLS], BadSample) else rec[TXT]


class MissingSample(BadSample):
    """A sample a shard was supposed to hold but did not deliver (`_missing`): counted as bad, and telling
    the bucket header cache (header_cache.py) not to store a shard that may only have failed for now."""


def _missing(url: str, read: int, expected: int | None, error: str | None) -> list[Record]:
    """Placeholder records for the samples a shard failed to deliver (each one counts as a bad sample)."""
    why = error or "the shard ends early"
    if expected is None or read >= expected:  # damaged after all its listed samples: one bad record says so
        expected = read + 1
        bad = MissingSample(f"shard {url}: unreadable after its {read} samples ({why})")
    else:
        bad = MissingSample(f"shard {url}: manifest lists {expected} samples, {read} readable ({why})")
    log.warning("data: %s; the %d missing samples count as bad (max_bad_fraction), the rest of the shard is "
                "skipped; check the folder with `ldm-lightning data verify`", bad, expected - read)
    return [Record(f"<missing {i} of {url}>", url, None, [], bad, "") for i in range(read, expected)]


def _unsafe_keys(keys: list[str], cls: list) -> list:
    """Keys that are absolute or climb with '..' (a hostile tar): such samples become bad samples."""
    joined = "\n".join(keys)
    if ".." not in joined and not joined.startswith(("/", "\\")) and "\n/" not in joined and "\\" not in joined:
        return cls  # the common case, checked on the whole block at once
    cls = list(cls)
    for i, k in enumerate(keys):
        why = unsafe_reason(k)
        if why:
            cls[i] = BadSample(f"unsafe member name {k!r} ({why}): refused")
    return cls


def balanced_groups(counts: list[int], n: int) -> list[list[int]]:
    """Deal shard indices into n groups with near-equal sample totals (LPT greedy, deterministic)."""
    groups: list[list[int]] = [[] for _ in range(n)]
    totals = [0] * n
    for i in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
        g = min(range(n), key=lambda g: (totals[g], g))
        groups[g].append(i)
        totals[g] += counts[i]
    return groups


def _seed(*parts: int) -> list[int]:
    return [int(p) & 0xFFFFFFFF for p in parts]


class BadDataError(UserError, RuntimeError):
    """More unusable samples than `max_bad_fraction` allows (the message names the shards)."""


class BatchArray:
    """The pixel (or latent) array a batch is decoded into, row by row; `rows` = batch size."""

    __slots__ = ("data", "rows", "maps")

    def __init__(self, data: np.ndarray | None, rows: int, maps: np.ndarray | None = None):
        self.data, self.rows, self.maps = data, rows, maps  # maps: (rows, H, W) uint8 class maps, when read


class BadSampleBudget:
    """A reader slot's bad samples (counted per shard) against `max_bad_fraction` of its planned samples:
    past it, the run stops with one message naming the worst shards and the fix."""

    def __init__(self, max_fraction: float, planned: int):
        self.max_fraction, self.planned, self.count = max_fraction, planned, 0
        self.by_shard: Counter = Counter()

    def add(self, rec: tuple, why, seen: int | None = None) -> None:
        self.count += 1
        self.by_shard[rec[URL]] += 1
        if self.count > self.max_fraction * self.planned:
            worst = ", ".join(f"{u} ({k})" for u, k in self.by_shard.most_common(5))
            read = "" if seen is None else f" of {seen} read so far"
            raise BadDataError(
                f"too many bad samples: {self.count}{read} in this reader slot (planned {self.planned}; "
                f"max_bad_fraction={self.max_fraction}), in shards {worst}; latest: key {rec[KEY]!r}: {why}. "
                "Fix: check the shards with `ldm-lightning data verify DIR` and re-pack them, or raise "
                "data.max_bad_fraction") from None


# ------------------------------------------------------------------------------------------------
# the training stream
# ------------------------------------------------------------------------------------------------
class ShardStream(IterableDataset):
    """Yields full batches (dicts per the contract of docs/contracts.md, plus `bad_samples`: samples skipped while
    building this batch). Use with `DataLoader(batch_size=None)`; `len()` is exact for this rank.
    Images are float32 in [-1, 1], or with `uint8_images` the uint8 pixels (convert with `to_model_range`)."""

    def __init__(self, shards: list[Shard], batch_size: int, *, num_workers: int, rank: int, world_size: int,
                 seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000, kind: str = "image",
                 transform: ImageTransform | None = None, max_bad_fraction: float = 0.01, uint8_images: bool = False,
                 members: MemberSpec | None = None):
        self.shards, self.batch_size, self.seed, self.shuffle = shards, batch_size, seed, shuffle
        self.members = members or MemberSpec()
        self.shuffle_buffer, self.kind, self.transform = shuffle_buffer, kind, transform
        self.max_bad_fraction, self.uint8_images = max_bad_fraction, uint8_images
        self.workers, self.rank, self.world = max(1, num_workers), rank, world_size
        slots = self.world * self.workers
        if len(shards) < slots:
            raise ShardSpecError(
                f"{len(shards)} shards cannot feed world_size={world_size} × num_workers={self.workers} = {slots} "
                f"reader slots; need at least {slots} shards: re-pack with a smaller --samples-per-shard "
                "(or --shard-size-mb), or use fewer num_workers")
        self.groups = balanced_groups([s.num_samples for s in shards], slots)
        self.group_samples = [sum(shards[i].num_samples for i in g) for g in self.groups]
        self.batches_per_slot = min(self.group_samples) // batch_size
        if self.batches_per_slot == 0:
            raise ShardSpecError(f"batch_size={batch_size} is larger than the smallest reader slot's "
                             f"{min(self.group_samples)} samples; lower batch_size or num_workers")
        self.epoch, self.consumed = 0, 0
        self.ring: batch_ring.BatchRing | None = None  # see use_batch_ring
        self.needs_rng = transform is not None and (transform.flip or transform.mode == "random_crop")

    def use_batch_ring(self, slots: int) -> None:
        """Main process, before an epoch's workers start: they decode uint8 images into a ring of
        shared-memory buffers (batch_ring.py) that `from_worker` lends out without a copy."""
        if self.kind != "image" or not self.uint8_images or not batch_ring.available():
            return
        t = self.transform
        # A new ring per epoch: workers of an abandoned earlier iterator may still be writing into the old one.
        self.ring = batch_ring.BatchRing(self.workers, slots, (self.batch_size, t.channels, t.size, t.size))

    def from_worker(self, batch: dict) -> dict:
        """Main process: a batch as the worker sent it → the batch of the contract of docs/contracts.md."""
        if "ring_slot" in batch:
            worker, slot = batch.pop("ring_slot")
            batch["image"] = self.ring.lend(worker, slot, len(batch["key"]))  # (B, C, H, W) uint8
            batch["cls"] = torch.from_numpy(batch["cls"])  # (B,) int64
            for k in ("original_size", "crop_top_left", "class_map"):
                if k in batch:
                    batch[k] = torch.from_numpy(batch[k])  # (B, 2) int64
        return batch

    def __len__(self) -> int:
        return self.batches_per_slot * self.workers

    def set_position(self, epoch: int, consumed: int) -> None:
        """Where the next `iter()` starts: `consumed` batches of `epoch` already used."""
        if not 0 <= consumed <= len(self):
            raise ValueError(f"consumed={consumed} outside [0, {len(self)}] batches per epoch")
        self.epoch, self.consumed = epoch, consumed

    def group_of(self, epoch: int, rank: int, worker: int) -> int:
        """Which shard group the (rank, worker) slot reads in `epoch`."""
        slots = len(self.groups)
        perm = np.random.default_rng(_seed(self.seed, epoch, 0x5107)).permutation(slots) if self.shuffle \
            else np.arange(slots)
        return int(perm[rank * self.workers + worker])

    def records(self, shard: Shard) -> Iterator[list[Record]]:
        """The records of one shard, a block (a few MiB of the tar) at a time, in shard order. A shard that
        cannot be read to its end, or holds fewer than its manifest count of samples, ends with one
        placeholder record per missing sample (`_missing`): the same on every read, so resume agrees.
        A sample split across two tars (see `tario.shard_blocks`) is a record of the shard it starts in."""
        url, expected = shard.url, shard.num_samples
        read, error = 0, None
        try:
            for recs in self._shard_records(shard):
                read += len(recs)
                yield recs
        except (EOFError, ValueError, OSError) as e:  # truncated / not a tar / a link member / unreadable file
            error = str(e) if url in str(e) else f"{type(e).__name__}: {e}"
        if error is not None or (expected is not None and read < expected):
            yield _missing(url, read, expected, error)

    def _shard_records(self, shard: Shard) -> Iterator[list[Record]]:
        url = shard.url
        wanted = self.members.latent_exts if self.kind == "latent" else self.members.image_exts
        for keys, members in shard_blocks(url, self.members.wanted(wanted), shard.head_key, shard.tail_url):
            n = len(keys)
            cls, txt = self.members.columns(members, n)
            cls = _unsafe_keys(keys, cls)
            maps = (members.get(self.members.map_ext) or [None] * n,) if self.members.map_ext else ()
            present = [(e, members[e]) for e in wanted if e in members]
            if len(present) == 1 and None not in present[0][1]:  # the common case: one payload kind, always there
                ext, payload = present[0]
                yield list(zip(keys, itertools.repeat(url, n), itertools.repeat(ext, n), payload, cls, txt, *maps))
                continue
            exts, payload = [None] * n, [None] * n
            for e, col in present:  # the first kind in image_exts order wins
                for i, d in enumerate(col):
                    if d is not None and payload[i] is None:
                        exts[i], payload[i] = e, d
            for i in range(n):
                if payload[i] is None:
                    payload[i] = sorted(e for e, col in members.items() if col[i] is not None)
            yield list(zip(keys, itertools.repeat(url, n), exts, payload, cls, txt, *maps))

    def _slot_records(self, epoch: int, group: int) -> Iterator[list[tuple]]:
        """The slot's records after the seeded shard order and shuffle buffer (nothing decoded), in lists.

        The buffer works a block at a time: the incoming block joins the buffer, one seeded permutation
        orders all of it, and everything but `shuffle_buffer` records is emitted. So each emitted record
        is drawn uniformly from at least `shuffle_buffer` candidates, like a reservoir buffer, at the cost
        of one numpy permutation per block instead of a random draw per sample."""
        shard_ids = list(self.groups[group])
        rng = random.Random(f"{self.seed}/{epoch}/{group}")  # str seeds hash via sha512: stable across runs
        if self.shuffle:
            rng.shuffle(shard_ids)
        blocks = (recs for i in shard_ids for recs in self.records(self.shards[i]))
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from blocks
            return
        g = np.random.default_rng(_seed(self.seed, epoch, group, 0x5B0F))
        buf: list[tuple] = []
        for recs in blocks:
            buf += recs
            if len(buf) > self.shuffle_buffer:
                perm = g.permutation(len(buf)).tolist()
                k = len(buf) - self.shuffle_buffer
                yield [buf[i] for i in perm[:k]]
                buf = [buf[i] for i in perm[k:]]
        yield [buf[i] for i in g.permutation(len(buf)).tolist()]

    def _cycled(self, epoch: int, group: int) -> Iterator[tuple | None]:
        """The slot's records, then None, then all of them again, ... for as long as asked (only a slot that
        lost samples to bad ones reaches a second cycle, to fill its last batches)."""
        while True:
            n = 0
            for recs in self._slot_records(epoch, group):
                n += len(recs)
                yield from recs
            if n == 0:
                raise RuntimeError(f"reader slot {group} read no sample at all from its shards "
                                   f"{[self.shards[i].url for i in self.groups[group]]} (empty or unreadable)")
            yield None

    def fill(self, rec: Record, batch: "BatchArray", n: int,
             rng: np.random.Generator | None) -> tuple[int, str, tuple[int, int, int, int] | None]:
        """Decode a record into row n of `batch` (allocated here for latents, whose shape the first sample
        tells); returns its (cls, txt, crop): crop = (original h, w, crop top, left) of an image (see
        `ImageTransform.decode_into`), None for latents. Raises BadSample, leaving the batch as it was."""
        ext, payload, cls, txt = rec[EXT], rec[PAYLOAD], rec[CLS], rec[TXT]
        _raise_unreadable(rec)
        if ext is None:
            if self.kind == "image":
                raise BadSample(f"no image member (data.image_exts: {', '.join(self.members.image_exts)}); of the "
                                f"members read it has {payload}")
            raise BadSample(missing_payload(self.kind, payload))
        if self.kind == "image" and self.members.map_ext:  # the map first: a bad one leaves the image row as it was
            s = self.transform.size
            if batch.maps is None:
                batch.maps = np.empty((batch.rows, s, s), np.uint8)
            batch.maps[n] = decode_class_map(rec[MAP] if len(rec) > MAP else None, self.members.map_ext, s)
        if self.kind == "image":
            return cls, txt, self.transform.decode_into(payload, ext, batch.data[n], rng)
        m = decode_moments(payload)  # (2c, h, w) float32
        if batch.data is None:
            batch.data = np.empty((batch.rows, *m.shape), np.float32)
        elif m.shape != batch.data.shape[1:]:
            raise BadSample(f"moments.npy of shape {m.shape}, not the batch's {batch.data.shape[1:]}")
        batch.data[n] = m
        return cls, txt, None

    def new_batch(self, rows: int) -> "BatchArray":
        """An empty batch for `fill` (sized by the first sample for latents)."""
        if self.kind == "latent":
            return BatchArray(None, rows)
        t = self.transform
        return BatchArray(np.empty((rows, t.channels, t.size, t.size), np.uint8), rows)

    def collate(self, pixels: np.ndarray, cls: list[int], txt: list[str], keys: list[str], bad: Counter | None,
                ring_slot: tuple[int, int] | None = None, crops: list | None = None, filtered: int = 0,
                maps: np.ndarray | None = None) -> dict:
        """One batch dict from `fill`'s rows (the first len(keys) of `pixels`). With `ring_slot` the pixels
        stay in the batch ring, and the main process's `from_worker` puts them in. `bad`: {shard url:
        samples skipped as bad while building this batch}, sent as `bad_samples` (the total) and, when
        non-zero, `bad_shards` (the loader's epoch summary names them); `filtered`: samples the json
        filters left out, sent as `filtered_samples`. `crops` (images cropped by resize_mode center_crop or
        random_crop): fill's crop tuples, sent as `original_size` and `crop_top_left` (B, 2) int64 (SDXL's
        crop conditioning)."""
        nbad = sum(bad.values()) if bad else 0
        geometry = {}
        if crops is not None and self.kind == "image" and self.transform.mode in ("center_crop", "random_crop"):
            c = np.array(crops, np.int64).reshape(len(crops), 4)  # (B, 4) = h, w, top, left
            geometry = {"original_size": c[:, :2].copy(), "crop_top_left": c[:, 2:].copy()}  # (B, 2) each
        if maps is not None:  # data.members.map_ext: (B, H, W) uint8 class maps, sent by value like the geometry
            geometry["class_map"] = maps[:len(keys)].copy()
        if ring_slot is not None:
            # cls by value too: then no tensor, so no shared-memory segment and no file-descriptor
            # hand-over (a socket round trip to the worker's resource-sharer thread) per batch
            out = {"ring_slot": ring_slot, "cls": np.array(cls, np.int64), "txt": txt, "key": keys,
                   "bad_samples": nbad, "filtered_samples": filtered, **geometry}
            if nbad:
                out["bad_shards"] = dict(bad)
            return out
        pixels = pixels[:len(keys)]
        if self.kind == "image" and self.uint8_images:  # 4× fewer bytes through IPC and host→device
            out = {"image": torch.from_numpy(pixels)}  # (B, C, H, W) uint8
        elif self.kind == "image":
            out = {"image": to_model_range(pixels)}  # (B, C, H, W) float32 in [-1, 1]
        else:
            out = {"moments": torch.from_numpy(pixels)}  # (B, 2c, h, w) float32
        out["cls"] = torch.tensor(cls, dtype=torch.int64)  # (B,)
        out.update((k, torch.from_numpy(v)) for k, v in geometry.items())  # (B, 2) int64; class_map (B, H, W)
        out["txt"], out["key"], out["bad_samples"], out["filtered_samples"] = txt, keys, nbad, filtered
        if nbad:
            out["bad_shards"] = dict(bad)
        return out

    def slot_batches(self, epoch: int, rank: int, logical_worker: int, skip: int = 0,
                     worker: int | None = None) -> Iterator[dict]:
        """The batches of one logical slot in one epoch, after skipping its first `skip` (without decoding).
        `worker`: the DataLoader worker running it, when its batches go through the batch ring."""
        group = self.group_of(epoch, rank, logical_worker)
        planned, bs = self.group_samples[group], self.batch_size
        recs = self._cycled(epoch, group)
        seen, cycle, pos, good_in_cycle = 0, 0, 0, 0
        budget = BadSampleBudget(self.max_bad_fraction, planned)
        for b in range(self.batches_per_slot):
            skipping = b < skip
            ring_slot = None
            if skipping:
                batch = None
            elif self.ring is not None and worker is not None and (claimed := self.ring.claim(worker)):
                batch, ring_slot = BatchArray(claimed[1], bs), (worker, claimed[0])
            else:  # no ring, or all of this worker's buffers still lent: fresh memory, sent the ordinary way
                batch = self.new_batch(bs)
            keys: list[str] = []
            cls: list[int] = []
            txt: list[str] = []
            crops: list = []
            batch_bad: Counter = Counter()  # shard url → bad samples met while building this batch
            batch_filtered = 0
            for rec in recs:
                if rec is None:  # the slot's records start again
                    if good_in_cycle == 0:
                        raise BadDataError(f"reader slot {group} has no usable sample (all {seen} bad or left out by "
                                           "data.filters); loosen the filters or check the shards with "
                                           "`ldm-lightning data verify DIR`")
                    cycle, pos, good_in_cycle = cycle + 1, 0, 0
                    continue
                pos, seen = pos + 1, seen + 1
                try:
                    if skipping:  # header-level check only: any sample it rejects, a full decode rejects too
                        _raise_unreadable(rec)
                        quick_check(rec[EXT], rec[PAYLOAD], self.kind, self.transform)
                    else:
                        rng = np.random.default_rng(_seed(self.seed, epoch, group, cycle, pos - 1)) \
                            if self.needs_rng else None  # a Generator costs ~20 µs: only when augmenting
                        c, t, crop = self.fill(rec, batch, len(keys), rng)
                        cls.append(c)
                        # several captions: the epoch's one, from (seed, epoch, key) only (captions.py)
                        txt.append(t if type(t) is str else choose_caption(t, self.seed, epoch, rec[KEY], rec[URL]))
                        crops.append(crop)
                except BadSample as e:
                    if cycle > 0:  # a slot wrapping around meets its bad samples again: counted once
                        continue
                    if isinstance(e, Filtered):  # not an error: counted apart, never against max_bad_fraction
                        batch_filtered += 1
                        continue
                    batch_bad[rec[URL]] += 1
                    budget.add(rec, e, seen)
                    continue
                good_in_cycle += 1
                keys.append(rec[KEY])
                if len(keys) == bs:
                    break
            if not skipping:
                yield self.collate(batch.data, cls, txt, keys, batch_bad, ring_slot, crops, batch_filtered, batch.maps)

    def __iter__(self) -> Iterator[dict]:  # also the global-order streams': slot_batches is theirs
        info = get_worker_info()
        p, w = (0, 1) if info is None else (info.id, info.num_workers)
        if w != self.workers:
            raise RuntimeError(f"{type(self).__name__} was built for num_workers={self.workers} but runs with {w} "
                               "workers")
        n = self.consumed
        logical = (p + n) % w
        skip = n // w + (1 if logical < n % w else 0)  # batches this logical slot produced before the resume
        yield from self.slot_batches(self.epoch, self.rank, logical, skip, worker=None if info is None else p)
