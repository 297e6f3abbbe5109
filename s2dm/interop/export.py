"""``s2dm export``: an s2dm checkpoint → a diffusers pipeline folder or a DDIM-layout file.

``--to diffusers`` writes what ``DDPMPipeline.from_pretrained(DIR)`` (and ``DDIMPipeline``,
``UNet2DModel.from_pretrained(DIR / "unet")``) load, without needing diffusers here: the JSON
configs are written directly and the weights with safetensors::

    DIR/model_index.json                          DDPMPipeline = unet + scheduler
    DIR/unet/config.json                          UNet2DModel in the DDPM layout
    DIR/unet/diffusion_pytorch_model.safetensors
    DIR/scheduler/scheduler_config.json           DDPMScheduler with the checkpoint's betas
    DIR/s2dm_export.json                          provenance (checkpoint, sha256, weights used)

``--to ddim`` writes the plain state dict the DDIM repository's ``Model`` loads (s2dm keeps
its module names, so this is the weights as they are).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import InteropError
from ..io.checkpoint import pick_weights, read_checkpoint, resolve_checkpoint
from ..io.config import Config, config_from_saved
from ..util.fileio import atomic_torch_save, atomic_write, atomic_write_text, sha256_file, writing
from .layouts import DDPM_SETTINGS, check_layout, diffusers_unet_kwargs, s2dm_to_diffusers_state_dict

# The diffusers release whose config keys these files were written against (the test extra's
# lower bound); diffusers only parses it, newer releases read these files unchanged.
DIFFUSERS_VERSION = "0.30.0"


def unet_config(cfg: Config) -> dict:
    """config.json of the UNet2DModel that computes the same function as ``build_model(cfg)``.

    Every setting that differs from DDPM in some diffusers default is written out, so the file
    does not depend on the defaults of the diffusers version that reads it."""
    m = cfg.model
    if m.ch_mult[0] != 1:
        raise InteropError(f"model.ch_mult: {m.ch_mult}; diffusers' UNet2DModel needs the first multiplier 1 "
                           "(its input convolution has the first level's width)")
    check_32_groups(cfg, "diffusers' UNet2DModel")
    if not m.resamp_with_conv and len(m.ch_mult) > 1:
        raise InteropError("model.resamp_with_conv: false; diffusers' UNet2DModel resamples with convolutions only")
    kwargs = diffusers_unet_kwargs(in_channels=cfg.data.channels, ch=m.ch, ch_mult=m.ch_mult,
                                   num_res_blocks=m.num_res_blocks, attn_resolutions=m.attn_resolutions,
                                   dropout=m.dropout, image_size=cfg.data.image_size)
    kwargs.update({key: ddpm for key, (ddpm, _default) in DDPM_SETTINGS.items()})
    kwargs.update(time_embedding_dim=None, attn_norm_num_groups=None)
    conf = {"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION}
    conf.update({k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()})
    return conf


def check_32_groups(cfg: Config, target: str) -> None:
    """diffusers and the DDIM repository normalise with 32 groups; s2dm falls back to 8 groups
    for toy widths that 32 does not divide, which neither can express."""
    widths = [cfg.model.ch * k for k in cfg.model.ch_mult]
    if any(w % 32 for w in [cfg.model.ch] + widths):
        raise InteropError(f"model.ch / model.ch_mult: widths {widths}; {target} normalises with 32 groups, so "
                           "every width must be a multiple of 32 (s2dm uses 8 groups for toy widths)")


def scheduler_config(cfg: Config) -> dict:
    """scheduler_config.json: a DDPMScheduler on the checkpoint's β schedule, set up so that
    the diffusers samplers follow s2dm's conventions (docs/method.md §1)."""
    d = cfg.diffusion
    return {
        "_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        # diffusers builds linspace(beta_start, beta_end, T) as s2dm does (in float32).
        "num_train_timesteps": d.num_timesteps, "beta_start": d.beta_start, "beta_end": d.beta_end,
        "beta_schedule": d.beta_schedule, "trained_betas": None, "prediction_type": "epsilon",
        # s2dm's samplers, like the DDIM repository's, never clip x̂0; with false,
        # DDIMPipeline(eta=0) takes exactly s2dm's DDIM steps. DDPM's own ancestral sampler
        # clipped x̂0 to [-1, 1]: set it true to reproduce that.
        "clip_sample": False,
        # s2dm's ddpm sampler uses the posterior variance β̃ ("small").
        "variance_type": "fixed_small",
        # t_i = i·(T//S): s2dm's (and the DDIM repository's) "uniform" grid. DDIMScheduler,
        # built from this config by DDIMPipeline, ends on ᾱ = 1 (set_alpha_to_one's default).
        "timestep_spacing": "leading", "steps_offset": 0,
    }


