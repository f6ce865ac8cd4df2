"""The demo's plan (how much work each phase does: `full` and `fast`) and the phase timer."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ldm_lightning.finite import check_finite_fields


@dataclass
class DemoPlan:
    """How much work each phase does; `full` fits 15 minutes on 2 CPU cores, `fast` about 11 (what the tests run)."""

    train_images: int | None
    """Train images packed (None = all 60,000)."""
    test_images: int | None
    """Test images packed (None = all 10,000); also the images reconstruction PSNR/SSIM is measured on."""
    ae_steps: int
    """Autoencoder optimizer steps (batch 64)."""
    ae_disc_start: int
    """Step at which the PatchGAN loss switches on."""
    diffusion_steps: int
    """Class-conditional diffusion optimizer steps (batch 128)."""
    text_steps: int
    """Text-conditional diffusion optimizer steps (batch 256; 0 = skip the text model)."""
    samples_per_class: int
    """Generated samples per digit class (per guidance setting)."""
    sampler_steps: int = 20
    """DPM-Solver++(2M) steps."""
    cfg: float = 3.0
    """Classifier-free guidance scale of the guided samples (1.0 = conditional only)."""

    def __post_init__(self):
        check_finite_fields(self, "demo plan")  # NaN/inf pass every comparison below
        for name in ("ae_steps", "diffusion_steps", "samples_per_class", "sampler_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo plan {name} must be >= 1, got {getattr(self, name)}")
        if self.text_steps < 0:
            raise ValueError(f"demo plan text_steps must be >= 0, got {self.text_steps}")
        if self.samples_per_class < 2:
            raise ValueError("demo plan samples_per_class must be >= 2 (FID needs a covariance)")


PLANS = {
    "full": DemoPlan(train_images=None, test_images=None, ae_steps=500, ae_disc_start=350,
                     diffusion_steps=800, text_steps=500, samples_per_class=100),
    "fast": DemoPlan(train_images=10000, test_images=2000, ae_steps=200, ae_disc_start=130,
                     diffusion_steps=400, text_steps=250, samples_per_class=20),
}


class Phases:
    """Times named phases and prints a banner per phase."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def run(self, name: str, fn, *args, **kwargs):
        print(f"\n=== [{len(self.seconds) + 1}] {name} ===", flush=True)
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - t, 2)
        print(f"=== {name}: {self.seconds[name]:.1f}s (total {self.total:.1f}s) ===", flush=True)
        return out

    @property
    def total(self) -> float:
        return time.perf_counter() - self._t0


__all__ = ["PLANS", "DemoPlan", "Phases"]
