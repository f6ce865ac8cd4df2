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
    `module` (ZeRO-1/2: not partitioned). A universal load restores only the parameters the optimizer trains
    (from its `zero/` folder) and skips the module's state dict, which holds the rest."""
    folder = Path(path) / checkpoint_tag(path)
    state = torch.load(folder / MODEL_STATES, map_location="cpu", weights_only=True)["module"]
    trained = {name for name, p in module.named_parameters() if p.requires_grad}
    result = module.load_state_dict({k: v for k, v in state.items() if k not in trained}, strict=False)
    unexpected = list(result.unexpected_keys)
    if unexpected:
        raise UniversalConversionError(f"cannot resume {path}: it holds entries this model lacks ({unexpected[:3]})")
