"""DeepSpeed that also runs on the CPU accelerator (`AnyDeviceDeepSpeedStrategy`).

`AnyDeviceDeepSpeedStrategy` is Lightning's `DeepSpeedStrategy` with two CUDA-only assumptions removed,
so the very same ZeRO-1/2/3 configs run in CI on CPU (`DS_ACCELERATOR=cpu`, gloo) and on GPUs:
  * `setup_environment` refuses any accelerator but CUDA ("only supported on CUDA GPUs");
  * `setup_distributed` validates `cuda:<i>` device indices, and `deepspeed.initialize` is given
    `device_rank=root_device.index`, which is `None` for `cpu` (DeepSpeed then fails on `None >= 0`).
On a CUDA accelerator every method defers to Lightning unchanged — it *is* the normal GPU path.

Registered names (usable as `trainer.strategy: deepspeed_stage_2_anydevice` etc. once
`register_strategies()` has run — `ldm-lightning fit|validate|test` calls it at its entry; importing this
module registers nothing):
  deepspeed_anydevice, deepspeed_stage_{1,2,3}_anydevice, deepspeed_stage_{2,3}_offload_anydevice;
  and fsdp2 (training/fsdp2.py).

Use a torch optimizer (what `TrainingModule.configure_optimizers` returns): DeepSpeed's own fused CPU
Adam is JIT-compiled (~100 s on CPU), and `zero_force_ds_cpu_optimizer` is switched off here so ZeRO
accepts it.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.accelerators.cuda import CUDAAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy, StrategyRegistry
from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.fabric.utilities.seed import reset_seed
from torch import nn


class AnyDeviceDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy, also on `accelerator: cpu` (gloo). Same arguments as
    `lightning.pytorch.strategies.DeepSpeedStrategy`."""

    strategy_name = "deepspeed_anydevice"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._on_cpu_env() and "DS_ACCELERATOR" not in os.environ:
            # DeepSpeed picks its accelerator at import; without CUDA it warns and picks CPU anyway.
            os.environ["DS_ACCELERATOR"] = "cpu"

    @staticmethod
    def _on_cpu_env() -> bool:
        return not torch.cuda.is_available()

    def _on_cuda(self) -> bool:
        return isinstance(self.accelerator, CUDAAccelerator)

    def setup_environment(self) -> None:
        if self._on_cuda():
            return super().setup_environment()
        # Skip DeepSpeedStrategy's CUDA check; keep DDP's environment setup (ranks, process group).
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        if self._on_cuda():
            return super().setup_distributed()
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _get_process_group_backend(self) -> str:
        # Lightning would choose gloo for CPU too; pin it so DeepSpeed's CPU accelerator ("ccl") is never asked.
        return super()._get_process_group_backend() if self._on_cuda() else "gloo"

    def _ds_args(self) -> argparse.Namespace:
        # DeepSpeed calls accelerator.set_device(device_rank): the CUDA index on GPUs, the local rank on CPU.
        index = self.root_device.index
        return argparse.Namespace(device_rank=self.local_rank if index is None else index)

    def _init_config_if_needed(self) -> None:
        super()._init_config_if_needed()
        # Accept torch optimizers under ZeRO (DeepSpeed otherwise insists on its compiled CPU Adam on CPU).
        self.config.setdefault("zero_allow_untested_optimizer", True)
        self.config.setdefault("zero_force_ds_cpu_optimizer", False)

    def _auto_select_batch_size(self) -> int:
        # Lightning reads `train_dataloader.batch_sampler.batch_size`, which is None for loaders over
        # IterableDatasets that batch inside the dataset (our WebDataset stream). DeepSpeed uses the
        # value only for its throughput timer / batch bookkeeping, so fall back to the datamodule's.
        try:
            return super()._auto_select_batch_size()
        except AttributeError:
            datamodule = getattr(self.lightning_module.trainer, "datamodule", None)
            return int(getattr(datamodule, "batch_size", 1) or 1)

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        model_parameters = filter(lambda p: p.requires_grad, model.parameters())
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=self._ds_args(), config=self.config, model=model, model_parameters=model_parameters,
            optimizer=optimizer, lr_scheduler=lr_scheduler, dist_init_required=False)
        return engine, ds_optimizer

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """DeepSpeed's load; a ZeRO-1/2/3 checkpoint saved at another world size goes through DeepSpeed's universal
        checkpoint first (deepspeed_elastic.py), for a `data.order: global` run (refused otherwise)."""
        from ldm_lightning.training import deepspeed_elastic as elastic

        path = Path(self.broadcast(str(checkpoint_path)))
        record = elastic.saved_record(path) if path.is_dir() and not self.load_full_weights else None
        if record is None or record["dp_world_size"] in (0, self.world_size):
            return super().load_checkpoint(checkpoint_path, weights_only)
        from ldm_lightning.training.run_topology import TopologyChanged, mismatch_message

        saved = record["run_topology"] or {"world_size": record["dp_world_size"]}
        if saved.get("order") != "global":
            now = {"world_size": self.world_size, "num_nodes": self.num_nodes, "devices": self.num_processes}
            raise TopologyChanged(mismatch_message(saved, now, str(path)))
        universal = Path(self.broadcast(str(path.parent / f".{path.name}.universal.{secrets.token_hex(4)}.tmp")))
        try:
            failure = None
            if self.global_rank == 0:
                print(f"[ldm-lightning] {path} was saved by {record['dp_world_size']} DeepSpeed processes, this run "
                      f"has {self.world_size}: converting it to DeepSpeed's universal checkpoint (ds_to_universal) "
                      "to re-partition the ZeRO optimizer state", flush=True)
                try:
                    elastic.convert_to_universal(path, universal)
                except elastic.UniversalConversionError as e:
                    failure = str(e)
            failure = self.broadcast(failure)  # every rank stops with the same message
            if failure:
                raise elastic.UniversalConversionError(failure)
            self.deepspeed_engine._config.load_universal_checkpoint = True
            try:
                client_state = super().load_checkpoint(universal, weights_only)
            finally:
                self.deepspeed_engine._config.load_universal_checkpoint = False
            elastic.restore_untrained_state(self.deepspeed_engine.module, path)
            return client_state
        finally:
            self.barrier()
            if self.global_rank == 0:
                shutil.rmtree(universal, ignore_errors=True)

    def set_gradient_accumulation(self, steps: int) -> None:
        """DeepSpeed decides accumulation boundaries itself (its `gradient_accumulation_steps`, fixed when the
        engine is built): an elastic resume that changes `trainer.accumulate_grad_batches` (run_topology.py)
        changes it here too, or the engine would step the optimizer on every micro-batch."""
        engine = self.deepspeed_engine
        engine.set_train_batch_size(engine.train_micro_batch_size_per_gpu() * engine.dp_world_size * steps)
        self.config["gradient_accumulation_steps"] = steps
        self.config["train_batch_size"] = engine.train_batch_size()

    def backward(self, closure_loss, optimizer, *args, **kwargs):
        # Lightning already divides the loss by accumulate_grad_batches; DeepSpeed's engine would divide it by
        # its gradient_accumulation_steps again (scale_wrt_gas), making the gradient 1/accumulation of the
        # global batch's mean (not what DDP computes; it matters to gradient clipping and an elastic resume).
        kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def optimizer_step_applied(self) -> bool:
        """Whether the engine's last `step()` changed the weights: Lightning calls it on every micro-batch
        (DeepSpeed handles accumulation), so the EMA (training/base.py) updates only when this is True."""
        return bool(self.deepspeed_engine.was_step_applied())

    def _initialize_deepspeed_inference(self, model: nn.Module) -> None:
        if self._on_cuda():
            return super()._initialize_deepspeed_inference(model)
        import deepspeed
        from lightning.pytorch.strategies.deepspeed import remove_module_hooks

        config = {"train_micro_batch_size_per_gpu": 1}
        for key in ("bf16", "fp16"):
            if key in self.config:
                config[key] = self.config[key]
        if self.zero_stage_3:
            config["zero_allow_untested_optimizer"] = self.config["zero_allow_untested_optimizer"]
            config["zero_optimization"] = self.config["zero_optimization"]
        remove_module_hooks(model)
        self.model, _, _, _ = deepspeed.initialize(
            args=self._ds_args(), config=config, model=model, optimizer=None, lr_scheduler=None,
            model_parameters=[], dist_init_required=False)

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        reg = strategy_registry.register
        reg("deepspeed_anydevice", cls, description="DeepSpeed (CPU or GPU)")
        for stage in (1, 2, 3):
            reg(f"deepspeed_stage_{stage}_anydevice", cls, description=f"DeepSpeed ZeRO-{stage} (CPU or GPU)",
                stage=stage)
        reg("deepspeed_stage_2_offload_anydevice", cls, description="DeepSpeed ZeRO-2 + optimizer offload",
            stage=2, offload_optimizer=True)
        reg("deepspeed_stage_3_offload_anydevice", cls, description="DeepSpeed ZeRO-3 + param/optimizer offload",
            stage=3, offload_optimizer=True, offload_parameters=True)


def register_strategies() -> None:
    """Register the `*_anydevice` names in Lightning's `StrategyRegistry` (idempotent)."""
    if "deepspeed_stage_2_anydevice" not in StrategyRegistry:
        AnyDeviceDeepSpeedStrategy.register_strategies(StrategyRegistry)
    from ldm_lightning.training.fsdp2 import register_fsdp2  # `trainer.strategy: fsdp2` (training/fsdp2.py)
    register_fsdp2()
