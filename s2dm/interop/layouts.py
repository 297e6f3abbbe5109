"""The two public layouts of the DDPM UNet, and s2dm's: names, shapes, architecture.

s2dm's UNet keeps the DDIM repository's module names (``Model`` in ermongroup/ddim's
models/diffusion.py), so a DDIM-layout state dict is already an s2dm one; diffusers'
``UNet2DModel`` holds the same tensors under other names, with the attention projections
as Linear instead of 1×1 convolutions. Pure functions: no files (convert.py, export.py).
"""
from __future__ import annotations

import math
import re
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..errors import InteropError
from ..io.config import ModelConfig

StateDict = Dict[str, torch.Tensor]

# The published layouts s2dm reads (convert) and writes (export): diffusers' UNet2DModel and the
# DDIM repository's state dict.
LAYOUTS = ("diffusers", "ddim")


def check_layout(layout: str, key: str) -> str:
    """``layout`` if it is one of ``LAYOUTS``; InteropError naming ``key`` otherwise."""
    if layout not in LAYOUTS:
        raise InteropError(f"{key} {layout!r}: expected {' or '.join(LAYOUTS)}", key=key)
    return layout

# ---------------------------------------------------------------------------------------
# s2dm (DDIM-repository names) <-> diffusers UNet2DModel names
# ---------------------------------------------------------------------------------------
_RESNET = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
           "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP = {"temb.dense.0": "time_embedding.linear_1", "temb.dense.1": "time_embedding.linear_2",
        "conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"}
_MID = {"mid.block_1": "mid_block.resnets.0", "mid.block_2": "mid_block.resnets.1",
        "mid.attn_1": "mid_block.attentions.0"}
# diffusers before 0.14 named the attention projections differently; its published DDPM
# checkpoints (google/ddpm-*) still use these names, which diffusers renames on load.
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _sub(table: Dict[str, str], key: str) -> Optional[str]:
    """Replace the longest dotted prefix of ``key`` found in ``table``."""
    for src in sorted(table, key=len, reverse=True):
        if key == src or key.startswith(src + "."):
            return table[src] + key[len(src):]
    return None


def s2dm_key_to_diffusers(key: str, num_levels: int) -> str:
    """An s2dm UNet state-dict key → the UNet2DModel key holding the same tensor.

    down.L.block.i → down_blocks.L.resnets.i, down.L.attn.i → down_blocks.L.attentions.i,
    down.L.downsample.conv → down_blocks.L.downsamplers.0.conv; the up path is stored by
    level in s2dm and in walking order in diffusers: up.L.* → up_blocks.(num_levels−1−L).*,
    up.L.upsample.conv → up_blocks.(num_levels−1−L).upsamplers.0.conv. Inside a res block
    temb_proj → time_emb_proj and nin_shortcut → conv_shortcut; inside attention norm →
    group_norm, q/k/v → to_q/to_k/to_v, proj_out → to_out.0.
    """
    top = _sub(_TOP, key)
    if top is not None:
        return top
    m = re.fullmatch(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)\.(weight|bias)", key)
    if m:
        path, level, kind, i, mod, param = m.groups()
        level = int(level) if path == "down" else num_levels - 1 - int(level)
        table, group = (_RESNET, "resnets") if kind == "block" else (_ATTN, "attentions")
        if mod in table:
            return f"{path}_blocks.{level}.{group}.{i}.{table[mod]}.{param}"
    m = re.fullmatch(r"(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)", key)
    if m:
        path, level, kind, param = m.groups()
        level = int(level) if path == "down" else num_levels - 1 - int(level)
        return f"{path}_blocks.{level}.{kind}rs.0.conv.{param}"
    m = re.fullmatch(r"(mid\.\w+)\.(\w+)\.(weight|bias)", key)
    if m and m.group(1) in _MID:
        block, mod, param = m.groups()
        table = _ATTN if block == "mid.attn_1" else _RESNET
        if mod in table:
            return f"{_MID[block]}.{table[mod]}.{param}"
    raise KeyError(f"no diffusers name for s2dm key {key!r}")


