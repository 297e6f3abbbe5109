"""Stand-ins for tests and benchmarks only; never report numbers from them."""
import math

import torch

from s2dm.metrics.inception import fid_inception_skeleton


def standin_state_dict(seed: int = 0) -> dict:
    """The FID Inception architecture with conv weights drawn
    He-normal (std sqrt(2 / fan_in)), BN as identity. A default-initialised Inception gives
    near-degenerate features (docs/method.md §8); this one does not. Never report numbers from it."""
    g = torch.Generator().manual_seed(seed)
    sd = fid_inception_skeleton().state_dict()
    for key, value in sd.items():
        if key.endswith("conv.weight"):
            value.copy_(torch.randn(value.shape, generator=g) * math.sqrt(2.0 / value[0].numel()))
        elif key.endswith("bn.weight") or key.endswith("bn.running_var"):
            value.fill_(1.0)
        elif key.endswith(("bn.bias", "bn.running_mean")) or key.startswith("fc."):
            value.zero_()
    return sd
