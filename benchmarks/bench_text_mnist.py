"""MNIST text-to-image at one small budget, three ways of conditioning on the caption: the frozen MiniLM on the fly,
the trained τθ (LDM §4.3), and the MiniLM's cached embeddings (`data encode --text-encoders`). Prints a markdown
table: class accuracy of the samples by the project's MNIST classifier, MNIST-FID, and seconds per step.

    nice -n 10 python benchmarks/bench_text_mnist.py --steps 500 --batch 128 --num 200
    # docs/text-to-image.md's table: the autoencoder once (--ae-steps 200 --variants '' --save-autoencoder DIR),
    # then --autoencoder DIR --variants minilm / tau / cached in three processes side by side
    # longer: --ae-steps 1000 --steps 2000 --batch 256 --num 1000 --threads 8 (CPU only: the Trainer is built
    # with accelerator="cpu" and sampling runs on the CPU)

In LATENT space, as the demo's text model (0.99 class accuracy at 500 steps x batch 256 in the demo): first the tiny
MNIST autoencoder (configs/autoencoder/tiny-mnist.yaml's model section: 32x32x1 -> 8x8x4, L1 + KL, no PatchGAN in
this budget) is trained for `--ae-steps` on the in-memory train images, its latent scale set by
`compute_scale_factor` and exported (or `--autoencoder PATH` reuses a trained export/checkpoint); the train
images' latent moments are encoded once, as `data encode` writes them into latent shards. Every variant is then a
DiffusionModule from the shipped text configs' model section (configs/diffusion/mnist-dit-text-latents.yaml for
MiniLM, mnist-dit-text-trained.yaml for τθ: dit-tiny, flow matching, logit-normal t, caption dropout 0.1, lr 1e-3)
with only `--width` (DiT hidden size) and τθ's `--tau-width`/`--tau-depth` overridden, trained for the same
`--steps` at the same batch and seed on the same latents with captions "a handwritten digit seven"
(data/mnist.caption). The cached variant reads the captions' MiniLM outputs stored in bf16 (diffusion/text_cache.py
write_table + TextCache, as `data encode` writes and training reads them) and loads no MiniLM. Sampling: the EMA
weights, `--num` samples prompted "a handwritten digit K" spread evenly over the ten digits, the same sampler,
steps, CFG and noise. FID (the classifier's features, against the first 2000 test images) is biased upwards at
small N: compare rows only within one run; the `real` line is the floor at this N, `recon` the ceiling the
autoencoder allows (its reconstructions of N test images).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "diffusion"


class CaptionedLatents(torch.utils.data.Dataset):
    """Latent moments (mean ‖ logvar, as latent shards hold them) with the images' captions."""

    def __init__(self, moments: torch.Tensor, y: torch.Tensor):
        from ldm_lightning.data.mnist import caption
        self.moments, self.txt = moments, [caption(int(c)) for c in y]

    def __len__(self):
        return len(self.moments)

    def __getitem__(self, i):
        return {"moments": self.moments[i], "txt": self.txt[i]}


def quiet_trainer(steps: int):
    import lightning as L
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     gradient_clip_val=1.0, num_sanity_val_steps=0)


def train_autoencoder(x: torch.Tensor, steps: int, batch: int, out: Path) -> Path:
    """The tiny MNIST autoencoder (configs/autoencoder/tiny-mnist.yaml's model section; the PatchGAN starts after
    this budget), trained on the images `x`, its latent scale computed from them, exported to `out`."""
    import lightning as L

    from ldm_lightning.autoencoder import AutoencoderModule
    from ldm_lightning.autoencoder.export import export_autoencoder
    kw = copy.deepcopy(yaml.safe_load((CONFIGS.parent / "autoencoder" / "tiny-mnist.yaml").read_text())["model"]
                       ["init_args"])
    kw["loss"]["disc_start"] = steps + 1
    L.seed_everything(0, verbose=False)
    module = AutoencoderModule(**kw)
    loader = torch.utils.data.DataLoader([{"image": xi} for xi in x], batch_size=batch, shuffle=True,
                                         drop_last=True, generator=torch.Generator().manual_seed(0))
    quiet_trainer(steps).fit(module, loader)
    ae = module.ema_or_live().eval()
    ae.compute_scale_factor(x[i:i + 500] for i in range(0, min(len(x), 4000), 500))
    return export_autoencoder(ae, out)


