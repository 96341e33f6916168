"""`attnzoo convert --config`: mmdet-layout checkpoints (written here from our detectors by the layout's rules)
convert back onto the detector of a config and give the same detections; bad files fail without writing."""

import json
import os
import re
import stat

import pytest
import torch
import yaml

from attnzoo.cli import main as attnzoo_main
from attnzoo.recipes.detection import ObjectDetector
from attnzoo.weights.dense_convert import convert_dense_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


PVT = dict(
    depths=[1, 1, 1, 1],
    embed_dims=[16, 32, 48, 64],
    num_heads=[1, 1, 2, 2],
    downstream_agent_shapes=[[12, 12], [16, 16], [28, 28], [28, 28]],
    pad_patches=False,
)
MODEL = dict(backbone="agent_pvt_tiny", num_classes=3, backbone_kwargs=PVT, fpn_channels=16, min_size=96, max_size=128)
SMALL = {
    "retinanet": dict(topk_candidates=100),
    "mask_rcnn": dict(rpn_pre_nms_top_n_test=60, rpn_post_nms_top_n_test=30),
    "cascade_mask_rcnn": dict(rpn_pre_nms_top_n_test=60, rpn_post_nms_top_n_test=30, box_fc_channels=64),
}


def _conv_module(key: str) -> str:
    """torchvision ``Conv2dNormActivation`` ``<name>.0.*`` / ``<name>.1.*`` -> mmcv ``<name>.conv.*`` / ``.bn.*``."""
    return re.sub(
        r"\.0\.(weight|bias)$",
        r".conv.\1",
        re.sub(r"\.1\.(weight|bias|running_\w+|num_batches_tracked)$", r".bn.\1", key),
    )


