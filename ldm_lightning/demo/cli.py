"""`ldm-lightning demo`'s command line: options, a quiet console, and the run of the phases in order."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from .phases import (
    VGG16_FILE,
    accelerator_for,
    find_vgg_weights,
    phase_autoencoder,
    phase_diffusion,
    phase_diffusion_text,
    phase_encode,
    phase_evaluate,
    phase_pack,
    phase_reconstruction,
    phase_sample,
    phase_text_evaluate,
    torch_device,
)
from .plan import PLANS, Phases
from .report import results_table

DESCRIPTION = "`ldm-lightning demo`: the whole system end to end on real MNIST, with measured quality."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-lightning demo", description=DESCRIPTION)
    p.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default outputs/demo)")
    p.add_argument("--fast", action="store_true", help="a reduced run (about 11 min on 2 CPU cores): fewer images and steps")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: the GPU when one is visible, else the CPU")
    p.add_argument("--lpips-weights", type=Path, default=None,
                   help=f"torchvision's {VGG16_FILE} for the autoencoder's LPIPS term (default: torch hub's "
                        "cache if the file is there; else LPIPS is off)")
    p.add_argument("--classifier-cache", type=Path, default=None,
                   help="where the MNIST classifier is cached (default $LDM_LIGHTNING_CACHE or ~/.cache/ldm-lightning)")
    return p


def quiet_console() -> None:
    """Drop third-party console noise a demo user can do nothing about; real warnings stay."""
    import logging
    import warnings

    # Lightning's own pytree use of torch's deprecated LeafSpec, and LightningCLI's note about args given
    # while sys.argv holds the demo's own options (the demo passes each phase's argv on purpose).
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within Python")
    # The stream's len() is exact per worker (data/stream.py deals shards to workers): no duplicates to warn of.
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")

    class _NoAdverts(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "litlogger" not in record.getMessage()  # Lightning's "💡 Tip: ... try installing litlogger"

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NoAdverts())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_console()
    plan = PLANS["fast" if args.fast else "full"]
    accelerator = accelerator_for(args.device)
    device = torch_device(accelerator)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    print(f"ldm-lightning demo ({'fast' if args.fast else 'full'}) on {device} → {out}\n{asdict(plan)}", flush=True)

    from ldm_lightning.evaluation import get_or_train_classifier

    phases = Phases()
    metrics: dict = {"mode": "fast" if args.fast else "full", "device": device, "plan": asdict(plan),
                     "command": " ".join(["ldm-lightning demo", *(argv if argv is not None else sys.argv[2:])])}

    def save():
        metrics["wall_seconds"] = dict(phases.seconds, total=round(phases.total, 2))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    data = phases.run("pack", phase_pack, out, plan)
    classifier = phases.run("classifier", get_or_train_classifier, args.classifier_cache, device=device)
    metrics["classifier"] = {k: classifier.metrics.get(k) for k in ("test_accuracy", "train_seconds")}
    vgg = find_vgg_weights(args.lpips_weights)
    ae_ckpt = phases.run("autoencoder", phase_autoencoder, out, plan, data, accelerator, vgg)
    metrics["autoencoder"] = phases.run("reconstruction", phase_reconstruction, out, plan, ae_ckpt, device)
    metrics["autoencoder"]["lpips_vgg_weights"] = str(vgg) if vgg else None
    save()
    latents = phases.run("encode", phase_encode, out, data, ae_ckpt, device)
    dm_ckpt = phases.run("diffusion", phase_diffusion, out, plan, latents, ae_ckpt, accelerator)
    samples = phases.run("sample", phase_sample, out, plan, dm_ckpt, ae_ckpt, device)
    metrics["diffusion"] = phases.run("evaluate", phase_evaluate, plan, classifier, samples)
    save()
    if plan.text_steps > 0:
        text_ckpt = phases.run("diffusion_text", phase_diffusion_text, out, plan, latents, ae_ckpt, accelerator)
        metrics["diffusion_text"] = phases.run("text_evaluate", phase_text_evaluate, out, plan, classifier,
                                               text_ckpt, ae_ckpt, device)
        save()
    (out / "results.md").write_text(results_table(metrics))
    print(f"\nmetrics → {out / 'metrics.json'}, table → {out / 'results.md'}; total wall time "
          f"{phases.total / 60:.1f} min")
    for name, s in phases.seconds.items():
        print(f"  {name:<15} {s:8.1f}s")
    return 0


__all__ = ["DESCRIPTION", "build_parser", "main", "quiet_console"]
