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

Elastic resume (issue 29 item 2): a run with `data.order: global` keeps its data position in global samples
(data/global_order.py), so its checkpoint resumes at another world size, per-rank batch or worker count: the
global batch (batch_size × world size × accumulation) is kept by setting `trainer.accumulate_grad_batches`
(said in one line), Lightning's per-rank batch counters are rewritten for the new topology, and the epoch goes
on from the same sample. Refused, one message and exit 2: a global batch the new batch_size × world size does
not divide, and a change of data.order. The optimizer state follows the strategy: DDP's is whole in the
checkpoint; FSDP2's DCP checkpoint reshards on load; DeepSpeed ZeRO-1/2/3 checkpoints are re-partitioned through
DeepSpeed's universal checkpoint before this check runs (deepspeed_elastic.py), and a
strategy that counts accumulation itself (DeepSpeed) is given the new accumulation (`set_gradient_accumulation`).
"""

from __future__ import annotations

from typing import Any

import lightning as L

from ldm_lightning.errors import UserError

KEY = "run_topology"


class TopologyChanged(UserError):
    """A resume at another world size, per-rank batch size or data worker count than the checkpoint's."""


# Optimizer state saved per rank in a layout tied to the world size. FSDP2 (FSDP2Strategy, a ModelParallelStrategy)
# is not here: its DCP checkpoint indexes every DTensor by global offsets, and loading into the new mesh reshards.
SHARDED_STRATEGIES = ("FSDPStrategy",)  # FSDPStrategy: Lightning's FSDP1 (this project ships FSDP2)


def current_topology(trainer) -> dict:
    """{world_size, num_nodes, devices, accumulate_grad_batches, strategy, and — where the DataModule has them
    — batch_size, num_workers, order}."""
    topology = {"world_size": int(trainer.world_size), "num_nodes": int(trainer.num_nodes),
                "devices": int(trainer.num_devices),
                "accumulate_grad_batches": int(getattr(trainer, "accumulate_grad_batches", 1) or 1),
                "strategy": type(trainer.strategy).__name__}
    datamodule = getattr(trainer, "datamodule", None)
    for field in ("batch_size", "num_workers"):
        value = getattr(datamodule, field, None)
        if isinstance(value, int) and not isinstance(value, bool):
            topology[field] = value
    if isinstance(getattr(datamodule, "order", None), str):
        topology["order"] = datamodule.order
    return topology


def _global(topology: dict) -> bool:
    return topology.get("order") == "global"


