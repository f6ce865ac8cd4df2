"""The package installs and imports, its CLI answers --help for every subcommand, its layers import downwards."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

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


ROOT = Path(__file__).resolve().parents[1]
RULES = {  # package → packages it must not import (the layout's directions)
    "ldm_lightning.data": ("ldm_lightning.autoencoder", "ldm_lightning.diffusion", "ldm_lightning.training"),
    "ldm_lightning.autoencoder": ("ldm_lightning.diffusion",),
    "ldm_lightning.nn": ("ldm_lightning.autoencoder", "ldm_lightning.diffusion", "ldm_lightning.data"),
    # the measuring instruments sit above the model; REPA's frozen targets come from encoders/ instead
    "ldm_lightning.diffusion": ("ldm_lightning.evaluation",),
}


def _imports(path: Path, module: str) -> set[str]:
    """ldm_lightning modules a source file imports (absolute and relative, anywhere in the file)."""
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            out.add(".".join(base + ([node.module] if node.module else [])))
    return {m for m in out if m.startswith("ldm_lightning")}


def test_layers_import_only_downwards():
    bad = []
    for f in sorted((ROOT / "ldm_lightning").rglob("*.py")):
        mod = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for imp in _imports(f, mod):
            if imp.startswith("ldm_lightning.cli") and mod not in ("ldm_lightning.cli", "ldm_lightning.__main__"):
                bad.append(f"{mod} imports {imp} (nothing imports the CLI)")
            for pkg, banned in RULES.items():
                if mod == pkg or mod.startswith(pkg + "."):
                    bad += [f"{mod} imports {imp}" for b in banned if imp.startswith(b)]
    assert not bad, "\n".join(bad)


def _module_graph() -> dict[str, set[str]]:
    """module -> the ldm_lightning modules it imports (`from pkg import mod` counts as pkg.mod), lazy imports too."""
    files = {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f
             for f in (ROOT / "ldm_lightning").rglob("*.py")}
    graph = {}
    for mod, f in files.items():
        package = mod.split(".")[:-1] if f.name != "__init__.py" else mod.split(".")
        edges = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join((package[:len(package) - node.level + 1] if node.level else []) +
                                ([node.module] if node.module else []))
                for a in node.names:
                    target = f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                    if target in files and target != mod:
                        edges.add(target)
        graph[mod] = edges
    return graph


def test_no_import_cycles():
    """No two modules import each other, directly or around a loop, even through imports inside functions
    (a lazy import hides a cycle from Python, not from a reader)."""
    graph, done, stack, cycles = _module_graph(), set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            return
        if m in done:
            return
        stack.append(m)
        for n in sorted(graph[m]):
            visit(n)
        stack.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    assert not cycles, "\n".join(cycles[:5])
