"""`ldm-lightning fit|validate|test` — LightningCLI over a stage config plus a trainer config.

    ldm-lightning fit -c configs/autoencoder/kl-f8.yaml -c configs/trainer/ddp-8gpu.yaml \
        --trainer.max_steps 1000 --ckpt_path last

* model and data are given in subclass mode (`class_path` + `init_args`), so one entry point trains
  every stage; later `-c` files and `--a.b value` flags override earlier ones (jsonargparse).
* `--print_config` prints the fully resolved config; `--help` lists every field with its type.
* Typed arguments are checked by jsonargparse; our dataclass configs validate in `__post_init__`,
  whose ValueError names the field and the allowed values — `_check_config_error` makes sure that text
  reaches the user rather than a generic "does not validate" message.
* The resolved config is saved next to the logs AND into the W&B run config (`LoggedSaveConfigCallback`).
* `default_callbacks()` is the one place that adds callbacks every run gets (telemetry; fault tolerance
  adds its own here) unless the config already lists one of the same class.
"""

from __future__ import annotations

import json
import os
import sys

import torch

if not torch.cuda.is_available():
    # DeepSpeed chooses its accelerator when first imported; make the CPU choice explicit and quiet.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback  # noqa: E402
from lightning.pytorch.loggers import WandbLogger  # noqa: E402

import ldm_lightning.training.strategies  # noqa: E402,F401  (registers deepspeed_*_anydevice)
from ldm_lightning.training.telemetry import TelemetryCallback  # noqa: E402


def default_callbacks() -> list[Callback]:
    """Callbacks every training run gets, unless the config already has one of the same class.

    Add fault-tolerance callbacks (checkpoint IO, preemption) here: config files then only need to
    list them to change their options.
    """
    return [TelemetryCallback()]


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


class LoggedSaveConfigCallback(SaveConfigCallback):
    """Saves `config.yaml` to the log dir (Lightning's behaviour) and the same resolved config into
    the run config of every W&B logger, so a run in the W&B UI says exactly how it was launched."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = _jsonable(self.config.as_dict())
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(config, allow_val_change=True)


class LDMLightningCLI(LightningCLI):
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        # One directory per run: the W&B logger writes where the trainer does unless told otherwise, so
        # checkpoints (<save_dir>/<project>/<run id>/checkpoints) and wandb_run_id.txt follow default_root_dir.
        logger = trainer.get("logger")
        for lg in logger if isinstance(logger, list) else [logger]:
            if hasattr(lg, "class_path") and lg.class_path.endswith("WandbLogger") and lg.init_args.get("save_dir") is None:
                lg.init_args.save_dir = trainer.get("default_root_dir") or "runs"
        # Under Slurm the allocation decides the node count (multinode-ddp.yaml need not be edited per job).
        nnodes = os.environ.get("SLURM_NNODES")
        if nnodes and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive") and int(nnodes) != trainer.num_nodes:
            print(f"[ldm-lightning] trainer.num_nodes={trainer.num_nodes} -> {nnodes} (from $SLURM_NNODES)", file=sys.stderr)
            trainer.num_nodes = int(nnodes)

    def _instantiate_trainer(self, config: dict, callbacks: list[Callback]) -> Trainer:
        configured = list(config.get("callbacks") or []) + list(callbacks)
        present = {type(c) for c in configured}
        callbacks = list(callbacks) + [c for c in default_callbacks() if type(c) not in present]
        config.setdefault("callbacks", [])
        return super()._instantiate_trainer(config, callbacks)


def _check_config_error(exc: SystemExit) -> None:
    """Re-raise parse failures with the innermost message (our `__post_init__` texts name the field)."""
    cause = exc.__context__
    while cause is not None and cause.__context__ is not None and not isinstance(cause, ValueError):
        cause = cause.__context__
    if isinstance(cause, ValueError):
        print(f"ldm-lightning: invalid config: {cause}", file=sys.stderr)


def run_lightning_cli(argv: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Entry point of `ldm-lightning fit|validate|test` (argv starts with the subcommand)."""
    try:
        return LDMLightningCLI(
            model_class=LightningModule,
            subclass_mode_model=True,
            datamodule_class=None,
            subclass_mode_data=True,
            save_config_callback=LoggedSaveConfigCallback,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            auto_configure_optimizers=False,  # TrainingModule.configure_optimizers owns the optimizer
            args=None if argv == sys.argv[1:] else argv,  # (Lightning warns when both are given)
            run=run,
        )
    except SystemExit as exc:
        if exc.code not in (0, None):
            _check_config_error(exc)
        raise

