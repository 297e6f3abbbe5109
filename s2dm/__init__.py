"""s2dm: diffusion models trained with the S²-DM skip-step loss, sampled with DDIM/PNDM/DEIS."""

__version__ = "0.1.0"

from .checkpoint import LoadedCheckpoint, load_checkpoint  # noqa: E402
from .config import Config, load_config  # noqa: E402
from .unet import UNet, build_model  # noqa: E402

__all__ = ["Config", "LoadedCheckpoint", "UNet", "build_model", "load_checkpoint", "load_config", "__version__"]
