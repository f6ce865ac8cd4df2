"""benchmarks/bench_autoencoders.py --dry-run, as a user runs it: both data sets, every kind, every column of
the stage-1 table (LPIPS through a VGG16 weight file when one is given, "n/a" when none is on disk) and of
the MNIST stage-2 table (one DiT per autoencoder, sampled per class, scored with the MNIST classifier)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("kl", "vq", "movq", "vqvae2", "dcae", "rae")


def _run(tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "LDM_LIGHTNING_CACHE": str(tmp_path / "cache")}  # the dry-run's tiny classifier recipe
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_autoencoders.py"), "--dry-run", *args],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _stage1_table(out: str) -> tuple[list[str], list[list[str]]]:
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("| kind | latent | psnr |"))
    head = [c.strip() for c in lines[i].strip("|").split("|")]
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return head, rows


def _fake_vgg16(path: Path) -> None:
    """A torchvision-named VGG16 feature state dict with random weights (the real file is not here)."""
    import lpips
    net = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    torch.save({f"features.{k.split('.', 1)[1]}": v for k, v in net.net.state_dict().items()}, path)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_bench_autoencoders_dry_run_mnist_and_photos_print_every_column(tmp_path):
    out = _run(tmp_path, "--data", "mnist", "--vgg-weights", str(tmp_path / "absent.pth"))
    head, rows = _stage1_table(out)
    assert head == ["kind", "latent", "psnr", "ssim", "lpips", "rfid", "usage", "perplexity", "trainable_M",
                    "frozen_M", "encode_img_s", "decode_img_s", "train_s"]
    assert [r[0] for r in rows] == list(KINDS)
    assert "# LPIPS: n/a (no VGG weights at" in out and all(r[4] == "n/a" for r in rows)
    for r in rows:  # every measured cell is a number; codebook cells only (and always) for VQ kinds
        for col, cell in zip(head[2:], r[2:]):
            if col in ("usage", "perplexity"):
                assert (cell != "") == (r[0] in ("vq", "movq", "vqvae2")), (r[0], col, cell)
            elif col != "lpips":
                float(cell)
    assert " / " in rows[KINDS.index("vqvae2")][head.index("usage")]  # bottom / top level
    s2_head = ["kind", "latent", "recon_acc", "scale", "s2_acc", "s2_fid", "s2_params_M", "s2_train_s", "sample_s"]
    lines = out.splitlines()
    i = lines.index("| " + " | ".join(s2_head) + " |")
    s2 = [[c.strip() for c in line.strip("|").split("|")] for line in lines[i + 2:i + 2 + len(KINDS) + 1]]
    assert [r[0] for r in s2] == [*KINDS, "rae + DiT^DH"]
    for r in s2:
        assert 0 <= float(r[2]) <= 1 and float(r[3]) > 0 and 0 <= float(r[4]) <= 1 and float(r[5]) >= 0
    assert float(s2[-1][6]) > float(s2[-2][6])  # the wide head adds parameters
    assert "# reference at this count: real train images FID" in out
    assert "ratio decode img/s movq / vq = " in out

    _fake_vgg16(tmp_path / "vgg16.pth")
    out = _run(tmp_path, "--data", "photos", "--vgg-weights", str(tmp_path / "vgg16.pth"))
    head, rows = _stage1_table(out)
    assert head == ["kind", "latent", "psnr", "ssim", "lpips", "usage", "perplexity", "trainable_M", "frozen_M",
                    "encode_img_s", "decode_img_s", "train_s"]  # no rFID, no stage 2 on photos
    assert [r[0] for r in rows] == list(KINDS)
    assert all(float(r[head.index("lpips")]) >= 0 for r in rows)
    latents = {r[0]: r[1] for r in rows}
    assert latents["kl"] == "4x16x16" and latents["dcae"] == "16x8x8"  # 64x64x3 -> 1024 floats for every kind
    assert "recon_acc" not in out and "held-out photo" in out
