"""Stage-2 tools on real MNIST shards: `data encode` (latent shards + manifest), the image-vs-latent training
paths agreeing, the autoencoder-hash guard, the `sample` CLI, and denoiser export -> load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from float_paths import assert_close_for, sum_length
from tar_files import read_samples

from ldm_lightning.autoencoder import Autoencoder, get_preset


def _export_ae(folder: Path, seed: int) -> str:
    from ldm_lightning.autoencoder.export import export_autoencoder
    torch.manual_seed(seed)
    ae = Autoencoder(get_preset("tiny-mnist"))
    ae.scale_factor.fill_(0.7)
    ae.shift_factor.fill_(0.1)  # non-trivial normalisation: both paths must apply it identically
    return str(export_autoencoder(ae, folder))


@pytest.fixture(scope="module")
def aes(tmp_path_factory, tiny_ae) -> dict[str, str]:
    """'a': non-trivial scale/shift (both latent paths must apply them); 'b': another autoencoder (another
    hash), the session's tiny_ae."""
    return {"a": _export_ae(tmp_path_factory.mktemp("aes") / "a", 0), "b": tiny_ae}


@pytest.fixture(scope="module")
def latents(mnist_shards, aes, tmp_path_factory) -> str:
    from ldm_lightning.diffusion import encode
    out = tmp_path_factory.mktemp("lat") / "test"
    assert encode.main(["--autoencoder", aes["a"], "--shards", mnist_shards["test"], "--out", str(out),
                        "--batch-size", "50"]) == 0
    return str(out)


@pytest.fixture(scope="module")
def ckpt(aes, tmp_path_factory) -> str:
    """A class-conditional DiffusionModule checkpoint after 3 steps on MNIST."""
    import lightning as L
    from test_diffusion_module import loader, make_module, mnist_batches
    root = tmp_path_factory.mktemp("ckpt")
    m = make_module(aes["a"], backbone="unet-tiny")
    t = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    t.fit(m, loader(mnist_batches(3, 8)))
    t.save_checkpoint(root / "d.ckpt")
    return str(root / "d.ckpt")


def test_encode_writes_latent_shards_and_manifest(latents, mnist_shards, aes):
    from ldm_lightning.autoencoder.load import load_autoencoder
    from ldm_lightning.autoencoder import autoencoder_hash
    man = json.loads((Path(latents) / "manifest.json").read_text())
    src = json.loads((Path(mnist_shards["test"]) / "manifest.json").read_text())
    assert man["num_samples"] == src["num_samples"] == 500 and len(man["shards"]) == 4
    assert [s["name"] for s in man["shards"]] == [s["name"] for s in src["shards"]]
    assert man["latent_shape"] == [4, 8, 8] and man["mode"] == "moments"
    assert man["autoencoder"]["hash"] == autoencoder_hash(load_autoencoder(aes["a"]))
    assert man["autoencoder"]["scale_factor"] == pytest.approx(0.7)
    assert man["autoencoder"]["shift_factor"] == pytest.approx(0.1)
    lat = read_samples(str(Path(latents) / man["shards"][0]["name"]))
    img = read_samples(str(Path(mnist_shards["test"]) / man["shards"][0]["name"]))
    assert lat.keys() == img.keys()
    k = next(iter(lat))
    assert lat[k]["cls"] == img[k]["cls"] and lat[k]["txt"] == img[k]["txt"]
    m = np.load(__import__("io").BytesIO(lat[k]["moments.npy"]))
    assert m.shape == (8, 8, 8) and m.dtype == np.float32
    assert not list(Path(latents).glob(".*.tmp-*"))  # atomic writes left no temporaries


