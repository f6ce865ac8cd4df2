"""Against a REAL Slurm cluster (tests/slurm/cluster.sh: two emulated nodes n1, n2 on this machine, brought up
by .ci/run): the SHIPPED sbatch templates run `ldm-lightning fit` unchanged, configured only through their
documented variables (CONFIG, OVERRIDES, VENV, LDM_MASTER_ADDR) — the shipped tiny-mnist autoencoder config on the
shipped cpu-debug trainer config, on real MNIST shards, DDP over gloo.

- 1 node x 2 tasks (`slurm/train_1node.sbatch`) and 2 nodes x 1 task (`slurm/train_multinode.sbatch`): an
  uninterrupted job, and a job sent `scancel --signal=USR1 --full` mid-run, which saves at the next step
  boundary, requeues itself (same job id, Restarts=1), resumes and ends at the configured step with every
  tensor (weights, EMA, optimizer state) bitwise equal to the uninterrupted job's, in one W&B run.
- Elastic (data.order: global): a 2-node job submitted with --no-requeue, preempted with USR1, resumed by
  `sbatch slurm/train_1node.sbatch` on 1 node × 1 task, ends equal to an uninterrupted 2-node job.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV = str(Path(sys.executable).parent.parent)
STEPS = 20


def _cluster_reason() -> str | None:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "Slurm client tools not installed (bash tests/slurm/cluster.sh up installs them)"
    try:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    if r.returncode != 0:
        return ("no Slurm controller reachable (run `bash tests/slurm/cluster.sh up` and "
                f"`eval $(bash tests/slurm/cluster.sh env)`): {r.stderr.strip()[:200]}")
    if len(re.findall(r"idle|mix", r.stdout)) < 2:
        return f"fewer than 2 usable Slurm nodes (sinfo: {r.stdout.strip()!r})"
    return None


_reason = _cluster_reason()
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.skipif(_reason is not None, reason=_reason or "")]

LAYOUTS = {  # name -> (template, sbatch options)
    "1node": ("slurm/train_1node.sbatch", ["--nodes=1", "--ntasks-per-node=2"]),
    "2node": ("slurm/train_multinode.sbatch", ["--nodes=2", "--ntasks-per-node=1"]),
}

# The elastic resume's layout: one node, one task (world size 1).
ONE_TASK = {"1node-1task": ("slurm/train_1node.sbatch", ["--nodes=1", "--ntasks-per-node=1"])}


def job_field(job_id: str, field: str) -> str | None:
    r = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=15)
    m = re.search(rf"\b{field}=(\S+)", r.stdout)
    return m.group(1) if m else None


def submit(layout: str, out: Path, shards: dict, extra: tuple[str, ...] = (), sbatch: tuple[str, ...] = (),
           env_extra: dict | None = None) -> str:
    template, options = {**LAYOUTS, **ONE_TASK}[layout]
    out.mkdir(parents=True, exist_ok=True)
    ckpt_cfg = out / "ckpt.yaml"  # what a user writes to checkpoint every 4 steps instead of the shipped 25
    ckpt_cfg.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "ldm_lightning.training.checkpointing.StepCheckpoint",
         "init_args": {"every_n_train_steps": 4, "keep_last_k": 2}}]}}))
    overrides = [f"--data.init_args.train_shards={shards['train']}", f"--data.init_args.val_shards={shards['test']}",
                 "--data.init_args.batch_size=16", "--data.init_args.num_workers=1",
                 f"--trainer.max_steps={STEPS}", "--trainer.strategy=ddp", f"--trainer.default_root_dir={out / 'run'}",
                 *extra]
    env = {k: v for k, v in os.environ.items()
           if k == "SLURM_CONF" or not k.startswith(("SLURM_", "WANDB_RUN_ID"))}
    env.update(CONFIG=f"configs/autoencoder/tiny-mnist.yaml configs/trainer/cpu-debug.yaml {ckpt_cfg}",
               OVERRIDES=" ".join(overrides), VENV=VENV, LDM_MASTER_ADDR="127.0.0.1", WANDB_MODE="offline",
               OMP_NUM_THREADS="1", **(env_extra or {}))
    r = subprocess.run(["sbatch", "--parsable", *options, *sbatch, "--gpus-per-node=0", "--cpus-per-task=1", "--time=8",
                        f"--output={out}/slurm-%j.out", f"--job-name=ldm-{layout}-{out.name}", template],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def log_of(out: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in out.glob("slurm-*.out"))


def wait_for(job_id: str, states: set[str], timeout: float, out: Path) -> str:
    deadline = time.time() + timeout
    state = None
    while time.time() < deadline:
        state = job_field(job_id, "JobState")
        if state in states:
            return state
        if state in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"} - states:
            break
        time.sleep(0.2)
    subprocess.run(["scancel", job_id], timeout=15)
    raise AssertionError(f"job {job_id} is {state}, expected {states}; log:\n{log_of(out)[-5000:]}")


def final_state(out: Path) -> dict:
    return torch.load(out / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def wandb_run_ids(out: Path) -> list[str]:
    return sorted(p.name.split("-", 3)[-1] for p in (out / "run" / "wandb").glob("offline-run-*"))


def preempt_after_first_checkpoint(job: str, out: Path) -> None:
    """Wait for the job's step-4 checkpoint (so the signal lands mid-run), then send USR1 to every task."""
    first = out / "run" / "checkpoints" / "step=00000004.ckpt"
    deadline = time.time() + 400
    while not first.exists():
        state = job_field(job, "JobState")
        assert time.time() < deadline and state in ("PENDING", "RUNNING", "CONFIGURING"), \
            f"job {job} is {state} before its first checkpoint:\n{log_of(out)[-4000:]}"
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--full", job], check=True, timeout=15)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mnist_shards):
    """Both layouts' uninterrupted jobs, submitted together (they fit on the two nodes' declared CPUs)."""
    jobs = {}
    for layout in LAYOUTS:
        out = tmp_path_factory.mktemp(f"slurm-{layout}-ref")
        jobs[layout] = (submit(layout, out, mnist_shards), out)
    for job, out in jobs.values():
        wait_for(job, {"COMPLETED"}, 420, out)
    return jobs


