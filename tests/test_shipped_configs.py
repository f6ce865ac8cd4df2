"""Every shipped config parses through the real CLI (litgpt's `test_config_hub` style): `ldm-lightning fit -c
<config> ... --print_config` for each file `shipped_names()` lists, so a config added to `configs/` is covered
without touching this test. One subprocess runs them all (tests/print_every_config.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ldm_lightning.shipped_configs import shipped_names

HERE = Path(__file__).resolve().parent


def test_every_shipped_config_parses_through_the_cli(tmp_path):
    proc = subprocess.run([sys.executable, str(HERE / "print_every_config.py")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600, env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(shipped_names()) >= 25
    failed = {cmd: err for cmd, err in results.items() if err is not None}
    assert not failed, "\n\n".join(f"ldm-lightning fit {cmd} --print_config\n  -> {err}" for cmd, err in failed.items())


def test_one_spelling_of_each_class_path():
    """A class is named the same way in every shipped config (`ldm_lightning.data.ShardDataModule`, not also
    `ldm_lightning.data.datamodule.ShardDataModule`), so a search or a sed over configs finds them all."""
    import re

    from ldm_lightning.shipped_configs import shipped_config
    spellings: dict[str, set[str]] = {}
    for name in shipped_names():
        for path in re.findall(r"class_path:\s*([\w.]+)", shipped_config(name).read_text()):
            spellings.setdefault(path.rsplit(".", 1)[1], set()).add(path)
    assert {cls: paths for cls, paths in spellings.items() if len(paths) > 1} == {}
