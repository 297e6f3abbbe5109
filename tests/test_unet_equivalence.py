"""s2dm's UNet is the DDPM network: the same function as diffusers' ``UNet2DModel`` in the DDPM
layout (weights copied across by name), and the same function as a plainly written DDPM
forward (the optimised evaluation in s2dm/unet.py changes only float round-off).

The key mapping here (``s2dm_key_to_diffusers`` / ``diffusers_key_to_s2dm``) is general over
levels, res blocks per level, attention levels and resamplers, for reuse by a converter.
"""
from __future__ import annotations

import math
import re
from typing import Dict, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F

from s2dm.unet import Upsample, UNet, timestep_embedding, upsample_conv_kernel

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
        return f"{path}_blocks.{level}.{group}.{i}.{table[mod]}.{param}"
    m = re.fullmatch(r"(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)", key)
    if m:
        path, level, kind, param = m.groups()
        level = int(level) if path == "down" else num_levels - 1 - int(level)
        return f"{path}_blocks.{level}.{kind}rs.0.conv.{param}"
    m = re.fullmatch(r"(mid\.\w+)\.(\w+)\.(weight|bias)", key)
    if m:
        block, mod, param = m.groups()
        table = _ATTN if block == "mid.attn_1" else _RESNET
        return f"{_MID[block]}.{table[mod]}.{param}"
    raise KeyError(f"no diffusers name for s2dm key {key!r}")


def diffusers_key_to_s2dm(key: str, num_levels: int) -> str:
    """The inverse of ``s2dm_key_to_diffusers``."""
    inv = lambda table: {v: k for k, v in table.items()}  # noqa: E731
    top = _sub(inv(_TOP), key)
    if top is not None:
        return top
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.([\w.]+)\.(weight|bias)", key)
    if m:
        path, level, group, i, mod, param = m.groups()
        level = int(level) if path == "down" else num_levels - 1 - int(level)
        table, kind = (inv(_RESNET), "block") if group == "resnets" else (inv(_ATTN), "attn")
        return f"{path}.{level}.{kind}.{i}.{table[mod]}.{param}"
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(downsample|upsample)rs\.0\.conv\.(weight|bias)", key)
    if m:
        path, level, kind, param = m.groups()
        level = int(level) if path == "down" else num_levels - 1 - int(level)
        return f"{path}.{level}.{kind}.conv.{param}"
    m = re.fullmatch(r"(mid_block\.(?:resnets|attentions)\.\d+)\.([\w.]+)\.(weight|bias)", key)
    if m:
        block, mod, param = m.groups()
        s2dm_block = inv(_MID)[block]
        table = inv(_ATTN) if s2dm_block == "mid.attn_1" else inv(_RESNET)
        return f"{s2dm_block}.{table[mod]}.{param}"
    raise KeyError(f"no s2dm name for diffusers key {key!r}")


def _is_attn_projection(s2dm_key: str) -> bool:
    return bool(re.search(r"(attn\.\d+|attn_1)\.(q|k|v|proj_out)\.weight$", s2dm_key))


def s2dm_to_diffusers_state_dict(sd: Dict[str, torch.Tensor], num_levels: int) -> Dict[str, torch.Tensor]:
    """Rename, and turn the attention 1×1 convolution weights (C, C, 1, 1) into Linear (C, C)."""
    out = {}
    for key, value in sd.items():
        out[s2dm_key_to_diffusers(key, num_levels)] = value[:, :, 0, 0] if _is_attn_projection(key) else value
    return out


def diffusers_to_s2dm_state_dict(sd: Dict[str, torch.Tensor], num_levels: int) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        new = diffusers_key_to_s2dm(key, num_levels)
        out[new] = value[:, :, None, None] if _is_attn_projection(new) else value
    return out


def diffusers_unet_kwargs(in_channels: int = 3, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 2, 2),
                          num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (16,),
                          dropout: float = 0.1, image_size: int = 32, out_channels: Optional[int] = None) -> dict:
    """``UNet2DModel`` arguments for the network ``UNet(...)`` builds from the same arguments
    (the google/ddpm-cifar10-32 layout for the defaults). diffusers has one GroupNorm group
    count and only convolutional resamplers, so every width must be a multiple of 32."""
    widths = [ch * m for m in ch_mult]
    if any(w % 32 for w in [ch] + widths):
        raise ValueError("diffusers' UNet2DModel uses 32 groups everywhere: widths must be multiples of 32")
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


LAYOUTS = [
    dict(in_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(8,), image_size=16),
    dict(in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8, 2), image_size=8),
]


