"""No silent data failures (issue 14): every bad shard, manifest or image is named, counted and either
handled or refused with a message; nothing that is readable is lost, and resume gets past a bad shard.

One table of damaged shard folders; for each: `ldm-lightning data verify` (subprocess) exits 1 with a
row naming the problem, and the training stream counts the missing samples as bad (with
max_bad_fraction=0 it fails naming the shard; with 1 it runs and keeps every readable sample)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_lightning.data import ShardDataModule
from ldm_lightning.data.shard_check import ShardChangedError
from ldm_lightning.data.stream import BadDataError

ENV = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}


def _cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ldm_lightning", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _set_manifest(d: Path, man: dict) -> None:
    (d / "manifest.json").write_text(json.dumps(man))


def _tar_with(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))


def _png(value: int = 128, size: int = 28) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# Each damage: (function of the shard folder that damages shard-000001.tar and returns how many samples
# the stream should count as bad, verify's message fragment, the stream's message fragment)
def _zero_bytes(d: Path) -> int:
    (d / "shard-000001.tar").write_bytes(b"")
    return 125


def _random_bytes(d: Path) -> int:
    (d / "shard-000001.tar").write_bytes(np.random.default_rng(0).integers(0, 256, 20000, np.uint8).tobytes())
    return 125


def _truncated(d: Path) -> int:
    f = d / "shard-000001.tar"
    f.write_bytes(f.read_bytes()[:200_000])  # cut inside a member: the samples before the cut stay readable
    with tarfile.open(d.parent / "src-001.tar") as t:  # samples whose image lies wholly before the cut
        kept = [m for m in t.getmembers() if m.name.endswith(".png") and m.offset_data + m.size <= 200_000]
    return 125 - len(kept)


def _count_too_high(d: Path) -> int:
    man = _manifest(d)
    man["shards"][1]["num_samples"] = 200  # the shard holds 125
    _set_manifest(d, man)
    return 75


def _link_member(d: Path) -> int:
    link = tarfile.TarInfo("mnist-x-000001.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    _tar_with(d / "shard-000001.tar", [("mnist-x-000000.png", _png()), ("mnist-x-000000.cls", b"1"), link])
    man = _manifest(d)
    man["shards"][1].update(num_samples=2, bytes=None, sha256=None)
    _set_manifest(d, man)
    return 1  # the sample before the link is kept


def _unsafe_member(d: Path) -> int:
    _tar_with(d / "shard-000001.tar", [("../evil.png", _png()), ("/abs/evil.png", _png()), ("good.png", _png()),
                                       ("good.cls", b"3")])
    man = _manifest(d)
    man["shards"][1].update(num_samples=3, bytes=None, sha256=None)
    _set_manifest(d, man)
    return 2


DAMAGES = {
    "zero-bytes": (_zero_bytes, "0 samples, manifest 125", "manifest lists 125 samples, 0 readable"),
    "random-bytes": (_random_bytes, "fails its checksum", "fails its checksum"),
    "truncated": (_truncated, "truncated tar", "truncated tar"),
    "count-too-high": (_count_too_high, "125 samples, manifest 200", "manifest lists 200 samples, 125 readable"),
    "link-member": (_link_member, "is a symbolic link", "is a symbolic link"),
    "unsafe-member": (_unsafe_member, "unsafe member names", "unsafe member name"),
}


@pytest.fixture
def damaged(mnist_shards, tmp_path, request):
    damage, verify_msg, stream_msg = DAMAGES[request.param]
    d = _copy(mnist_shards["test"], tmp_path / "shards")
    shutil.copy(d / "shard-000001.tar", tmp_path / "src-001.tar")
    return d, damage(d), verify_msg, stream_msg


def _epoch_keys(dm) -> list[str]:
    return [k for b in dm.train_dataloader() for k in b["key"]]


@pytest.mark.parametrize("damaged", list(DAMAGES), indirect=True)
def test_damaged_shard_is_named_counted_and_never_silent(damaged, capfd, request):
    d, missing, verify_msg, stream_msg = damaged
    r = _cli("data", "verify", str(d))
    assert r.returncode == 1, r.stdout + r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("shard-000001.tar"))
    assert verify_msg in row and "do not match the manifest" in r.stderr
    assert all(line.endswith("ok") for line in r.stdout.splitlines() if line.startswith("shard-00000")
               and not line.startswith("shard-000001"))

    kw = dict(batch_size=25, num_workers=0, shuffle_buffer=50, seed=0)
    if request.node.callspec.params["damaged"] != "count-too-high":  # (only the manifest changed there)
        with pytest.raises(ShardChangedError, match="1 of 4 local shard.*shard-000001.tar: "):
            ShardDataModule(str(d), **kw).train_dataloader()  # the default shard_check: strict, at start-up
    kw["shard_check"] = "warn"  # the reading path below: what a run that accepts a changed shard meets
    with pytest.raises(BadDataError, match=f"shard-000001.tar.*{stream_msg}|{stream_msg}.*shard-000001.tar|"
                                           f"in shards .*shard-000001.tar.*{stream_msg}"):
        _epoch_keys(ShardDataModule(str(d), max_bad_fraction=0.0, **kw))

    dm = ShardDataModule(str(d), max_bad_fraction=1.0, **kw)
    keys = _epoch_keys(dm)
    assert dm.bad_samples == missing
    assert "bad samples skipped" in capfd.readouterr().err  # the epoch-end summary line
    intact = {k for i in (0, 2, 3) for k in _shard_keys(d / f"shard-{i:06d}.tar")}
    planned = sum(s["num_samples"] for s in _manifest(d)["shards"])
    # nothing readable is lost (but for the epoch's floor to whole batches, as with any data)
    assert len(intact - set(keys)) <= planned % kw["batch_size"]


def _shard_keys(path: Path) -> list[str]:
    with tarfile.open(path) as t:
        return sorted({m.name.split(".")[0] for m in t.getmembers()})


def test_truncated_shard_resume_gets_past_it(mnist_shards, tmp_path):
    d = _copy(mnist_shards["test"], tmp_path / "shards")
    f = d / "shard-000001.tar"
    f.write_bytes(f.read_bytes()[:200_000])
    kw = dict(batch_size=25, num_workers=2, shuffle_buffer=50, seed=0, max_bad_fraction=1.0, shard_check="warn")
    full = [b["key"] for b in ShardDataModule(str(d), **kw).train_dataloader()]
    for k in (3, 7):  # resume from a point before and after the slot reaches the cut
        dm = ShardDataModule(str(d), **kw)
        dm.load_state_dict({"epoch": 0, "consumed": k})
        assert [b["key"] for b in dm.train_dataloader()] == full[k:]


@pytest.mark.parametrize("name", ["../x.tar", "/etc/passwd", "sub/../../x.tar"])
def test_unsafe_manifest_shard_names_are_refused(mnist_shards, tmp_path, name):
    d = _copy(mnist_shards["test"], tmp_path / "shards")
    man = _manifest(d)
    man["shards"][0]["name"] = name
    _set_manifest(d, man)
    with pytest.raises(ValueError, match=f"shard name {name!r} is refused"):
        ShardDataModule(str(d), batch_size=25, num_workers=0).train_dataloader()
    r = _cli("data", "verify", str(d))
    assert r.returncode == 2 and "is refused" in r.stderr and "Traceback" not in r.stderr


def test_start_up_size_check_and_worker_count_note(mnist_shards, tmp_path, capfd):
    d = _copy(mnist_shards["test"], tmp_path / "shards")  # 4 shards
    f = d / "shard-000002.tar"
    size = f.stat().st_size
    f.write_bytes(f.read_bytes() + bytes(10240))  # still a whole tar, but not the manifest's file
    dm = ShardDataModule(str(d), batch_size=25, num_workers=6, shard_check="warn")
    loader = dm.train_dataloader()
    err = capfd.readouterr().err
    assert "training anyway (shard_check: warn)" in err
    assert f"shard-000002.tar: {size + 10240} bytes, the manifest says {size}" in err
    assert "data verify" in err
    assert "using num_workers=4" in err and loader.num_workers == 4  # not "need at least 6 shards"
    keys = [k for b in loader for k in b["key"]]
    assert len(set(keys)) == 500 and dm.bad_samples == 0


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_16bit_png_and_rgba_are_converted_correctly(tmp_path):
    from ldm_lightning.data.shardwriter import ShardWriter

    g16 = (np.arange(28 * 28).reshape(28, 28) * 80).astype(np.uint16)  # spans 0..62640
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent black
    rgba[:14, :, :] = (200, 100, 0, 255)  # opaque top half
    d = tmp_path / "shards"
    d.mkdir()
    with ShardWriter(d / "shard-000000.tar") as w:
        w.add("g16", {"png": _png_bytes(Image.fromarray(g16)), "cls": b"0"})
        w.add("rgba", {"png": _png_bytes(Image.fromarray(rgba, "RGBA")), "cls": b"1"})
    _set_manifest(d, {"shards": [w.record]})
    assert Image.open(io.BytesIO(_png_bytes(Image.fromarray(g16)))).mode.startswith("I")

    def batch(**kw):
        dm = ShardDataModule(str(d), batch_size=2, num_workers=0, shuffle_buffer=1, **kw)
        b = next(iter(dm.train_dataloader()))
        return dict(zip(b["key"], b["image"]))  # uint8 (C, H, W) per key

    gray = batch(image_size=28, channels=1)
    want = np.rint(g16 / 257.0).astype(np.uint8)
    assert np.abs(gray["g16"][0].numpy().astype(int) - want).max() <= 1
    assert abs(float(gray["g16"].float().mean()) - float(want.mean())) < 1  # not saturated near 255

    rgb = batch(image_size=28, channels=3)["rgba"].numpy()  # (3, 28, 28)
    assert (rgb[:, 14:] == 255).all()  # transparent → white by default
    assert tuple(rgb[:, 0, 0]) == (200, 100, 0)
    black = batch(image_size=28, channels=3, alpha_background=0)["rgba"].numpy()
    assert (black[:, 14:] == 0).all()
    with pytest.raises(ValueError, match="alpha_background"):
        ShardDataModule(str(d), alpha_background=300)


def test_pack_does_not_follow_links_out_of_the_source(tmp_path):
    src, outside = tmp_path / "photos", tmp_path / "secret"
    src.mkdir()
    outside.mkdir()
    (outside / "passwords.txt").write_text("hunter2")
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(outside / "private.png")
    Image.fromarray(np.full((16, 16, 3), 30, np.uint8)).save(src / "a.png")
    (src / "a.txt").symlink_to(outside / "passwords.txt")  # a caption that is a link out
    (src / "b.png").symlink_to(outside / "private.png")  # an image that is a link out
    (src / "linked").symlink_to(outside, target_is_directory=True)  # a folder link out
    r = _cli("data", "pack", "--source", str(src), "--out", str(tmp_path / "out"), "--no-progress")
    assert r.returncode == 0, r.stderr
    man = _manifest(tmp_path / "out")
    assert man["num_samples"] == 1
    reasons = " | ".join(f"{s['source']}: {s['reason']}" for s in man["skipped"])
    for name in ("a.txt", "b.png", "linked"):
        assert f"{name}: " in reasons and "outside --source" in reasons
    assert "outside --source" in r.stdout  # printed, not only in the manifest
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as t:
        assert not any(m.name.endswith(".txt") for m in t.getmembers())
    r = _cli("data", "pack", "--source", str(src), "--out", str(tmp_path / "out2"), "--no-progress",
             "--follow-external-links")
    assert r.returncode == 0 and _manifest(tmp_path / "out2")["num_samples"] == 3


@pytest.mark.slow
def test_encode_refuses_unsafe_names_keeps_readable_part_and_never_exits_0_on_nothing(mnist_shards, tiny_ae,
                                                                                    tmp_path):
    d = _copy(mnist_shards["test"], tmp_path / "shards")
    kept = _unsafe_member(d)  # shard-000001: '../evil', '/abs/evil' and one good sample
    f = d / "shard-000002.tar"
    f.write_bytes(f.read_bytes()[:200_000])  # truncated input shard
    r = _cli("data", "encode", "--autoencoder", tiny_ae, "--shards", str(d), "--out", str(tmp_path / "lat"),
             "--batch-size", "50", "--device", "cpu", timeout=240)
    assert r.returncode == 0, r.stderr
    man = _manifest(tmp_path / "lat")
    reasons = [s["reason"] for s in man["skipped"]]
    assert sum("unsafe sample key" in x for x in reasons) == kept
    assert any("unreadable after this point" in x and "truncated tar" in x for x in reasons)
    assert "skipped" in r.stdout and "truncated tar" in r.stderr
    for s in man["shards"]:
        with tarfile.open(tmp_path / "lat" / s["name"]) as t:
            names = t.getnames()
        assert not any(n.startswith("/") or ".." in n.split("/") for n in names)
        assert len({n.split(".")[0] for n in names}) == s["num_samples"]
    assert man["shards"][1]["num_samples"] == 1  # the good sample of the hostile shard
    assert 125 * 2 < man["num_samples"] < 125 * 3 + 1  # shards 0, 3 whole, 2 up to its cut, 1's good one
    # every sample skipped (28 px images, pad to 16): a non-zero exit that says why, not "encoded 0 samples"
    r = _cli("data", "encode", "--autoencoder", tiny_ae, "--shards", mnist_shards["test"], "--out",
             str(tmp_path / "none"), "--image-size", "16", "--device", "cpu", timeout=240)
    assert r.returncode == 1 and "every sample was skipped" in r.stderr and "larger than image_size" in r.stdout


@pytest.mark.slow
def test_fit_on_a_zero_byte_shard_fails_naming_it(mnist_shards, tmp_path):
    d = _copy(mnist_shards["test"], tmp_path / "shards")
    for i in (1, 2, 3):  # three of four: the run meets one within its first steps, whatever the shard order
        (d / f"shard-{i:06d}.tar").write_bytes(b"")
    r = _cli("fit", "-c", "configs/autoencoder/tiny-mnist.yaml", "-c", "configs/trainer/cpu-debug.yaml",
             "--data.init_args.train_shards", str(d), "--data.init_args.val_shards", "null",
             "--data.init_args.num_workers", "0", "--data.init_args.shard_check", "warn", "--trainer.max_steps", "8",
             "--trainer.default_root_dir", str(tmp_path / "run"), timeout=300)
    assert r.returncode != 0
    assert "shard-000003.tar: 0 bytes, but the manifest lists 125 samples" in r.stderr  # at start-up
    assert re.search(r"too many bad samples.*in shards \S*shard-00000[123].tar", r.stderr), r.stderr[-3000:]
    assert r.returncode == 2 and "Traceback" not in r.stderr  # one paragraph, as for any user error


def test_pack_resize_scales_16bit_and_keeps_alpha_for_the_loader(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    g16 = np.full((40, 40), 30000, np.uint16)  # 30000 / 257 → 117, not clipped to 255
    Image.fromarray(g16).save(src / "gray16.png")
    rgba = np.zeros((40, 40, 4), np.uint8)  # fully transparent
    Image.fromarray(rgba, "RGBA").save(src / "clear.png")
    r = _cli("data", "pack", "--source", str(src), "--out", str(tmp_path / "out"), "--size", "16", "--no-progress")
    assert r.returncode == 0, r.stderr
    dm = ShardDataModule(str(tmp_path / "out"), batch_size=2, num_workers=0, image_size=16, shuffle_buffer=1)
    b = next(iter(dm.train_dataloader()))
    px = dict(zip(b["key"], b["image"]))  # uint8 (1, 16, 16)
    assert abs(float(px["gray16_png"].float().mean()) - 117) <= 1
    assert (px["clear_png"] == 255).all()  # transparent → the white background, not black
