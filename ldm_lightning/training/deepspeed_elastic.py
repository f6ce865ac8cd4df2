"""Elastic resume for DeepSpeed ZeRO (stages 1-3): a checkpoint written at N processes loaded at M.

A ZeRO checkpoint keeps the optimizer state (fp32 master weights, Adam moments) as one flat partition per
rank (`zero_pp_rank_<r>_mp_rank_00_optim_states.pt`), a layout tied to the world size: DeepSpeed's plain
`load_checkpoint` refuses another data-parallel size. DeepSpeed's own way across is its *universal checkpoint*:
`deepspeed.checkpoint.ds_to_universal` merges the partitions into one fp32 file per parameter (weights, moments),
and an engine whose config says `checkpoint.load_universal` re-partitions them for its own world size.

`AnyDeviceDeepSpeedStrategy.load_checkpoint` (strategies.py) does that on its own when the saved world size
differs: rank 0 converts the checkpoint into a hidden temp folder next to it (the checkpoint itself is only
read), every rank loads the universal folder, the temp folder is removed. Only for a `data.order: global` run
(its data position is in global samples, run_topology.py); otherwise refused before anything is converted.

The converter runs as a subprocess (`python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state`):
it fills in the `universal_checkpoint_info` that Megatron-style clients record and Lightning does not (no
tensor/pipeline parallelism here, so the defaults are right). Like DeepSpeed's own resume it unpickles the
optimizer files with `weights_only=False` (they hold DeepSpeed's LossScaler object); the model-states file,
whose record is read here first, loads with `weights_only=True`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ldm_lightning.errors import UserError

MODEL_STATES = "mp_rank_00_model_states.pt"


class UniversalConversionError(UserError):
    """DeepSpeed's ds_to_universal could not convert a checkpoint for a resume at another world size."""


def checkpoint_tag(path: str | os.PathLike) -> str:
    """The tag (sub-folder) a DeepSpeed checkpoint folder's `latest` file names; Lightning writes 'checkpoint'."""
    latest = Path(path) / "latest"
    return latest.read_text().strip() if latest.is_file() else "checkpoint"


def saved_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """{'dp_world_size': N, 'run_topology': {...} or None} from a DeepSpeed checkpoint folder's model-states file
    (weights_only=True), or None when `path` is not one."""
    folder = Path(path) / checkpoint_tag(path)
    # ZeRO-1/2 write one mp_rank_00_model_states.pt; ZeRO-3 one zero_pp_rank_<r>_mp_rank_00_model_states.pt per rank
    files = sorted(folder.glob(f"*{MODEL_STATES}")) if folder.is_dir() else []
    if not files:
        return None
    file = folder / MODEL_STATES if (folder / MODEL_STATES).is_file() else files[0]
    state = torch.load(file, map_location="cpu", weights_only=True)
    return {"dp_world_size": int(state.get("dp_world_size", 0) or 0), "run_topology": state.get("run_topology")}


def convert_to_universal(path: str | os.PathLike, out: str | os.PathLike) -> None:
    """Write DeepSpeed's universal checkpoint of folder `path` into `out` (same layout: `out/latest_universal`,
    `out/<tag>/`). Raises `UniversalConversionError` with the converter's last lines when it fails."""
    tag = checkpoint_tag(path)
    Path(out).mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(Path(path) / tag),
           "--output_folder", str(Path(out) / tag), "--inject_missing_state",
           "--num_extract_workers", "1", "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (Path(out) / "latest_universal").is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise UniversalConversionError(
            f"cannot resume {path} at another world size: DeepSpeed's ds_to_universal failed to convert it "
            f"(exit {proc.returncode}):\n{tail}\nResume at the world size that saved it (--trainer.devices / "
            "--trainer.num_nodes), or convert it to fp32 weights with zero_to_fp32.py and start a fresh run.")


def restore_untrained_state(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load the frozen parameters (the EMA copy) and buffers (its update count) of checkpoint folder `path` into
    `module`. A universal load restores only the parameters the optimizer trains (from its `zero/` folder) and
    skips the module's state dict, which holds the rest.

    ZeRO-1/2 write the frozen parameters whole into `mp_rank_00_model_states.pt`; ZeRO-3 writes each rank's
    partition of them (`frozen_param_fragments`, with `frozen_param_shapes`) into its own
    `zero_pp_rank_<r>_mp_rank_00_model_states.pt`: they are concatenated in rank order (the way DeepSpeed's
    zero_to_fp32 merges them) and re-partitioned for this run (`write_zero3_param`). All read with weights_only."""
    folder = Path(path) / checkpoint_tag(path)
    params = dict(module.named_parameters())
    if (folder / MODEL_STATES).is_file():
        state = torch.load(folder / MODEL_STATES, map_location="cpu", weights_only=True)["module"]
        frozen = {k: v for k, v in state.items() if k in params and not params[k].requires_grad}
    else:
        ranks = [torch.load(f, map_location="cpu", weights_only=True) for f in zero3_model_state_files(folder)]
        state = ranks[0]["module"]
        frozen = {name: torch.cat([r["frozen_param_fragments"][name].flatten() for r in ranks])[:shape.numel()]
                  .view(shape) for name, shape in (ranks[0].get("frozen_param_shapes") or {}).items()}
    buffers = dict(module.named_buffers())
    unexpected = [k for k in [*state, *frozen] if k not in params and k not in buffers]
    if unexpected:
        raise UniversalConversionError(f"cannot resume {path}: it holds entries this model lacks ({unexpected[:3]})")
    module.load_state_dict({k: v for k, v in state.items() if k not in params}, strict=False)  # the buffers
    for name, value in frozen.items():
        if params[name].requires_grad:
            raise UniversalConversionError(f"cannot resume {path}: {name} is frozen in it but trained in this model")
        if hasattr(params[name], "ds_tensor"):
            write_zero3_param(params[name], value)
        else:
            params[name].data.copy_(value)


def zero3_model_state_files(folder: Path) -> list[Path]:
    """A ZeRO-3 checkpoint tag folder's per-rank model-states files, in rank order (numeric: rank 10 after 9)."""
    files = {int(re.match(r"zero_pp_rank_(\d+)_", f.name).group(1)): f
             for f in folder.glob(f"zero_pp_rank_*_{MODEL_STATES}")}
    if sorted(files) != list(range(len(files))) or not files:
        raise UniversalConversionError(f"cannot resume {folder}: its ZeRO-3 model-states files are incomplete "
                                       f"(ranks {sorted(files)}); resume from another checkpoint")
    return [files[r] for r in range(len(files))]


def write_zero3_param(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Set a ZeRO-3 parameter to the full tensor `value` on every rank: this rank's slice of the flat, zero-padded
    tensor into its partition (`ds_tensor`), and the full copy too when the parameter is gathered or persistent."""
    import deepspeed.comm as dist

    part = param.ds_tensor
    rank = dist.get_rank(group=param.ds_process_group)
    flat = torch.zeros(part.numel() * dist.get_world_size(group=param.ds_process_group), dtype=part.dtype)
    flat[:value.numel()] = value.flatten().to(part.dtype)
    part.data.copy_(flat[rank * part.numel():(rank + 1) * part.numel()])
    if param.numel() == value.numel():
        param.data.copy_(value.view_as(param))
