"""`ldm-lightning` — the command-line face. Nothing in the package imports this module.

Training subcommands (`fit`, `validate`, `test`) are LightningCLI / jsonargparse:
    ldm-lightning fit -c configs/autoencoder/kl-f8.yaml --trainer.max_steps 1000
Tool subcommands each own an argparse parser in the module that implements them:
    ldm-lightning data pack | data encode | data verify | data index | sample | export | demo
Heavy imports happen only inside the chosen subcommand, so `--help` is instant.
Every subcommand treats an error in the user's input alike: one paragraph, exit 2, `--debug` (or LDM_DEBUG=1)
for the traceback (user_errors.py; `fit` in training/lightning_cli.py).
"""

from __future__ import annotations

import importlib
import os
import sys

from ldm_lightning.user_errors import run_tool

# name -> (module path, one-line help). Each module exposes `main(argv: list[str]) -> int | None`.
TOOLS = {
    ("data", "pack"): ("ldm_lightning.data.pack", "Pack MNIST or an image folder into WebDataset shards + manifest.json"),
    ("data", "encode"): ("ldm_lightning.diffusion.encode", "Encode image shards into latent shards with a trained autoencoder"),
    ("data", "verify"): ("ldm_lightning.data.verify", "Check a shard folder against its manifest (counts, sizes, sha256)"),
    ("data", "index"): ("ldm_lightning.data.index", "Count the samples of shards you already have (tar headers only) into a manifest.json"),
    ("sample",): ("ldm_lightning.diffusion.sample", "Sample images from a trained diffusion checkpoint"),
    ("export",): ("ldm_lightning.export", "Export an autoencoder (diffusers/safetensors) or denoiser (safetensors, DiT: diffusers, LoRA adapters: lora)"),
    ("import",): ("ldm_lightning.diffusion.importer", "Convert published DiT weights (facebookresearch .pt, diffusers folder) to a denoiser export"),
    ("evaluate",): ("ldm_lightning.evaluation.evaluate", "FID, KID, IS, precision/recall of images or of a checkpoint's samples"),
    ("ema-reconstruct",): ("ldm_lightning.ema_reconstruct", "Synthesise the EMA of any length from post-hoc EMA snapshots (EDM2)"),
    ("demo",): ("ldm_lightning.demo", "The end-to-end MNIST demo: both stages, sampling, measured quality"),
}
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")


def _usage() -> str:
    lines = ["usage: ldm-lightning <command> [options]", "", "training (LightningCLI; -c CONFIG.yaml, --print_config):"]
    for sub in LIGHTNING_SUBCOMMANDS:
        lines.append(f"  {sub:<14} {sub} a model from a config")
    lines.append("")
    lines.append("tools:")
    for words, (_, help_) in TOOLS.items():
        lines.append(f"  {' '.join(words):<14} {help_}")
    lines.append("")
    lines.append("Run `ldm-lightning <command> --help` for the options of a command.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from ldm_lightning import __version__
        print(__version__)
        return 0
    # Every weight loader takes a local path (and passes local_files_only): the Hugging Face hub must not
    # reach for the network either, e.g. to check for a newer tokenizer. Set at the entry, not on import.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if argv[0] in LIGHTNING_SUBCOMMANDS:
        from ldm_lightning.shipped_configs import ConfigNotFound, resolve_argv
        try:
            argv = resolve_argv(argv)  # `-c ldm_lightning:trainer/cpu-debug.yaml`: a config shipped in the package
        except ConfigNotFound as e:
            print(f"ldm-lightning: {e}", file=sys.stderr)
            return 2
        from ldm_lightning.training.lightning_cli import run_lightning_cli
        return run_lightning_cli(argv)
    for n in (2, 1):
        key = tuple(argv[:n])
        if key in TOOLS:
            # Heavy imports happen here too: a missing optional extra is a user error like any other.
            return run_tool(f"ldm-lightning {' '.join(key)}",
                            lambda args: importlib.import_module(TOOLS[key][0]).main(args), argv[n:])
    if argv[0] == "data":
        print("usage: ldm-lightning data {pack,encode,verify,index} [options]\n\n"
              + "\n".join(f"  {w[1]:<8} {h}" for w, (_, h) in TOOLS.items() if w[0] == "data"))
        return 0 if len(argv) > 1 and argv[1] in ("-h", "--help") else 2
    print(f"ldm-lightning: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())


def console_main() -> None:
    sys.exit(main())