@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_usr1_saves_requeues_resumes_bitwise_exact(layout, tmp_path, uninterrupted, mnist_shards):
    ref_job, ref_out = uninterrupted[layout]
    ref = final_state(ref_out)
    assert ref["global_step"] == STEPS and "Restarts=0" in subprocess.run(
        ["scontrol", "show", "job", ref_job], capture_output=True, text=True, timeout=15).stdout
    assert "(2 node(s)" in log_of(ref_out) if layout == "2node" else "(1 node(s)" in log_of(ref_out)
    # The job log is a file: rank 0's plain progress lines are in it (ProgressLines, a default of `fit`).
    assert f"[progress] step {STEPS}/{STEPS} " in log_of(ref_out), log_of(ref_out)[-3000:]

    out = tmp_path / "preempted"
    job = submit(layout, out, mnist_shards)
    preempt_after_first_checkpoint(job, out)
    wait_for(job, {"COMPLETED"}, 600, out)

    log = log_of(out)
    assert "SIGUSR1 received: saving at global step" in log and f"requeued Slurm job {job}" in log, log[-4000:]
    saved_at = int(re.search(r"SIGUSR1 received: saving at global step (\d+)", log).group(1))
    assert 4 <= saved_at < STEPS, "the signal must land mid-run"
    assert job_field(job, "Restarts") == "1"
    assert "restart 1" in log  # the same log file, appended (--open-mode=append)
    assert f"resuming from {out / 'run' / 'checkpoints'}" in log
    got = final_state(out)
    assert got["global_step"] == STEPS
    # Goodput (training/goodput.py): the requeued job counted one requeue after a signal, timed from the signal.
    goodput = got["goodput"]
    assert goodput["requeues"] == 1 and goodput["restarts"] == 1 and goodput["last_restart_s"] > 0, goodput
    assert goodput["totals"]["restart"] == goodput["last_restart_s"]
    diff = [k for k in ref["state_dict"] if not torch.equal(ref["state_dict"][k], got["state_dict"][k])]
    assert not diff, f"the requeued job differs from the uninterrupted one in {len(diff)} tensors: {diff[:5]}"
    for a, b in zip(ref["optimizer_states"], got["optimizer_states"], strict=True):
        for pid, sa in a["state"].items():
            assert torch.equal(sa["exp_avg_sq"], b["state"][pid]["exp_avg_sq"])
    # One W&B run across the requeue: every offline run directory has the job's pinned id.
    assert wandb_run_ids(out) == [f"slurm-{job}"] * 2, wandb_run_ids(out)


