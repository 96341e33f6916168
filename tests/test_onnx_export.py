"""``attnzoo export --onnx``: small variants of the families export and run in onnxruntime like PyTorch.

Every registered model at its default size: ``ATTNZOO_TEST_FULL=1`` (minutes per hierarchical model on 2 cores).
"""

import os

import pytest
import timm
import torch

import attnzoo
from attnzoo.cli import main
from attnzoo.recipes.export import export_for_timm
from attnzoo.weights.onnx_export import MIN_TORCH, export_onnx, onnx_export_supported, run_onnx

pytest.importorskip("onnxruntime", reason="the 'onnx' extra (onnx, onnxruntime, onnxscript) is not installed")
pytestmark = pytest.mark.skipif(not onnx_export_supported(), reason=f"ONNX export needs torch >= {MIN_TORCH}")

SMALL = {  # one small variant per export path (plain ViT, neighborhood, routing)
    "gated_vit_tiny_patch16_224": dict(img_size=64, depth=2),
    "nat_mini": dict(depths=(1, 1, 1, 1)),
    "biformer_tiny": dict(depths=(1, 1, 1, 1)),
}


def _exported_folder(tmp_path, name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, **kwargs).eval()
    export_for_timm(model, tmp_path / name, model_args=kwargs)
    return model, tmp_path / name


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_variant_matches_pytorch_in_onnxruntime(tmp_path, name):
    model, folder = _exported_folder(tmp_path, name, SMALL[name])
    path = export_onnx(name, tmp_path / f"{name}.onnx", weights=folder, img_size=64)
    images = torch.randn(3, 3, 64, 64)  # another batch size than the example's
    torch.testing.assert_close(run_onnx(path, images), model(images), atol=1e-4, rtol=0)


@torch.no_grad()
def test_dynamic_size_runs_one_file_at_two_sizes_through_the_cli(tmp_path, capsys):
    name = "gated_vit_tiny_patch16_224"
    model, folder = _exported_folder(tmp_path, name, SMALL[name])
    out = tmp_path / "dynamic.onnx"
    args = ["export", "--model", name, "--weights", str(folder), "--onnx", str(out), "--dynamic-size"]
    assert main([*args, "--img-size", "64"]) == 0
    assert "max abs difference" in capsys.readouterr().out
    for size in [(64, 64), (48, 80), (50, 70)]:  # 50 x 70: padded to whole patches inside the graph
        images = torch.randn(1, 3, *size)
        torch.testing.assert_close(run_onnx(out, images), model(images), atol=1e-4, rtol=0)


def test_dynamic_size_is_refused_where_the_shape_logic_is_concrete(tmp_path):
    _, folder = _exported_folder(tmp_path, "biformer_tiny", SMALL["biformer_tiny"])
    with pytest.raises(ValueError, match="dynamic image size"):
        export_onnx("biformer_tiny", tmp_path / "b.onnx", weights=folder, dynamic_size=True, img_size=64)
    assert not (tmp_path / "b.onnx").exists()


REFUSED_BEFORE_TRACING = {  # the token counts (ToMe, PPT, Token Pooling) or the windows follow the concrete size
    "tome_deit_tiny_patch16_224": dict(img_size=64, depth=2, r=8),
    "ppt_deit_small_patch16_224": dict(img_size=64, depth=2, embed_dim=48, num_heads=3, r=4, locations=[0]),
    "tokenpool_deit_small_patch16_224": dict(img_size=64, depth=2, embed_dim=48, num_heads=3, locations=[0]),
    "agent_swin_tiny": dict(depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 2, 4, 8)),
}


@pytest.mark.parametrize("name", sorted(REFUSED_BEFORE_TRACING))
def test_dynamic_size_is_refused_before_tracing_where_counts_or_windows_follow_the_size(
    tmp_path, monkeypatch, name, one_thread
):
    traced = []

    def no_tracing(*args, **kwargs):
        traced.append(name)
        raise RuntimeError("torch.export.export was called")

    monkeypatch.setattr(torch.export, "export", no_tracing)
    _, folder = _exported_folder(tmp_path, name, REFUSED_BEFORE_TRACING[name])
    reason = "its token reduction" if "deit" in name else "the window padding"
    with pytest.raises(ValueError, match=f"{name} cannot be exported with a dynamic image size: {reason}"):
        export_onnx(name, tmp_path / "m.onnx", weights=folder, dynamic_size=True, img_size=64)
    assert not traced and not (tmp_path / "m.onnx").exists()
    if "deit" in name:  # keeping every token is the plain ViT, which exports with a dynamic size
        from attnzoo.weights.onnx_export import dynamic_size_refusal

        keep_all = {"keep_ratio": 1.0} if name.startswith("tokenpool") else {"r": 0}
        assert dynamic_size_refusal(timm.create_model(name, **{**REFUSED_BEFORE_TRACING[name], **keep_all})) is None


@pytest.mark.skipif(not os.environ.get("ATTNZOO_TEST_FULL"), reason="every model at full size: ATTNZOO_TEST_FULL=1")
@pytest.mark.parametrize("name", attnzoo.list_models())
def test_every_model_exports_at_its_default_size(tmp_path, name):
    model, folder = _exported_folder(tmp_path, name, {})
    path = export_onnx(name, tmp_path / "m.onnx", weights=folder)
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        torch.testing.assert_close(run_onnx(path, x), model(x), atol=1e-4, rtol=0)
