"""Mixed precision follows what the GPU really computes, with the capability faked here."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from maskrcnn_labelme import devices

CUDA = torch.device("cuda")


@pytest.mark.parametrize("capability, expected", [
    ((7, 5), torch.float16),   # T4, Colab's free GPU: emulated bfloat16 would be slow
    ((7, 0), torch.float16),   # V100
    ((8, 0), torch.bfloat16),  # A100
    ((8, 9), torch.bfloat16),  # L4, RTX 40xx
    ((9, 0), torch.bfloat16),  # H100, H200
])
def test_bfloat16_only_where_the_gpu_has_it(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 says
    assert devices.autocast_dtype(CUDA) == expected


def test_float16_gets_a_gradient_scaler_and_the_rest_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert isinstance(devices.grad_scaler(CUDA), torch.amp.GradScaler)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert devices.grad_scaler(CUDA) is None


@pytest.mark.parametrize("kind", ["cpu", "mps"])
def test_cpu_and_mps_train_in_float32(kind):
    assert devices.autocast_dtype(torch.device(kind)) is None
    assert devices.grad_scaler(torch.device(kind)) is None
    assert "float32" in devices.precision_summary(torch.device(kind))


def test_the_summary_names_the_format(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert devices.precision_summary(CUDA) == "Tesla T4: mixed precision, float16 with a gradient scaler"


def test_a_colab_cpu_runtime_is_told_how_to_get_a_gpu(monkeypatch):
    assert "Change runtime type" not in devices.gpu_advice(torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert "Change runtime type" in devices.gpu_advice(torch.device("cpu"))
    assert devices.gpu_advice(CUDA) is None


# -- bfloat16 on the CPU: only where the CPU computes it, asked of the CPU, with the answer faked --

CPU = torch.device("cpu")


@pytest.fixture
def cpu_answer(monkeypatch):
    """Make ``cpu_bf16_native`` answer `value`."""
    def fake(value: bool) -> None:
        monkeypatch.setattr(devices, "cpu_bf16_native", lambda: value)
    yield fake


def test_cpu_bf16_is_used_only_when_asked_and_native(cpu_answer):
    cpu_answer(True)
    assert devices.autocast_dtype(CPU, cpu_bf16=True) == torch.bfloat16
    assert devices.autocast_dtype(CPU) is None  # off by default
    assert devices.grad_scaler(CPU) is None     # bfloat16 has float32's range: no scaler
    assert "bfloat16" in devices.precision_summary(CPU, cpu_bf16=True)
    assert "natively" in devices.cpu_precision_note(CPU, True)
    cpu_answer(False)
    assert devices.autocast_dtype(CPU, cpu_bf16=True) is None  # the fallback: float32
    assert "float32" in devices.precision_summary(CPU, cpu_bf16=True)
    assert "stays in float32" in devices.cpu_precision_note(CPU, True)
    assert devices.cpu_precision_note(CPU, False) is None
    assert devices.autocast_dtype(torch.device("mps"), cpu_bf16=True) is None


class _TinyDetector(torch.nn.Module):
    """Takes images and targets and returns a dict of losses, as Mask R-CNN does in training;
    records the number format its convolution computed in."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.seen = []

    def forward(self, images, targets):
        out = self.conv(torch.stack(images))
        self.seen.append(out.dtype)
        return {"loss_a": out.float().pow(2).mean(), "loss_b": out.float().abs().mean()}


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_train_step_follows_the_cpu_answer(cpu_answer, native, expected):
    from maskrcnn_labelme import engine

    cpu_answer(native)
    torch.manual_seed(0)
    model = _TinyDetector()
    before = model.conv.weight.detach().clone()
    optimizer, scheduler = engine.make_optimizer(model, 1e-2, total_steps=2)
    losses = engine.train_step(model, [torch.rand(3, 8, 8)], [{}], optimizer, scheduler, cpu_bf16=True)
    assert model.seen == [expected]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert model.conv.weight.dtype == torch.float32 and not torch.equal(model.conv.weight, before)


@pytest.mark.parametrize("torch_says, cpuinfo, expected", [
    ({"_is_avx512_bf16_supported": True}, "", True),                    # Xeon, Zen 4
    ({"_is_amx_tile_supported": True}, "", True),                       # Sapphire Rapids
    ({}, "flags : fpu sse2 avx2 fma", False),                           # an AVX2 laptop or this CI
    ({}, "Features : fp asimd sve bf16 i8mm", True),                    # Graviton 3 (Arm, Linux)
    ({}, "", False),                                                    # unreadable: never assumed
])
def test_the_cpu_is_asked_never_assumed(monkeypatch, torch_says, cpuinfo, expected):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda value=torch_says.get(name, False): value, raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(devices, "_linux_cpuinfo", lambda: cpuinfo)
    devices.cpu_bf16_native.cache_clear()
    try:
        assert devices.cpu_bf16_native() is expected
    finally:
        devices.cpu_bf16_native.cache_clear()


@pytest.mark.parametrize("answer, expected", [("1", True), ("0", False), ("", False)])
def test_a_mac_is_asked_through_sysctl(monkeypatch, answer, expected):
    import subprocess

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    asked = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: asked.append(command)
                        or subprocess.CompletedProcess(command, 0, stdout=answer + "\n"))
    devices.cpu_bf16_native.cache_clear()
    try:
        assert devices.cpu_bf16_native() is expected
    finally:
        devices.cpu_bf16_native.cache_clear()
    assert asked == [["sysctl", "-n", "hw.optional.arm.FEAT_BF16"]]
