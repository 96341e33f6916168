"""Frozen-backbone probing: efficient probing (EP) against the paper's formulation, the probe heads, a frozen backbone
through a training run, the feature cache, the export and the errors."""

import math

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F

import attnzoo  # noqa: F401
from attnzoo.layers import EfficientProbing
from attnzoo.recipes.data import ImageDataModule
from attnzoo.recipes.export import export_for_timm
from attnzoo.recipes.module import ImageClassifier
from attnzoo.recipes.probe import PROBES, FeatureDataset, ProbedModel, cache_features, load_probed_model


def _paper_ep(pool: EfficientProbing, tokens: torch.Tensor) -> torch.Tensor:
    """EP written from the paper, query by query: ``a_m = softmax(q_m X^T / sqrt(D))`` over the tokens, values
    ``V = X W_v`` split into one channel group per query, ``o_m = a_m V_m``, output ``[o_1, ..., o_M]``."""
    B, N, D = tokens.shape
    M = pool.num_queries
    width = pool.out_dim // M
    values = F.linear(tokens, pool.v.weight, pool.v.bias)
    outputs = []
    for m in range(M):
        a = torch.softmax(tokens @ pool.queries[m] / math.sqrt(D), dim=-1)  # (B, N)
        outputs.append(torch.einsum("bn,bnc->bc", a, values[..., m * width : (m + 1) * width]))
    return torch.cat(outputs, dim=-1)


