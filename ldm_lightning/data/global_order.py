"""`GlobalOrderStream`: the training order as a function of (seed, epoch, global sample position) only, so that
a run does not depend on its world size (`data.order: global`; issue 29).

The default stream (stream.py) deals shards into world_size × num_workers reader slots: its order changes with
the number of processes. Here every epoch has ONE sequence of samples: all shards in a seeded order, through one
seeded shuffle buffer, minus the samples a header-level check rejects (bad or left out by data.filters), and
cycled from its start when it runs short of the planned count. Position p of that sequence is the p-th sample of
the epoch on any topology.

Positions are handed out by global batch G = batch_size × world_size × accumulation: optimizer step s reads
positions [s G, (s + 1) G), micro-batch a of rank r the rows [s G + (a W + r) b, + b). One process with a
doubled batch, or one process with doubled accumulation, reads the same samples in the same optimizer step as
two processes. The epoch is floor(planned samples / G) whole steps, the same in samples on every topology with
the same G, so an exact position survives a change of world size (`ShardDataModule` keeps it in samples).

The cost: every reader (rank × worker) reads the bytes of every shard and parses every image header to know the
positions; it decodes only its own rows. A sample whose header passes but whose pixels do not decode is
replaced by the next sample of the sequence that does (counted bad), so replacement is also topology-free.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Iterator

import numpy as np

from ldm_lightning.data.shards import ShardSpecError
from ldm_lightning.data.stream import (EXT, KEY, PAYLOAD, URL, BadDataError, BadSampleBudget, BatchArray, ShardStream,
                                       _raise_unreadable, _seed)
from ldm_lightning.data.members import Filtered
from ldm_lightning.data.transforms import BadSample, quick_check

ORDERS = ("slots", "global")


class GlobalOrderStream(ShardStream):
    """A ShardStream whose batches are rank r's rows of the epoch's one global sequence (module docstring).
    `accumulation`: the trainer's accumulate_grad_batches (an epoch is whole optimizer steps)."""

    def __init__(self, shards, batch_size: int, *, num_workers: int, rank: int, world_size: int,
                 accumulation: int = 1, **kw):
        # one group holding every shard: ShardStream's shard order + shuffle buffer then make the global sequence
        super().__init__(shards, batch_size, num_workers=num_workers, rank=0, world_size=1, **kw)
        self.rank, self.world, self.accumulation = rank, world_size, accumulation
        self.groups = [list(range(len(shards)))]
        self.group_samples = [sum(s.num_samples for s in shards)]
        self.global_batch = batch_size * world_size * accumulation
        steps = self.group_samples[0] // self.global_batch
        if steps == 0:
            raise ShardSpecError(f"the global batch (batch_size {batch_size} × {world_size} processes × "
                                 f"accumulation {accumulation} = {self.global_batch}) is larger than the "
                                 f"{self.group_samples[0]} training samples; lower data.init_args.batch_size")
        self.micro_batches = steps * accumulation  # per rank per epoch

    def __len__(self) -> int:
        return self.micro_batches

    def group_of(self, epoch: int, rank: int, worker: int) -> int:
        return 0

    def rows_of(self, micro: int) -> tuple[int, int]:
        """Rank's first global position and row count of its micro-batch `micro` (within the epoch)."""
        return (micro * self.world + self.rank) * self.batch_size, self.batch_size

    def _positions(self, epoch: int, budget: BadSampleBudget, dropped: Counter) -> Iterator[tuple]:
        """The epoch's usable records in order (a record's index here is its global position)."""
        seen = 0
        for rec in self._cycled(epoch, 0):
            if rec is None:
                if seen == 0:
                    raise BadDataError("no usable training sample at all (every one bad or left out by "
                                       "data.filters); loosen the filters or check the shards with "
                                       "`ldm-lightning data verify DIR`")
                seen = -1  # a later cycle: bad samples are met again, counted once
                continue
            try:
                _raise_unreadable(rec)
                quick_check(rec[EXT], rec[PAYLOAD], self.kind, self.transform)
            except BadSample as e:
                if seen >= 0:
                    dropped["filtered" if isinstance(e, Filtered) else rec[URL]] += 1
                    if not isinstance(e, Filtered):
                        budget.add(rec, e)
                continue
            if seen >= 0:
                seen += 1
            yield rec

    def slot_batches(self, epoch: int, rank: int, logical_worker: int, skip: int = 0,
                     worker: int | None = None) -> Iterator[dict]:
        budget = BadSampleBudget(self.max_bad_fraction, self.group_samples[0])
        dropped: Counter = Counter()  # header-level drops: reported once, by rank 0's logical worker 0
        reports = self.rank == 0 and logical_worker == 0
        source = self._positions(epoch, budget, dropped)
        window: deque = deque()  # records from position `base` on
        base = 0

        def at(p: int):
            while base + len(window) <= p:
                window.append(next(source))
            return window[p - base]

        bs = self.batch_size
        for k in range(skip, (self.micro_batches - logical_worker + self.workers - 1) // self.workers):
            micro = k * self.workers + logical_worker
            start, _ = self.rows_of(micro)
            at(start)  # read up to here; drop what lies before (other readers' rows)
            while base < start:
                window.popleft()
                base += 1
            ring_slot = None
            if self.ring is not None and worker is not None and (claimed := self.ring.claim(worker)):
                batch = BatchArray(claimed[1], bs)
                ring_slot = (worker, claimed[0])
            else:
                batch = self.new_batch(bs)
            keys, cls, txt, crops, bad = [], [], [], [], Counter()
            for row in range(bs):
                p = start + row
                while True:  # the sample at p, else the next one of the sequence that decodes
                    rec = at(p)
                    rng = np.random.default_rng(_seed(self.seed, epoch, p, 0x610B)) if self.needs_rng else None
                    try:
                        c, t, crop = self.fill(rec, batch, row, rng)
                        break
                    except BadSample as e:
                        bad[rec[URL]] += 1
                        budget.add(rec, e)
                        p += 1
                keys.append(rec[KEY])
                cls.append(c)
                txt.append(t)
                crops.append(crop)
            if reports and dropped:
                filtered = dropped.pop("filtered", 0)
                bad.update(dropped)
                dropped.clear()
            else:
                filtered = 0
            yield self.collate(batch.data, cls, txt, keys, bad, ring_slot, crops, filtered)
