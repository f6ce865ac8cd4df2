"""The YAML configs that ship inside the package, so `-c` works without a repository checkout.

The files live in the repository's top-level `configs/` (what cloners use: `-c configs/trainer/cpu-debug.yaml`);
`ldm_lightning/configs` points there and is installed as package data. A `-c` (or `--config`) value of a
fit / validate / test command is resolved like this:

    -c ldm_lightning:trainer/cpu-debug.yaml   always the shipped file
    -c trainer/cpu-debug.yaml                 a file by that path if there is one, else the shipped one
    -c configs/trainer/cpu-debug.yaml         the same (the path the README uses, from any directory)

A missing name gives one message listing the shipped configs. A renamed config's old name still resolves to
the new file for one release (RENAMED), with a note on stderr naming the new one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PREFIX = "ldm_lightning:"
CONFIG_FLAGS = ("-c", "--config")
RENAMED = {
    # A latent DiT-B/4 with JiT's objective, not JiT (issue 30); the old name goes after the next release.
    "diffusion/jit-dit-b4-class.yaml": "diffusion/dit-b4-xpred-vloss-class.yaml",
}
"""Old shipped-config name -> its new name (deprecated names, kept working for one release)."""


class ConfigNotFound(FileNotFoundError):
    """A `-c` value that is neither a file nor a shipped config."""


def configs_root() -> Path:
    """The shipped configs folder (inside the installed package; the repo's `configs/` when editable)."""
    return Path(__file__).resolve().parent / "configs"


def shipped_names() -> list[str]:
    root = configs_root()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml"))


def shipped_config(name: str) -> Path:
    """The shipped config `name` ('trainer/cpu-debug.yaml'; '.yaml' may be left out; a leading 'configs/' or
    'ldm_lightning:' is ignored). Raises ConfigNotFound naming the shipped configs."""
    rel = name.removeprefix(PREFIX).removeprefix("configs/")
    if not rel.endswith((".yaml", ".yml")):
        rel += ".yaml"
    old = next((o for o in RENAMED if rel == o or rel.endswith("/configs/" + o)), None)
    if old is not None:  # `configs/diffusion/jit-dit-b4-class.yaml` from a checkout or an absolute path
        print(f"ldm-lightning: config {name!r} is deprecated and will be removed after the next release: it is now "
              f"{RENAMED[old]!r} (-c configs/{RENAMED[old]})", file=sys.stderr)
        rel = RENAMED[old]
    path = configs_root() / rel
    if ".." in Path(rel).parts or not path.is_file():
        raise ConfigNotFound(f"config {name!r}: no such file, and no shipped config {rel!r}. Shipped configs (use "
                             f"`-c {PREFIX}NAME` from anywhere): {', '.join(shipped_names())}")
    return path


def resolve_config(value: str) -> str:
    """A `-c` value → the path to read: the file itself when it exists, else the shipped config of that name."""
    if value.startswith(PREFIX):
        return str(shipped_config(value))
    if os.path.exists(value) or value.lstrip().startswith(("{", "[")) or "\n" in value:
        return value  # an existing file, or inline YAML/JSON (jsonargparse accepts both)
    if not value.endswith((".yaml", ".yml")) and "/" not in value:
        return value  # not a config path at all: let the CLI parser report it
    return str(shipped_config(value))


def resolve_argv(argv: list[str]) -> list[str]:
    """`argv` of a fit / validate / test command with each `-c`/`--config` value resolved (resolve_config)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in CONFIG_FLAGS and i + 1 < len(argv):
            out += [a, resolve_config(argv[i + 1])]
            i += 2
            continue
        flag, eq, value = a.partition("=")
        out.append(f"{flag}={resolve_config(value)}" if eq and flag in CONFIG_FLAGS else a)
        i += 1
    return out
