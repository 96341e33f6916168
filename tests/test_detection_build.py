"""build_detector: every torchvision detector on a hierarchical and a plain zoo backbone, at odd image sizes."""

import pytest
import timm
import torch
from torch import nn

from attnzoo.recipes.detection import build_detector
from attnzoo.recipes.export import export_for_timm

NAT = dict(depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 2, 4, 8))
VIT = dict(embed_dim=32, depth=2, num_heads=2)
BIFORMER = dict(depths=(1, 1, 1, 1), dims=(32, 64, 128, 256))
SMALL_RCNN = dict(
    box_batch_size_per_image=64,
    rpn_batch_size_per_image=64,
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=200,
    rpn_post_nms_top_n_test=100,
)
BACKBONES = {"nat_mini": NAT, "gated_vit_tiny_patch16_224": VIT}


def tiny_detector(arch, backbone="nat_mini", num_classes=3, **kwargs):
    torch.manual_seed(0)
    kwargs = {**BACKBONES.get(backbone, {}), **kwargs}
    return build_detector(
        arch,
        backbone,
        num_classes,
        min_size=160,
        max_size=256,
        fpn_channels=32,
        detector_kwargs=SMALL_RCNN if "rcnn" in arch else None,
        **kwargs,
    )


def odd_batch():
    """Two images of 333x517 and 517x333 (the issue's odd size, both orientations) with boxes and masks."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 333, 517, generator=generator), torch.rand(3, 517, 333, generator=generator)]
    targets = []
    for image, boxes, labels in [
        (images[0], [[10, 20, 200, 150], [50, 60, 120, 300]], [1, 2]),
        (images[1], [[30, 40, 100, 200]], [3]),
    ]:
        boxes = torch.tensor(boxes, dtype=torch.float32)
        masks = torch.zeros(len(boxes), *image.shape[1:], dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            mask[y0:y1, x0:x1] = 1
        targets.append(dict(boxes=boxes, labels=torch.tensor(labels), masks=masks))
    return images, targets


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("arch", ["faster_rcnn", "mask_rcnn", "retinanet", "fcos"])
def test_every_arch_trains_and_predicts_at_odd_sizes(arch, backbone):
    model = tiny_detector(arch, backbone)
    images, targets = odd_batch()
    model.train()
    losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for image, out in zip(images, outputs):
        n = len(out["boxes"])
        assert out["boxes"].shape == (n, 4) and out["scores"].shape == (n,) and out["labels"].shape == (n,)
        assert out["boxes"].dtype == torch.float32 and out["labels"].dtype == torch.int64
        height, width = image.shape[1:]
        assert bool((out["boxes"][:, 0::2] <= width).all() and (out["boxes"][:, 1::2] <= height).all())
        assert bool(((out["labels"] >= 1) & (out["labels"] <= 3)).all())
        if arch == "mask_rcnn":
            assert out["masks"].shape == (n, 1, height, width)
    if arch in ("faster_rcnn", "mask_rcnn", "fcos"):  # RetinaNet's prior (0.01) is below its score threshold
        assert len(outputs[0]["boxes"]) > 0


def test_pyramid_levels_and_strides():
    images = torch.rand(1, 3, 160, 224)
    rcnn = tiny_detector("faster_rcnn", "biformer_tiny", **BIFORMER).backbone
    maps = rcnn(images)
    assert list(maps) == ["0", "1", "2", "3", "pool"]
    assert [m.shape[-2:] for m in maps.values()] == [(40, 56), (20, 28), (10, 14), (5, 7), (3, 4)]
    vitdet = tiny_detector("retinanet", "tome_deit_tiny_patch16_224", r=4, **VIT).backbone
    maps = vitdet(images)
    assert list(maps) == ["0", "1", "2", "p6", "p7"]  # strides 8, 16, 32, 64, 128
    assert [m.shape[-2:] for m in maps.values()] == [(20, 28), (10, 14), (5, 7), (3, 4), (2, 2)]
    assert all(m.shape[1] == 32 for m in maps.values())


def test_frozen_stages_and_norm_eval():
    model = tiny_detector("faster_rcnn", "biformer_tiny", frozen_stages=1, norm_eval=True, **BIFORMER)
    inner = model.backbone.body.model
    trainable = {n for n, p in inner.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("downsample_layers.0.", "stages.0.")) for n in trainable)
    assert any(n.startswith("stages.1.") for n in trainable)
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())
    norms = [m for m in inner.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(p.requires_grad for m in norms for p in m.parameters())
    model.train()
    assert not any(m.training for m in norms) and model.backbone.fpn.training
    before = [m.running_mean.clone() for m in norms]
    model.backbone(torch.rand(2, 3, 64, 64))
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, norms))
    with pytest.raises(ValueError, match="frozen_stages"):
        tiny_detector("faster_rcnn", "nat_mini", frozen_stages=7)


def test_plain_vit_frozen_blocks():
    model = tiny_detector("fcos", "gated_vit_tiny_patch16_224", frozen_stages=1)
    trainable = {n for n, p in model.backbone.body.model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("patch_embed.", "blocks.0.")) or n in ("pos_embed", "cls_token") for n in trainable)
    assert any(n.startswith("blocks.1.") for n in trainable)


@pytest.mark.parametrize("form", ["folder", "lightning_ckpt"])
def test_pretrained_backbone_from_a_classification_checkpoint(tmp_path, form):
    torch.manual_seed(1)
    classifier = timm.create_model("nat_mini", num_classes=10, **NAT)
    if form == "folder":
        export_for_timm(classifier, tmp_path / "export")
        path = tmp_path / "export"
    else:
        state = {f"model.{k}": v for k, v in classifier.state_dict().items()}
        state.update({f"ema.module.{k}": torch.zeros_like(v) for k, v in classifier.state_dict().items()})
        path = tmp_path / "last.ckpt"
        torch.save({"state_dict": state, "epoch": 3}, path)
    detector = tiny_detector("mask_rcnn", pretrained_backbone=str(path))
    loaded = detector.backbone.body.model.state_dict()
    expected = classifier.state_dict()
    assert loaded.keys() <= expected.keys() and not any(k.startswith("head") for k in loaded)
    for key, value in loaded.items():
        torch.testing.assert_close(value, expected[key], msg=key)


def test_pretrained_backbone_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained_backbone"):
        tiny_detector("faster_rcnn", pretrained_backbone=str(tmp_path / "missing.pth"))
    other = timm.create_model("nat_mini", depths=(1, 1, 1, 1))  # different width: keys match, shapes do not
    torch.save({k: v for k, v in other.state_dict().items() if not k.startswith("stages.3")}, tmp_path / "w.pth")
    with pytest.raises((ValueError, RuntimeError), match="stages.3|size mismatch"):
        tiny_detector("faster_rcnn", pretrained_backbone=str(tmp_path / "w.pth"))


def test_public_names_resolve():
    import attnzoo.recipes.detection as detection

    for name in detection.__all__:
        assert getattr(detection, name) is not None, name


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="arch must be one of"):
        tiny_detector("yolo")
    with pytest.raises(ValueError, match="unknown model 'nat_minii'"):
        build_detector("fcos", "nat_minii", 3)
    with pytest.raises(ValueError, match="num_classes"):
        tiny_detector("fcos", num_classes=0)
    with pytest.raises(TypeError, match="backbone kwargs"):
        tiny_detector("fcos", not_an_argument=1)
    with pytest.raises(TypeError, match="detector_kwargs"):
        build_detector("fcos", "nat_mini", 3, detector_kwargs=dict(bogus=1), **NAT)


def test_detection_entry_points_are_exported_from_recipes():
    import attnzoo.recipes as recipes
    from attnzoo.recipes import detection

    for name in ("build_detector", "ObjectDetector", "CocoDataModule"):
        assert getattr(recipes, name) is getattr(detection, name)