@torch.no_grad()
def encode_moments(ae, x: torch.Tensor) -> torch.Tensor:
    """(N, 2c, h, w) mean ‖ logvar of the images `x`, what `data encode` stores per sample."""
    return torch.cat([torch.cat([p.mean, p.logvar], 1) for p in (ae.encode(x[i:i + 500]) for i in
                                                                  range(0, len(x), 500))])


def model_kwargs(config: str, autoencoder: str, width: int, tau_width: int, tau_depth: int) -> dict:
    kw = copy.deepcopy(yaml.safe_load((CONFIGS / f"{config}.yaml").read_text())["model"]["init_args"])
    kw.update(autoencoder=autoencoder, image_size=32, val_num=0)
    kw["backbone_config"] = {**kw.get("backbone_config", {}), "hidden_size": width}
    if "trainable_text" in kw["conditioning"]:
        kw["conditioning"]["trainable_text"].update(width=tau_width, depth=tau_depth)
    return kw


def cached_minilm(max_length: int, root: Path):
    """Write the ten captions' (and the empty caption's) MiniLM outputs as `data encode --text-encoders default`
    does (its own MiniLM, in this process), and return the reader training uses."""
    import json

    from ldm_lightning.data.mnist import caption
    from ldm_lightning.diffusion.text_cache import (EMPTY_TABLE, TEXT_CACHE_DIR, TextCache, manifest_section,
                                                    text_encoders_from_option, write_table)
    text = text_encoders_from_option("default", max_length)
    write_table(text, [""], root / TEXT_CACHE_DIR / EMPTY_TABLE, torch.device("cpu"), "bf16")
    write_table(text, [caption(k) for k in range(10)], root / TEXT_CACHE_DIR / "shard-000000.safetensors",
                torch.device("cpu"), "bf16")
    return TextCache(json.loads(json.dumps(manifest_section(text, "bf16"))), [root])


class StepTimer:
    """Median seconds per optimizer step after the first `skip` (start-up, first MiniLM load); the median, not the
    mean, because on a shared machine a few steps stall behind other jobs."""

    def __init__(self, skip: int = 5):
        import lightning as L

        class Cb(L.Callback):
            def on_train_batch_start(cb, *a):
                cb.t = time.perf_counter()

            def on_train_batch_end(cb, trainer, *a):
                if trainer.global_step > skip:
                    self.times.append(time.perf_counter() - cb.t)
        self.times: list[float] = []
        self.callback = Cb()

    @property
    def median(self) -> float:
        return float(torch.tensor(self.times).median()) if self.times else float("nan")


def train(kwargs: dict, data, steps: int, batch: int, cache_root: Path | None, seed: int = 0):
    """(module, median seconds per step) after `steps` optimizer steps."""
    import lightning as L

    from ldm_lightning.diffusion.module import DiffusionModule
    L.seed_everything(seed, verbose=False)
    module = DiffusionModule(**kwargs)
    if cache_root is not None:  # the module's MiniLM is then never loaded: the cache serves every caption
        module.conditioner.use_text_cache(cached_minilm(kwargs["conditioning"]["max_length"], cache_root))
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(seed))
    timer = StepTimer()
    trainer = quiet_trainer(steps)
    trainer.callbacks.append(timer.callback)
    trainer.fit(module, loader)
    return module.eval(), timer.median


@torch.no_grad()
def generate(module, num: int, sampler: str, steps: int, cfg: float) -> torch.Tensor:
    from ldm_lightning.data.mnist import caption
    from ldm_lightning.diffusion.sampling import SamplingConfig, sample_images
    prompts = [caption(i % 10) for i in range(num)]
    return sample_images(module.ema_or_live(), module.conditioner, module.autoencoder, module.meta["latent_shape"],
                         num, SamplingConfig(sampler, steps, cfg, seed=0), prompts=prompts)


