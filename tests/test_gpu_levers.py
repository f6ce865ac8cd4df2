"""GPU throughput levers, proven on CPU: each leaves outputs and gradients unchanged (within dtype rounding),
each is reachable from the CLI, host syncs per training step are counted, and the GPU bench builds every
configuration (`bash scripts/gpu_bench.sh --dry-run`). The speed itself is measured by scripts/gpu_bench.sh."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from float_paths import assert_close_for, largest, sum_length

ROOT = Path(__file__).resolve().parents[1]


def _fwd_bwd(net, *inputs, bf16: bool = True):
    """Output and parameter gradients of sum(out * w) under bf16 autocast (CPU), in float32 (float64 for a
    float64 net)."""
    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = net(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    dt = torch.float64 if out.dtype == torch.float64 else torch.float32
    w = torch.linspace(-1, 1, out.numel(), dtype=dt).reshape(out.shape)  # a fixed non-uniform upstream gradient
    (out.to(dt) * w).sum().backward()
    return out.to(dt).detach(), {n: p.grad.to(dt).clone() for n, p in net.named_parameters() if p.grad is not None}


class _Recon(torch.nn.Module):
    """Autoencoder reconstruction through the posterior mean (deterministic)."""

    def __init__(self, ae):
        super().__init__()
        self.ae = ae

    def forward(self, x):
        return self.ae(x, sample_posterior=False)[0]


def _conv_nets():
    from ldm_lightning.autoencoder import Autoencoder, get_preset
    from ldm_lightning.autoencoder.discriminator import NLayerDiscriminator
    from ldm_lightning.diffusion.presets import build_backbone
    torch.manual_seed(0)
    ae = Autoencoder(get_preset("tiny-mnist"))
    unet = build_backbone("unet-tiny", num_classes=10, model_channels=32, norm_groups=8, head_dim=16)
    for p in unet.parameters():  # zero-init output convs would make the gradients trivially equal
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 1, 16, 16)
    return [("autoencoder", _Recon(ae), (x,)), ("discriminator", NLayerDiscriminator(1, 32, 2), (x,)),
            ("unet", unet, (torch.randn(2, 4, 4, 4), torch.tensor([10.0, 500.0]), torch.tensor([1, 10])))]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["autoencoder", "discriminator", "unet"])
def test_channels_last_leaves_outputs_and_grads_unchanged_in_bf16(index):
    from ldm_lightning.training.speed import images_channels_last, to_channels_last
    name, net, inputs = _conv_nets()[index]
    cl = copy.deepcopy(net)
    to_channels_last(cl)
    assert any(p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in cl.parameters())
    inputs_cl = tuple(images_channels_last(t, True) for t in inputs)
    ref, ref_grads = _fwd_bwd(net, *inputs, bf16=False)  # fp32, NCHW: the reference
    out32, grads32 = _fwd_bwd(cl, *inputs_cl, bf16=False)
    n = sum_length(net, inputs[0])  # forward + backward; the output alone: sum_length(net)
    assert_close_for(out32, ref, sum_length(net), f"{name} fp32 output")  # the same function, up to summation order
    out, grads = _fwd_bwd(net, *inputs)
    out_cl, grads_cl = _fwd_bwd(cl, *inputs_cl)
    assert ref_grads.keys() == grads_cl.keys() == grads32.keys()

    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-12))
    # bf16: NHWC may round differently, but no worse than bf16 rounding itself (NCHW bf16 vs fp32)
    assert rel(out_cl, ref) <= 2 * rel(out, ref) + 1e-3, (name, rel(out_cl, ref), rel(out, ref))
    # gradients as one vector (some are exactly 0 in theory, e.g. a key bias under softmax: pure rounding)
    flat = lambda g: torch.cat([g[k].flatten() for k in sorted(ref_grads)])  # noqa: E731
    assert_close_for(flat(grads32), flat(ref_grads), n, f"{name} fp32 grads")  # scaled by the largest gradient
    assert rel(flat(grads_cl), flat(ref_grads)) <= 2 * rel(flat(grads), flat(ref_grads)) + 1e-3, name


@pytest.mark.parametrize("impl", ["fused", "foreach", "for_loop"])
def test_adamw_kernels_give_the_same_update(impl):
    from ldm_lightning.training.base import OptimConfig, adamw_kernel_kwargs
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    nets = {k: copy.deepcopy(net) for k in ("default", impl)}
    for key, n in nets.items():
        params = list(n.parameters())
        kw = adamw_kernel_kwargs(OptimConfig(implementation=impl).implementation if key == impl else "auto", params)
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, **kw)
        assert opt.defaults.get("fused") is (True if key == impl == "fused" else opt.defaults.get("fused"))
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            loss = n(torch.randn(4, 8, generator=g)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (k, a), b in zip(nets["default"].named_parameters(), nets[impl].parameters()):
        # the same gradients; the kernels order each element's update arithmetic differently: a few roundings
        # of the parameter per step (tests/float_paths.py)
        assert_close_for(b.detach(), a.detach(), 3 * 8, f"{impl} AdamW at {k}")


def test_adamw_auto_is_fused_only_on_cuda_and_bad_names_are_refused():
    from ldm_lightning.training.base import OptimConfig, adamw_kernel_kwargs
    assert adamw_kernel_kwargs("auto", [torch.zeros(1)]) == {}  # CPU: torch's default
    assert adamw_kernel_kwargs("auto", [{"params": [torch.zeros(1, device="meta")]}]) == {}
    assert adamw_kernel_kwargs("fused", [torch.zeros(1)]) == {"fused": True}
    with pytest.raises(ValueError, match="optim.implementation must be one of"):
        OptimConfig(implementation="apex")


def test_tf32_is_set_for_the_fit_only_and_only_on_cuda():
    from ldm_lightning.training.speed import MatmulPrecision
    before = torch.get_float32_matmul_precision()
    p = MatmulPrecision(tf32=True)
    p.enter(torch.device("cpu"))
    assert torch.get_float32_matmul_precision() == before  # CPU: untouched
    try:
        p.enter(torch.device("cuda", 0))  # only sets torch's global flag: no device needed
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        p.exit()
    assert torch.get_float32_matmul_precision() == before
    off = MatmulPrecision(tf32=False)
    off.enter(torch.device("cuda", 0))
    assert torch.get_float32_matmul_precision() == before


@pytest.mark.parametrize("family", ["dit", "unet"])
def test_compile_blocks_compiles_each_block_with_unchanged_outputs_and_grads(family):
    from ldm_lightning.diffusion.presets import build_backbone
    from ldm_lightning.training.speed import compile_network, compile_regions
    torch.manual_seed(0)
    net = build_backbone("dit-tiny" if family == "dit" else "unet-tiny", num_classes=10, **(
        {"depth": 2} if family == "dit" else {"model_channels": 32, "norm_groups": 8, "head_dim": 16}))
    for p in net.parameters():  # AdaLN-Zero / zero-init outputs would hide differences
        torch.nn.init.normal_(p, std=0.05)
    regional = compile_network(copy.deepcopy(net), True, "blocks", backend="eager")
    regions = compile_regions(regional)
    assert len(regions) == (2 if family == "dit" else len(net.down) + 1 + len(net.up))
    assert all(r._compiled_call_impl is not None for r in regions) and regional._compiled_call_impl is None
    assert torch._dynamo.config.recompile_limit >= 2 * len(regions)  # UNet stages share one code object
    assert [n for n, _ in regional.named_parameters()] == [n for n, _ in net.named_parameters()]  # ckpt keys
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([1, 10])
    out, grads = _fwd_bwd(net, x, t, y, bf16=False)
    out_c, grads_c = _fwd_bwd(regional, x, t, y, bf16=False)
    n = sum_length(net, x)  # compiled blocks may fuse and reorder sums: fp32 rounding, not a constant
    assert_close_for(out_c, out, sum_length(net), "output")
    for k in grads:
        assert_close_for(grads_c[k], grads[k], n, f"grad of {k}", scale=largest(grads.values()))


def test_compile_mode_is_validated():
    from ldm_lightning.training.speed import SpeedConfig, compile_network
    with pytest.raises(ValueError, match="speed.compile_mode must be one of"):
        SpeedConfig(compile_mode="layers")
    with pytest.raises(ValueError, match="compile_mode='model'"):
        compile_network(torch.nn.Linear(2, 2), True, "blocks")


@pytest.fixture(scope="module")
def minilm():
    from ldm_lightning.encoders import TextEncoderConfig, TextEncoders

    def states_and_mask(texts, device, trim=False):
        e = enc(texts, device, trim)
        return e.states, e.mask
    enc = TextEncoders([TextEncoderConfig()], max_length=16)
    states_and_mask.dim = enc.dim
    return states_and_mask


def test_trim_padding_drops_the_mask_only_when_no_caption_is_padded(minilm):
    cpu = torch.device("cpu")
    same = ["a photo of a digit", "a photo of a seven"]  # one token count each (MiniLM wordpieces)
    h, m = minilm(same, cpu)
    assert m is not None and not bool(m.all())  # padded to max_length=16: the mask rules flash out
    ht, mt = minilm(same, cpu, trim=True)
    assert mt is None and ht.shape[1] == int(m[0].sum()) and torch.equal(ht, h[:, :ht.shape[1]])
    mixed = ["a digit", "a handwritten digit seven on a black background"]
    h2, m2 = minilm(mixed, cpu, trim=True)
    assert m2 is not None and h2.shape[1] == int(m2[1].sum()) < 16 and not bool(m2[0].all())


@pytest.mark.parametrize("text_mode", ["cross_attn", "in_context"])
def test_trimmed_context_gives_the_same_dit_outputs_and_grads(minilm, text_mode):
    from ldm_lightning.diffusion.presets import build_backbone
    torch.manual_seed(0)
    net = build_backbone("dit-tiny", depth=2, context_dim=minilm.dim, text_mode=text_mode)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    caps = ["a photo of a digit", "a photo of a seven"]
    full, mask = minilm(caps, torch.device("cpu"))
    trimmed, none = minilm(caps, torch.device("cpu"), trim=True)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0])
    n = full.shape[0] * full.shape[1] * full.shape[2]  # the longest sums: over batch × context tokens × width
    # float64 proves the maths is the same (padded tokens masked out exactly); float32 then agrees up to its
    # rounding, which depends on the CPU's kernels and the thread count (tests/float_paths.py)
    for dt in (torch.float64, torch.float32):
        m = copy.deepcopy(net).to(dt)
        out, grads = _fwd_bwd(m, x.to(dt), t.to(dt), None, full.to(dt), mask, bf16=False)
        out_t, grads_t = _fwd_bwd(m, x.to(dt), t.to(dt), None, trimmed.to(dt), none, bf16=False)
        assert_close_for(out_t, out, sum_length(m), f"{dt} output")
        for k in grads:
            assert_close_for(grads_t[k], grads[k], n, f"{dt} grad of {k}", scale=largest(grads.values()))


def test_diffusion_module_speed_flags(tiny_ae):
    from ldm_lightning.diffusion.module import DiffusionModule
    m = DiffusionModule(tiny_ae, backbone="unet-tiny", val_num=0, compile=True,
                        speed={"channels_last": True, "compile_mode": "blocks"})
    net = m.denoiser.backbone
    w = net.conv_in.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert m.autoencoder.encoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    assert net._compiled_call_impl is None and net.mid._compiled_call_impl is not None
    assert m.hparams["speed"]["compile_mode"] == "blocks"


def test_pin_memory_is_on_only_for_cuda_and_batches_still_flow(mnist_shards):
    from ldm_lightning.data import ShardDataModule
    auto = ShardDataModule(mnist_shards["train"], batch_size=50, num_workers=1)
    assert auto.pins() is torch.cuda.is_available()  # None: decided by the device, never on CPU
    forced = ShardDataModule(mnist_shards["train"], val_shards=mnist_shards["test"], batch_size=50, num_workers=1,
                             val_samples=50, loader={"pin_memory": True})
    loader = forced.train_dataloader()
    assert loader.pin_memory and forced.val_dataloader().pin_memory
    batch = next(iter(loader))  # without CUDA torch skips pinning (with a warning); the batch is unchanged
    assert batch["image"].shape == (50, 1, 32, 32) and batch["image"].dtype == torch.uint8
    assert batch["image"].is_pinned() is torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_ring_and_fresh_batches_arrive_pinned(mnist_shards):
    from ldm_lightning.data import ShardDataModule
    for reuse in (True, False):
        dm = ShardDataModule(mnist_shards["train"], batch_size=50, num_workers=2, loader={"reuse_batch_memory": reuse})
        it = iter(dm.train_dataloader())
        assert all(next(it)["image"].is_pinned() for _ in range(4)), reuse


@pytest.mark.slow
def test_gpu_bench_dry_run_builds_every_configuration(tmp_path):
    """`bash scripts/gpu_bench.sh --dry-run`: every row of the GPU table built and stepped once on CPU (tiny
    stand-ins), the real DiT-B/2, DiT-XL/2 and SD UNet built on the meta device (XL's parameter count
    checked against the published one inside the script)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    bench = sys.modules["gpu_bench"] = importlib.util.module_from_spec(spec)  # (dataclasses look it up)
    spec.loader.exec_module(bench)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_bench.sh"), "--dry-run"], cwd=ROOT, text=True,
                          capture_output=True, timeout=300,
                          env={**os.environ, "OUT": str(tmp_path), "VENV": str(Path(sys.executable).parents[1])})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"DiT-XL/2 +674\.82 M params", out) and "FAILED" not in out  # the script checks it exactly
    for name in bench.MODELS:
        for row, _ in bench.rows_for(name):
            assert any(line.startswith(f"{name:9s} {row:15s}") for line in out.splitlines()), (name, row)
    assert "pageable host blocked" in out


