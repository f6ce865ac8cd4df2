"""The run's topology — its world size and what else fixes the data position — saved in every checkpoint and
checked when a run resumes from one.

The data position a checkpoint holds (`ShardDataModule`: epoch and batches consumed per rank, data/stream.py)
is only valid for the topology that wrote it: the stream deals the shards into world_size × num_workers
reader slots and counts per-rank batches of `batch_size`. A resume at another world size (2 processes → 1),
per-rank batch size or worker count therefore repeats some samples and skips others for the rest of the
epoch, silently. Until an elastic resume exists (its own issue), `TopologyCheck` refuses it: one message,
exit 2, naming the saved and the current values and the flags that restore them.

Not checked: `trainer.accumulate_grad_batches` (the position counts micro-batches, so it does not move; it
changes the optimizer's batch, which a user may mean to change) and the data seed / shuffle buffer (config
fields the user sets on purpose; the config is the source of truth).

A checkpoint written before this record existed has none: the resume says so in one line and goes on as
before (unchecked).
"""

from __future__ import annotations

from typing import Any

import lightning as L

from ldm_lightning.errors import UserError

KEY = "run_topology"


class TopologyChanged(UserError):
    """A resume at another world size, per-rank batch size or data worker count than the checkpoint's."""


def current_topology(trainer) -> dict[str, int]:
    """{world_size, num_nodes, devices, and — where the DataModule has them — batch_size, num_workers}."""
    topology = {"world_size": int(trainer.world_size), "num_nodes": int(trainer.num_nodes),
                "devices": int(trainer.num_devices)}
    datamodule = getattr(trainer, "datamodule", None)
    for field in ("batch_size", "num_workers"):
        value = getattr(datamodule, field, None)
        if isinstance(value, int) and not isinstance(value, bool):
            topology[field] = value
    return topology


def _same(field: str, saved: int, now: int) -> bool:
    if field == "num_workers":  # 0 (main process) and 1 both read through one slot per rank
        return max(1, saved) == max(1, now)
    return saved == now


# What moves the data position, with the flag that sets it.
CHECKED = {"world_size": None, "batch_size": "--data.init_args.batch_size",
           "num_workers": "--data.init_args.num_workers"}


def mismatch_message(saved: dict[str, Any], now: dict[str, int], path: str | None) -> str | None:
    """The one paragraph refusing the resume, or None when every checked field agrees."""
    changed = [f for f in CHECKED if f in saved and f in now and not _same(f, int(saved[f]), now[f])]
    if not changed:
        return None
    what = {"world_size": "world size", "batch_size": "per-rank batch size", "num_workers": "data workers per rank"}

    def shape(t: dict) -> str:
        return f"{t.get('num_nodes', '?')} node(s) × {t.get('devices', '?')} device(s)"

    differences = "; ".join(
        f"{what[f]} {saved[f]} in the checkpoint" + (f" ({shape(saved)})" if f == "world_size" else "")
        + f", {now[f]} now" + (f" ({shape(now)})" if f == "world_size" else "") for f in changed)
    flags = []
    if "world_size" in changed:
        flags += [f"--trainer.devices {saved.get('devices', '?')}",
                  f"--trainer.num_nodes {saved.get('num_nodes', '?')}"]
    flags += [f"{CHECKED[f]} {saved[f]}" for f in changed if CHECKED[f]]
    return (f"cannot resume from {path or 'the checkpoint'}: it was saved by a run of another shape ({differences}). "
            "Its data position (batches consumed per rank) is only valid for the world size, per-rank batch size "
            "and data workers that wrote it: resuming with others would silently repeat some samples and skip "
            f"others. Resume with the same values ({' '.join(flags)}), or start a fresh run with another "
            "--trainer.default_root_dir. (Resuming at another number of processes, an elastic resume, is not "
            "supported yet.)")


class TopologyCheck(L.Callback):
    """Saves `current_topology` into every checkpoint (`checkpoint["run_topology"]`) and refuses a resume whose
    topology moves the data position (`TopologyChanged`). `ldm-lightning fit` adds it by default."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[KEY] = current_topology(trainer)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(KEY)
        path = getattr(trainer, "ckpt_path", None)
        if not isinstance(saved, dict):
            if trainer.is_global_zero:
                print(f"[ldm-lightning] {path or 'the checkpoint'} records no world size (written before "
                      "ldm-lightning recorded one): resuming as before, without checking that this run has the "
                      "same number of processes, batch size and data workers as the run that saved it", flush=True)
            return
        message = mismatch_message(saved, current_topology(trainer), path)
        if message:
            raise TopologyChanged(message)
