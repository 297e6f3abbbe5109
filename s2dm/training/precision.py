"""Mixed precision and memory layout for training: ``train.precision``, ``channels_last``, ``compile``.

- ``fp32``: plain float32, IEEE on a GPU too (``ieee_float32``: no TF32).
- ``bf16``: ``torch.autocast(device, bfloat16)`` around the forward and the loss; weights,
  gradients, Adam and the EMA stay float32. No loss scaling (bf16 has float32's range).
- ``fp16``: ``torch.autocast(device, float16)`` plus a ``torch.amp.GradScaler``: the loss is
  scaled before backward, gradients are unscaled before clipping, a step whose gradients
  overflow is skipped by the scaler (which then halves its scale). Its state is saved in the
  checkpoint (``scaler``) and restored on resume.

The loss terms are computed from the float32 ε and the network's autocast output, so they
are float32 whatever the precision.
"""
from __future__ import annotations

import contextlib

import torch

from ..errors import ConfigError
from ..io.config import PRECISIONS


def check_supported(precision: str, device: torch.device) -> None:
    """A clear error where the device cannot run the precision."""
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision: {precision!r} is not one of {', '.join(PRECISIONS)}", key="train.precision")
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision: bf16 needs a GPU with bfloat16 support (Ampere or newer); "
                          f"{torch.cuda.get_device_name(device)} has none: use fp16 or fp32", key="train.precision")
    if device.type not in ("cuda", "cpu") and precision != "fp32":
        raise ConfigError(f"train.precision: {precision} autocast is supported on cuda and cpu, not "
                          f"{device.type}; use fp32", key="train.precision")


def ieee_float32(precision: str, device: torch.device) -> None:
    """fp32 on a GPU is IEEE float32: PyTorch runs float32 convolutions in TF32 (a 10-bit
    mantissa) on Ampere and newer by default, which would make fp32 runs, and their comparison
    with bf16, something else than their label. The legacy flags: mixing them with the newer
    ``fp32_precision`` API makes later reads of either raise."""
    if device.type == "cuda" and precision == "fp32":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


@contextlib.contextmanager
def tf32_flags_kept():
    """Give the caller back the TF32 flags that ``ieee_float32`` turns off for a run: a
    notebook's own convolutions after training should run as they did before it. (Flags
    that cannot be read, the newer ``fp32_precision`` API being in use, are left alone.)"""
    try:
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:
        saved = None
    try:
        yield
    finally:
        if saved is not None:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def autocast(precision: str, device: torch.device):
    """The autocast context of a training forward (a no-op context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def make_scaler(precision: str, device: torch.device):
    """A GradScaler for fp16, else None."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """4-d weights in NHWC (convolutions then pick channels-last kernels and outputs)."""
    return model.to(memory_format=torch.channels_last)
