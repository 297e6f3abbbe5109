"""Images in memory from a network: ``generate`` runs a sampler over per-seed x_T in batches.

Image i is generated from x_T drawn by seed i's own generator (and, for stochastic samplers,
per-seed noise at every step), so it does not depend on the batch size or on which other
seeds are drawn in the same call. ``s2dm sample`` (sampling/folder.py), the training loop's
preview grids and ``s2dm study`` all sample through it.
"""
from __future__ import annotations

from typing import Iterable, Tuple

import torch

from ..core.schedule import NoiseSchedule
from ..core.seeds import PerSeedNoise
from . import sample as run_sampler


def model_eps_fn(model: torch.nn.Module):
    """Wrap a UNet as the sampler's ``eps_fn(x, t)``, in inference mode, in x's dtype."""

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x, t.to(x.device)).to(x.dtype)

    return eps_fn


def generate(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    seeds: Iterable[int],
    *,
    image_shape: Tuple[int, int, int],
    batch_size: int = 256,
    device="cpu",
    progress: bool = False,
    **sampler_options,
) -> Tuple[torch.Tensor, dict]:
    """Images in [−1, 1] (N, C, H, W) on the CPU for ``seeds``, and the sampler's info."""
    seeds = list(seeds)
    eps_fn = model_eps_fn(model)
    chunks, info = [], {}
    for i in range(0, len(seeds), batch_size):
        batch_seeds = seeds[i:i + batch_size]
        noise = PerSeedNoise(batch_seeds, device=device)
        x_T = noise.randn(image_shape)
        x0, info = run_sampler(eps_fn, x_T, schedule, generator=noise, progress=progress, **sampler_options)
        chunks.append(x0.clamp(-1, 1).cpu())
    return torch.cat(chunks), info
