"""A ring of shared-memory batch buffers between one epoch's DataLoader workers and the main process.

Why: a worker that returns a tensor makes torch move it into a *fresh* shared-memory segment, and
every 4 KiB page of a fresh segment is a page fault (shared memory gets no transparent huge pages),
a sizeable fraction of a large image's decode time (the measurement: benchmarks/README.md).

Here each worker decodes straight into a free buffer of its own, allocated once per epoch, and the
batch it sends only names the buffer. The main process hands out a view of that buffer, no copy, and
takes the buffer back once nothing in the main process refers to it any more (torch's storage use
count is back to the ring's own references): in a training loop that is right after the batch was
moved to the device and converted. A consumer that keeps batches keeps their buffers; when a worker
finds none of its buffers free it builds that batch in fresh memory and sends it the ordinary way. So
no worker ever waits on the main process, and no batch a consumer holds is ever overwritten.

The per-worker lock orders the buffer's reuse after the main process's last read on weakly ordered
CPUs (aarch64): the main process releases a buffer under the lock; the worker claims it under the lock.
"""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import torch


def _uses(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def available() -> bool:
    """The storage use count this relies on is a private torch API: without it, no ring."""
    return hasattr(torch._C, "_storage_Use_Count")


class BatchRing:
    """`slots` shared uint8 buffers of `shape` (B, C, H, W) per worker."""

    def __init__(self, workers: int, slots: int, shape: tuple[int, ...], shm_dir: str = "/dev/shm"):
        nbytes = workers * slots * int(np.prod(shape))
        if os.path.isdir(shm_dir):
            st = os.statvfs(shm_dir)
            if st.f_bavail * st.f_frsize < nbytes:
                raise RuntimeError(
                    f"{shm_dir} has {st.f_bavail * st.f_frsize / 2**20:.0f} MiB free, but the loader's batch ring "
                    f"needs {nbytes / 2**20:.0f} MiB ({workers} workers × {slots} batches of {shape} uint8): give "
                    "the container more shared memory (docker run --shm-size=...), or lower batch_size / "
                    "num_workers, or set data.loader.reuse_batch_memory=false")
        # one storage per buffer, so that its use count tells whether anything still holds it
        self.buffers = [[torch.zeros(shape, dtype=torch.uint8).share_memory_() for _ in range(slots)]
                        for _ in range(workers)]
        self.baseline = _uses(self.buffers[0][0])
        self.in_use = torch.zeros((workers, slots), dtype=torch.uint8).share_memory_()  # 1: a worker filled it
        self.locks = [mp.get_context().Lock() for _ in range(workers)]  # made before the workers fork
        self.lent: list[tuple[int, int]] = []  # main side: buffers handed out and not yet taken back
        self.handed_out = 0  # main side: batches that came through the ring (the rest came the ordinary way)

    def claim(self, worker: int) -> tuple[int, np.ndarray] | None:
        """Worker side: a free buffer (its slot and a (B, C, H, W) array view), or None when all are lent."""
        flags = self.in_use[worker].numpy()
        with self.locks[worker]:
            free = np.flatnonzero(flags == 0)
            if len(free) == 0:
                return None
            k = int(free[0])
            flags[k] = 1
        return k, self.buffers[worker][k].numpy()

    def lend(self, worker: int, slot: int, rows: int) -> torch.Tensor:
        """Main process: the sent batch's pixels, as a view of its buffer (taken back by `reclaim`)."""
        self.reclaim()
        self.lent.append((worker, slot))
        self.handed_out += 1
        return self.buffers[worker][slot][:rows]

    def reclaim(self) -> None:
        """Main process: give back to their workers the lent buffers nothing refers to any more."""
        keep = []
        for w, k in self.lent:
            if _uses(self.buffers[w][k]) > self.baseline:
                keep.append((w, k))
                continue
            with self.locks[w]:
                self.in_use[w, k] = 0
        self.lent = keep
