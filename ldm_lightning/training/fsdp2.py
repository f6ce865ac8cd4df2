"""FSDP2 (`torch.distributed.fsdp.fully_shard`) through Lightning's `ModelParallelStrategy`: `trainer.strategy: fsdp2`.

Every rank holds 1/world of each trained parameter, of its gradient, of its AdamW moments and of its EMA copy
(DTensors sharded on dim 0 over the data-parallel mesh); a block's full weights exist only while it runs.
`TrainingModule.configure_model` calls `FSDP2Strategy.shard(module)`:
  * `fully_shard` per block (every module that runs inside an `nn.ModuleList` or a level module: DiT blocks, UNet
    res/attention blocks, the autoencoder's res/attention/up/downsample blocks), then on the network's root (the
    denoiser, the autoencoder, the discriminator) — the standard FSDP2 layout, one all-gather per block;
  * the EMA copy is sharded the same way, so `EMA.update` lerps local shards into local shards (no gather);
  * a `MixedPrecisionPolicy`: on CUDA bf16 compute (all-gathered params in bf16), gradients reduced in fp32,
    sharded params and optimizer state fp32; on CPU everything fp32 (gloo has no bf16 reduce worth using).
  * trained parameters outside any sharded child are refused (they would not be synchronised between ranks).

Checkpoints are DCP folders (ldm_lightning/dcp_files.py), written atomically: every rank writes into a hidden
temp folder next to the target (`.<name>.<8 chars>.tmp`), rank 0 adds `meta.pt`, fsyncs, and swaps it in by
renames (the old folder is moved aside first, then removed: a kill between those two renames leaves
`last.ckpt` missing but the step folder of the same step, written just before it, in place — resume picks that).
Loading reads `.metadata` and the non-tensor items with the restricted readers of dcp_files.py, `meta.pt` with
`weights_only=True`. A plain `.ckpt` file (e.g. from a DDP run) loads too: its full weights are scattered.

On the CPU accelerator it runs over gloo (`--trainer.accelerator cpu`): the same code path, fp32.
"""

from __future__ import annotations

import os
import secrets
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

from ldm_lightning.dcp_files import META_FILE, fsync_tree, is_sharded_checkpoint, load_into
from ldm_lightning.errors import UserError

