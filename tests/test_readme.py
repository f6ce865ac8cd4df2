"""The README's and the docs/ pages' commands stay true: every `ldm-lightning fit` line composes and validates
(`--print_config`, which parses every config and override without running anything), and every option a tool
line uses is one that tool's `--help` lists. Every docs/ page is linked from the README, and every relative
link in them points at a file that exists."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def readme_commands() -> list[list[str]]:
    """`ldm-lightning ...` lines of the README's and docs/ pages' bash blocks, continuation lines joined,
    comments dropped."""
    text = "\n".join(p.read_text() for p in DOCS)
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("ldm-lightning "):
                cmds.append(shlex.split(line)[1:])
    return cmds


COMMANDS = readme_commands()


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ldm_lightning", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                      "HOME": str(Path.home()), "WANDB_MODE": "offline"})


def test_the_readme_has_commands_for_both_stages_and_the_tools():
    subcommands = {" ".join(c[:2]) if c[0] == "data" else c[0] for c in COMMANDS}
    assert {"fit", "data pack", "data encode", "export", "sample"} <= subcommands, subcommands


@pytest.mark.parametrize("args", [c for c in COMMANDS if c[0] == "fit"], ids=lambda c: c[2].split("/")[-1])
def test_readme_fit_commands_compose_and_validate(args):
    proc = _run([*args, "--print_config"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "class_path: ldm_lightning." in proc.stdout


@pytest.mark.parametrize("args", [c for c in COMMANDS if c[0] != "fit"], ids=lambda c: " ".join(c[:2]))
def test_readme_tool_options_exist(args):
    n = 2 if args[0] == "data" else 1
    proc = _run([*args[:n], "--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    for opt in (a.split("=", 1)[0] for a in args[n:] if a.startswith("--")):
        assert opt in proc.stdout, f"README uses `{opt}` with `ldm-lightning {' '.join(args[:n])}`; --help has no such option"


def test_docs_pages_are_linked_and_their_links_resolve():
    readme = (ROOT / "README.md").read_text()
    for page in DOCS[1:]:
        assert f"](docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"
    broken = []
    for page in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not re.match(r"[a-z]+://", target) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