def _pair(layout, dropout=0.0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ours = UNet(dropout=dropout, **layout)
    for p in ours.parameters():  # non-trivial norms and biases, so every weight matters
        p.data.add_(0.1 * torch.randn_like(p))
    theirs = diffusers.UNet2DModel(**diffusers_unet_kwargs(dropout=dropout, **layout))
    theirs.load_state_dict(s2dm_to_diffusers_state_dict(ours.state_dict(), len(layout["ch_mult"])))
    return ours, theirs


def test_ddpm_cifar10_layout_has_35_7m_parameters_in_diffusers():
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.UNet2DModel(**diffusers_unet_kwargs())
    assert sum(p.numel() for p in theirs.parameters()) == 35_746_307
    assert theirs.config.up_block_types == ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_state_dict_mapping_is_one_to_one(layout):
    ours, theirs = _pair(layout)
    n = len(layout["ch_mult"])
    mapped = s2dm_to_diffusers_state_dict(ours.state_dict(), n)
    want = theirs.state_dict()
    assert set(mapped) == set(want)
    for key, value in mapped.items():
        assert value.shape == want[key].shape, key
    back = diffusers_to_s2dm_state_dict(want, n)
    assert set(back) == set(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize("layout", LAYOUTS)
def test_output_and_gradients_equal_diffusers(layout):
    ours, theirs = _pair(layout)
    x = torch.randn(3, layout["in_channels"], layout["image_size"], layout["image_size"])
    t = torch.tensor([0, 417, 999])
    ours.eval(), theirs.eval()
    with torch.inference_mode():
        a, b = ours(x, t), theirs(x, t).sample
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    ours.train(), theirs.train()  # dropout is 0: training mode is deterministic
    ours(x, t).square().mean().backward()
    theirs(x, t).sample.square().mean().backward()
    n = len(layout["ch_mult"])
    grads = {s2dm_key_to_diffusers(k, n): p.grad for k, p in ours.named_parameters()}
    scale = max(g.abs().max() for g in grads.values())
    for key, p in theirs.named_parameters():
        g = grads[key] if p.grad.shape == grads[key].shape else grads[key][:, :, 0, 0]
        torch.testing.assert_close(g, p.grad, rtol=0, atol=1e-5 * float(scale), msg=key)


# ---------------------------------------------------------------------------------------
# The optimised evaluation against the DDPM forward written out plainly
# ---------------------------------------------------------------------------------------
def reference_forward(m: UNet, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The DDPM UNet as first written in s2dm (and in the DDIM repository): upsample then
    convolve, q/k/v as separate 1×1 convolutions, explicit softmax attention, out-of-place
    dropout with the block's own ``nn.Dropout`` (the same random draws as the fast path)."""
    temb = m.temb.dense[1](F.silu(m.temb.dense[0](timestep_embedding(t, m.ch))))

    def res(b, x):
        h = b.conv1(F.silu(b.norm1(x)))
        h = h + b.temb_proj(F.silu(temb))[:, :, None, None]
        h = b.conv2(b.dropout(F.silu(b.norm2(h))))
        return h + (x if b.nin_shortcut is None else b.nin_shortcut(x))

    def attn(a, x):
        B, C, H, W = x.shape
        hn = a.norm(x)
        q, k, v = (p(hn).reshape(B, C, H * W) for p in (a.q, a.k, a.v))
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(C), dim=-1)
        return x + a.proj_out(torch.einsum("bij,bcj->bci", w, v).reshape(B, C, H, W))

    def up(u, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if u.conv is None else u.conv(x)

    hs = [m.conv_in(x)]
    for stage in m.down:
        for i, block in enumerate(stage.block):
            h = res(block, hs[-1])
            hs.append(attn(stage.attn[i], h) if len(stage.attn) else h)
        if hasattr(stage, "downsample"):
            hs.append(stage.downsample(hs[-1]))
    h = res(m.mid.block_2, attn(m.mid.attn_1, res(m.mid.block_1, hs[-1])))
    for stage in reversed(m.up):
        for i, block in enumerate(stage.block):
            h = res(block, torch.cat([h, hs.pop()], dim=1))
            if len(stage.attn):
                h = attn(stage.attn[i], h)
        if hasattr(stage, "upsample"):
            h = up(stage.upsample, h)
    return m.conv_out(F.silu(m.norm_out(h)))


@pytest.mark.parametrize("layout", LAYOUTS + [
    dict(in_channels=3, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), image_size=8,
         resamp_with_conv=False),
])
def test_training_forward_and_gradients_match_the_plain_forward(layout):
    """Dropout 0.1 in training mode: same masks (same RNG draws), same output, same grads."""
    torch.manual_seed(0)
    m = UNet(dropout=0.1, **layout).train()
    x = torch.randn(4, layout["in_channels"], layout["image_size"], layout["image_size"])
    t = torch.tensor([3, 250, 600, 999])
    torch.manual_seed(1)
    fast = m(x, t)
    fast.square().mean().backward()
    g_fast = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    torch.manual_seed(1)
    ref = reference_forward(m, x, t)
    ref.square().mean().backward()
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    scale = max(p.grad.abs().max() for p in m.parameters())
    for k, p in m.named_parameters():
        torch.testing.assert_close(g_fast[k], p.grad, rtol=0, atol=1e-5 * float(scale), msg=k)
    m.eval()
    with torch.inference_mode():
        want = reference_forward(m, x, t)
        for nhwc in (True, False):  # sampling on the CPU runs channels-last by default
            m.cpu_inference_channels_last = nhwc
            got = m(x, t)
            assert got.is_contiguous()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hw", [(1, 1), (4, 4), (5, 7)])
def test_upsample_as_transposed_convolution_is_exact(hw):
    torch.manual_seed(0)
    up = Upsample(6, with_conv=True).double()
    x = torch.randn(2, 6, *hw, dtype=torch.float64)
    want = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(up(x), want, rtol=1e-12, atol=1e-12)
    assert upsample_conv_kernel(up.conv.weight).shape == (6, 6, 4, 4)