VARIANTS = {"minilm": ("frozen MiniLM, on the fly", "mnist-dit-text-latents", False),
            "tau": ("trained τθ", "mnist-dit-text-trained", False),
            "cached": ("frozen MiniLM, cached embeddings (bf16)", "mnist-dit-text-latents", True)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=500, help="diffusion optimizer steps per variant")
    p.add_argument("--batch", type=int, default=128, help="diffusion batch size")
    p.add_argument("--width", type=int, default=128, help="DiT hidden size (dit-tiny's: 128)")
    p.add_argument("--tau-width", type=int, default=128, help="τθ width (the config's: 256)")
    p.add_argument("--tau-depth", type=int, default=2, help="τθ depth (the config's: 4)")
    p.add_argument("--autoencoder", default=None, help="a trained tiny-mnist export/checkpoint (default: train one)")
    p.add_argument("--ae-steps", type=int, default=200, help="autoencoder steps when training one (batch 64)")
    p.add_argument("--save-autoencoder", default=None, help="export the trained autoencoder here (for --autoencoder)")
    p.add_argument("--variants", default="minilm,tau,cached", help=f"comma-separated, of {','.join(VARIANTS)}")
    p.add_argument("--num", type=int, default=200, help="samples per variant (20 per digit at 200)")
    p.add_argument("--sampler", default="flow_euler")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--train-limit", type=int, default=20000, help="MNIST train images held in memory")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    if any(v not in VARIANTS for v in names):  # none: only the autoencoder and the reference lines
        p.error(f"--variants takes names of {', '.join(VARIANTS)}, got {a.variants!r}")
    torch.set_num_threads(a.threads)
    from ldm_lightning.autoencoder.load import load_autoencoder
    from ldm_lightning.encoders.mnist_classifier_cache import get_or_train_classifier
    from ldm_lightning.encoders.mnist_data import load_mnist_32
    from ldm_lightning.evaluation.mnist_metrics import mnist_fid, sample_accuracy
    clf = get_or_train_classifier(verbose=False)
    x, y = load_mnist_32("train", limit=a.train_limit)
    real, real_y = load_mnist_32("test", limit=2000)
    labels = torch.tensor([i % 10 for i in range(a.num)])
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ae_out = Path(a.save_autoencoder) if a.save_autoencoder else Path(tmp) / "ae"
        ae_path = a.autoencoder or str(train_autoencoder(x, a.ae_steps, 64, ae_out))
        ae = load_autoencoder(ae_path).eval()
        with torch.no_grad():
            recon = torch.cat([ae.decode(ae.encode(real[i:i + 500]).mode()).clamp(-1, 1)
                               for i in range(0, a.num, 500)])[:a.num]
        data = CaptionedLatents(encode_moments(ae, x), y)
        ae_s = time.perf_counter() - t_start
        print(f"MNIST latents 8x8x4 (tiny-mnist autoencoder, {'given' if a.autoencoder else f'{a.ae_steps} steps'}; "
              f"with encoding the train latents {ae_s:.0f} s), dit-tiny width {a.width}, {a.steps} steps x batch "
              f"{a.batch} per variant, {a.num} samples ({a.sampler} {a.sample_steps} steps, CFG {a.cfg}, seed 0), "
              f"torch threads {a.threads}; FID vs "
              f"2000 test images at N={a.num}: real {mnist_fid(clf, x[:a.num], real):.2f}, autoencoder "
              f"reconstructions {mnist_fid(clf, recon, real):.2f} (accuracy "
              f"{sample_accuracy(clf, recon, real_y[:a.num])['accuracy']:.3f})\n")
        print("| text conditioning | class accuracy | MNIST-FID | s/step |\n|---|---|---|---|", flush=True)
        for name in names:
            label, config, cached = VARIANTS[name]
            if name == "tau":
                label += f" (width {a.tau_width}, depth {a.tau_depth})"
            t = time.perf_counter()
            module, sps = train(model_kwargs(config, ae_path, a.width, a.tau_width, a.tau_depth), data, a.steps,
                                a.batch, Path(tmp) / name if cached else None)
            images = generate(module, a.num, a.sampler, a.sample_steps, a.cfg)
            acc = sample_accuracy(clf, images, labels)["accuracy"]
            print(f"| {label} | {acc:.3f} | {mnist_fid(clf, images, real):.2f} | {sps:.3f} |  "
                  f"<!-- {time.perf_counter() - t:.0f} s -->", flush=True)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
