"""Official training checkpoints: restricted unpickling, hash checks and timm's pretrained path."""

import argparse
import http.server
import os
import pickle
import re
import socket
import threading

import pytest
import timm
import torch

import attnzoo  # noqa: F401
from attnzoo.weights import (
    OpaqueObject,
    WeightsUnavailableError,
    build_model_with_official_weights,
    checkpoint_cache_path,
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


def _registered_pretrained_cfgs():
    for name in attnzoo.list_models():
        for tagged in timm.list_pretrained(name) or [name]:
            cfg = timm.models.get_pretrained_cfg(tagged)
            if cfg is not None and cfg.url:
                yield (f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture), cfg.url


def test_every_official_url_gets_its_own_cache_file():
    """Agent-Attention links end in ``/?dl=1`` (no file name), BiFormer's in ``/root/content`` (one shared name)."""
    paths = {name: checkpoint_cache_path(name, url) for name, url in _registered_pretrained_cfgs()}
    assert any("biformer" in n for n in paths) and any("agent_" in n for n in paths)
    assert len(set(paths.values())) == len(paths)
    for name, path in paths.items():
        assert os.path.basename(path).startswith(name) and not path.endswith(os.sep)


def _dead_url():
    with socket.socket() as s:  # a port nothing listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/checkpoints/gated.pth"


def test_offline_pretrained_names_the_cache_path_and_the_overlay(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    name, kwargs = "gated_vit_tiny_patch16_224", dict(img_size=32, depth=1)
    url = _dead_url()
    with pytest.raises(WeightsUnavailableError) as info:
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(url=url), **kwargs)
    message = str(info.value)
    path = re.search(r"put the checkpoint file at (\S+) ", message)[1]
    assert path.startswith(str(tmp_path / "hub" / "checkpoints" / "attnzoo" / name))
    assert name in message and url in message and "pretrained_cfg_overlay=dict(file=" in message
    # following the advice: the file at that path loads without any network
    source = timm.create_model(name, **kwargs)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(_training_checkpoint(source.state_dict()), path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(url=url), **kwargs)
    torch.testing.assert_close(model.state_dict(), source.state_dict())


class _TruncatingHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b"\0" * 1000)  # then the connection closes

    def log_message(self, *args):
        pass


def test_truncated_download_leaves_nothing_in_the_cache(tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), _TruncatingHandler)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/w.pth"
    path = tmp_path / "cache" / "w.pth"
    try:
        with pytest.raises(WeightsUnavailableError, match="broke off after 1000 of 100000 bytes"):
            torch_hub_dir = str(tmp_path)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(torch.hub, "get_dir", lambda: torch_hub_dir)
                fetch_checkpoint(url, model="w", progress=False)
    finally:
        thread.join(5)
        server.server_close()
    assert not path.exists() and not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob("*.pth"))


def test_checkpoint_of_another_architecture_is_an_error(tmp_path):
    """timm loads non-strictly when num_classes differs; missing or foreign tensors must still fail loudly."""
    name = "gated_vit_tiny_patch16_224"
    smaller = timm.create_model(name, img_size=32, depth=1)
    torch.save({"model": smaller.state_dict()}, tmp_path / "depth1.pth")
    torch.save({"model": {"stages.0.weight": torch.ones(3)}}, tmp_path / "foreign.pth")
    for file, match in [("depth1.pth", r"missing \['blocks.1."), ("foreign.pth", "unexpected.*stages.0.weight")]:
        with pytest.raises(ValueError, match=match):
            timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / file)),
                img_size=32, depth=2, num_classes=10,
            )  # fmt: skip


def test_a_wrong_file_in_the_weight_cache_is_named_by_its_path(tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    name, url = "gated_vit_tiny_patch16_224", "https://example.invalid/weights/gated_vit_tiny.pth"
    path = checkpoint_cache_path(name, url)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": timm.create_model(name, img_size=32, depth=1).state_dict()}, path)  # another depth
    with pytest.raises(ValueError, match=re.escape(f"{path} (the cached download of {url}; delete it")):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(url=url), img_size=32, depth=2)


def test_unreadable_checkpoints_name_the_file(tmp_path):
    torch.save({"model": {"w": torch.randn(64, 64)}}, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pth").write_bytes(bytes(range(256)) * 8)
    for name in ("truncated.pth", "garbage.pth"):
        path = str(tmp_path / name)
        with pytest.raises(ValueError, match=f"{path} is not a readable checkpoint"):
            read_official_checkpoint(path)