@pytest.mark.parametrize("d_out,input_fmt,value_bias", [(1, "NLC", False), (2, "NHWC", True), (1, "NCHW", False)])
def test_ep_matches_the_paper(d_out, input_fmt, value_bias):
    torch.manual_seed(0)
    pool = EfficientProbing(32, num_queries=4, d_out=d_out, value_bias=value_bias, input_fmt=input_fmt)
    tokens = torch.randn(3, 20, 32)
    x = {"NLC": tokens, "NHWC": tokens.view(3, 4, 5, 32), "NCHW": tokens.view(3, 4, 5, 32).permute(0, 3, 1, 2)}
    out = pool(x[input_fmt])
    assert out.shape == (3, 32 // d_out)
    torch.testing.assert_close(out, _paper_ep(pool, tokens))
    assert pool.attention(tokens).shape == (3, 4, 20)


def test_ep_parameters_of_the_papers_default_setting():
    """32 queries, d_out 1, no bias: M D + D^2 on a ViT-B (614,400); with the classifier on 1,000 classes the probe
    trains 1,383,400 parameters, the count the official MAE ViT-B/16 EP log reports."""
    assert sum(p.numel() for p in EfficientProbing(768, device="meta").parameters()) == 32 * 768 + 768 * 768
    backbone = timm.create_model("vit_base_patch16_224", device="meta")
    probe = ProbedModel(backbone, "ep", num_classes=1000)
    trainable = {n: p.numel() for n, p in probe.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == 1_383_400 and all(n.startswith("head.") for n in trainable)
    assert sum(p.numel() for p in probe.backbone.parameters()) == 85_798_656  # ViT-B/16 without its classifier


def test_ep_rejects_settings_that_do_not_split_the_channels():
    with pytest.raises(ValueError, match="divisible by num_queries"):
        EfficientProbing(96, num_queries=5)
    with pytest.raises(ValueError, match="num_queries and d_out must be >= 1"):
        EfficientProbing(96, d_out=0)


@pytest.mark.parametrize("name", ["gated_vit_tiny_patch16_224", "nat_mini"])
def test_probes_read_patch_tokens_of_plain_and_hierarchical_models(name):
    """EP, SimPool and attentive probes read the patch tokens (class token left out, maps flattened); the linear probe
    the backbone's own pooled features; only the head has trainable parameters."""
    torch.manual_seed(0)
    small = dict(img_size=64, depth=1) if "vit" in name else dict(depths=(1, 1), num_heads=(2, 4), kernel_size=3)
    x = torch.randn(2, 3, 64, 64)
    backbone = timm.create_model(name, **small)
    for probe in PROBES:
        model = ProbedModel(backbone, probe, num_classes=5).train()
        assert not model.backbone.training and model(x).shape == (2, 5)
        with torch.no_grad():
            features = model.backbone.forward_features(x)
        if probe == "linear":
            expected = model.backbone.forward_head(features, pre_logits=True)
        else:
            expected = features[:, 1:] if features.ndim == 3 else features.flatten(1, 2)
        torch.testing.assert_close(model.extract(x), expected)
        torch.testing.assert_close(model(model.extract(x)), model(x))
        assert all(n.startswith("head.") for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["gated_vit_tiny_patch16_224", "nat_mini"])
def test_ep_classifier_of_zoo_models_round_trips_through_a_timm_export(name, tmp_path):
    """``reset_classifier(n, "ep")`` on a plain and a hierarchical zoo model: the pooled features are EP of the patch
    tokens, and the export rebuilds the same model through ``timm.create_model("local-dir:...")``."""
    torch.manual_seed(0)
    small = dict(img_size=64, depth=1) if "vit" in name else dict(depths=(1, 1), num_heads=(2, 4), kernel_size=3)
    model = timm.create_model(name, num_classes=4, **small).eval()
    model.reset_classifier(4, "ep")
    x = torch.randn(2, 3, 64, 64)
    features = model.forward_features(x)
    pool = model.attn_pool if features.ndim == 3 else model.head.global_pool
    tokens = features[:, model.num_prefix_tokens :] if features.ndim == 3 else features.flatten(1, 2)
    torch.testing.assert_close(model.forward_head(features, pre_logits=True), _paper_ep(pool, tokens))
    export_for_timm(model, tmp_path)
    reloaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    torch.testing.assert_close(reloaded(x), model(x))


def _data(**kwargs) -> ImageDataModule:
    options = dict(
        dataset="embedded/mnist_5k",
        val_split="test",
        batch_size=16,
        eval_batch_size=20,
        num_workers=0,
        augment=False,
        input_size=(3, 64, 64),
        crop_pct=1.0,
        num_train_samples=64,
        num_eval_samples=20,
    )
    return ImageDataModule(**{**options, **kwargs})


def _probe(**kwargs) -> ImageClassifier:
    torch.manual_seed(0)
    options = dict(
        model_name="test_resnet",  # a timm CNN with BatchNorm buffers
        num_classes=10,
        probe="ep",
        optimizer="sgd",  # updates linear in the gradients: the cache's rounding stays at rounding level
        lr=0.1,
        base_batch_size=None,
        warmup_epochs=0.0,
        label_smoothing=0.0,
    )
    return ImageClassifier(**{**options, **kwargs})


def _fit(module: ImageClassifier, tmp_path) -> ImageDataModule:
    data = _data()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    return data


def test_probing_freezes_the_backbone_and_the_cache_trains_the_same_head(tmp_path):
    """A probe run changes no backbone parameter or buffer (BatchNorm statistics included); training on cached
    features gives the head that training on images gives; the exported probe reloads."""
    module = _probe()
    backbone_before = {k: v.clone() for k, v in module.model.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in module.model.head.state_dict().items()}
    _fit(module, tmp_path / "images")
    backbone_after = module.model.backbone.state_dict()
    assert backbone_after.keys() == backbone_before.keys()
    assert all(torch.equal(backbone_before[k], backbone_after[k]) for k in backbone_before)
    assert not torch.equal(head_before["fc.weight"], module.model.head.fc.weight)  # the head did train

    cached = _probe(cache_features=True)
    data = _fit(cached, tmp_path / "cached")
    assert isinstance(data.datasets["train"], FeatureDataset) and data.datasets["train"].features.ndim == 3
    trained, from_cache = module.model.head.state_dict(), cached.model.head.state_dict()
    for key in trained:
        torch.testing.assert_close(from_cache[key], trained[key], atol=1e-5, rtol=1e-4)

    export_for_timm(module.model, tmp_path / "export")
    reloaded = load_probed_model(tmp_path / "export")
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), module.model.eval()(x))


def test_probe_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="model.probe must be one of"):
        _probe(probe="knn")
    with pytest.raises(ValueError, match="need model.probe"):
        _probe(probe=None, cache_features=True)
    with pytest.raises(TypeError, match=r"model.probe_kwargs \['queries'\] rejected by the 'ep' probe"):
        _probe(probe_kwargs={"queries": 8})
    with pytest.raises(ValueError, match="layer_decay"):
        _probe(layer_decay=0.75)
    model = ProbedModel(timm.create_model("test_resnet"), "linear", num_classes=10)
    data = _data(augment=True)
    data.setup("fit")
    with pytest.raises(ValueError, match="data.augment: false"):
        cache_features(model, data)
