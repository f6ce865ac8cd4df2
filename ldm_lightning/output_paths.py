"""The tools' output paths: checked before the work starts (an hour of sampling must not end in "is a file"),
and an export folder replaced whole, never mixed.

- `prepare_output_dir` / `prepare_output_file`: refuse a file where a folder goes (and the reverse) and a
  location that cannot be written (no permission, read-only file system), naming the option and the fix.
- `replace_dir`: write a folder's new contents into a sibling temp folder, then swap it in with two renames;
  a crash while writing leaves the old folder untouched (the temp folder is removed by the next call).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ldm_lightning.errors import UserError
from ldm_lightning.fileio import fsync_dir


def _reason(err: OSError) -> str:
    return err.strerror.lower() if err.strerror else str(err)


def _check_writable(folder: Path, what: str) -> None:
    # Probe with a real file: os.access says yes to root on a read-only mount and cannot see ACLs or quotas.
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(f"{what}: cannot write into {str(folder)!r} ({_reason(err)}); "
                        "choose a folder you can write to") from err


def prepare_output_dir(path: str | os.PathLike, option: str = "--out", create: bool = False) -> Path:
    """Check that folder `path` can be made and written, a UserError naming `option` if not; creates it (with
    parents) only when `create`, so a command refused later leaves nothing behind."""
    out = Path(os.path.abspath(path))
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {str(path)!r} is a file, not a folder: give a folder path (it is created) "
                        "or move the file away")
    existing = out
    while not existing.exists():  # the folder it will be created in
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {str(path)!r}: {str(existing)!r} in that path is a file, not a folder")
    _check_writable(existing, f"{option} {str(path)!r}")
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def prepare_output_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """Check that file `path` can be written (its folder made); a UserError naming `option` if not."""
    out = Path(path)
    if out.is_dir():
        raise UserError(f"{option} {str(out)!r} is a folder: give a file path")
    prepare_output_dir(out.parent if str(out.parent) else ".", f"{option} {str(out)!r}: its folder")
    return out


def replace_dir(out: str | os.PathLike, write: Callable[[Path], None], allowed: set[str],
                overwrite: bool, option: str = "--out", flag: str = "--overwrite") -> Path:
    """`write(tmp)` fills a new sibling folder of `out`, which then replaces `out` whole.

    `out` may already exist only when it is empty, or when `overwrite` and every name in it is in `allowed`
    (the files this writer makes): a folder holding anything else is never deleted."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {str(out)!r} is a file, not a folder: give a folder path or move the file away")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present and not overwrite:
        raise UserError(f"{option} {str(out)!r} already holds files ({', '.join(present[:4])}): pass {flag} to "
                        f"replace that folder, or choose another {option}")
    foreign = [n for n in present if n not in allowed]
    if foreign:
        raise UserError(f"{option} {str(out)!r} holds files that this command did not write ({', '.join(foreign[:4])}); "
                        f"{flag} replaces only such a folder whole: choose a new or empty folder")
    parent = out.parent
    prepare_output_dir(parent, f"{option} {str(out)!r}: its folder", create=True)
    prefix = f".{out.name}.tmp-"
    for stale in parent.glob(prefix + "*"):  # left by a crash while writing: never a complete folder
        if stale.is_dir() and not _pid_alive(stale.name[len(prefix):]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        for f in tmp.iterdir():  # the contents reach the disk before the folder takes the real name
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.is_dir():
        old = parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    fsync_dir(parent)
    return out


def _pid_alive(text: str) -> bool:
    try:
        os.kill(int(text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's live process
        return True
    return True
