"""Where work runs: the device choice (and, later, torchrun ranks)."""
from __future__ import annotations

import torch

from .errors import UserError


def pick_device(name: str | None) -> torch.device:
    """``auto`` → CUDA when available, else CPU; an unavailable or unknown device is a UserError."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is not a device (try cpu, cuda, cuda:1)") from None
