"""Reading shards users already have (issue 16, reading half): img2dataset and generic WebDataset layouts,
built here from real photos (`skimage.data`, random crops of varied sizes and aspects, JPEG), no manifest.

- `i2d/`: img2dataset layout, `{00000}.tar` with {key}.jpg/.txt/.json, `{00000}_stats.json` (and `.parquet`
  when pyarrow is installed), shard numbers 00000, 00001, 00003, 00004 (a gap), uneven sizes 7/5/4/8.
- `hf/`: generic WebDataset, no counts at all: member aliases (jpeg/caption, webp/text, png + json caption),
  a dotted member name (`hf-dot.hires.jpg`: key `hf-dot`, extension `hires.jpg`) and a sample split
  across the two tars (`hf-q.jpg` ends shard 0, `hf-q.txt` / `hf-q.json` start shard 1).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tar_files import write_tar

from ldm_lightning.data.members import MemberSpec, MemberSpecError
from ldm_lightning.data.shards import ShardSpecError, resolve_shards
from ldm_lightning.data.stream import ShardStream
from ldm_lightning.data.transforms import ImageTransform

REPO = Path(__file__).resolve().parents[1]
I2D_SIZES = {"00000": 7, "00001": 5, "00003": 4, "00004": 8}  # 00002 missing: a gap in the numbering
HF_KEYS = ["hf-a", "hf-b", "hf-dot", "hf-q", "hf-r", "hf-s", "hf-t", "hf-u"]


def _photo_crop(rng: np.random.Generator, photos: list[np.ndarray], fmt: str = "JPEG") -> tuple[bytes, dict]:
    """A random crop (aspect w/h in [0.4, 2.5]) of a real photo, shrunk to a longer side of 24–64 px."""
    p = photos[int(rng.integers(len(photos)))]
    H, W = p.shape[:2]
    aspect = float(np.exp(rng.uniform(np.log(0.4), np.log(2.5))))
    hmax = min(H, int(W / aspect))
    h = int(rng.integers(min(60, hmax), hmax + 1))
    w = max(1, min(W, round(h * aspect)))
    y, x = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
    img = Image.fromarray(p[y:y + h, x:x + w])
    side = int(rng.integers(24, 65))
    scale = side / max(h, w)
    img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    meta = {"original_width": w, "original_height": h, "width": img.size[0], "height": img.size[1],
            "pwatermark": round(float(rng.uniform()), 3), "status": "success"}
    return buf.getvalue(), meta


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> dict:
    from skimage import data as skdata

    root = tmp_path_factory.mktemp("foreign")
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    rng = np.random.default_rng(16)
    meta: dict[str, dict] = {}
    i2d = root / "i2d"
    i2d.mkdir()
    for stem, n in I2D_SIZES.items():
        members, rows = [], []
        for i in range(n):
            key = f"{stem}{i:04d}"
            jpg, m = _photo_crop(rng, photos)
            m.update(key=key, url=f"https://example.com/{key}.jpg", caption=f"photo {key}")
            meta[key] = m
            members += [(f"{key}.jpg", jpg), (f"{key}.txt", m["caption"].encode()), (f"{key}.json", json.dumps(m).encode())]
            rows.append({"key": key, "status": "success"})
        rows += [{"key": f"{stem}f{j}", "status": "failed_to_download"} for j in range(2)]  # in parquet, not in the tar
        write_tar(i2d / f"{stem}.tar", members)
        (i2d / f"{stem}_stats.json").write_text(json.dumps({"count": n + 2, "successes": n, "failed_to_download": 2}))
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.Table.from_pylist(rows), i2d / f"{stem}.parquet")
        except ImportError:
            pass
    hf = root / "hf"
    hf.mkdir()
    shard0, shard1 = [], []
    for key, (img_ext, fmt), (cap_ext, label) in zip(
            HF_KEYS, [("jpeg", "JPEG"), ("webp", "WEBP"), ("hires.jpg", "JPEG"), ("jpg", "JPEG"), ("png", "PNG"),
                      ("jpg", "JPEG"), ("jpg", "JPEG"), ("jpg", "JPEG")],
            [("caption", 3), ("text", 1), ("txt", 4), ("txt", 1), (None, 5), ("txt", 9), ("txt", 2), ("txt", 6)]):
        img, m = _photo_crop(rng, photos, fmt)
        m.update(label=label, caption=f"json caption of {key}")
        meta[key] = m
        sample = [(f"{key}.{img_ext}", img)]
        if cap_ext:
            sample.append((f"{key}.{cap_ext}", f"member caption of {key}".encode()))
        sample.append((f"{key}.json", json.dumps(m).encode()))
        if key == "hf-q":  # split: the image ends shard 0, the rest starts shard 1
            shard0.append(sample[0])
            shard1 += sample[1:]
        elif len(shard0) < 10:
            shard0 += sample
        else:
            shard1 += sample
    write_tar(hf / "data-000000.tar", shard0)
    write_tar(hf / "data-000001.tar", shard1)
    return {"root": root, "i2d": str(i2d), "hf": str(hf), "meta": meta,
            "i2d_keys": [f"{s}{i:04d}" for s, n in I2D_SIZES.items() for i in range(n)]}


def _index(foreign, tmp_path) -> str:
    out = tmp_path / "hf-index"
    r = subprocess.run([sys.executable, "-m", "ldm_lightning", "data", "index", foreign["hf"], "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "1 samples split across two shards" in r.stdout
    return str(out / "manifest.json")


def _read(shards, batch_size=4, members=None, mode="center_crop", size=16, shuffle=False, epoch=0, max_bad=0.0):
    """All batches of a one-slot stream (one process, no workers)."""
    s = ShardStream(resolve_shards(shards) if not isinstance(shards, list) or isinstance(shards[0], str)
                    else shards, batch_size, num_workers=1, rank=0, world_size=1, shuffle=shuffle, shuffle_buffer=8,
                    transform=ImageTransform(size, 3, mode, False), members=members or MemberSpec(),
                    max_bad_fraction=max_bad)
    s.set_position(epoch, 0)
    return list(s)


def test_counts_from_img2dataset_stats_sizes_parquet_or_a_clear_error(foreign, tmp_path):
    shards = resolve_shards(foreign["i2d"])  # _stats.json beside each shard; no manifest
    assert [(os.path.basename(s.url), s.num_samples) for s in shards] == [(f"{k}.tar", n) for k, n in I2D_SIZES.items()]
    assert [s.num_samples for s in resolve_shards(f"{foreign['i2d']}/0000[34].tar")] == [4, 8]
    sized = tmp_path / "sized"  # a sizes.json instead (the WebDataset / open_clip convention)
    sized.mkdir()
    for k in I2D_SIZES:
        os.symlink(f"{foreign['i2d']}/{k}.tar", sized / f"{k}.tar")
    (sized / "sizes.json").write_text(json.dumps({f"{k}.tar": n for k, n in I2D_SIZES.items()}))
    assert [s.num_samples for s in resolve_shards(str(sized))] == list(I2D_SIZES.values())
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        pass
    else:  # parquet alone: rows with status == success
        (sized / "sizes.json").unlink()
        for k in I2D_SIZES:
            os.symlink(f"{foreign['i2d']}/{k}.parquet", sized / f"{k}.parquet")
        assert [s.num_samples for s in resolve_shards(str(sized))] == list(I2D_SIZES.values())
    with pytest.raises(ShardSpecError, match=r"ldm-lightning data index .*hf"):
        resolve_shards(foreign["hf"])


def test_index_command_counts_split_and_dotted_samples_once(foreign, tmp_path):
    manifest = _index(foreign, tmp_path)
    man = json.loads(Path(manifest).read_text())
    assert man["shards_dir"] == str(Path(foreign["hf"]).resolve()) and man["num_samples"] == 8
    assert [(e["name"], e["num_samples"]) for e in man["shards"]] == [("data-000000.tar", 4), ("data-000001.tar", 4)]
    assert man["shards"][0]["tail_continues_in"] == "data-000001.tar" and man["shards"][1]["head_key"] == "hf-q"
    assert not (Path(foreign["hf"]) / "manifest.json").exists()  # --out: the shards' folder is left alone
    r = subprocess.run([sys.executable, "-m", "ldm_lightning", "data", "verify", str(Path(manifest).parent)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "all 2 shards match the manifest (8 samples)" in r.stdout, r.stdout + r.stderr
    # the header scan agrees with img2dataset's own counts
    r = subprocess.run([sys.executable, "-m", "ldm_lightning", "data", "index", f"{foreign['i2d']}/*.tar", "--out",
                        str(tmp_path / "i2d-index")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for spec in (tmp_path / "i2d-index" / "manifest.json", tmp_path / "i2d-index"):  # the manifest or its folder
        shards = resolve_shards(str(spec))
        assert [s.num_samples for s in shards] == list(I2D_SIZES.values()) and os.path.isfile(shards[0].url)
    members = MemberSpec.build(image_exts=["jpg", "jpeg", "png", "webp", "hires.jpg"])
    batches = _read(manifest, batch_size=8, members=members)
    assert sum(b["bad_samples"] for b in batches) == 0
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(HF_KEYS)  # every sample once: the split one joined, the dotted one keyed 'hf-dot'
    txt = dict(zip(keys, [t for b in batches for t in b["txt"]]))
    assert txt["hf-q"] == "member caption of hf-q" and txt["hf-dot"] == "member caption of hf-dot"


def test_member_aliases_and_json_fields(foreign, tmp_path):
    manifest = _index(foreign, tmp_path)
    spec = dict(image_exts=["jpg", "jpeg", "png", "webp", "hires.jpg"])
    got = {}
    for b in _read(manifest, batch_size=8, members=MemberSpec.build(**spec)):
        got.update(zip(b["key"], zip(b["txt"], b["cls"].tolist())))
    assert got["hf-a"] == ("member caption of hf-a", -1)  # jpeg + caption
    assert got["hf-b"] == ("member caption of hf-b", -1)  # webp + text
    assert got["hf-r"] == ("", -1)  # png, no caption member
    got = {}
    for b in _read(manifest, batch_size=8, members=MemberSpec.build(**spec, caption_key="caption", class_key="label")):
        got.update(zip(b["key"], zip(b["txt"], b["cls"].tolist())))
    assert got == {k: (f"json caption of {k}", foreign["meta"][k]["label"]) for k in HF_KEYS}
    # without `hires.jpg` among the image members the dotted sample has no image: a bad sample, named
    batches = _read(manifest, batch_size=7, members=MemberSpec.build(), max_bad=0.2)
    assert sum(b["bad_samples"] for b in batches) == 1 and "hf-dot" not in [k for b in batches for k in b["key"]]


def test_filters_drop_exactly_what_they_should(foreign):
    filters = ["pwatermark < 0.5", "aspect <= 1.5", "original_width >= 70"]
    meta = foreign["meta"]
    keep = {k for k in foreign["i2d_keys"] if meta[k]["pwatermark"] < 0.5
            and meta[k]["original_width"] / meta[k]["original_height"] <= 1.5 and meta[k]["original_width"] >= 70}
    assert 0 < len(keep) < 24
    batches = _read(foreign["i2d"], batch_size=4, members=MemberSpec.build(filters=filters), shuffle=True)
    assert len(batches) == 6  # the exact epoch length of the unfiltered counts (24 / 4)
    seen = [k for b in batches for k in b["key"]]
    assert set(seen) == keep  # all kept ones (then the slot refills from its start), no filtered one
    assert sum(b["filtered_samples"] for b in batches) == 24 - len(keep)
    assert sum(b["bad_samples"] for b in batches) == 0  # filtered is not bad
    with pytest.raises(MemberSpecError, match="FIELD OP VALUE"):
        MemberSpec.build(filters=["pwatermark is small"])
    with pytest.raises(MemberSpecError, match="words only"):
        MemberSpec.build(filters=["status < success"])
    for bad in ("pwatermark < nan", "aspect <= inf", "original_width >= -inf"):
        with pytest.raises(MemberSpecError, match="give a finite number"):
            MemberSpec.build(filters=[bad])


def test_crop_geometry_is_in_the_batch(foreign):
    size, meta = 16, foreign["meta"]
    for b in _read(foreign["i2d"], batch_size=8, mode="center_crop", size=size):
        for k, (h, w), (top, left) in zip(b["key"], b["original_size"].tolist(), b["crop_top_left"].tolist()):
            assert (h, w) == (meta[k]["height"], meta[k]["width"])
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            assert (top, left) == ((nh - size) // 2, (nw - size) // 2)
        assert b["original_size"].shape == (len(b["key"]), 2) and b["image"].shape[1:] == (3, size, size)
    crops = [tuple(c) for b in _read(foreign["i2d"], batch_size=8, mode="random_crop", size=size)
             for c in b["crop_top_left"].tolist()]
    assert len(set(crops)) > 3  # random crops vary


KEYREC = '''
import json, lightning as L, torch

class KeyRecorder(L.LightningModule):
    """Records every training batch's keys and crop conditioning, per rank."""
    def __init__(self, out: str):
        super().__init__()
        self.out, self.w, self.rows = out, torch.nn.Parameter(torch.zeros(1)), []
    def training_step(self, batch, i):
        self.rows.append({"epoch": self.current_epoch, "key": list(batch["key"]),
                          "original_size": batch["original_size"].tolist(), "shape": list(batch["image"].shape)})
        return (self.w * batch["image"].float().mean()).sum()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)
    def on_train_end(self):
        json.dump(self.rows, open(f"{self.out}/rank{self.global_rank}.json", "w"))
