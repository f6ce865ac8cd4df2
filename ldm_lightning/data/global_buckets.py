"""`GlobalBucketStream`: aspect buckets with `data.order: global` — every global batch from one bucket, the
bucket sequence and the rows a function of (seed, epoch, global position) only, so 1 or N processes see the
same batches (issue 29).

The epoch has ONE sequence of samples, as in global_order.py (all shards in a seeded order, through one seeded
shuffle buffer). Walking it, each sample joins a pending list for its bucket (header read only); the moment a
bucket's list holds G = batch_size × world_size × accumulation samples, they are the next optimizer step's
global batch, and the list starts over. The step's bucket and rows thus follow the global sequence alone.
Rank r's micro-batch a of that step is rows [(a W + r) b, + b) of it, as in global_order.py.

An epoch is Σ_b floor(c_b / G) steps (c_b: the bucket's samples, from the start-up header pass of
bucket_stream.py); the rest of each bucket, under G samples, is left over (`summary`). Every reader walks the
whole sequence (reading bytes and image headers) and decodes only its own rows; it holds at most G raw
records per bucket. A sample that passes the header check but fails to decode is replaced by the next row of
the same step's global batch that decodes (counted bad; that sample then appears twice in the step): the same
replacement on every topology.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterator

import numpy as np

from ldm_lightning.data.bucket_stream import BucketStream
from ldm_lightning.data.captions import choose_caption
from ldm_lightning.data.shards import ShardSpecError
from ldm_lightning.data.stream import KEY, URL, BadSampleBudget, _seed
from ldm_lightning.data.transforms import BadSample


class GlobalBucketStream(BucketStream):
    """A BucketStream whose batches are rank r's rows of the epoch's one global sequence, grouped into global
    batches of one bucket each (module docstring). `accumulation`: the trainer's accumulate_grad_batches."""

    def __init__(self, shards, batch_size: int, *, num_workers: int, rank: int, world_size: int,
                 accumulation: int = 1, **kw):
        # one reader group holding every shard: its counts are the bucket counts of the whole global sequence
        super().__init__(shards, batch_size, num_workers=1, rank=0, world_size=1, **kw)
        self.workers, self.rank, self.world, self.accumulation = max(1, num_workers), rank, world_size, accumulation
        self.global_batch = batch_size * world_size * accumulation
        per_bucket = self.counts[0, :self.bad]
        self.steps_per_bucket = per_bucket // self.global_batch  # (buckets,)
        steps = int(self.steps_per_bucket.sum())
        if steps == 0:
            raise ShardSpecError(
                f"data.bucketing with data.order global: no bucket holds a global batch (batch_size {batch_size} × "
                f"{world_size} processes × accumulation {accumulation} = {self.global_batch}); samples per bucket: "
                f"{dict(zip(self.buckets.sizes, per_bucket.tolist()))}. Lower batch_size, or use fewer buckets")
        self.micro_batches = steps * accumulation  # per rank per epoch
        self.leftover_samples = int(per_bucket.sum() - steps * self.global_batch)

    def __len__(self) -> int:
        return self.micro_batches

    def summary(self) -> str:
        total = int(self.counts[0, :self.bad].sum())
        used = {f"{h}x{w}": int(n) for (h, w), n in zip(self.buckets.sizes, self.steps_per_bucket) if n}
        return (f"data: bucketing (order global): {len(self.buckets)} buckets (H x W); optimizer steps per epoch by "
                f"bucket {used} of global batch {self.global_batch}; {self.leftover_samples} of {total} samples "
                f"({100 * self.leftover_samples / max(total, 1):.1f}%) are left over each epoch in partially filled "
                "buckets\n" + self.header_summary())

    def _batch(self, epoch: int, step: int, rows: list, start: int, budget: BadSampleBudget, bad: Counter,
               filtered: int) -> dict:
        """Rows [start, start + batch_size) of a step's global batch `rows` (all of one bucket), decoded."""
        bs, g = self.batch_size, len(rows)
        batch = self.new_batch(bs, self._bucket(rows[0]))
        cls, txt, keys, crops = [], [], [], []
        for row in range(start, start + bs):
            for j in range(g):  # the row's sample, else the next row of the global batch that decodes
                rec = rows[(row + j) % g]
                rng = np.random.default_rng(_seed(self.seed, epoch, step, row, 0x9B7C)) if self.needs_rng else None
                try:
                    c, t, crop = self.fill(rec, batch, row - start, rng)
                    break
                except BadSample as e:
                    bad[rec[URL]] += 1
                    budget.add(rec, e)
            else:
                raise RuntimeError(f"no sample of global step {step}'s batch decodes (bucket {batch.data.shape[2:]})")
            keys.append(rec[KEY])
            cls.append(c)
            txt.append(t if type(t) is str else choose_caption(t, self.seed, epoch, rec[KEY], rec[URL]))
            crops.append(crop)
        return self.collate(batch.data, cls, txt, keys, bad, None, crops, filtered)

    def slot_batches(self, epoch: int, rank: int, logical_worker: int, skip: int = 0,
                     worker: int | None = None) -> Iterator[dict]:
        g, acc, total = self.global_batch, self.accumulation, self.micro_batches
        budget = BadSampleBudget(self.max_bad_fraction, int(self.counts[0, :self.filtered].sum()))
        reports = self.rank == 0 and logical_worker == 0  # header-level drops: reported once
        dropped: Counter = Counter()
        pending: list[list] = [[] for _ in range(len(self.buckets))]
        micro = skip * self.workers + logical_worker  # this reader's next micro-batch
        step = 0
        for rec in self._cycled(epoch, 0):
            if micro >= total:
                return
            if rec is None:
                raise RuntimeError(f"the epoch's sequence ended after {step} of {total // acc} global steps: the "
                                   "shards changed since their bucket counts were taken (clear the header cache)")
            b = self._bucket(rec)
            if b >= self.bad:
                if b == self.bad:
                    dropped[rec[URL]] += 1
                    budget.add(rec, "unreadable image header or member")
                else:
                    dropped["filtered"] += 1
                continue
            pending[b].append(rec)
            if len(pending[b]) < g:
                continue
            rows, pending[b] = pending[b], []
            while micro < min(total, (step + 1) * acc):  # this reader's micro-batches of this step
                start = ((micro % acc) * self.world + self.rank) * self.batch_size
                bad: Counter = Counter()
                filtered = 0
                if reports and dropped:
                    filtered = dropped.pop("filtered", 0)
                    bad.update(dropped)
                    dropped.clear()
                yield self._batch(epoch, step, rows, start, budget, bad, filtered)
                micro += self.workers
            step += 1
