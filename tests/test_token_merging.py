"""Token merging (ToMe): matching and merging against a brute-force reference, proportional attention, schedules,
exactness at r=0 on timm / attnzoo ViT variants, token counts, unmerging, torch.compile and the registered models."""

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models._features import FeatureGetterNet
from timm.models.vision_transformer import ResPostBlock

import attnzoo
from attnzoo.layers import (
    ToMeReducer,
    bipartite_soft_matching,
    merge_schedule,
    merge_token_map,
    merge_tokens,
    proportional_attention_mask,
    token_map_to_source,
    unmerge_tokens,
)
from attnzoo.layers.reduction_patch import _reducing_block

# tiny ViTs: 32x32 input, 8x8 patches -> 16 patch tokens; each entry is (model name, kwargs)
VARIANTS = {
    "vit": ("vit_tiny_patch16_224", {}),
    "deit3_layerscale": ("deit3_small_patch16_224", {"init_values": 0.5}),
    "qk_norm": ("vit_tiny_patch16_224", {"qk_norm": True}),
    "registers": ("vit_tiny_patch16_224", {"reg_tokens": 4}),
    "no_class_token": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "timm_gated": ("vit_tiny_patch16_224", {}),  # gets timm Attention's elementwise gate below
    "attnzoo_gated_vit": ("gated_vit_tiny_patch16_224", {"gate": "headwise"}),
}


def _tiny_vit(name, **kwargs):
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=48, num_heads=3, depth=3)
    model = timm.create_model(name, **{**args, **kwargs}).eval()
    with torch.no_grad():  # non-trivial LayerScale / norm / gate values, so a skipped module changes the output
        for name, p in model.named_parameters():
            if "ls" in name or "norm" in name or "gate" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _brute_force_merge(metric, x, size, r, num_prefix):
    """One image: ToMe's matching and size-weighted merge written out with Python loops."""
    patches = list(range(num_prefix, metric.shape[0]))
    set_a, set_b = patches[0::2], patches[1::2]
    normed = F.normalize(metric, dim=-1)
    best = {a: max(set_b, key=lambda b: float(normed[a] @ normed[b])) for a in set_a}
    score = {a: float(normed[a] @ normed[best[a]]) for a in set_a}
    merged = sorted(set_a, key=lambda a: -score[a])[:r]
    groups = {b: [b] + [a for a in merged if best[a] == b] for b in set_b}
    out = [x[i] for i in range(num_prefix)] + [x[a] for a in set_a if a not in merged]
    out_size = [size[i] for i in range(num_prefix)] + [size[a] for a in set_a if a not in merged]
    for b in set_b:
        s = sum(size[i] for i in groups[b])
        out.append(sum(x[i] * size[i] for i in groups[b]) / s)
        out_size.append(s)
    owner = {}  # original token -> output index
    for i in range(num_prefix):
        owner[i] = i
    kept = [a for a in set_a if a not in merged]
    for j, a in enumerate(kept):
        owner[a] = num_prefix + j
    for j, b in enumerate(set_b):
        for i in groups[b]:
            owner[i] = num_prefix + len(kept) + j
    return torch.stack(out), torch.stack(out_size), torch.tensor([owner[i] for i in range(metric.shape[0])])


