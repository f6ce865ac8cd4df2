"""The non-finite-step guard on a tiny deterministic model (the user-path tests are in test_fault_cli.py).

Every run is `tests/slurm/tiny_train.py` in a subprocess (the same script the Slurm tests submit): a
`TrainingModule` (AdamW + warmup + cosine, EMA, dropout on the global RNG, step-generator noise) on a
synthetic dataset with a per-epoch permutation whose mid-epoch position is in the checkpoint.
48 samples / batch 4 = 12 batches per epoch; 20 steps = 1 epoch and 2/3 of the next.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    # No periodic checkpoint before the streak (--every 1000): the stop saves the live state, which the
    # skipped steps left as it was after step 6.
    r = run(tmp_path, "--nan_at", "6,7,8", "--max_consecutive", "3", "--every", "1000", check=False)
    assert r.returncode == 3, r.stderr[-2000:]
    msg = r.stdout.split("NONFINITE-STOP:")[1]
    assert "global step 8" in msg and "mse=nan" in msg and "reg=" in msg and "3 consecutive" in msg
    stop = tmp_path / "checkpoints" / "nonfinite-stop.ckpt"
    assert str(stop) in msg and stop.exists() and "before the first non-finite step" in msg
    saved = torch.load(stop, weights_only=True)["state_dict"]
    # The last good state = the weights (and EMA) after the 6 good steps of a clean run (same
    # max_steps: the cosine schedule depends on it), taken from its step-6 checkpoint.
    run(tmp_path / "six", "--every", "6", "--kill_self_at", "7", check=False)
    good = torch.load(tmp_path / "six" / "checkpoints" / "step=00000006.ckpt", weights_only=True)["state_dict"]
    for k in good:
        if not k.startswith("nonfinite"):
            assert torch.equal(saved[k], good[k]), k
    assert int(saved["nonfinite_skipped"]) == 3
    # The live state's step counter went on over the skipped steps 7 and 8 (the stop comes inside step 8's batch,
    # before it is counted): the file records both, and the message says so.
    record = torch.load(stop, weights_only=True)
    assert record["global_step"] == 8 and record["nonfinite_stop"] == {"weights_of_step": 6, "global_step": 8,
                                                                      "skipped_steps": 2}
    assert "the weights, EMA and optimizer state of global step 6" in msg and "at global step 8" in msg


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
