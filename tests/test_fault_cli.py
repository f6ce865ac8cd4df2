"""Fault tolerance through the user path: `ldm-lightning fit` (the installed console script) in a subprocess,
with the SHIPPED configs, on real MNIST shards. Nothing in the configs lists a fault-tolerance piece: the
defaults of the CLI do all of it. The one extra file (`ckpt.yaml`) is what a user writes to checkpoint every
4 steps instead of the shipped 25.

- SIGUSR1 -> saved at the next step boundary, exit 75; SIGTERM -> saved, exit 143 (outside Slurm).
- SIGKILL at an arbitrary moment -> `--ckpt_path last` ends at the configured step, bitwise equal to an
  uninterrupted run (weights, EMA, optimizer state), for both stages; mid-epoch.
- a truncated `last.ckpt` -> the previous good checkpoint; a crafted pickle -> refused, no code runs.
- a finished run -> a checkpoint of the final step; a rerun in the same directory resumes (never restarts).
- a non-finite stop -> exit 3, `nonfinite-stop.ckpt` holds the state from before the first non-finite step.
- a copied folder with rewritten file times -> the highest recorded step; a stale temp file is removed; older
  step files are pruned across the resume; a resume at another world size, with a changed model, or onto a
  full disk -> one paragraph, exit 2, nothing lost.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
LDM = str(Path(sys.executable).parent / "ldm-lightning")
STEPS = 12
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def stage_args(stage: str, shards: dict, ae: str, out: Path, every: int = 4) -> list[str]:
    """The README's fit command for a stage, with only data paths, sizes and steps overridden."""
    (out).mkdir(parents=True, exist_ok=True)
    ckpt_cfg = out.parent / "ckpt.yaml"
    ckpt_cfg.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "ldm_lightning.training.checkpointing.StepCheckpoint",
         "init_args": {"every_n_train_steps": every, "keep_last_k": 2}}]}}))
    config = {"autoencoder": "configs/autoencoder/tiny-mnist.yaml",
              "diffusion": "configs/diffusion/mnist-unet-class.yaml"}[stage]
    args = ["-c", str(ROOT / config), "-c", str(ROOT / "configs/trainer/cpu-debug.yaml"), "-c", str(ckpt_cfg),
            "--data.init_args.train_shards", shards["train"], "--data.init_args.val_shards", shards["test"],
            "--data.init_args.batch_size", "16", "--trainer.max_steps", str(STEPS),
            "--trainer.default_root_dir", str(out)]
    if stage == "diffusion":
        args += ["--model.init_args.autoencoder", ae, "--model.init_args.val_num", "0"]
    return args


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_RUN_ID"))}
    e.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    return e


def fit(args: list[str], *extra: str, expect: int = 0, timeout: int = 400) -> subprocess.CompletedProcess:
    r = subprocess.run([LDM, "fit", *args, *extra], capture_output=True, text=True, cwd=ROOT, env=env(),
                       timeout=timeout)
    assert r.returncode == expect, f"fit exited {r.returncode}, expected {expect}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def start(args: list[str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen([LDM, "fit", *args, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, env=env())


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"fit ended ({proc.returncode}) before {path} appeared:\n{proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    diff = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:5]}"
    assert any(k.startswith("ema.") for k in a["state_dict"]), "the EMA must be in the checkpoint"
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for pid, sa in opt_a["state"].items():
            assert torch.equal(sa["exp_avg"], opt_b["state"][pid]["exp_avg"])
            assert torch.equal(sa["exp_avg_sq"], opt_b["state"][pid]["exp_avg_sq"])


# What these runs do not need: W&B's service process and Lightning's sanity validation (~2 s a run).
LEAN = ("--trainer.logger", "false", "--trainer.num_sanity_val_steps", "0")


def _resave_without(path: Path, *keys: str) -> None:
    ckpt = load(path)
    for k in keys:
        ckpt.pop(k, None)
    torch.save(ckpt, path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_shards, tiny_ae):
    """Uninterrupted runs of both stages: {stage: run dir}."""
    runs = {}
    for stage in ("autoencoder", "diffusion"):
        out = tmp_path_factory.mktemp(f"ref-{stage}") / "run"
        fit(stage_args(stage, mnist_shards, tiny_ae, out))
        runs[stage] = out
    return runs