def diffusers_key_to_s2dm(key: str, num_levels: int) -> str:
    """The inverse of ``s2dm_key_to_diffusers`` (legacy attention names accepted too)."""
    inv = lambda table: {v: k for k, v in table.items()}  # noqa: E731
    key = re.sub(r"(attentions\.\d+)\.(query|key|value|proj_attn)\.",
                 lambda m: f"{m.group(1)}.{_LEGACY_ATTN[m.group(2)]}.", key)
    top = _sub(inv(_TOP), key)
    if top is not None:
        return top
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.([\w.]+)\.(weight|bias)", key)
    if m:
        path, level, group, i, mod, param = m.groups()
        level = int(level) if path == "down" else num_levels - 1 - int(level)
        table, kind = (inv(_RESNET), "block") if group == "resnets" else (inv(_ATTN), "attn")
        if mod in table:
            return f"{path}.{level}.{kind}.{i}.{table[mod]}.{param}"
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(downsample|upsample)rs\.0\.conv\.(weight|bias)", key)
    if m:
        path, level, kind, param = m.groups()
        level = int(level) if path == "down" else num_levels - 1 - int(level)
        return f"{path}.{level}.{kind}.conv.{param}"
    m = re.fullmatch(r"(mid_block\.(?:resnets|attentions)\.\d+)\.([\w.]+)\.(weight|bias)", key)
    if m and m.group(1) in inv(_MID):
        block, mod, param = m.groups()
        s2dm_block = inv(_MID)[block]
        table = inv(_ATTN) if s2dm_block == "mid.attn_1" else inv(_RESNET)
        if mod in table:
            return f"{s2dm_block}.{table[mod]}.{param}"
    raise KeyError(f"no s2dm name for diffusers key {key!r}")


def _is_attn_projection(s2dm_key: str) -> bool:
    return bool(re.search(r"(attn\.\d+|attn_1)\.(q|k|v|proj_out)\.weight$", s2dm_key))


def s2dm_to_diffusers_state_dict(sd: StateDict, num_levels: int) -> StateDict:
    """Rename, and turn the attention 1×1 convolution weights (C, C, 1, 1) into Linear (C, C)."""
    out = {}
    for key, value in sd.items():
        out[s2dm_key_to_diffusers(key, num_levels)] = value[:, :, 0, 0] if _is_attn_projection(key) else value
    return out


def diffusers_to_s2dm_state_dict(sd: StateDict, num_levels: int) -> StateDict:
    """Rename, and turn the attention Linear weights (C, C) into 1×1 convolutions (C, C, 1, 1)."""
    out = {}
    for key, value in sd.items():
        new = diffusers_key_to_s2dm(key, num_levels)
        out[new] = value[:, :, None, None] if _is_attn_projection(new) and value.ndim == 2 else value
    return out


