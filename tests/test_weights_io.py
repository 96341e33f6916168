"""Safe checkpoint reading."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from attnzoo.weights import load_state_dict_file, unwrap_state_dict


def test_reads_safetensors(tmp_path):
    tensors = {"a.weight": torch.randn(2, 3), "b": torch.arange(4)}
    save_file(tensors, tmp_path / "w.safetensors")
    loaded = load_state_dict_file(tmp_path / "w.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("wrapper", ["model", "state_dict", None])
def test_reads_training_checkpoints(tmp_path, wrapper):
    state = {"module.x": torch.ones(2), "module.y": torch.zeros(1)}
    ckpt = {wrapper: state, "epoch": 3, "max_accuracy": 81.8} if wrapper else state
    torch.save(ckpt, tmp_path / "c.pth")
    assert set(load_state_dict_file(tmp_path / "c.pth")) == {"x", "y"}


class _Evil:
    def __reduce__(self):
        return (print, ("side effect",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_refuses_arbitrary_pickles(tmp_path):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": {"w": torch.ones(1)}, "config": _Evil()}, f)
    with pytest.raises(ValueError, match="weights-only"):
        load_state_dict_file(tmp_path / "evil.pth")


def test_missing_file_and_empty_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_state_dict_file(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="no tensors"):
        unwrap_state_dict({"model": {"epoch": 1}})


def test_a_safetensors_file_is_read_whatever_its_name(tmp_path, one_thread):
    import timm

    from attnzoo.weights import read_official_checkpoint

    tensors = {"a.weight": torch.randn(2, 3)}
    save_file(tensors, tmp_path / "w.pth")  # e.g. a download saved under the official file name
    assert torch.equal(load_state_dict_file(tmp_path / "w.pth")["a.weight"], tensors["a.weight"])
    assert torch.equal(read_official_checkpoint(str(tmp_path / "w.pth"))["a.weight"], tensors["a.weight"])
    source = timm.create_model("gated_vit_tiny_patch16_224", img_size=32, depth=1)
    save_file(source.state_dict(), tmp_path / "model.bin")
    overlay = dict(file=str(tmp_path / "model.bin"))
    model = timm.create_model("gated_vit_tiny_patch16_224", img_size=32, depth=1, pretrained=True,
                              pretrained_cfg_overlay=overlay)  # fmt: skip
    torch.testing.assert_close(model.state_dict(), source.state_dict())
    (tmp_path / "fake.safetensors").write_bytes(b"\xff" * 8 + b"{}")  # a header length past the end: not one
    with pytest.raises(ValueError, match="fake.safetensors is not a weights-only checkpoint"):
        load_state_dict_file(tmp_path / "fake.safetensors")
