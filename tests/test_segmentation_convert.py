"""Released mmseg checkpoints: a UperNet / Semantic FPN checkpoint in mmseg's layout (written here, with the official
NAT backbone keys) converts key for key and gives the logits of the same weights loaded by hand; bad checkpoints are
errors naming the keys; ``attnzoo convert --config`` writes the folder that ``SemanticSegmenter(weights=...)`` loads."""

import pytest
import torch
import yaml
from test_nat import _official_state_dict  # official NAT key layout (NAT:classification/nat.py)

from attnzoo.cli import main
from attnzoo.nat import checkpoint_filter_fn
from attnzoo.recipes.segmentation import SemanticSegmenter
from attnzoo.weights.io import load_state_dict_file
from attnzoo.weights.mmseg import map_state_dict

CONFIG = ((1, 1, 1, 1), (1, 1, 2, 2), 16, 2, False)  # depths, heads, dim, mlp ratio, layer scale
KWARGS = dict(depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], embed_dim=16, mlp_ratio=2, out_norms=True)


def _module(decoder, num_classes=4, **kwargs):
    return SemanticSegmenter(
        decoder=decoder, backbone="nat_mini", num_classes=num_classes, backbone_kwargs=KWARGS, channels=16,
        fpn_channels=16, **kwargs,
    )  # fmt: skip


def _mmseg_checkpoint(module) -> dict[str, torch.Tensor]:
    """Random tensors under mmseg's keys for ``module``'s architecture: the official NAT backbone with output norms
    ``norm0..3``, mmseg's head names (identical to ours) and the FPN neck as ``neck.{lateral,fpn}_convs.i.conv``."""
    g = torch.Generator().manual_seed(1)
    backbone = _official_state_dict(CONFIG, seed=2)
    backbone = {k: v for k, v in backbone.items() if not k.startswith(("norm.", "head."))}
    for i in range(4):
        backbone.update(
            {
                f"norm{i}.weight": torch.randn(16 * 2**i, generator=g),
                f"norm{i}.bias": torch.randn(16 * 2**i, generator=g),
            }
        )
    state = {f"backbone.{k}": v for k, v in backbone.items()}
    for name, tensor in module.model.state_dict().items():
        if name.startswith(("decode_head.", "auxiliary_head.")):
            value = (
                torch.rand(tensor.shape, generator=g) + 0.5
                if "running_var" in name
                else torch.randn(tensor.shape, generator=g)
            )
            state[name] = value.to(tensor.dtype) if tensor.dtype.is_floating_point else torch.tensor(7)
    if module.model.backbone.fpn is not None:
        for i, width in enumerate((16, 32, 64, 128)):
            state[f"neck.lateral_convs.{i}.conv.weight"] = torch.randn(16, width, 1, 1, generator=g)
            state[f"neck.lateral_convs.{i}.conv.bias"] = torch.randn(16, generator=g)
            state[f"neck.fpn_convs.{i}.conv.weight"] = torch.randn(16, 16, 3, 3, generator=g)
            state[f"neck.fpn_convs.{i}.conv.bias"] = torch.randn(16, generator=g)
    return state


def _by_hand(module, state) -> None:
    """Load ``state`` into ``module`` without the converter: the NAT filter for the backbone, the head names as they
    are, the neck through the torchvision FPN's modules."""
    model = module.model
    body = model.backbone.body.model
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    body.load_state_dict(checkpoint_filter_fn(backbone, body), strict=True)
    for head in ("decode_head", "auxiliary_head"):
        part = {k[len(head) + 1 :]: v for k, v in state.items() if k.startswith(head + ".")}
        if part:
            getattr(model, head).load_state_dict(part, strict=True)
    with torch.no_grad():
        for i in range(4 if model.backbone.fpn is not None else 0):
            for ours, theirs in (("inner_blocks", "lateral_convs"), ("layer_blocks", "fpn_convs")):
                conv = getattr(model.backbone.fpn, ours)[i][0]
                conv.weight.copy_(state[f"neck.{theirs}.{i}.conv.weight"])
                conv.bias.copy_(state[f"neck.{theirs}.{i}.conv.bias"])


@pytest.mark.parametrize("decoder", ["upernet", "fpn"])
def test_mmseg_checkpoint_converts_to_identical_logits(decoder, tmp_path, capsys):
    torch.manual_seed(0)
    reference = _module(decoder)
    state = _mmseg_checkpoint(reference)
    torch.save({"meta": {"CLASSES": list("abcd")}, "state_dict": state}, tmp_path / "iter_160000.pth")
    converted = _module(decoder)
    converted.load_state_dict(map_state_dict(converted, load_state_dict_file(tmp_path / "iter_160000.pth")))
    _by_hand(reference, state)
    images = torch.rand(2, 3, 70, 90, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference.eval()(images)
        torch.testing.assert_close(converted.eval()(images), expected, rtol=0, atol=0)
    # attnzoo convert --config <recipe yaml>: the folder that --model.weights loads
    model = {k: v for k, v in _module(decoder).hparams.items() if k in ("decoder", "backbone", "num_classes")}
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump({"model": {**model, "backbone_kwargs": KWARGS, "channels": 16, "fpn_channels": 16}})
    )
    argv = [
        "convert",
        "--config",
        str(config),
        "--src",
        str(tmp_path / "iter_160000.pth"),
        "--out",
        str(tmp_path / "w"),
    ]
    assert main(argv) == 0 and "evaluate with --model.weights" in capsys.readouterr().out
    loaded = _module(decoder, weights=str(tmp_path / "w"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), expected, rtol=0, atol=0)


def test_bad_mmseg_checkpoints_name_the_keys(tmp_path):
    module = _module("upernet")
    state = _mmseg_checkpoint(module)
    with pytest.raises(ValueError, match=r"1 checkpoint tensors map onto nothing: decode_head\.extra\.weight"):
        map_state_dict(module, {**state, "decode_head.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"map onto nothing: neck\.lateral_convs\.0\.conv\.weight"):
        map_state_dict(module, {**state, "neck.lateral_convs.0.conv.weight": torch.zeros(1)})  # UperNet has no neck
    lacking = {k: v for k, v in state.items() if k != "auxiliary_head.conv_seg.bias"}
    with pytest.raises(
        ValueError, match=r"1 module tensors are not in the checkpoint: model\.auxiliary_head\.conv_seg\.bias"
    ):
        map_state_dict(module, lacking)
    with pytest.raises(
        ValueError,
        match=r"4 shapes differ \(num_classes\? channels\?\): model\.auxiliary_head\.conv_seg\.bias \(4,\) vs \(3,\)",
    ):
        map_state_dict(_module("upernet", num_classes=3), state)
    with pytest.raises(ValueError, match="checkpoint does not fit the nat_mini downstream backbone"):
        map_state_dict(module, {k: v for k, v in state.items() if k != "backbone.norm3.bias"})
