"""What every training step draws: data order, flips, t, ε and the skip loss's ε′.

Each draw of step k comes from seeds derived from (train.seed, stream, k) (see
core/seeds.py), so resuming at step k continues exactly, and runs that differ only in
``loss`` see the same x_t at every step (docs/method.md §7).

Under torchrun every rank draws the GLOBAL batch of step k (indices, flips, t, ε, ε′) exactly
as one process would and keeps its own contiguous rows [r·B/W, (r+1)·B/W): the ranks see
different samples, all derived from ``train.seed``, and together they see what one process
with the same global batch sees — so W ranks reproduce one process up to the order of float
reductions, and a run may be resumed with another number of ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch

from ..core import seeds
from ..io.config import Config


class PlannedBatches(torch.utils.data.Sampler):
    """Batch k = positions [kB, (k+1)B) of an endless chain of per-epoch permutations,
    permutation e drawn from (seed, DATA_ORDER, e): the data order is a function of the step."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, end_step: int,
                 rows: Optional[Tuple[int, int]] = None):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.end_step = start_step, end_step
        self.rows = rows  # (a, b): iterate over rows a..b-1 of each global batch (this rank's part)
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=seeds.generator(self.seed, seeds.DATA_ORDER, epoch))
        return self._perm

    def indices(self, step: int) -> List[int]:
        out = []
        for pos in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(int(self._permutation(pos // self.n)[pos % self.n]))
        return out

    def __iter__(self) -> Iterator[List[int]]:
        for step in range(self.start_step, self.end_step):
            batch = self.indices(step)
            yield batch if self.rows is None else batch[self.rows[0]:self.rows[1]]

    def __len__(self) -> int:
        return self.end_step - self.start_step


@dataclass
class StepDraws:
    """Everything random in one training step, drawn on the CPU from the step's seeds."""

    flip: Optional[torch.Tensor]
    t: torch.Tensor
    noise: torch.Tensor
    skip_noise: Optional[torch.Tensor]

    def rows(self, a: int, b: int) -> "StepDraws":
        """Rows a..b-1 of every draw (a rank's part of the global batch)."""
        def part(x):
            return None if x is None else x[a:b]
        return StepDraws(part(self.flip), self.t[a:b], self.noise[a:b], part(self.skip_noise))


def draw_step(cfg: Config, step: int, shape) -> StepDraws:
    g = seeds.generator(cfg.train.seed, seeds.STEP, step)
    B, T = shape[0], cfg.diffusion.num_timesteps
    flip = torch.rand(B, generator=g) < 0.5 if cfg.data.random_flip else None
    if cfg.loss.t_sampling == "antithetic":
        half = torch.randint(0, T, ((B + 1) // 2,), generator=g)
        t = torch.cat([half, T - 1 - half])[:B]
    else:
        t = torch.randint(0, T, (B,), generator=g)
    noise = torch.randn(shape, generator=g)
    skip_noise = None
    if cfg.loss.type == "s2" and cfg.loss.variant == "independent":
        # Its own stream, so adding L_skip does not shift any draw the baseline makes.
        skip_noise = torch.randn(shape, generator=seeds.generator(cfg.train.seed, seeds.SKIP_NOISE, step))
    return StepDraws(flip, t, noise, skip_noise)


