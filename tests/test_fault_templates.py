"""The shipped sbatch templates: valid bash, the directives the preemption protocol relies on."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = [ROOT / "slurm" / "train_1node.sbatch", ROOT / "slurm" / "train_multinode.sbatch"]


@pytest.mark.parametrize("path", TEMPLATES + [ROOT / "slurm" / "common.sh", ROOT / "tests" / "slurm" / "cluster.sh"],
                         ids=lambda p: p.name)
def test_bash_syntax(path):
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_directives(path):
    d = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", path.read_text(), re.M))
    assert d["signal"] == "USR1@90" and "requeue" in d and d["open-mode"] == "append"
    assert d["ntasks-per-node"] == d["gpus-per-node"], "one task per GPU"
    assert "time" in d and "output" in d


def test_missing_config_is_a_clear_error(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_ID": "1",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1"}
    r = subprocess.run(["bash", str(TEMPLATES[0])], capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode != 0 and "set CONFIG=" in r.stderr


@pytest.mark.parametrize("script, requeued, said", [
    ("exit 0", True, "requeued Slurm job 6"),
    # Slurm's requeue stopped the job's processes, scontrol among them, before it returned
    ("kill -TERM $$", True, "requeued Slurm job 6"),
    # a job submitted with --no-requeue (or set Requeue=0): not requeued on purpose, no warning
    ("echo 'Requested operation is presently disabled for job 6' >&2; exit 1", False, "is not requeueable"),
    ("echo 'Invalid job id specified' >&2; exit 1", False, "WARNING"),
])
def test_requeue_counts_a_scontrol_stopped_by_the_requeue_itself(tmp_path, monkeypatch, capsys, script, requeued,
                                                                said):
    from ldm_lightning.training.preemption import PreemptionCallback

    fake = tmp_path / "scontrol"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert PreemptionCallback._requeue("6") is requeued
    out = capsys.readouterr().out
    assert ("requeued Slurm job 6" in out) is requeued and said in out, out


def test_job_requeueable_reads_slurms_requeue_flag(tmp_path, monkeypatch):
    """`sbatch --no-requeue` / `scontrol update JobId=<id> Requeue=0` → False: the preemption stop then exits 75 on
    every rank without asking for a requeue (the real thing: tests/test_fault_slurm.py)."""
    from ldm_lightning.training.preemption import job_requeueable

    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    fake = tmp_path / "scontrol"
    for out, expected in (("   Requeue=0 Restarts=0 BatchFlag=1", False), ("   Requeue=1 Restarts=2", True),
                          ("slurm_load_jobs error: Invalid job id specified", None)):
        fake.write_text(f"#!/bin/sh\necho '{out}'\n")
        fake.chmod(0o755)
        assert job_requeueable("6") is expected
