"""Mixture-of-head attention (gate="moh"): the routing against the paper's formulas, on every per-head mixer;
sparsity, gradients, the load-balance loss, argument errors, the registered models and the recipe's loss."""

import pytest
import timm
import torch
import torch.nn.functional as F

import attnzoo  # noqa: F401
from attnzoo.layers import Attention, MoHGate, create_mixer, moh_balance_loss

MIXERS = {  # per-head mixers and small settings for a 6x6 map
    "attention": {},
    "neighborhood": {"kernel_size": 3},
    "routing": {"n_win": 2, "topk": 2},
    "window": {"window_size": 3},
    "agent": {"agent_num": 4},
}


def _paper_weights(gate: MoHGate, x: torch.Tensor) -> torch.Tensor:
    """Router weights ``(..., heads)`` written from the paper: routed heads ``softmax(x W_r)``, the top-k kept and
    renormalised to sum ``k``; shared heads ``h_s softmax(x W_s)`` (1 for a single one); both scaled by
    ``2 softmax(x W_h)``."""
    p = F.softmax(x @ gate.routed.weight.T, dim=-1)
    top = p.topk(gate.topk, dim=-1)
    routed = torch.zeros_like(p).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True) * gate.topk)
    s = gate.shared_heads
    if s == 0:
        return routed
    shared = s * F.softmax(x @ gate.shared.weight.T, dim=-1) if s > 1 else torch.ones(*x.shape[:-1], 1)
    a = 2 * F.softmax(x @ gate.split.weight.T, dim=-1)
    return torch.cat([shared * a[..., :1], routed * a[..., 1:]], dim=-1)


@pytest.mark.parametrize(
    "kind,shared", [("attention", 2), ("neighborhood", 0), ("routing", 1), ("window", 2), ("agent", 1)]
)
def test_all_heads_with_a_uniform_router_is_plain_attention(kind, shared):
    """k = every routed head and a uniform router (zero router weights, no noise): every head weighs exactly 1, so
    each per-head mixer equals its ungated self."""
    torch.manual_seed(0)
    dim, heads = 32, 4
    moh = create_mixer(kind, dim, heads, gate="moh", moh_topk=heads - shared, moh_shared_heads=shared, **MIXERS[kind])
    plain = create_mixer(kind, dim, heads, **MIXERS[kind])
    missing, unexpected = plain.load_state_dict(moh.state_dict(), strict=False)
    assert not missing and all(k.startswith("gate.") for k in unexpected)
    x = torch.randn(2, 6, 6, dim)
    with torch.no_grad():
        for layer in moh.gate.children():
            layer.weight.zero_()
        torch.testing.assert_close(moh.eval()(x), plain.eval()(x))


