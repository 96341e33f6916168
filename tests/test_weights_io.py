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
