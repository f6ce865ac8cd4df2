"""A tiny, fully deterministic training run that uses the fault-tolerance pieces exactly as the CLI does.

Run as a subprocess by tests/test_fault_*.py (SIGKILL / resume / NaN guard / DDP) and by the Slurm
tests through the shipped sbatch templates (TRAIN_CMD="python tests/slurm/tiny_train.py"), so it takes
the template's arguments: `-c CONFIG.yaml [--key value ...] --ckpt_path last`.

Model: `TinyModule`, a `TrainingModule` (AdamW + warmup + cosine, EMA, NaN guard) around an MLP with
dropout (global torch RNG — exercises RNGStateCallback) and step-generator noise. Data: `TinyDataModule`,
a synthetic regression set with a per-epoch permutation, sharded by rank, that resumes mid-epoch from
its state_dict (the same contract as ShardDataModule: position saved in the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ldm_lightning.training.base import EMAConfig, OptimConfig, TrainingModule
from ldm_lightning.training.checkpointing import AtomicCheckpointIO, StepCheckpoint, checkpoint_dir
from ldm_lightning.training.nonfinite_guard import GuardConfig, NonFiniteLossError
from ldm_lightning.training.resume import resolve_resume_checkpoint
from ldm_lightning.training.rng_state import RNGStateCallback
from ldm_lightning.training.preemption import PreemptionCallback, slurm_environment


class TinyModule(TrainingModule):
    def __init__(self, seed: int = 0, nan_at: tuple[int, ...] = (), max_consecutive: int = 20, dim: int = 8,
                 nan_rank: int | None = None):
        super().__init__(optim=OptimConfig(lr=1e-2, warmup_steps=3, schedule="cosine", weight_decay=0.01),
                         ema=EMAConfig(decay=0.9), guard=GuardConfig(max_consecutive=max_consecutive), seed=seed)
        self.nan_at = set(nan_at)  # indices of training batches (counted from 0 over the run) with a NaN loss
        self.nan_rank = nan_rank  # only this rank sees the NaN (None: all ranks)
        self.net = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Dropout(0.2), nn.Linear(32, dim))
        self.setup_ema(self.net)

    def compute_loss(self, batch):
        x, y = batch  # (B, D), (B, D)
        noise = torch.randn(x.shape, generator=self.step_generator("noise"))  # (B, D)
        pred = self.net(x + 0.1 * noise)  # (B, D)
        mse = F.mse_loss(pred, y)
        reg = 1e-3 * pred.pow(2).mean()
        # Keyed by the batch counter, not global_step: a skipped step does not advance global_step.
        batch_no = self.trainer.fit_loop.epoch_loop.total_batch_idx if self._trainer is not None else -1
        if batch_no in self.nan_at and self.nan_rank in (None, self.global_rank):
            mse = mse * float("nan")
        return mse + reg, {"mse": mse, "reg": reg}


class TinyDataset(Dataset):
    def __init__(self, n: int, dim: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)  # (N, D)
        self.y = torch.sin(self.x @ torch.randn(dim, dim, generator=g))  # (N, D)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class ResumableSampler(Sampler):
    """Per-epoch permutation of (seed, epoch), rank-sharded, that skips what a checkpoint consumed."""

    def __init__(self, dm: "TinyDataModule", n: int):
        self.dm, self.n = dm, n

    def __len__(self):
        return self.n // self.dm.world

    def __iter__(self):
        epoch = self.dm.trainer.current_epoch
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(1000 + epoch)).tolist()
        mine = perm[self.dm.rank::self.dm.world][: len(self)]
        skip = 0
        if self.dm.resume is not None and self.dm.resume["epoch"] == epoch:
            skip = self.dm.resume["batches"] * self.dm.batch_size
        self.dm.resume = None
        yield from mine[skip:]


class TinyDataModule(L.LightningDataModule):
    def __init__(self, n: int = 48, dim: int = 8, batch_size: int = 4, seed: int = 0):
        super().__init__()
        self.n, self.dim, self.batch_size, self.seed = n, dim, batch_size, seed
        self.resume: dict | None = None

    def setup(self, stage):
        self.rank, self.world = self.trainer.global_rank, self.trainer.world_size
        self.ds = TinyDataset(self.n, self.dim, self.seed)

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=self.batch_size, sampler=ResumableSampler(self, self.n),
                          drop_last=True, num_workers=0)

    def state_dict(self):
        # Batches of the current epoch already trained on (saves happen after a batch completed).
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self.trainer.current_epoch, "batches": int(done)}

    def load_state_dict(self, state):
        per_epoch = (self.n // self.world) // self.batch_size
        epoch, batches = state["epoch"], state["batches"]
        if batches >= per_epoch:
            epoch, batches = epoch + 1, 0
        self.resume = {"epoch": epoch, "batches": batches}


class Progress(L.Callback):
    """Writes the global step after each batch (rank 0) so a parent process can kill at a chosen step."""

    def __init__(self, path: str, sleep: float, kill_self_at: int | None):
        self.path, self.sleep, self.kill_self_at = path, sleep, kill_self_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero:
            with open(self.path, "a") as f:
                f.write(f"{trainer.global_step} {trainer.current_epoch} {batch_idx}\n")
        if self.kill_self_at is not None and trainer.global_step >= self.kill_self_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.sleep:
            time.sleep(self.sleep)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-c", "--config", help="YAML mapping option -> value (the sbatch templates pass one)")
    p.add_argument("--out", default="outputs/tiny")
    p.add_argument("--max_steps", type=int, default=20)
    p.add_argument("--every", type=int, default=4, help="checkpoint every N train steps")
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    # --trainer.*: the names the sbatch templates pass (LightningCLI syntax).
    p.add_argument("--devices", "--trainer.devices", dest="devices", type=int, default=1)
    p.add_argument("--num_nodes", "--trainer.num_nodes", dest="num_nodes", type=int, default=1)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--n", type=int, default=48, help="dataset size")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--nan_at", default="", help="comma-separated batch indices (from 0) whose loss is NaN")
    p.add_argument("--nan_rank", type=int, default=None, help="only this rank gets the NaN loss")
    p.add_argument("--max_consecutive", type=int, default=20)
    p.add_argument("--step_sleep", type=float, default=0.0)
    p.add_argument("--kill_self_at", type=int, default=None)
    p.add_argument("--ckpt_path", default=None, help="'last', a .ckpt file or a directory")
    args, _ = p.parse_known_args(argv)
    if args.config:
        with open(args.config) as f:
            p.set_defaults(**(yaml.safe_load(f) or {}))
        args, _ = p.parse_known_args(argv)  # command-line overrides beat the config file
    return args


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    L.seed_everything(args.seed, workers=True, verbose=False)
    ckpt_dir = checkpoint_dir(args.out)
    model = TinyModule(seed=args.seed, max_consecutive=args.max_consecutive, nan_rank=args.nan_rank,
                       nan_at=tuple(int(s) for s in args.nan_at.split(",") if s))
    dm = TinyDataModule(n=args.n, batch_size=args.batch_size, seed=args.seed)
    env = slurm_environment()
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, num_nodes=args.num_nodes, strategy=args.strategy,
        max_steps=args.max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=args.out, num_sanity_val_steps=0, deterministic=True, use_distributed_sampler=False,
        callbacks=[StepCheckpoint(dirpath=ckpt_dir, every_n_train_steps=args.every, keep_last_k=args.keep),
                   RNGStateCallback(), PreemptionCallback(),
                   Progress(os.path.join(args.out, "progress.txt"), args.step_sleep, args.kill_self_at)],
        plugins=[AtomicCheckpointIO()] + ([env] if env is not None else []),
    )
    ckpt = args.ckpt_path
    if ckpt not in (None, "last"):
        ckpt = resolve_resume_checkpoint(ckpt, must_exist=True).path
    os.makedirs(args.out, exist_ok=True)
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    except NonFiniteLossError as e:
        if trainer.is_global_zero:
            print(f"NONFINITE-STOP: {e}", flush=True)
        return 3
    if trainer.is_global_zero:
        preempted = any(isinstance(c, PreemptionCallback) and c.saved_path for c in trainer.callbacks)
        info = {"global_step": trainer.global_step, "preempted": preempted,
                "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                "job_id": os.environ.get("SLURM_JOB_ID"), "world_size": trainer.world_size,
                "skipped": int(model.nonfinite_skipped)}
        if not preempted:
            torch.save(model.state_dict(), os.path.join(args.out, "final.pt"))
        with open(os.path.join(args.out, "result.jsonl"), "a") as f:
            f.write(json.dumps(info) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