ParamDtype = Literal["auto", "fp32", "bf16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class FSDP2Error(UserError):
    """A module or option that FSDP2 cannot shard as configured."""


def is_container(module: nn.Module) -> bool:
    """A module that only holds others and never runs (no forward of its own: `nn.Module()` namespaces, levels
    holding `block` / `attn` / `downsample`, ModuleLists): its parent calls its children directly."""
    return type(module).forward is nn.Module.forward or isinstance(module, (nn.ModuleList, nn.ModuleDict))


def block_units(network: nn.Module) -> list[nn.Module]:
    """The modules `fully_shard` wraps one by one: every module with parameters that runs its own forward and
    sits in a container (a child of an `nn.ModuleList`, or of a level / namespace module without a forward),
    innermost first (FSDP2 needs nested units sharded before their parents). A container itself is no unit: its
    forward never runs, so FSDP2's gather-before-forward hook would never fire for it."""
    units = {id(c) for m in network.modules() if m is not network and is_container(m)
             for c in m.children() if not is_container(c) and any(True for _ in c.parameters())}
    # modules() is pre-order and yields each module once: reversed, children come before their parents
    return [m for m in reversed(list(network.modules())) if id(m) in units]


def load_full_weights(network: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Full (unsharded) tensors, the same on every rank, into `network`, sharded or not; keys it lacks keep their
    values (strict=False). Under FSDP2 every rank must call it (each keeps its own shard of each tensor)."""
    from torch.distributed.tensor import DTensor
    if not any(isinstance(p, DTensor) for p in network.parameters()):
        network.load_state_dict(state_dict, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    # a copy: set_model_state_dict replaces the dict's entries by this rank's shards (the caller may reuse it)
    set_model_state_dict(network, dict(state_dict), options=StateDictOptions(full_state_dict=True, strict=False))


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all processes (data_parallel_size = world size, no tensor parallelism), DCP checkpoints."""

    strategy_name = "fsdp2"

    def __init__(self, param_dtype: ParamDtype = "auto", reduce_dtype: Literal["fp32", "bf16"] = "fp32",
                 reshard_after_forward: bool = True, process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout):
        """
        Args:
            param_dtype: dtype of the all-gathered parameters the blocks compute in: 'auto' = bf16 on CUDA, fp32
                on CPU. The sharded parameters, the optimizer state and the EMA stay fp32.
            reduce_dtype: dtype of the gradient reduce-scatter.
            reshard_after_forward: free each block's gathered weights after its forward (ZeRO-3-like memory;
                False keeps them until the backward: ZeRO-2-like, one all-gather less per step).
            process_group_backend: default: nccl on CUDA, gloo on CPU.
            timeout: collective timeout.
        """
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=True,
                         process_group_backend=process_group_backend, timeout=timeout)
        if param_dtype not in ("auto", *DTYPES) or reduce_dtype not in DTYPES:
            raise FSDP2Error(f"trainer.strategy fsdp2: param_dtype must be auto/fp32/bf16 and reduce_dtype fp32/bf16; "
                             f"got {param_dtype!r}, {reduce_dtype!r}")
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # Pure FSDP: one data-parallel dimension over every process (the parent's 'auto' is one per node).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    # --- sharding ------------------------------------------------------------------------------------
    def mixed_precision_policy(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy
        name = self.param_dtype if self.param_dtype != "auto" else ("bf16" if self.root_device.type == "cuda" else "fp32")
        return MixedPrecisionPolicy(param_dtype=DTYPES[name], reduce_dtype=DTYPES[self.reduce_dtype],
                                    output_dtype=torch.float32)

    def shard(self, module: nn.Module, networks: list[nn.Module]) -> None:
        """`fully_shard` each of `networks` (per block, then its root) on the data-parallel mesh; then check that
        every trained parameter of `module` is sharded. Idempotent (configure_model may run more than once)."""
        from torch.distributed.fsdp import FSDPModule, fully_shard
        from torch.distributed.tensor import DTensor

        mesh = self.device_mesh["data_parallel"]
        kw = dict(mesh=mesh, mp_policy=self.mixed_precision_policy(), reshard_after_forward=self.reshard_after_forward)
        for net in networks:
            if isinstance(net, FSDPModule):
                continue
            for unit in block_units(net):
                fully_shard(unit, **kw)
            # A trained network's root keeps its own (few) parameters gathered from forward to backward (FSDP2's
            # default for a root, reshard_after_forward=None): they would be gathered again at once, and the
            # autoencoder's adaptive GAN weight differentiates w.r.t. one of them (decoder.conv_out.weight) after
            # forward. A frozen copy (the EMA) is resharded after each forward: nothing else would free it.
            trained = any(p.requires_grad for p in net.parameters())
            fully_shard(net, **(kw | {"reshard_after_forward": None} if trained else kw))
        loose = [n for n, p in module.named_parameters() if not isinstance(p, DTensor) and p.requires_grad]
        if loose:
            raise FSDP2Error(f"FSDP2 shards {', '.join(type(n).__name__ for n in networks)} only; the trained "
                             f"parameters {loose[:3]} are outside them and would not be synchronised between ranks. "
                             "Train this model with --trainer.strategy ddp (or deepspeed_stage_2_anydevice)")

    # --- checkpoints ---------------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        from torch.distributed.checkpoint import save

        path = Path(self.broadcast(str(filepath)))
        tmp = Path(self.broadcast(str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")))
        if self.global_rank == 0:
            tmp.mkdir(parents=True)
        self.barrier()
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        save(state, checkpoint_id=tmp)
        if self.global_rank == 0:
            from ldm_lightning.training.checkpointing import atomic_torch_save
            atomic_torch_save(checkpoint, tmp / META_FILE)  # last: a folder without meta.pt is never valid
            fsync_tree(tmp)
            aside = path.parent / f".{path.name}.old{secrets.token_hex(4)[:5]}.tmp" if path.exists() else None
            if aside is not None:
                os.rename(path, aside)
            os.rename(tmp, path)
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() else aside.unlink(missing_ok=True)
        self.barrier()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict)

        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_sharded_checkpoint(path):  # a full single-file checkpoint: Lightning scatters it (weights only)
            return super().load_checkpoint(path, weights_only=True)
        from ldm_lightning.dcp_files import validate_sharded_checkpoint
        meta = validate_sharded_checkpoint(path)
        strict = self.lightning_module.strict_loading
        model_state = {"state_dict": get_model_state_dict(self.model)}
        load_into(model_state, path)
        set_model_state_dict(self.model, model_state["state_dict"], options=StateDictOptions(strict=strict))
        for i, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            load_into(optim_state, path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optim_state[key],
                                     options=StateDictOptions(cpu_offload=True))
        return meta

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register("fsdp2", cls, description="FSDP2 (fully_shard per block), DCP checkpoints")


def register_fsdp2() -> None:
    """Register `trainer.strategy: fsdp2` in Lightning's `StrategyRegistry` (idempotent)."""
    if "fsdp2" not in StrategyRegistry:
        FSDP2Strategy.register_strategies(StrategyRegistry)
