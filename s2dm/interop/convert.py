"""``s2dm convert``: published DDPM weights → an s2dm checkpoint that samples and fine-tunes.

Two public layouts hold the DDPM network (Ho et al. 2020) that s2dm's UNet computes:

* diffusers' ``UNet2DModel`` (e.g. google/ddpm-cifar10-32): a folder with ``config.json`` and
  ``diffusion_pytorch_model.safetensors`` (or ``.bin``), or a pipeline folder with ``unet/``.
* the PyTorch port of the original checkpoints used by the DDIM repository (ermongroup/ddim,
  ``model-790000.ckpt``): a plain state dict of its ``Model``, whose module names s2dm's UNet
  keeps, so those keys load as they are.

The architecture is read from the files (config.json, or the DDIM state dict's shapes), never
assumed; whatever s2dm's UNet cannot express is refused with the offending key. Everything
is local: nothing is fetched from a hub. The reverse direction is in export.py.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from .._version import __version__
from ..core.unet import build_model
from ..errors import InteropError
from ..io.checkpoint import FORMAT_VERSION, first_mismatch
from ..io.config import Config, ModelConfig, apply_overrides, config_from_dict, read_config_yaml
from ..util.fileio import atomic_torch_save, sha256_file, writing
from ..util.textfmt import first_sentence
from .layouts import (
    StateDict, architecture, check_layout, diffusers_to_s2dm_state_dict, first_difference, model_from_ddim_state_dict,
    model_from_diffusers_config,
)

__all__ = ["convert", "read_diffusers", "read_ddim"]

# ---------------------------------------------------------------------------------------
# Reading the files
# ---------------------------------------------------------------------------------------
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                 "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")


def locate_diffusers(path: Path) -> Tuple[Path, Path, Optional[Path]]:
    """(weights file, config.json, scheduler_config.json or None) for a UNet folder, a
    pipeline folder (with unet/ inside), a weights file with config.json beside it, or that
    config.json (or a pipeline's model_index.json): the folder it is in."""
    if not path.exists():
        raise InteropError(f"{path}: no such file or folder", key="source")
    if path.is_file() and path.suffix == ".json":
        path = path.parent
    folder = path.parent if path.is_file() else path
    if path.is_dir() and (path / "unet").is_dir():
        folder = path / "unet"
    weights = path if path.is_file() else next((folder / n for n in _WEIGHT_NAMES if (folder / n).is_file()), None)
    if weights is None:
        if any(folder.glob("*.index.json")):
            raise InteropError(f"{folder}: sharded weights are not supported; save the UNet unsharded")
        raise InteropError(f"{folder}: no {' or '.join(_WEIGHT_NAMES[:2])}")
    config = folder / "config.json"
    if not config.is_file():
        raise InteropError(f"{weights}: no config.json beside it (the diffusers UNet2DModel config)")
    scheduler = folder.parent / "scheduler" / "scheduler_config.json"
    return weights, config, scheduler if scheduler.is_file() else None


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InteropError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InteropError(f"{path}: expected a JSON object")
    return data


def read_weights_file(path: Path) -> object:
    """A .safetensors file, or a torch file read with ``weights_only`` (published pickles are
    not trusted to run code)."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file  # optional dependency
        except ImportError:
            raise InteropError("reading .safetensors needs the safetensors package: pip install safetensors") from None
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise InteropError(f"{path}: cannot read it as safetensors, corrupt or truncated? ({exc})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/corrupt/foreign files
        if "Weights only load failed" in str(exc) and "Unsupported global" in str(exc):
            raise InteropError(f"{path}: holds pickled Python objects besides weights, which are not loaded "
                               "(that would run code from the file); an s2dm checkpoint needs no conversion") from None
        first = first_sentence(str(exc))  # torch appends paragraphs of advice that is not ours to give
        detail = "" if not first or first.startswith("Weights only load failed") else f": {first}"
        raise InteropError(f"{path}: cannot read it as a torch weights file, corrupt or truncated? "
                           f"({type(exc).__name__}{detail})") from None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def _strip_module(sd: StateDict) -> StateDict:
    """Drop the ``module.`` prefix that (Distributed)DataParallel adds to every key."""
    if all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def unwrap_ddim(obj, where: str) -> Tuple[StateDict, Optional[StateDict], dict]:
    """(model weights, EMA weights or None, notes) from what the DDIM repository saves: a
    plain state dict (the published model-790000.ckpt), its training states
    [model, optimizer, epoch, step(, ema)] or a dict with model/ema entries."""
    ema, notes = None, {}
    if isinstance(obj, (list, tuple)) and obj and _is_state_dict(obj[0]):
        sd = obj[0]
        if len(obj) >= 4 and isinstance(obj[3], int):
            notes["step"] = obj[3]
        if len(obj) >= 5 and _is_state_dict(obj[4]):
            ema = obj[4]
    elif _is_state_dict(obj):
        sd = obj
    elif isinstance(obj, dict) and "format_version" in obj:
        raise InteropError(f"{where} is already an s2dm checkpoint; use it directly")
    elif isinstance(obj, dict) and any(_is_state_dict(obj.get(k)) for k in ("model", "state_dict", "ema")):
        sd = next(obj[k] for k in ("model", "state_dict", "ema") if _is_state_dict(obj.get(k)))
        ema = obj.get("ema") if _is_state_dict(obj.get("ema")) else None
    else:
        raise InteropError(f"{where}: no state dict found (expected a dict of tensors, the DDIM repository's "
                           "[model, optimizer, epoch, step, ema] list, or {'model': ...})")
    return _strip_module(sd), (_strip_module(ema) if ema is not None else None), notes


def read_diffusers(path: Path) -> Tuple[StateDict, ModelConfig, int, int, Optional[dict], dict]:
    """(s2dm-named weights, model, image size, channels, diffusion section or None, provenance)."""
    weights_file, config_file, scheduler_file = locate_diffusers(path)
    conf = read_json(config_file)
    model, size, channels = model_from_diffusers_config(conf, str(config_file))
    raw = read_weights_file(weights_file)
    if not _is_state_dict(raw):
        raise InteropError(f"{weights_file}: not a state dict (a mapping of names to tensors)")
    try:
        sd = diffusers_to_s2dm_state_dict(raw, len(model.ch_mult))
    except KeyError as exc:
        raise InteropError(f"{weights_file}: {exc.args[0]}: not a DDPM-layout UNet2DModel") from None
    diffusion = None
    if scheduler_file is not None:
        diffusion = diffusion_from_scheduler(read_json(scheduler_file), str(scheduler_file))
    return sd, model, size, channels, diffusion, {"weights": weights_file, "unet_config": conf}


def diffusion_from_scheduler(conf: dict, where: str) -> dict:
    """The ``diffusion`` section a diffusers scheduler config describes; s2dm's samplers are
    for ε-prediction on DDPM's linear β schedule, so anything else is refused."""
    if conf.get("prediction_type", "epsilon") != "epsilon":
        raise InteropError(f"{where}: prediction_type: {conf['prediction_type']!r}; s2dm's models predict ε ('epsilon')")
    if conf.get("trained_betas") is not None:
        raise InteropError(f"{where}: trained_betas: a β list of its own; s2dm builds DDPM's linear β from "
                           "beta_start and beta_end only")
    if conf.get("beta_schedule", "linear") != "linear":
        raise InteropError(f"{where}: beta_schedule: {conf.get('beta_schedule')!r}; s2dm knows DDPM's 'linear' only")
    return {"num_timesteps": _scheduler_number(conf, "num_train_timesteps", 1000, int, where), "beta_schedule": "linear",
            "beta_start": _scheduler_number(conf, "beta_start", 1e-4, float, where),
            "beta_end": _scheduler_number(conf, "beta_end", 0.02, float, where)}


def _scheduler_number(conf: dict, key: str, default, kind: type, where: str):
    """A scheduler config's number: an int for ``kind=int`` (1000.7 is not 1000 steps), any
    number for ``float``; a null, a text or a bool is refused."""
    value = conf.get(key, default)
    ok = not isinstance(value, bool) and (isinstance(value, int) if kind is int else isinstance(value, (int, float)))
    if not ok:
        raise InteropError(f"{where}: {key}: {value!r} is not {'an integer' if kind is int else 'a number'}")
    return kind(value)


def user_config(config: Optional[str], overrides: Sequence[str]) -> Optional[Config]:
    """The user's config file with its overrides, or None without one."""
    if config is None:
        return None
    return config_from_dict(apply_overrides(read_config_yaml(config), list(overrides)))


def ddim_image_size(image_size: Optional[int], user: Optional[Config], config: Optional[str]) -> Optional[int]:
    """The image size of DDIM-layout weights (the file does not record it): ``image_size``, else
    the ``data.image_size`` of the user's config ``user`` (read from the file ``config``), else
    None; the two must agree where both are given."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise InteropError(f"image_size must be a positive integer, not {image_size!r}", key="image_size")
    if user is None:
        return image_size
    from_config = user.data.image_size
    if image_size is not None and image_size != from_config:
        raise InteropError(f"image_size {image_size} differs from data.image_size {from_config} of {config}; "
                           "drop one or make them agree", key="image_size")
    return from_config


def check_ddim_source(path: Path) -> None:
    """A DDIM-layout source is one weights file; a folder is diffusers' layout."""
    if path.is_dir():
        raise InteropError(f"{path} is a folder, but the DDIM layout is one weights file (e.g. ckpt.pth); a folder "
                           "of config.json and weights is layout='diffusers'", key="source")
    if not path.is_file():
        raise InteropError(f"{path}: no such file", key="source")


def read_ddim(path: Path, image_size: int) -> Tuple[StateDict, Optional[StateDict], ModelConfig, int, dict]:
    """(weights, EMA weights or None, model, channels, provenance) of a DDIM-layout file."""
    check_ddim_source(path)
    sd, ema, notes = unwrap_ddim(read_weights_file(path), str(path))
    model, channels = model_from_ddim_state_dict(sd, image_size, str(path))
    return sd, ema, model, channels, {"weights": path, **notes}


# ---------------------------------------------------------------------------------------
# The s2dm checkpoint
# ---------------------------------------------------------------------------------------
def assemble_config(user: Optional[Config], overrides: Sequence[str], model: ModelConfig, image_size: int,
                    channels: int, diffusion: Optional[dict]) -> Config:
    """The checkpoint's config: the user's (``user_config``), or, without one, the architecture
    read from the weights on s2dm's defaults (DDPM's training settings) with the overrides. The
    data set is not recorded in the weights: ``folder`` stands in until a --config names it."""
    cfg = user
    if cfg is None:
        data = {"data": {"dataset": "folder", "image_size": image_size, "channels": channels},
                "model": dataclasses.asdict(model)}
        if diffusion is not None:
            data["diffusion"] = dict(diffusion)  # a copy: the overrides edit data, the check below reads diffusion
        cfg = config_from_dict(apply_overrides(data, list(overrides)))
    if diffusion is not None:
        for key, value in diffusion.items():
            if value != getattr(cfg.diffusion, key):
                raise InteropError(f"diffusion.{key} is {value!r} in the scheduler config beside the weights "
                                   f"but {getattr(cfg.diffusion, key)!r} in the config")
    return cfg


def check_fits(cfg: Config, weights: StateDict, have: dict, where: str, what: str, config_name: str) -> None:
    """Every tensor must have its key and shape in the model ``cfg`` describes; the error
    names the first config key and the first weight that differ."""
    bad = first_mismatch(build_model(cfg).state_dict(), weights)
    diff = first_difference(have, architecture(cfg.model, cfg.data.image_size, cfg.data.channels), config_name)
    if bad or diff:
        parts = [diff] if diff else []
        parts += [f"first mismatching weight: {bad}"] if bad else []
        raise InteropError(f"{where}: the {what} weights do not fit the model of {config_name}: {'; '.join(parts)}")


def _float32(sd: StateDict, where: str) -> StateDict:
    """fp16/bf16 copies of the weights are widened: s2dm trains and samples in float32. Every
    tensor of the UNet is a finite floating-point weight: anything else is a damaged file."""
    for k, v in sd.items():
        if not v.is_floating_point():
            raise InteropError(f"{where}: {k} is {str(v.dtype).replace('torch.', '')}, not a floating-point weight")
        if not bool(torch.isfinite(v).all()):
            raise InteropError(f"{where}: {k} holds NaN or infinite values")
    return {k: v.detach().to(torch.float32) for k, v in sd.items()}


def convert(layout: str, source, out, *, config: Optional[str] = None, overrides: Sequence[str] = (),
            image_size: Optional[int] = None, force: bool = False) -> dict:
    """Write an s2dm checkpoint (step 0, model = EMA unless the file holds both) for the
    weights at ``source`` in ``layout`` ('diffusers' or 'ddim'). Returns a summary."""
    source, out, layout = Path(source), Path(out), check_layout(layout, "layout")
    if out.is_dir():  # force=True would not mend it
        raise InteropError(f"{out} is a folder; the s2dm checkpoint is one file", key="out")
    if out.exists() and not force:
        raise InteropError(f"{out} exists; overwrite it with force=True", key="force")
    ema = None
    if layout == "diffusers":
        if image_size is not None:
            raise InteropError("image_size is for layout='ddim'; diffusers' config.json has the sample_size",
                               key="image_size")
        sd, model, size, channels, diffusion, info = read_diffusers(source)
        user = user_config(config, overrides)  # after the source: a wrong path is the first thing to mend
    else:  # ddim
        check_ddim_source(source)  # before the image size: a wrong path is the first thing to mend
        user = user_config(config, overrides)
        size = ddim_image_size(image_size, user, config)
        if size is None:
            raise InteropError("a DDIM-layout file does not record the image size: give image_size=32 (CIFAR10) "
                               "or image_size=64 (CelebA), or a config that has data.image_size",
                               key="image_size")
        sd, ema, model, channels, info = read_ddim(source, size)
        diffusion = None
    cfg = assemble_config(user, overrides, model, size, channels, diffusion)
    have = architecture(model, size, channels)
    name = str(config) if config else "the config read off the weights and the overrides"
    check_fits(cfg, sd, have, str(info["weights"]), "model", name)
    if ema is not None:
        check_fits(cfg, ema, have, str(info["weights"]), "EMA", name)
    weights = _float32(sd, str(info["weights"]))
    source_info = {"format": layout, "path": str(Path(info["weights"]).resolve()),
                   "sha256": sha256_file(info["weights"]),
                   **{k: v for k, v in info.items() if k != "weights"}}
    state = {"format_version": FORMAT_VERSION, "step": 0, "config": cfg.to_dict(), "model": weights,
             "ema": _float32(ema, str(info["weights"])) if ema is not None else weights,  # one copy on disk when equal
             "source": source_info, "versions": _versions()}
    with writing(out, InteropError, key="out"):
        atomic_torch_save(state, out)
    n = sum(v.numel() for v in weights.values())
    return {"out": str(out), "parameters": n, "config": cfg, "source": source_info}


def _versions() -> dict:
    return {"s2dm": __version__, "torch": torch.__version__}