@pytest.mark.parametrize("shared,topk", [(0, 2), (1, 3), (2, 1), (3, 3)])
def test_router_weights_follow_the_paper_and_scale_each_head(shared, topk):
    """A trained (random) router: the weights are the paper's; attention equals the ungated attention with every
    head's output scaled by its weight (k = all routed heads included)."""
    torch.manual_seed(0)
    dim, heads = 24, 6
    moh = Attention(dim, heads, gate="moh", moh_topk=topk, moh_shared_heads=shared).eval()
    plain = Attention(dim, heads).eval()
    plain.load_state_dict(moh.state_dict(), strict=False)
    with torch.no_grad():
        for layer in moh.gate.children():
            layer.weight.normal_(std=0.5)
    x = torch.randn(2, 9, dim)
    weights = _paper_weights(moh.gate, x)
    torch.testing.assert_close(moh.gate.head_weights(x)[0], weights)
    captured = []
    plain.proj.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    plain(x)
    per_head = captured[0].unflatten(-1, (heads, dim // heads)) * weights.unsqueeze(-1)
    torch.testing.assert_close(moh(x), plain.proj(per_head.flatten(-2)))


def test_topk_activates_exactly_k_routed_heads_per_token():
    torch.manual_seed(0)
    gate = MoHGate(16, num_heads=8, head_dim=4, topk=3, shared_heads=2)
    x = torch.randn(4, 50, 16)
    weights, probs, mask = gate.head_weights(x)
    routed = weights[..., 2:]
    assert ((routed > 0).sum(-1) == 3).all() and (mask.sum(-1) == 3).all()
    assert (weights[..., :2] > 0).all()  # shared heads are always active
    assert torch.equal(routed > 0, mask.bool())  # the active heads are the top-3 by router probability
    selected_min = probs.masked_fill(~mask.bool(), 2.0).min(-1).values
    assert (selected_min >= probs.masked_fill(mask.bool(), -1.0).max(-1).values).all()
    y = torch.randn(4, 50, 32)
    out = gate(x, y).unflatten(-1, (8, 4))
    assert torch.equal(out[..., 2:, :] == 0, (~mask.bool()).unsqueeze(-1).expand(-1, -1, -1, 4))


def test_gradients_reach_every_router_and_the_balance_loss():
    """Task and balance losses both train the routers; the balance loss is h_r * sum_i f_i P_i of the last training
    forward (not updated in eval mode)."""
    torch.manual_seed(0)
    attn = Attention(32, 4, gate="moh", moh_topk=2, moh_shared_heads=2).train()
    gate = attn.gate
    x = torch.randn(2, 10, 32)
    out = attn(x)
    _, probs, mask = gate.head_weights(x)
    expected = 2 * (probs.flatten(0, 1).mean(0) * mask.flatten(0, 1).mean(0)).sum()
    torch.testing.assert_close(gate.balance_loss, expected)
    torch.testing.assert_close(moh_balance_loss(attn), expected)
    (balance_grad,) = torch.autograd.grad(gate.balance_loss, gate.routed.weight, retain_graph=True)
    assert balance_grad.abs().sum() > 0
    out.square().mean().backward()
    for name in ("routed", "shared", "split"):
        grad = getattr(gate, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    attn.eval()(torch.randn(2, 10, 32))
    assert moh_balance_loss(attn) is None
    torch.testing.assert_close(gate.balance_loss, expected)


def test_bad_moh_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"moh_topk in \[1, num_heads - moh_shared_heads\] = \[1, 4\].*got 5"):
        Attention(32, 4, gate="moh", moh_topk=5)
    with pytest.raises(ValueError, match=r"moh_topk.*\[1, 2\].*got 3"):
        create_mixer("window", 32, 4, gate="moh", moh_topk=3, moh_shared_heads=2, window_size=3)
    with pytest.raises(ValueError, match=r"moh_shared_heads must be in \[0, num_heads\).*got 4"):
        create_mixer("neighborhood", 32, 4, gate="moh", moh_topk=1, moh_shared_heads=4, kernel_size=3)
    with pytest.raises(ValueError, match="needs moh_topk"):
        create_mixer("routing", 32, 4, gate="moh", n_win=2)
    with pytest.raises(ValueError, match="only apply to gate='moh'"):
        Attention(32, 4, gate="elementwise", moh_topk=2)
    with pytest.raises(ValueError, match="moh_topk"):
        timm.create_model("moh_vit_small_patch16_224", moh_topk=5, device="meta")


@pytest.mark.parametrize(
    "size,dim,heads,topk,shared,deit_params",
    [("small", 384, 6, 2, 2, 22_050_664), ("base", 768, 12, 6, 3, 86_567_656)],
)
def test_registered_moh_vits(size, dim, heads, topk, shared, deit_params):
    """DeiT-S/B (timm's parameter counts) plus one router per block (W_r, W_s, W_h, no bias); no weight source."""
    model = timm.create_model(f"moh_vit_{size}_patch16_224", device="meta")
    assert sum(p.numel() for p in model.parameters()) == deit_params + 12 * dim * ((heads - shared) + shared + 2)
    gate = model.blocks[0].attn.gate
    assert isinstance(gate, MoHGate) and (gate.topk, gate.shared_heads) == (topk, shared)
    cfg = model.pretrained_cfg
    assert not any(cfg.get(k) for k in ("url", "hf_hub_id", "file")) and "no official weights" in cfg["notes"][0]


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_recipe_adds_the_weighted_balance_loss():
    from attnzoo.recipes import ImageClassifier

    torch.manual_seed(0)
    module = ImageClassifier(
        "moh_vit_small_patch16_224",
        model_kwargs=dict(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=4, moh_topk=2),
        num_classes=3,
        label_smoothing=0.0,
        moh_balance_weight=0.5,
    )
    x, target = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    torch.manual_seed(1)
    loss = module.training_step((x, target), 0)
    torch.manual_seed(1)
    task = F.cross_entropy(module.model(x), target)
    balance = moh_balance_loss(module.model)
    assert balance is not None and balance > 0
    torch.testing.assert_close(loss, task + 0.5 * balance)
