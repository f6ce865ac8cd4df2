"""Shards that changed after their manifest was written, and the data tools' edge cases (issue 25, items 7
and 9), through `ldm-lightning` in subprocesses.

- A shard replaced by another file of the same size: `fit` stops at start-up (exit 2, one paragraph naming
  the shard and the fixes) under the default `data.init_args.shard_check: strict`; with `warn` it trains and
  says so; a shard only copied without its times is accepted with a note; an older manifest (no times, no
  sampled hash) is checked on sizes only, said once.
- `data index` says how many samples have absolute / '..' member names; `data pack` lists dangling links and
  link loops as skipped and counts skips by kind; a pack that ends with 0 samples exits 2 saying why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from tar_files import write_tar

from ldm_lightning.data import ShardDataModule
from ldm_lightning.data.shard_check import SAMPLED_BYTES, shard_stamp

ENV = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
FIT = ["fit", "-c", "configs/autoencoder/tiny-mnist.yaml", "-c", "configs/trainer/cpu-debug.yaml",
       "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "25", "--trainer.max_steps", "2",
       "--trainer.logger", "false"]


def _cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ldm_lightning", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _relabel_first_sample(shard: Path) -> None:
    """Replace `shard` with a same-size file that holds another label for its first sample (a valid tar),
    then give it back its old modification time: only the sampled hash can tell."""
    st = shard.stat()
    with tarfile.open(shard) as t:
        cls = next(m for m in t.getmembers() if m.name.endswith(".cls"))
    data = bytearray(shard.read_bytes())
    assert cls.offset_data < SAMPLED_BYTES and cls.size == 1
    data[cls.offset_data] = ord("0") + (data[cls.offset_data] - ord("0") + 1) % 10
    tmp = shard.with_name("replacement.tmp")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_size == st.st_size and shard.stat().st_mtime_ns == st.st_mtime_ns


def test_fit_refuses_a_same_size_replaced_shard_and_warn_trains_on_it(mnist_shards, tmp_path, capfd):
    d = tmp_path / "train"
    shutil.copytree(mnist_shards["test"], d)  # copy2: times kept, so only the changes below differ
    man = _manifest(d)
    assert all(s.items() >= shard_stamp(d / s["name"]).items() for s in man["shards"])  # data pack recorded them
    _relabel_first_sample(d / "shard-000001.tar")
    os.utime(d / "shard-000002.tar")  # a copy without times / a touch: same bytes, new time
    old = tmp_path / "old-manifest"  # validation shards with a manifest written before times and hashes
    shutil.copytree(mnist_shards["test"], old)
    (old / "manifest.json").write_text(json.dumps(
        {**_manifest(old), "shards": [{k: s[k] for k in ("name", "num_samples", "bytes", "sha256")}
                                      for s in _manifest(old)["shards"]]}))

    run = ["--data.init_args.train_shards", str(d), "--data.init_args.val_shards", str(old)]
    r = _cli(*FIT, *run, "--trainer.default_root_dir", str(tmp_path / "strict"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"1 of 4 local shard(s) differ from their manifest: {d / 'shard-000001.tar'}: same size, but its " \
           "first or last 64 KiB differ" in r.stderr
    assert f"ldm-lightning data verify {d}" in r.stderr and "shard_check: warn" in r.stderr
    assert "shard-000002.tar" not in r.stderr  # only retimed: not a change
    assert not list((tmp_path / "strict").rglob("*.ckpt"))  # stopped before the first step

    r = _cli(*FIT, *run, "--data.init_args.shard_check", "warn", "--trainer.default_root_dir", str(tmp_path / "warn"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training anyway (shard_check: warn)" in r.stderr and "shard-000001.tar: same size" in r.stderr
    assert f"1 shard(s) have another modification time than their manifest records but the same size and " \
           f"first and last 64 KiB (copied without keeping times, or touched), e.g. {d / 'shard-000002.tar'}: " \
           "accepted" in r.stderr
    assert r.stderr.count("records no modification time") == 1  # the old val manifest: sizes only, said once

    r = _cli("data", "verify", str(d))  # what the message sends the user to: the full check agrees
    assert r.returncode == 1
    rows = {line.split()[0]: line for line in r.stdout.splitlines() if line.startswith("shard-")}
    assert "sha256 differs" in rows["shard-000001.tar"] and rows["shard-000002.tar"].endswith("ok")

    ShardDataModule(str(d), batch_size=25, num_workers=0, shard_check="off").train_dataloader()
    assert "shard_check is off: 4 shard(s) are not compared with their manifest" in capfd.readouterr().err


def test_index_names_unsafe_members_and_pack_lists_broken_links_and_refuses_0_samples(tmp_path):
    shards = tmp_path / "foreign"
    shards.mkdir()
    write_tar(shards / "a.tar", [("ok1.png", b"x"), ("ok1.cls", b"1"), ("../up.png", b"x"), ("/abs/p.png", b"x")])
    write_tar(shards / "b.tar", [("ok2.png", b"x"), ("sub/../../up2.png", b"x")])
    r = _cli("data", "index", str(shards))
    assert r.returncode == 0, r.stderr
    assert "warning: 3 of the 5 samples have member names that are absolute or climb with '..' (in a.tar (2), " \
           "b.tar (1))" in r.stderr and "never used" in r.stderr and "max_bad_fraction" in r.stderr
    man = _manifest(shards)
    assert [(s["num_samples"], s.get("unsafe_samples")) for s in man["shards"]] == [(3, 2), (2, 1)]
    assert all(s.items() >= shard_stamp(shards / s["name"]).items() for s in man["shards"])  # for the start-up check

    src = tmp_path / "photos"
    src.mkdir()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(src / "a.png")
    (src / "b.png").write_bytes(b"not a png")
    (src / "gone.png").symlink_to(tmp_path / "deleted.png")  # dangling
    (src / "loop1").symlink_to(src / "loop2")  # a loop of two links
    (src / "loop2").symlink_to(src / "loop1")
    (src / "me").symlink_to(src / "me", target_is_directory=True)  # a folder link to itself
    r = _cli("data", "pack", "--source", str(src), "--out", str(tmp_path / "out"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "packed 1 samples" in r.stdout and "skipped 5 (3 link loop, 1 dangling link, 1 unreadable image)" in r.stdout
    reasons = {s["source"]: s["reason"] for s in _manifest(tmp_path / "out")["skipped"]}
    assert reasons["gone.png"].startswith("dangling link") and str(tmp_path / "deleted.png") in reasons["gone.png"]
    assert all(reasons[k].startswith("link loop") for k in ("loop1", "loop2", "me"))

    (src / "a.png").unlink()  # now nothing decodes: exit 2, no manifest that looks trainable
    r = _cli("data", "pack", "--source", str(src), "--out", str(tmp_path / "none"), "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"packed 0 samples from --source {src}: nothing left after skipping 5 (3 link loop, 1 dangling link, " \
           "1 unreadable image)" in r.stderr
    assert not (tmp_path / "none" / "manifest.json").exists() and not list((tmp_path / "none").glob("*.tar"))
    (src / "b.png").unlink()  # no image at all is left to try: the same, before encoding
    r = _cli("data", "pack", "--source", str(src), "--out", str(tmp_path / "none2"), "--no-progress")
    assert r.returncode == 2 and "no images found in --source" in r.stderr and "skipped 4 (3 link loop, 1 dangling" \
        in r.stderr


def test_ddp_ranks_split_the_check_and_stop_together(mnist_shards, tmp_path):
    """Under 2-process DDP each rank checks half of the shards and the verdicts are all-gathered: the rank that
    did not read the replaced shard stops too (no rank waits in a collective), exit 2 naming the shard."""
    d = tmp_path / "train"
    shutil.copytree(mnist_shards["test"], d)
    _relabel_first_sample(d / "shard-000001.tar")  # rank 1 checks shards 1 and 3, rank 0 shards 0 and 2
    r = _cli(*FIT, "--data.init_args.train_shards", str(d), "--data.init_args.val_shards", str(d),
             "--data.init_args.shard_check", "strict", "--trainer.devices", "2", "--trainer.strategy", "ddp",
             "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "run"), timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"1 of 4 local shard(s) differ from their manifest: {d / 'shard-000001.tar'}" in r.stderr