def test_image_and_latent_paths_give_the_same_loss(latents, mnist_shards, aes):
    """Same samples, same step generator: on-the-fly encoding == cached moments."""
    from ldm_lightning.data import ShardDataModule
    from test_diffusion_module import make_module
    batches = {}
    for kind, shards in (("image", mnist_shards["test"]), ("latent", latents)):
        dm = ShardDataModule(shards, batch_size=16, num_workers=0, shuffle_buffer=1, kind=kind, rank=0,
                             world_size=1, image_size=32, channels=1, resize_mode="pad")
        batches[kind] = dm.model_inputs(next(iter(dm.train_dataloader())))  # outside a Trainer: normalise here
    assert batches["image"]["key"] == batches["latent"]["key"]
    assert torch.equal(batches["image"]["cls"], batches["latent"]["cls"])
    m = make_module(aes["a"], conditioning={"kind": "class", "num_classes": 10, "drop_prob": 0.3})
    z_img = m.latents(batches["image"], torch.Generator().manual_seed(5))
    z_lat = m.latents(batches["latent"], torch.Generator().manual_seed(5))
    # encoded here in a batch of 16, by `data encode` in one of 64: other kernels, fp32 rounding (tests/float_paths.py)
    assert_close_for(z_img, z_lat, sum_length(m.autoencoder), "latents, image path vs cached moments")
    l_img, t_img = m.compute_loss(batches["image"])
    l_lat, t_lat = m.compute_loss(batches["latent"])
    print(f"loss image path {l_img.item():.6f} latent path {l_lat.item():.6f}")
    torch.testing.assert_close(l_img, l_lat, rtol=1e-4, atol=1e-6)
    assert t_img.keys() == t_lat.keys()


def test_latent_shards_of_another_autoencoder_are_refused(latents, aes):
    from ldm_lightning.diffusion.encode import check_latent_manifest
    from test_diffusion_module import make_module
    make_module(aes["a"]).check_latent_shards(latents)  # the matching autoencoder passes
    other = make_module(aes["b"])
    man = json.loads((Path(latents) / "manifest.json").read_text())
    with pytest.raises(ValueError) as e:
        other.check_latent_shards(latents)
    msg = str(e.value)
    assert man["autoencoder"]["hash"][:16] in msg and other.autoencoder_hash[:16] in msg
    assert "ldm-lightning data encode" in msg and "model.autoencoder" in msg
    with pytest.raises(ValueError, match="not a latent-shard manifest"):
        check_latent_manifest({"shards": []}, other.autoencoder_hash)


def test_refusal_happens_at_fit_start(latents, aes, tmp_path):
    import lightning as L
    from ldm_lightning.data import ShardDataModule
    from test_diffusion_module import make_module
    dm = ShardDataModule(latents, batch_size=8, num_workers=0, kind="latent")
    t = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="were encoded by autoencoder hash"):
        t.fit(make_module(aes["b"]), datamodule=dm)


