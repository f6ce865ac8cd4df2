"""Issue 30's layout-to-image and semantic synthesis through the user path: `ldm-lightning data pack --source
mnist-canvas --class-maps`, `ldm-lightning fit` with the shipped configs (2 steps) and `ldm-lightning sample` with a
layout / class maps, in subprocesses; the layout tokenizer's round trip and its refusals."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tar_files import read_samples

from ldm_lightning.diffusion.conditioning import ConditioningConfig, Conditioner
from ldm_lightning.diffusion.layout import LayoutConfig, LayoutError, LayoutTokenizer, read_layouts
from ldm_lightning.diffusion.text_transformer import TextTransformer, TextTransformerConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ["-c", str(ROOT / "configs/trainer/cpu-debug.yaml"), "--data.init_args.batch_size", "4",
        "--data.init_args.val_samples", "4", "--data.init_args.num_workers", "1", "--trainer.max_steps", "2",
        "--model.init_args.val_steps", "1", "--model.init_args.val_num", "2", "--model.init_args.optim.warmup_steps", "0",
        "--trainer.logger", "false"]


def _cli(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "ldm_lightning", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_layout_tokens_round_trip_and_refusals():
    tok = LayoutTokenizer(LayoutConfig(num_classes=10, position_bins=32, max_boxes=4))
    layout = [[3, 0.1, 0.2, 0.45, 0.5], [9, 0.0, 0.5, 1.0, 1.0]]
    ids = tok.encode(layout)
    assert len(ids) == tok.length == 21 and ids[0] == tok.bos and ids[11:] == [tok.pad] * 10
    assert ids[1] == 3 and all(10 <= i < 42 for i in ids[2:6])  # a class token, then four position tokens
    back = tok.decode(ids)
    assert [b[0] for b in back] == [3, 9]
    assert np.abs(np.array(back)[:, 1:] - np.array(layout)[:, 1:]).max() <= 1 / 32  # within a bin
    assert tok.encode(back) == ids  # bins' centres quantise to the same tokens
    assert tok.decode(tok.encode([])) == [] and tok.vocab_size == 10 + 32 + 2
    for bad, words in (([[10, 0.1, 0.1, 0.5, 0.5]], "class 10; this model's classes are 0-9"),
                       ([[1, 0.6, 0.1, 0.5, 0.5]], "needs x0 < x1"), ([[1, 0.1, 0.1, 1.5, 0.5]], "outside [0, 1]"),
                       ([[1, 0.1, 0.1]], "5 numbers"), ([[0, 0, 0, 1, 1]] * 5, "max_boxes=4")):
        with pytest.raises(LayoutError, match=words.replace("[", r"\[")):
            tok.encode(bad)
    assert read_layouts('{"boxes": [[1, 0, 0, 1, 1]]}') == [[[1, 0, 0, 1, 1]]]
    assert len(read_layouts("[[[1, 0, 0, 1, 1]], [[2, 0, 0, 1, 1]]]")) == 2  # a list of layouts


def test_box_fourier_gives_each_box_its_geometry_and_class_on_all_its_tokens():
    cond = ConditioningConfig(kind="layout", layout={"max_boxes": 3},
                              trainable_text={"width": 32, "depth": 1, "heads": 2, "box_fourier": 6})
    tau = TextTransformer(TextTransformerConfig(**Conditioner(cond).tau_fields()))  # the fields the backbone gets
    tok = LayoutTokenizer(cond.layout)
    ids = tok.batch([[[3, 0.1, 0.1, 0.4, 0.5], [7, 0.5, 0.5, 0.9, 0.9]], [[5, 0.1, 0.1, 0.4, 0.5]], []])["context_ids"]
    e = tau.box_embedding(ids)  # (3, 16, 32)
    assert e.shape == (3, 16, 32) and e[:, 0].abs().max() == 0 and e[1, 6:].abs().max() == 0 and e[2].abs().max() == 0
    assert torch.equal(e[0, 1:6], e[0, 1:2].expand(5, -1)) and not torch.allclose(e[0, 1], e[0, 6])  # per box
    assert torch.equal(e[0, 1], e[1, 1])  # geometry only: the same box of another class gets the same features
    cond.trainable_text.box_class = True  # ... and with box_class, the class joins the box's features
    e = TextTransformer(TextTransformerConfig(**Conditioner(cond).tau_fields())).box_embedding(ids)
    assert not torch.allclose(e[0, 1], e[1, 1]) and torch.equal(e[0, 1:6], e[0, 1:2].expand(5, -1))
    assert e[1, 6:].abs().max() == 0 and e[2].abs().max() == 0
    with pytest.raises(ValueError, match="box_fourier is for layout models"):
        ConditioningConfig(kind="text", trainable_text={"box_fourier": 6})


@pytest.mark.longest
def test_canvas_pack_fit_and_sample_with_layouts_and_maps(tmp_path):
    data = tmp_path / "canvas"
    _cli(["data", "pack", "--source", "mnist-canvas", "--split", "test", "--limit", "16", "--samples-per-shard", "8",
          "--class-maps", "--out", str(data), "--no-progress"], tmp_path)
    samples = read_samples(data / "shard-000000.tar")
    assert len(samples) == 8
    maps = tmp_path / "maps"
    maps.mkdir()
    for key, s in list(samples.items())[:2]:
        img = np.asarray(Image.open(io.BytesIO(s["png"])))
        cmap = np.asarray(Image.open(io.BytesIO(s["seg.png"])))
        boxes = json.loads(s["json"])["boxes"]
        assert img.shape == cmap.shape == (64, 64) and 2 <= len(boxes) <= 4
        for cls, x0, y0, x1, y1 in boxes:  # the digit's ink fills its box; its map ids are 1 + its class
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            inside = img[round(y0 * 64):round(y1 * 64), round(x0 * 64):round(x1 * 64)]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        assert set(np.unique(cmap)) - {0} <= {1 + b[0] for b in boxes} and (cmap > 0).sum() > 50
        (maps / f"{key}.png").write_bytes(s["seg.png"])
    shards = ["--data.init_args.train_shards", str(data), "--data.init_args.val_shards", str(data)]

    # layout-to-image: fit, then sample a layout given as JSON and a file of two layouts
    _cli(["fit", "-c", str(ROOT / "configs/diffusion/mnist-layout-pixels.yaml"), *TINY, *shards,
          "--trainer.default_root_dir", str(tmp_path / "layout")], tmp_path)
    ckpt = str(tmp_path / "layout/checkpoints/last.ckpt")
    fast = ["--sampler", "flow_euler", "--steps", "2", "--num", "1"]
    layouts = tmp_path / "layouts.json"
    layouts.write_text(json.dumps([{"boxes": [[3, 0.1, 0.1, 0.45, 0.5]]}, [[7, 0.5, 0.4, 0.9, 0.9], [1, 0, 0, .3, .3]]]))
    _cli(["sample", "--checkpoint", ckpt, "--layout", str(layouts), *fast, "--out", str(tmp_path / "laid")], tmp_path)
    a, b = (np.asarray(Image.open(tmp_path / f"laid/layout{r}_0.png")) for r in (0, 1))
    assert a.shape == (64, 64) and not np.array_equal(a, b)  # same seed, other layout: the layout reaches the net
    # a bad layout: one message, exit 2, nothing written (the other refusals: the tokenizer test above)
    r = _cli(["sample", "--checkpoint", ckpt, "--layout", '[[3, 0.1, 0.1, 0.45, 0.5], [12, 0.5, 0.4, 0.9, 0.9]]',
              *fast, "--out", str(tmp_path / "bad")], tmp_path, check=False)
    assert r.returncode == 2 and "--layout: box 1 [12, 0.5, 0.4, 0.9, 0.9] has class 12; this model's classes are " \
        "0-9" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not any((tmp_path / "bad").glob("*.png"))

    # semantic synthesis: fit on the seg.png maps, sample from two of them
    _cli(["fit", "-c", str(ROOT / "configs/diffusion/mnist-semantic-pixels.yaml"), *TINY, *shards,
          "--trainer.default_root_dir", str(tmp_path / "semantic")], tmp_path)
    _cli(["sample", "--checkpoint", str(tmp_path / "semantic/checkpoints/last.ckpt"), "--cond-images", str(maps),
          *fast, "--out", str(tmp_path / "synth")], tmp_path)
    assert sorted(p.name for p in (tmp_path / "synth").glob("canvas-*.png")) == [f"{k}_0.png" for k in
                                                                                  sorted(samples)[:2]]
