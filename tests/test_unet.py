import math

import torch
import torch.nn.functional as F

from s2dm import build_model, load_config
from s2dm.core.unet import AttnBlock, UNet, count_parameters, timestep_embedding


def test_cifar10_config_has_35_7m_parameters():
    cfg = load_config("configs/cifar10.yaml")  # outside: validating a config computes a schedule
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = build_model(cfg)
    assert next(model.parameters()).is_meta
    assert count_parameters(model) == 35_746_307


def test_celeba_config_has_78_7m_parameters():
    cfg = load_config("configs/celeba.yaml")
    assert cfg.data.image_size == 64 and cfg.model.ch_mult == [1, 2, 2, 2, 4]
    with torch.device("meta"):
        model = build_model(cfg)
    assert next(model.parameters()).is_meta
    assert count_parameters(model) == 78_700_803


def test_output_shape_and_scalar_t():
    torch.manual_seed(0)
    m = UNet(in_channels=3, ch=32, ch_mult=(1, 2), attn_resolutions=(8,), image_size=16, dropout=0.0)
    x = torch.randn(3, 3, 16, 16)
    out = m(x, torch.tensor([0, 10, 999]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    same = m(x, torch.tensor(10))
    torch.testing.assert_close(same[1], out[1])


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 3.0, 999.0])
    emb = timestep_embedding(t, 8)
    freqs = [math.exp(-math.log(10000) * i / 3) for i in range(4)]
    for r, tv in enumerate(t.tolist()):
        expected = [math.sin(tv * f) for f in freqs] + [math.cos(tv * f) for f in freqs]
        torch.testing.assert_close(emb[r], torch.tensor(expected, dtype=torch.float32))


def test_attention_matches_explicit_softmax():
    torch.manual_seed(1)
    block = AttnBlock(32)
    x = torch.randn(2, 32, 4, 4)
    h = block.norm(x)
    q, k, v = (m(h).flatten(2) for m in (block.q, block.k, block.v))  # B, C, HW
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(32), dim=-1)
    out = torch.einsum("bij,bcj->bci", w, v).reshape(2, 32, 4, 4)
    torch.testing.assert_close(block(x), x + block.proj_out(out), rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    m = UNet(in_channels=1, ch=32, ch_mult=(1, 2), attn_resolutions=(4,), image_size=8, dropout=0.0)
    x = torch.randn(4, 1, 8, 8)
    F.mse_loss(m(x, torch.tensor([1, 2, 3, 4])), x).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
