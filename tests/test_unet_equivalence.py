"""s2dm's UNet is the DDPM network: the same function as diffusers' ``UNet2DModel`` in the DDPM
layout (weights copied across by name), and the same function as a plainly written DDPM
forward (the optimised evaluation in s2dm/core/unet.py changes only float round-off).

The key mapping (``s2dm_key_to_diffusers`` / ``diffusers_key_to_s2dm``, in s2dm/interop/layouts.py)
is general over levels, res blocks per level, attention levels and resamplers;
tests/test_convert.py checks the converter built on it.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from s2dm.core.unet import Upsample, UNet, timestep_embedding, upsample_conv_kernel
from s2dm.interop.layouts import (diffusers_to_s2dm_state_dict, diffusers_unet_kwargs, s2dm_key_to_diffusers,
                                  s2dm_to_diffusers_state_dict)

# -------------------------------------------------------------------------------------
# s2dm <-> diffusers UNet2DModel
# -------------------------------------------------------------------------------------
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
