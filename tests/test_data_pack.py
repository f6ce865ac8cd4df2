"""`ldm-lightning data pack` on real data: MNIST (bundled) and an image folder with broken files."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tar_files import read_samples

from ldm_lightning.data import pack
from ldm_lightning.data.mnist import caption, load_mnist
from ldm_lightning.data.shardwriter import sha256_file


def _read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    return {k: v for shard in sorted(out.glob("shard-*.tar")) for k, v in read_samples(shard).items()}


def _check_manifest(out: Path) -> dict:
    man = json.loads((out / "manifest.json").read_text())
    assert man["num_samples"] == sum(s["num_samples"] for s in man["shards"])
    for s in man["shards"]:
        f = out / s["name"]
        assert f.stat().st_size == s["bytes"]
        assert sha256_file(f) == s["sha256"]
    assert not list(out.glob(".*tmp*"))
    return man


def test_mnist_fixture_pixels_labels_captions(mnist_shards):
    out = Path(mnist_shards["train"])
    man = _check_manifest(out)
    assert man["num_samples"] == 2000 and len(man["shards"]) == 8
    assert man["class_names"][7] == "seven" and man["image_size"]["width"]["max"] == 28
    images, labels = load_mnist("train")
    samples = _read_shards(out)
    assert len(samples) == 2000
    for i in (0, 1, 777, 1999):
        s = samples[f"mnist-train-{i:06d}"]
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), images[i])
        assert int(s["cls"]) == labels[i] and s["txt"].decode() == caption(labels[i])
        assert json.loads(s["json"]) == {"source": f"mnist/train/{i}", "width": 28, "height": 28}


@pytest.mark.slow
@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_pack_full_mnist(tmp_path, split, n):
    import time

    t0 = time.perf_counter()
    assert pack.main(["--source", "mnist", "--split", split, "--out", str(tmp_path), "--workers", "2",
                      "--no-progress"]) == 0
    dt = time.perf_counter() - t0
    print(f"packed MNIST {split}: {n} samples in {dt:.1f}s ({n / dt:.0f} samples/s)")
    man = _check_manifest(tmp_path)
    assert man["num_samples"] == n and len(man["shards"]) == n // pack.MNIST_SAMPLES_PER_SHARD
    images, labels = load_mnist(split)
    samples = _read_shards(tmp_path)
    assert len(samples) == n
    got = np.stack([np.asarray(Image.open(io.BytesIO(samples[f"mnist-{split}-{i:06d}"]["png"]))) for i in range(n)])
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal([int(samples[f"mnist-{split}-{i:06d}"]["cls"]) for i in range(n)], labels)


def timeless(m: dict) -> dict:
    """A manifest without its shards' mtime_ns (recorded for the loader's start-up check: new at every write)."""
    return {**m, "shards": [{k: v for k, v in s.items() if k != "mtime_ns"} for s in m["shards"]]}


def test_resume_keeps_good_shards_and_redoes_broken(tmp_path):
    args = ["--source", "mnist", "--split", "test", "--out", str(tmp_path), "--limit", "300",
            "--samples-per-shard", "100", "--no-progress"]
    assert pack.main(args) == 0
    man = json.loads((tmp_path / "manifest.json").read_text())
    # simulate an interrupted pack: no manifest yet, one shard truncated, one missing
    (tmp_path / "manifest.json").unlink()
    keep_mtime = os.stat(tmp_path / "shard-000000.tar").st_mtime_ns
    with open(tmp_path / "shard-000001.tar", "r+b") as f:
        f.truncate(1000)
    (tmp_path / "shard-000002.tar").unlink()
    assert pack.main(args) == 0
    man2 = _check_manifest(tmp_path)
    assert timeless(man2)["shards"] == timeless(man)["shards"]  # byte-identical shards (deterministic tar headers)
    assert man2["shards"][0] == man["shards"][0]  # the verified shard: its time too
    assert os.stat(tmp_path / "shard-000000.tar").st_mtime_ns == keep_mtime  # verified shard kept, not rewritten
    assert timeless(man2) == timeless(man)  # same manifest (incl. size stats) as the uninterrupted pack
    assert pack.main(args) == 0  # a finished pack re-run: verifies, rewrites nothing
    assert os.stat(tmp_path / "shard-000000.tar").st_mtime_ns == keep_mtime


def test_different_args_refused_unless_overwrite(tmp_path, capsys):
    base = ["--source", "mnist", "--split", "test", "--out", str(tmp_path), "--limit", "50", "--no-progress"]
    assert pack.main(base) == 0
    assert pack.main(base[:-3] + ["--limit", "60", "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert pack.main(base[:-3] + ["--limit", "60", "--no-progress", "--overwrite"]) == 0
    assert _check_manifest(tmp_path)["num_samples"] == 60


@pytest.fixture
def image_folder(tmp_path) -> Path:
    from skimage import data as skd

    root = tmp_path / "imgs"
    (root / "people").mkdir(parents=True)
    (root / "things").mkdir()
    Image.fromarray(skd.astronaut()).save(root / "people" / "astronaut.jpg", quality=90)
    (root / "people" / "astronaut.txt").write_text("an astronaut in a white suit\n")
    Image.fromarray(skd.camera()).save(root / "people" / "camera.png")
    Image.fromarray(skd.coffee()).save(root / "things" / "coffee.webp")
    (root / "things" / "metadata.jsonl").write_text(json.dumps({"file_name": "coffee.webp", "text": "a cup"}) + "\n")
    full = io.BytesIO()
    Image.fromarray(skd.chelsea()).save(full, format="JPEG", quality=90)
    (root / "things" / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    (root / "things" / "notes.pdf").write_bytes(b"%PDF-1.4 not an image")
    (root / "things" / "fake.png").write_bytes(b"this is not a png")
    return root


def test_folder_pack_skips_truncated_and_non_images(image_folder, tmp_path):
    out = tmp_path / "out"
    assert pack.main(["--source", str(image_folder), "--out", str(out), "--class-from-folder", "--workers", "2",
                      "--samples-per-shard", "2", "--no-progress"]) == 0
    man = _check_manifest(out)
    assert man["num_samples"] == 3 and man["class_names"] == ["people", "things"]
    reasons = {s["source"]: s["reason"] for s in man["skipped"]}
    assert set(reasons) == {"things/truncated.jpg", "things/notes.pdf", "things/fake.png"}
    assert "truncated" in reasons["things/truncated.jpg"].lower() and "not an image" in reasons["things/notes.pdf"]
    samples = _read_shards(out)
    astro = samples["people/astronaut_jpg"]
    assert astro["jpg"] == (image_folder / "people" / "astronaut.jpg").read_bytes()  # original bytes kept
    assert astro["txt"] == b"an astronaut in a white suit" and astro["cls"] == b"0"
    assert samples["things/coffee_webp"]["txt"] == b"a cup" and samples["things/coffee_webp"]["cls"] == b"1"
    assert json.loads(samples["people/camera_png"]["json"])["width"] == 512


def test_folder_pack_resize(image_folder, tmp_path):
    out = tmp_path / "out"
    assert pack.main(["--source", str(image_folder), "--out", str(out), "--size", "64", "--no-progress"]) == 0
    samples = _read_shards(out)
    for s in samples.values():
        ext = next(e for e in s if e in ("jpg", "png", "webp"))
        assert Image.open(io.BytesIO(s[ext])).size == (64, 64)
    assert json.loads(samples["things/coffee_webp"]["json"])["width"] == 600  # original size recorded


def test_shard_size_mb_and_workers_are_deterministic(tmp_path):
    common = ["--source", "mnist", "--split", "test", "--limit", "600", "--shard-size-mb", "0.5", "--no-progress"]
    assert pack.main(common + ["--out", str(tmp_path / "a"), "--workers", "1"]) == 0
    assert pack.main(common + ["--out", str(tmp_path / "b"), "--workers", "2"]) == 0
    a, b = _check_manifest(tmp_path / "a"), _check_manifest(tmp_path / "b")
    assert timeless(a)["shards"] == timeless(b)["shards"]  # same bytes whatever the number of encode workers
    assert len(a["shards"]) >= 4 and all(s["bytes"] <= 0.5e6 * 1.1 for s in a["shards"])
    assert a["num_samples"] == 600


def test_cli_entry_point(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ldm_lightning", "data", "pack", "--source", "mnist", "--split", "test",
                        "--limit", "20", "--out", str(tmp_path), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "packed 20 samples into 1 shards" in r.stdout
    r = subprocess.run([sys.executable, "-m", "ldm_lightning", "data", "pack", "--source", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "not a directory" in r.stderr and "Traceback" not in r.stderr