# data.order: global on the tiny-mnist autoencoder, its GAN off (disc_start 2000 > STEPS), warmup off so that a
# different sample or noise draw moves weights by ~lr per step (tests/test_scale_elastic.py: the tolerance).
GLOBAL = ("--data.init_args.order=global", "--data.init_args.batch_size=8", "--data.init_args.val_shards=null",
          "--model.init_args.scale_batches=0", "--model.init_args.optim.warmup_steps=0")
ELASTIC_ATOL = 1e-5  # reduction order only: one process sums the accumulated micro-batches, DDP averages ranks


@pytest.mark.timeout(900)
def test_two_node_job_preempted_resumes_on_one_node_elastic(tmp_path, mnist_shards):
    """Issue 29 item 2 on Slurm: a 2-node × 1-task job (data.order: global, batch 8 per rank: global batch 16),
    submitted with `--no-requeue`, gets `scancel --signal=USR1 --full`: it saves at the next step boundary, says it
    is not requeued and exits 75. The SAME run (same CONFIG/OVERRIDES, W&B run id pinned to the first job's) is
    resumed by `sbatch slurm/train_1node.sbatch` on 1 node × 1 task: accumulation 2 keeps the global batch (one
    line), and the run ends equal to an uninterrupted 2-node job within ELASTIC_ATOL."""
    ref_out, out = tmp_path / "ref", tmp_path / "moved"
    ref_job = submit("2node", ref_out, mnist_shards, GLOBAL)
    job = submit("2node", out, mnist_shards, GLOBAL, sbatch=("--no-requeue",))
    preempt_after_first_checkpoint(job, out)
    wait_for(job, {"FAILED"}, 300, out)  # exit 75 (EXIT_PREEMPTED): saved, not finished
    log = log_of(out)
    assert job_field(job, "ExitCode") == "75:0" and job_field(job, "Restarts") == "0", log[-4000:]
    assert f"Slurm job {job} is not requeueable" in log and "WARNING: `scontrol" not in log, log[-4000:]
    saved_at = int(re.search(r"SIGUSR1 received: saving at global step (\d+)", log).group(1))
    assert 4 <= saved_at < STEPS, "the signal must land mid-run"
    at_move = final_state(out)["state_dict"]

    resumed = submit("1node-1task", out, mnist_shards, GLOBAL, env_extra={"WANDB_RUN_ID": f"slurm-{job}"})
    wait_for(resumed, {"COMPLETED"}, 420, out)
    wait_for(ref_job, {"COMPLETED"}, 420, ref_out)
    log = log_of(out)
    assert "(1 node(s) x 1 task(s))" in log
    lines = [ln for ln in log.splitlines() if "elastic resume" in ln]
    assert len(lines) == 1, log[-4000:]
    assert "2 process(es) × batch_size 8 × accumulation 1 → 1 × 8 × 2" in lines[0]
    ref, got = final_state(ref_out), final_state(out)
    assert ref["global_step"] == got["global_step"] == STEPS
    weights = [k for k, v in ref["state_dict"].items() if v.is_floating_point()]
    worst = max(float((ref["state_dict"][k] - got["state_dict"][k]).abs().max()) for k in weights)
    assert worst < ELASTIC_ATOL, worst
    moved = max(float((ref["state_dict"][k] - at_move[k]).abs().max()) for k in weights)
    assert moved > 100 * ELASTIC_ATOL  # the steps after the move did train: the tolerance is far below them
    dm = next(v for k, v in got.items() if k.endswith("ShardDataModule"))
    assert dm["samples"] == STEPS * 16 and dm["epoch"] == 0  # the position, in global samples
    assert wandb_run_ids(out) == [f"slurm-{job}"] * 2, wandb_run_ids(out)  # one W&B run across both jobs
