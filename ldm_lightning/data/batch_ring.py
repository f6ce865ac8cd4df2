"""A fixed ring of shared-memory batch buffers between one epoch's DataLoader workers and the main process.

Why: a worker that returns a tensor makes torch move it into a *fresh* shared-memory segment, and
every 4 KiB page of a fresh segment is a page fault (shared memory gets no transparent huge pages).
Measured on a 2-core KVM machine, one 256×1×256×256 uint8 batch cost ~7.6 ms to send from the worker
plus ~5 ms to receive in the main process: ~50 µs per 256² image, a sixth of its PNG decode. Here each
worker decodes straight into one of `slots` buffers allocated once; the batch it sends names the slot,
and the main process copies the pixels out (into ordinary memory, ~2.5 ms per such batch) and frees the
slot at once. So no slot is held by the training step, and the consumer owns what it gets.

Flow control is one counting semaphore per worker (free slots), so a worker never overwrites a slot
the main process has not copied yet; semaphore operations are also the memory barriers that make the
pixels visible across processes on weakly ordered CPUs (aarch64). With prefetch_factor P, at most P of
a worker's batches are in flight plus the one being built, so P + 1 slots never make a worker wait for
long: the timeout only turns a broken main process into an error instead of a hang.
"""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import torch

WAIT_S = 600.0


class BatchRing:
    """`slots` shared uint8 buffers of `shape` (B, C, H, W) per worker, with per-worker flow control."""

    def __init__(self, workers: int, slots: int, shape: tuple[int, ...], shm_dir: str = "/dev/shm"):
        nbytes = workers * slots * int(np.prod(shape))
        if os.path.isdir(shm_dir):
            st = os.statvfs(shm_dir)
            if st.f_bavail * st.f_frsize < nbytes:
                raise RuntimeError(
                    f"{shm_dir} has {st.f_bavail * st.f_frsize / 2**20:.0f} MiB free, but the loader's batch ring "
                    f"needs {nbytes / 2**20:.0f} MiB ({workers} workers × {slots} batches of {shape} uint8): give "
                    "the container more shared memory (docker run --shm-size=...), or lower batch_size / "
                    "num_workers, or set data.reuse_batch_memory=false")
        self.shape, self.slots, self.workers = tuple(shape), slots, workers
        self.buffers = torch.zeros((workers, slots, *shape), dtype=torch.uint8).share_memory_()  # pages touched now
        self.free = [mp.get_context().Semaphore(slots) for _ in range(workers)]  # made before the workers fork
        self.next_slot = 0  # worker side: slots are used round-robin, in the order the main process frees them

    def acquire(self, worker: int) -> tuple[int, np.ndarray]:
        """Worker side: the next slot and its (B, C, H, W) buffer, once the main process has copied it out."""
        if not self.free[worker].acquire(timeout=WAIT_S):
            raise RuntimeError(f"loader worker {worker} waited {WAIT_S:.0f} s for a free batch buffer: the main "
                               "process stopped taking batches (set data.reuse_batch_memory=false to rule this out)")
        k = self.next_slot
        self.next_slot = (k + 1) % self.slots
        return k, self.buffers[worker, k].numpy()

    def take(self, worker: int, slot: int, rows: int) -> torch.Tensor:
        """Main process: copy a sent batch out of its slot and free the slot."""
        out = np.empty((rows, *self.shape[1:]), np.uint8)  # numpy asks for huge pages: cheap to fault in
        np.copyto(out, self.buffers[worker, slot, :rows].numpy())
        self.free[worker].release()
        return torch.from_numpy(out)
