"""Images in memory from a network: ``generate`` runs a sampler over per-seed x_T in batches.

Image i is generated from x_T drawn by seed i's own generator (and, for stochastic samplers,
per-seed noise at every step), so it does not depend on the batch size or on which other
seeds are drawn in the same call. ``s2dm sample`` (sampling/folder.py), the training loop's
preview mosaics and ``s2dm study`` all sample through it.
"""
from __future__ import annotations

import numbers
import operator
import warnings
from typing import Callable, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from ..core.schedule import NoiseSchedule
from ..core.seeds import PerSeedNoise
from ..errors import GridWarning, SamplerError
from . import sample as run_sampler


# CPU convolutions take another kernel, with other rounding, for fewer rows than this
# (oneDNN; measured with torch 2.14: a batch of 1, 7 or 15 rows moved pixels by up to 2e-5,
# 16 and more matched a batch of 256 bit for bit), so an image would depend on the batch it
# was drawn in. Smaller calls are padded up to it.
MIN_ROWS = 16


def model_eps_fn(model: torch.nn.Module):
    """Wrap a UNet as the sampler's ``eps_fn(x, t)``, in inference mode, in x's dtype; a call
    of fewer than ``MIN_ROWS`` images is padded (with copies of its first) so that an image's
    ε does not depend on how many others share its batch."""

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        t = t.to(x.device)
        with torch.inference_mode():
            if rows < MIN_ROWS:
                pad = MIN_ROWS - rows
                x = torch.cat([x, x[:1].expand(pad, *x.shape[1:])])
                # A shared t (stride 0) stays shared: the UNet embeds it once, on another path.
                t = t[:1].expand(MIN_ROWS) if t.stride(0) == 0 else torch.cat([t, t[:1].expand(pad)])
            return model(x, t)[:rows].to(x.dtype)

    return eps_fn


def checked_seeds(seeds: Iterable[int]) -> List[int]:
    """``seeds`` as a list of image seeds: at least one, integers >= 0, none twice (an image
    depends on its seed alone: a repeated seed repeats an image). SamplerError otherwise."""
    try:
        out = list(seeds)
    except TypeError:
        raise SamplerError(f"seeds: expected image seeds (integers >= 0), got {seeds!r}", key="seeds") from None
    if not out:
        raise SamplerError("seeds: no image seeds given", key="seeds")
    ints = [_seed(x) for x in out]  # numpy and torch integers too (torch.arange(n))
    bad = next((x for x, i in zip(out, ints) if i is None or i < 0), None)
    if bad is not None:
        raise SamplerError(f"seeds: image seeds are integers >= 0, not {bad!r}", key="seeds")
    seen = set()
    for seed in ints:  # one pass: a million seeds are allowed
        if seed in seen:
            raise SamplerError(f"seeds: seed {seed} is given twice (it would make the same image twice)", key="seeds")
        seen.add(seed)
    return ints


def _seed(x) -> Optional[int]:
    """``x`` as an int if it is an integer of any kind but a bool (else None)."""
    if isinstance(x, (bool, np.bool_)) or getattr(x, "dtype", None) in (torch.bool, np.bool_):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def check_batch_size(batch_size: int) -> int:
    """Images per network call: a positive integer (SamplerError otherwise)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise SamplerError(f"batch_size: expected a positive integer, got {batch_size!r}", key="batch_size")
    return int(batch_size)


def generate_batches(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    seeds: Iterable[int],
    *,
    image_shape: Tuple[int, int, int],
    batch_size: int = 256,
    device="cpu",
    progress: Union[bool, Callable[[float], None]] = False,
    **sampler_options,
) -> Iterator[Tuple[List[int], torch.Tensor, dict]]:
    """(the batch's seeds, its images in [−1, 1] (B, C, H, W) on the CPU, the sampler's info)
    for ``seeds`` in batches of ``batch_size``; a caller that saves or scores each batch
    holds one batch at a time. ``progress`` as ``samplers.sample``'s. The model samples in eval
    mode (dropout off: an image depends on its seed alone) and gets its mode back after."""
    seeds = list(seeds)  # none: nothing to yield (a torchrun rank without a share of the seeds)
    seeds, batch_size = checked_seeds(seeds) if seeds else [], check_batch_size(batch_size)
    eps_fn = model_eps_fn(model)
    training = model.training
    model.eval()
    try:
        yield from _batches(eps_fn, schedule, seeds, image_shape, batch_size, device, progress, sampler_options)
    finally:
        model.train(training)


def _batches(eps_fn, schedule, seeds, image_shape, batch_size, device, progress, sampler_options):
    for i in range(0, len(seeds), batch_size):
        batch_seeds = seeds[i:i + batch_size]
        noise = PerSeedNoise(batch_seeds, device=device)
        x_T = noise.randn(image_shape)
        with warnings.catch_warnings():
            if i:  # a grid's warning was said with the first batch
                warnings.simplefilter("ignore", GridWarning)
            x0, info = run_sampler(eps_fn, x_T, schedule, generator=noise, progress=progress, **sampler_options)
        if not bool(torch.isfinite(x0).all()):  # clamp would pass inf as ±1; NaN has no pixel value
            raise SamplerError(f"the samples of image seeds {batch_seeds[0]}..{batch_seeds[-1]} are not finite: the "
                               "network's output is NaN or infinite (are the checkpoint's weights finite?)")
        yield batch_seeds, x0.clamp(-1, 1).cpu(), info


def generate(model: torch.nn.Module, schedule: NoiseSchedule, seeds: Iterable[int], **kwargs
             ) -> Tuple[torch.Tensor, dict]:
    """All images of ``seeds`` at once (N, C, H, W) and the sampler's info; keyword arguments
    as ``generate_batches``."""
    chunks, info = [], {}
    for _, images, info in generate_batches(model, schedule, checked_seeds(seeds), **kwargs):
        chunks.append(images)
    return torch.cat(chunks), info
