"""Typed configs (issue 26 item 7): `model.schedule`, `model.backbone_config`, the autoencoder module's
`model.autoencoder` and the DataModule's `members` / `loader` groups are dataclasses, so `fit --model.help` lists
their fields and a misspelt field or a value outside a field's choices is refused with one message naming it; the
DataModule's old flat names still work, with one deprecation line each; `check_choices` is the one check of
`Literal` fields in the config dataclasses; `init_hparams` records every module argument. The CLI cases run in
one subprocess (tests/typed_config_cases.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from ldm_lightning.choices import ChoiceError, check_choices
from ldm_lightning.errors import UserError

HERE = Path(__file__).resolve().parent


def test_typed_config_fields_through_the_cli(mnist_shards, tmp_path):
    import torch

    proc = subprocess.run([sys.executable, str(HERE / "typed_config_cases.py"), str(tmp_path), mnist_shards["train"]],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, words in {"schedule_typo_yaml": ["schedule", "beta_shedule"],
                        "backbone_typo_flag": ["backbone_config.grad_chekpointing"],
                        "autoencoder_typo_flag": ["autoencoder.zchannels"],
                        "schedule_choice": ["model.init_args.schedule.beta_schedule must be one of 'linear', "
                                            "'scaled_linear', 'cosine' or null; got 'quadratic'"],
                        "flow_field_on_vp": ["schedule.kind='vp' has no field(s) ['shift']", "kind: flow"],
                        "data_typo_flag": ["members.captionkey"],
                        "data_group_typo_yaml": ["loader", "pin_memroy"]}.items():
        case = r[name]
        assert case["rc"] == 2 and "Traceback" not in case["err"], (name, case["err"][-2000:])
        assert len(case["err"].strip().splitlines()) == 2, (name, case["err"])  # the message + the --debug hint
        for w in words:
            assert w in case["err"], (name, w, case["err"])
    resolved = r["typed_fields_resolve"]
    assert resolved["rc"] == 0, resolved["err"][-2000:]
    assert "num_timesteps: 500" in resolved["out"] and "channel_mult:\n      - 1\n      - 2" in resolved["out"]
    help_text = " ".join(r["help"]["out"].split())
    for field in ("--model.schedule.kind {vp,flow}", "--model.schedule.beta_schedule", "--model.schedule.shift",
                  "--model.schedule.sample_shift", "--model.backbone_config.grad_checkpointing",
                  "--model.backbone_config.decoder_depth"):
        assert field in help_text, field
    assert "(flow) Timestep shift s" in help_text  # the field docstrings come along

    fit = r["deprecated_flat_fit"]
    assert fit["rc"] == 0, fit["err"][-3000:]
    lines = [ln for ln in fit["err"].splitlines() if ln.startswith("ldm-lightning:") and "deprecated" in ln]
    assert lines == ["ldm-lightning: data.init_args.caption_key is deprecated and will be removed after the next "
                     "release: use data.init_args.members.caption_key",
                     "ldm-lightning: data.init_args.val_batch_size is deprecated and will be removed after the next "
                     "release: use data.init_args.loader.val_batch_size"], lines
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)  # plain hparams only
    data = ckpt["datamodule_hyper_parameters"]
    assert data["loader"]["val_batch_size"] == 7 and data["members"]["caption_key"] == "caption"
    assert "val_batch_size" not in data and ckpt["hyper_parameters"]["preset"] is None


@dataclass
class _Choices:
    mode: Literal["a", "b"] = "a"
    optional_mode: Literal["x"] | None = None
    free: str = "anything"

    def __post_init__(self):
        check_choices(self, "thing")


def test_check_choices_names_field_value_and_choices():
    _Choices(mode="b", optional_mode="x", free="z")
    with pytest.raises(ChoiceError) as e:
        _Choices(mode="c")
    assert str(e.value) == "thing.mode must be one of 'a', 'b'; got 'c'"
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)
    with pytest.raises(ChoiceError, match=r"thing\.optional_mode must be one of 'x', None; got 'y'"):
        _Choices(optional_mode="y")


def test_init_hparams_records_every_argument_as_plain_values():
    from ldm_lightning.hparams import init_hparams

    def init(self, path: str, choices: _Choices | None = None, size: int | None = None, flag: bool = True):
        return init_hparams(init, dict(locals()), {"path": "/abs/" + path}, omit_none=("size",))

    hp = init(None, "p", _Choices(mode="b"))
    assert hp == {"path": "/abs/p", "choices": {"mode": "b", "optional_mode": None, "free": "anything"},
                  "flag": True}
    with pytest.raises(KeyError, match="no argument"):
        init_hparams(init, {}, {"not_an_argument": 1})
