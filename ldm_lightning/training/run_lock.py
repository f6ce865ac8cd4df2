"""One `fit` per run folder: an advisory lock on `<default_root_dir>/.ldm-lightning.lock`.

Two processes training into one folder interleave their step checkpoints and W&B runs. The first `fit` takes
an exclusive `flock` on the lock file and writes who it is into it (host, pid, start time, command, Slurm job);
a second `fit` on the same folder cannot take it and stops with one message naming the holder (exit 2) before
it writes anything into the folder.

Why `flock` and not a pid file: the kernel releases the lock when the holder's file descriptor closes, also when
the holder is SIGKILLed or its node is lost, so a dead run never blocks its own resume and nothing has to
guess whether a recorded pid is still alive (on another node it could not even be checked).

Shared file systems: on NFSv4 the Linux client implements `flock` with byte-range locks held by the server, so
the lock works across nodes. Lustre does so only when mounted with `-o flock` (with `-o localflock` it is
node-local; without either option `flock` fails). Where the file system cannot lock, the run goes on with a
warning instead of refusing to train.

Only one process per run takes it: global rank 0, decided from the launcher's environment before any class is
built (the W&B logger writes its run id when it is constructed), see `is_launch_rank_zero`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from datetime import datetime, timezone

from ldm_lightning.errors import UserError

LOCK_NAME = ".ldm-lightning.lock"
# A requeued Slurm job (same job id) may start while its previous incarnation is still being torn down on
# another node: wait this long for that holder before refusing.
SAME_JOB_WAIT_S = 60.0

# Rank variables of the launchers Lightning supports: its own subprocess launcher (LOCAL_RANK, NODE_RANK),
# torchrun (RANK, GROUP_RANK), Slurm (SLURM_PROCID), MPI (PMI_RANK, OMPI_COMM_WORLD_RANK).
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "PMI_RANK",
                   "OMPI_COMM_WORLD_RANK")


# Lock descriptors held by this process. A forked child (a DataLoader worker) shares the open file and with it
# the lock: were the parent SIGKILLed, the lock would live on until the last worker noticed and exited. Each
# child closes its copies right after the fork (closing, unlike LOCK_UN, leaves the parent's lock alone).
_held_fds: set[int] = set()


def _close_in_child() -> None:
    for fd in _held_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunFolderBusy(UserError):
    """Another live process holds the run folder's lock."""


def is_launch_rank_zero(env: dict | None = None) -> bool:
    """True in the process that will be global rank 0: every rank variable the launcher set is 0.

    Under Lightning's subprocess launcher the first process has none set and the processes it starts have
    LOCAL_RANK >= 1; under torchrun, srun or mpirun every process has its global rank in the environment.
    """
    env = os.environ if env is None else env
    for name in _RANK_VARIABLES:
        value = env.get(name, "").strip()
        if value and value != "0":
            return False
    return True


def _slurm_job() -> str | None:
    array_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_id and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array_id}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def describe_holder(info: dict) -> str:
    """'pid 123 on host n1, started 2026-01-01 10:00:00 UTC (Slurm job 42): `ldm-lightning fit ...`'."""
    if not info:
        return "a process that has not written its details yet"
    text = f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"
    if info.get("slurm_job"):
        text += f" (Slurm job {info['slurm_job']})"
    if info.get("command"):
        text += f": `{info['command']}`"
    return text


class RunLock:
    """The exclusive lock of one run folder, held from `acquire` to `release` (or the end of the process)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def read_holder(self) -> dict:
        """What the holder wrote into the lock file ({} when unreadable or not written yet)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.loads(f.read() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> bool:
        """Take the lock or raise RunFolderBusy naming the holder. False: the file system cannot lock (warned)."""
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    print(f"[ldm-lightning] WARNING: cannot lock {self.path} ({e.strerror}): this file system does "
                          "not support flock (Lustre needs the `flock` mount option), so a second `fit` on this "
                          "folder would not be stopped", file=sys.stderr, flush=True)
                    return False
                holder = self.read_holder()
                ours = _slurm_job()
                if ours and holder.get("slurm_job") == ours and holder.get("pid") != os.getpid():
                    # A requeue of this same job: the previous incarnation is on its way out.
                    deadline = deadline or time.monotonic() + SAME_JOB_WAIT_S
                    if time.monotonic() < deadline:
                        time.sleep(1.0)
                        continue
                os.close(fd)
                raise RunFolderBusy(
                    f"{self.folder} is in use by another run: {describe_holder(holder)}. Two runs in one folder "
                    "would write into the same checkpoints. Wait for it to end or stop it, or give this run "
                    f"another --trainer.default_root_dir. (The lock {self.path} is released when that process "
                    "ends, also when it is killed.)") from None
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                "command": shlex.join(["ldm-lightning", *sys.argv[1:]])[:500], "slurm_job": _slurm_job()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        _held_fds.add(fd)
        return True

    def release(self) -> None:
        """Unlock (the file stays: removing it could let a waiting process lock a file nobody else sees)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _held_fds.discard(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
