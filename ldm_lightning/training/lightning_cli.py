"""`ldm-lightning fit|validate|test` — LightningCLI over a stage config plus a trainer config.

    ldm-lightning fit -c configs/autoencoder/kl-f8.yaml -c configs/trainer/ddp-8gpu.yaml \
        --trainer.max_steps 1000 --ckpt_path last

* model and data are given in subclass mode (`class_path` + `init_args`), so one entry point trains
  every stage; later `-c` files and `--a.b value` flags override earlier ones (jsonargparse).
* `--print_config` prints the fully resolved config; `--help` lists every field with its type.
* Typed arguments are checked by jsonargparse; our dataclass configs validate in `__post_init__`,
  whose ValueError names the field and the allowed values. A user error (config, files, data) is one
  paragraph and exit 2 (training/cli_errors.py); `--debug` shows the traceback.
* The resolved config is saved next to the logs AND into the W&B run config (`LoggedSaveConfigCallback`).
* What every run gets unless its config lists one of the same kind — telemetry and fault tolerance — is
  decided in training/cli_defaults.py; which checkpoint it resumes from (`--ckpt_path last`, an explicit
  file, or a rerun in a run directory that holds checkpoints) in training/resume.py. Loading is
  `weights_only=True`.
* `run_lightning_cli` returns the process exit code (see docs/fault-tolerance.md): 0 done, 75 stopped by
  SIGUSR1 outside Slurm, 143 stopped by SIGTERM, 130 stopped by Ctrl-C (SIGINT), 3 non-finite stop, 2 a user
  error (a second `fit` on a run folder in use included: training/run_lock.py).
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from ldm_lightning.errors import UserError
from ldm_lightning.training.cli_errors import (check_hparams_agree, config_error_message, join_negative_values,
                                               state_dict_mismatch_message)
from ldm_lightning.training.cli_defaults import configured_checkpoint_dir, default_callbacks, default_plugins
from ldm_lightning.training.nonfinite_guard import NonFiniteLossError
from ldm_lightning.training.preemption import EXIT_INTERRUPTED, PreemptionCallback, interrupted_twice
from ldm_lightning.training.resume import CorruptCheckpointError, resolve_ckpt_path, saved_hparams
from ldm_lightning.training.run_lock import RunFolderBusy, RunLock, is_launch_rank_zero
from ldm_lightning.training.strategies import register_strategies
from ldm_lightning.user_errors import EXIT_USER_ERROR, print_user_error, split_debug, user_error_message

EXIT_NONFINITE = 3


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
    running = False
    """False while parsing and building (an error then is in the user's config), True once the run starts."""
    subcommand_name = "fit"
    run_lock: RunLock | None = None
    """The run folder's lock while this process (global rank 0 of a `fit`) holds it (training/run_lock.py)."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        # One directory per run: the W&B logger writes where the trainer does unless told otherwise, so its
        # files and wandb_run_id.txt sit beside <default_root_dir>/checkpoints.
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
        if config.get("logger") is False:  # e.g. `--trainer.logger false` over a shipped trainer config
            listed = list(config.get("callbacks") or [])
            config["callbacks"] = [c for c in listed if not isinstance(c, LearningRateMonitor)]
            if len(config["callbacks"]) < len(listed):  # Lightning would stop the run: it has nothing to log to
                print("[ldm-lightning] trainer.logger=false: the LearningRateMonitor callback is left out",
                      file=sys.stderr)
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
        # One run per folder: the lock comes first, before a checkpoint is chosen and before the logger (built
        # next) writes its run id into the folder. Rank 0 only: one lock per run, not per process.
        if is_launch_rank_zero() and LDMLightningCLI.run_lock is None:
            lock = RunLock(trainer.get("default_root_dir") or os.getcwd())
            if lock.acquire():
                LDMLightningCLI.run_lock = lock
        config.ckpt_path = resolve_ckpt_path(config.get("ckpt_path"), configured_checkpoint_dir(trainer),
                                             trainer.get("max_steps"))

    def _run_subcommand(self, subcommand: str) -> None:
        check_hparams_agree(self.model, self.datamodule)
        LDMLightningCLI.running = True  # from here on an exception is a run's, not the config's
        try:
            super()._run_subcommand(subcommand)
        except RuntimeError as e:
            ckpt = self.config[subcommand].get("ckpt_path") if subcommand == "fit" else None
            if not ckpt or "Error(s) in loading state_dict" not in str(e):
                raise
            # A resume with a changed model: Lightning's error lists every mismatched tensor (hundreds of lines).
            raise UserError(state_dict_mismatch_message(
                e, ckpt, saved_hparams(ckpt), dict(self.model.hparams),
                self.config[subcommand].trainer.get("default_root_dir"))) from e

    def after_fit(self) -> None:
        # LightningCLI calls this when fit returns: a caller that goes on in this process (the demo's next
        # phase) holds no lock. An exception is released by run_lightning_cli, or by the process's end.
        release_run_lock()

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in self._subcommand_method_arguments[subcommand] and kwargs.get("weights_only") is None:
            kwargs["weights_only"] = True  # a resume never unpickles arbitrary objects
        return kwargs


def exit_code(cli: LightningCLI) -> int:
    """0, or the code of a signal stop (PreemptionCallback.exit_code)."""
    trainer = getattr(cli, "trainer", None)
    for cb in trainer.callbacks if trainer is not None else []:
        if isinstance(cb, PreemptionCallback) and cb.exit_code is not None:
            return cb.exit_code
    return 0


def run_lightning_cli(argv: list[str] | None = None) -> int:
    """Entry point of `ldm-lightning fit|validate|test` (argv starts with the subcommand); returns the exit code.

    A user error prints one paragraph and returns 2; `--debug` (or LDM_DEBUG=1) shows the traceback instead.
    """
    argv = join_negative_values(list(sys.argv[1:] if argv is None else argv))
    debug, argv = split_debug(argv)
    LDMLightningCLI.running = False
    LDMLightningCLI.subcommand_name = argv[0] if argv else "fit"
    try:
        cli = build_lightning_cli(argv)
    except NonFiniteLossError as e:
        print(f"ldm-lightning: training stopped: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except SystemExit:
        if interrupted_twice():  # Lightning ends a KeyboardInterrupt with exit(1): report Ctrl-C as Ctrl-C
            print("ldm-lightning: interrupted (second Ctrl-C): stopped at once, nothing more saved", file=sys.stderr)
            return EXIT_INTERRUPTED
        raise  # --help, --print_config
    except KeyboardInterrupt:  # Ctrl-C before training started or after it ended: nothing to save
        print("ldm-lightning: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if isinstance(e, RunFolderBusy):
            message = str(e)
        elif not LDMLightningCLI.running:
            message = config_error_message(e, LDMLightningCLI.subcommand_name)
        elif isinstance(e, MisconfigurationException):  # Lightning's checks of the trainer against the module
            message = (f"Lightning refused this configuration: {e} Change the trainer config or flags "
                       "(--print_config shows the resolved config).")
        elif isinstance(e, CorruptCheckpointError):
            message = str(e)
        elif user_error_message(e) is not None:  # errors of the user's input whenever they happen (a run reads
            message = user_error_message(e)      # files and data long after start-up): the rule of every subcommand
        else:
            raise  # a failure of the run itself: its traceback is the report
        if debug:
            raise
        print_user_error("ldm-lightning", message)
        return EXIT_USER_ERROR
    finally:
        release_run_lock()
    code = exit_code(cli)
    trainer = getattr(cli, "trainer", None)
    if any(getattr(cb, "exit_on_sigterm", False) for cb in (trainer.callbacks if trainer is not None else [])):
        # Saved, not requeued, under Slurm: end now with this code. Once one rank exits 75, srun's
        # --kill-on-bad-exit SIGTERMs the others; Python's own shutdown restores SIGTERM's default action, so a
        # rank caught there would end as 143 and the job's exit code would depend on which rank finished first.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def release_run_lock() -> None:
    """Let go of the run folder's lock if this process holds it."""
    if LDMLightningCLI.run_lock is not None:
        LDMLightningCLI.run_lock.release()
        LDMLightningCLI.run_lock = None


def build_lightning_cli(argv: list[str] | None = None, run: bool = True) -> LightningCLI:
    """The LightningCLI object (runs the subcommand when `run`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        # DeepSpeed chooses its accelerator when first imported (a DeepSpeed strategy's constructor imports it):
        # make the CPU choice explicit and quiet. Set here, at the CLI entry, not when a module is imported.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    register_strategies()  # `trainer.strategy: deepspeed_stage_2_anydevice` etc.
    with warnings.catch_warnings():
        # We always pass argv (it may have been rewritten); Lightning warns when it differs from sys.argv.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return LDMLightningCLI(
            model_class=LightningModule,
            subclass_mode_model=True,
            datamodule_class=None,
            subclass_mode_data=True,
            save_config_callback=LoggedSaveConfigCallback,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            auto_configure_optimizers=False,  # TrainingModule.configure_optimizers owns the optimizer
            args=argv,
            run=run,
            # Raise instead of printing the whole usage: run_lightning_cli prints one paragraph.
            parser_kwargs={"exit_on_error": False},
        )