def elastic_plan(saved: dict, now: dict, path: str | None) -> tuple[int, str | None]:
    """For a `data.order: global` checkpoint: (the accumulation that keeps its global batch at this run's
    batch_size × world size, the one line saying what changed or None). Raises `TopologyChanged` when it
    cannot be kept or the strategy cannot reshard."""
    where = path or "the checkpoint"
    world, batch = int(now["world_size"]), int(now.get("batch_size", saved.get("batch_size", 1)))
    g_saved = int(saved["world_size"]) * int(saved["batch_size"]) * int(saved.get("accumulate_grad_batches", 1))
    moved = world != int(saved["world_size"]) or batch != int(saved["batch_size"])
    if world != int(saved["world_size"]):
        sharded = [s for s in (saved.get("strategy", ""), now.get("strategy", ""))
                   if any(k in s for k in SHARDED_STRATEGIES)]
        if sharded:
            raise TopologyChanged(
                f"cannot resume {where} at world size {world}: it was saved at {saved['world_size']} and "
                f"{sharded[0]} keeps the optimizer state sharded per rank, which this project does not reshard yet. "
                f"Resume with --trainer.devices {saved.get('devices', '?')} --trainer.num_nodes "
                f"{saved.get('num_nodes', '?')}, or (DDP only) with --trainer.strategy ddp on both sides.")
    if g_saved % (world * batch):
        fits = [b for b in range(1, g_saved // world + 1) if g_saved % (world * b) == 0]
        raise TopologyChanged(
            f"cannot resume {where} with its global batch of {g_saved} samples (batch_size {saved['batch_size']} × "
            f"{saved['world_size']} processes × accumulation {saved.get('accumulate_grad_batches', 1)}): this run's "
            f"batch_size {batch} × {world} processes does not divide it. Resume with --data.init_args.batch_size "
            f"one of {fits[-6:]}, or another --trainer.devices / --trainer.num_nodes.")
    accumulation = g_saved // (world * batch)
    line = None
    if moved or accumulation != int(now.get("accumulate_grad_batches", 1)):
        line = (f"[ldm-lightning] elastic resume from {where}: {saved['world_size']} process(es) × batch_size "
                f"{saved['batch_size']} × accumulation {saved.get('accumulate_grad_batches', 1)} → {world} × "
                f"{batch} × {accumulation}; global batch {g_saved} kept, the epoch goes on at the same sample")
    return accumulation, line


def _rescale_batch_counters(checkpoint: dict, saved: dict, now: dict) -> None:
    """Lightning's per-rank micro-batch counters of the epoch (they decide accumulation boundaries and the
    epoch's end) for this run's batch_size × world size: same global samples, new unit."""
    old = int(saved["world_size"]) * int(saved["batch_size"])
    new = int(now["world_size"]) * int(now["batch_size"])
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
    if not isinstance(progress, dict) or old == new:
        return
    current, total = progress.get("current", {}), progress.get("total", {})
    for key, value in list(current.items()):
        samples = int(value) * old
        if samples % new:
            raise TopologyChanged(f"cannot resume: the checkpoint's position ({samples} samples into the epoch) is "
                                  f"not a whole number of this run's micro-batches of {new} samples; resume with the "
                                  "checkpoint's --data.init_args.batch_size and --trainer.devices")
        current[key] = samples // new
        if key in total:
            total[key] = int(total[key]) - int(value) + current[key]


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
            "--trainer.default_root_dir. (A run started with --data.init_args.order global resumes at another "
            "number of processes: docs/training.md.)")


class TopologyCheck(L.Callback):
    """Saves `current_topology` into every checkpoint (`checkpoint["run_topology"]`) and refuses a resume whose
    topology moves the data position (`TopologyChanged`). `ldm-lightning fit` adds it by default."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[KEY] = current_topology(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        if _global(current_topology(trainer)):  # what would make this run depend on its world size
            from ldm_lightning.training.world_independence import check_world_independent
            check_world_independent(pl_module)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(KEY)
        path = getattr(trainer, "ckpt_path", None)
        if not isinstance(saved, dict):
            if trainer.is_global_zero:
                print(f"[ldm-lightning] {path or 'the checkpoint'} records no world size (written before "
                      "ldm-lightning recorded one): resuming as before, without checking that this run has the "
                      "same number of processes, batch size and data workers as the run that saved it", flush=True)
            return
        now = current_topology(trainer)
        if _global(saved) != _global(now):
            raise TopologyChanged(
                f"cannot resume from {path or 'the checkpoint'}: it was saved with data.order "
                f"{saved.get('order', 'slots')}, this run has {now.get('order', 'slots')}; the two orders read "
                f"different samples. Resume with --data.init_args.order {saved.get('order', 'slots')}, or start a "
                "fresh run with another --trainer.default_root_dir.")
        if _global(saved) and "batch_size" in saved and "batch_size" in now:
            accumulation, line = elastic_plan(saved, now, path)
            _rescale_batch_counters(checkpoint, saved, now)
            trainer.accumulate_grad_batches = accumulation
            set_engine_accumulation = getattr(trainer.strategy, "set_gradient_accumulation", None)
            if callable(set_engine_accumulation):  # DeepSpeed counts accumulation in its engine (strategies.py)
                set_engine_accumulation(accumulation)
            if line and trainer.is_global_zero:
                print(line, flush=True)
            return
        message = mismatch_message(saved, now, path)
        if message:
            raise TopologyChanged(message)
