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
* `default_callbacks()` / `default_plugins()` are the one place that adds what every run gets unless the
  config already lists one of the same kind: telemetry and fault tolerance (step checkpoints + the final
  step, atomic writes, RNG state, SIGUSR1/SIGTERM handling, Slurm without Lightning's in-handler requeue).
* The checkpoint to resume from is resolved here (`resolve_ckpt_path`): `--ckpt_path last`, an explicit
  file (validated, falling back to the newest good one), or nothing in a run directory that already holds
  checkpoints (a rerun resumes; it never silently restarts). Loading is `weights_only=True`.
* `run_lightning_cli` returns the process exit code (see README "Fault tolerance"): 0 done, 75 stopped by
  SIGUSR1 outside Slurm, 143 stopped by SIGTERM, 3 non-finite stop, 2 a user error.
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
from lightning.pytorch.plugins.environments import ClusterEnvironment  # noqa: E402
from lightning.pytorch.plugins.io import CheckpointIO  # noqa: E402

from ldm_lightning.training.base import NonFiniteLossError  # noqa: E402
from ldm_lightning.training.checkpointing import AtomicCheckpointIO, StepCheckpoint  # noqa: E402
from ldm_lightning.training.preemption import PreemptionCallback, slurm_environment  # noqa: E402
from ldm_lightning.training.resume import CorruptCheckpointError, resolve_resume_checkpoint, say  # noqa: E402
from ldm_lightning.training.rng_state import RNGStateCallback  # noqa: E402
from ldm_lightning.training.telemetry import TelemetryCallback  # noqa: E402

EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
# --ckpt_path values Lightning itself resolves (best model, Lightning's hpc checkpoints, model registry).
_LIGHTNING_CKPT_WORDS = ("best", "hpc")


def default_callbacks() -> list[Callback]:
    """Callbacks every training run gets, unless the config already has one of the same class: config
    files list one only to change its options."""
    return [TelemetryCallback(), StepCheckpoint(), RNGStateCallback(), PreemptionCallback()]


def default_plugins(configured: list, strategy) -> list:
    """Plugins every run gets unless one of the same kind is configured: atomic checkpoint writes (not for
    DeepSpeed, which writes its own directories) and, under Slurm, the cluster environment without
    Lightning's auto-requeue (it saves inside the signal handler; PreemptionCallback does it safely)."""
    extra = []
    if "deepspeed" not in str(strategy).lower() and not any(isinstance(p, CheckpointIO) for p in configured):
        extra.append(AtomicCheckpointIO())
    slurm = slurm_environment()
    if slurm is not None and not any(isinstance(p, ClusterEnvironment) for p in configured):
        extra.append(slurm)
    return extra


def checkpoint_dir(trainer_config) -> str:
    """Where this run's StepCheckpoint writes: its configured dirpath, else <default_root_dir>/checkpoints."""
    for cb in trainer_config.get("callbacks") or []:
        if str(getattr(cb, "class_path", "")).endswith("StepCheckpoint"):
            dirpath = (getattr(cb, "init_args", None) or {}).get("dirpath")
            if dirpath:
                return os.fspath(dirpath)
    return os.path.join(trainer_config.get("default_root_dir") or os.getcwd(), "checkpoints")


def resolve_ckpt_path(requested: str | None, directory: str, max_steps: int | None = None) -> str | None:
    """The checkpoint `fit` resumes from (None: from scratch). Raises FileNotFoundError /
    CorruptCheckpointError with a message for the user."""
    if requested is not None and (requested in _LIGHTNING_CKPT_WORDS or "registry" in requested):
        return requested
    if requested is None:
        found = resolve_resume_checkpoint(directory) if os.path.isdir(directory) else None
        if found is not None:
            say(f"{directory} holds checkpoints of an earlier run; a rerun in the same run directory resumes "
                "(for a fresh run use a new --trainer.default_root_dir)")
    elif requested == "last":
        found = resolve_resume_checkpoint(directory)
        if found is None:
            say(f"--ckpt_path last: no checkpoint in {directory} yet; starting from scratch")
    else:
        found = resolve_resume_checkpoint(requested)
    if found is None:
        return None
    say(f"resuming from {found.path}" + (f" (global step {found.global_step})" if found.global_step is not None else ""))
    if found.global_step is not None and max_steps is not None and 0 < max_steps <= found.global_step:
        say(f"{found.path} is at global step {found.global_step} and trainer.max_steps={max_steps}: nothing left "
            "to train (raise --trainer.max_steps to train longer)")
    return found.path


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
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        config["plugins"] = plugins + default_plugins(plugins, config.get("strategy"))
        return super()._instantiate_trainer(config, callbacks)

    def _parse_ckpt_path(self) -> None:
        # Replaces Lightning's, which loads an explicit file unvalidated (a truncated one is a traceback) and
        # merges its hyper-parameters over the command line. Here the config is the source of truth and the
        # checkpoint gives the state; the path is resolved once, before anything is built.
        sub = self.config.get("subcommand")
        if sub != "fit":
            return
        config = self.config[sub]
        trainer = config.trainer
        config.ckpt_path = resolve_ckpt_path(config.get("ckpt_path"), checkpoint_dir(trainer),
                                             trainer.get("max_steps"))

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in self._subcommand_method_arguments[subcommand] and kwargs.get("weights_only") is None:
            kwargs["weights_only"] = True  # a resume never unpickles arbitrary objects
        return kwargs


def _check_config_error(exc: SystemExit) -> None:
    """Re-raise parse failures with the innermost message (our `__post_init__` texts name the field)."""
    cause = exc.__context__
    while cause is not None and cause.__context__ is not None and not isinstance(cause, ValueError):
        cause = cause.__context__
    if isinstance(cause, ValueError):
        print(f"ldm-lightning: invalid config: {cause}", file=sys.stderr)


def exit_code(cli: LightningCLI) -> int:
    """0, or the code of a signal stop (PreemptionCallback.exit_code)."""
    trainer = getattr(cli, "trainer", None)
    for cb in trainer.callbacks if trainer is not None else []:
        if isinstance(cb, PreemptionCallback) and cb.exit_code is not None:
            return cb.exit_code
    return 0


def run_lightning_cli(argv: list[str] | None = None) -> int:
    """Entry point of `ldm-lightning fit|validate|test` (argv starts with the subcommand); returns the exit code."""
    try:
        cli = build_lightning_cli(argv)
    except (FileNotFoundError, CorruptCheckpointError) as e:  # from the checkpoint resolution
        print(f"ldm-lightning: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except NonFiniteLossError as e:
        print(f"ldm-lightning: training stopped: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    return exit_code(cli)


def build_lightning_cli(argv: list[str] | None = None, run: bool = True) -> LightningCLI:
    """The LightningCLI object (runs the subcommand when `run`)."""
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

