"""Aspect-ratio bucketing (issue 16): bucket sets and assignment, the exact and resumable bucketed epoch, the
same bucket on every rank at each step, and `ldm-lightning fit` with the shipped bucketing config under
2-process DDP (gloo). Shards are JPEG crops of real photos (`skimage.data`) at six aspect ratios, written with
the project's ShardWriter (so a manifest exists; reading foreign layouts is tested in test_data_foreign.py)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_lightning.data import ShardDataModule
from ldm_lightning.data.buckets import BucketConfig, Buckets, bucket_sizes
from ldm_lightning.data.shard_check import shard_stamp
from ldm_lightning.data.shards import ShardSpecError
from ldm_lightning.data.shardwriter import ShardWriter

REPO = Path(__file__).resolve().parents[1]
ASPECTS = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)  # w / h of the crops; sample i of shard s has ASPECTS[(i + s) % 6]
TINY = {"target_pixels": 1024, "divisor": 8, "max_aspect": 3.0}  # buckets 48x16 40x24 32x32 24x40 16x48 (H x W)


def group_counts_uncached(stream, group: int) -> list[int]:
    """A bucket stream's group counts the long way, from every record of its slot (compared with the sum of its
    shards' cached `_tally` rows); a test oracle, so it lives here rather than on the shipped class."""
    counts = [0] * (len(stream.buckets) + 2)
    for recs in stream._slot_records(0, group):
        for rec in recs:
            counts[stream._bucket(rec)] += 1
    return counts


def _photos() -> list[np.ndarray]:
    from skimage import data as skd
    return [np.asarray(f()) for f in (skd.astronaut, skd.coffee, skd.chelsea, skd.rocket, skd.immunohistochemistry)]


def write_shards(out: Path, shards: int = 4, per: int = 24, seed: int = 0) -> str:
    """`shards` JPEG shards of `per` real-photo crops (40–79 px high) at the six ASPECTS, with manifest.json."""
    rng, photos, records = np.random.default_rng(seed), _photos(), []
    out.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with ShardWriter(out / f"shard-{s:06d}.tar") as w:
            for i in range(per):
                p = photos[(7 * i + s) % len(photos)]
                h = int(rng.integers(40, 80))
                wd = max(8, round(h * ASPECTS[(i + s) % len(ASPECTS)]))
                y, x = int(rng.integers(0, p.shape[0] - h + 1)), int(rng.integers(0, p.shape[1] - wd + 1))
                buf = io.BytesIO()
                Image.fromarray(p[y:y + h, x:x + wd]).save(buf, "JPEG", quality=90)
                w.add(f"s{s}-{i:04d}", {"jpg": buf.getvalue(), "cls": str(i % 10).encode()})
        records.append(w.record)
    (out / "manifest.json").write_text(json.dumps({"num_samples": sum(r["num_samples"] for r in records),
                                                   "shards": records}))
    return str(out)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("buckets") / "train")


def _dm(shards: str, rank: int = 0, world: int = 2, workers: int = 2, batch_size: int = 4, **kw) -> ShardDataModule:
    return ShardDataModule(shards, batch_size=batch_size, num_workers=workers, channels=3, image_size=32,
                           resize_mode="random_crop", random_flip=True, shuffle_buffer=8,
                           bucketing=kw.pop("bucketing", TINY), rank=rank, world_size=world, **kw)


def _epoch(dm: ShardDataModule) -> list[dict]:
    return [{"key": list(b["key"]), "image": b["image"].clone(), "crop": b["crop_top_left"].clone()}
            for b in dm.train_dataloader()]


