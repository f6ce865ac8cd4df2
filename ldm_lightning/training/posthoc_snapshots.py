"""Post-hoc EMA snapshot files: `<checkpoint dir>/posthoc-ema/ema-<t:08d>.safetensors`, one per snapshot time.

A file holds every tracked profile (`<profile index>.<state-dict key>`, float32) and, in the safetensors
metadata, what synthesis and export need: the format tag, the EMA update count `t` (the profiles' time), the
profiles' sigma_rels and gammas, and the module's checkpoint metadata (the
`ldm_lightning` entry of its checkpoints: what `export` / `load_denoiser` rebuild the network from). Written
atomically (`fileio.atomic_write_bytes`) by global rank 0, right after the EMA update of that step and so
before that step's checkpoint: a resume from any checkpoint finds every snapshot up to its step, and
rewrites later ones (identically: a resume is exact). Safetensors: reading one runs no code.

No Lightning here: `ldm-lightning ema-reconstruct` reads these files.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_lightning.fileio import atomic_write_bytes

FORMAT = "ldm_lightning.posthoc_ema/1"
SUBDIR = "posthoc-ema"
NAME = re.compile(r"ema-(\d{8})\.safetensors")


@dataclass
class Snapshot:
    path: Path
    t: int
    sigma_rels: list[float]
    gammas: list[float]
    meta: dict


def snapshot_path(directory: str | os.PathLike, t: int) -> Path:
    return Path(directory) / f"ema-{t:08d}.safetensors"


def write_snapshot(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], t: int,
                   sigma_rels: list[float], gammas: list[float], meta: dict) -> Path:
    from safetensors.torch import save
    metadata = {"format": FORMAT, "t": str(t),
                "sigma_rels": json.dumps(sigma_rels), "gammas": json.dumps(gammas), "meta": json.dumps(meta)}
    path = snapshot_path(directory, t)
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def read_header(path: str | os.PathLike) -> Snapshot:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if md.get("format") != FORMAT:
        raise ValueError(f"{path}: not a post-hoc EMA snapshot (format {md.get('format')!r}, expected {FORMAT!r})")
    return Snapshot(Path(path), int(md["t"]), json.loads(md["sigma_rels"]),
                    json.loads(md["gammas"]), json.loads(md["meta"]))


def read_profile(snapshot: Snapshot, index: int) -> dict[str, torch.Tensor]:
    """The state dict of profile `index` of `snapshot` (float32, CPU)."""
    from safetensors import safe_open
    prefix = f"{index}."
    with safe_open(str(snapshot.path), framework="pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def list_snapshots(directory: str | os.PathLike) -> list[Snapshot]:
    """Every snapshot in `directory` (a run's checkpoint folder or its posthoc-ema/ folder), by time."""
    directory = Path(directory)
    if (directory / SUBDIR).is_dir():
        directory = directory / SUBDIR
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such folder of post-hoc EMA snapshots (they are written to "
                                f"<checkpoint dir>/{SUBDIR}/ by a run with model.init_args.posthoc_ema set)")
    found = sorted((read_header(directory / n) for n in os.listdir(directory) if NAME.fullmatch(n)),
                   key=lambda s: s.t)
    if not found:
        raise FileNotFoundError(f"{directory}: no post-hoc EMA snapshots (ema-<t>.safetensors) in it")
    return found
