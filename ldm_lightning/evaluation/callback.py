"""In-training sample quality: every N steps, FID/KID of K fresh samples from the EMA weights.

Turn it on for any diffusion run with the trainer-callback flag (jsonargparse appends to the config's list):

    ldm-lightning fit -c configs/diffusion/mnist-unet-class.yaml -c configs/trainer/cpu-debug.yaml \
        --trainer.callbacks+=ldm_lightning.evaluation.SampleQualityCallback \
        --trainer.callbacks.reference=mnist_test_stats.npz --trainer.callbacks.extractor=mnist \
        --trainer.callbacks.weights=mnist_classifier.safetensors --trainer.callbacks.every_n_steps=1000

Logged at the global step to every logger (W&B): `eval/fid`, `eval/kid` (and `eval/kid_std`, `eval/is`,
`eval/precision`, `eval/recall` when asked for), and the cost, `eval/seconds` and `eval/num_samples`.

Rank safety: every rank samples the same number of chunks (chunk c: seed `seed + 2c`, drawn by rank
c % world — the image set is the same at any world size), extracts their features and then makes the one
collective call of the evaluation; the scores are computed on every rank from the same gathered features,
so no rank waits for another beyond the sampling itself (keep K / world * cost well inside the collective
timeout: `eval/seconds` shows it).
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch import Callback

from .extractors import EXTRACTORS, build_extractor, check_weights
from .generated import features_of_samples
from .scores import METRICS, score_features
from .reference import load_reference


class SampleQualityCallback(Callback):
    def __init__(self, reference: str, weights: str, extractor: str = "inception", every_n_steps: int = 1000,
                 num_samples: int = 1000, batch_size: int = 50, metrics: list[str] | tuple[str, ...] = ("fid", "kid"),
                 sampler: str = "ddim", steps: int = 25, guidance_scale: float = 1.0, seed: int = 0,
                 prompts: list[str] | None = None, kid_subset_size: int = 1000):
        """
        Args:
            reference: Reference-statistics .npz of the real data (`ldm-lightning evaluate --save-stats`; KID
                needs the features it stores; pytorch-fid/ADM files with only mu/sigma give FID only).
            weights: Local weights of the extractor (a file; a folder for dinov2).
            extractor: Feature extractor: 'inception', 'dinov2' or 'mnist' (must match the reference's).
            every_n_steps: Evaluate after every this many optimizer steps.
            num_samples: Images sampled per evaluation (K), shared over the ranks.
            batch_size: Images per sampling chunk (per rank at a time).
            metrics: Subset of ('fid', 'kid', 'is', 'pr').
            sampler / steps / guidance_scale: Sampler name, its steps and the classifier-free guidance scale.
            seed: Base seed of the sample noise (fixed: successive evaluations see the same noise).
            prompts: Text-conditional models: prompts used in turn.
            kid_subset_size: KID subset size (capped at K).
        """
        super().__init__()
        if extractor not in EXTRACTORS:
            raise ValueError(f"SampleQualityCallback.extractor must be one of {EXTRACTORS}; got {extractor!r}")
        for name, v in (("every_n_steps", every_n_steps), ("batch_size", batch_size), ("steps", steps)):
            if v < 1:
                raise ValueError(f"SampleQualityCallback.{name} must be >= 1; got {v}")
        if num_samples < 2:
            raise ValueError(f"SampleQualityCallback.num_samples must be >= 2 (FID needs a covariance); "
                             f"got {num_samples}")
        bad = [m for m in metrics if m not in METRICS]
        if bad:
            raise ValueError(f"SampleQualityCallback.metrics must be among {METRICS}; got {bad}")
        self.reference_path, self.weights, self.extractor_name = reference, weights, extractor
        self.every_n_steps, self.num_samples, self.batch_size = every_n_steps, num_samples, batch_size
        self.metrics, self.sampler, self.steps, self.seed = tuple(metrics), sampler, steps, seed
        self.guidance_scale = guidance_scale
        self.prompts, self.kid_subset_size = prompts, kid_subset_size
        self._extractor = None
        self._reference = None
        self._last_step = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Fail at start-up, on every rank alike, not at the first evaluation hours later.
        self._reference = load_reference(self.reference_path, self.extractor_name)
        check_weights(self.extractor_name, self.weights, flag="SampleQualityCallback.weights")
        kind = pl_module.conditioner.cfg.kind
        if kind == "text" and not self.prompts:
            raise ValueError("SampleQualityCallback.prompts: this model is text-conditional; give prompts to sample")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps != 0 or step == 0:
            return  # one evaluation per optimizer step (gradient accumulation repeats the hook)
        self._last_step = step
        metrics = self.evaluate(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if trainer.is_global_zero:
            print("[sample-quality] step " + str(step) + ": "
                  + ", ".join(f"{k[5:]} {v:.4g}" for k, v in metrics.items()), flush=True)

    @torch.no_grad()
    def evaluate(self, trainer, pl_module) -> dict[str, float]:
        """{'eval/fid': ..., 'eval/kid': ..., 'eval/seconds': ..., 'eval/num_samples': K} (the same on every rank)."""
        from ldm_lightning.diffusion.sampling import SamplingConfig, sample_images

        t0 = time.perf_counter()
        if self._extractor is None:
            self._extractor = build_extractor(self.extractor_name, self.weights, pl_module.device,
                                              flag="SampleQualityCallback.weights")
        denoiser = pl_module.ema_or_live()
        was_training = denoiser.training
        denoiser.eval()

        def sample_fn(n, seed, **cond):
            config = SamplingConfig(self.sampler, self.steps, self.guidance_scale, seed)
            return sample_images(denoiser, pl_module.conditioner, pl_module.autoencoder, pl_module.meta["latent_shape"],
                                 n, config, **cond)
        try:
            fake, logits = features_of_samples(self._extractor, sample_fn, pl_module.conditioner, self.num_samples,
                                               self.batch_size, self.seed, trainer.global_rank, trainer.world_size,
                                               self.prompts)
        finally:
            denoiser.train(was_training)
        r = score_features(fake, logits, self._reference, self.metrics, kid_subset_size=self.kid_subset_size)
        names = {"fid": "fid", "kid_mean": "kid", "kid_std": "kid_std", "is_mean": "is", "precision": "precision",
                 "recall": "recall"}
        out = {f"eval/{names[k]}": float(v) for k, v in r.items() if k in names}
        out["eval/num_samples"] = float(len(fake))
        out["eval/seconds"] = time.perf_counter() - t0
        return out


__all__ = ["SampleQualityCallback"]