def test_sample_cli_writes_named_pngs_and_is_deterministic(ckpt, tmp_path):
    from PIL import Image
    from ldm_lightning.cli import main
    args = ["sample", "--checkpoint", ckpt, "--sampler", "dpmpp_2m", "--steps", "4", "--cfg", "2.0",
            "--classes", "0-2", "--num", "2"]
    assert main(args + ["--seed", "7", "--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--seed", "7", "--out", str(tmp_path / "b")]) == 0
    assert main(args + ["--seed", "8", "--out", str(tmp_path / "c")]) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted([f"{c}_{i}.png" for c in range(3) for i in range(2)] + ["grid.png"])
    read = lambda d, n: np.asarray(Image.open(tmp_path / d / n))  # noqa: E731
    assert read("a", "0_0.png").shape == (32, 32)
    for n in names:
        assert np.array_equal(read("a", n), read("b", n)), n
    assert not np.array_equal(read("a", "1_1.png"), read("c", "1_1.png"))
    assert read("a", "grid.png").shape == (2 + 3 * 34, 2 + 2 * 34)  # one row per class
    assert main(["sample", "--checkpoint", ckpt, "--class", "4", "--num", "1", "--steps", "2", "--no-ema",
                 "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "4_0.png").is_file()


@pytest.mark.parametrize("flag", ["--class=10", "--class=-3", "--classes=8-10"])
def test_sample_cli_refuses_a_class_the_model_does_not_have(ckpt, tmp_path, flag):
    """A 10-class model: class 10 (the null class's index) or a negative one is refused by name, no traceback."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "ldm_lightning", "sample", "--checkpoint", ckpt, flag, "--num", "1",
                        "--steps", "1", "--out", str(tmp_path / "s")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    bad = {"--class=10": 10, "--class=-3": -3, "--classes=8-10": 10}[flag]
    assert f"--class {bad} is out of range: this model has 10 classes, give 0-9" in r.stderr
    assert not (tmp_path / "s").exists()  # nothing written


def test_sample_cli_requires_a_condition_for_a_conditional_model(ckpt, tmp_path):
    from ldm_lightning.diffusion.sample import main
    with pytest.raises(SystemExit, match="class-conditional"):
        main(["--checkpoint", ckpt, "--out", str(tmp_path)])


def test_export_load_round_trip_gives_identical_outputs(ckpt, tmp_path):
    from ldm_lightning.diffusion.load import load_denoiser
    from ldm_lightning.export import main
    assert main(["--checkpoint", ckpt, "--out", str(tmp_path / "exp")]) == 0
    assert {p.name for p in (tmp_path / "exp").iterdir()} == {"denoiser.safetensors", "config.json"}
    d_ckpt, _, meta = load_denoiser(ckpt)
    d_exp, cond, meta2 = load_denoiser(tmp_path / "exp")
    assert meta2["autoencoder"] == meta["autoencoder"] and cond.cfg.num_classes == 10
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 990]), {"y": torch.tensor([1, 2, 10])}
    assert torch.equal(d_ckpt(x, t, y).x0, d_exp(x, t, y).x0)
    d_live, _, _ = load_denoiser(ckpt, weights="live")
    assert not torch.equal(d_live(x, t, y).x0, d_exp(x, t, y).x0)  # the export holds EMA weights
    with pytest.raises(FileNotFoundError, match="not a denoiser export"):
        load_denoiser(tmp_path)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_diffusion_configs_validate():
    """Every configs/diffusion/*.yaml names our classes and its typed configs pass their own validation."""
    import yaml
    from ldm_lightning.diffusion import ConditioningConfig, ObjectiveConfig, PRESETS, build_schedule
    from ldm_lightning.diffusion.samplers import SAMPLERS
    files = sorted((CONFIGS / "diffusion").glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        cfg = yaml.safe_load(f.read_text())
        m, d = cfg["model"], cfg["data"]
        assert m["class_path"] == "ldm_lightning.diffusion.module.DiffusionModule", f
        assert d["class_path"] == "ldm_lightning.data.ShardDataModule", f
        a = m["init_args"]
        assert a["backbone"] in PRESETS and a["val_sampler"] in SAMPLERS, f
        ObjectiveConfig(**a["objective"])
        ConditioningConfig(**a["conditioning"])
        sched = dict(a["schedule"])
        if "shift_base_dim" in sched:  # RAE's shift: the module fills latent_dim in from its autoencoder
            sched["latent_dim"] = 16 * 16 * 768
        build_schedule(sched.pop("kind"), **sched)


# config -> (sample CLI condition, file names it writes, fixed-draw loss must fall below this fraction).
# The flow target (eps - x0) keeps a large irreducible part near t = 0.5, where logit-normal t concentrates.
FIT_CONFIGS = {
    "mnist-unet-class": (["--classes", "0-1"], ["0_0.png", "1_0.png", "grid.png"], 0.85),
    "mnist-dit-text-latents": (["--prompt", "a handwritten digit one"],
                               ["a-handwritten-digit-one_0.png", "grid.png"], 0.95),
}


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("config", list(FIT_CONFIGS))
def test_cli_fit_on_latent_shards_then_sample(config, latents, aes, tmp_path):
    """`ldm-lightning fit` with a shipped config (UNet class-conditional; DiT text-conditional with MiniLM)
    on `data encode` output under 2-process DDP (gloo): the loss falls; `ldm-lightning sample` works on
    the last checkpoint; the wrong autoencoder is refused."""
    from scale_run import TRAINER_CFG, run_cli
    condition, files, max_ratio = FIT_CONFIGS[config]
    cfg = ["-c", str(CONFIGS / "diffusion" / f"{config}.yaml"), "-c", str(TRAINER_CFG / "cpu-debug.yaml")]
    over = ["--model.init_args.autoencoder", aes["a"], "--model.init_args.val_steps", "2",
            "--model.init_args.val_num", "4", "--data.init_args.kind", "latent",
            "--data.init_args.train_shards", latents, "--data.init_args.val_shards", latents,
            "--data.init_args.batch_size", "16", "--data.init_args.val_samples", "16", "--data.init_args.num_workers",
            "1", "--trainer.max_steps", "20", "--trainer.val_check_interval", "20",
            "--trainer.check_val_every_n_epoch", "null",
            "--trainer.log_every_n_steps", "1",
            "--model.init_args.optim.lr", "3e-3", "--model.init_args.optim.warmup_steps", "0",
            "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.default_root_dir", str(tmp_path / "run")]
    run_cli(["fit", *cfg, *over], tmp_path)
    last = sorted((tmp_path / "run").rglob("last.ckpt"))
    assert len(last) == 1, list((tmp_path / "run").rglob("*"))
    # the loss fell: same fixed draws on a held-out latent batch, trained weights vs a fresh init of the
    # same module (rebuilt from the checkpoint's hyper-parameters, i.e. from the shipped config)
    from ldm_lightning.data import ShardDataModule
    from ldm_lightning.diffusion.load import load_denoiser
    from ldm_lightning.diffusion.module import DiffusionModule
    dm = ShardDataModule(latents, batch_size=64, num_workers=0, shuffle_buffer=1, kind="latent", rank=0,
                         world_size=1, seed=123)
    probe = next(iter(dm.train_dataloader()))
    hparams = torch.load(last[0], map_location="cpu", weights_only=True)["hyper_parameters"]
    fresh = DiffusionModule(**hparams)
    trained, _, _ = load_denoiser(last[0], weights="live")
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    with torch.no_grad():
        before = float(fresh._loss(probe, fresh.denoiser, g(1), g(2), g(3), drop=0.0)[0])
        after = float(fresh._loss(probe, trained, g(1), g(2), g(3), drop=0.0)[0])
    print(f"{config}, 2-process DDP, 20 steps: fixed-draw loss {before:.4f} -> {after:.4f}")
    assert after < max_ratio * before, (before, after)
    run_cli(["sample", "--checkpoint", str(last[0]), *condition, "--num", "1", "--steps", "2",
             "--out", str(tmp_path / "s")], tmp_path)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == files
    # the wrong autoencoder is refused at start-up with the fix in the message
    proc = run_cli(["fit", *cfg, *over[:-2], "--trainer.devices", "1", "--trainer.strategy", "auto",
                    "--model.init_args.autoencoder", aes["b"], "--trainer.default_root_dir", str(tmp_path / "r2")],
                   tmp_path, check=False)
    assert proc.returncode != 0 and "ldm-lightning data encode" in proc.stderr, proc.stderr[-3000:]


def test_encode_sample_mode_stores_point_posteriors(mnist_shards, aes, tmp_path):
    from ldm_lightning.autoencoder.distributions import LOGVAR_MIN
    from ldm_lightning.diffusion import encode
    one = str(Path(mnist_shards["test"]) / "shard-000000.tar")
    for run in ("a", "b"):
        assert encode.main(["--autoencoder", aes["a"], "--shards", one, "--out", str(tmp_path / run),
                            "--mode", "sample", "--seed", "3"]) == 0
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert man["mode"] == "sample" and man["num_samples"] == 125 and len(man["shards"]) == 1
    a, b = (read_samples(str(tmp_path / r / "shard-000000.tar")) for r in ("a", "b"))
    k = sorted(a)[0]
    m = np.load(__import__("io").BytesIO(a[k]["moments.npy"]))
    assert np.all(m[4:] == LOGVAR_MIN)  # logvar at the clamp floor: sample() returns the stored z
    assert a[k]["moments.npy"] == b[k]["moments.npy"]  # the draw is a pure function of (seed, shard)


def test_encode_splits_shards_over_ranks_and_the_last_rank_writes_the_manifest(mnist_shards, aes, tmp_path,
                                                                                 monkeypatch):
    from ldm_lightning.diffusion import encode
    args = ["--autoencoder", aes["a"], "--shards", mnist_shards["test"], "--out", str(tmp_path)]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert encode.main(args) == 0
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shard-000001.tar", "shard-000003.tar"]
    assert not (tmp_path / "manifest.json").exists()  # rank 0's shards are not done yet
    monkeypatch.setenv("RANK", "0")
    assert encode.main(args) == 0
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["name"] for s in man["shards"]] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert man["num_samples"] == 500
