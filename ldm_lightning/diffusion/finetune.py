"""Starting a DiffusionModule from pretrained weights (`model.init_args.init_from`): read, check, load.

The weights come through `load.read_pretrained` (any layout it understands). What they were made for must
agree with the run's config, each disagreement one message naming the field and the value to set: the
backbone family and every DiTConfig field that shapes a tensor or the function (grad_checkpointing aside),
the noise schedule and the prediction type. Loading is strict: a tensor of another shape is named.
"""

from __future__ import annotations

import dataclasses

import torch

from ldm_lightning.errors import UserError

from .interop import Pretrained
from .load import read_pretrained
from .presets import backbone_config
from .schedules import build_schedule

# Fields of a backbone config that change neither a tensor nor the function: free to differ from init_from's.
FREE_FIELDS = ("grad_checkpointing",)
# Fields that shape no tensor but change the function: a run takes them from init_from unless its config sets them
# (the diffusers DiT port's numerics; an SD UNet's head counts, timestep features, attention upcast, norm eps).
INHERITED_FIELDS = ("timestep_freq_shift", "mlp_norm_eps", "attention_head_dim", "upcast_attention", "flip_sin_to_cos",
                    "freq_shift", "norm_eps")
SCHEDULE_FIELDS = ("kind", "beta_schedule", "num_timesteps", "zero_terminal_snr")


class InitFromError(UserError, ValueError):
    """init_from holds weights made for another architecture, schedule or prediction than the config's."""


def read_init_from(path, family: str, cfg: dict) -> Pretrained:
    """The pretrained weights at `path` for a backbone of `family` configured by `cfg` (preset + overrides)."""
    pre = read_pretrained(path, num_heads=cfg.get("num_heads"))
    if pre.backbone_family != family:
        raise InitFromError(f"model.init_from={str(path)!r} holds a {pre.backbone_family} backbone; model.backbone "
                            f"is a {family}: pick a {pre.backbone_family} preset")
    return pre


def check_architecture(built: dict, pre: Pretrained, path) -> None:
    theirs = backbone_config(pre.backbone_family, pre.backbone)  # defaults filled for older metadata
    for f in dataclasses.fields(theirs):
        if f.name in FREE_FIELDS:
            continue
        mine, want = built.get(f.name), getattr(theirs, f.name)
        if isinstance(mine, (list, tuple)) or isinstance(want, (list, tuple)):
            mine, want = list(mine or []), list(want or [])
        if mine != want:
            raise InitFromError(f"model.init_from={str(path)!r} was made with {f.name}={want!r}; this model has "
                                f"{f.name}={mine!r}: set model.init_args.backbone_config.{f.name}: {want!r} (or the "
                                "conditioning / autoencoder that implies it)")


def load_pretrained(denoiser, pre: Pretrained, schedule: dict, prediction: str, path) -> None:
    """Check `pre` against the run's backbone / schedule / prediction, then load it into `denoiser` in place."""
    check_architecture(dataclasses.asdict(denoiser.backbone.cfg), pre, path)
    if pre.prediction is not None and pre.prediction != prediction:
        raise InitFromError(f"model.init_from={str(path)!r} predicts {pre.prediction!r} ({pre.layout}); the config "
                            f"trains model.objective.prediction={prediction!r}: set "
                            f"model.init_args.objective.prediction: {pre.prediction}")
    if pre.schedule is not None:  # compared with defaults filled in on both sides
        mine, theirs = build_schedule(**schedule), build_schedule(**pre.schedule)
        for k in SCHEDULE_FIELDS:
            if getattr(mine, k, None) != getattr(theirs, k, None):
                raise InitFromError(f"model.init_from={str(path)!r} was trained with schedule.{k}="
                                    f"{getattr(theirs, k, None)!r}; the config has {getattr(mine, k, None)!r}: set "
                                    f"model.init_args.schedule.{k}: {getattr(theirs, k, None)}")
    own = denoiser.state_dict()
    for k, v in pre.state.items():
        if k not in own:
            raise InitFromError(f"model.init_from={str(path)!r}: tensor {k!r} has no place in this model")
        if tuple(v.shape) != tuple(own[k].shape):
            raise InitFromError(f"model.init_from={str(path)!r}: tensor {k!r} has shape {tuple(v.shape)}, this model's "
                                f"{tuple(own[k].shape)}")
    missing = [k for k in own if k not in pre.state and k.startswith("backbone.")]
    if missing:
        raise InitFromError(f"model.init_from={str(path)!r} lacks {len(missing)} tensor(s) of this model, first "
                            f"{missing[0]!r}")
    with torch.no_grad():
        denoiser.load_state_dict({k: v.to(own[k].dtype) for k, v in pre.state.items()}, strict=False)
