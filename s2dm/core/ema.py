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


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The decay of the update that follows ``step`` earlier updates (0-based).

    With ``warmup`` it is min(decay, (1 + step)/(10 + step)), the ramp of TensorFlow's
    ExponentialMovingAverage(num_updates=...): a fixed 0.995 still holds 0.995**600 ≈ 5 % of
    the random initial weights after 600 steps; with the ramp it is 3e-20. Without
    it the decay is fixed from the first step, as the DDPM and DDIM runs had it."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


def describe_ema(decay: float, warmup: bool) -> str:
    """The EMA setting in words, for reports and logs."""
    return f"EMA decay {decay:g}" + (", warm-up min(decay, (1+k)/(10+k))" if warmup else ", no warm-up")


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model, for every parameter; buffers are copied."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
