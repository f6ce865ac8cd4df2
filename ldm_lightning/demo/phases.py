"""The demo's phases: each goes through the public entry point a user would call (`data pack`, `fit` with a
shipped config, `data encode`, sampling, the evaluation instruments), in this one process."""

from __future__ import annotations

from pathlib import Path

from ldm_lightning.shipped_configs import shipped_config

from .plan import DemoPlan


def accelerator_for(device: str) -> str:
    import torch

    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible here; fix: use --device auto or cpu")
    return {"cuda": "gpu", "cpu": "cpu"}[device]


def torch_device(accelerator: str) -> str:
    return "cuda" if accelerator == "gpu" else "cpu"


def write_trainer_config(out: Path, accelerator: str, max_steps: int, name: str) -> Path:
    """cpu-debug.yaml with the demo's device, step count, progress bar and one checkpoint at the end."""
    import yaml

    cfg = yaml.safe_load(shipped_config("trainer/cpu-debug.yaml").read_text())
    t = cfg["trainer"]
    t.update(accelerator=accelerator, max_steps=max_steps, enable_progress_bar=True,
             log_every_n_steps=max(1, min(50, max_steps // 10)), val_check_interval=max_steps,
             check_val_every_n_epoch=None, limit_val_batches=2)
    if accelerator == "gpu":
        t["precision"] = "bf16-mixed"
    for cb in t.get("callbacks", []):
        if cb["class_path"].endswith("StepCheckpoint"):
            cb["init_args"] = {"every_n_train_steps": max_steps, "keep_last_k": 1}
    path = out / "configs" / f"trainer-{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def fit(argv: list[str], ckpt: Path) -> Path:
    """`ldm-lightning fit ARGV` in this process; saves the final weights to `ckpt`."""
    from ldm_lightning.training.lightning_cli import build_lightning_cli

    print("$ ldm-lightning " + " ".join(argv), flush=True)
    cli = build_lightning_cli(argv)
    cli.trainer.save_checkpoint(str(ckpt))
    import wandb

    if wandb.run is not None:
        # Close this phase's offline run: otherwise the next phase's logger attaches to it (one process).
        wandb.finish()
    return ckpt


def phase_pack(out: Path, plan: DemoPlan) -> dict[str, Path]:
    from ldm_lightning.data import pack

    dirs = {}
    for split, limit, total in (("train", plan.train_images, 60000), ("test", plan.test_images, 10000)):
        d = out / "data" / "mnist" / split
        # 8 shards per split: enough reader slots for 2 loader workers × 4 ranks (every slot needs a shard).
        per_shard = -(-(limit or total) // 8)
        argv = ["--source", "mnist", "--split", split, "--out", str(d), "--samples-per-shard", str(per_shard)]
        argv += ["--limit", str(limit)] if limit else []
        print("$ ldm-lightning data pack " + " ".join(argv), flush=True)
        if pack.main(argv) != 0:
            raise SystemExit(f"demo: packing MNIST {split} into {d} failed (see above)")
        dirs[split] = d
    return dirs


VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16, what LPIPS-VGG's backbone needs


def find_vgg_weights(explicit: Path | None) -> Path | None:
    """The LPIPS backbone file: `--lpips-weights`, else torch hub's cache ($TORCH_HOME, default
    ~/.cache/torch) `hub/checkpoints/vgg16-397923af.pth`, else None (LPIPS off: it is never downloaded)."""
    import os

    if explicit is not None:
        if not explicit.is_file():
            raise SystemExit(f"demo: --lpips-weights {explicit} does not exist; fix: give the path of "
                             f"torchvision's {VGG16_FILE}, or drop the option")
        return explicit
    home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    cached = home / "hub" / "checkpoints" / VGG16_FILE
    return cached if cached.is_file() else None


def lpips_overrides(vgg: Path | None) -> list[str]:
    """CLI overrides turning LPIPS on (weight 1, SD's) with the local VGG16 file; none without one."""
    if vgg is None:
        return []
    return ["--model.init_args.loss.perceptual_weight", "1.0", "--model.init_args.loss.lpips_vgg_weights", str(vgg)]


def phase_autoencoder(out: Path, plan: DemoPlan, data: dict[str, Path], accelerator: str,
                      vgg: Path | None = None) -> Path:
    trainer_cfg = write_trainer_config(out, accelerator, plan.ae_steps, "autoencoder")
    if vgg is None:
        print(f"LPIPS off: no local {VGG16_FILE} (--lpips-weights PATH or $TORCH_HOME/hub/checkpoints/); "
              "training with L1 + KL + PatchGAN", flush=True)
    argv = ["fit", "-c", str(shipped_config("autoencoder/tiny-mnist.yaml")), "-c", str(trainer_cfg),
            "--data.init_args.train_shards", str(data["train"]), "--data.init_args.val_shards", str(data["test"]),
            "--data.init_args.val_samples", "256",
            "--model.init_args.loss.disc_start", str(plan.ae_disc_start), *lpips_overrides(vgg),
            "--trainer.default_root_dir", str(out / "runs" / "autoencoder")]
    return fit(argv, out / "checkpoints" / "autoencoder.ckpt")


def phase_reconstruction(out: Path, plan: DemoPlan, ae_ckpt: Path, device: str) -> dict:
    """PSNR / SSIM (data range [-1, 1] → 2) of EMA-weight reconstructions of the real test split."""
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from ldm_lightning.autoencoder.load import load_autoencoder
    from ldm_lightning.evaluation import load_mnist_32, save_grid

    ae = load_autoencoder(ae_ckpt, device=device)
    x, _ = load_mnist_32("test", limit=plan.test_images)  # (N, 1, 32, 32)
    recs = []
    with torch.no_grad():
        for i in range(0, len(x), 500):
            xb = x[i : i + 500].to(device)  # (b, 1, 32, 32)
            recs.append(ae.decode(ae.encode(xb).mode()).float().clamp(-1, 1).cpu())  # (b, 1, 32, 32)
    rec = torch.cat(recs)  # (N, 1, 32, 32)
    psnr = peak_signal_noise_ratio(rec, x, data_range=2.0, reduction="none", dim=(1, 2, 3)).mean().item()
    ssim = structural_similarity_index_measure(rec, x, data_range=2.0).item()
    pairs = torch.stack([x[:50], rec[:50]], 1).reshape(10, 10, 1, 32, 32)  # 5 pairs per row: input, recon
    save_grid(pairs.flatten(0, 1), out / "reconstructions.png", nrow=10)
    metrics = {"psnr": psnr, "ssim": ssim, "images": len(x), "scale_factor": float(ae.scale_factor),
               "shift_factor": float(ae.shift_factor)}
    print(f"reconstruction on {len(x)} test images: PSNR {psnr:.2f} dB, SSIM {ssim:.4f}; "
          f"latent scale factor {metrics['scale_factor']:.4f}")
    return metrics


def phase_encode(out: Path, data: dict[str, Path], ae_ckpt: Path, device: str) -> dict[str, Path]:
    from ldm_lightning.diffusion import encode

    dirs = {}
    for split, d in data.items():
        dst = out / "data" / "mnist-latents" / split
        argv = ["--autoencoder", str(ae_ckpt), "--shards", str(d), "--out", str(dst), "--batch-size", "500",
                "--device", device]
        print("$ ldm-lightning data encode " + " ".join(argv), flush=True)
        if encode.main(argv) not in (0, None):
            raise SystemExit(f"demo: encoding {d} failed (see above)")
        dirs[split] = dst
    return dirs


def phase_diffusion(out: Path, plan: DemoPlan, latents: dict[str, Path], ae_ckpt: Path, accelerator: str) -> Path:
    trainer_cfg = write_trainer_config(out, accelerator, plan.diffusion_steps, "diffusion")
    argv = ["fit", "-c", str(shipped_config("diffusion/mnist-unet-class.yaml")), "-c", str(trainer_cfg),
            "--model.init_args.autoencoder", str(ae_ckpt),
            "--data.init_args.kind", "latent",
            "--data.init_args.train_shards", str(latents["train"]),
            "--data.init_args.val_shards", str(latents["test"]), "--data.init_args.val_samples", "256",
            "--trainer.default_root_dir", str(out / "runs" / "diffusion")]
    return fit(argv, out / "checkpoints" / "diffusion.ckpt")


def phase_diffusion_text(out: Path, plan: DemoPlan, latents: dict[str, Path], ae_ckpt: Path,
                         accelerator: str) -> Path:
    trainer_cfg = write_trainer_config(out, accelerator, plan.text_steps, "diffusion-text")
    argv = ["fit", "-c", str(shipped_config("diffusion/mnist-dit-text-latents.yaml")), "-c", str(trainer_cfg),
            "--model.init_args.autoencoder", str(ae_ckpt),
            "--data.init_args.train_shards", str(latents["train"]),
            "--data.init_args.val_shards", str(latents["test"]), "--data.init_args.val_samples", "256",
            "--trainer.default_root_dir", str(out / "runs" / "diffusion-text")]
    return fit(argv, out / "checkpoints" / "diffusion-text.ckpt")


def _sample_batches(pipe, n: int, sampler: str, steps: int, scale: float, desc: str,
                    **condition) -> "torch.Tensor":
    """(n, 1, 32, 32) images in chunks of 200; `condition`: labels=[...] or prompts=[...] (n each)."""
    import torch
    from tqdm import tqdm

    from ldm_lightning.diffusion.sampling import SamplingConfig

    chunks = []
    for i in tqdm(range(0, n, 200), desc=desc, unit="batch"):
        part = {k: v[i : i + 200] for k, v in condition.items()}
        chunks.append(pipe.sample(min(200, n - i), SamplingConfig(sampler, steps, scale, seed=i), **part).cpu())
    return torch.cat(chunks)


def _save_class_grid(images, k: int, path: Path) -> None:
    """Class-major `images` (10·k, C, H, W) → a grid with one row per digit, at most 10 per row."""
    from ldm_lightning.evaluation import save_grid

    per_row = min(k, 10)
    rows = images.reshape(10, k, *images.shape[1:])[:, :per_row]  # (10, per_row, C, H, W)
    save_grid(rows.flatten(0, 1), path, nrow=per_row)


def _score(classifier, images, labels, test_x) -> dict:
    """Class accuracy (overall, per class) of conditioned samples and their MNIST-FID vs the real test set."""
    from ldm_lightning.evaluation import mnist_fid, sample_accuracy

    acc = sample_accuracy(classifier, images, labels)
    return {"class_accuracy": acc["accuracy"], "class_accuracy_per_class": acc["per_class"],
            "fid": mnist_fid(classifier, images, test_x)}


def phase_sample(out: Path, plan: DemoPlan, dm_ckpt: Path, ae_ckpt: Path, device: str) -> dict:
    """{cfg scale: (N, 1, 32, 32) images}, class-major (sample i has class i // samples_per_class)."""
    import torch

    from ldm_lightning.diffusion.sampling import load_pipeline
    from ldm_lightning.images import save_png, to_hwc_uint8

    pipe = load_pipeline(dm_ckpt, ae_ckpt, device, weights="ema")
    k = plan.samples_per_class
    labels = [c for c in range(10) for _ in range(k)]
    results = {scale: _sample_batches(pipe, len(labels), "dpmpp_2m", plan.sampler_steps, scale,
                                      f"sample cfg={scale}", labels=labels)  # (10k, 1, 32, 32)
               for scale in (plan.cfg, 1.0)}
    guided = results[plan.cfg]
    sdir = out / "samples"
    sdir.mkdir(parents=True, exist_ok=True)
    for j, img in enumerate(to_hwc_uint8(guided)):
        save_png(img, sdir / f"{labels[j]}_{j % k}.png")
    _save_class_grid(guided, k, sdir / "grid.png")
    return {"images": results, "labels": torch.tensor(labels)}


def phase_evaluate(plan: DemoPlan, classifier, samples: dict) -> dict:
    from ldm_lightning.evaluation import load_mnist_32, mnist_fid

    test_x, _ = load_mnist_32("test")  # (10000, 1, 32, 32): FID reference set
    n = len(samples["labels"])
    train_x, _ = load_mnist_32("train", limit=n)
    out = {"fid_real_train_vs_test": mnist_fid(classifier, train_x, test_x), "num_samples": n}
    for scale, images in samples["images"].items():
        key = f"cfg_{scale:g}"
        out[key] = _score(classifier, images, samples["labels"], test_x)
        print(f"samples cfg={scale:g}: class accuracy {out[key]['class_accuracy']:.4f}, MNIST-FID "
              f"{out[key]['fid']:.2f} (real train {n} vs test: {out['fid_real_train_vs_test']:.2f})")
    return out


def phase_text_evaluate(out: Path, plan: DemoPlan, classifier, text_ckpt: Path, ae_ckpt: Path, device: str) -> dict:
    """Samples of the text model prompted "a handwritten digit K" (K spelled out, as in the captions):
    class accuracy and MNIST-FID with CFG and without; `samples/text_grid.png` (one row per digit)."""
    import torch

    from ldm_lightning.data.mnist import caption
    from ldm_lightning.diffusion.sampling import load_pipeline
    from ldm_lightning.evaluation import load_mnist_32

    pipe = load_pipeline(text_ckpt, ae_ckpt, device, weights="ema")
    k = plan.samples_per_class
    labels = torch.tensor([c for c in range(10) for _ in range(k)])
    prompts = [caption(c) for c in labels.tolist()]
    test_x, _ = load_mnist_32("test")
    res = {"prompt_template": caption(7).replace("seven", "{K}"), "sampler": f"flow_heun, {plan.sampler_steps} steps"}
    for scale in (plan.cfg, 1.0):
        images = _sample_batches(pipe, len(prompts), "flow_heun", plan.sampler_steps, scale,
                                 f"text sample cfg={scale}", prompts=prompts)  # (10k, 1, 32, 32)
        r = res[f"cfg_{scale:g}"] = _score(classifier, images, labels, test_x)
        print(f"text samples cfg={scale:g}: class accuracy {r['class_accuracy']:.4f}, MNIST-FID {r['fid']:.2f}")
        if scale == plan.cfg:
            _save_class_grid(images, k, out / "samples" / "text_grid.png")
    return res


__all__ = ["VGG16_FILE", "accelerator_for", "find_vgg_weights", "fit", "lpips_overrides", "phase_autoencoder",
           "phase_diffusion", "phase_diffusion_text", "phase_encode", "phase_evaluate", "phase_pack",
           "phase_reconstruction", "phase_sample", "phase_text_evaluate", "shipped_config", "torch_device",
           "write_trainer_config"]
