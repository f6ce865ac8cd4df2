"""Goodput on the dashboard through the user path: `ldm-lightning fit` (shipped configs, offline W&B) stopped by
SIGTERM, then resumed with `--ckpt_path last`, in subprocesses; the W&B run files are read back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from wandb_reader import find_runs, read_run

ROOT = Path(__file__).resolve().parents[1]
LDM = str(Path(sys.executable).parent / "ldm-lightning")
BUCKETS = ("train", "data_wait", "checkpoint", "restart", "other")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_stop_and_resume_account_for_the_whole_wall_time(tmp_path, mnist_shards):
    ckpt_cfg = tmp_path / "ckpt.yaml"
    ckpt_cfg.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "ldm_lightning.training.checkpointing.StepCheckpoint",
         "init_args": {"every_n_train_steps": 4, "keep_last_k": 2}}]}}))
    out = tmp_path / "run"
    args = [LDM, "fit", "-c", str(ROOT / "configs/autoencoder/tiny-mnist.yaml"),
            "-c", str(ROOT / "configs/trainer/cpu-debug.yaml"), "-c", str(ckpt_cfg),
            "--data.init_args.train_shards", mnist_shards["train"], "--data.init_args.val_shards", mnist_shards["test"],
            "--data.init_args.batch_size", "16", "--trainer.log_every_n_steps", "2",
            "--trainer.default_root_dir", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_RUN_ID"))}
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1")

    first_launch = time.time()
    proc = subprocess.Popen([*args, "--trainer.max_steps", "1000"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, env=env)
    first_ckpt = out / "checkpoints" / "step=00000004.ckpt"
    deadline = time.time() + 300
    while not first_ckpt.exists():
        assert proc.poll() is None and time.time() < deadline, f"no first checkpoint: {proc.communicate()[0][-3000:]}"
        time.sleep(0.05)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=180)
    assert proc.returncode == 143, log[-3000:]
    stopped = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    g = stopped["goodput"]
    # The signal's time is recorded in the checkpoint (the handler stamps it; the step in progress finishes first).
    assert g["stop_signal"] == "SIGTERM" and sent <= g["stop_time"] <= sent + 10, (sent, g)
    assert g["requeues"] == 0 and g["totals"]["train"] > 0 and g["totals"]["checkpoint"] > 0

    time.sleep(1.0)  # the job is "away": this is restart time too
    resumed_launch = time.time()
    r = subprocess.run([*args, "--trainer.max_steps", str(stopped["global_step"] + 4), "--ckpt_path", "last"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=400)
    resumed_end = time.time()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    runs = find_runs(str(out))
    assert len(runs) == 2  # one offline folder per job, both of the same pinned W&B run
    first, last = ([row for row in read_run(d).history if "goodput/wall_s" in row] for d in runs)
    assert first and last
    m = {k.split("/", 1)[1]: v for k, v in last[-1].items() if k.startswith("goodput/")}
    assert m["requeues"] == 1 and m["restarts"] == 1
    # restart: from the signal to the resumed job's first step, which is after its launch and before its end
    assert resumed_launch - sent <= m["restart_s"] <= resumed_end - sent, (m, resumed_launch - sent)
    assert m["last_restart_s"] == m["restart_s"]
    # every instant in exactly one bucket: the fractions sum to 1 and none is negative ("other" is the rest, so a
    # double count would show as a negative "other")
    assert sum(m[f"{b}_frac"] for b in BUCKETS) == pytest.approx(1.0, abs=1e-9)
    assert all(m[f"{b}_s"] >= 0 for b in BUCKETS), m
    assert resumed_launch - first_launch <= m["wall_s"] <= resumed_end - first_launch + 5, m
    assert m["train_s"] > g["totals"]["train"] and m["checkpoint_s"] > g["totals"]["checkpoint"]
    assert m["data_wait_s"] > 0


def test_signal_during_a_checkpoint_takes_only_the_waiting_after_it_out_of_data_wait(monkeypatch):
    """A stop signal that arrives while a checkpoint is still being written (the file already renamed into place):
    the gap after the signal is mostly that write, which never counted as data wait, so the preemption save must
    not take it out of data wait either (the CI run that found this logged data_wait_s = -0.056)."""
    from types import SimpleNamespace

    from ldm_lightning.training import goodput as goodput_module
    from ldm_lightning.training.goodput import GoodputCallback
    from ldm_lightning.training.preemption import PreemptionCallback

    clock = {"now": 0.0}
    monkeypatch.setattr(goodput_module.time, "time", lambda: clock["now"])
    preemption = PreemptionCallback.__new__(PreemptionCallback)
    preemption.received, preemption.received_at = None, None
    saves = []
    trainer = SimpleNamespace(callbacks=[preemption], global_step=0, log_every_n_steps=1000, is_global_zero=True,
                              loggers=[], sanity_checking=False)

    def write(path):  # the original save: takes two seconds
        saves.append(path)
        clock["now"] += 2.0
    trainer.save_checkpoint = write
    module = SimpleNamespace(device=torch.device("cpu"))
    cb = GoodputCallback()
    cb.setup(trainer, module, "fit")
    cb.on_train_start(trainer, module)

    def step(start, end):
        clock["now"] = start
        cb.on_train_batch_start(trainer, module, None, 0)
        clock["now"] = end
        cb.on_train_batch_end(trainer, module, None, None, 0)

    step(0.0, 1.0)
    step(1.2, 2.0)                       # 0.2 s of data wait
    trainer.save_checkpoint("step=4")    # the step checkpoint: 2.0 .. 4.0, through the goodput timer
    assert saves == ["step=4"] and cb.totals["checkpoint"] == pytest.approx(2.0)
    preemption.received, preemption.received_at = signal.SIGTERM, 2.5  # during the write
    step(4.1, 5.0)                       # 0.1 s of data wait, all after the signal
    checkpoint = {}
    cb.on_save_checkpoint(trainer, module, checkpoint)
    totals = checkpoint["goodput"]["totals"]
    # the waiting after the signal (0.1 s) leaves; the 0.2 s before it stays
    assert totals["data_wait"] == pytest.approx(0.2), totals
    # the step after the signal (4.1 .. 5.0) is restart time, not training
    assert totals["train"] == pytest.approx(1.0 + 0.8), totals
