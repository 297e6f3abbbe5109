"""s2dm: diffusion models trained with the S²-DM skip-step loss, sampled with DDIM/PNDM/DEIS.

The public API. The package is layered (docs/architecture.md): ``core`` (math), ``util``
(files, images, processes), ``samplers`` and ``io`` (configs, checkpoints, data), then one
package per verb (``training``, ``metrics``, ``interop``, ``sampling``, ``study``).
"""
from pathlib import Path
from typing import Union

from ._version import __version__
from .core.losses import l0_loss, skip_step_loss
from .core.schedule import NoiseSchedule
from .core.unet import UNet
from .core.unet import build_model as _build_unet
from .io.checkpoint import LoadedCheckpoint, load_checkpoint
from .io.config import Config, as_config, load_config


def build_model(config: Union[Config, dict, str, Path]) -> UNet:
    """The UNet a config describes: a ``Config``, a plain dict (e.g. from a checkpoint) or a YAML path."""
    return _build_unet(as_config(config))


__all__ = ["Config", "LoadedCheckpoint", "NoiseSchedule", "UNet", "build_model", "l0_loss", "load_checkpoint",
           "load_config", "skip_step_loss", "__version__"]
