"""Token reduction (ToMe, PPT, Token Pooling through one API): keep-everything exactness, the reducing block against
each block's own forward, schedules, protected tokens, the per-image PPT policy, attention scores against an explicit
softmax, K-medoids against brute force, full-size intermediates, gradients, torch.compile, bad arguments and the
registered models."""

import pytest
import timm
import torch
from test_token_merging import VARIANTS, _tiny_vit

import attnzoo
from attnzoo.layers import (
    BlockAttention,
    PPTReducer,
    TokenPoolingReducer,
    ToMeReducer,
    proportional_attention_mask,
    prune_by_importance,
    restore_tokens,
    weighted_kmedoids,
)
from attnzoo.layers import ppt as ppt_module
from attnzoo.layers.reduction_patch import _reducing_block

KEEP_ALL = {"tome": {"r": 0}, "ppt": {"r": 0}, "token_pooling": {"keep_ratio": 1.0}}
REDUCE = {
    "tome": {"r": 4},
    "ppt": {"r": 6, "locations": [0, 2]},
    "token_pooling": {"keep_ratio": 0.5, "locations": [0, 1]},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_keep_everything_is_exact_and_reducing_block_honours_every_module(variant):
    """Keep-everything settings and removal are bit-exact; every method's reducing block, removing nothing, equals
    the block's own forward up to token order (LayerScale, qk_norm, gates, register / distillation tokens)."""
    name, kwargs = VARIANTS[variant]
    model = _tiny_vit(name, **kwargs)
    if variant == "timm_gated":
        for block in model.blocks:
            block.attn.gate = torch.nn.Linear(48, 48)
    x = torch.randn(2, 3, 32, 32)
    npt, has_class_token = model.num_prefix_tokens, model.cls_token is not None
    with torch.no_grad():
        expected = model(x)
        for method in KEEP_ALL:
            assert torch.equal(attnzoo.apply_token_reduction(model, method, **KEEP_ALL[method])(x), expected), method
            reduced = attnzoo.apply_token_reduction(model, method, **REDUCE[method])(x)
            assert reduced.shape == expected.shape and not torch.allclose(reduced, expected), method
        assert torch.equal(attnzoo.remove_token_reduction(model)(x), expected)
        assert type(model) is type(_tiny_vit(name, **kwargs)) and not hasattr(model, "token_reducer")

        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        token_map = torch.arange(tokens.shape[1]).expand(2, -1)
        reducers = [ToMeReducer(1, 0), PPTReducer(1, 0, [0]), TokenPoolingReducer(1, 1.0, locations=[0])]
        for block in model.blocks:
            for reducer in reducers:
                args = (block, reducer, 0, tokens, None, token_map, None, True, npt, has_class_token)
                out, size, out_map, _ = _reducing_block(*args)
                assert out.shape == tokens.shape and torch.equal(size, torch.ones_like(size))
                torch.testing.assert_close(restore_tokens(out, out_map), block(tokens), rtol=1e-5, atol=1e-5)
            tokens = block(tokens)


def _token_counts(model, x):
    """Tokens entering each block's attention and each block's MLP, and leaving the last block."""
    attn, mlp = [], []
    hooks = [b.norm1.register_forward_hook(lambda m, i, o: attn.append(o.shape[1])) for b in model.blocks]
    hooks += [b.norm2.register_forward_hook(lambda m, i, o: mlp.append(o.shape[1])) for b in model.blocks]
    with torch.no_grad():
        out = model.forward_features(x).shape[1]
    for h in hooks:
        h.remove()
    return attn, mlp, out


def test_tokens_per_block_follow_the_schedule():
    model = _tiny_vit("vit_tiny_patch16_224", img_size=64, depth=4)  # 64 patches + class token
    x = torch.randn(1, 3, 64, 64)
    attnzoo.apply_token_reduction(model, "ppt", r=[5, 40], locations=[1, 3])  # between attention and MLP
    assert _token_counts(model, x) == ([65, 65, 60, 60], [65, 60, 60, 31], 31)  # 40 clamped to 59 // 2
    attnzoo.apply_token_reduction(model, "ppt")  # default locations scale 3, 6, 9 of 12 to 1, 2, 3 of 4
    assert model.token_reducer.r == [0, 50, 50, 50]
    attnzoo.apply_token_reduction(model, "token_pooling", keep_ratio=0.5, locations=[0, 2])  # after the MLP
    assert _token_counts(model, x) == ([65, 33, 33, 17], [65, 33, 33, 17], 17)
    attnzoo.apply_token_reduction(model, "token_pooling", num_clusters=[40, 10], locations=[0, 2])
    assert _token_counts(model, x)[0] == [65, 41, 41, 11]
    attnzoo.apply_token_reduction(model, "token_pooling", num_clusters=[70], locations=[1])
    with pytest.raises(ValueError, match="num_clusters 70 at block 1 is more than the 64 patch tokens"):
        model(x)


@pytest.mark.parametrize("variant", ["registers", "deit_distilled"])
def test_protected_tokens_are_never_pruned_or_pooled(variant):
    name, kwargs = VARIANTS[variant]
    model = _tiny_vit(name, img_size=48, **kwargs)  # 36 patches
    npt = model.num_prefix_tokens
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        for method, args in [("ppt", {"r": 8, "threshold": 0.0}), ("token_pooling", {"keep_ratio": 0.3})]:
            attnzoo.apply_token_reduction(model, method, locations=[0, 1], **args)
            tokens, size, token_map, pruned = model.forward_reduced(x)
            assert torch.equal(token_map[:, :npt], torch.arange(npt).expand(3, -1)) and torch.all(size[:, :npt] == 1)
            if method == "ppt":  # threshold 0: every image pruned 16 patch tokens, none of the prefix
                assert torch.equal((token_map < 0).sum(1), torch.full((3,), 16)) and pruned is not None
    # the prefix is protected even when it is the least important
    importance = torch.arange(10.0).expand(2, -1)
    kept = prune_by_importance(torch.randn(2, 10, 4), None, importance, 3, num_prefix=2)
    assert torch.equal(kept.assign[0], torch.tensor([0, 1, -1, -1, -1, 2, 3, 4, 5, 6]))


def test_ppt_chooses_pruning_or_pooling_per_image(monkeypatch):
    """Var(importance) > threshold prunes, otherwise pools, image by image within one batch."""
    model = _tiny_vit("vit_tiny_patch16_224", img_size=48)  # reduce in block 1 of 3: block 2 sees the difference
    x = torch.randn(4, 3, 48, 48)
    variances = []
    policy = ppt_module.ppt_policy

    def recording(importance, num_prefix, threshold):
        variances.append(importance[:, num_prefix:].var(dim=-1, correction=0))
        return policy(importance, num_prefix, threshold)

    monkeypatch.setattr(ppt_module, "ppt_policy", recording)
    with torch.no_grad():
        attnzoo.apply_token_reduction(model, "ppt", r=10, locations=[1], threshold=0.0)
        pruned = model(x)
        attnzoo.apply_token_reduction(model, "ppt", r=10, locations=[1], threshold=float("inf"))
        pooled = model(x)
        threshold = variances[0].median().item()
        attnzoo.apply_token_reduction(model, "ppt", r=10, locations=[1], threshold=threshold)
        mixed = model(x)
        chosen = model.forward_reduced(x).token_map.lt(0).any(dim=1)
    prune = variances[0] > threshold
    assert 0 < int(prune.sum()) < 4 and torch.equal(chosen, prune)
    torch.testing.assert_close(mixed, torch.where(prune[:, None], pruned, pooled))
    assert not torch.allclose(pruned, pooled)


def test_attention_scores_are_the_blocks_softmax_with_proportional_attention():
    torch.manual_seed(0)
    model = _tiny_vit("vit_tiny_patch16_224", qk_norm=True)
    attn, x = model.blocks[0].attn, torch.randn(2, 9, 48)
    size = torch.randint(1, 5, (2, 9, 1)).float()
    mask = proportional_attention_mask(size, x.dtype)
    out, keys = attnzoo.layers.Attention._attend(attn, x, mask)
    scores = BlockAttention(attn, x, keys, mask, size, num_prefix=1, has_class_token=True)
    q, _, v = attn.qkv(x).view(2, 9, 3, 3, 16).permute(2, 0, 3, 1, 4).unbind(0)
    probs = (attn.q_norm(q) @ keys.transpose(-2, -1) / 4.0 + size.log().view(2, 1, 1, 9)).softmax(-1)
    torch.testing.assert_close((probs @ v).transpose(1, 2).reshape(2, 9, 48), out)  # the probabilities SDPA used
    torch.testing.assert_close(scores.class_attention(), probs[:, :, 0].mean(1))
    received = (probs.mean(1) * size).sum(1) / size.sum(1)
    torch.testing.assert_close(scores.attention_received(), received)
    torch.testing.assert_close(scores.importance(), scores.class_attention())
    no_class = BlockAttention(attn, x, keys, mask, size, num_prefix=0, has_class_token=False)
    torch.testing.assert_close(no_class.importance(), received)


def test_weighted_kmedoids_matches_brute_force_and_lowers_the_error():
    torch.manual_seed(0)
    x, weight = torch.randn(3, 20, 5), torch.rand(3, 20)
    distance = torch.cdist(x, x).square()

    def error(medoids):
        return (weight * distance.gather(2, medoids.unsqueeze(1).expand(-1, 20, -1)).amin(-1)).sum(-1)

    init, _ = weighted_kmedoids(x, weight, 6, iterations=0)
    assert torch.equal(init, weight.topk(6).indices.sort().values)  # the most significant tokens
    one, assign = weighted_kmedoids(x, weight, 6, iterations=1)
    for b in range(3):  # one update: each initial cluster's member with the least weighted distance to its cluster
        nearest = distance[b][:, init[b]].argmin(-1)
        nearest[init[b]] = torch.arange(6)
        expected = []
        for k in range(6):
            members = (nearest == k).nonzero().flatten()
            cost = (weight[b, members, None] * distance[b][members][:, members]).sum(0)
            expected.append(int(members[cost.argmin()]))
        assert one[b].tolist() == sorted(expected)
        assert torch.equal(assign[b], distance[b][:, one[b]].argmin(-1))
    many, _ = weighted_kmedoids(x, weight, 6, iterations=5)
    assert torch.all(error(many) <= error(one) + 1e-5) and torch.all(error(one) <= error(init) + 1e-5)


@pytest.mark.parametrize("method", ["ppt", "token_pooling"])
def test_intermediates_are_full_size_and_consistent(method):
    model = _tiny_vit("deit3_small_patch16_224", img_size=48, init_values=0.5)  # 36 patches
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        _, plain = model.forward_intermediates(x)
        args = {"r": 8, "threshold": 0.0} if method == "ppt" else {"keep_ratio": 0.4}
        attnzoo.apply_token_reduction(model, method, locations=[1, 2], **args)
        final, maps = model.forward_intermediates(x, norm=True)
        tokens, size, token_map, pruned = model.forward_reduced(x)
    assert [tuple(m.shape) for m in maps] == [(2, 48, 6, 6)] * 3
    torch.testing.assert_close(final, tokens)
    _, plain_normed = attnzoo.remove_token_reduction(model).forward_intermediates(x, norm=True)
    torch.testing.assert_close(maps[0], plain_normed[0])  # before the first reduction: the plain model's map
    full = restore_tokens(tokens, token_map, pruned)[:, 1:]
    torch.testing.assert_close(maps[-1], full.transpose(1, 2).reshape(2, 48, 6, 6))
    assert torch.equal(size.sum(1), torch.full((2, 1), 37.0)) == (method == "token_pooling")  # pruning drops mass


@pytest.mark.parametrize("method", ["ppt", "token_pooling"])
def test_gradients_flow_with_and_without_checkpointing(method):
    model = _tiny_vit("vit_tiny_patch16_224", depth=2).train()
    attnzoo.apply_token_reduction(model, method, locations=[0], **({"r": 5} if method == "ppt" else {}))
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(g.abs().sum() > 0 and torch.isfinite(g).all() for g in grads[0])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1)


