"""The ShardDataModule's grouped options: `members` (which tar members and json fields make a sample, and which
samples the json filters keep) and `loader` (how batches reach the training step). The options every config sets
(shards, batch_size, num_workers, the image preparation, kind) stay at the top of `data.init_args`.

The grouped options were flat `data.init_args` names before; for one release those still work, each with one
deprecation line naming its new place (`regroup`)."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

from ldm_lightning.data.members import CAPTION_EXTS, CLASS_EXTS, LATENT_EXTS
from ldm_lightning.data.transforms import IMAGE_KEYS
from ldm_lightning.errors import UserError


@dataclass(frozen=True)
class MembersConfig:
    """Which tar members and json fields make a sample (data/members.py), and the json filters."""

    image_exts: list[str] = field(default_factory=lambda: list(IMAGE_KEYS))
    """Members that hold the image, in priority order (a sample's first present one is used): the WebDataset
    extension after the key's first dot, e.g. jpg, jpeg, png, webp."""
    caption_exts: list[str] = field(default_factory=lambda: list(CAPTION_EXTS))
    """Members that hold the caption (`txt` field of batches), in priority order."""
    caption_key: str | None = None
    """Read the caption from this field of the sample's `json` member instead (e.g. `caption` for img2dataset);
    a sample without the field gets ""."""
    class_exts: list[str] = field(default_factory=lambda: list(CLASS_EXTS))
    """Members that hold the class number (`cls` of batches), in priority order."""
    class_key: str | None = None
    """Read the class from this field of the sample's `json` member instead (-1 when absent)."""
    filters: list[str] | None = None
    """Keep only samples whose `json` member passes every one of these comparisons, each `FIELD OP VALUE` with OP
    one of < <= > >= == != (e.g. `pwatermark < 0.5`, `original_width >= 256`, `aspect <= 2`, `status ==
    success`; `aspect` = original_width / original_height). A sample that fails, or lacks the field, is left out:
    not an error, counted (`filtered_samples`, this rank's, kept in checkpoints) and summed up at each epoch's
    end. The epoch length stays the exact, equal-per-rank one of the unfiltered counts: a reader slot that left
    samples out refills its last batches from its own first samples, as after bad samples."""
    latent_exts: list[str] = field(default_factory=lambda: list(LATENT_EXTS))
    """kind='latent': members that hold the (2c, h, w) float moments (mean ‖ logvar) as .npy, in priority order;
    e.g. [npy] for latent shards written by others (MLPerf SD layout)."""
    map_ext: str | None = None
    """kind='image': a per-pixel class map member decoded beside each image into the batch's `class_map`
    (B, H, W) uint8 (e.g. `seg.png` of `data pack --source mnist-canvas --class-maps`, for semantic synthesis).
    Class ids are not resampled: the map must be image_size square, and random_flip and bucketing are refused
    with it. A sample without a usable map is a bad sample."""


@dataclass(frozen=True)
class LoaderConfig:
    """How batches reach the training step (batch_size and num_workers stay top-level options)."""

    val_batch_size: int | None = None
    """Validation batch size (null: batch_size)."""
    normalize_on_device: bool = True
    """Workers send images as uint8 and `on_after_batch_transfer` converts them to float32 in [-1, 1] on the
    training device: 4× fewer bytes through worker IPC and the host→device copy, and no float pass on the
    loader's CPU. Under a Trainer this is invisible. Loaders used without one then yield uint8 images: pass them
    through `model_inputs(batch)` (or set false to get float32 from the workers)."""
    reuse_batch_memory: bool = True
    """With workers and uint8 images, workers decode into a ring of shared-memory batch buffers (num_workers × 4
    batches of /dev/shm per epoch) that the main process lends out without a copy and takes back once nothing
    refers to them, instead of torch moving every batch into a fresh shared-memory segment, whose page faults
    cost a sizeable fraction of a large image's decode (benchmarks/README.md). Off: torch's default hand-over."""
    pin_memory: bool | None = None
    """Put train/val batches in page-locked host memory, so Lightning's host→device copy (non_blocking=True on
    CUDA) is an asynchronous DMA that overlaps the step instead of a staged synchronous copy. null = on when the
    trainer's device (else torch) is CUDA; never on CPU. Default provisional pending scripts/gpu_bench.sh."""

    def __post_init__(self):
        if self.val_batch_size is not None and self.val_batch_size < 1:
            raise ValueError(f"data.loader.val_batch_size must be >= 1 or null; got {self.val_batch_size!r}")


GROUPS = {"members": MembersConfig, "loader": LoaderConfig}
NEVER_FLAT = {"map_ext"}  # fields added after the grouping: they have no deprecated flat spelling
FLAT_NAMES = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)
              if f.name not in NEVER_FLAT}
"""Deprecated flat `data.init_args` name -> the group that holds it now."""
_warned: set[str] = set()  # one line per name and process


def as_group(cls, value, name: str):
    """`value` (a `cls`, a mapping, or None = the defaults) as a `cls`; a mapping's unknown key is refused."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(dict(value)) - allowed)
    if unknown:
        raise UserError(f"data.{name} has no field(s) {unknown}; its fields are {sorted(allowed)}")
    return cls(**dict(value))


def regroup(members, loader, flat: dict) -> tuple[MembersConfig, LoaderConfig]:
    """The `members` and `loader` groups with the deprecated flat options (`flat`: name -> value, None = not
    given) moved in, one deprecation line on stderr per flat name used; a name given both ways is refused."""
    groups = {"members": as_group(MembersConfig, members, "members"),
              "loader": as_group(LoaderConfig, loader, "loader")}
    moved: dict[str, dict] = {"members": {}, "loader": {}}
    for name, value in flat.items():
        if value is None:
            continue
        group = FLAT_NAMES[name]
        default = getattr(GROUPS[group](), name)
        if getattr(groups[group], name) != default:
            raise UserError(f"data.{name} (deprecated) and data.{group}.{name} are both set: keep "
                            f"data.{group}.{name}")
        if name not in _warned:
            _warned.add(name)
            print(f"ldm-lightning: data.init_args.{name} is deprecated and will be removed after the next release: "
                  f"use data.init_args.{group}.{name}", file=sys.stderr)
        moved[group][name] = value
    return (dataclasses.replace(groups["members"], **moved["members"]),
            dataclasses.replace(groups["loader"], **moved["loader"]))
