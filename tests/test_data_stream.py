"""ShardDataModule on real MNIST shards: rank/worker split, determinism, exact resume, bad samples."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from ldm_lightning.data import ShardDataModule
from ldm_lightning.data.shard_check import shard_stamp
from ldm_lightning.data.shardwriter import sha256_file


def _dm(shards, **kw) -> ShardDataModule:
    args = dict(batch_size=50, num_workers=2, shuffle_buffer=100, seed=0)
    args.update(kw)
    return ShardDataModule(shards, **args)


def _epoch(dm, n: int | None = None) -> list[dict]:
    out = []
    for b in dm.train_dataloader():
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


@pytest.mark.parametrize("on_device", [True, False], ids=["uint8-workers", "float-workers"])
def test_batches_follow_contract(mnist_shards, on_device):
    dm = _dm(mnist_shards["train"], num_workers=0, channels=3, loader={"normalize_on_device": on_device})
    b = _epoch(dm, 1)[0]
    assert set(b) == {"image", "cls", "txt", "key"}
    assert b["image"].dtype == (torch.uint8 if on_device else torch.float32)
    b = dm.on_after_batch_transfer(b, 0)  # what a Trainer does after moving the batch to the device
    assert b["image"].dtype == torch.float32 and b["image"].shape == (50, 3, 32, 32)
    assert b["image"].min() == -1 and b["image"].max() == 1
    assert (b["image"][:, :, :2] == -1).all() and (b["image"][:, :, :, -2:] == -1).all()  # 2-px pad border
    assert torch.equal(b["image"][:, 0], b["image"][:, 2])  # gray replicated to RGB
    assert b["cls"].dtype == torch.int64 and len(b["txt"]) == len(b["key"]) == 50
    assert b["txt"][0].startswith("a handwritten digit ")


def test_two_ranks_two_workers_cover_epoch_once(mnist_shards):
    per_rank = {}
    for rank in (0, 1):
        dm = _dm(mnist_shards["train"], rank=rank, world_size=2)
        loader = dm.train_dataloader()
        assert len(loader) == 20  # 8 shards × 250 → 4 slots × 500 → 10 batches of 50 per worker
        per_rank[rank] = [_epoch(dm) for _ in range(2)]  # epochs 0 and 1
        assert [len(e) for e in per_rank[rank]] == [20, 20]
    for epoch in (0, 1):
        keys = _keys(per_rank[0][epoch]) + _keys(per_rank[1][epoch])
        assert len(keys) == 2000 and len(set(keys)) == 2000  # every sample exactly once
    assert _keys(per_rank[0][0]) != _keys(per_rank[0][1])  # a new order every epoch
    again = _epoch(_dm(mnist_shards["train"], rank=0, world_size=2))
    assert _keys(again) == _keys(per_rank[0][0])  # same seed → same stream
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(again, per_rank[0][0]))
    other = _epoch(_dm(mnist_shards["train"], rank=0, world_size=2, seed=1))
    assert _keys(other) != _keys(per_rank[0][0])


def test_uneven_shards_equal_batches_per_rank(tmp_path, mnist_shards):
    from ldm_lightning.data import pack

    assert pack.main(["--source", "mnist", "--out", str(tmp_path), "--limit", "1130", "--samples-per-shard", "200",
                      "--no-progress"]) == 0  # 5 × 200 + 130
    lens, keys = [], []
    for rank in (0, 1):
        dm = _dm(str(tmp_path), rank=rank, world_size=2, batch_size=32)
        batches = _epoch(dm)
        lens.append((len(dm.train_dataloader()), len(batches)))
        keys += _keys(batches)
    assert lens[0] == lens[1] and lens[0][0] == lens[0][1]
    assert len(keys) == len(set(keys))  # at most once per epoch


@pytest.mark.parametrize("k", [0, 3, 4, 7])
def test_exact_resume_mid_epoch(mnist_shards, k):
    kw = dict(resize_mode="random_crop", image_size=24, random_flip=True, rank=1, world_size=2)
    full = _epoch(_dm(mnist_shards["train"], **kw))
    dm = _dm(mnist_shards["train"], **kw)
    assert len(_epoch(dm, k)) == k if k else True
    state = dm.state_dict()
    assert state["epoch"] == 0 and state["consumed"] == k
    fresh = _dm(mnist_shards["train"], **kw)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["consumed"] == k
    rest = _epoch(fresh)
    assert _keys(rest) == _keys(full[k:])
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(rest, full[k:]))
    assert fresh.state_dict() == {"epoch": 0, "consumed": len(full), "bad_samples": 0}
    nxt = _epoch(fresh)  # the following epoch continues as an uninterrupted run's second epoch would
    dm2 = _dm(mnist_shards["train"], **kw)
    _epoch(dm2)
    assert _keys(nxt) == _keys(_epoch(dm2))


def test_resume_in_second_epoch(mnist_shards):
    dm = _dm(mnist_shards["train"], num_workers=2)
    _epoch(dm)
    second = _epoch(dm)
    dm = _dm(mnist_shards["train"], num_workers=2)
    dm.load_state_dict({"epoch": 1, "consumed": 5})
    assert _keys(_epoch(dm)) == _keys(second[5:])


def test_validation_fixed_subset_split_over_ranks(mnist_shards):
    keys = []
    for rank in (0, 1):
        dm = ShardDataModule(mnist_shards["train"], mnist_shards["test"], batch_size=32, val_samples=101,
                             rank=rank, world_size=2)
        batches = list(dm.val_dataloader())
        assert len(dm.val_dataloader()) == len(batches) == 2  # 50 per rank (101 → 100 for an even split)
        keys.append(_keys(batches))
        assert _keys(list(dm.val_dataloader())) == keys[-1]  # identical every time
    assert sorted(keys[0] + keys[1]) == [f"mnist-test-{i:06d}" for i in range(100)]


def test_too_few_shards_for_slots(mnist_shards, capfd):
    # more workers than shards per rank: as many workers as there are shards, with a note
    loader = _dm(mnist_shards["test"], rank=0, world_size=2, num_workers=5).train_dataloader()
    assert loader.num_workers == 2 and "using num_workers=2" in capfd.readouterr().err
    with pytest.raises(ValueError, match=r"need at least 5 shards.*--samples-per-shard"):  # fewer shards than ranks
        _dm(mnist_shards["test"], rank=0, world_size=5, num_workers=1).train_dataloader()


@pytest.mark.parametrize("arg,value,allowed", [("resize_mode", "stretch", "pad | resize"), ("channels", 2, "1 or 3"),
                                               ("kind", "video", "image | latent"), ("batch_size", 0, ">= 1")])
def test_bad_config_names_the_field(arg, value, allowed):
    with pytest.raises(ValueError, match=f"data.{arg} must be {allowed}"):
        ShardDataModule("x", **{arg: value})


def _corrupt_copy(src: Path, dst: Path) -> list[str]:
    """Copy the shards; in shard 0 one png becomes garbage and one sample loses its png. Returns their keys."""
    dst.mkdir()
    man = json.loads((src / "manifest.json").read_text())
    broken = []
    for s in man["shards"]:
        with tarfile.open(src / s["name"]) as tin, tarfile.open(dst / s["name"], "w") as tout:
            for m in tin.getmembers():
                data = tin.extractfile(m).read()
                key, ext = m.name.split(".", 1)
                if s["name"] == "shard-000000.tar" and ext == "png" and key.endswith(("000010", "000020")):
                    broken.append(key)
                    if key.endswith("000020"):
                        continue  # missing image member
                    data = b"\x89PNG garbage" * 10
                m.size = len(data)
                tout.addfile(m, io.BytesIO(data))
        s.update(shard_stamp(dst / s["name"]), sha256=sha256_file(dst / s["name"]))
    (dst / "manifest.json").write_text(json.dumps(man))
    return broken


def test_corrupt_samples_skipped_and_counted(mnist_shards, tmp_path):
    bad_dir = tmp_path / "bad"
    broken = _corrupt_copy(Path(mnist_shards["test"]), bad_dir)
    dm = _dm(str(bad_dir), batch_size=25, num_workers=2)
    batches = _epoch(dm)
    assert len(batches) == len(dm.train_dataloader()) == 20  # 2 slots × 250 → full batches despite the skips
    keys = _keys(batches)
    assert dm.bad_samples == 2 and not set(broken) & set(keys)
    # the slot with the 2 bad samples wrapped around to 2 of its own first samples to fill its last batch
    assert len(keys) == 500 and len(set(keys)) == 498
    strict = _dm(str(bad_dir), batch_size=25, num_workers=0, max_bad_fraction=0.0)
    with pytest.raises(RuntimeError, match=r"too many bad samples.*max_bad_fraction=0.0.*shard-000000.tar.*key .mnist-test-0000[12]0"):
        _epoch(strict)


def test_wrong_size_is_bad_sample(mnist_shards):
    dm = _dm(mnist_shards["test"], image_size=16, resize_mode="pad", num_workers=0, max_bad_fraction=0.0)
    with pytest.raises(RuntimeError, match="larger than image_size=16"):
        _epoch(dm, 1)


def test_all_bad_or_empty_slot_fails_instead_of_spinning(mnist_shards, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(2):  # the manifest promises samples, the shards hold none
        tarfile.open(empty / f"shard-{i:06d}.tar", "w").close()
    (empty / "manifest.json").write_text(json.dumps(
        {"shards": [{"name": f"shard-{i:06d}.tar", "num_samples": 10} for i in range(2)]}))
    # the promised samples count as bad (no silent 0-sample epoch), and the message names the shard
    with pytest.raises(RuntimeError, match=r"too many bad samples.*in shards .*shard-00000[01].tar \(1\).*"
                                           r"manifest lists 10 samples, 0 readable"):
        _epoch(_dm(str(empty), batch_size=5, num_workers=0), 1)
    tiny = _dm(mnist_shards["test"], image_size=16, num_workers=0, max_bad_fraction=1.0)  # every sample too big
    with pytest.raises(RuntimeError, match="has no usable sample"):
        _epoch(tiny, 1)


def test_latent_shards(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    want, shards = {}, []
    for si in range(2):
        name = f"shard-{si:06d}.tar"
        with tarfile.open(tmp_path / name, "w") as tar:
            for i in range(20):
                key = f"lat-{si}-{i:03d}"
                m = rng.standard_normal((8, 4, 4)).astype(np.float32)  # (2c, h, w) with c = 4
                want[key] = m
                for ext, data in (("moments.npy", _npy(m)), ("cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append({"name": name, "num_samples": 20})
    (tmp_path / "manifest.json").write_text(json.dumps({"num_samples": 40, "shards": shards}))
    batches = _epoch(_dm(str(tmp_path), kind="latent", batch_size=10, num_workers=2))
    assert len(batches) == 4 and set(batches[0]) == {"moments", "cls", "txt", "key"}
    for b in batches:
        assert b["moments"].dtype == torch.float32 and b["moments"].shape == (10, 8, 4, 4)
        for key, m in zip(b["key"], b["moments"]):
            assert torch.equal(m, torch.from_numpy(want[key]))
    assert b["txt"] == [""] * 10


def _npy(a) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.mark.parametrize("name", ["mnist", "folder-256", "mnist-latents", "folder-buckets-256"])
def test_shipped_data_configs_are_valid(name):
    import inspect

    import yaml

    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / "data" / f"{name}.yaml").read_text())["data"]
    assert cfg["class_path"] == "ldm_lightning.data.ShardDataModule"
    inspect.signature(ShardDataModule.__init__).bind(None, **cfg["init_args"])
    ShardDataModule(**cfg["init_args"])


def test_resume_skips_without_decoding(mnist_shards, monkeypatch):
    from ldm_lightning.data.transforms import ImageTransform

    calls = []
    real = ImageTransform.decode_into
    monkeypatch.setattr(ImageTransform, "decode_into", lambda self, *a: calls.append(1) or real(self, *a))
    dm = _dm(mnist_shards["train"], num_workers=0)
    dm.load_state_dict({"epoch": 0, "consumed": 30})
    batches = _epoch(dm)
    assert len(batches) == 40 - 30 and len(calls) == 10 * 50  # only the played batches were decoded


def test_to_model_range_is_exact_for_every_pixel_value():
    import numpy as np

    from ldm_lightning.images import to_model_range
    x = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    ref = x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)  # the elementwise definition
    y = to_model_range(x)
    assert y.dtype == torch.float32 and np.array_equal(y.numpy(), ref)
    assert y.flatten()[0] == -1.0 and y.flatten()[-1] == 1.0
    with pytest.raises(TypeError, match="uint8"):
        to_model_range(x.astype(np.float32))
    assert torch.equal(to_model_range(torch.from_numpy(x)), y)  # tensors: the same table


def test_uint8_and_float_workers_give_the_same_model_input(mnist_shards):
    from ldm_lightning.data import ensure_model_range
    a = _epoch(_dm(mnist_shards["train"], loader={"normalize_on_device": True}), 3)
    b = _epoch(_dm(mnist_shards["train"], loader={"normalize_on_device": False}), 3)
    assert all(x["image"].dtype == torch.uint8 for x in a)
    assert all(torch.equal(ensure_model_range(x["image"]), y["image"]) for x, y in zip(a, b))
    assert ensure_model_range(b[0]["image"]) is b[0]["image"]  # float passes through


def test_member_whose_bytes_do_not_match_its_extension_still_decodes():
    import numpy as np
    from PIL import Image

    from ldm_lightning.data.transforms import ImageTransform
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 24), 200, np.uint8)).save(buf, format="JPEG")
    x = ImageTransform(24, 1, "pad", False)({"png": buf.getvalue()}, None)  # JPEG bytes under a .png key
    assert x.shape == (1, 24, 24) and abs(int(x[0, 12, 12]) - 200) <= 2 and x[0, 0, 0] == 0


def test_batch_ring_hands_over_the_same_batches(mnist_shards):
    """Workers decoding into the reused shared-memory ring give exactly the batches of torch's own hand-over,
    and a batch the consumer keeps is never overwritten by later ones (it owns a copy)."""
    for kw in ({}, {"channels": 3, "seed": 5}):
        loader = _dm(mnist_shards["train"], **kw).train_dataloader()
        kept = list(loader) + list(loader)  # two epochs of one loader, as under a Trainer
        assert loader.dataset.ring is not None
        loader = _dm(mnist_shards["train"], loader={"reuse_batch_memory": False}, **kw).train_dataloader()
        want = list(loader) + list(loader)
        assert loader.dataset.ring is None
        assert len(kept) == len(want) == 80
        for a, b in zip(kept, want):
            assert a["key"] == b["key"] and a["txt"] == b["txt"] and torch.equal(a["cls"], b["cls"])
            assert a["image"].dtype == torch.uint8 and torch.equal(a["image"], b["image"])


def test_batch_ring_names_a_too_small_dev_shm(mnist_shards, monkeypatch):
    import os
    import types

    monkeypatch.setattr(os, "statvfs", lambda p: types.SimpleNamespace(f_bavail=16, f_frsize=4096))
    with pytest.raises(RuntimeError, match=r"/dev/shm has 0 MiB free.*--shm-size.*reuse_batch_memory=false"):
        _epoch(_dm(mnist_shards["train"]), 1)


def test_decode_into_writes_all_of_a_reused_buffer():
    import numpy as np
    from PIL import Image

    from ldm_lightning.data.transforms import BadSample, ImageTransform
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 24), 200, np.uint8)).save(buf, format="PNG")
    out = np.full((3, 24, 24), 7, np.uint8)  # what the previous batch left in the slot
    ImageTransform(24, 3, "pad", False).decode_into(buf.getvalue(), "png", out, None)
    assert (out[:, 2:22] == 200).all() and (out[:, :2] == 0).all() and (out[:, 22:] == 0).all()
    before = out.copy()
    with pytest.raises(BadSample, match="undecodable png"):
        ImageTransform(24, 3, "pad", False).decode_into(buf.getvalue()[:30] + b"junk" * 9, "png", out, None)
    assert np.array_equal(out, before)  # a bad sample leaves the slot as it was


def test_unreadable_cls_is_a_bad_sample(mnist_shards, tmp_path):
    src, dst = Path(mnist_shards["test"]), tmp_path / "badcls"
    dst.mkdir()
    man = json.loads((src / "manifest.json").read_text())
    for s in man["shards"]:
        with tarfile.open(src / s["name"]) as tin, tarfile.open(dst / s["name"], "w") as tout:
            for m in tin.getmembers():
                data = tin.extractfile(m).read()
                if m.name.endswith("000030.cls"):
                    data = b"seven"
                m.size = len(data)
                tout.addfile(m, io.BytesIO(data))
    (dst / "manifest.json").write_text(json.dumps(man))
    dm = _dm(str(dst), batch_size=25, num_workers=0)
    full = _epoch(dm)
    keys = _keys(full)
    assert dm.bad_samples == 1 and not any(k.endswith("000030") for k in keys)
    for k in (3, 11):  # resume skips without decoding, and must reject the same sample as the full decode
        resumed = _dm(str(dst), batch_size=25, num_workers=0)
        resumed.load_state_dict({"epoch": 0, "consumed": k})
        assert _keys(_epoch(resumed)) == _keys(full[k:])


def test_batch_ring_survives_an_abandoned_epoch(mnist_shards):
    """An iterator dropped mid-epoch (its workers still alive) must not write into the next epoch's batches."""
    loader = _dm(mnist_shards["train"]).train_dataloader()
    abandoned = iter(loader)
    next(abandoned)  # epoch 0 left after one batch; its workers keep decoding ahead
    got = list(loader)  # epoch 1, while `abandoned` is still referenced
    plain = _dm(mnist_shards["train"], loader={"reuse_batch_memory": False}).train_dataloader()
    list(plain)
    want = list(plain)  # epoch 1
    assert [b["key"] for b in got] == [b["key"] for b in want]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(got, want))
    del abandoned


