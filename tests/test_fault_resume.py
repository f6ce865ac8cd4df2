"""Exact resume after SIGKILL, corrupt-checkpoint fallback on a real run, and the non-finite-step guard.

Every run is `tests/slurm/tiny_train.py` in a subprocess (the same script the Slurm tests submit): a
`TrainingModule` (AdamW + warmup + cosine, EMA, dropout on the global RNG, step-generator noise) on a
synthetic dataset with a per-epoch permutation whose mid-epoch position is in the checkpoint.
48 samples / batch 4 = 12 batches per epoch; 20 steps = 1 epoch and 2/3 of the next.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "slurm" / "tiny_train.py"
STEPS = 20


def run(out, *args, check=True, timeout=240):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--max_steps", str(STEPS), *args],
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if check and r.returncode != 0:
        raise AssertionError(f"tiny_train exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def final(out) -> dict[str, torch.Tensor]:
    return torch.load(Path(out) / "final.pt", weights_only=True)


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"tensors differ after resume: {diff}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run(out)
    return final(out)


@pytest.mark.parametrize("kill_at", [7, 14], ids=["mid-epoch-1", "mid-epoch-2"])
def test_sigkill_then_resume_is_bitwise_exact(tmp_path, reference, kill_at):
    # Checkpoints every 4 steps: the kill at 7 loses steps 5-7 (resume from step 4, mid-epoch 0);
    # the kill at 14 resumes from step 12 = the end of epoch 0 (the RNG-restore edge case).
    r = run(tmp_path, "--kill_self_at", str(kill_at), check=False)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not (tmp_path / "final.pt").exists()
    run(tmp_path, "--ckpt_path", "last")
    assert_bitwise_equal(reference, final(tmp_path))
    # The EMA is part of the compared state dict; check it is really there and not the live weights.
    assert any(k.startswith("ema.module.") for k in reference)
    assert not torch.equal(reference["ema.module.0.weight"], reference["net.0.weight"])


def test_external_sigkill_at_arbitrary_point_then_resume(tmp_path, reference):
    """Killed by the parent (not at a step boundary of its own choosing), possibly mid-save."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    p = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--max_steps", str(STEPS),
                          "--every", "3", "--step_sleep", "0.15"], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "progress.txt"
    deadline = time.time() + 180
    try:
        while time.time() < deadline:
            if progress.exists() and len(progress.read_text().splitlines()) >= 9:
                break
            assert p.poll() is None, "training ended before it could be killed"
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    assert not (tmp_path / "final.pt").exists()
    run(tmp_path, "--ckpt_path", "last", "--every", "3")
    # `--every` only decides when checkpoints are written; the trajectory is the same.
    assert_bitwise_equal(reference, final(tmp_path))


def test_truncated_last_ckpt_falls_back_and_stays_exact(tmp_path, reference):
    run(tmp_path, "--kill_self_at", "14", check=False)
    last = tmp_path / "checkpoints" / "last.ckpt"
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) // 2)
    r = run(tmp_path, "--ckpt_path", "last")
    assert "skipping unusable checkpoint" in r.stdout and "last.ckpt" in r.stdout
    assert "step=00000012.ckpt" in r.stdout  # the file used is named
    assert_bitwise_equal(reference, final(tmp_path))


def test_missing_explicit_checkpoint_is_a_clear_error(tmp_path):
    r = run(tmp_path, "--ckpt_path", str(tmp_path / "nope.ckpt"), check=False)
    assert r.returncode != 0
    assert "nope.ckpt does not exist" in r.stderr


def test_nan_loss_step_is_skipped_and_counted(tmp_path):
    """A single NaN batch: no update, no EMA update, counted; the run still reaches max_steps."""
    r = run(tmp_path, "--nan_at", "5")
    info = json.loads((tmp_path / "result.jsonl").read_text().splitlines()[-1])
    assert info["global_step"] == STEPS and info["skipped"] == 1
    assert "non-finite loss at global step 5" in r.stdout and "mse=nan" in r.stdout
    assert int(final(tmp_path)["nonfinite_skipped"]) == 1


def test_nan_skip_leaves_weights_and_ema_untouched():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import lightning as L
        from tiny_train import TinyDataModule, TinyModule
    finally:
        sys.path.pop(0)

    snapshots = {}

    class Snap(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = {k: v.clone() for k, v in pl_module.state_dict().items()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots[trainer.fit_loop.epoch_loop.total_batch_idx] = (
                self.before, {k: v.clone() for k, v in pl_module.state_dict().items()})

    L.seed_everything(0, verbose=False)
    model = TinyModule(nan_at=(3,))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=6, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[Snap()])
    trainer.fit(model, datamodule=TinyDataModule())
    before, after = snapshots[3]
    changed = [k for k in before if k != "nonfinite_skipped" and k != "nonfinite_consecutive"
               and not torch.equal(before[k], after[k])]
    assert changed == [], f"a skipped step changed {changed}"
    assert int(after["nonfinite_skipped"]) == 1
    b2, a2 = snapshots[4]  # the next good batch does update the weights and the EMA
    assert not torch.equal(b2["net.0.weight"], a2["net.0.weight"])
    assert not torch.equal(b2["ema.module.0.weight"], a2["ema.module.0.weight"])
    assert int(a2["nonfinite_consecutive"]) == 0
    assert trainer.global_step == 6


def test_consecutive_nan_steps_save_and_stop(tmp_path):
    # A skipped step still counts as a global step (Lightning calls optimizer.step with no gradients:
    # AdamW leaves every parameter alone), so batches 6, 7, 8 are global steps 6, 7, 8.
    r = run(tmp_path, "--nan_at", "6,7,8", "--max_consecutive", "3", check=False)
    assert r.returncode == 3, r.stderr[-2000:]
    msg = r.stdout.split("NONFINITE-STOP:")[1]
    assert "global step 8" in msg and "mse=nan" in msg and "reg=" in msg and "3 consecutive" in msg
    stop = tmp_path / "nonfinite-stop.ckpt"
    assert str(stop) in msg and stop.exists()
    saved = torch.load(stop, weights_only=False)["state_dict"]
    # The last good state = the weights (and EMA) after the 6 good steps of a clean run (same
    # max_steps: the cosine schedule depends on it), taken from its step-6 checkpoint.
    run(tmp_path / "six", "--every", "6", "--kill_self_at", "7", check=False)
    good = torch.load(tmp_path / "six" / "checkpoints" / "step=00000006.ckpt", weights_only=False)["state_dict"]
    for k in good:
        if not k.startswith("nonfinite"):
            assert torch.equal(saved[k], good[k]), k
    assert int(saved["nonfinite_skipped"]) == 3


@pytest.mark.slow
def test_nan_guard_under_ddp_agrees_across_ranks(tmp_path):
    """Only rank 0 sees NaN: both ranks must skip together (no hang, no divergence), then stop together."""
    r = run(tmp_path, "--devices", "2", "--strategy", "ddp", "--nan_at", "2", "--nan_rank", "0",
            "--max_steps", "6", timeout=300)
    info = json.loads((tmp_path / "result.jsonl").read_text().splitlines()[-1])
    assert info["world_size"] == 2 and info["global_step"] == 6 and info["skipped"] == 1
    r = run(tmp_path / "stop", "--devices", "2", "--strategy", "ddp", "--nan_at", "2,3", "--nan_rank", "1",
            "--max_consecutive", "2", "--max_steps", "6", check=False, timeout=300)
    assert r.returncode != 0 and "2 consecutive non-finite steps" in (r.stdout + r.stderr)
