"""Exponential moving average of a model's parameters (kept as a second module)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` to hold the averaged weights."""
    ema = copy.deepcopy(model)
    ema.eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model, for every parameter; buffers are copied."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
