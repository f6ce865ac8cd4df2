"""Every `ldm-lightning` subcommand's rule for an error in what the user gave (a path, a file, a value): one
paragraph on stderr naming the thing and the fix, exit code 2, no traceback; `--debug` (or LDM_DEBUG=1) shows
the traceback instead. `cli.py` runs each tool's `main` through `run_tool`; `fit` (training/lightning_cli.py)
uses `split_debug` and `user_error_message` for the errors of a running job.

What counts as the user's: `UserError` (our own checks, the checkpoint loaders' refused/unreadable files),
the OS errors of paths and disks (missing, not a folder, a file where a folder goes, no permission, read-only or
full file system), a tool's `SystemExit("message")` (argparse tools' one-line refusals), and a missing optional
extra. Anything else is a failure of the program: its traceback is the report.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Callable

from ldm_lightning.errors import UserError, missing_extra_message

EXIT_USER_ERROR = 2
DEBUG_HINT = "(run with --debug for the traceback)"

# errno of an OSError that the user fixes (their paths, permissions or disk), with the fix to print.
OS_ERROR_FIXES = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "it is a folder: give a file path",
    errno.EEXIST: "a file of that name is in the way: remove it or choose another path",
    errno.EACCES: "choose a location you may write to (or read), or fix its permissions",
    errno.EPERM: "choose a location you may write to (or read), or fix its permissions",
    errno.EROFS: "the file system is read-only: choose an output location on a writable one",
    errno.ENOSPC: "no space left on that device: free some space or choose another location",
    errno.EDQUOT: "the disk quota is exhausted: free some space or choose another location",
    errno.ENAMETOOLONG: "choose a shorter path",
}

# Raised with a message of our own (no errno), e.g. by the loaders: "checkpoint 'x' does not exist; pass ...".
PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def debug_requested() -> bool:
    """Whether this process shows tracebacks of user errors (LDM_DEBUG=1, which `--debug` sets)."""
    return os.environ.get("LDM_DEBUG", "") not in ("", "0")


def split_debug(argv: list[str]) -> tuple[bool, list[str]]:
    """(whether the traceback was asked for, argv without `--debug`): `--debug` or LDM_DEBUG=1. `--debug` sets
    LDM_DEBUG=1 for the rest of the process (a tool's own handler, a subprocess it starts) to see."""
    if "--debug" in argv:
        os.environ["LDM_DEBUG"] = "1"
    return debug_requested(), [a for a in argv if a != "--debug"]


def os_error_message(exc: OSError) -> str:
    """'<path>: <reason>; <fix>' for an OSError from the system; our own OSErrors carry their message as is."""
    if exc.errno is None or not exc.strerror:
        return str(exc)  # e.g. FileNotFoundError("checkpoint 'x' does not exist; pass ...")
    paths = " -> ".join(repr(os.fspath(p)) for p in (exc.filename, exc.filename2) if p is not None)
    fix = OS_ERROR_FIXES.get(exc.errno, "")
    return f"{paths + ': ' if paths else ''}{exc.strerror.lower()}{'; ' + fix if fix else ''}"


def worker_message(exc: BaseException) -> str:
    """The message of `exc`; for one a DataLoader worker raised, torch re-raises it with "Caught ... Original
    Traceback ..." and the worker's traceback in the message: then only the worker's own message."""
    text = str(exc)
    if not text.startswith("Caught ") or "\nOriginal Traceback" not in text:
        return text
    cls = type(exc)
    for name in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__name__}: "):
        if name in text:
            return text[text.rindex(name) + len(name):].strip()
    return text


def user_error_message(exc: BaseException) -> str | None:
    """The one-paragraph message of an error in the user's input, or None for a failure of the program."""
    if isinstance(exc, UserError):
        return worker_message(exc)
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, str) else None
    if isinstance(exc, ModuleNotFoundError):
        return missing_extra_message(exc)
    if isinstance(exc, PATH_ERRORS) or isinstance(exc, OSError) and exc.errno in OS_ERROR_FIXES:
        return os_error_message(exc)
    return None


def print_user_error(prog: str, message: str) -> None:
    """The paragraph, on stderr, as every subcommand prints it."""
    print(f"{prog}: {message}\n{DEBUG_HINT}", file=sys.stderr)


def run_tool(prog: str, main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """`main(argv)`'s exit code, with a user error turned into one paragraph and exit 2 (`--debug`: re-raised)."""
    debug, argv = split_debug(argv)
    try:
        return int(main(argv) or 0)
    except (Exception, SystemExit) as e:
        message = user_error_message(e)
        if message is None:
            raise  # argparse's own exits (SystemExit(0|2)), or a failure of the program
        if debug:
            if not isinstance(e, SystemExit):
                raise
            traceback.print_exc()  # Python prints a SystemExit's message, not its traceback
            print(f"{prog}: {message}", file=sys.stderr)
            return EXIT_USER_ERROR
        print_user_error(prog, message)
        return EXIT_USER_ERROR
