"""`BucketStream`: ShardStream (stream.py) with aspect-ratio buckets, keeping the epoch exact and resumable.

Design (the constraint: in DDP every rank must take the same bucket at each step, and the stream stays a
pure function of (seed, epoch, rank, world_size, worker) with the same number of batches on every slot):

1. Counting pass, once at start-up, in every rank: the header of every sample is read (tar bytes are read,
   no pixel is decoded) to give each reader *group* (stream.py's near-equal set of shards) a count of
   samples per bucket, c[g][b]. A bucket can then feed n_b = min over groups of floor(c[g][b] / batch)
   batches on every slot, whichever group the slot plays this epoch.
2. Schedule: logical worker w of any rank takes buckets in the order of a seeded permutation of
   {bucket b, n_b times}, seeded by (seed, epoch, w) only, not by the rank. The DataLoader hands out batches
   round-robin over workers, so step i of every rank comes from logical worker i % W's batch i // W: the
   same bucket on all ranks. Every slot yields B = Σ n_b batches, so `len()` is equal on all ranks.
3. A slot reads its records in the seeded order of stream.py (shard order + shuffle buffer) and drops each
   into a FIFO queue per bucket (header read only); a batch of bucket b pops b's queue, reading ahead when
   it is empty. Queues hold raw bytes; the schedule is a uniform shuffle, so they stay short on average
   (the worst case is a slot's whole share of data, when one bucket is scheduled late).
4. Resume: identical, with header checks in place of decodes for the batches already consumed (as
   stream.py), and per-sample augmentation seeds by position in the slot's record order.

Cost: every epoch, c[g][b] - n_b × batch samples of each group and bucket are left over: the remainders of
partially filled buckets, plus a group's surplus over the group poorest in that bucket. Their number is
fixed (printed at start-up, `leftover_samples`); which samples they are changes with the epoch's shuffle.
Batches of many buckets on few samples waste the most: fewer buckets (a larger divisor or a smaller
max_aspect), fewer reader slots or a smaller batch lower it. Also: the start-up pass reads the data once
per rank; no batch ring (batches of different shapes; workers send batches the ordinary way).
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Iterator

import numpy as np

from ldm_lightning.data.buckets import Buckets
from ldm_lightning.data.members import Filtered
from ldm_lightning.data.shards import ShardSpecError
from ldm_lightning.data.stream import (EXT, KEY, PAYLOAD, URL, BadSampleBudget, BatchArray, ShardStream,
                                       _raise_unreadable, _seed)
from ldm_lightning.data.transforms import BadSample

_COUNTS: dict[tuple, list[int]] = {}  # (group's shard urls, buckets, members) -> per-bucket counts, bad, filtered


class BucketStream(ShardStream):
    """A ShardStream whose batches come from one aspect bucket each (`buckets`); images only.
    Batches carry `image` (B, C, H, W) with (H, W) the step's bucket."""

    def __init__(self, *args, buckets: Buckets, **kw):
        super().__init__(*args, **kw)
        if self.kind != "image":
            raise ShardSpecError("data.bucketing applies to image shards (kind='image'); latent shards keep the "
                                 "size they were encoded at")
        self.buckets = buckets
        self.bad, self.filtered = len(buckets), len(buckets) + 1  # the counts' last two columns
        self.counts = np.array([self._group_counts(g) for g in range(len(self.groups))])  # (groups, buckets + 2)
        per_bucket = self.counts[:, :self.bad]
        self.batches_per_bucket = (per_bucket // self.batch_size).min(axis=0)  # (buckets,) n_b
        self.batches_per_slot = int(self.batches_per_bucket.sum())
        if self.batches_per_slot == 0:
            raise ShardSpecError(
                f"data.bucketing: no bucket holds batch_size={self.batch_size} samples in every one of the "
                f"{len(self.groups)} reader slots (world_size × num_workers); per-bucket counts of the smallest "
                f"slot: {dict(zip(buckets.sizes, per_bucket.min(axis=0).tolist()))}. Lower batch_size or "
                "num_workers, or use fewer buckets (larger divisor, smaller max_aspect)")
        self.leftover_samples = int(per_bucket.sum() - len(self.groups) * self.batches_per_slot * self.batch_size)

    def _group_counts(self, group: int) -> list[int]:
        """Samples per bucket, then bad and filtered ones, of a reader group: one header pass."""
        key = (tuple(self.shards[i].url for i in self.groups[group]), tuple(self.buckets.sizes), repr(self.members))
        if key not in _COUNTS:
            counts = [0] * (len(self.buckets) + 2)
            for recs in self._slot_records(0, group):
                for rec in recs:
                    counts[self._bucket(rec)] += 1
            _COUNTS[key] = counts
        return _COUNTS[key]

    def _bucket(self, rec) -> int:
        """A record's bucket; `self.bad` for a sample bad at the header level, `self.filtered` for one the
        json filters leave out."""
        try:
            _raise_unreadable(rec)
            return self.buckets.of_payload(rec[EXT], rec[PAYLOAD])
        except Filtered:
            return self.filtered
        except BadSample:
            return self.bad

    def summary(self) -> str:
        total = int(self.counts[:, :self.bad].sum())
        used = {f"{h}x{w}": int(n) for (h, w), n in zip(self.buckets.sizes, self.batches_per_bucket) if n}
        return (f"data: bucketing: {len(self.buckets)} buckets (H x W) of ~{self.buckets.cfg.target_pixels} pixels; "
                f"batches per reader slot and epoch by bucket {used}; {self.leftover_samples} of {total} samples "
                f"({100 * self.leftover_samples / max(total, 1):.1f}%) are left over each epoch in partially filled "
                "buckets (which ones changes with the epoch's shuffle)")

    def use_batch_ring(self, slots: int) -> None:
        """No ring: batch shapes change with the bucket."""
        self.ring = None

    def schedule(self, epoch: int, logical_worker: int) -> np.ndarray:
        """The bucket of each batch of a logical worker in an epoch: the same on every rank."""
        order = np.repeat(np.arange(len(self.buckets)), self.batches_per_bucket)  # (B,)
        return np.random.default_rng(_seed(self.seed, epoch, logical_worker, 0xB0C7)).permutation(order)

    def new_batch(self, rows: int, bucket: int | None = None) -> BatchArray:
        if bucket is None:  # validation: the square image_size of the plain stream
            return super().new_batch(rows)
        h, w = self.buckets.sizes[bucket]
        return BatchArray(np.empty((rows, self.transform.channels, h, w), np.uint8), rows)

    def fill(self, rec, batch: BatchArray, n: int, rng: np.random.Generator | None) -> tuple[int, str, tuple]:
        """Decode into row n of a bucket batch: (cls, txt, crop) as ShardStream.fill."""
        _, _, ext, payload, cls, txt = rec
        _raise_unreadable(rec)
        if ext is None:
            raise BadSample(f"no image member (has {payload})")
        return cls, txt, self.buckets.decode_into(payload, ext, batch.data[n], rng)

    def slot_batches(self, epoch: int, rank: int, logical_worker: int, skip: int = 0,
                     worker: int | None = None) -> Iterator[dict]:
        group = self.group_of(epoch, rank, logical_worker)
        planned, bs = int(self.counts[group, :self.filtered].sum()), self.batch_size
        queues: list[deque] = [deque() for _ in range(len(self.buckets))]  # (record, cycle, position)
        recs = self._cycled(epoch, group)
        cycle, pos = 0, 0
        budget = BadSampleBudget(self.max_bad_fraction, planned)

        def count_bad(rec, why) -> None:
            batch_bad[rec[URL]] += 1
            budget.add(rec, why)

        for j, b in enumerate(self.schedule(epoch, logical_worker).tolist()):
            skipping = j < skip
            batch = None if skipping else self.new_batch(bs, b)
            keys, cls, txt, crops = [], [], [], []
            batch_bad: Counter = Counter()
            batch_filtered = 0
            while len(keys) < bs:
                while not queues[b]:  # read ahead, queueing every record by its bucket
                    rec = next(recs)
                    if rec is None:  # the slot's records start again (only after bad samples)
                        if cycle >= 1:  # a second pass did not make up for the first one's bad samples
                            raise RuntimeError(f"reader slot {group}: bucket {self.buckets.sizes[b]} has too few "
                                               "decodable samples (most of its images are corrupt)")
                        cycle, pos = cycle + 1, 0
                        continue
                    pos += 1
                    k = self._bucket(rec)
                    if k >= self.bad:
                        if cycle == 0 and k == self.bad:
                            count_bad(rec, "unreadable image header or member")
                        batch_filtered += cycle == 0 and k == self.filtered
                        continue
                    queues[k].append((rec, cycle, pos - 1))
                rec, cyc, p = queues[b].popleft()
                try:
                    if not skipping:
                        rng = np.random.default_rng(_seed(self.seed, epoch, group, cyc, p)) \
                            if self.needs_rng else None
                        c, t, crop = self.fill(rec, batch, len(keys), rng)
                        cls.append(c)
                        txt.append(t)
                        crops.append(crop)
                except BadSample as e:
                    if cyc == 0:
                        count_bad(rec, e)
                    continue
                keys.append(rec[KEY])
            if not skipping:
                yield self.collate(batch.data, cls, txt, keys, batch_bad, None, crops, batch_filtered)
