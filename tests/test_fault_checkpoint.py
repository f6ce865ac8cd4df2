"""Atomic checkpoint writes, corrupt-checkpoint detection and fallback, RNG state round trip."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from ldm_lightning import fileio
from ldm_lightning.training import checkpointing as ck
from ldm_lightning.training.checkpointing import AtomicCheckpointIO, StepCheckpoint, atomic_torch_save
from ldm_lightning.training.resume import CorruptCheckpointError, resolve_resume_checkpoint, validate_checkpoint
from ldm_lightning.training.rng_state import capture_rng_state, restore_rng_state


def fake_ckpt(step: int) -> dict:
    """The top-level layout of a Lightning training checkpoint, with a little real tensor data."""
    return {"state_dict": {"w": torch.full((64, 64), float(step))}, "global_step": step, "epoch": 0,
            "loops": {}, "optimizer_states": [], "lr_schedulers": []}


def write_run(tmp_path, steps=(4, 8, 12)):
    d = tmp_path / "checkpoints"
    for i, s in enumerate(steps):
        atomic_torch_save(fake_ckpt(s), d / f"step={s:08d}.ckpt")
        # Distinct, increasing mtimes whatever the file system's timestamp granularity.
        os.utime(d / f"step={s:08d}.ckpt", ns=(10**18 + i * 10**9,) * 2)
    atomic_torch_save(fake_ckpt(steps[-1]), d / "last.ckpt")
    os.utime(d / "last.ckpt", ns=(10**18 + len(steps) * 10**9,) * 2)
    return d


def truncate(path, keep_fraction=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep_fraction))


# --- atomic writes -------------------------------------------------------------------------------

def test_atomic_save_roundtrip_fsyncs_and_leaves_no_temp(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    path = tmp_path / "sub" / "a.ckpt"
    AtomicCheckpointIO().save_checkpoint(fake_ckpt(3), path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.full((64, 64), 3.0))
    assert len(synced) >= 2, "file and directory must both be fsync'ed"
    assert sorted(os.listdir(path.parent)) == ["a.ckpt"]
    # Same permissions as a plain open() would give (mkstemp alone gives 0600).
    assert (os.stat(path).st_mode & 0o777) == fileio._file_mode()


def test_crash_mid_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save(fake_ckpt(1), path)
    before = path.read_bytes()

    def dying_save(obj, f):  # writes half a checkpoint, then the "process dies"
        f.write(b"PK\x03\x04" + b"\0" * 1000)
        raise KeyboardInterrupt("simulated kill during torch.save")

    monkeypatch.setattr(ck.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save(fake_ckpt(2), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.ckpt"], "temp file must be removed"


def test_atomic_io_rejects_storage_options(tmp_path):
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint(fake_ckpt(0), tmp_path / "x.ckpt", storage_options={"a": 1})


# --- validation + fallback -----------------------------------------------------------------------

def test_validate_names_file_and_reason(tmp_path):
    d = write_run(tmp_path)
    assert validate_checkpoint(d / "last.ckpt")["global_step"] == 12
    truncate(d / "last.ckpt")
    with pytest.raises(CorruptCheckpointError, match=r"last\.ckpt cannot be loaded safely"):
        validate_checkpoint(d / "last.ckpt")
    (d / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="empty"):
        validate_checkpoint(d / "empty.ckpt")
    torch.save({"state_dict": {}}, d / "weights.ckpt")
    with pytest.raises(CorruptCheckpointError, match="lacks"):
        validate_checkpoint(d / "weights.ckpt")
    torch.save([1, 2], d / "list.ckpt")
    with pytest.raises(CorruptCheckpointError, match="not a checkpoint dict"):
        validate_checkpoint(d / "list.ckpt")


@pytest.mark.parametrize("arg", ["dir", "last"])
def test_truncated_last_falls_back_to_previous_good(tmp_path, capsys, arg):
    d = write_run(tmp_path)
    truncate(d / "last.ckpt")
    truncate(d / "step=00000012.ckpt", 0.9)
    os.utime(d / "last.ckpt", ns=(2 * 10**18,) * 2)  # still the newest
    chosen = resolve_resume_checkpoint(d if arg == "dir" else d / "last.ckpt")
    assert chosen.path == str(d / "step=00000008.ckpt") and chosen.global_step == 8
    out = capsys.readouterr().out
    assert "skipping unusable checkpoint" in out and "last.ckpt" in out and "step=00000012.ckpt" in out
    assert chosen.reason.startswith("instead of the unusable last.ckpt; " if arg == "last" else "the highest")
    assert "the highest step recorded among 2 valid checkpoint(s)" in chosen.reason


def test_resolve_edge_cases(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_resume_checkpoint(tmp_path / "nope.ckpt")
    assert resolve_resume_checkpoint(tmp_path / "not-yet") is None  # first run of a job
    with pytest.raises(FileNotFoundError):
        resolve_resume_checkpoint(tmp_path / "not-yet", must_exist=True)
    (tmp_path / "empty").mkdir()
    assert resolve_resume_checkpoint(tmp_path / "empty") is None
    d = write_run(tmp_path, steps=(4,))
    for f in d.iterdir():
        truncate(f)
    with pytest.raises(CorruptCheckpointError, match="no usable checkpoint"):
        resolve_resume_checkpoint(d)


def test_crafted_pickle_is_refused_without_running_code(tmp_path, capsys):
    d = write_run(tmp_path, steps=(4,))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({**fake_ckpt(99), "x": Evil()}, d / "step=00000099.ckpt")
    os.utime(d / "step=00000099.ckpt", ns=(3 * 10**18,) * 2)  # the newest file
    with pytest.raises(CorruptCheckpointError, match="refused: loading it could run code"):
        validate_checkpoint(d / "step=00000099.ckpt")
    assert resolve_resume_checkpoint(d).path == str(d / "last.ckpt")
    assert not marker.exists()
    assert "step=00000099.ckpt" in capsys.readouterr().out


def test_step_checkpoint_validates_its_arguments():
    with pytest.raises(ValueError, match="every_n_train_steps"):
        StepCheckpoint(every_n_train_steps=0)
    with pytest.raises(ValueError, match="keep_last_k"):
        StepCheckpoint(keep_last_k=0)


# --- RNG states ----------------------------------------------------------------------------------

def test_rng_state_roundtrip_through_weights_only_load(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leaves a cached gaussian behind
    state = capture_rng_state()
    expected = (torch.rand(3), np.random.randn(3), random.random())
    atomic_torch_save({"rng": state}, tmp_path / "r.ckpt")
    loaded = torch.load(tmp_path / "r.ckpt", weights_only=True)["rng"]  # Lightning's default load mode
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng_state(loaded)
    got = (torch.rand(3), np.random.randn(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_choice_is_by_recorded_step_then_resume_state_and_deepspeed_steps_are_read_safely(tmp_path, capsys):
    """File times do not matter (a copied folder); a tie goes to the file with more resume state. A DeepSpeed
    directory's step comes from rank 0's model-states file through the restricted unpickler, else its name."""
    d = write_run(tmp_path, steps=(4, 8))
    os.utime(d / "step=00000004.ckpt", ns=(4 * 10**18,) * 2)  # the newest file, the lowest step
    chosen = resolve_resume_checkpoint(d)
    assert (chosen.path, chosen.global_step) == (str(d / "last.ckpt"), 8)
    assert "step=00000008.ckpt holds the same step and state: last.ckpt is preferred" in chosen.reason
    atomic_torch_save({**fake_ckpt(8), "rng_states": {"ranks": [torch.zeros(1)]}}, d / "step=00000008.ckpt")
    assert resolve_resume_checkpoint(d).path == str(d / "step=00000008.ckpt")  # more resume state wins the tie
    for name, states in (("step=00000011.ckpt", {"global_step": 11}), ("step=00000012.ckpt", {"x": os.stat_result})):
        (d / name / "checkpoint").mkdir(parents=True)
        (d / name / "latest").write_text("checkpoint")
        torch.save(states, d / name / "checkpoint" / "mp_rank_00_model_states.pt")
    chosen = resolve_resume_checkpoint(d)  # 12: from the name (its file is refused unloaded), above 11 (read)
    assert (chosen.path, chosen.global_step) == (str(d / "step=00000012.ckpt"), 12)
    assert "the step in its directory name (DeepSpeed's files were not unpickled" in chosen.reason
    assert resolve_resume_checkpoint(d / "step=00000011.ckpt").global_step == 11
