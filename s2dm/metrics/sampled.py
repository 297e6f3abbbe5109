"""Statistics of a model's samples made in memory: what training-time evaluation and ``s2dm
study`` score. The images are quantised to uint8 as a PNG would hold them, so the numbers equal
those of ``s2dm sample`` + ``s2dm fid`` on the same seeds, without writing n files.

Under torchrun each rank samples its contiguous part of the seeds in whole batches (the batches
one process would run) and the feature moments are summed across ranks in float64
(``FeatureExtractor.stats_of_uint8``): W ranks give one process's statistics.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from ..core.schedule import NoiseSchedule
from ..samplers.generate import generate_batches
from ..samplers.options import SampleOptions
from ..util.images import to_uint8
from .features import FeatureExtractor, batch_aligned_shard
from .statistics import Stats


def sample_stats(model: torch.nn.Module, schedule: NoiseSchedule, seeds: Sequence[int], options: SampleOptions,
                 extractor: FeatureExtractor, *, image_shape: Tuple[int, int, int], batch_size: int,
                 device, source: str) -> Stats:
    """The feature statistics of ``model``'s images of ``seeds`` sampled with ``options``."""
    seeds = list(seeds)
    a, b = batch_aligned_shard(len(seeds), batch_size)  # this rank's seeds (all in one process)
    batches = generate_batches(model, schedule, seeds[a:b], image_shape=image_shape, batch_size=batch_size,
                               device=device, **SampleOptions.of(options).as_kwargs())
    return extractor.stats_of_uint8((to_uint8(images) for _, images, _ in batches), b - a, source)
