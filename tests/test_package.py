"""The package installs, imports, and its CLI answers --help for every subcommand."""
import importlib
import subprocess
import sys

import pytest

from ldm_lightning import cli

MODULES = [
    "ldm_lightning.nn.ema", "ldm_lightning.training.base",
]


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)


def test_cli_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "ldm_lightning", "--help"], capture_output=True, text=True, check=True).stdout
    for words in cli.TOOLS:
        assert " ".join(words) in out
    for sub in cli.LIGHTNING_SUBCOMMANDS:
        assert sub in out


def test_cli_unknown_command_fails_clearly():
    r = subprocess.run([sys.executable, "-m", "ldm_lightning", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr
