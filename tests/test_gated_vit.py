"""The gated plain-ViT family: DeiT equivalence, gate variants, sizes, training."""

import subprocess
import sys

import pytest
import timm
import torch

import attnzoo

DEIT = {"tiny": (192, 5.717416), "small": (384, 22.050664), "base": (768, 86.567656)}


@pytest.mark.parametrize("size", list(DEIT))
def test_param_counts(size):
    dim, deit_params_m = DEIT[size]
    name = f"gated_vit_{size}_patch16_224"
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    plain = timm.create_model(name, gate="none", device="meta")
    assert count(plain) == pytest.approx(deit_params_m * 1e6, abs=1)
    assert count(timm.create_model(name, device="meta")) == count(plain) + 12 * (dim * dim + dim)
    heads = plain.blocks[0].attn.num_heads
    assert count(timm.create_model(name, gate="headwise", device="meta")) == count(plain) + 12 * (heads * dim + heads)


def test_ungated_model_is_deit():
    """gate='none' loads timm's DeiT-Tiny weights unchanged and computes the same function."""
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_patch16_224").eval()
    ours = timm.create_model("gated_vit_tiny_patch16_224", gate="none").eval()
    ours.load_state_dict(deit.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), deit(x), atol=1e-4, rtol=1e-4)


def test_ungated_model_is_exactly_timm_deit():
    """gate='none' builds timm's own attention: the same function as timm's DeiT, bit for bit."""
    torch.manual_seed(0)
    ours = timm.create_model("gated_vit_tiny_patch16_224", gate="none", depth=2).eval()
    deit = timm.create_model("deit_tiny_patch16_224", depth=2, dynamic_img_size=True).eval()
    deit.load_state_dict(ours.state_dict(), strict=True)
    assert all(type(block.attn) is timm.layers.Attention for block in ours.blocks)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        assert torch.equal(ours(x), deit(x))


def test_checkpoint_keys_are_stable():
    """Gated-ViT checkpoints keep loading: timm's ViT keys plus ``attn.gate`` in every block."""
    model = timm.create_model("gated_vit_tiny_patch16_224", gate="headwise", depth=1, num_classes=3)
    block = {"norm1": (192,), "attn.qkv": (576, 192), "attn.gate": (3, 192), "attn.proj": (192, 192)}
    block.update({"norm2": (192,), "mlp.fc1": (768, 192), "mlp.fc2": (192, 768)})
    expected = {"cls_token": (1, 1, 192), "pos_embed": (1, 197, 192), "patch_embed.proj.weight": (192, 3, 16, 16)}
    expected["patch_embed.proj.bias"] = (192,)
    for name, shape in {**{f"blocks.0.{k}": v for k, v in block.items()}, "norm": (192,), "head": (3, 192)}.items():
        expected[f"{name}.weight"], expected[f"{name}.bias"] = shape, shape[:1]
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


@pytest.mark.parametrize("gate", ["elementwise", "headwise"])
def test_opening_the_gate_changes_the_output(gate):
    torch.manual_seed(0)
    model = timm.create_model("gated_vit_tiny_patch16_224", gate=gate, num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    out = model(x)
    with torch.no_grad():  # an open gate (sigmoid -> 1) removes gating: output changes
        for block in model.blocks:
            block.attn.gate.weight.zero_()
            block.attn.gate.bias.fill_(50.0)
    assert not torch.allclose(model(x), out, atol=1e-4)


def test_bad_gate_name_raises():
    with pytest.raises(ValueError, match="gate"):
        timm.create_model("gated_vit_tiny_patch16_224", gate="sigmoid")


@pytest.mark.parametrize("size", [(224, 224), (288, 288), (160, 96), (48, 80)])
def test_any_input_size(size):
    model = timm.create_model("gated_vit_tiny_patch16_224", num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 10)


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = timm.create_model("gated_vit_tiny_patch16_224", num_classes=4, depth=2)
    x, y = torch.randn(8, 3, 48, 48), torch.arange(8) % 4
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_registered_on_import_in_a_fresh_process():
    code = (
        "import torch, attnzoo, timm; "
        "print(timm.create_model('gated_vit_small_patch16_224')(torch.randn(1, 3, 224, 224)).shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch.Size([1, 1000])"


def test_list_models_lists_only_the_zoo():
    names = attnzoo.list_models()
    assert {"gated_vit_tiny_patch16_224", "gated_vit_small_patch16_224", "gated_vit_base_patch16_224"} <= set(names)
    assert "vit_small_patch16_224" not in names and "deit_tiny_patch16_224" not in names
    assert attnzoo.list_models("gated_vit_s*") == ["gated_vit_small_patch16_224"]
    for name in names:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        assert cfg["license"] and cfg["paper_ids"] and cfg["origin_url"]