def official_agent_pvt(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """An Agent-PVT tensor in the official layout (shared/downstream.md section 3): ``patch_embed{i}``,
    ``pos_embed{i}`` ``(1, N, C)``, ``block{i}.j`` with separate ``attn.q`` / ``attn.kv``."""
    if m := re.match(r"(stem|stages\.(\d)\.downsample)\.(.*)", key):
        i = 1 if m[1] == "stem" else int(m[2]) + 1
        return {f"pos_embed{i}": value.flatten(1, 2)} if m[3] == "pos_embed" else {f"patch_embed{i}.{m[3]}": value}
    m = re.match(r"stages\.(\d)\.blocks\.(\d+)\.(.*)", key)
    prefix = f"block{int(m[1]) + 1}.{m[2]}."
    if m[3].startswith("attn.qkv."):
        dim, name = len(value) // 3, m[3][len("attn.qkv.") :]
        return {f"{prefix}attn.q.{name}": value[:dim], f"{prefix}attn.kv.{name}": value[dim:]}
    return {prefix + m[3]: value}


def to_mmdet(detector: ObjectDetector) -> dict[str, torch.Tensor]:
    """Our detector's state dict in mmdet 2.x's layout (official backbone keys, background last, no background box
    deltas / mask channel)."""
    model, out = detector.model, {}
    inner = len(model.backbone.fpn.inner_blocks)
    for key, value in model.state_dict().items():
        if key.startswith("backbone.body.model."):
            for name, tensor in official_agent_pvt(key[len("backbone.body.model.") :], value).items():
                out["backbone." + name] = tensor
            continue
        if m := re.match(r"backbone\.fpn\.inner_blocks\.(\d+)\.0\.(\w+)", key):
            key = f"neck.lateral_convs.{m[1]}.conv.{m[2]}"
        elif m := re.match(r"backbone\.fpn\.layer_blocks\.(\d+)\.0\.(\w+)", key):
            key = f"neck.fpn_convs.{m[1]}.conv.{m[2]}"
        elif m := re.match(r"backbone\.fpn\.extra_blocks\.p([67])\.(\w+)", key):
            key = f"neck.fpn_convs.{inner + int(m[1]) - 6}.conv.{m[2]}"
        elif m := re.match(r"rpn\.head\.(conv\.0\.0|cls_logits|bbox_pred)\.(\w+)", key):
            key = (
                "rpn_head."
                + {"conv.0.0": "rpn_conv", "cls_logits": "rpn_cls", "bbox_pred": "rpn_reg"}[m[1]]
                + "."
                + m[2]
            )
        elif m := re.match(r"head\.(classification|regression)_head\.conv\.(\d+)\.0\.(\w+)", key):
            key = f"bbox_head.{m[1][:3].replace('cla', 'cls')}_convs.{m[2]}.conv.{m[3]}"
        elif m := re.match(r"head\.classification_head\.cls_logits\.(\w+)", key):
            key = f"bbox_head.retina_cls.{m[1]}"
        elif m := re.match(r"head\.regression_head\.bbox_reg\.(\w+)", key):
            key = f"bbox_head.retina_reg.{m[1]}"
        elif m := re.match(r"roi_heads\.box_head\.fc([67])\.(\w+)", key):
            key = f"roi_head.bbox_head.shared_fcs.{int(m[1]) - 6}.{m[2]}"
        elif m := re.match(r"roi_heads\.box_heads\.(\d)\.(\d)\.(.*)", key):
            stage, layer, rest = m[1], int(m[2]), m[3]
            key = (
                f"roi_head.bbox_head.{stage}.shared_fcs.0.{rest}"
                if layer == 5
                else _conv_module(f"roi_head.bbox_head.{stage}.shared_convs.{layer}.{rest}")
            )
        elif m := re.match(r"roi_heads\.box_predictors?(?:\.(\d))?\.(cls_score|bbox_pred)\.(\w+)", key):
            stage = "" if m[1] is None else m[1] + "."
            if m[2] == "cls_score":
                key, value = f"roi_head.bbox_head.{stage}fc_cls.{m[3]}", torch.cat([value[1:], value[:1]])
            else:
                key, value = f"roi_head.bbox_head.{stage}fc_reg.{m[3]}", value[4:]
        elif m := re.match(r"roi_heads\.mask_heads?(?:\.(\d))?\.(\d)\.0\.(\w+)", key):
            stage = "" if m[1] is None else m[1] + "."
            key = f"roi_head.mask_head.{stage}convs.{m[2]}.conv.{m[3]}"
        elif m := re.match(r"roi_heads\.mask_predictors?(?:\.(\d))?\.(conv5_mask|mask_fcn_logits)\.(\w+)", key):
            stage = "" if m[1] is None else m[1] + "."
            name = "upsample" if m[2] == "conv5_mask" else "conv_logits"
            key, value = f"roi_head.mask_head.{stage}{name}.{m[3]}", value if name == "upsample" else value[1:]
        else:
            raise AssertionError(f"the test's layout has no rule for {key}")
        out[key] = value
    return out


def _randomize(detector: ObjectDetector) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in detector.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.rand(tensor.shape, generator=generator)
                tensor.copy_(0.5 + noise if "running_var" in name else (noise - 0.5) * 0.2)


def _write(tmp_path, arch, state, meta=None):
    config = tmp_path / f"{arch}.yaml"
    config.write_text(
        yaml.safe_dump({"model": {**MODEL, "arch": arch, "ops": "mmdet", "detector_kwargs": SMALL[arch]}})
    )
    src = tmp_path / f"{arch}.pth"
    torch.save(
        {"meta": meta or {"mmdet_version": "2.25.2", "CLASSES": ("cat", "dog", "fox")}, "state_dict": state}, src
    )
    return config, src


@pytest.mark.parametrize("arch", ["mask_rcnn", "cascade_mask_rcnn", "retinanet"])
def test_mmdet_checkpoint_converts_to_the_same_detector(tmp_path, arch):
    torch.manual_seed(0)
    reference = ObjectDetector(arch=arch, **MODEL, ops="mmdet", detector_kwargs=SMALL[arch]).eval()
    _randomize(reference)
    config, src = _write(tmp_path, arch, to_mmdet(reference))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="symbolic link"):
        convert_dense_checkpoint(config, src, tmp_path / "link")
    umask = os.umask(0o022)
    try:
        out = convert_dense_checkpoint(config, src, tmp_path / "converted")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # the umask's, not mkdtemp's 0700
    meta = json.loads((out / "meta.json").read_text())
    assert meta["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "fox"}]
    converted = ObjectDetector(arch=arch, **MODEL, ops="mmdet", detector_kwargs=SMALL[arch], weights=str(out)).eval()
    assert converted.categories == meta["categories"]
    image = torch.rand(3, 101, 123, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = reference([image])[0], converted([image])[0]
    assert len(expected["boxes"]) > 0
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], msg=key)


def test_strict_conversion_names_the_keys_and_writes_nothing(tmp_path):
    torch.manual_seed(0)
    state = to_mmdet(ObjectDetector(arch="retinanet", **MODEL))
    config, src = _write(tmp_path, "retinanet", {**state, "bbox_head.extra_conv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="bbox_head.extra_conv.weight"):
        convert_dense_checkpoint(config, src, tmp_path / "out")
    del state["bbox_head.retina_reg.bias"]
    config, src = _write(tmp_path, "retinanet", state)
    with pytest.raises(ValueError, match="head.regression_head.bbox_reg.bias"):
        attnzoo_main(["convert", "--config", str(config), "--src", str(src), "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["retinanet.pth", "retinanet.yaml"]


def test_no_decay_keys_follow_mmdets_paramwise_rule():
    detector = ObjectDetector(arch="retinanet", **MODEL, no_decay_keys=["norm", "an_bias"])
    decay_of = {id(p): g["weight_decay"] for g in detector.param_groups(1e-4) for p in g["params"]}
    names = dict(detector.model.named_parameters())
    assert decay_of.keys() == {id(p) for p in names.values()}
    for name, p in names.items():
        assert decay_of[id(p)] == (0.0 if "norm" in name or "an_bias" in name else 0.05), name
    assert decay_of[id(names["head.regression_head.bbox_reg.bias"])] == 0.05  # mmdet decays biases
    with pytest.raises(ValueError, match="no_decay_keys"):
        ObjectDetector(arch="retinanet", **MODEL, no_decay_keys=[], layer_decay=0.9)
