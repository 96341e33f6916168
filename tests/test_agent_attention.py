"""Agent attention against the published formula written out with explicit softmaxes, in the official bias layout."""

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from attnzoo.layers import GATE_MODES, AgentAttention, convert_agent_biases, create_mixer, resize_agent_bias

HEADS, DIM = 2, 16


def _official_biases(heads: int, n: int, grid: tuple[int, int], prefix: bool) -> dict[str, torch.Tensor]:
    """Random agent biases in the official checkpoint shapes (leading singleton axes, token-major ha/wa/ca)."""
    gh, gw = grid
    shapes = {
        "an_bias": (heads, n, 7, 7),
        "na_bias": (heads, n, 7, 7),
        "ah_bias": (1, heads, n, gh, 1),
        "aw_bias": (1, heads, n, 1, gw),
        "ha_bias": (1, heads, gh, 1, n),
        "wa_bias": (1, heads, 1, gw, n),
    }
    if prefix:
        shapes.update(ac_bias=(1, heads, n, 1), ca_bias=(1, heads, 1, n))
    return {name: torch.randn(shape) * 0.5 for name, shape in shapes.items()}


def _reference(module: AgentAttention, official: dict, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The published formula with explicit softmaxes, reading the biases in the official layout at grid H x W."""
    B, N, C = x.shape
    P, h, d, n = module.num_prefix_tokens, module.num_heads, module.head_dim, module.agent_num
    q, k, v = F.linear(x, module.qkv.weight, module.qkv.bias).split(C, dim=-1)
    agents = F.adaptive_avg_pool2d(q[:, P:].reshape(B, H, W, C).permute(0, 3, 1, 2), math.isqrt(n))
    agents = agents.reshape(B, C, n).transpose(1, 2)

    def heads(t):
        return t.reshape(B, -1, h, d).transpose(1, 2)

    q, k, v, agents = heads(q), heads(k), heads(v), heads(agents)
    bias1 = F.interpolate(official["an_bias"], size=(H, W), mode="bilinear").reshape(h, n, H * W)
    bias1 = bias1 + (official["ah_bias"] + official["aw_bias"]).reshape(h, n, H * W)
    bias2 = F.interpolate(official["na_bias"], size=(H, W), mode="bilinear").reshape(h, n, H * W).transpose(1, 2)
    bias2 = bias2 + (official["ha_bias"] + official["wa_bias"]).reshape(h, H * W, n)
    if P:
        bias1 = torch.cat([official["ac_bias"][0], bias1], dim=-1)
        bias2 = torch.cat([official["ca_bias"][0], bias2], dim=-2)
    agent_v = torch.softmax(agents @ k.transpose(-1, -2) / math.sqrt(d) + bias1, dim=-1) @ v
    out = torch.softmax(q @ agents.transpose(-1, -2) / math.sqrt(d) + bias2, dim=-1) @ agent_v
    out = out.transpose(1, 2).reshape(B, N, C)
    local = module.dwc(v.transpose(1, 2)[:, P:].reshape(B, H, W, C).permute(0, 3, 1, 2))
    out = torch.cat([out[:, :P], out[:, P:] + local.permute(0, 2, 3, 1).reshape(B, H * W, C)], dim=1)
    if module.gate is not None:
        g = torch.sigmoid(F.linear(x, module.gate.weight, module.gate.bias))
        out = out * (g.repeat_interleave(d, dim=-1) if module.gate.mode == "headwise" else g)
    return F.linear(out, module.proj.weight, module.proj.bias)


def _module_with_official(prefix: int, gate: str, grid=(5, 6), agent_num=9):
    torch.manual_seed(0)
    module = AgentAttention(DIM, HEADS, agent_num=agent_num, grid_size=grid, num_prefix_tokens=prefix, gate=gate)
    official = _official_biases(HEADS, agent_num, grid, bool(prefix))
    state = {f"attn.{k}": v for k, v in official.items()}
    target = {f"attn.{k}": v for k, v in module.state_dict().items()}
    converted = convert_agent_biases(state, target)
    module.load_state_dict({k[len("attn.") :]: v for k, v in converted.items()}, strict=False)
    with torch.no_grad():
        for p in (module.qkv.bias, module.dwc.bias, module.proj.bias):
            p.normal_()
    return module.eval(), official


@pytest.mark.parametrize("gate", GATE_MODES)
@pytest.mark.parametrize("prefix", [0, 1])
def test_matches_published_formula_with_official_biases(prefix, gate):
    module, official = _module_with_official(prefix, gate)
    x = torch.randn(2, prefix + 30, DIM)
    expected = _reference(module, official, x, 5, 6)
    torch.testing.assert_close(module(x, [5, 6]), expected, atol=1e-5, rtol=1e-5)
    if not prefix:  # the channels-last map path is the same computation
        torch.testing.assert_close(module(x.view(2, 5, 6, DIM)), expected.view(2, 5, 6, DIM), atol=1e-5, rtol=1e-5)


def test_class_token_is_not_pooled_and_gets_no_dwc():
    module, _ = _module_with_official(1, "none")
    x = torch.randn(1, 31, DIM)
    y = x.clone()
    y[:, 0] += 5.0  # another class token
    with mock.patch("torch.nn.functional.adaptive_avg_pool2d", wraps=F.adaptive_avg_pool2d) as pool:
        module(x, [5, 6])
        module(y, [5, 6])
    pooled = [call.args[0] for call in pool.call_args_list]
    assert pooled[0].shape[-2:] == (5, 6)
    torch.testing.assert_close(pooled[0], pooled[1])  # agents come from the patch queries only
    out = module(x, [5, 6])
    with torch.no_grad():
        module.dwc.weight.zero_()
        module.dwc.bias.zero_()
    no_dwc = module(x, [5, 6])
    torch.testing.assert_close(no_dwc[:, 0], out[:, 0])  # the class token gets no DWC term
    assert not torch.allclose(no_dwc[:, 1:], out[:, 1:])


@pytest.mark.parametrize("size", [(7, 9), (3, 3), (12, 4)])
def test_runtime_interpolation_equals_resampled_tables(size):
    """Running at another size == a module built for that size with its tables resampled by the checkpoint path."""
    module, _ = _module_with_official(1, "elementwise")
    other = AgentAttention(DIM, HEADS, agent_num=9, grid_size=size, num_prefix_tokens=1, gate="elementwise").eval()
    other.load_state_dict(convert_agent_biases(module.state_dict(), other.state_dict()))
    x = torch.randn(2, 1 + size[0] * size[1], DIM)
    torch.testing.assert_close(module(x, list(size)), other(x, list(size)), atol=1e-6, rtol=1e-6)


def _fresh(module: AgentAttention, x: torch.Tensor, size: list[int]) -> torch.Tensor:
    """The module's output with the biases rebuilt from the tables (autograd on: nothing is cached)."""
    with torch.enable_grad():
        return module(x, size).detach()


def test_eval_bias_cache_is_exact_at_alternating_sizes():
    module, _ = _module_with_official(1, "none")
    inputs = {(5, 6): torch.randn(2, 31, DIM), (7, 9): torch.randn(2, 64, DIM)}
    expected = {size: _fresh(module, x, list(size)) for size, x in inputs.items()}
    with torch.no_grad():
        for _ in range(2):
            for size, x in inputs.items():
                assert torch.equal(module(x, list(size)), expected[size])
    assert len(module._bias_cache) == 2
    with torch.inference_mode():
        assert torch.equal(module(inputs[(5, 6)], [5, 6]), expected[(5, 6)])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw_fused"])
def test_training_after_eval_does_not_use_stale_biases(optimizer):
    """An optimizer step between two cached evaluations must show; fused AdamW bypasses the version counter, the
    training forward before it empties the cache."""
    module, _ = _module_with_official(1, "none")
    x = torch.randn(2, 31, DIM)
    with torch.no_grad():
        before = module(x, [5, 6])
    tables = [module.an_bias, module.ha_bias, module.ca_bias]
    opt = torch.optim.SGD(tables, lr=1.0) if optimizer == "sgd" else torch.optim.AdamW(tables, lr=0.1, fused=True)
    module.train()(x, [5, 6]).square().sum().backward()
    opt.step()
    module.eval()
    with torch.no_grad():
        after = module(x, [5, 6])
    assert not torch.allclose(after, before)
    assert torch.equal(after, _fresh(module, x, [5, 6]))


def test_in_place_table_updates_and_device_moves_invalidate_the_cache():
    module, _ = _module_with_official(0, "none")
    x = torch.randn(1, 30, DIM)
    with torch.no_grad():
        before = module(x, [5, 6])
        module.na_bias.add_(0.5)  # bumps the version counter
        changed = module(x, [5, 6])
    assert not torch.allclose(changed, before)
    assert torch.equal(changed, _fresh(module, x, [5, 6]))
    with torch.no_grad():
        module(x, [5, 6])
        module.double()
        assert module(x.double(), [5, 6]).dtype == torch.float64 and len(module._bias_cache) == 1
        module.wa_bias.data.add_(0.5)  # .data bypasses the counter: documented, cleared by hand
        module.clear_bias_cache()
        torch.testing.assert_close(module(x.double(), [5, 6]), _fresh(module, x.double(), [5, 6]))


def test_gradients_reach_every_table():
    module = AgentAttention(DIM, HEADS, agent_num=4, grid_size=4, num_prefix_tokens=1, gate="headwise")
    x = torch.randn(2, 1 + 5 * 7, DIM)
    with torch.no_grad():
        module(x, [5, 7])  # a cached inference pass first must not cut the graph of the next one
    module(x, [5, 7]).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_resize_agent_bias_changes_agent_count_and_grid():
    table = torch.full((2, 49, 14, 1), 0.3)
    resized = resize_agent_bias(table, (2, 81, 18, 1))
    torch.testing.assert_close(resized, torch.full((2, 81, 18, 1), 0.3))  # bilinear keeps constants
    ramp = torch.arange(49.0).view(1, 49, 1).expand(2, 49, 1)  # agent index grows along rows of the 7x7 grid
    coarse = resize_agent_bias(ramp, (2, 9, 1)).view(2, 3, 3)
    assert torch.all(coarse[:, 1:, :] > coarse[:, :-1, :]) and torch.all(coarse[:, :, 1:] > coarse[:, :, :-1])
    with pytest.raises(ValueError, match="heads"):
        resize_agent_bias(table, (3, 49, 14, 1))
    with pytest.raises(ValueError, match="perfect squares"):
        resize_agent_bias(table, (2, 50, 14, 1))


def test_convert_passes_this_layout_through():
    module = AgentAttention(DIM, HEADS, agent_num=4, grid_size=3, num_prefix_tokens=1)
    state = module.state_dict()
    converted = convert_agent_biases(state, state)
    assert all(converted[k] is state[k] for k in state)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="agent_num"):
        AgentAttention(DIM, HEADS, agent_num=10)
    with pytest.raises(ValueError, match="num_heads"):
        AgentAttention(DIM, 3)
    with pytest.raises(ValueError, match="grid_size"):
        AgentAttention(DIM, HEADS, grid_size=(0, 4))
    with pytest.raises(ValueError, match="gate"):
        AgentAttention(DIM, HEADS, gate="sigmoid")
    module = AgentAttention(DIM, HEADS, agent_num=4, num_prefix_tokens=1)
    with pytest.raises(ValueError, match="feat_size"):
        module(torch.randn(1, 1 + 12, DIM))  # 12 patches: not square, no feat_size
    with pytest.raises(ValueError, match="feat_size"):
        module(torch.randn(1, 1 + 12, DIM), [3, 5])
    with pytest.raises(ValueError, match="prefix"):
        module(torch.randn(1, 3, 4, DIM))


def test_registered_as_agent_mixer():
    mixer = create_mixer("agent", 32, num_heads=4, agent_num=16, grid_size=(8, 8))
    assert isinstance(mixer, AgentAttention) and mixer.pool_size == 4
    assert mixer(torch.randn(1, 5, 11, 32)).shape == (1, 5, 11, 32)
