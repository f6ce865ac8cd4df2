"""The package works once installed (not only editable): a wheel built from the sources, installed into
a fresh venv, run from a directory outside the repository, finds its shipped configs.

Nothing is downloaded: the wheel is built with --no-deps --no-build-isolation, and the fresh venv
reuses the test venv's dependencies through a path entry (a venv's --system-site-packages would see
the base interpreter's packages, not this venv's). That path entry does not run the test venv's .pth
files, so its editable install cannot shadow the installed copy; the test checks `ldm_lightning.__file__`.

`ldm-lightning demo --fast` runs from this installed copy, outside the repository, in test_demo.py (the
`installed_package` fixture of conftest.py builds it once per session); here the installed demo module builds its trainer config and its autoencoder fit config from the shipped files (what failed
with FileNotFoundError after `pip install .`), and `fit --print_config` resolves them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, timeout: int = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(installed_package):
    return installed_package


def test_installed_package_ships_its_configs(installed):
    venv, env, work = installed
    r = _run([str(venv / "bin" / "python"), "-c", "import ldm_lightning; print(ldm_lightning.__file__)"], work,
             env=env)
    assert r.stdout.strip().startswith(str(venv)), r.stdout  # the installed copy, not the editable one
    cfg = [venv / "bin" / "ldm-lightning", "fit", "-c", "ldm_lightning:autoencoder/tiny-mnist.yaml",
           "-c", "ldm_lightning:trainer/cpu-debug.yaml", "--trainer.max_steps", "3", "--print_config"]
    r = _run([str(c) for c in cfg], work, env=env)
    assert "TinyMNIST" in r.stdout or "class_path" in r.stdout
    assert "max_steps: 3" in r.stdout
    # the README's `configs/...` form also finds the shipped file with no checkout in sight
    r = _run([str(venv / "bin" / "python"), "-c", "from ldm_lightning.shipped_configs import resolve_argv; "
              "print(resolve_argv(['fit', '-c', 'configs/autoencoder/tiny-mnist.yaml'])[2])"], work, env=env)
    assert r.stdout.strip().startswith(str(venv)) and Path(r.stdout.strip()).is_file()
    bad = subprocess.run([str(venv / "bin" / "ldm-lightning"), "fit", "-c", "ldm_lightning:trainer/nope.yaml"],
                         cwd=work, capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "trainer/cpu-debug.yaml" in bad.stderr and "Traceback" not in bad.stderr
    # the demo's config lookup (the part that failed after `pip install .`)
    code = ("from pathlib import Path; from ldm_lightning import demo; "
            "p = demo.write_trainer_config(Path('out'), 'cpu', 5, 'autoencoder'); "
            "print(p.read_text()); print(demo.shipped_config('autoencoder/tiny-mnist.yaml'))")
    r = _run([str(venv / "bin" / "python"), "-c", code], work, env=env)
    assert "max_steps: 5" in r.stdout and str(venv) in r.stdout
