"""Devices and precision: which processor runs the model, and in which number format."""

from __future__ import annotations

import contextlib
import platform

import torch

__all__ = ["autocast", "autocast_dtype", "check_environment", "grad_scaler", "pick_device"]


def pick_device() -> torch.device:
    """CUDA if present, then Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_environment() -> dict[str, str]:
    """Print the versions in use (importing maskrcnn_labelme already refused a too old one)."""
    import torchvision

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": str(pick_device()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return info


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision where it pays: bf16 on GPUs that support it, else fp16 on CUDA; none on
    CPU and MPS (fp32 there is both safe and, on most CPUs, not slower)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The mixed-precision context for ``device`` (see ``autocast_dtype``); a no-op without it."""
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device: torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler where training runs in float16, else None.

    float16 holds numbers down to about 6e-8 only: small gradients would round to zero. The
    scaler multiplies the loss before backward and divides the gradients before the optimizer
    step, skipping a step whose gradients overflowed. bfloat16 and float32 need none.
    """
    return torch.amp.GradScaler("cuda") if autocast_dtype(device) == torch.float16 else None