def test_bucket_set_and_nearest_aspect_assignment():
    for cfg in (BucketConfig(**TINY), BucketConfig(1024 ** 2, 64, 2.0), BucketConfig(256 ** 2, 32, 2.0)):
        sizes = bucket_sizes(cfg)
        assert (cfg.target_pixels ** 0.5 // cfg.divisor * cfg.divisor,) * 2 in sizes  # the square
        for h, w in sizes:
            assert h % cfg.divisor == 0 and w % cfg.divisor == 0 and h * w <= cfg.target_pixels
            assert max(h / w, w / h) <= cfg.max_aspect and (w, h) in sizes  # mirrored
    assert bucket_sizes(BucketConfig(**TINY)) == [(48, 16), (40, 24), (32, 32), (24, 40), (16, 48)]
    assert (1024, 1024) in bucket_sizes(BucketConfig(1024 ** 2, 64, 2.0))  # SDXL's set includes 832x1216 too
    assert (832, 1216) in bucket_sizes(BucketConfig(1024 ** 2, 64, 2.0))
    b = Buckets(BucketConfig(**TINY), 3, random_crop=False, flip=False)
    # nearest on a log scale: 2:1 goes to 24x40 (log distance 0.18) rather than 16x48 (0.41)
    assert [b.sizes[b.nearest(w, 100)] for w in (30, 50, 75, 100, 150, 200, 300, 900)] == \
        [(48, 16), (40, 24), (40, 24), (32, 32), (24, 40), (24, 40), (16, 48), (16, 48)]
    w, h = (a.ravel() for a in np.meshgrid(np.arange(1, 121), np.arange(1, 121)))  # every size up to 120²
    assert b.nearest_many(w, h).tolist() == [b.nearest(x, y) for x, y in zip(w.tolist(), h.tolist())]
    # a real photo: decoded from its header's bucket, scaled to cover, center-cropped; crop geometry returned
    photo = _photos()[0][:100, :300]  # 100 x 300 (aspect 3)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "PNG")
    k = b.of_payload("png", buf.getvalue())
    assert b.sizes[k] == (16, 48)
    out = np.zeros((3, 16, 48), np.uint8)
    assert b.decode_into(buf.getvalue(), "png", out, None) == (100, 300, 0, 0)  # 16/100 = 48/300: no crop
    ref = np.asarray(Image.fromarray(photo).resize((48, 16), Image.BICUBIC)).transpose(2, 0, 1)
    assert np.array_equal(out, ref)
    with pytest.raises(ValueError, match="data.bucketing.max_aspect"):
        BucketConfig.parse({"target_pixels": 1024, "divisor": 8, "max_aspect": 0.5})
    with pytest.raises(ValueError, match="unknown key"):
        BucketConfig.parse({"pixels": 1024})


def test_every_sample_once_same_bucket_on_all_ranks_and_exact_resume(shards):
    """2 ranks × 2 workers: every sample exactly once per epoch (this data fills its buckets evenly), the
    same bucket on both ranks at every step, several buckets used, different order in the next epoch; a
    resume after 5 batches continues with bitwise the same batches (pixels, random crops and flips)."""
    ranks = [_epoch(_dm(shards, r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 12
    shapes = [[tuple(b["image"].shape) for b in rk] for rk in ranks]
    assert shapes[0] == shapes[1]  # step i: one bucket on every rank
    assert len({s[2:] for s in shapes[0]}) >= 3
    keys = [k for rk in ranks for b in rk for k in b["key"]]
    assert len(keys) == len(set(keys)) == 96
    dm = _dm(shards, 0)
    dm.load_state_dict({"epoch": 0, "consumed": 5})
    resumed = _epoch(dm)
    assert len(resumed) == 7
    for a, b in zip(ranks[0][5:], resumed):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["crop"], b["crop"])
    dm = _dm(shards, 0)
    dm.load_state_dict({"epoch": 1, "consumed": 0})
    assert [b["key"] for b in _epoch(dm)] != [b["key"] for b in ranks[0]]  # epoch 1 reshuffles


def test_leftover_samples_are_counted_never_silent(tmp_path, capsys):
    """Uneven buckets: the samples left over in partially filled buckets are printed and counted; the rest is
    read once, and read + left over = all samples. A batch no bucket can fill is refused with the fix."""
    data = write_shards(tmp_path / "uneven", shards=4, per=17, seed=1)
    dm = _dm(data, 0, world=1, workers=2, batch_size=3)
    batches = _epoch(dm)
    stream = dm.train_dataloader().dataset
    err = capsys.readouterr().err
    assert f"{stream.leftover_samples} of 68 samples" in err and "left over" in err
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys)) == 68 - stream.leftover_samples > 0
    assert stream.leftover_samples > 0
    with pytest.raises(ShardSpecError, match="no bucket holds batch_size=9"):
        _dm(data, 0, world=2, workers=2, batch_size=9).train_dataloader()


def test_backbones_and_autoencoder_take_non_square_sizes():
    """A bucket's H != W through the DiT (its sin-cos positions follow the grid), the UNet and an autoencoder."""
    from ldm_lightning.autoencoder import Autoencoder, get_preset
    from ldm_lightning.diffusion.dit import DiT, DiTConfig
    from ldm_lightning.diffusion.unet import UNet, UNetConfig
    from ldm_lightning.nn.embeddings import sincos_2d
    torch.manual_seed(0)
    dit = DiT(DiTConfig(in_channels=4, input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2))
    x = torch.randn(2, 4, 6, 10)  # (B, C, H, W): a 3 x 5 token grid
    assert dit(x, torch.rand(2)).shape == x.shape
    pos = sincos_2d(32, 3, 5).reshape(3, 5, 32)
    assert torch.equal(pos[2, 4], sincos_2d(32, 5, 5).reshape(5, 5, 32)[2, 4])  # a token's position: its (row, col)
    unet = UNet(UNetConfig(in_channels=4, model_channels=32, norm_groups=8))
    assert unet(torch.randn(2, 4, 8, 12), torch.rand(2)).shape == (2, 4, 8, 12)
    ae = Autoencoder(get_preset("tiny-mnist")).eval()
    with torch.no_grad():
        z = ae.encode(torch.rand(1, 1, 32, 48) * 2 - 1).mean  # (1, 4, 8, 12)
        assert z.shape[2:] == (8, 12) and ae.decode(z).shape == (1, 1, 32, 48)


def _split_shards(out: Path) -> tuple[str, int]:
    """4 img2dataset-style shards (jpg/json/cls) with what the header pass must get right: a sample split across
    two tars (its jpg ends shard 0, its json opens shard 1: the manifest's tail_continues_in / head_key), a
    corrupt JPEG (bad), and aspect-3 crops the filter `aspect <= 2.5` leaves out. Returns (folder, left out)."""
    import tarfile
    rng, photos, entries, wide = np.random.default_rng(7), _photos(), [], 0
    out.mkdir(parents=True)

    def member(tar, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    for s, n in enumerate((9, 11, 8, 10)):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tar:
            if s == 1:  # the rest of shard 0's last sample
                member(tar, "split.json", json.dumps({"original_width": 60, "original_height": 40}).encode())
                member(tar, "split.cls", b"1")
            for i in range(n):
                key, a, h = f"{s}{i:04d}", ASPECTS[int(rng.integers(len(ASPECTS)))], int(rng.integers(40, 80))
                wide += a > 2.5
                buf = io.BytesIO()
                Image.fromarray(photos[i % len(photos)][:h, :round(h * a)]).save(buf, "JPEG", quality=90)
                jpg = buf.getvalue()[:200] if (s, i) == (2, 3) else buf.getvalue()  # a truncated JPEG header
                member(tar, f"{key}.jpg", jpg)
                member(tar, f"{key}.json", json.dumps({"original_width": round(h * a), "original_height": h}).encode())
                member(tar, f"{key}.cls", str(i % 10).encode())
            if s == 0:
                buf = io.BytesIO()
                Image.fromarray(photos[0][:40, :60]).save(buf, "JPEG", quality=90)
                member(tar, "split.jpg", buf.getvalue())
        entries.append({"name": f"{s:05d}.tar", "num_samples": n + (s == 0)})
    entries[0]["tail_continues_in"], entries[1]["head_key"] = "00001.tar", "split"
    (out / "manifest.json").write_text(json.dumps({"num_samples": sum(e["num_samples"] for e in entries),
                                                   "shards": entries}))
    return str(out), wide


def _no_tar_reads(monkeypatch) -> None:
    """From here on, opening a shard's tar bytes fails the test; and this process forgets its in-memory entries."""
    from ldm_lightning.data import header_cache, tario

    def refuse(url, exts=None):
        raise AssertionError(f"a tar was read: {url}")
        yield

    monkeypatch.setattr(header_cache, "_MEMO", {})
    monkeypatch.setattr(tario, "iter_blocks", refuse)


def test_header_cache_counts_equal_the_full_pass_and_a_second_start_reads_no_tar(tmp_path, monkeypatch, capsys):
    """`data.bucketing.header_cache`: per-group counts summed from the per-shard cache equal a full pass over the
    group's records (split sample, corrupt JPEG, filtered samples included) for several world sizes; a second
    start (a fresh process's view: in-memory entries dropped) builds the same counts without opening any tar."""
    from ldm_lightning.data import header_cache
    monkeypatch.setattr(header_cache, "_MEMO", {})
    data, wide = _split_shards(tmp_path / "split")
    cfg = {**TINY, "header_cache": "auto"}
    streams = {}
    for world, workers in ((1, 2), (2, 2), (1, 1)):
        st = _dm(data, 0, world=world, workers=workers, batch_size=1, members={"filters": ["aspect <= 2.5"]},
                 bucketing=cfg).train_dataloader().dataset
        assert [list(c) for c in st.counts] == [group_counts_uncached(st, g) for g in range(len(st.groups))]
        streams[world, workers] = st
    total = streams[1, 1].counts.sum(axis=0)
    assert total[-2] == 1 and total[-1] == wide > 0 and total.sum() == 39  # 1 corrupt; the split one kept
    assert "0 of 4 shards from the cache, 4 read" in capsys.readouterr().err  # the first stream read them
    cached = sorted((tmp_path / "split" / ".ldm-bucket-headers").glob("*.json"))
    assert len(cached) == 4
    _no_tar_reads(monkeypatch)
    again = _dm(data, 0, world=2, workers=2, batch_size=1, members={"filters": ["aspect <= 2.5"]},
                bucketing=cfg).train_dataloader().dataset
    assert np.array_equal(again.counts, streams[2, 2].counts)
    assert "4 of 4 shards from the cache, 0 read" in capsys.readouterr().err
    # other member options (no filter) are another entry: read, not taken from the filtered one
    with pytest.raises(AssertionError, match="a tar was read"):
        _dm(data, 0, world=1, workers=2, batch_size=1, bucketing=cfg).train_dataloader()


def test_header_cache_rereads_a_rewritten_shard_and_a_corrupt_entry(shards, tmp_path, monkeypatch, capsys, caplog):
    """A shard rewritten in place (new size and mtime) is read again, the others come from the cache; a
    truncated or malformed cache file is reported with a warning and recomputed, never fatal; null turns the
    cache off."""
    import logging
    import shutil
    from ldm_lightning.data import header_cache
    monkeypatch.setattr(header_cache, "_MEMO", {})
    data = tmp_path / "data"
    shutil.copytree(shards, data, ignore=shutil.ignore_patterns(".ldm-bucket-headers"))
    folder = tmp_path / "hc"
    cfg = {**TINY, "header_cache": str(folder)}
    before = _dm(str(data), 0, world=1, workers=2, bucketing=cfg).train_dataloader().dataset
    assert "0 of 4 shards from the cache, 4 read" in capsys.readouterr().err and len(list(folder.glob("*"))) == 4
    other = write_shards(tmp_path / "other", shards=1, per=13, seed=9)  # shard 2 rewritten with 13 samples
    shutil.copy(Path(other) / "shard-000000.tar", data / "shard-000002.tar")
    man = json.loads((data / "manifest.json").read_text())
    man["shards"][2].update(num_samples=13, **shard_stamp(data / "shard-000002.tar"))
    (data / "manifest.json").write_text(json.dumps(man))
    monkeypatch.setattr(header_cache, "_MEMO", {})
    after = _dm(str(data), 0, world=1, workers=2, bucketing=cfg).train_dataloader().dataset
    assert "3 of 4 shards from the cache, 1 read" in capsys.readouterr().err
    assert [list(c) for c in after.counts] == [group_counts_uncached(after, g) for g in range(2)]
    assert after.counts.sum() == 85 != before.counts.sum()
    entries = sorted(folder.glob("*.json"))
    assert len(entries) == 4  # the rewritten shard's entry was replaced, not added
    entries[0].write_text(entries[0].read_text()[:40])  # truncated
    entries[1].write_text('{"key": 1}')  # not an entry
    monkeypatch.setattr(header_cache, "_MEMO", {})
    with caplog.at_level(logging.WARNING, logger="ldm_lightning.data.header_cache"):
        again = _dm(str(data), 0, world=1, workers=2, bucketing=cfg).train_dataloader().dataset
    assert np.array_equal(again.counts, after.counts)
    assert "2 of 4 shards from the cache, 2 read" in capsys.readouterr().err
    warned = [r.getMessage() for r in caplog.records if "unreadable header-cache file" in r.getMessage()]
    assert len(warned) == 2 and str(entries[0]) in " ".join(warned)
    assert all("key" in json.loads(e.read_text()) for e in entries)  # recomputed and rewritten
    monkeypatch.setattr(header_cache, "_MEMO", {})
    off = _dm(str(data), 0, world=1, workers=2, bucketing={**TINY, "header_cache": None}).train_dataloader().dataset
    assert np.array_equal(off.counts, after.counts) and "header cache off" in capsys.readouterr().err
    assert not (data / ".ldm-bucket-headers").exists()
    tar = data / "shard-000003.tar"  # truncated: its missing samples count as bad, and it is never stored
    tar.write_bytes(tar.read_bytes()[:tar.stat().st_size // 2])
    for _ in range(2):
        monkeypatch.setattr(header_cache, "_MEMO", {})
        cut = _dm(str(data), 0, world=1, workers=2, bucketing=cfg, shard_check="warn").train_dataloader().dataset
        assert "3 of 4 shards from the cache, 1 read" in capsys.readouterr().err
        assert [list(c) for c in cut.counts] == [group_counts_uncached(cut, g) for g in range(2)]
    with pytest.raises(ValueError, match="header_cache must be"):
        BucketConfig.parse({**TINY, "header_cache": 3})


_SHARED_PASS = """
import json, sys
import torch.distributed as dist
from ldm_lightning.data import header_cache
from ldm_lightning.data.bucket_stream import BucketStream
from ldm_lightning.data.buckets import BucketConfig, Buckets
from ldm_lightning.data.shards import resolve_shards
from ldm_lightning.data.transforms import ImageTransform
rank, store, data, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)

def stream(cache):
    buckets = Buckets(BucketConfig(1024, 8, 3.0, header_cache=cache), 3, True, True)
    return BucketStream(resolve_shards(data), 4, num_workers=2, rank=rank, world_size=2, shuffle_buffer=8,
                        transform=ImageTransform(32, 3, "random_crop", True), buckets=buckets)

st = stream(folder + "/ok")
print(json.dumps({"counts": st.counts.tolist(), "mine": st.header_cache.scanned, "all": st.header_scanned}))
header_cache._MEMO.clear()
if rank == 1:
    BucketStream._scan = lambda self, shard: 1 / 0
try:
    stream(folder + "/fail")
except Exception as e:
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
dist.barrier()
dist.destroy_process_group()  # exiting with gloo's threads alive aborted one rank at times ("terminate called...")
"""


@pytest.mark.timeout(300)
def test_split_header_pass_reads_each_shard_on_one_rank_and_a_failure_stops_every_rank(shards, tmp_path):
    """`split_header_pass` under torch.distributed (2 gloo processes): each rank reads the headers of half the
    shards, both get the counts of a single-process pass and the cache holds every shard; a rank whose pass
    fails makes the other one stop with the reason too, instead of waiting in the collective forever."""
    import subprocess
    import sys
    script = tmp_path / "shared_pass.py"
    script.write_text(_SHARED_PASS)
    expect = _dm(shards, 0, world=2, workers=2, bucketing={**TINY, "header_cache": None}).train_dataloader().dataset
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "store"), shards, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    done = [(p.communicate(timeout=200), p.returncode) for p in procs]
    assert [rc for _, rc in done] == [0, 0], "\n".join(err[-3000:] for (_, err), _ in done)
    ok, fail = zip(*([json.loads(line) for line in out.strip().splitlines()[-2:]] for (out, _), _ in done))
    assert [o["counts"] for o in ok] == [expect.counts.tolist()] * 2
    assert [(o["mine"], o["all"]) for o in ok] == [(2, 4), (2, 4)]  # each rank read 2 of the 4 shards
    assert len(list((tmp_path / "ok").glob("*.json"))) == 4
    assert fail[1]["error"].startswith("ZeroDivisionError")
    assert fail[0]["error"].startswith("RuntimeError: data.bucketing: the shared header pass failed on rank 1: "
                                       "ZeroDivisionError")


def _fit_args(shards: str, root: Path, probe: Path) -> list[str]:
    return ["fit", "-c", str(REPO / "configs/diffusion/mnist-jit-pixels.yaml"),
            "-c", str(REPO / "configs/trainer/cpu-debug.yaml"),
            "-c", str(REPO / "configs/data/folder-buckets-256.yaml"),
            "--data.init_args.train_shards", shards, "--data.init_args.val_shards", shards,
            "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "1",
            "--data.init_args.image_size", "32", "--data.init_args.channels", "1", "--data.init_args.val_samples", "8",
            "--data.init_args.bucketing", json.dumps({**TINY, "header_cache": str(root / "headers")}),
            "--data.init_args.shuffle_buffer", "8",
            "--model.init_args.val_num", "2", "--model.init_args.val_steps", "2",
            "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.default_root_dir", str(root),
            "--trainer.callbacks+=batch_probe.BatchProbe", "--trainer.callbacks.out", str(probe)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cli_fit_bucketed_ddp_every_sample_once_and_resume_exact(shards, tmp_path):
    """`ldm-lightning fit` with the shipped bucketing data config (tiny overrides) on 2 DDP ranks: 5 steps,
    then a resume (`--ckpt_path last`) to step 12, the epoch's end. Both ranks take the same bucket at every step,
    the stitched epoch reads every sample once, and each rank's batches are exactly the ones the
    uninterrupted stream (rebuilt here in-process) gives: resume mid-epoch is exact. The header pass is paid
    once: the resumed run takes every shard's image sizes from `data.bucketing.header_cache`."""
    from scale_run import run_cli
    probe = tmp_path / "probe"
    args = _fit_args(shards, tmp_path / "run", probe)
    first = run_cli([*args, "--trainer.max_steps", "5"], tmp_path, timeout=280)
    assert "data: bucketing: 5 buckets" in first.stderr and "0 of 96 samples" in first.stderr
    assert "header cache: 0 of 4 shards from the cache, 4 read (image headers only, split over 2 ranks)" in first.stderr
    second = run_cli([*args, "--trainer.max_steps", "12", "--ckpt_path", "last"], tmp_path, timeout=280)  # 1 epoch
    assert "header cache: 4 of 4 shards from the cache, 0 read" in second.stderr, second.stderr[-3000:]
    logs = [[json.loads(line) for line in (probe / f"batches-rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [[b["step"] for b in rk] for rk in logs] == [list(range(12))] * 2
    assert [b["shape"][2:] for b in logs[0]] == [b["shape"][2:] for b in logs[1]]
    keys = [k for rk in logs for b in rk for k in b["keys"]]
    assert len(keys) == len(set(keys)) == 96
    for r in (0, 1):
        dm = ShardDataModule(shards, batch_size=4, num_workers=1, channels=1, image_size=32, resize_mode="random_crop",
                             random_flip=True, shuffle_buffer=8, bucketing=TINY, rank=r, world_size=2)
        expect = [(list(b["key"]), list(b["image"].shape)) for b in dm.train_dataloader()]
        assert [(b["keys"], b["shape"]) for b in logs[r]] == expect
    assert math.prod(logs[0][0]["shape"][2:]) <= TINY["target_pixels"]


def test_jpeg_decoder_torchvision_gives_the_pil_pixels(shards):
    """`data.jpeg_decoder`: torchvision (the default) and PIL give identical batches and crop geometry: on JPEGs
    already at the crop size (the torchvision fast path), on ones that need a resize, a grayscale JPEG (PIL
    decodes it) and a truncated one (a bad sample for both)."""
    from ldm_lightning.data.transforms import BadSample, ImageTransform
    photo = _photos()[0]
    cases = []
    for (h, w), fmt_mode in (((48, 64), "RGB"), ((64, 48), "RGB"), ((48, 48), "RGB"), ((90, 70), "RGB"),
                             ((48, 60), "L")):
        buf = io.BytesIO()
        Image.fromarray(photo[:h, 100:100 + w]).convert(fmt_mode).save(buf, "JPEG", quality=85)
        cases.append(buf.getvalue())
    for mode in ("center_crop", "random_crop", "pad", "resize"):
        size = 96 if mode == "pad" else 48
        tv, pil = (ImageTransform(size, 3, mode, True, jpeg_decoder=d) for d in ("torchvision", "pil"))
        for data in cases:
            a, b = np.zeros((3, size, size), np.uint8), np.ones((3, size, size), np.uint8)
            ca = tv.decode_into(data, "jpg", a, np.random.default_rng(5))
            cb = pil.decode_into(data, "jpg", b, np.random.default_rng(5))
            assert ca == cb and np.array_equal(a, b), (mode, len(data))
    for t in (tv, pil):
        with pytest.raises(BadSample):
            t.decode_into(cases[0][:len(cases[0]) // 2], "jpg", np.zeros((3, 96, 96), np.uint8), None)
    runs = [[(b["key"], b["image"]) for b in ShardDataModule(
        shards, batch_size=8, num_workers=0, channels=3, image_size=40, resize_mode="random_crop", random_flip=True,
        jpeg_decoder=d, rank=0, world_size=1).train_dataloader()] for d in ("torchvision", "pil")]
    assert all(ka == kb and torch.equal(ia, ib) for (ka, ia), (kb, ib) in zip(*runs)) and len(runs[0]) == 12


def test_bucketing_on_img2dataset_shards_with_a_filter(tmp_path, capsys):
    """img2dataset layout read in place (no manifest: counts from `_stats.json`, a gap in the numbering, uneven
    shards; jpg/txt/json members) with a json filter: on 2 ranks, the same bucket per step, no sample twice,
    filtered samples never batched, and read + left over + filtered = every sample."""
    import tarfile
    rng, photos, keys, meta = np.random.default_rng(3), _photos(), [], {}
    root = tmp_path / "i2d"
    root.mkdir()
    for shard, n in (("00000", 10), ("00001", 7), ("00003", 12), ("00004", 9)):
        with tarfile.open(root / f"{shard}.tar", "w") as tar:
            for i in range(n):
                key, a = f"{shard}{i:04d}", ASPECTS[int(rng.integers(len(ASPECTS)))]
                h = int(rng.integers(40, 80))
                w = round(h * a)
                buf = io.BytesIO()
                Image.fromarray(photos[i % len(photos)][:h, :w]).save(buf, "JPEG", quality=90)
                meta[key] = {"original_width": w, "original_height": h, "caption": f"photo {key}"}
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"photo {key}".encode()),
                                  ("json", json.dumps(meta[key]).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                keys.append(key)
        (root / f"{shard}_stats.json").write_text(json.dumps({"successes": n}))
    kept = {k for k in keys if meta[k]["original_width"] / meta[k]["original_height"] <= 2.5}
    runs = []
    for r in (0, 1):
        dm = _dm(str(root), r, world=2, workers=1, batch_size=1, members={"filters": ["aspect <= 2.5"]})
        runs.append(_epoch(dm))
    stream = dm.train_dataloader().dataset
    assert [tuple(b["image"].shape) for b in runs[0]] == [tuple(b["image"].shape) for b in runs[1]]
    seen = [k for rk in runs for b in rk for k in b["key"]]
    assert len(seen) == len(set(seen)) and set(seen) <= kept
    assert len(seen) + stream.leftover_samples == len(kept) and int(stream.counts[:, -1].sum()) == 38 - len(kept) > 0
    assert "left over" in capsys.readouterr().err


def test_global_order_buckets_are_the_same_batches_on_any_topology(shards):
    """data.order: global with buckets (in-process, through ShardDataModule): 1 rank × batch 8, 2 ranks × batch 4
    with 2 workers, and 1 rank × batch 4 × accumulation 2 read the same samples (pixels, random crops and flips
    included) in each optimizer step, every global batch from one bucket; a resume from step 3 on 2 ranks
    continues the 1-rank stream."""
    from types import SimpleNamespace

    def epoch(world, rank, batch, workers, accumulation=1, state=None):
        dm = _dm(shards, rank, world=world, workers=workers, batch_size=batch, order="global",
                 pin_memory=False)
        dm.trainer = SimpleNamespace(accumulate_grad_batches=accumulation, training=False)
        if state:
            dm.load_state_dict(state)
        return _epoch(dm)

    one = epoch(1, 0, 8, 0)
    ranks = [epoch(2, r, 4, 2) for r in (0, 1)]
    accumulated = epoch(1, 0, 4, 1, accumulation=2)
    assert len(one) == len(ranks[0]) == len(ranks[1]) == len(accumulated) // 2 >= 6
    assert len({tuple(b["image"].shape[2:]) for b in one}) >= 3  # several buckets
    for step, b in enumerate(one):
        parts = [ranks[0][step], ranks[1][step]]
        assert b["key"] == parts[0]["key"] + parts[1]["key"]
        assert b["key"] == accumulated[2 * step]["key"] + accumulated[2 * step + 1]["key"]
        assert torch.equal(b["image"], torch.cat([p["image"] for p in parts]))  # one bucket: same (H, W)
        assert torch.equal(b["crop"], torch.cat([p["crop"] for p in parts]))
    keys = [k for b in one for k in b["key"]]
    assert len(keys) == len(set(keys))  # no sample twice in an epoch
    resumed = epoch(2, 1, 4, 2, state={"epoch": 0, "consumed": 3, "samples": 24})
    assert [b["key"] for b in resumed] == [b["key"] for b in ranks[1][3:]]
    assert torch.equal(resumed[0]["image"], ranks[1][3]["image"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cli_fit_global_order_buckets_two_processes_equal_one(shards, tmp_path):
    """`ldm-lightning fit` with the shipped bucketing data config and `--data.init_args.order global`: 2 DDP
    processes × batch 2 read the same bucketed global batches as 1 process × batch 4 and end with the same weights
    after 3 steps (tolerance 1e-5: reduction order only, tests/test_scale_elastic.py)."""
    from scale_run import run_cli

    def fit(root: str, devices: int, batch: int) -> dict:
        run_cli([*_fit_args(shards, tmp_path / root, tmp_path / f"probe-{root}"), "--trainer.devices", str(devices),
                 "--data.init_args.batch_size", str(batch), "--data.init_args.order", "global",
                 "--data.init_args.val_shards", "null", "--trainer.limit_val_batches", "0", "--trainer.logger",
                 "false", "--model.init_args.optim.warmup_steps", "0", "--trainer.max_steps", "3"],
                tmp_path, timeout=280)
        state = torch.load(tmp_path / root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        return {k: v for k, v in state["state_dict"].items() if v.is_floating_point()}

    two, one = fit("two", 2, 2), fit("one", 1, 4)
    logs = {n: [[json.loads(line) for line in (tmp_path / f"probe-{n}" / f"batches-rank{r}.jsonl").read_text()
                 .splitlines()] for r in range(k)] for n, k in (("two", 2), ("one", 1))}
    for step, b in enumerate(logs["one"][0]):
        assert b["keys"] == logs["two"][0][step]["keys"] + logs["two"][1][step]["keys"]
        assert b["shape"][2:] == logs["two"][0][step]["shape"][2:] == logs["two"][1][step]["shape"][2:]
    assert max(float((two[k] - one[k]).abs().max()) for k in one) < 1e-5
