"""Devices and precision: which processor runs the model, and in which number format."""

from __future__ import annotations

import contextlib
import functools
import platform
import subprocess
import sys
from pathlib import Path

import torch

__all__ = [
    "autocast", "autocast_dtype", "check_environment", "cpu_bf16_native", "cpu_precision_note", "gpu_advice",
    "grad_scaler", "pick_device", "precision_summary",
]


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


@functools.cache
def cpu_bf16_native() -> bool:
    """Whether this computer's CPU computes bfloat16 in hardware, asked of the CPU, never assumed.

    x86: AVX512-BF16 or AMX (Intel Xeon from Cooper Lake and Sapphire Rapids, AMD Zen 4 and
    newer), as PyTorch's own CPU checks report them, else the Linux CPU flags. Arm: the BF16
    extension (Apple M2 and newer, Graviton 3 and newer), from macOS's ``sysctl`` or the Linux
    CPU flags. Anything that cannot be read counts as no: PyTorch would then emulate bfloat16 in
    float32 arithmetic, which is slower than plain float32.
    """
    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        try:
            if getattr(torch.cpu, check)():
                return True
        except Exception:  # noqa: BLE001 - older PyTorch or another processor: ask the OS below
            pass
    if sys.platform == "darwin":
        try:
            answer = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True,
                                    text=True, timeout=5, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return False
        return answer == "1"
    words = set(_linux_cpuinfo().split())
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})  # "bf16": the Arm feature's name there


def _linux_cpuinfo() -> str:
    """The text of /proc/cpuinfo, or "" where there is none (Windows) or it cannot be read."""
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def autocast_dtype(device: torch.device, cpu_bf16: bool = False) -> torch.dtype | None:
    """The number format of the forward pass: the fastest one the processor really computes in.

    - NVIDIA GPUs of compute capability 8.0 and newer (A100, RTX 30xx, L4, H100): bfloat16, which
      has float32's range, so no gradient scaling is needed.
    - Older NVIDIA GPUs (Colab's free T4 is 7.5, V100 7.0): float16 with a gradient scaler
      (``grad_scaler``). They have no bfloat16 units: ``torch.cuda.is_bf16_supported()`` says
      True on a T4 because PyTorch can emulate it, and emulated bfloat16 is slower than float32.
    - CPU: float32, unless `cpu_bf16` asks for bfloat16 and the CPU computes it natively
      (``cpu_bf16_native``); on any other CPU the request falls back to float32
      (``cpu_precision_note`` says so). It is a choice, off by default: the CPU this was developed on
      has no bfloat16 units, so its speed and accuracy are not measured.
    - Apple's MPS: float32. Its float16 autocast covers fewer operations of Mask R-CNN, and no
      measurement here says it pays; fp32 is the safe choice.
    """
    if device.type == "cpu":
        return torch.bfloat16 if cpu_bf16 and cpu_bf16_native() else None
    if device.type != "cuda":
        return None
    major, _minor = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def cpu_precision_note(device: torch.device, cpu_bf16: bool) -> str | None:
    """What becomes of a request for bfloat16 on the CPU (None where there was none)."""
    if not cpu_bf16 or device.type != "cpu":
        return None
    if cpu_bf16_native():
        return "cpu_bf16: this CPU computes bfloat16 natively; the forward pass of training runs in bfloat16."
    return ("cpu_bf16: this CPU has no bfloat16 units (no AVX512-BF16, AMX or Arm BF16); emulated, bfloat16 "
            "would be slower than float32, so training stays in float32.")


def precision_summary(device: torch.device, cpu_bf16: bool = False) -> str:
    """One line for a notebook: the device and the number format training will use there."""
    dtype = autocast_dtype(device, cpu_bf16)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()
    note = cpu_precision_note(device, cpu_bf16)
    if dtype is None:
        return f"{name}: float32 (no mixed precision)" + (f". {note}" if note else "")
    scaler = " with a gradient scaler" if dtype == torch.float16 else ""
    return f"{name}: mixed precision, {str(dtype).replace('torch.', '')}{scaler}"


def gpu_advice(device: torch.device) -> str | None:
    """What to do when a notebook that wants a GPU got none: on Colab, how to switch runtimes."""
    if device.type != "cpu":
        return None
    if "google.colab" in sys.modules:
        return ("This Colab runtime has no GPU. Training on its CPU takes hours: choose Runtime > "
                "Change runtime type > T4 GPU, save, then run this notebook again from the top. "
                "Carrying on with the CPU settings for now.")
    return ("No GPU found: training runs on the CPU with fewer epochs (see the settings). For the "
            "full run, use a machine with an NVIDIA GPU, Apple silicon, or Google Colab's free GPU.")


def autocast(device: torch.device, cpu_bf16: bool = False) -> contextlib.AbstractContextManager:
    """The mixed-precision context for ``device`` (see ``autocast_dtype``); a no-op without it."""
    dtype = autocast_dtype(device, cpu_bf16)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device: torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler where training runs in float16, else None.

    float16 holds numbers down to about 6e-8 only: small gradients would round to zero. The
    scaler multiplies the loss before backward and divides the gradients before the optimizer
    step, skipping a step whose gradients overflowed. bfloat16 and float32 need none.
    """
    return torch.amp.GradScaler("cuda") if autocast_dtype(device) == torch.float16 else None
