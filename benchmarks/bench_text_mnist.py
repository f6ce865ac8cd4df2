"""MNIST text-to-image at one small budget, three ways of conditioning on the caption: the frozen MiniLM on the fly,
the trained τθ (LDM §4.3), and the MiniLM's cached embeddings (`data encode --text-encoders`). Prints a markdown
table: class accuracy of the samples by the project's MNIST classifier and MNIST-FID.

    nice -n 10 python benchmarks/bench_text_mnist.py --steps 400 --batch 32 --num 200

Every variant is a DiffusionModule from the shipped text configs' model section (configs/diffusion/
mnist-dit-text-latents.yaml for MiniLM, mnist-dit-text-trained.yaml for τθ: flow matching, logit-normal t, caption
dropout 0.1, lr 1e-3) on 32² pixels through the identity autoencoder (no stage-1 training in the budget) with a
small DiT (patch 4, width `--width`, depth 4), trained for the same `--steps` at the same batch and seed on the
same in-memory MNIST train images with captions "a handwritten digit seven" (data/mnist.caption). The cached
variant reads the captions' MiniLM outputs stored in bf16 (diffusion/text_cache.py write_table + TextCache, as
`data encode` writes and training reads them) and loads no MiniLM. Sampling: the EMA weights, `--num` samples
prompted "a handwritten digit K" spread evenly over the ten digits, the same sampler, steps, CFG and noise.
FID (the classifier's features, against the first 2000 test images) is biased upwards at small N: compare rows
only within one run; the `real` line is the floor at this N.
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


class CaptionedMNIST(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        from ldm_lightning.data.mnist import caption
        self.x, self.y, self.txt = x, y, [caption(int(c)) for c in y]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "cls": self.y[i], "txt": self.txt[i]}


def model_kwargs(config: str, width: int, tau_width: int) -> dict:
    kw = copy.deepcopy(yaml.safe_load((CONFIGS / f"{config}.yaml").read_text())["model"]["init_args"])
    kw.update(autoencoder="identity:1x32", image_size=32, val_num=0)
    kw["backbone_config"] = {**kw.get("backbone_config", {}), "patch_size": 4, "hidden_size": width, "depth": 4}
    if "trainable_text" in kw["conditioning"]:
        kw["conditioning"]["trainable_text"].update(width=tau_width, depth=2)
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


def train(kwargs: dict, data, steps: int, batch: int, cache_root: Path | None, seed: int = 0):
    """(module, seconds per step) after `steps` optimizer steps."""
    import lightning as L

    from ldm_lightning.diffusion.module import DiffusionModule
    L.seed_everything(seed, verbose=False)
    module = DiffusionModule(**kwargs)
    if cache_root is not None:  # the module's MiniLM is then never loaded: the cache serves every caption
        module.conditioner.use_text_cache(cached_minilm(kwargs["conditioning"]["max_length"], cache_root))
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(seed))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        gradient_clip_val=1.0, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    return module.eval(), (time.perf_counter() - t0) / steps


@torch.no_grad()
def generate(module, num: int, sampler: str, steps: int, cfg: float) -> torch.Tensor:
    from ldm_lightning.data.mnist import caption
    from ldm_lightning.diffusion.sampling import SamplingConfig, sample_images
    prompts = [caption(i % 10) for i in range(num)]
    return sample_images(module.ema_or_live(), module.conditioner, module.autoencoder, module.meta["latent_shape"],
                         num, SamplingConfig(sampler, steps, cfg, seed=0), prompts=prompts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per variant")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--width", type=int, default=64, help="DiT hidden size")
    p.add_argument("--tau-width", type=int, default=64, help="τθ width (depth 2)")
    p.add_argument("--num", type=int, default=200, help="samples per variant (20 per digit at 200)")
    p.add_argument("--sampler", default="flow_euler")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--train-limit", type=int, default=20000, help="MNIST train images held in memory")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from ldm_lightning.encoders.mnist_classifier_cache import get_or_train_classifier
    from ldm_lightning.encoders.mnist_data import load_mnist_32
    from ldm_lightning.evaluation.mnist_metrics import mnist_fid, sample_accuracy
    clf = get_or_train_classifier(verbose=False)
    x, y = load_mnist_32("train", limit=a.train_limit)
    real, _ = load_mnist_32("test", limit=2000)
    data = CaptionedMNIST(x, y)
    labels = torch.tensor([i % 10 for i in range(a.num)])
    t_start = time.perf_counter()
    print(f"MNIST 32² pixels (identity autoencoder), DiT patch 4 width {a.width} depth 4, {a.steps} steps x batch "
          f"{a.batch} per variant, {a.num} samples ({a.sampler} {a.sample_steps} steps, CFG {a.cfg}, seed 0), torch "
          f"threads {a.threads}; FID vs 2000 test images; real floor at N={a.num}: "
          f"{mnist_fid(clf, x[:a.num], real):.2f}\n")
    print("| text conditioning | class accuracy | MNIST-FID | s/step |\n|---|---|---|---|", flush=True)
    variants = [("frozen MiniLM, on the fly", "mnist-dit-text-latents", False),
                (f"trained τθ (width {a.tau_width}, depth 2)", "mnist-dit-text-trained", False),
                ("frozen MiniLM, cached embeddings (bf16)", "mnist-dit-text-latents", True)]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, config, cached) in enumerate(variants):
            module, sps = train(model_kwargs(config, a.width, a.tau_width), data, a.steps, a.batch,
                                Path(tmp) / str(i) if cached else None)
            images = generate(module, a.num, a.sampler, a.sample_steps, a.cfg)
            acc = sample_accuracy(clf, images, labels)["accuracy"]
            print(f"| {label} | {acc:.3f} | {mnist_fid(clf, images, real):.2f} | {sps:.3f} |", flush=True)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