@pytest.mark.parametrize("method", ["ppt", "token_pooling"])
def test_torch_compile_fullgraph_matches_eager(method):
    import torch._dynamo

    model = _tiny_vit("vit_tiny_patch16_224", qk_norm=True, reg_tokens=2, depth=2)
    args = {"r": 4, "threshold": 1e-3} if method == "ppt" else {"keep_ratio": 0.5, "iterations": 2}
    attnzoo.apply_token_reduction(model, method, locations=[0], **args)
    x = torch.randn(3, 3, 32, 32)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            expected = model(x)
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
            torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()


def test_bad_arguments_raise_clear_errors():
    model = _tiny_vit("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="method must be one of"):
        attnzoo.apply_token_reduction(model, "evit")
    assert type(model) is timm.models.VisionTransformer  # a rejected call leaves the model unpatched
    for ratio in (0.0, 1.5, -0.2, [0.5, 2.0, 0.5]):
        with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
            attnzoo.apply_token_reduction(model, "token_pooling", keep_ratio=ratio)
    with pytest.raises(ValueError, match="keep_ratio or num_clusters"):
        attnzoo.apply_token_reduction(model, "token_pooling", keep_ratio=0.5, num_clusters=[3, 3, 3])
    with pytest.raises(ValueError, match="number of clusters"):
        weighted_kmedoids(torch.randn(1, 4, 2), torch.rand(1, 4), 5, 1)
    with pytest.raises(ValueError, match="locations must be distinct block indices in \\[0, 2\\]"):
        attnzoo.apply_token_reduction(model, "ppt", locations=[1, 3])
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        attnzoo.apply_token_reduction(model, "ppt", threshold=-1.0)
    with pytest.raises(ValueError, match="r must be >= 0"):
        attnzoo.apply_token_reduction(model, "ppt", r=-2)
    with pytest.raises(ValueError, match="center must be one of"):
        attnzoo.apply_token_reduction(model, "token_pooling", center="median")
    with pytest.raises(TypeError, match="method 'ppt' takes .* got unknown \\['keep_ratio'\\]"):
        attnzoo.apply_token_reduction(model, "ppt", keep_ratio=0.5)
    with pytest.raises(TypeError, match="VisionTransformer"):
        attnzoo.apply_token_reduction(torch.nn.Linear(2, 2), "ppt")
    attnzoo.apply_token_reduction(model, "ppt", r=2)
    with pytest.raises(ValueError, match="attn_mask"):
        model.forward_features(torch.randn(1, 3, 32, 32), is_causal=True)


@torch.no_grad()
@pytest.mark.parametrize("method", sorted(REDUCE))
def test_a_nan_or_inf_image_damages_only_itself(method, one_thread):
    model = _tiny_vit("vit_tiny_patch16_224")
    attnzoo.apply_token_reduction(model, method, **REDUCE[method])
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    clean = model(images)
    images[1, :, 3, 5] = float("nan")
    images[2, 0, 10, 10] = float("inf")
    logits = model(images)
    assert torch.isfinite(logits).all(dim=1).tolist() == [True, False, False, True]
    torch.testing.assert_close(logits[[0, 3]], clean[[0, 3]], rtol=1e-5, atol=1e-5)


def test_reduction_amounts_of_the_wrong_type_name_the_argument(one_thread):
    model = _tiny_vit("vit_tiny_patch16_224")
    with pytest.raises(TypeError, match=r"r must be an int \(tokens removed at each of the 3 locations\) or a list "
                                        r"of 3 ints, got 2\.5"):  # fmt: skip
        attnzoo.apply_token_reduction(model, "ppt", r=2.5, locations=[0, 1, 2])
    with pytest.raises(TypeError, match=r"keep_ratio must be a float in \(0, 1\] or a list of 3 .*got '0\.5'"):
        attnzoo.apply_token_reduction(model, "token_pooling", keep_ratio="0.5", locations=[0, 1, 2])
    pooled = timm.create_model("tokenpool_deit_small_patch16_224", embed_dim=48, num_heads=3, num_clusters=[50, 20, 9])
    assert pooled.token_reducer.keep == [50, 20, 9]  # explicit counts replace the registered model's default ratio


@pytest.mark.parametrize(
    "name, keep_all, tokens",
    [("ppt_deit_small_patch16_224", {"r": 0}, 49), ("tokenpool_deit_small_patch16_224", {"keep_ratio": 1.0}, 44)],
)
def test_registered_models_reuse_deit_weights(name, keep_all, tokens):
    reduced = timm.create_model(name, embed_dim=48, num_heads=3, **keep_all).eval()
    deit = timm.create_model("deit_small_patch16_224", embed_dim=48, num_heads=3, dynamic_img_size=True).eval()
    deit.load_state_dict(reduced.state_dict())
    assert (
        reduced.pretrained_cfg["hf_hub_id"] == deit.pretrained_cfg["hf_hub_id"] == "timm/deit_small_patch16_224.fb_in1k"
    )
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        assert torch.equal(reduced(x), deit(x))
    with torch.device("meta"):  # the default schedules at 224: 197 -> 49 (PPT) and 197 -> 44 (Token Pooling)
        model = timm.create_model(name, device="meta")
        assert model.forward_features(torch.randn(2, 3, 224, 224)).shape == (2, tokens, 384)