def write_diffusers(out: Path, cfg: Config, weights: dict, provenance: dict) -> None:
    try:
        from safetensors.torch import save as safetensors_bytes  # optional dependency
    except ImportError:
        raise InteropError("writing diffusers weights needs the safetensors package: pip install safetensors") from None
    conf = unet_config(cfg)
    tensors = s2dm_to_diffusers_state_dict(weights, len(cfg.model.ch_mult))
    # safetensors stores each tensor on its own: contiguous, float32 copies (no shared storage).
    tensors = {k: v.detach().float().contiguous().clone() for k, v in tensors.items()}
    atomic_write(out / "unet" / "diffusion_pytorch_model.safetensors",
                 lambda f: f.write(safetensors_bytes(tensors, metadata={"format": "pt"})))
    dump = lambda obj: json.dumps(obj, indent=2) + "\n"  # noqa: E731
    atomic_write_text(out / "unet" / "config.json", dump(conf))
    atomic_write_text(out / "scheduler" / "scheduler_config.json", dump(scheduler_config(cfg)))
    atomic_write_text(out / "s2dm_export.json", dump(provenance))
    atomic_write_text(out / "model_index.json", dump({
        "_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}))


def export(ckpt, out, *, to: str = "diffusers", use_ema: bool = True, force: bool = False) -> dict:
    """Write the checkpoint ``ckpt`` (file or run folder) as ``to`` ('diffusers': a pipeline
    folder; 'ddim': a state-dict file) at ``out``. Returns a summary."""
    out, to = Path(out), check_layout(to, "to")  # before the checkpoint, which can be half a GiB, is read
    # a file where a folder goes (or the reverse) first: force=True would not mend it
    if to == "diffusers" and out.is_file():
        raise InteropError(f"{out} is a file; the diffusers layout is a folder", key="out")
    if to == "ddim" and out.is_dir():
        raise InteropError(f"{out} is a folder; the ddim layout is one file", key="out")
    if out.exists() and not force and (out.is_file() or any(out.iterdir())):
        raise InteropError(f"{out} exists{'' if out.is_file() else ' and is not empty'}; overwrite it with force=True",
                           key="force")
    path = resolve_checkpoint(ckpt)
    state = read_checkpoint(path)
    cfg = config_from_saved(state["config"])
    which = pick_weights(state, use_ema, path, "export")
    weights = state[which]
    provenance = {"checkpoint": str(path.resolve()), "sha256": sha256_file(path), "step": int(state["step"]),
                  "weights": which, "config": cfg.to_dict(), "source": state.get("source")}
    if to == "diffusers":
        with writing(out, InteropError, key="out"):
            write_diffusers(out, cfg, weights, provenance)
    else:  # ddim
        check_32_groups(cfg, "the DDIM repository's Model")
        with writing(out, InteropError, key="out"):
            atomic_torch_save({k: v.detach().float() for k, v in weights.items()}, out)
    return {"out": str(out), "weights": which, "step": int(state["step"]), "config": cfg}