def test_batch_ring_recycles_dropped_batches_and_never_overwrites_kept_ones(mnist_shards):
    """A consumer that drops each batch after use (a training loop) gets nearly all of them through the ring
    without a copy; batches a consumer keeps stay intact while the ring goes on recycling the others."""
    plain = _dm(mnist_shards["train"], loader={"reuse_batch_memory": False}).train_dataloader()
    want = list(plain)
    loader = _dm(mnist_shards["train"]).train_dataloader()
    assert [int(b["image"].sum()) for b in loader] == [int(b["image"].sum()) for b in want]
    assert loader.dataset.ring.handed_out >= 0.9 * len(want)
    want = list(plain)  # epoch 1
    kept = {}
    for i, b in enumerate(loader):  # epoch 1, keeping every 7th: their buffers stay lent, the others go round
        assert torch.equal(b["image"], want[i]["image"])
        if i % 7 == 0:
            kept[i] = b
    assert all(torch.equal(b["image"], want[i]["image"]) for i, b in kept.items())


@pytest.mark.parametrize("channels", [1, 3])
def test_streamed_pixels_labels_and_captions_equal_the_mnist_source(mnist_shards, channels):
    """End to end through tar index, shuffle, workers and the batch ring: every sample of an epoch is the
    real MNIST image (padded 28 → 32 on black), with its label and caption."""
    from ldm_lightning.data.mnist import caption, load_mnist

    images, labels = load_mnist("train")
    seen = 0
    for b in _dm(mnist_shards["train"], channels=channels).train_dataloader():
        for x, c, t, key in zip(b["image"], b["cls"], b["txt"], b["key"]):
            i = int(key.rsplit("-", 1)[1])
            want = torch.zeros((32, 32), dtype=torch.uint8)
            want[2:30, 2:30] = torch.from_numpy(images[i])
            assert all(torch.equal(x[ch], want) for ch in range(channels)), key
            assert int(c) == labels[i] and t == caption(labels[i])
            seen += 1
    assert seen == 2000
