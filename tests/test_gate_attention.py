"""Output gate and global attention mixer, against explicit formulas."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from attnzoo.layers import GATE_MODES, Attention, OutputGate, create_gate, create_mixer, list_mixers


def _explicit_attention(module: Attention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, then the gate and projection, written out."""
    tokens = x.flatten(1, -2)
    B, N, C = tokens.shape
    h, d = module.num_heads, module.head_dim
    q, k, v = (tokens @ module.qkv.weight.T + module.qkv.bias).split(h * d, dim=-1)
    q, k, v = (t.view(B, N, h, d).transpose(1, 2) for t in (q, k, v))
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (attn @ v).transpose(1, 2)  # (B, N, h, d)
    if module.gate is not None:
        g = torch.sigmoid(tokens @ module.gate.weight.T + module.gate.bias)
        out = out * (g.view(B, N, h, 1) if module.gate.mode == "headwise" else g.view(B, N, h, d))
    out = out.reshape(B, N, h * d) @ module.proj.weight.T + module.proj.bias
    return out.view(*x.shape[:-1], C)


@pytest.mark.parametrize("gate", GATE_MODES)
@pytest.mark.parametrize("shape", [(2, 7, 48), (2, 5, 6, 48)])
def test_attention_matches_explicit_formula(gate, shape):
    torch.manual_seed(0)
    module = Attention(48, num_heads=4, qkv_bias=True, gate=gate).eval()
    for p in module.parameters():  # non-trivial gate/bias values
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(shape)
    torch.testing.assert_close(module(x), _explicit_attention(module, x), atol=1e-5, rtol=1e-5)


def test_gate_widths_and_init():
    ew = create_gate("elementwise", 32, num_heads=4, head_dim=8)
    hw = create_gate("headwise", 32, num_heads=4, head_dim=8)
    assert ew.weight.shape == (32, 32) and hw.weight.shape == (4, 32)
    assert torch.all(ew.bias == 0) and 0.01 < ew.weight.std() < 0.03
    assert create_gate("none", 32, 4, 8) is None and create_gate(None, 32, 4, 8) is None


def test_headwise_gate_scales_whole_heads():
    gate = OutputGate(6, num_heads=2, head_dim=3, mode="headwise")
    with torch.no_grad():
        gate.weight.zero_()
        gate.bias.copy_(torch.tensor([100.0, -100.0]))  # head 0 open, head 1 shut
    y = gate(torch.randn(1, 6), torch.ones(1, 6))
    torch.testing.assert_close(y, torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("bad", ["gated", "per-head", ""])
def test_bad_gate_mode_raises(bad):
    with pytest.raises(ValueError, match="gate"):
        create_gate(bad, 8, 2, 4)
    with pytest.raises(ValueError, match="gate"):
        Attention(8, num_heads=2, gate=bad)


def test_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="num_heads"):
        Attention(10, num_heads=3)


def test_attention_mask_is_applied():
    torch.manual_seed(0)
    module = Attention(16, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(1, 4, 16)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:, 0] = True  # every query sees token 0 only
    out = module(x, attn_mask=mask)
    tokens = x[0]
    v = (tokens @ module.qkv.weight.T + module.qkv.bias).split(16, dim=-1)[2]
    expected = (v[0].expand(4, 16)) @ module.proj.weight.T + module.proj.bias
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)


def test_attention_gradients_reach_gate():
    module = Attention(16, num_heads=2, gate="headwise")
    module(torch.randn(2, 3, 3, 16)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_mixer_registry():
    assert "attention" in list_mixers()
    assert isinstance(create_mixer("attention", 16, num_heads=2, gate="elementwise"), Attention)
    with pytest.raises(ValueError, match="unknown token mixer"):
        create_mixer("no_such_mixer", 16, num_heads=2)


@pytest.mark.parametrize("name", list_mixers())
@pytest.mark.parametrize("gate", GATE_MODES)
def test_every_mixer_honours_the_interface(name, gate):
    """(B, H, W, C) -> (B, H, W, C) at odd, non-square sizes, with every gate, on the meta device too."""
    torch.manual_seed(0)
    mixer = create_mixer(name, 32, num_heads=4, gate=gate)
    for size in [(5, 9), (14, 14), (1, 3)]:
        x = torch.randn(2, *size, 32, requires_grad=True)
        y = mixer(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        y.sum().backward()
        assert x.grad is not None
    # a mixer's output for one image must not depend on the other images of the batch
    x = torch.randn(3, 6, 7, 32)
    torch.testing.assert_close(mixer.eval()(x)[1:2], mixer(x[1:2]), atol=1e-5, rtol=1e-5)
    meta = create_mixer(name, 32, num_heads=4, gate=gate, device="meta")
    assert all(t.device.type == "meta" for t in [*meta.parameters(), *meta.buffers()])


@pytest.mark.parametrize("name", list_mixers())
def test_every_mixer_runs_in_bf16(name):
    torch.manual_seed(0)
    mixer = create_mixer(name, 32, num_heads=4, gate="elementwise").eval()
    x = torch.randn(1, 8, 8, 32)
    expected = mixer(x)
    y = copy.deepcopy(mixer).to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert F.cosine_similarity(y.float().flatten(), expected.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("name", list_mixers())
def test_every_mixer_takes_the_one_call_form(name):
    """``mixer(x, feat_size, attn_mask, is_causal)``: maps carry their grid; masks reach the mixers that attend over
    the whole sequence and are rejected by the others."""
    torch.manual_seed(0)
    mixer = create_mixer(name, 16, num_heads=2).eval()
    x = torch.randn(1, 3, 4, 16)
    expected = mixer(x)
    torch.testing.assert_close(mixer(x, [3, 4], None, False), expected)
    if name in ("attention", "attention_lepe"):
        torch.testing.assert_close(mixer(x, attn_mask=torch.ones(12, 12, dtype=torch.bool)), expected)
        assert not torch.allclose(mixer(x, is_causal=True), expected)
    else:
        with pytest.raises(ValueError, match="takes no attention mask"):
            mixer(x, attn_mask=torch.ones(12, 12, dtype=torch.bool))
