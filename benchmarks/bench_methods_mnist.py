"""Issue 18's method comparisons on MNIST 32² pixels at one small training budget: JiT's prediction spaces,
REPA on/off, DDT encoder reuse. Prints markdown tables.

    nice -n 10 python benchmarks/bench_methods_mnist.py --steps 300 --num 200 [--what jit,repa,ddt]
    # the README's tables: --steps 1500 --batch 32 --num 100 --width 64 --repa-eval-at 500,1000,1500,2000

Every variant is a DiffusionModule built from a shipped config (configs/diffusion/mnist-jit-pixels.yaml,
mnist-dit-repa.yaml, mnist-ddt-pixels.yaml) with the overrides named in its row, trained for the same
`--steps` optimizer steps at the same batch size and seed (Lightning Trainer on the CPU, the module's own
compute_loss; the MNIST train split held in memory instead of shards), then sampled from the EMA weights with
the same sampler, steps, guidance and noise (seed 0), `--num` samples spread evenly over the 10 classes.

Scores (evaluation package): class accuracy of the samples by the project's MNIST classifier
(`get_or_train_classifier()`, the cache `ldm-lightning evaluate --extractor mnist` and the demo use), and
MNIST-FID against the first 2000 test images. FID is biased upwards at small N: compare rows only within one
run; the `real` row (N train images vs the same test images) is the floor at this N.

- jit: x-prediction + v-loss (JiT) vs v-prediction vs eps-prediction, at the config's 4x4 patches (width 128)
  and at 8x8 patches on a narrow model (width 32 < 64 = p^2 C: JiT's regime of patches wider than the model).
- repa: the same pixel DiT without and with REPA (block 2, lambda 0.5, the MNIST classifier's 8x8 conv map as
  the frozen target: note the target and the measuring classifier are the same network); with --repa-eval-at
  a curve over steps from one run per variant (REPA's claim is faster convergence).
- ddt: one DDT trained once, sampled with the encoder recomputed every k network calls (k = 1..4): encoder
  evaluations, MSE of the samples against the k = 1 samples from the same noise, class accuracy.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "diffusion"


WIDTH: int | None = None  # --width: the hidden size of the patch-4 models (None = the configs')


def config_kwargs(name: str, **overrides) -> dict:
    """model.init_args of a shipped config, nested dicts merged with `overrides`; no validation samples."""
    kw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"]["init_args"]
    kw = copy.deepcopy(kw)
    if WIDTH is not None:
        kw["backbone_config"]["hidden_size"] = WIDTH
    for k, v in overrides.items():
        kw[k] = {**kw[k], **v} if isinstance(v, dict) and isinstance(kw.get(k), dict) else v
    kw["val_num"] = 0
    return kw


class MNISTBatches(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "cls": self.y[i]}


def train(kwargs: dict, data: MNISTBatches, steps: int, batch: int, seed: int = 0, callbacks=()):
    """(module, seconds per step) after `steps` optimizer steps."""
    import lightning as L

    from ldm_lightning.diffusion.module import DiffusionModule
    L.seed_everything(seed, verbose=False)
    module = DiffusionModule(**kwargs)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(seed))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        gradient_clip_val=1.0, num_sanity_val_steps=0, callbacks=list(callbacks))
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    return module.eval(), (time.perf_counter() - t0) / steps


@torch.no_grad()
def generate(module, num: int, sampler: str, steps: int, cfg: float, encoder_every: int = 1) -> torch.Tensor:
    from ldm_lightning.diffusion.sampling import SamplingConfig, sample_images
    labels = [i % 10 for i in range(num)]
    return sample_images(module.ema_or_live(), module.conditioner, module.autoencoder, module.meta["latent_shape"],
                         num, SamplingConfig(sampler, steps, cfg, seed=0, encoder_every=encoder_every), labels=labels)


def eval_during_training(at: list[int], evaluate):
    """A callback that calls evaluate(module, step) after the optimizer steps in `at` (REPA's claim is about
    convergence speed, so its comparison is a curve over steps, from one run per variant)."""
    import lightning as L

    class EvalAt(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            if trainer.global_step in at:
                was_training = module.training
                module.eval()
                evaluate(module, trainer.global_step)
                module.train(was_training)
    return EvalAt()


def scores(clf, images: torch.Tensor, real: torch.Tensor) -> tuple[float, float]:
    from ldm_lightning.evaluation.mnist_metrics import mnist_fid, sample_accuracy
    labels = torch.tensor([i % 10 for i in range(len(images))])
    return sample_accuracy(clf, images, labels)["accuracy"], mnist_fid(clf, images, real)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per variant")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--num", type=int, default=200, help="samples per variant (20 per class at 200)")
    p.add_argument("--sampler", default="flow_euler")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--train-limit", type=int, default=20000, help="MNIST train images held in memory")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the shared CPU machine: 1)")
    p.add_argument("--what", default="jit,repa,ddt")
    p.add_argument("--repa-eval-at", default="",
                   help="comma-separated steps: REPA on/off evaluated along one run each (a curve; replaces the "
                        "single --steps point, trains to the largest)")
    p.add_argument("--width", type=int, default=None,
                   help="hidden size of the patch-4 DiT / DDT (default: the configs' 128; smaller fits a CPU budget)")
    a = p.parse_args(argv)
    global WIDTH
    WIDTH = a.width
    torch.set_num_threads(a.threads)
    from ldm_lightning.evaluation.mnist_metrics import mnist_fid
    from ldm_lightning.encoders.mnist_classifier_cache import get_or_train_classifier
    from ldm_lightning.encoders.mnist_data import load_mnist_32
    what = set(a.what.split(","))
    clf = get_or_train_classifier(verbose=False)
    x, y = load_mnist_32("train", limit=a.train_limit)
    real, _ = load_mnist_32("test", limit=2000)
    data = MNISTBatches(x, y)
    t_start = time.perf_counter()
    print(f"MNIST 32² pixels, width {a.width or 'as configured'}, {a.steps} steps x batch {a.batch} per variant, "
          f"{a.num} samples ({a.sampler} "
          f"{a.sample_steps} steps, CFG {a.cfg}, seed 0), torch threads {a.threads}; FID vs 2000 test images; "
          f"real floor at N={a.num}: {mnist_fid(clf, x[:a.num], real):.2f}\n")

    def row(label, kwargs, **gen):
        module, sps = train(kwargs, data, a.steps, a.batch)
        images = generate(module, a.num, a.sampler, a.sample_steps, a.cfg, **gen)
        acc, fid = scores(clf, images, real)
        print(f"| {label} | {acc:.3f} | {fid:.2f} | {sps:.3f} |", flush=True)
        return module

    if "jit" in what:
        print("| JiT variant (flow schedule, logit-normal(+0.8, 0.8)) | class accuracy | MNIST-FID | s/step |")
        print("|---|---|---|---|")
        spaces = [("x-pred + v-loss", "x0", "flow"), ("v-pred", "flow", "flow"), ("eps-pred", "eps", "eps")]
        for patch, bb in ((4, {}), (8, {"patch_size": 8, "hidden_size": 32, "num_heads": 2})):
            for label, pred, loss in spaces:
                kw = config_kwargs("mnist-jit-pixels", objective={"prediction": pred, "loss_space": loss},
                                   backbone_config=bb)
                width = kw["backbone_config"]["hidden_size"]
                row(f"{label}, patch {patch}, width {width}", kw)
        print()
    if "repa" in what:
        variants = (("without REPA (mnist-jit-pixels)", config_kwargs("mnist-jit-pixels")),
                    ("with REPA, block 2, lambda 0.5 (mnist-dit-repa)", config_kwargs("mnist-dit-repa")))
        if not a.repa_eval_at:
            print("| REPA (pixel DiT, x-pred + v-loss, patch 4) | class accuracy | MNIST-FID | s/step |")
            print("|---|---|---|---|")
            for label, kw in variants:
                row(label, kw)
        else:
            at = sorted(int(s) for s in a.repa_eval_at.split(","))
            print("| REPA curve (pixel DiT, x-pred + v-loss, patch 4) | step | class accuracy | MNIST-FID |\n"
                  "|---|---|---|---|")
            for label, kw in variants:
                def evaluate(module, step, label=label):
                    acc, fid = scores(clf, generate(module, a.num, a.sampler, a.sample_steps, a.cfg), real)
                    print(f"| {label} | {step} | {acc:.3f} | {fid:.2f} |", flush=True)
                _, sps = train(kw, data, at[-1], a.batch, callbacks=[eval_during_training(at, evaluate)])
                print(f"| {label}: {sps:.3f} s/step over {at[-1]} steps (sampling included) | | | |", flush=True)
        print()
    if "ddt" in what:
        module, sps = train(config_kwargs("mnist-ddt-pixels"), data, a.steps, a.batch)
        net = module.ema_or_live().backbone
        print(f"| DDT (3 encoder + 1 decoder blocks, {sps:.3f} s/step) encoder every k calls | encoder NFE | "
              f"decoder NFE | MSE vs k=1 | class accuracy | MNIST-FID | sampling s |")
        print("|---|---|---|---|---|---|---|")
        base = None
        for k in (1, 2, 3, 4):
            net.encoder_nfe = net.decoder_nfe = 0
            t0 = time.perf_counter()
            images = generate(module, a.num, a.sampler, a.sample_steps, a.cfg, encoder_every=k)
            secs = time.perf_counter() - t0
            base = images if base is None else base
            acc, fid = scores(clf, images, real)
            mse = float((images - base).pow(2).mean())
            print(f"| k = {k} | {net.encoder_nfe} | {net.decoder_nfe} | {mse:.5f} | {acc:.3f} | {fid:.2f} | "
                  f"{secs:.1f} |", flush=True)
        print()
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