@pytest.mark.slow
def test_host_syncs_per_training_step_are_counted(tiny_ae, monkeypatch, tmp_path):
    """CUDA-graph-friendliness: count the host reads of tensor values (`.item()`, `bool()`, `int()`, `float()`,
    `.tolist()`, `.cpu()` — each a device sync on a GPU) that our code makes in a steady-state training step
    of the DiffusionModule under a real Trainer. Loss-bin logging (10 syncs) runs only on logging steps;
    what remains every step is listed here, so a new sync in the hot path fails this test."""
    import collections
    import traceback

    import lightning as L

    from ldm_lightning.diffusion.module import DiffusionModule
    per_step: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    state = {"step": None}
    for name in ("item", "__bool__", "__int__", "__float__", "tolist", "cpu"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            if state["step"] is not None:
                frame = traceback.extract_stack(limit=2)[0]
                if "/ldm_lightning/" in frame.filename:
                    per_step[state["step"]][frame.filename.split("/ldm_lightning/")[1]] += 1
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)

    class Window(L.Callback):
        def on_train_batch_start(self, trainer, *a):
            state["step"] = trainer.global_step

        def on_train_batch_end(self, *a):
            state["step"] = None

    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            for _ in range(8):
                yield {"image": torch.rand(4, 1, 32, 32, generator=g) * 2 - 1,
                       "cls": torch.randint(0, 10, (4,), generator=g)}

    module = DiffusionModule(tiny_ae, backbone="unet-tiny", val_num=0,
                             conditioning={"kind": "class", "num_classes": 10})
    trainer = L.Trainer(max_steps=8, logger=L.pytorch.loggers.CSVLogger(str(tmp_path)), log_every_n_steps=3,
                        callbacks=[Window()], enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, torch.utils.data.DataLoader(Batches(), batch_size=None))
    logging = {2, 5}  # global steps whose metrics go to the logger (log_every_n_steps=3)
    for step in range(1, 8):
        syncs = per_step[step]
        print(step, dict(syncs))
        if step in logging:
            assert syncs["diffusion/loss.py"] == 10  # loss_by_bin: one per non-empty-bin check
        else:
            assert syncs["diffusion/loss.py"] == 0
        # every step: the non-finite guard's two checks (loss, grad norm), the class-label range check,
        # the EMA's decay ramp reading its update count
        assert {k: v for k, v in syncs.items() if k != "diffusion/loss.py"} == {
            "training/nonfinite_guard.py": 2, "diffusion/conditioning.py": 1, "nn/ema.py": 1}, dict(syncs)