def diffusers_unet_kwargs(in_channels: int = 3, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 2, 2),
                          num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (16,),
                          dropout: float = 0.1, image_size: int = 32, out_channels: Optional[int] = None) -> dict:
    """``UNet2DModel`` arguments for the network ``UNet(...)`` builds from the same arguments
    (the google/ddpm-cifar10-32 layout for the defaults). diffusers has one GroupNorm group
    count and only convolutional resamplers, so every width must be a multiple of 32."""
    widths = [ch * m for m in ch_mult]
    if any(w % 32 for w in [ch] + widths):
        raise InteropError("diffusers' UNet2DModel uses 32 groups everywhere: widths must be multiples of 32")
    res = [image_size // 2 ** i for i in range(len(ch_mult))]
    attn = [r in attn_resolutions for r in res]
    return dict(
        sample_size=image_size, in_channels=in_channels, out_channels=out_channels or in_channels,
        block_out_channels=tuple(widths), layers_per_block=num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6, act_fn="silu",
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, time_embedding_type="positional",
        dropout=dropout, resnet_time_scale_shift="default", add_attention=True,
    )


# ---------------------------------------------------------------------------------------
# Architecture: from a diffusers config.json, from DDIM-repository shapes, compared
# ---------------------------------------------------------------------------------------
# UNet2DModel settings that must have DDPM's value for s2dm's UNet to compute the same
# function: key → (DDPM's value, UNet2DModel's default when config.json omits the key).
DDPM_SETTINGS = {
    "center_input_sample": (False, False),
    "time_embedding_type": ("positional", "positional"),
    "flip_sin_to_cos": (False, True),  # DDPM's embedding is [sin | cos]
    "freq_shift": (1, 0),  # DDPM's frequencies are 10000^(−i/(half−1))
    "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D"),
    "mid_block_scale_factor": (1, 1),
    "downsample_padding": (0, 1),  # DDPM pads (0,1,0,1) before its stride-2 convolution
    "downsample_type": ("conv", "conv"),
    "upsample_type": ("conv", "conv"),
    "act_fn": ("silu", "silu"),
    "norm_num_groups": (32, 32),
    "norm_eps": (1e-6, 1e-5),
    "resnet_time_scale_shift": ("default", "default"),
    "add_attention": (True, True),
    "class_embed_type": (None, None),
    "num_class_embeds": (None, None),
}


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _listed(conf: dict, where: str, key: str, kind: type, ok=lambda v: True) -> list:
    """``conf[key]`` (default empty): a list of ``kind``, each ``ok``; else a malformed config."""
    value = conf.get(key, [])
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, kind) and not isinstance(v, bool) and ok(v) for v in value):
        raise InteropError(f"{where}: {key}: {value!r} is not a list of "
                           f"{'positive integers' if kind is int else 'names'}")
    return list(value)


def _number(conf: dict, where: str, key: str, default, kind, ok, what: str):
    """``conf[key]`` (else ``default``): a ``kind`` that is ``ok``; else a malformed config."""
    value = conf.get(key, default)
    if not isinstance(value, kind) or isinstance(value, bool) or not ok(value):
        raise InteropError(f"{where}: {key}: {value!r} is not {what}")
    return value


