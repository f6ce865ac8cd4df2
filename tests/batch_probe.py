"""A callback for CLI tests (tests/ is on the subprocess's PYTHONPATH): logs every training batch's keys and
image (or latent) shape and captions, per rank, to `<out>/batches-rank<R>.jsonl`, one line per step."""

from __future__ import annotations

import json
import os

import lightning as L


class BatchProbe(L.Callback):
    def __init__(self, out: str):
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        os.makedirs(self.out, exist_ok=True)
        line = {"rank": trainer.global_rank, "step": trainer.global_step, "epoch": trainer.current_epoch,
                "keys": list(batch["key"]), "shape": list(batch["image" if "image" in batch else "moments"].shape)}
        if "txt" in batch:
            line["txt"] = list(batch["txt"])
        with open(os.path.join(self.out, f"batches-rank{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")
