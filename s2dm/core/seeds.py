"""Seeds derived from one root seed, so every random draw depends only on its coordinates.

Training draws each step's randomness from ``derive_seed(train.seed, STREAM, step)``: a run
resumed at step k sees exactly what an uninterrupted run saw, and a baseline and an S²-DM run
with the same seed share weights, data order, t and ε (the skip-step ε′ has its own stream).
Sampling draws image i's noise only from generators seeded by i, whatever the batch.
"""
from __future__ import annotations

import contextlib
import random
from typing import Iterator, Sequence

import numpy as np
import torch

# Stream tags: distinct integers so the streams never overlap.
INIT, DATA_ORDER, STEP, SKIP_NOISE, DROPOUT, HOST = 0, 1, 2, 3, 4, 5


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def seed_host_rngs(seed: int) -> None:
    """Seed Python's ``random`` and numpy's global generator from (seed, HOST). s2dm draws
    nothing from them; a run seeds them so that code of the user's that does (a data
    transform) repeats, and so that a checkpoint's record of them is the same run to run."""
    host = derive_seed(seed, HOST)
    random.seed(host)
    np.random.seed(host % 2**32)  # numpy's legacy seed is 32-bit


@contextlib.contextmanager
def global_rngs_kept() -> Iterator[None]:
    """Give the caller back the global generators (torch's CPU and, where initialised, CUDA
    ones; Python's ``random``; numpy's) as they were before the block: training seeds them for
    its run, and a notebook's later draws should not depend on having trained. (A CUDA
    generator first initialised inside the block, or not the current GPU's, keeps what the
    block left.)"""
    host = random.getstate(), np.random.get_state()
    # The current GPU only: the state of every visible one would open a context on each (under
    # torchrun, every rank on every GPU).
    cuda = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(host[0])
            np.random.set_state(host[1])


def generator(*parts: int) -> torch.Generator:
    """A CPU torch.Generator seeded by ``derive_seed(*parts)``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


class PerSeedNoise:
    """Row i of every draw comes from image seed i's own generator (as EDM's
    StackedRandomGenerator), so an image does not depend on the batch it is in."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        self.generators = [torch.Generator().manual_seed(derive_seed(s)) for s in self.seeds]

    def randn(self, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        """A (len(seeds), *shape) standard normal draw, on ``self.device``."""
        rows = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(rows).to(device=self.device, dtype=dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.seeds):
            raise ValueError(f"batch of {x.shape[0]} for {len(self.seeds)} seeds")
        return self.randn(x.shape[1:], dtype=x.dtype).to(x.device)
