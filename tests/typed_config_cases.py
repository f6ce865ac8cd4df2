"""Run several `ldm-lightning fit` commands about typed configs in this one process (one Lightning import for all)
and print one JSON object {name: {"rc": exit code, "out": stdout, "err": stderr}}. Used by tests/test_typed_configs.py
in a subprocess; argv[1] is a scratch folder (YAML files the cases write, the run folder of the one short fit),
argv[2] a folder of MNIST training shards."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

from ldm_lightning.cli import main
from ldm_lightning.shipped_configs import PREFIX

DIFFUSION = ["-c", PREFIX + "diffusion/mnist-unet-class.yaml", "-c", PREFIX + "trainer/cpu-debug.yaml"]
AUTOENCODER = ["-c", PREFIX + "autoencoder/tiny-mnist.yaml", "-c", PREFIX + "trainer/cpu-debug.yaml"]


def run(argv: list[str]) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # --print_config and --help exit 0 after printing
            rc = e.code or 0
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue()}


def cases(scratch: Path, shards: str) -> dict[str, list[str]]:
    typo = scratch / "schedule_typo.yaml"
    typo.write_text("model:\n  init_args:\n    schedule:\n      kind: vp\n      beta_shedule: linear\n")
    data_typo = scratch / "data_typo.yaml"
    data_typo.write_text("data:\n  init_args:\n    loader:\n      pin_memroy: true\n")
    return {
        "schedule_typo_yaml": ["fit", *DIFFUSION, "-c", str(typo), "--print_config"],
        "backbone_typo_flag": ["fit", *DIFFUSION, "--model.init_args.backbone_config.grad_chekpointing", "true",
                               "--print_config"],
        "autoencoder_typo_flag": ["fit", *AUTOENCODER, "--model.init_args.autoencoder.zchannels", "8",
                                  "--print_config"],
        "schedule_choice": ["fit", *DIFFUSION, "--model.init_args.schedule.beta_schedule", "quadratic",
                            "--print_config"],
        "flow_field_on_vp": ["fit", *DIFFUSION, "--model.init_args.schedule.shift", "3.0",
                             "--model.init_args.autoencoder", str(scratch / "no-such-autoencoder")],
        "typed_fields_resolve": ["fit", *DIFFUSION, "--model.init_args.schedule.num_timesteps", "500",
                                 "--model.init_args.backbone_config.channel_mult", "[1, 2]", "--print_config"],
        "help": ["fit", "--model.help", "ldm_lightning.diffusion.module.DiffusionModule"],
        "data_typo_flag": ["fit", *AUTOENCODER, "--data.init_args.members.captionkey", "caption", "--print_config"],
        "data_group_typo_yaml": ["fit", *AUTOENCODER, "-c", str(data_typo), "--print_config"],
        # one optimizer step through the deprecated flat names (the stage's checkpoint records where they went)
        "deprecated_flat_fit": ["fit", *AUTOENCODER, "--data.init_args.train_shards", shards,
                                "--data.init_args.val_shards", "null", "--data.init_args.num_workers", "0",
                                "--data.init_args.batch_size", "8", "--data.init_args.val_batch_size", "7",
                                "--data.init_args.caption_key", "caption", "--model.init_args.scale_batches", "1",
                                "--trainer.max_steps", "1", "--trainer.logger", "false",
                                "--trainer.default_root_dir", str(scratch / "run")],
    }


if __name__ == "__main__":
    scratch = Path(sys.argv[1])
    print(json.dumps({name: run(argv) for name, argv in cases(scratch, sys.argv[2]).items()}))