'''


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fit_ddp_reads_every_sample_once_per_epoch(foreign, tmp_path):
    """`ldm-lightning fit` with the shipped img2dataset config (tiny sizes), 2 DDP ranks (gloo, CPU), 2 epochs,
    on img2dataset shards (stats counts, gap) plus the indexed generic ones (split + dotted sample)."""
    manifest = _index(foreign, tmp_path)
    (tmp_path / "keyrec.py").write_text(KEYREC)
    (tmp_path / "model.yaml").write_text(f"model:\n  class_path: keyrec.KeyRecorder\n  init_args: {{out: {tmp_path}}}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "ldm_lightning", "fit", "-c", "ldm_lightning:data/img2dataset-256.yaml",
                        "-c", str(tmp_path / "model.yaml"),
                        f"--data.init_args.train_shards=[{foreign['i2d']}, {manifest}]",
                        "--data.init_args.val_shards=null", "--data.init_args.image_size=16",
                        "--data.init_args.batch_size=4", "--data.init_args.num_workers=1",
                        "--data.init_args.members.filters=[]",
                        "--data.init_args.members.image_exts=[jpg, jpeg, png, webp, hires.jpg]",
                        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
                        "--trainer.max_epochs=2", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                        f"--trainer.default_root_dir={tmp_path / 'run'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rows = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert len(rows[0]) == len(rows[1]) == 8  # 32 samples / 2 ranks / batch 4 = 4 steps per epoch, 2 epochs
    everything = sorted(foreign["i2d_keys"] + HF_KEYS)
    for epoch in (0, 1):
        keys = [k for rank in rows for row in rank if row["epoch"] == epoch for k in row["key"]]
        assert sorted(keys) == everything, f"epoch {epoch}: not every sample exactly once"
    assert all(row["shape"] == [4, 3, 16, 16] and len(row["original_size"]) == 4 for rank in rows for row in rank)
    firsts = [[row["key"] for row in rank if row["epoch"] == e] for rank in rows for e in (0, 1)]
    assert firsts[0] != firsts[1]  # epoch 1 is reshuffled


def test_resume_mid_epoch_is_exact(foreign, tmp_path):
    """The shipped config's DataModule in a Trainer: a resume from a mid-epoch checkpoint continues exactly."""
    import lightning as L
    import torch
    import yaml
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ldm_lightning.data import ShardDataModule

    sys.path.insert(0, str(tmp_path))
    (tmp_path / "keyrec_resume.py").write_text(KEYREC)
    from keyrec_resume import KeyRecorder

    args = yaml.safe_load((REPO / "configs/data/img2dataset-256.yaml").read_text())["data"]["init_args"]
    args.update(train_shards=foreign["i2d"], val_shards=None, image_size=16, batch_size=4, num_workers=2,
                members={**args["members"], "filters": ["pwatermark < 0.8"]})

    def fit(root, ckpt=None, callbacks=()):
        model = KeyRecorder(str(root))
        root.mkdir(exist_ok=True)
        t = L.Trainer(max_steps=9, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=root, callbacks=list(callbacks))
        t.fit(model, datamodule=ShardDataModule(**args), ckpt_path=ckpt)
        return [row["key"] for row in model.rows]

    full = fit(tmp_path / "full", callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3,
                                                             save_top_k=-1, filename="{step}")])
    assert len(full) == 9  # 24 samples / batch 4 = 6 per epoch: crosses into epoch 1
    resumed = fit(tmp_path / "resumed", ckpt=str(tmp_path / "ck" / "step=3.ckpt"))
    assert resumed == full[3:]
    assert torch.load(tmp_path / "ck" / "step=3.ckpt", weights_only=False)["ShardDataModule"]["consumed"] == 3


def test_latent_shards_written_by_others(tmp_path):
    """MLPerf-SD-style latent shards: `{key}.npy` moments + `{key}.txt`, counted by a sizes.json."""
    rng = np.random.default_rng(0)
    moments = {f"lat{i:03d}": rng.standard_normal((8, 4, 4)).astype(np.float32) for i in range(6)}
    members = []
    for k, m in moments.items():
        buf = io.BytesIO()
        np.save(buf, m)
        members += [(f"{k}.npy", buf.getvalue()), (f"{k}.txt", f"caption {k}".encode())]
    write_tar(tmp_path / "00000.tar", members)
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 6}))
    s = ShardStream(resolve_shards(str(tmp_path)), 3, num_workers=1, rank=0, world_size=1, shuffle=False,
                    kind="latent", members=MemberSpec.build(latent_exts=["moments.npy", "npy"]))
    got = list(s)
    assert [k for b in got for k in b["key"]] == list(moments)
    assert all(np.array_equal(b["moments"][i].numpy(), moments[k]) for b in got for i, k in enumerate(b["key"]))
    assert got[0]["txt"][0] == "caption lat000" and "original_size" not in got[0]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fit_on_shards_without_counts_names_data_index(foreign, tmp_path):
    (tmp_path / "keyrec.py").write_text(KEYREC)
    (tmp_path / "model.yaml").write_text(f"model:\n  class_path: keyrec.KeyRecorder\n  init_args: {{out: {tmp_path}}}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "ldm_lightning", "fit", "-c", "ldm_lightning:data/img2dataset-256.yaml",
                        "-c", str(tmp_path / "model.yaml"), f"--data.init_args.train_shards={foreign['hf']}",
                        "--data.init_args.val_shards=null", "--trainer.accelerator=cpu", "--trainer.max_steps=1",
                        "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path / 'run'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "ldm-lightning data index" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
