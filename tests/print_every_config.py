"""Run `ldm-lightning fit ... --print_config` for every shipped config, in this one process (one Lightning import
for all of them, instead of ~10 s per config), and print one JSON object: {command: error or null}.

Pairs: every stage config (autoencoder/, diffusion/) with the CPU trainer; every trainer config under the tiny
MNIST autoencoder with `--trainer.accelerator cpu`; every data config under a stage of its kind (latent shards:
a diffusion config; images: an autoencoder config). Used by tests/test_shipped_configs.py in a subprocess.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

import yaml

from ldm_lightning.cli import main
from ldm_lightning.shipped_configs import PREFIX, shipped_config, shipped_names

CPU_TRAINER = "trainer/cpu-debug.yaml"
AUTOENCODER = "autoencoder/tiny-mnist.yaml"
DIFFUSION = "diffusion/mnist-unet-class.yaml"


def commands() -> list[list[str]]:
    cmds = []
    for name in shipped_names():
        group = name.split("/", 1)[0]
        if group in ("autoencoder", "diffusion"):
            cmds.append(["-c", PREFIX + name, "-c", PREFIX + CPU_TRAINER])
        elif group == "trainer":
            cmds.append(["-c", PREFIX + AUTOENCODER, "-c", PREFIX + name, "--trainer.accelerator", "cpu"])
        elif group == "data":
            data = yaml.safe_load(shipped_config(name).read_text())["data"]
            stage = DIFFUSION if data.get("init_args", {}).get("kind") == "latent" else AUTOENCODER
            cmds.append(["-c", PREFIX + stage, "-c", PREFIX + CPU_TRAINER, "-c", PREFIX + name])
        else:
            raise AssertionError(f"shipped config {name} is in no known group: add its pairing here")
    return cmds


def check(args: list[str]) -> str | None:
    """None when the command printed a resolved config that keeps every shipped file's class paths."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(["fit", *args, "--print_config"])
        except SystemExit as e:  # --print_config exits 0 after printing
            rc = e.code or 0
    if rc != 0:
        return f"exit {rc}: {err.getvalue().strip()[-1500:]}"
    resolved = yaml.safe_load(out.getvalue())
    expected = {}  # the class path the last file that names one gives
    for flag, value in zip(args, args[1:]):
        if flag == "-c":
            given = yaml.safe_load(shipped_config(value).read_text())
            expected.update({key: given[key]["class_path"] for key in ("model", "data") if key in given})
    for key, class_path in expected.items():
        if resolved[key]["class_path"] != class_path:
            return f"{key}.class_path {class_path!r} resolved to {resolved[key]['class_path']!r}"
    return None


if __name__ == "__main__":
    print(json.dumps({" ".join(a): check(a) for a in commands()}))