@pytest.mark.parametrize("num_tokens, num_prefix, r", [(11, 1, 3), (12, 2, 5), (9, 0, 4), (7, 1, 10)])
def test_merge_matches_brute_force(num_tokens, num_prefix, r):
    torch.manual_seed(0)
    B, C = 3, 6
    metric, x = torch.randn(B, num_tokens, 5), torch.randn(B, num_tokens, C)
    size = torch.randint(1, 4, (B, num_tokens, 1)).float()
    plan = bipartite_soft_matching(metric, r, num_prefix)
    merged, merged_size = merge_tokens(x, plan, size)
    token_map = merge_token_map(torch.arange(num_tokens).expand(B, -1), plan, num_tokens)
    r_eff = min(r, (num_tokens - num_prefix) // 2)
    assert merged.shape == (B, num_tokens - r_eff, C)
    for i in range(B):
        ref_x, ref_size, ref_owner = _brute_force_merge(metric[i], x[i], size[i], r_eff, num_prefix)
        torch.testing.assert_close(merged[i], ref_x)
        torch.testing.assert_close(merged_size[i], ref_size)
        assert torch.equal(token_map[i], ref_owner)
    # the source matrix: each original token sits in exactly one token; a token's row count is its size
    source = token_map_to_source(token_map, merged.shape[1])
    assert torch.equal(source.sum(1), torch.ones(B, num_tokens, dtype=source.dtype))
    torch.testing.assert_close(unmerge_tokens(merged, token_map)[:, :num_prefix], x[:, :num_prefix])


def test_matching_ignores_prefix_and_rejects_bad_args():
    metric = torch.randn(1, 9, 4)
    metric[:, 0] = metric[:, 1]  # the class token is identical to a patch token, it must still not merge
    plan = bipartite_soft_matching(metric, 4, num_prefix=1)
    x = torch.randn(1, 9, 3)
    torch.testing.assert_close(merge_tokens(x, plan)[0][:, 0], x[:, 0])
    with pytest.raises(ValueError, match="r must be"):
        bipartite_soft_matching(metric, -1)
    with pytest.raises(ValueError, match="num_prefix"):
        bipartite_soft_matching(metric, 1, num_prefix=10)


def test_proportional_attention_equals_repeated_keys():
    """softmax(q k^T / sqrt(d) + log s) over merged keys == plain attention over keys repeated s times."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    size = torch.tensor([1.0, 3.0, 1.0, 2.0, 5.0, 1.0]).view(1, 6, 1)
    merged = F.scaled_dot_product_attention(q, k, v, attn_mask=proportional_attention_mask(size, q.dtype))
    repeats = size.flatten().long()
    expanded = F.scaled_dot_product_attention(q, k.repeat_interleave(repeats, 2), v.repeat_interleave(repeats, 2))
    torch.testing.assert_close(merged, expanded)


def test_merge_schedule():
    assert merge_schedule(8, 3) == [8, 8, 8]
    assert merge_schedule([1, 0, 5], 3) == [1, 0, 5]
    assert merge_schedule((8, 0.0), 4) == [8] * 4
    rising, falling = merge_schedule((8, 1.0), 5), merge_schedule((8, -0.5), 5)
    assert rising == [0, 4, 8, 12, 16] and falling == [12, 10, 8, 6, 4]
    assert sum(merge_schedule((13, 0.3), 12)) == pytest.approx(13 * 12, abs=6)
    with pytest.raises(ValueError, match="one entry per block"):
        merge_schedule([1, 2], 3)
    with pytest.raises(ValueError, match=">= 0"):
        merge_schedule(-1, 3)
    with pytest.raises(ValueError, match="inflection"):
        merge_schedule((8, 2.0), 3)
    with pytest.raises(TypeError, match="r must be"):
        merge_schedule("8", 3)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_r0_is_exact_and_merging_block_honours_every_module(variant):
    """r=0 (patched) and remove_token_merging are bit-exact; the merging block computation, run with r=0, equals the
    block's own forward up to token order (LayerScale, qk_norm, gates, register / distillation tokens)."""
    name, kwargs = VARIANTS[variant]
    model = _tiny_vit(name, **kwargs)
    if variant == "timm_gated":
        for block in model.blocks:
            block.attn.gate = torch.nn.Linear(48, 48)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(attnzoo.apply_token_merging(model, r=0)(x), expected)
        merged = attnzoo.apply_token_merging(model, r=4)(x)
        assert merged.shape == expected.shape and not torch.allclose(merged, expected)
        assert torch.equal(attnzoo.remove_token_merging(model)(x), expected)
        assert not hasattr(model, "token_reducer")

        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        npt = model.num_prefix_tokens
        token_map = torch.arange(tokens.shape[1]).expand(2, -1)
        for block in model.blocks:
            args = (block, ToMeReducer(1, 0), 0, tokens, None, token_map, None, True, npt, model.cls_token is not None)
            out, size, out_map, _ = _reducing_block(*args)
            assert out.shape == tokens.shape and torch.equal(size, torch.ones_like(size))
            torch.testing.assert_close(unmerge_tokens(out, out_map), block(tokens), rtol=1e-5, atol=1e-5)
            tokens = block(tokens)


def _token_counts(model, x):
    """Tokens entering each block's MLP (after that block's merge)."""
    counts = []
    hooks = [b.norm2.register_forward_hook(lambda m, i, o: counts.append(o.shape[1])) for b in model.blocks]
    with torch.no_grad():
        out = model.forward_features(x)
    for h in hooks:
        h.remove()
    return counts, out


def test_token_count_follows_schedule():
    model = _tiny_vit("vit_tiny_patch16_224", img_size=64, depth=4)  # 64 patches + class token
    x = torch.randn(1, 3, 64, 64)
    attnzoo.apply_token_merging(model, r=[5, 0, 20, 3])
    counts, out = _token_counts(model, x)
    assert counts == [60, 60, 40, 37] and out.shape[1] == 37  # 20 = min(20, 59 // 2)
    attnzoo.apply_token_merging(model, r=(10, -1.0))  # falling schedule 20, 13, 7, 0
    assert model.token_reducer.r == [20, 13, 7, 0]
    counts, _ = _token_counts(model, x)
    assert counts == [45, 32, 25, 25]
    attnzoo.apply_token_merging(model, r=40)  # clamped to half of the patch tokens in every block
    counts, _ = _token_counts(model, x)
    assert counts == [33, 17, 9, 5]


@pytest.mark.parametrize("prop_attn", [True, False])
def test_unmerge_restores_the_map(prop_attn):
    model = _tiny_vit("deit3_small_patch16_224", img_size=48, init_values=0.5)  # 36 patches
    attnzoo.apply_token_merging(model, r=6, prop_attn=prop_attn, trace_source=True)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        features = model.forward_features(x)
        tokens, size, token_map, pruned = model.forward_reduced(x)
        final, maps = model.forward_intermediates(x, norm=True)
        nlc = model.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(tokens, features)
    torch.testing.assert_close(final, features)
    assert features.shape[1] == 1 + 36 - 18 and torch.equal(model.reduced_token_map, token_map) and pruned is None
    assert torch.equal(size.sum(1), torch.full((2, 1), 37.0)) and torch.equal(model.reduced_size, size)
    assert [tuple(m.shape) for m in maps] == [(2, 48, 6, 6)] * 3
    assert nlc[0].shape == (2, 36, 48)
    full = unmerge_tokens(tokens, token_map)[:, 1:]  # (B, 36, C): every patch gets its merged token's value
    torch.testing.assert_close(maps[-1], full.transpose(1, 2).reshape(2, 48, 6, 6))
    with torch.no_grad():
        getter = FeatureGetterNet(model, out_indices=(0, 2))
        assert [tuple(f.shape) for f in getter(x)] == [(2, 48, 6, 6)] * 2


def test_torch_compile_fullgraph_matches_eager():
    import torch._dynamo

    model = attnzoo.apply_token_merging(_tiny_vit("vit_tiny_patch16_224", qk_norm=True), r=(4, 0.5))
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            expected = model(x)
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
            torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()


def test_training_with_merging_and_checkpointing_gives_same_grads():
    model = attnzoo.apply_token_merging(_tiny_vit("vit_tiny_patch16_224", depth=2), r=5).train()
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1)


