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
