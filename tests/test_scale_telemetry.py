"""FLOP counting, peak table, telemetry numbers, bf16-mixed, compile checkpoint round trip (in process,
single device)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from scale_tiny import TinyData, TinyModule

from ldm_lightning.training.flops import count_flops, peak_flops, training_flops_per_sample
from ldm_lightning.training.speed import compile_network
from ldm_lightning.training.telemetry import TelemetryCallback, batch_size_of


def test_flop_count_of_linear_is_analytic():
    n, a, b = 5, 7, 3
    layer = nn.Linear(a, b)
    x = torch.randn(n, a, requires_grad=True)
    assert count_flops(layer, x) == 2 * n * a * b  # forward: 2 FLOPs per multiply-add
    # forward + backward (grad wrt input and weight: 2 more matmuls of the same size)
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * n * a * b


def test_training_flops_hint_and_count():
    class Hinted(nn.Module):
        def flops_per_sample(self, batch):
            return 123.0

    assert training_flops_per_sample(Hinted(), {"image": torch.zeros(4, 1, 8, 8)}) == 123.0
    m = TinyModule(width=8)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    flops = training_flops_per_sample(m, {"image": torch.zeros(4, 1, 8, 8)})
    assert flops == 3 * 2 * 64 * 9 * (1 * 8 + 8 * 1)  # counted at batch 1, ×3 for backward
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # counting changed nothing


def test_peak_table_dense_bf16(monkeypatch):
    monkeypatch.delenv("LDM_PEAK_FLOPS", raising=False)
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("Some Unknown GPU") is None
    monkeypatch.setenv("LDM_PEAK_FLOPS", "1e15")
    assert peak_flops("Some Unknown GPU") == 1e15


def test_batch_size_of():
    assert batch_size_of({"image": torch.zeros(3, 1, 2, 2), "key": ["a"] * 3}) == 3
    assert batch_size_of({"moments": torch.zeros(5, 8, 2, 2)}) == 5
    with pytest.raises(ValueError, match="batch size"):
        batch_size_of({"txt": "x"})


def _fit(tmp_path, module, precision="32-true", steps=8, **telemetry):
    tel = TelemetryCallback(every_n_steps=4, **telemetry)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, precision=precision, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path, callbacks=[tel])
    trainer.fit(module, TinyData(batch_size=4))
    return trainer, tel


def test_telemetry_numbers_sane(tmp_path):
    _, tel = _fit(tmp_path, TinyModule(width=8))
    m = tel.last_metrics
    assert m["perf/images_per_sec"] > 0
    assert 0.0 <= m["perf/loader_stall_frac"] <= 1.0
    assert m["perf/samples_seen"] == 8 * 4
    assert m["perf/step_time_s"] > 0 and m["perf/peak_mem_gb"] > 0
    assert m["perf/flops_per_sample"] == 3 * 2 * 64 * 9 * 16
    assert "perf/mfu" not in m  # CPU: no peak to divide by
    tel2 = _fit(tmp_path, TinyModule(width=8), peak_flops_per_device=1e12)[1]
    assert 0 < tel2.last_metrics["perf/mfu"] < 1


def test_bf16_mixed_trains_on_cpu(tmp_path):
    module = TinyModule(width=8)
    w0 = module.net.conv.weight.detach().clone()
    trainer, tel = _fit(tmp_path, module, precision="bf16-mixed")
    assert trainer.global_step == 8
    assert module.net.conv.weight.dtype == torch.float32  # master weights stay fp32
    assert not torch.equal(w0, module.net.conv.weight.detach())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.slow
def test_compiled_checkpoint_loads_into_uncompiled_and_back(tmp_path):
    module = TinyModule(width=8, compile=True)
    trainer, _ = _fit(tmp_path, module, steps=4)
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert not any("_orig_mod" in k for k in state), list(state)
    plain = TinyModule(width=8, compile=False)
    plain.load_state_dict(state)  # strict: identical keys
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(plain.net(x), module.net(x), rtol=1e-5, atol=1e-5)
    # and back: an uncompiled checkpoint into a compiled module
    again = TinyModule(width=8, compile=True)
    again.load_state_dict(plain.state_dict())
    torch.testing.assert_close(again.net(x), plain.net(x), rtol=1e-5, atol=1e-5)


def test_compile_network_is_in_place():
    net = nn.Linear(2, 2)
    assert compile_network(net, False) is net and compile_network(net, True) is net