def model_from_diffusers_config(conf: dict, where: str) -> Tuple[ModelConfig, int, int]:
    """(ModelConfig, image size, channels) of a DDPM-layout ``UNet2DModel`` config; a
    InteropError naming the first setting s2dm's UNet cannot express."""
    def refuse(key, why):
        raise InteropError(f"{where}: {key}: {why}; s2dm's UNet is the DDPM network and cannot express it")

    if conf.get("_class_name", "UNet2DModel") != "UNet2DModel":
        refuse("_class_name", f"{conf['_class_name']!r} is not a UNet2DModel")
    for key, (want, default) in DDPM_SETTINGS.items():
        if not _same(conf.get(key, default), want):
            refuse(key, f"{conf.get(key, default)!r} (DDPM has {want!r})")
    widths = _listed(conf, where, "block_out_channels", int, lambda w: w > 0)
    down, up = _listed(conf, where, "down_block_types", str), _listed(conf, where, "up_block_types", str)
    if not widths or len(down) != len(widths):
        refuse("block_out_channels", f"{widths} does not give one width per down block {down}")
    for i, kind in enumerate(down):
        if kind not in ("DownBlock2D", "AttnDownBlock2D"):
            refuse(f"down_block_types[{i}]", f"{kind!r} is not a DDPM block (DownBlock2D, AttnDownBlock2D)")
    attn = [kind == "AttnDownBlock2D" for kind in down]
    mirror = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    if up != mirror:
        refuse("up_block_types", f"{up} does not mirror down_block_types (DDPM: {mirror})")
    ch = widths[0]
    if any(w % ch for w in widths):
        refuse("block_out_channels", f"{widths} are not multiples of the first width {ch}")
    head = conf.get("attention_head_dim", 8)
    attn_widths = [w for w, a in zip(widths, attn) if a] + [widths[-1]]
    if head is not None and any(w != head for w in attn_widths):
        refuse("attention_head_dim", f"{head} splits attention into several heads (DDPM: one head, null)")
    if conf.get("time_embedding_dim") not in (None, 4 * ch):
        refuse("time_embedding_dim", f"{conf['time_embedding_dim']} (DDPM: 4 × {ch})")
    if conf.get("attn_norm_num_groups") not in (None, 32):
        refuse("attn_norm_num_groups", f"{conf['attn_norm_num_groups']} (DDPM: 32)")
    size = conf.get("sample_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise InteropError(f"{where}: sample_size: {size!r} is not one square image size")
    channels = conf.get("in_channels", 3)
    if conf.get("out_channels", 3) != channels or channels not in (1, 3):
        refuse("out_channels", f"{conf.get('out_channels', 3)} with in_channels {channels} "
                               "(ε-prediction: equal, 1 or 3)")
    model = ModelConfig(
        ch=ch, ch_mult=[w // ch for w in widths],
        num_res_blocks=_number(conf, where, "layers_per_block", 2, int, lambda n: n > 0, "a positive integer"),
        attn_resolutions=[size >> level for level, a in enumerate(attn) if a], resamp_with_conv=True,
        # Not in the weights; newer config.json files record it, older ones (google/ddpm-*)
        # do not, and then DDPM's 0.1 is what a fine-tune should use. --config overrides it.
        dropout=float(_number(conf, where, "dropout", ModelConfig.dropout, (int, float), lambda d: 0 <= d < 1,
                              "a rate in [0, 1)")),
    )
    return model, size, channels


def model_from_ddim_state_dict(sd: StateDict, image_size: int, where: str) -> Tuple[ModelConfig, int]:
    """(ModelConfig, channels) read off the shapes of a DDIM-repository ``Model`` state dict.

    ch from conv_in, ch_mult from each level's first res block, num_res_blocks from level 0,
    attention levels from ``down.L.attn.0``; the image size is not in the file (it places the
    attention levels at resolutions), so the caller supplies it. The caller then checks every
    tensor against the model this describes."""
    for key in ("conv_in.weight", "down.0.block.0.conv1.weight"):
        if key not in sd:
            raise InteropError(f"{where}: no {key}: not a DDPM UNet state dict in the DDIM-repository layout")
    ch, channels = sd["conv_in.weight"].shape[:2]
    levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"down\.(\d+)\.", k)))
    ch_mult = []
    for level in range(levels):
        key = f"down.{level}.block.0.conv1.weight"
        if key not in sd or sd[key].shape[0] % ch:
            raise InteropError(f"{where}: {key} is missing or not a multiple of ch={ch} wide")
        ch_mult.append(sd[key].shape[0] // ch)
    num_res_blocks = len({k.split(".")[3] for k in sd if k.startswith("down.0.block.")})
    attn_resolutions = [image_size >> lv for lv in range(levels) if f"down.{lv}.attn.0.q.weight" in sd]
    resamp_with_conv = levels == 1 or "down.0.downsample.conv.weight" in sd
    return ModelConfig(ch=int(ch), ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                       attn_resolutions=attn_resolutions, resamp_with_conv=resamp_with_conv), int(channels)


def architecture(model: ModelConfig, image_size: int, channels: int) -> dict:
    """What fixes the weights' shapes, by the config key a user would change."""
    levels = len(model.ch_mult)
    attention = [image_size >> lv for lv in range(levels) if image_size >> lv in model.attn_resolutions]
    return {
        "data.channels": channels, "data.image_size": image_size, "model.ch": model.ch,
        "model.ch_mult": list(model.ch_mult), "model.num_res_blocks": model.num_res_blocks,
        "model.attn_resolutions": attention, "model.resamp_with_conv": model.resamp_with_conv or levels == 1,
    }


def first_difference(have: dict, want: dict, where: str = "the config") -> Optional[str]:
    """The first architecture key where ``have`` (the weights) and ``want`` (a config) differ."""
    for key in have:
        if have[key] != want[key]:
            return f"{key} is {have[key]} in the weights but {want[key]} in {where}"
    return None
