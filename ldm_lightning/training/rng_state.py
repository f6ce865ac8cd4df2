"""The global RNG states of every rank, saved in the checkpoint and restored on resume.

Training noise in this project comes from `TrainingModule.step_generator` (a pure function of the step),
so it needs none of this; user code, augmentations and dropout that use the global generators do.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """Global RNG states of this process: torch CPU (+ every CUDA device), numpy, python."""
    algo, keys, pos, has_gauss, cached = np.random.get_state()
    # Tensors and plain Python values only: checkpoints are loaded with torch.load(weights_only=True),
    # which rejects numpy arrays.
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"algo": str(algo), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["algo"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(f"checkpoint holds CUDA RNG states for {len(cuda)} devices but "
                          f"{torch.cuda.device_count()} are visible; CUDA RNG states not restored")


class RNGStateCallback(L.Callback):
    """Saves the global RNG states of every rank into the checkpoint and restores them on resume.

    Each rank's state is gathered (ranks differ: Lightning seeds workers per rank) and stored as a list
    indexed by global rank. A resume with a different world size is refused before this runs
    (training/run_topology.py); should one get here (the check left out of a config), it keeps the current
    states and warns.

    When to restore matters for exactness. Creating a DataLoader iterator draws one number from the
    global torch generator (its worker base seed). The uninterrupted run creates one at each epoch
    start; the resumed run creates one in `setup_data`, before training. So:
    - checkpoint taken mid-epoch (the usual case): the uninterrupted run draws nothing between the
      save and the next batch, so the states are restored at `on_train_start`, after the resumed
      run's extra iterator creation;
    - checkpoint taken after the last batch of an epoch: the uninterrupted run then starts a new
      epoch (one draw); the resumed run's iterator creation is that draw, so the states are restored
      at load time, before it.
    """

    def __init__(self):
        self._pending = None

    def state_key(self) -> str:
        return "RNGStateCallback"

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        mine = capture_rng_state()
        states = [mine]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, mine)
        epoch_loop = trainer.fit_loop.epoch_loop
        at_epoch_end = bool(epoch_loop.batch_progress.is_last_batch) or (
            epoch_loop.batch_progress.current.processed >= trainer.num_training_batches)
        checkpoint["rng_states"] = {"ranks": states, "at_epoch_end": at_epoch_end}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("rng_states")
        self._pending = None
        if not saved:
            return
        if len(saved["ranks"]) != trainer.world_size:
            warnings.warn(f"checkpoint holds RNG states for {len(saved['ranks'])} ranks, this run has "
                          f"{trainer.world_size}; global RNG states not restored")
            return
        state = saved["ranks"][trainer.global_rank]
        if saved["at_epoch_end"]:
            restore_rng_state(state)
        else:
            self._pending = state

    def on_train_start(self, trainer, pl_module) -> None:
        if self._pending is not None:
            restore_rng_state(self._pending)
            self._pending = None
