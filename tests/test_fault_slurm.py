"""Against a REAL Slurm cluster (tests/slurm/cluster.sh, brought up by .ci/run): the SHIPPED sbatch
template runs a 2-task DDP (gloo, CPU) job to the end, and a job sent USR1 mid-run saves, requeues
itself, resumes and ends at the configured step with weights bitwise equal to the uninterrupted job.

Both jobs run `slurm/train_1node.sbatch` unchanged; the command line only swaps what a CPU box lacks
(`--gpus-per-node=0`, 2 tasks, a short `--time`) and sets TRAIN_CMD to tests/slurm/tiny_train.py,
which takes the same `-c CONFIG --trainer.* --ckpt_path last` arguments as `ldm-lightning fit`.
"""

from __future__ import annotations

import json
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
TEMPLATE = ROOT / "slurm" / "train_1node.sbatch"
STEPS = 16


def _cluster_reason() -> str | None:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "Slurm client tools not installed (bash tests/slurm/cluster.sh up installs them)"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    if r.returncode != 0:
        return ("no Slurm controller reachable (run `bash tests/slurm/cluster.sh up` and "
                f"`eval $(bash tests/slurm/cluster.sh env)`): {r.stderr.strip()[:200]}")
    if not re.search(r"idle|mix|alloc", r.stdout):
        return f"no usable Slurm node (sinfo: {r.stdout.strip()!r})"
    return None


_reason = _cluster_reason()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_reason is not None, reason=_reason or "")]


def job_field(job_id: str, field: str) -> str | None:
    r = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=15)
    m = re.search(rf"\b{field}=(\S+)", r.stdout)
    return m.group(1) if m else None


def submit(out: Path, **config) -> str:
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"out": str(out), "max_steps": STEPS, "every": 4, "keep": 2, "strategy": "ddp", "n": 48,
           "batch_size": 4, **config}
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, CONFIG=str(out / "config.yaml"), OVERRIDES="--seed 0",
               TRAIN_CMD=f"{sys.executable} tests/slurm/tiny_train.py", LDM_MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(20000 + os.getpid() % 10000 + len(str(out)) % 97))
    r = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
                        "--time=4", f"--output={out}/slurm-%j.out", f"--job-name=ldm-test-{out.name}",
                        str(TEMPLATE)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


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
    log = "".join(p.read_text()[-4000:] for p in out.glob("slurm-*.out"))
    subprocess.run(["scancel", job_id], timeout=15)
    raise AssertionError(f"job {job_id} is {state}, expected {states}; log:\n{log}")


def results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "result.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm-ddp")
    job = submit(out)
    wait_for(job, {"COMPLETED"}, 200, out)
    return job, out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_task_ddp_job_finishes(uninterrupted):
    job, out = uninterrupted
    last = results(out)[-1]
    assert last["world_size"] == 2 and last["global_step"] == STEPS and not last["preempted"]
    assert last["job_id"] == job and last["restart_count"] == 0
    assert (out / "final.pt").exists()


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_usr1_saves_requeues_resumes_exactly(tmp_path, uninterrupted):
    _, ref_out = uninterrupted
    out = tmp_path / "preempted"
    # No periodic checkpoints: the resume can only come from the preemption save.
    job = submit(out, step_sleep=0.4, every=1000)
    progress = out / "progress.txt"
    deadline = time.time() + 150
    while time.time() < deadline:  # mid-epoch of epoch 0 (6 batches per rank per epoch)
        if progress.exists() and len(progress.read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    else:
        wait_for(job, {"RUNNING"}, 0, out)
    subprocess.run(["scancel", "--signal=USR1", "--full", job], check=True, timeout=15)
    wait_for(job, {"COMPLETED"}, 300, out)

    log = "".join(p.read_text() for p in out.glob("slurm-*.out"))
    assert "preemption signal received: saving" in log and f"requeued Slurm job {job}" in log, log[-4000:]
    assert int(job_field(job, "Restarts")) >= 1
    assert "restart 1" in log  # the same log file, appended (--open-mode=append)
    saved_at = int(re.search(r"saving \S+ at global step (\d+)", log).group(1))
    assert 3 <= saved_at < STEPS
    assert sorted(os.listdir(out / "checkpoints")) == ["last.ckpt"]
    last = results(out)[-1]
    assert last["job_id"] == job and last["restart_count"] >= 1 and last["global_step"] == STEPS
    ref, got = torch.load(ref_out / "final.pt", weights_only=True), torch.load(out / "final.pt", weights_only=True)
    diff = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not diff, f"resumed job differs from the uninterrupted one in {diff}"
