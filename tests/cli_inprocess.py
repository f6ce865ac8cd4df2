"""`run(*args, expect=0)`: `ldm-lightning ARGS` through `ldm_lightning.cli.main` in the calling process, asserting
its exit code and returning its stderr. For the user-path scripts that tests start in ONE subprocess to chain
several commands (import -> fit -> sample -> export) without paying the torch/Lightning import per command."""

from __future__ import annotations

import contextlib
import io

from ldm_lightning.cli import main


def run(*args: str, expect: int = 0) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(list(args)) or 0
        except SystemExit as e:
            rc = e.code or 0
    assert rc == expect, (args, rc, err.getvalue()[-3000:])
    return err.getvalue()
