"""One run per folder, Ctrl-C, and progress lines in a log that is not a terminal, through the user path:
`ldm-lightning fit` (the console script) in subprocesses, with the shipped tiny-mnist + cpu-debug configs on
real MNIST shards; stdout is a pipe, as in a Slurm job whose log is a file.

One chain of runs in one folder, so each start-up is paid once:
  A  runs; its pipe shows `[progress]` lines every N=2 steps with step/max, loss, images/s, ETA.
  B  `fit` on A's folder while A lives -> exit 2, one message naming A's pid and host; B writes nothing there.
  A  is SIGKILLed (its main process only): the kernel drops its lock.
  C  `--ckpt_path last` in the same folder starts (the dead holder does not block) and resumes, its progress
     lines set by a config to come every second (not by steps); Ctrl-C (SIGINT to the process group, as a
     terminal sends it) -> saved at the next step boundary, exit 130.
  D  `--ckpt_path last` resumes from exactly the step C saved; two Ctrl-C -> exit 130 at once, nothing written.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
LDM = str(Path(sys.executable).parent / "ldm-lightning")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROGRESS = re.compile(r"^\[progress\] step (\d+)/(\d+) \([0-9.]+%\) \| loss ([-0-9.e+]+|-) \| ([0-9.]+|-) images/s "
                      r"\| elapsed \d+:\d\d:\d\d \| ETA (\d+:\d\d:\d\d|-)$")


class Run:
    """`ldm-lightning fit` in its own process group (so a signal can go to the group, as Ctrl-C does), its
    stdout+stderr a pipe read by a thread."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen([LDM, "fit", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=ROOT, env=env(), start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def progress(self) -> list[tuple[int, int]]:
        return [(int(m[1]), int(m[2])) for m in map(PROGRESS.match, self.lines) if m]

    def wait_for_progress(self, after_step: int = 0, timeout: float = 240) -> int:
        """The step of the first progress line past `after_step`."""
        deadline = time.time() + timeout
        while True:
            steps = [s for s, _ in self.progress() if s > after_step]
            if steps:
                return steps[0]
            if self.proc.poll() is not None or time.time() > deadline:
                self.proc.kill()
                raise AssertionError(f"no progress line past step {after_step} (rc {self.proc.poll()}):\n"
                                     f"{self.log[-3000:]}")
            time.sleep(0.05)

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait(self, timeout: float = 180) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return rc


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_RUN_ID"))}
    e.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    return e


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_one_run_per_folder_ctrl_c_saves_and_progress_lines(tmp_path, mnist_shards):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    ckpt_cfg, timed_cfg, rare_cfg = tmp_path / "ckpt.yaml", tmp_path / "timed-progress.yaml", tmp_path / "rare.yaml"
    step_ckpt = {"class_path": "ldm_lightning.training.checkpointing.StepCheckpoint",
                 "init_args": {"every_n_train_steps": 2, "keep_last_k": 2}}
    ckpt_cfg.write_text(yaml.safe_dump({"trainer": {"callbacks": [step_ckpt]}}))
    # C's lines by time only (no step of this run is a multiple of 1000): a slow run still shows life.
    timed_cfg.write_text(yaml.safe_dump({"trainer": {"callbacks": [step_ckpt, {
        "class_path": "ldm_lightning.training.progress_lines.ProgressLines",
        "init_args": {"every_n_steps": 1000, "every_seconds": 1.0}}]}}))
    # D saves no periodic checkpoint, so any file it writes would be the Ctrl-C path's.
    rare_cfg.write_text(yaml.safe_dump({"trainer": {"callbacks": [{**step_ckpt, "init_args": {
        "every_n_train_steps": 1000, "keep_last_k": 2}}]}}))
    args = ["-c", str(ROOT / "configs/autoencoder/tiny-mnist.yaml"), "-c", str(ROOT / "configs/trainer/cpu-debug.yaml"),
            "-c", str(ckpt_cfg), "--data.init_args.train_shards", mnist_shards["train"],
            "--data.init_args.val_shards", mnist_shards["test"], "--data.init_args.batch_size", "16",
            "--trainer.max_steps", "1000", "--trainer.log_every_n_steps", "2", "--trainer.num_sanity_val_steps", "0",
            "--trainer.default_root_dir", str(out)]

    # B starts as soon as A holds the folder's lock (its start-up then overlaps A's).
    a = Run(args)
    lock = out / ".ldm-lightning.lock"
    while not (lock.exists() and f'"pid": {a.proc.pid},' in lock.read_text()):
        assert a.proc.poll() is None, a.log[-3000:]
        time.sleep(0.05)
    b = subprocess.run([LDM, "fit", *args], capture_output=True, text=True, cwd=ROOT, env=env(), timeout=240)
    assert a.proc.poll() is None, a.log[-3000:]
    assert b.returncode == 2, b.stdout[-2000:] + b.stderr[-2000:]
    assert "Traceback" not in b.stderr and "in use by another run" in b.stderr, b.stderr[-2000:]
    assert f"pid {a.proc.pid} on host " in b.stderr and "--trainer.default_root_dir" in b.stderr, b.stderr
    assert "[progress]" not in b.stdout and "resuming" not in b.stdout

    # A: progress lines in its pipe, every 2 steps, with every field (images/s from the telemetry window).
    a.wait_for_progress(after_step=2)
    lines = [line for line in a.lines if line.startswith("[progress]")]
    assert all(PROGRESS.match(line) for line in lines), lines
    assert all(s % 2 == 0 and m == 1000 for s, m in a.progress()), lines
    first = PROGRESS.match(lines[0])
    assert first[3] != "-" and first[4] != "-" and first[5] != "-", lines[0]
    # B wrote nothing into the folder: one W&B run, one run id.
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1

    # A (its main process, as `kill -9 PID` does) is SIGKILLed after its first checkpoint: the lock goes with it,
    # also while its DataLoader workers are still winding down.
    while not (ckpts / "last.ckpt").exists():
        assert a.proc.poll() is None, a.log[-3000:]
        time.sleep(0.05)
    a.proc.send_signal(signal.SIGKILL)
    a.wait()
    # The newest complete checkpoint (a kill between step=N.ckpt and last.ckpt leaves last.ckpt one save behind).
    killed_at = max([load(ckpts / "last.ckpt")["global_step"]]
                    + [int(p.stem.split("=")[1]) for p in ckpts.glob("step=*.ckpt")])

    # C: resumes in the same folder; Ctrl-C -> saved at the next step boundary, exit 130.
    c = Run([*args, "-c", str(timed_cfg), "--ckpt_path", "last"])
    c.wait_for_progress(after_step=killed_at)  # before step 1000: only the time rule prints
    assert "in use by another run" not in c.log and f"(global step {killed_at})" in c.log, c.log[-3000:]
    c.ctrl_c()
    assert c.wait() == 130, c.log[-3000:]
    saved = re.search(r"SIGINT received: saving at global step (\d+)", c.log)
    assert saved, c.log[-3000:]
    step = int(saved[1])
    assert step > killed_at and load(ckpts / "last.ckpt")["global_step"] == step
    assert (ckpts / f"step={step:08d}.ckpt").exists()
    assert "Traceback" not in c.log, c.log[-3000:]

    # D: `--ckpt_path last` resumes from that step; a second Ctrl-C right after the first stops at once.
    d = Run([*args, "-c", str(rare_cfg), "--ckpt_path", "last"])
    d.wait_for_progress(after_step=step)
    assert f"resuming from {ckpts / 'last.ckpt'} (global step {step})" in d.log, d.log[-3000:]
    before = {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir()}
    d.ctrl_c()
    time.sleep(0.2)  # two presses, not one coalesced signal
    d.ctrl_c()
    assert d.wait() == 130, d.log[-3000:]
    assert "second Ctrl-C" in d.log and "Traceback" not in d.log, d.log[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir()}
    assert not [n for n in after if n.endswith(".tmp")], after
    started = re.search(r"SIGINT received: saving at global step (\d+)", d.log)
    if started is None:  # the usual case: the second press came before the next step boundary
        assert after == before, "a checkpoint was written although the second Ctrl-C came before any save"
    else:  # the boundary fell between the presses: at most that save's two files, no later step, no final save
        changed = {n for n in after if after[n] != before.get(n)}
        assert changed <= {f"step={int(started[1]):08d}.ckpt", "last.ckpt"}, changed
