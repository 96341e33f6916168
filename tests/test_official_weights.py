"""Official training checkpoints: restricted unpickling, hash checks and timm's pretrained path."""

import argparse
import pickle

import pytest
import timm
import torch

import attnzoo  # noqa: F401
from attnzoo.weights import (
    OpaqueObject,
    build_model_with_official_weights,
    fetch_checkpoint,
    read_official_checkpoint,
    restricted_torch_load,
    sha256_of_file,
)


class FakeCfgNode(dict):
    """Stands in for a yacs ``CfgNode`` (a dict subclass with attributes) pickled into official checkpoints."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__["frozen"] = True


class Payload:
    """Unpickling this with plain pickle creates ``marker`` (``open(marker, "w")``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _training_checkpoint(state):
    return {
        "model": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
        "epoch": 299,
        "max_accuracy": 81.8,
        "config": FakeCfgNode(MODEL=FakeCfgNode(TYPE="agent_deit"), DATA={"IMG_SIZE": 224}),
        "args": argparse.Namespace(model="nat_mini", lr=1e-3),
    }


def test_restricted_load_reads_tensors_and_keeps_objects_inert(tmp_path):
    state = {"w": torch.randn(3, 4), "b": torch.arange(3, dtype=torch.int64), "h": torch.randn(2).half()}
    torch.save(_training_checkpoint(state), tmp_path / "ckpt.pth")
    with pytest.raises(pickle.UnpicklingError):  # what timm's url/file loader would do
        torch.load(tmp_path / "ckpt.pth", weights_only=True)
    ckpt = restricted_torch_load(tmp_path / "ckpt.pth")
    assert all(torch.equal(ckpt["model"][k], state[k]) and ckpt["model"][k].dtype == state[k].dtype for k in state)
    assert isinstance(ckpt["config"], OpaqueObject) and "FakeCfgNode" in repr(ckpt["config"])
    assert ckpt["config"].items["DATA"] == {"IMG_SIZE": 224}
    assert isinstance(ckpt["args"], OpaqueObject) and ckpt["epoch"] == 299


def test_restricted_load_does_not_execute_payloads(tmp_path):
    marker = tmp_path / "pwned"
    payloads = {"open": Payload(marker), "method": (Payload(marker).__reduce__, Payload(marker))}
    torch.save({"model": {"w": torch.ones(2)}, "config": payloads}, tmp_path / "evil.pth")
    state = read_official_checkpoint(str(tmp_path / "evil.pth"))
    assert not marker.exists() and torch.equal(state["w"], torch.ones(2))


def test_fetch_checks_sha256(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(1)}, path)
    digest = sha256_of_file(path)
    assert fetch_checkpoint(str(path), sha256=digest) == str(path)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        fetch_checkpoint(str(path), sha256="0" * 64)
    with pytest.raises(FileNotFoundError, match="neither a file nor a URL"):
        fetch_checkpoint(str(tmp_path / "missing.pth"))


def test_pretrained_file_overlay_reads_training_pickles(tmp_path):
    """A pickled training checkpoint as the cfg's ``file`` loads through timm's filter and classifier resizing."""
    name = "gated_vit_tiny_patch16_224"
    source = timm.create_model(name, img_size=32, depth=2)
    torch.save(_training_checkpoint(source.state_dict()), tmp_path / "official.pth")
    model = timm.create_model(
        name,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "official.pth")),
        img_size=32,
        depth=2,
        num_classes=10,
    )
    assert "state_dict" not in model.pretrained_cfg and model.head.out_features == 10
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    for key, value in expected.items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_builder_without_pretrained_is_timms(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    model = build_model_with_official_weights(VisionTransformer, "vit_tiny_patch16_224", False, img_size=32, depth=1)
    assert model.pretrained_cfg["architecture"] == "vit_tiny_patch16_224"
