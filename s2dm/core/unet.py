"""The DDPM UNet (Ho et al. 2020, as in the DDIM repository's ``Model``).

ch_mult (1,2,2,2), 2 res blocks per level, attention at 16×16, ch 128 gives the CIFAR10 model
(35.7 M parameters). Attention uses PyTorch's fused scaled-dot-product kernel. Module names
follow the DDIM repository so its checkpoints map by name.

The network computes exactly the DDPM function (the same as diffusers' ``UNet2DModel`` in the
DDPM layout, see tests/test_unet_equivalence.py); a few evaluation shortcuts, identical up to
float round-off, make it cheaper (scripts/bench_train.py measures them):

* ``Upsample``: 2× nearest upsampling followed by a 3×3 convolution is evaluated as ONE
  stride-2 transposed convolution whose 4×4 kernel sums the 3×3 taps that land on the same
  low-resolution pixel. 2.25× fewer multiply-adds than convolving the upsampled image, and
  the 4× larger upsampled tensor is never built.
* ``AttnBlock``: the q, k, v weights are concatenated at call time into one (B·HW × C)·(C × 3C)
  product laid out as the attention kernel wants it; q, k, v and the output projection are
  2-D GEMMs over all B·HW pixels at once.
* ``ResnetBlock``: SiLU(temb) is computed once per forward instead of once per block, and the
  time-embedding and residual additions write into the convolution outputs.
* One timestep for the whole batch (t expanded with stride 0, as the samplers pass it): the
  embedding and every block's time projection are computed for one row and broadcast.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [sin | cos] with frequencies 10000^(−i/(half−1)) (DDPM's)."""
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1))
    )
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in DDPM; toy widths that 32 does not divide fall back to 8 groups.
    return nn.GroupNorm(32 if channels % 32 == 0 else 8, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.forward_act(x, F.silu(temb))

    def forward_act(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        """``forward`` with SiLU(temb) already applied (the UNet computes it once)."""
        # A convolution's backward needs its input and weight, not its output: the two
        # additions below write into the conv outputs instead of allocating new tensors.
        h = self.conv1(F.silu(self.norm1(x)))
        h.add_(self.temb_proj(temb_act)[:, :, None, None])
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x).reshape(b, c, h * w).transpose(1, 2).contiguous()  # (B, HW, C); a copy if x is NCHW
        # q, k, v as ONE (B·HW × C)·(C × 3C) product: each of q, k, v comes out (B, HW, C) with
        # unit stride over C, the layout the fused kernel takes without copying. One 2-D GEMM,
        # not a batched one over an expanded weight, whose backward is B small GEMMs + a sum.
        w_qkv = torch.cat([self.q.weight, self.k.weight, self.v.weight]).reshape(3 * c, c)
        b_qkv = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        q, k, v = F.linear(hn, w_qkv, b_qkv)[:, None].split(c, dim=3)  # (B, 1 head, HW, C) each
        # Default scale 1/√C as in DDPM.
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C)
        # proj_out(out), again one 2-D GEMM; its (B, HW, C) result is x's NHWC layout.
        y = F.linear(out, self.proj_out.weight.reshape(c, c), self.proj_out.bias)
        return x + y.view(b, h, w, c).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    def __init__(self, ch: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # TF "SAME" padding for stride 2, as DDPM


def upsample_conv_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The (I, O, 4, 4) kernel of the stride-2, padding-1 transposed convolution that equals
    a 3×3, padding-1 convolution with ``weight`` (O, I, 3, 3) applied after 2× nearest
    upsampling.

    Along one axis, output row 2i reads the upsampled rows 2i−1, 2i, 2i+1 = input rows i−1,
    i, i, so it sees input row i−1 through w₀ and row i through w₁+w₂; output row 2i+1 sees
    row i through w₀+w₁ and row i+1 through w₂. A transposed convolution writes input row i
    to output row 2i+k−1 with its tap k, hence taps k = 0..3 are [w₂, w₁+w₂, w₀+w₁, w₀].
    """

    def fold(w: torch.Tensor, dim: int) -> torch.Tensor:
        w0, w1, w2 = w.unbind(dim)
        return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)

    return fold(fold(weight.transpose(0, 1), 2), 3)  # built contiguous in (I, O, 4, 4)


class Upsample(nn.Module):
    def __init__(self, ch: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        # conv3×3(nearest×2(x)) as one transposed convolution (see upsample_conv_kernel).
        return F.conv_transpose2d(x, upsample_conv_kernel(self.conv.weight), self.conv.bias, stride=2, padding=1)


class UNet(nn.Module):
    """ε-prediction UNet: ``forward(x, t)`` with x (B, C, H, W) and t (B,) timesteps."""

    #: Without autograd on the CPU (sampling), run the activations channels-last (NHWC): the
    #: oneDNN forward kernels then need no layout reorders. Not in training, where NHWC
    #: measured slower (its weight-gradient kernel is). See scripts/bench_train.py --parts ablation.
    #: A one-channel input (digits) is both layouts at once and the network runs NCHW, which
    #: for those small models measured 1.4-1.5x faster than forcing NHWC after conv_in.
    cpu_inference_channels_last: bool = True

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        resamp_with_conv: bool = True,
        image_size: int = 32,
    ):
        super().__init__()
        self.ch, self.in_channels = ch, in_channels
        self.out_channels = out_channels or in_channels
        self.image_size = image_size
        temb_ch = ch * 4
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        res, block_in = image_size, ch
        skip_chs = [ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, ch * mult, temb_ch, dropout))
                block_in = ch * mult
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
                skip_chs.append(block_in)
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(block_in, resamp_with_conv)
                res //= 2
                skip_chs.append(block_in)
            self.down.append(stage)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, temb_ch, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, temb_ch, dropout)

        ups = []
        for level, mult in reversed(list(enumerate(ch_mult))):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in + skip_chs.pop(), ch * mult, temb_ch, dropout))
                block_in = ch * mult
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = Upsample(block_in, resamp_with_conv)
                res *= 2
            ups.insert(0, stage)  # stored in level order, like the DDIM repo
        self.up = nn.ModuleList(ups)

        self.norm_out = norm(block_in)
        self.conv_out = nn.Conv2d(block_in, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        # One t for the whole batch (a sampler's step passes it expanded, stride 0): embed it
        # once; the (1, C) projections broadcast over the batch.
        temb = timestep_embedding(t[:1] if t.stride(0) == 0 else t, self.ch)
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))
        temb_act = F.silu(temb)  # every ResnetBlock projects SiLU(temb): computed once

        nhwc = self.cpu_inference_channels_last and x.device.type == "cpu" and not torch.is_grad_enabled()
        if nhwc:  # every op below keeps the layout of its input
            x = x.contiguous(memory_format=torch.channels_last)
        hs = [self.conv_in(x)]
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block.forward_act(hs[-1], temb_act)
                if len(stage.attn):
                    h = stage.attn[i](h)
                hs.append(h)
            if hasattr(stage, "downsample"):
                hs.append(stage.downsample(hs[-1]))

        h = hs[-1]
        h = self.mid.block_2.forward_act(self.mid.attn_1(self.mid.block_1.forward_act(h, temb_act)), temb_act)

        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block.forward_act(torch.cat([h, hs.pop()], dim=1), temb_act)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)

        out = self.conv_out(F.silu(self.norm_out(h)))
        return out.contiguous() if nhwc else out


def build_model(cfg) -> UNet:
    """The UNet a config object describes (anything with ``.model`` and ``.data`` sections, e.g.
    an ``s2dm.io.config.Config``; ``s2dm.build_model`` also takes a dict or a YAML path)."""
    m = cfg.model
    return UNet(
        in_channels=cfg.data.channels,
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout,
        resamp_with_conv=m.resamp_with_conv,
        image_size=cfg.data.image_size,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
