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
max_aspect), fewer reader slots or a smaller batch lower it. No batch ring (batches of different shapes;
workers send batches the ordinary way).

The counting pass is paid once, not at every start: each shard's image sizes (and its bad and left-out
counts) are kept in the header cache (header_cache.py; `data.bucketing.header_cache`), keyed by the shard's
path, size and mtime and independent of the bucket set and world size. c[g][b] is the sum over group g's
shards of their cached sizes' buckets: the same numbers as a pass over the group's records, since the seeded
shard order and shuffle buffer only permute them. Only shards not in the cache are read, and under
torch.distributed (`split_header_pass`) each by one rank: rank r takes shards r::world, and the per-shard
counts are all-gathered (a failure on one rank is raised on all of them, never a hang).
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Iterator

import numpy as np

from ldm_lightning.data.buckets import Buckets, size_of
from ldm_lightning.data.captions import choose_caption
from ldm_lightning.data.header_cache import HeaderCache, ShardHeaders
from ldm_lightning.data.members import Filtered
from ldm_lightning.data.shards import Shard, ShardSpecError
from ldm_lightning.data.stream import (EXT, KEY, PAYLOAD, URL, BadSampleBudget, BatchArray, MissingSample,
                                       ShardStream, _raise_unreadable, _seed)
from ldm_lightning.data.transforms import BadSample


def _distributed(rank: int, world: int) -> bool:
    """Whether this stream's ranks are torch.distributed's (then every one of them builds it: a collective is safe)."""
    import torch.distributed as dist
    return world > 1 and dist.is_available() and dist.is_initialized() and \
        (dist.get_rank(), dist.get_world_size()) == (rank, world)


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
        self.header_cache = HeaderCache(buckets.cfg.header_cache)
        self.header_ranks, self.header_hits, self.header_scanned = 1, 0, 0  # over all ranks that shared the pass
        per_shard = self._shard_counts()  # (shards, buckets + 2)
        self.counts = np.stack([per_shard[g].sum(axis=0) for g in self.groups])  # (groups, buckets + 2)
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

    def _shard_counts(self) -> np.ndarray:
        """(shards, buckets + 2) counts per shard: from the header cache, else by reading the shard's headers.
        With `split_header_pass` under torch.distributed, rank r does shards r, r + world, ... and the rows
        are all-gathered, so a shard missing from the cache is read by one rank, not by all of them."""
        members, n = repr(self.members), len(self.shards)
        out = np.zeros((n, len(self.buckets) + 2), np.int64)
        shared = self.buckets.cfg.split_header_pass and _distributed(self.rank, self.world)
        mine = range(self.rank, n, self.world) if shared else range(n)
        error: Exception | None = None
        try:
            for i in mine:
                out[i] = self.header_cache.tally(self.shards[i], members, self._scan, self._tally,
                                                 tuple(self.buckets.sizes))
        except Exception as e:  # noqa: BLE001  (under a shared pass every rank must reach the gather first)
            if not shared:
                raise
            error = e
        c = self.header_cache
        if not shared:
            self.header_hits, self.header_scanned = c.hits, c.scanned
            return out
        import torch.distributed as dist
        gathered: list = [None] * self.world
        mine_err = None if error is None else f"rank {self.rank}: {type(error).__name__}: {error}"
        dist.all_gather_object(gathered, (out[mine], c.hits, c.scanned, mine_err))
        if error is not None:
            raise error
        failed = [g[3] for g in gathered if g[3]]
        if failed:
            raise RuntimeError(f"data.bucketing: the shared header pass failed on {failed[0]} (see that rank's log)")
        for r, (rows, hits, scanned, _) in enumerate(gathered):
            out[r::self.world] = rows
            self.header_hits += hits
            self.header_scanned += scanned
        self.header_ranks = self.world
        return out

    def _scan(self, shard: Shard) -> ShardHeaders:
        """One shard's header pass (tar bytes read, no pixel decoded): its image sizes, bad and left-out samples."""
        sizes: dict[tuple[int, int], int] = {}
        bad = filtered = 0
        complete = True
        for recs in self.records(shard):
            for rec in recs:
                try:
                    _raise_unreadable(rec)
                    wh = size_of(rec[EXT], rec[PAYLOAD])
                    sizes[wh] = sizes.get(wh, 0) + 1
                except Filtered:
                    filtered += 1
                except BadSample as e:
                    bad += 1
                    complete = complete and not isinstance(e, MissingSample)
        return ShardHeaders.from_sizes(sizes, bad, filtered, complete)

    def _tally(self, sh: ShardHeaders) -> np.ndarray:
        """(buckets + 2,) a shard's samples per bucket, then bad and filtered ones: what `_bucket` over its
        records gives (a group's counts are the sum over its shards: the shard order and shuffle only permute
        its records)."""
        nb = len(self.buckets)
        row = np.zeros(nb + 2, np.int64)
        ok = (sh.w >= 1) & (sh.h >= 1)  # a 0-pixel side is a bad sample (Buckets.nearest)
        row[:nb] = np.bincount(self.buckets.nearest_many(sh.w[ok], sh.h[ok]), weights=sh.n[ok], minlength=nb)
        row[self.bad] = sh.bad + int(sh.n[~ok].sum())
        row[self.filtered] = sh.filtered
        return row

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
                "buckets (which ones changes with the epoch's shuffle)\n" + self.header_summary())

    def header_summary(self) -> str:
        c, hits, scanned = self.header_cache, self.header_hits, self.header_scanned
        split = f", split over {self.header_ranks} ranks" if self.header_ranks > 1 else ""
        if not c.enabled:
            return (f"data: bucketing: header cache off (data.bucketing.header_cache: null): read the image headers "
                    f"of {scanned} shards{split}" + (f", {hits} already read in this process" if hits else ""))
        where = ", ".join(sorted(c.where)) or "nothing written"
        return (f"data: bucketing: header cache: {hits} of {len(self.shards)} shards from the cache, {scanned} "
                f"read (image headers only{split}) ({where})")

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
                        txt.append(t if type(t) is str else choose_caption(t, self.seed, epoch, rec[KEY], rec[URL]))
                        crops.append(crop)
                except BadSample as e:
                    if cyc == 0:
                        count_bad(rec, e)
                    continue
                keys.append(rec[KEY])
            if not skipping:
                yield self.collate(batch.data, cls, txt, keys, batch_bad, None, crops, batch_filtered)