def test_unsupported_models_and_masks_raise():
    with pytest.raises(TypeError, match="VisionTransformer"):
        attnzoo.apply_token_merging(torch.nn.Linear(2, 2))
    respost = _tiny_vit("vit_tiny_patch16_224", block_fn=ResPostBlock)
    with pytest.raises(TypeError, match="ResPostBlock"):
        attnzoo.apply_token_merging(respost)
    model = attnzoo.apply_token_merging(_tiny_vit("vit_tiny_patch16_224"), r=2)
    with pytest.raises(ValueError, match="attn_mask"):
        model.forward_features(torch.randn(1, 3, 32, 32), is_causal=True)


def test_registered_variants_reuse_timm_weights():
    tome = timm.create_model("tome_deit_tiny_patch16_224", r=0).eval()
    deit = timm.create_model("deit_tiny_patch16_224", dynamic_img_size=True).eval()
    deit.load_state_dict(tome.state_dict())
    assert tome.pretrained_cfg["hf_hub_id"] == deit.pretrained_cfg["hf_hub_id"] == "timm/deit_tiny_patch16_224.fb_in1k"
    assert "arXiv:2210.09461" in tome.pretrained_cfg["paper_ids"]
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        assert torch.equal(tome(x), deit(x))
    with torch.device("meta"):  # the paper's token count: DeiT-S at 224 keeps 197 - 12 * 13 = 41 tokens
        small = timm.create_model("tome_deit_small_patch16_224", device="meta")
        assert small.forward_features(torch.randn(2, 3, 224, 224)).shape == (2, 41, 384)
    assert small.token_reducer.r == [13] * 12
