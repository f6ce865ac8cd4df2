"""The demo's report: the README's results table from a run's `metrics.json`."""

from __future__ import annotations


def results_table(m: dict) -> str:
    """The README's results table (markdown) from a demo's metrics.json, every row with its command."""
    cmd = f"`{m['command'].strip()}`"
    ae, d = m["autoencoder"], m["diffusion"]
    g, u = d[f"cfg_{m['plan']['cfg']:g}"], d["cfg_1"]
    w = m["plan"]["cfg"]
    lpips = "L1 + KL + PatchGAN + LPIPS" if ae.get("lpips_vgg_weights") else "L1 + KL + PatchGAN (no local VGG16: LPIPS off)"
    rows = [
        ("MNIST classifier (the instrument), real test accuracy", f"{m['classifier']['test_accuracy']:.4f}", cmd),
        (f"autoencoder 32×32×1 → 8×8×4 ({lpips}), test PSNR / SSIM ({ae['images']} images)",
         f"{ae['psnr']:.2f} dB / {ae['ssim']:.4f}", cmd),
        ("latent scale factor (1 / std of the latents)", f"{ae['scale_factor']:.4f}", cmd),
        (f"class-conditional UNet, DPM-Solver++(2M) {m['plan']['sampler_steps']} steps: class accuracy, CFG {w:g} / "
         "no CFG", f"{g['class_accuracy']:.4f} / {u['class_accuracy']:.4f}", cmd),
        (f"class-conditional UNet: MNIST-FID ({d['num_samples']} samples vs real test), CFG {w:g} / no CFG",
         f"{g['fid']:.2f} / {u['fid']:.2f}", cmd),
        (f"reference: MNIST-FID of {d['num_samples']} real train images vs real test", f"{d['fid_real_train_vs_test']:.2f}",
         cmd),
    ]
    t = m.get("diffusion_text")
    if t:
        tg, tu = t[f"cfg_{w:g}"], t["cfg_1"]
        rows += [
            (f"text-conditional DiT (MiniLM), prompts \"{t['prompt_template']}\", {t['sampler']}: class accuracy, "
             f"CFG {w:g} / no CFG", f"{tg['class_accuracy']:.4f} / {tu['class_accuracy']:.4f}", cmd),
            (f"text-conditional DiT: MNIST-FID, CFG {w:g} / no CFG", f"{tg['fid']:.2f} / {tu['fid']:.2f}", cmd),
        ]
    ws = m["wall_seconds"]
    phases = ", ".join(f"{k} {v:.0f}" for k, v in ws.items() if k != "total")
    rows.append((f"wall time on {m['device']} (s): {phases}", f"{ws['total'] / 60:.1f} min", cmd))
    lines = ["| measured | value | command |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


__all__ = ["results_table"]