@pytest.mark.slow
def test_cli_fit_with_every_lever_flag(tiny_ae, mnist_shards, tmp_path):
    """The user path: `ldm-lightning fit` with the shipped MNIST diffusion config and each lever's documented
    flag (fused AdamW, which the sync-free guard needs, runs on CPU too; compile itself is left off: CPU
    inductor compiles take minutes, compile_mode is still validated and recorded). The run trains, and its
    checkpoint records the flags."""
    from scale_run import TRAINER_CFG, run_cli
    run = tmp_path / "run"
    run_cli(["fit", "-c", str(ROOT / "configs" / "diffusion" / "mnist-unet-class.yaml"), "-c", str(TRAINER_CFG / "cpu-debug.yaml"),
             "--model.init_args.autoencoder", tiny_ae, "--model.init_args.val_num", "0",
             "--model.init_args.speed.channels_last", "true", "--model.init_args.speed.compile_mode", "blocks",
             "--model.init_args.speed.tf32", "true", "--model.init_args.optim.implementation", "fused",
             "--model.init_args.speed.sync_free_guard", "true",
             "--data.init_args.loader.pin_memory", "true",
             "--data.init_args.train_shards", mnist_shards["train"], "--data.init_args.val_shards", mnist_shards["test"],
             "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0", "--trainer.limit_val_batches", "0",
             "--trainer.max_steps", "3", "--trainer.default_root_dir", str(run)], tmp_path, timeout=300)
    ckpts = sorted(run.rglob("*.ckpt"))
    assert ckpts, list(run.rglob("*"))
    hp = torch.load(ckpts[-1], map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hp["speed"] == {"channels_last": True, "tf32": True, "compile_mode": "blocks", "sync_free_guard": True}
    assert hp["optim"]["implementation"] == "fused"
    proc = subprocess.run([sys.executable, "-m", "ldm_lightning", "fit", "-c",
                           str(ROOT / "configs" / "diffusion" / "mnist-unet-class.yaml"), "--model.init_args.autoencoder",
                           tiny_ae, "--model.init_args.speed.compile_mode", "layers"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "invalid config: speed.compile_mode must be one of" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


class _Batches(torch.utils.data.IterableDataset):
    """MNIST-sized random image batches; the ones in `nan_at` hold a NaN pixel (a non-finite loss)."""

    def __init__(self, n: int, nan_at=()):
        self.n, self.nan_at = n, set(nan_at)

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for i in range(self.n):
            x = torch.rand(4, 1, 32, 32, generator=g) * 2 - 1
            if i in self.nan_at:
                x[0, 0, 0, 0] = float("nan")
            yield {"image": x, "cls": torch.randint(0, 10, (4,), generator=g)}


@pytest.mark.slow
def test_sync_free_guard_skips_exactly_on_the_device_and_stops_on_a_streak(tiny_ae, tmp_path, monkeypatch, capsys):
    """speed.sync_free_guard: a NaN batch changes nothing (weights, EMA, AdamW moments and step count) with no
    host read of the guard between logging steps; a streak of guard.max_consecutive stops the run (at the
    next logging step) with the usual error and a stop checkpoint."""
    import lightning as L

    from ldm_lightning.diffusion.module import DiffusionModule
    from ldm_lightning.training.nonfinite_guard import NonFiniteLossError
    reads = []
    original = torch.Tensor.item

    def guard_read(convert):
        def read(self):
            frame = __import__("traceback").extract_stack(limit=2)[0].filename
            if frame.endswith(("training/base.py", "training/speed.py", "training/nonfinite_guard.py", "nn/ema.py")):
                reads.append(module.global_step)
            return convert(original(self))
        return read
    monkeypatch.setattr(torch.Tensor, "item", guard_read(lambda v: v))
    monkeypatch.setattr(torch.Tensor, "__int__", guard_read(int))

    snaps = []

    class Snap(L.Callback):
        def on_train_batch_end(self, trainer, m, *a):
            opt = trainer.optimizers[0]
            p = next(m.denoiser.parameters())
            snaps.append((p.detach().clone(), next(m.ema.module.parameters()).detach().clone(),
                          opt.state[p]["exp_avg"].clone(), float(original(opt.state[p]["step"]))))

    kw = dict(backbone="unet-tiny", val_num=0, conditioning={"kind": "class", "num_classes": 10},
              optim={"implementation": "fused", "lr": 1e-3}, speed={"sync_free_guard": True},
              guard={"max_consecutive": 3})
    module = DiffusionModule(tiny_ae, **kw)
    trainer = L.Trainer(max_steps=6, logger=L.pytorch.loggers.CSVLogger(str(tmp_path)), log_every_n_steps=3,
                        callbacks=[Snap()], enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path))
    trainer.fit(module, torch.utils.data.DataLoader(_Batches(6, nan_at={3}), batch_size=None))
    assert int(module.nonfinite_skipped) == 1 and int(module.nonfinite_consecutive) == 0
    for a, b in zip(snaps[3], snaps[2]):  # step 3 (NaN) left everything as step 2 did
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    assert not torch.equal(snaps[4][0], snaps[3][0]) and snaps[4][3] == snaps[2][3] + 1
    assert all(torch.isfinite(s[0]).all() for s in snaps)
    # the counters are read at the start (0) and after the logging steps (batches 2 and 5) only
    assert set(reads) <= {0, 3, 6}, reads
    assert "1 non-finite step(s) skipped up to global step 6" in capsys.readouterr().out

    module = DiffusionModule(tiny_ae, **kw)
    trainer = L.Trainer(max_steps=8, logger=False, log_every_n_steps=2, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=str(tmp_path / "streak"))
    stop = r"Stopped after 3 consecutive non-finite steps.*global step 1, before the first"
    with pytest.raises(NonFiniteLossError, match=stop):
        trainer.fit(module, torch.utils.data.DataLoader(_Batches(8, nan_at=range(1, 8)), batch_size=None))
    assert (tmp_path / "streak" / "checkpoints" / "nonfinite-stop.ckpt").is_file()
