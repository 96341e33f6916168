"""``attnzoo convert``: official / pickled / exported checkpoints -> a ``local-dir`` folder with identical logits."""

import argparse
import os
import stat

import pytest
import timm
import torch
from test_nat import OFFICIAL, _official_state_dict  # official NAT key layout (NAT:classification/nat.py)

import attnzoo  # noqa: F401
from attnzoo.cli import main
from attnzoo.weights.convert import convert_checkpoint, load_source


def _logits(model, size=64):
    return model.eval()(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)))


@torch.no_grad()
def test_official_nat_checkpoint_converts_through_the_cli(tmp_path, capsys):
    torch.save({"model": _official_state_dict(OFFICIAL["nat_mini"]), "epoch": 309}, tmp_path / "nat_mini.pth")
    out = tmp_path / "converted"
    assert main(["convert", "--model", "nat_mini", "--src", str(tmp_path / "nat_mini.pth"), "--out", str(out)]) == 0
    assert "local-dir:" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    direct = load_source("nat_mini", tmp_path / "nat_mini.pth")
    converted = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert torch.equal(_logits(converted), _logits(direct))


@torch.no_grad()
def test_training_pickle_with_other_classes_and_size_then_export_folder(tmp_path):
    """A pickled training checkpoint (argparse namespace inside) of a 10-class 32 px model; then its converted folder
    converts again (our exports are a source too)."""
    name = "gated_vit_tiny_patch16_224"
    source = timm.create_model(name, num_classes=10, img_size=32)
    ckpt = {"model": source.state_dict(), "args": argparse.Namespace(model=name, input_size=32)}
    torch.save(ckpt, tmp_path / "train.pth")
    with pytest.raises(ValueError, match="num_classes"):
        convert_checkpoint(name, tmp_path / "train.pth", tmp_path / "wrong", img_size=32)
    assert not (tmp_path / "wrong").exists()
    first = convert_checkpoint(name, tmp_path / "train.pth", tmp_path / "a", num_classes=10, img_size=32)
    second = convert_checkpoint(name, first.parent, tmp_path / "b")
    reloaded = timm.create_model(f"local-dir:{second.parent}", pretrained=True)
    assert reloaded.num_classes == 10 and torch.equal(_logits(reloaded, 32), _logits(source, 32))


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bad_sources_are_rejected_and_leave_no_folder(tmp_path):
    name = "gated_vit_tiny_patch16_224"
    good = timm.create_model(name, img_size=32, depth=2).state_dict()
    torch.save({"model": good}, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 3])
    torch.save({"model": timm.create_model(name, img_size=32, depth=1).state_dict()}, tmp_path / "other.pth")
    marker = tmp_path / "pwned"
    torch.save({"model": good, "config": _Payload(marker)}, tmp_path / "evil.pth")
    cases = [("truncated.pth", ValueError, "not a readable checkpoint"), ("other.pth", ValueError, "missing")]
    for file, error, match in cases:
        with pytest.raises(error, match=match):
            convert_checkpoint(name, tmp_path / file, tmp_path / file.replace(".pth", "_out"), img_size=32)
        assert not (tmp_path / file.replace(".pth", "_out")).exists()
    with pytest.raises(FileNotFoundError):
        convert_checkpoint(name, tmp_path / "missing.pth", tmp_path / "missing_out")
    # the malicious pickle converts its tensors (depth 1 vs 2 aside) without running its payload
    with pytest.raises(ValueError, match="missing"):
        convert_checkpoint(name, tmp_path / "evil.pth", tmp_path / "evil_out", img_size=32)
    assert not marker.exists() and not (tmp_path / "evil_out").exists()
    assert not list(tmp_path.glob(".*.tmp"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        convert_checkpoint(name, tmp_path / "good.pth", tmp_path / "taken", img_size=32)


@torch.no_grad()
def test_the_printed_load_line_loads_the_converted_weights(tmp_path, capsys, one_thread):
    import re

    from attnzoo.cli import build_parser
    from attnzoo.recipes import export as export_module

    name = "gated_vit_tiny_patch16_224"
    source = timm.create_model(name, img_size=32)
    torch.save({"model": source.state_dict()}, tmp_path / "train.pth")
    out = tmp_path / "converted"
    assert (
        main(["convert", "--model", name, "--src", str(tmp_path / "train.pth"), "--out", str(out), "--img-size", "32"])
        == 0
    )
    call = re.search(r"load with (timm\.create_model\(.*\))\)", capsys.readouterr().out).group(1)
    loaded = eval(call, {"timm": timm})  # the line a user copies
    assert torch.equal(_logits(loaded, 32), _logits(source, 32))
    commands = build_parser()._subparsers._group_actions[0].choices
    for text in (commands["convert"].description, export_module.__doc__):
        assert "local-dir:" in text
        assert all("pretrained=True" in line for line in text.splitlines() if "create_model(\"local-dir" in line
                   or "create_model('local-dir" in line)  # fmt: skip


def test_output_folder_gets_the_umask_and_a_symlink_is_named(tmp_path, one_thread):
    name = "gated_vit_tiny_patch16_224"
    torch.save({"model": timm.create_model(name, img_size=32).state_dict()}, tmp_path / "w.pth")
    old_umask = os.umask(0o022)
    try:
        convert_checkpoint(name, tmp_path / "w.pth", tmp_path / "out", img_size=32)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755  # 0o777 less the umask, like mkdir
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"--out .*link is a symbolic link \(to .*empty\)"):
        convert_checkpoint(name, tmp_path / "w.pth", tmp_path / "link", img_size=32)
    assert not any((tmp_path / "empty").iterdir())