def test_finished_run_has_its_final_step_and_a_rerun_resumes(reference, mnist_shards, tiny_ae):
    ckpts = reference["autoencoder"] / "checkpoints"
    # every 4 steps, keep 2, plus last: the final step is saved whatever every_n_train_steps says
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step=00000008.ckpt", "step=00000012.ckpt"]
    assert load(ckpts / "last.ckpt")["global_step"] == STEPS
    # The same command again: resumes from the final step and has nothing left to train (no silent restart,
    # no last-v1.ckpt).
    before = {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir()}
    r = fit(stage_args("autoencoder", mnist_shards, tiny_ae, reference["autoencoder"]))
    assert "holds checkpoints of an earlier run" in r.stdout and f"resuming from {ckpts / 'last.ckpt'}" in r.stdout
    assert f"step={STEPS:08d}.ckpt holds the same step and state: last.ckpt is preferred" in r.stdout
    assert "nothing left to train" in r.stdout
    assert {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir()} == before


@pytest.mark.parametrize("stage", ["autoencoder", "diffusion"])
def test_sigkill_at_an_arbitrary_moment_then_resume_is_bitwise_exact(stage, reference, tmp_path, mnist_shards,
                                                                      tiny_ae):
    out = tmp_path / "run"
    args = stage_args(stage, mnist_shards, tiny_ae, out)
    proc = start(args)
    wait_for_file(out / "checkpoints" / "step=00000004.ckpt", proc)
    time.sleep(random.uniform(0.0, 1.5))  # anywhere in steps 4..11 (2,000 samples / 16 = 125 per epoch: mid-epoch)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "checkpoints" / f"step={STEPS:08d}.ckpt").exists(), "killed too late to test a resume"
    r = fit(args, "--ckpt_path", "last")
    assert "resuming" not in r.stdout or "unusable" not in r.stdout
    assert_same_state(load(reference[stage] / "checkpoints" / "last.ckpt"), load(out / "checkpoints" / "last.ckpt"))


@pytest.mark.parametrize("sig,code", [(signal.SIGUSR1, 75), (signal.SIGTERM, 143)], ids=["usr1", "term"])
def test_signal_saves_at_the_next_step_and_exits_with_its_code(sig, code, tmp_path, mnist_shards, tiny_ae):
    out = tmp_path / "run"
    args = stage_args("autoencoder", mnist_shards, tiny_ae, out)
    proc = start(args, "--trainer.max_steps", "1000")
    wait_for_file(out / "checkpoints" / "step=00000004.ckpt", proc)
    proc.send_signal(sig)
    log, _ = proc.communicate(timeout=180)
    assert proc.returncode == code, log[-3000:]
    name = signal.Signals(sig).name
    assert f"{name} received: saving at global step" in log
    step = int(log.split(f"{name} received: saving at global step ")[1].split()[0])
    assert 4 <= step < 1000
    last = load(out / "checkpoints" / "last.ckpt")
    assert last["global_step"] == step
    assert (out / "checkpoints" / f"step={step:08d}.ckpt").exists()


def test_truncated_last_and_crafted_pickle_fall_back_to_the_good_checkpoint(reference, tmp_path, mnist_shards,
                                                                            tiny_ae):
    """A copied run folder with rewritten file times (`cp -r`, rsync without -t): a crafted pickle is the newest
    file, then a truncated last.ckpt, then step=8, the oldest step=12. Both bad files are named and skipped, no
    code runs, and the resume takes step 12, the highest step recorded in a valid checkpoint (the rule of file
    times took step 8). step=12 records no world size (as a checkpoint from before that record): one line, the
    run goes on. A temp file a kill mid-write left is removed at start-up (a look-alike name is not), and
    keep_last_k (2) prunes the older step files of the earlier process too; a file of a later step (99) is
    left alone."""
    import shutil
    out = tmp_path / "run"
    shutil.copytree(reference["autoencoder"] / "checkpoints", out / "checkpoints")
    ckpts = out / "checkpoints"
    last = ckpts / "last.ckpt"
    with open(last, "r+b") as f:
        f.truncate(last.stat().st_size // 2)
    marker = tmp_path / "pwned"
    evil = ckpts / "step=00000099.ckpt"
    subprocess.run([sys.executable, "-c", (
        "import os, torch\n"
        "class Evil:\n"
        f"    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
        "torch.save({'state_dict': {}, 'global_step': 99, 'epoch': 0, 'loops': {}, 'optimizer_states': [],"
        f" 'lr_schedulers': [], 'x': Evil()}}, r'{evil}')\n")], check=True, timeout=60)
    chosen = ckpts / f"step={STEPS:08d}.ckpt"
    _resave_without(chosen, "run_topology")
    shutil.copy(ckpts / "step=00000008.ckpt", ckpts / "step=00000004.ckpt")  # an older step file to prune
    stale = ckpts / ".last.ckpt.k2x9_q1z.tmp"  # what fileio.atomic_write leaves when killed mid-write
    stale.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    (ckpts / "notes.tmp").write_text("not ours")
    now = time.time_ns()
    for i, f in enumerate([chosen, ckpts / "step=00000004.ckpt", ckpts / "step=00000008.ckpt", last, evil]):
        os.utime(f, ns=(now + i * 10**9,) * 2)
    r = fit(stage_args("autoencoder", mnist_shards, tiny_ae, out), *LEAN, "--ckpt_path", "last",
            "--trainer.max_steps", str(STEPS + 2))
    assert not marker.exists(), "a crafted checkpoint ran code"
    assert "skipping unusable checkpoint" in r.stdout and "step=00000099.ckpt" in r.stdout and "refused" in r.stdout
    assert "last.ckpt cannot be loaded safely" in r.stdout
    assert (f"resuming from {chosen} (global step {STEPS}): the highest step recorded among 3 valid checkpoint(s); "
            "chosen by step, not by file time") in r.stdout, r.stdout[-3000:]
    assert f"{chosen} records no world size" in r.stdout
    assert f"removed 1 temp file(s) an interrupted save left in {ckpts}: {stale.name}" in r.stdout
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "notes.tmp", chosen.name,
                                                       f"step={STEPS + 2:08d}.ckpt", evil.name]
    last_state = load(last)
    assert last_state["global_step"] == STEPS + 2 and last_state["run_topology"]["world_size"] == 1


def test_explicit_missing_checkpoint_is_one_clear_line(tmp_path, mnist_shards, tiny_ae):
    r = fit(stage_args("autoencoder", mnist_shards, tiny_ae, tmp_path / "run"), "--ckpt_path",
            str(tmp_path / "nope.ckpt"), expect=2)
    assert "nope.ckpt does not exist" in r.stderr and "Traceback" not in r.stderr


def test_nonfinite_stop_keeps_the_state_from_before_the_first_nonfinite_step(tmp_path, mnist_shards, tiny_ae):
    out = tmp_path / "run"
    # lr 1e6: step 1 is finite (and blows the weights up), step 2 is not. Saving every step puts a checkpoint
    # right before the first non-finite step; none is written during the skipped streak.
    r = fit(stage_args("autoencoder", mnist_shards, tiny_ae, out, every=1), "--model.init_args.optim.lr", "1e6",
            "--model.init_args.optim.warmup_steps", "0", "--model.init_args.guard.max_consecutive", "3",
            "--trainer.max_steps", "200", expect=3)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "training stopped: non-finite" in r.stderr and "nonfinite-stop.ckpt" in r.stderr
    first_bad = int(r.stdout.split("non-finite ")[1].split("at global step ")[1].split()[0])
    stop = load(out / "checkpoints" / "nonfinite-stop.ckpt")
    assert stop["global_step"] == first_bad
    assert all(torch.isfinite(v).all() for v in stop["state_dict"].values() if v.is_floating_point())
    # the newest step checkpoint from before the first non-finite step, and the message says so
    source = r.stderr.split("a copy of ")[1].split(",")[0]
    assert source in ("last.ckpt", f"step={first_bad:08d}.ckpt"), r.stderr[-2000:]
    assert_same_state(load(out / "checkpoints" / f"step={first_bad:08d}.ckpt"), stop)
    # Never a last.ckpt written after the first non-finite step.
    last = out / "checkpoints" / "last.ckpt"
    assert not last.exists() or load(last)["global_step"] <= first_bad


# --- nothing lost, nothing mixed (issue 25): which file a resume takes, what it refuses, what it cleans up ----

def test_resume_at_another_world_size_is_refused(tmp_path, mnist_shards, tiny_ae):
    """A 2-process DDP run (gloo) records world size 2 in its checkpoints; a resume at 1 process stops at once
    with one paragraph naming both sizes and the flags that match (exit 2), and writes nothing."""
    out = tmp_path / "run"
    args = [*stage_args("autoencoder", mnist_shards, tiny_ae, out), *LEAN]
    fit(args, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "2")
    ckpts = out / "checkpoints"
    topology = load(ckpts / "last.ckpt")["run_topology"]
    assert (topology["world_size"], topology["devices"], topology["batch_size"]) == (2, 2, 16), topology
    before = {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir()}
    r = fit(args, "--trainer.max_steps", "4", expect=2)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert ("world size 2 in the checkpoint (1 node(s) × 2 device(s)), 1 now (1 node(s) × 1 device(s))" in r.stderr
            and "--trainer.devices 2 --trainer.num_nodes 1" in r.stderr), r.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir()} == before


def test_resume_with_a_changed_model_names_the_field(reference, tmp_path, mnist_shards, tiny_ae):
    """A resume whose config builds a wider model: one paragraph naming the config field that differs from the
    checkpoint's saved hyper-parameters (not Lightning's hundreds of size-mismatch lines), exit 2."""
    import shutil
    out = tmp_path / "run"
    shutil.copytree(reference["autoencoder"] / "checkpoints", out / "checkpoints")
    r = fit(stage_args("autoencoder", mnist_shards, tiny_ae, out), *LEAN, "--model.init_args.autoencoder",
            '{"ch": 32}', "--trainer.max_steps", str(STEPS + 2), expect=2)
    assert "size mismatch" not in r.stderr + r.stdout and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "its weights do not fit the model this config builds" in r.stderr
    assert "model.init_args.autoencoder.ch: 24 in the checkpoint, 32 now" in r.stderr, r.stderr[-3000:]
    assert "--trainer.default_root_dir" in r.stderr


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(reference, tmp_path, mnist_shards, tiny_ae):
    """A save that runs out of space: "no space left on <dir>; the previous checkpoint is intact", exit 2, no
    temp file left, the previous checkpoint unchanged and valid. The checkpoint folder is a real 16 MiB tmpfs
    (room for the copied last.ckpt, 10.9 MB, not for a second one) where the kernel lets this process mount one
    (root); elsewhere the same command runs with torch.save failing with ENOSPC after a partial write
    (patched in the subprocess), which is how a full disk reaches the writer."""
    import shutil
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    ckpts.mkdir(parents=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(ckpts)],
                                 capture_output=True, timeout=30).returncode == 0
    except OSError:  # no mount(8) here
        mounted = False
    try:
        shutil.copy(reference["autoencoder"] / "checkpoints" / "last.ckpt", ckpts / "last.ckpt")
        before = (ckpts / "last.ckpt").read_bytes()
        args = [*stage_args("autoencoder", mnist_shards, tiny_ae, out), *LEAN, "--trainer.max_steps", str(STEPS + 2)]
        if mounted:
            r = fit(args, expect=2)
        else:
            patch = ("import errno, sys, torch\n"
                     "def full(obj, f, *a, **k):\n"
                     "    f.write(b'PK' + bytes(4096))\n"
                     "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
                     "torch.save = full\n"
                     "from ldm_lightning.cli import console_main\n"
                     "sys.argv = ['ldm-lightning', *sys.argv[1:]]\n"
                     "sys.exit(console_main())\n")
            r = subprocess.run([sys.executable, "-c", patch, "fit", *args], capture_output=True, text=True, cwd=ROOT,
                               env=env(), timeout=400)
            assert r.returncode == 2, r.stderr[-3000:]
        assert "Traceback" not in r.stderr and "inline_container" not in r.stderr, r.stderr[-3000:]
        assert (f"no space left on {ckpts} while saving step={STEPS + 2:08d}.ckpt (it was not written); the previous "
                f"checkpoint is intact: last.ckpt (global step {STEPS})") in r.stderr, r.stderr[-3000:]
        assert sorted(os.listdir(ckpts)) == ["last.ckpt"]
        assert (ckpts / "last.ckpt").read_bytes() == before
    finally:
        if mounted:
            subprocess.run(["umount", str(ckpts)], check=True)
