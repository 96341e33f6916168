"""RMT / PPMA models: parameter counts and MACs of the official models, official checkpoints (key layout of
RMT:classfication_release/RMT.py and PPMA:classification/models/PPMA.py) through ``pretrained_cfg_overlay`` and
``attnzoo convert``, odd input sizes, the detection backbone and the released UperNet checkpoints' layout."""

import argparse
import math

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml

import attnzoo  # noqa: F401
from attnzoo.cli import main
from attnzoo.kernels.flops import count_macs
from attnzoo.recipes.cli import CONFIG_DIR
from attnzoo.recipes.detection.backbones import build_backbone
from attnzoo.recipes.segmentation import SemanticSegmenter
from attnzoo.rmt import checkpoint_filter_fn
from attnzoo.weights.downstream import convert_backbone_state
from attnzoo.weights.io import load_state_dict_file
from attnzoo.weights.mmseg import map_state_dict

# n_parameters of the official training logs (RMT:RMT_log/rmt_{t,s,m,l}.txt, PPMA:training_logs/classification/)
PARAMS = {
    "rmt_tiny": 14_334_216,
    "rmt_small": 26_967_240,
    "rmt_base": 54_154_896,
    "rmt_large": 95_464_864,
    "ppma_tiny": 14_335_272,
    "ppma_small": 26_969_472,
    "ppma_base": 54_158_524,
}
PUBLISHED_PARAMS_M = {"rmt_tiny": 14, "rmt_small": 27, "rmt_base": 54, "rmt_large": 95, "ppma_tiny": 14}
PUBLISHED_PARAMS_M |= {"ppma_small": 27, "ppma_base": 54}

# official configs: depths, dims, heads, mlp ratios, heads_ranges, layer scale stages
OFFICIAL = {
    "rmt_tiny": ((2, 2, 8, 2), (64, 128, 256, 512), (4, 4, 8, 16), (3, 3, 3, 3), (4, 4, 6, 6), ()),
    "rmt_small": ((3, 4, 18, 4), (64, 128, 256, 512), (4, 4, 8, 16), (4, 4, 3, 3), (4, 4, 6, 6), ()),
    "rmt_base": ((4, 8, 25, 8), (80, 160, 320, 512), (5, 5, 10, 16), (4, 4, 3, 3), (5, 5, 6, 6), (2, 3)),
    "rmt_large": ((4, 8, 25, 8), (112, 224, 448, 640), (7, 7, 14, 20), (4, 4, 3, 3), (6, 6, 6, 6), (2, 3)),
}
OFFICIAL |= {name.replace("rmt", "ppma"): OFFICIAL[name] for name in ("rmt_tiny", "rmt_small", "rmt_base")}


def _official_state_dict(name, seed=0, device="cpu", layer_scale_stages=None, depths=None):
    """Random tensors under the official key names and shapes (meta: shapes only; the ``Relpos`` buffers hold the
    official values); ``layer_scale_stages`` / ``depths`` override the model's."""
    official_depths, dims, heads, ratios, ranges, ls_stages = OFFICIAL[name]
    depths = depths or official_depths
    ls_stages = ls_stages if layer_scale_stages is None else layer_scale_stages
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.empty(*shape, device="meta") if device == "meta" else torch.randn(*shape, generator=g) * 0.05

    def bn(prefix, c):
        return {
            f"{prefix}.weight": rand(c),
            f"{prefix}.bias": rand(c),
            f"{prefix}.running_mean": rand(c),
            f"{prefix}.running_var": rand(c).abs() + 0.5 if device != "meta" else rand(c),
            f"{prefix}.num_batches_tracked": torch.tensor(7),
        }

    c0 = dims[0]
    sd = {}
    for i, (cin, cout) in enumerate([(3, c0 // 2), (c0 // 2, c0 // 2), (c0 // 2, c0), (c0, c0)]):
        sd |= {f"patch_embed.proj.{3 * i}.weight": rand(cout, cin, 3, 3), f"patch_embed.proj.{3 * i}.bias": rand(cout)}
        sd |= bn(f"patch_embed.proj.{3 * i + 1}", cout)
    for i, (depth, c, h, ratio) in enumerate(zip(depths, dims, heads, ratios)):
        hd, hidden = c // h, int(c * ratio)
        sd[f"layers.{i}.Relpos.angle"] = (1.0 / 10000 ** torch.linspace(0, 1, hd // 2)).repeat_interleave(2)
        if name.startswith("rmt"):
            heads_index = torch.arange(h, dtype=torch.float)
            sd[f"layers.{i}.Relpos.decay"] = torch.log(1 - 2 ** (-2 - ranges[i] * heads_index / h))
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            sd |= {p + "pos.conv.weight": rand(c, 1, 3, 3), p + "pos.conv.bias": rand(c)}
            for norm in ("retention_layer_norm", "final_layer_norm"):
                sd |= {p + f"{norm}.weight": rand(c), p + f"{norm}.bias": rand(c)}
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                sd |= {p + f"retention.{proj}.weight": rand(c, c), p + f"retention.{proj}.bias": rand(c)}
            sd |= {p + "retention.lepe.conv.weight": rand(c, 1, 5, 5), p + "retention.lepe.conv.bias": rand(c)}
            if name.startswith("ppma"):
                sd[p + "retention.path_embed.dt_linear.weight"] = rand(2, hd)
                sd[p + "retention.path_embed.dt_bias"] = rand(h)
                sd[p + "retention.path_embed.A_log"] = rand(h)
            sd |= {p + "ffn.fc1.weight": rand(hidden, c), p + "ffn.fc1.bias": rand(hidden)}
            sd |= {p + "ffn.fc2.weight": rand(c, hidden), p + "ffn.fc2.bias": rand(c)}
            sd |= {p + "ffn.dwconv.conv.weight": rand(hidden, 1, 3, 3), p + "ffn.dwconv.conv.bias": rand(hidden)}
            if i in ls_stages:
                sd |= {p + "gamma_1": rand(1, 1, 1, c), p + "gamma_2": rand(1, 1, 1, c)}
        if i + 1 < len(dims):
            sd[f"layers.{i}.downsample.reduction.weight"] = rand(dims[i + 1], c, 3, 3)
            sd[f"layers.{i}.downsample.reduction.bias"] = rand(dims[i + 1])
            sd |= bn(f"layers.{i}.downsample.norm", dims[i + 1])
    sd |= {"proj.weight": rand(1024, dims[-1]), "proj.bias": rand(1024)} | bn("norm", 1024)
    sd |= {"head.weight": rand(1000, 1024), "head.bias": rand(1000)}
    return sd


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts_and_official_key_layout(name):
    """Exactly the official parameter count (the published one in whole millions), and every official tensor maps
    onto one of the model's with its shape (strict load on the meta device)."""
    model = timm.create_model(name, device="meta")
    count = sum(p.numel() for p in model.parameters())
    assert count == PARAMS[name]
    assert round(count / 1e6) == PUBLISHED_PARAMS_M[name]
    official = _official_state_dict(name, device="meta")
    model.load_state_dict(checkpoint_filter_fn(official, model), strict=True, assign=True)


# GMACs at 224 px: PPMA-T as published (README 2.7G); RMT-T as fvcore counts the official RMT_T3 (2.65G with 0.013G of
# norms that our counter leaves out) — the README's 2.5G is not what the official code computes.
GMACS = {"ppma_tiny": 2.7, "rmt_tiny": 2.65}


@pytest.mark.parametrize("name", sorted(GMACS))
def test_macs_match_the_official_models(name):
    model = timm.create_model(name, device="meta").eval()
    macs, _ = count_macs(model, torch.empty(1, 3, 224, 224, device="meta"))
    assert macs / 1e9 == pytest.approx(GMACS[name], rel=0.02)


@torch.no_grad()
def test_official_ppma_training_checkpoint_converts(tmp_path, capsys):
    """The DeiT-style training pickle of PPMA:classification/main.py (``{"models", "model_ema", "args", ...}``)
    through ``attnzoo convert`` (the ``pretrained_cfg_overlay=dict(file=...)`` path, strict)."""
    official = _official_state_dict("ppma_tiny")
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in official.items()}
    checkpoint = {"models": official, "model_ema": ema, "epoch": 299, "args": argparse.Namespace(model="PPMAViT_T")}
    torch.save(checkpoint, tmp_path / "best.pth")
    out = tmp_path / "converted"
    assert main(["convert", "--model", "ppma_tiny", "--src", str(tmp_path / "best.pth"), "--out", str(out)]) == 0
    assert "local-dir:" in capsys.readouterr().out
    state = timm.create_model(f"local-dir:{out}", pretrained=True).state_dict()
    p, a = "layers.2.blocks.5.retention.", "stages.2.blocks.5.attn."
    qkv = torch.cat([official[p + "q_proj.weight"], official[p + "k_proj.weight"], official[p + "v_proj.weight"]])
    torch.testing.assert_close(state[a + "qkv.weight"], qkv)
    torch.testing.assert_close(state[a + "dt_proj.weight"], official[p + "path_embed.dt_linear.weight"])
    torch.testing.assert_close(state[a + "A_log"], official[p + "path_embed.A_log"])
    torch.testing.assert_close(state["stages.3.downsample.norm.bias"], official["layers.2.downsample.norm.bias"])
    torch.testing.assert_close(state["stem.proj.10.weight"], official["patch_embed.proj.10.weight"])
    torch.testing.assert_close(state["head.proj.weight"], official["proj.weight"])
    torch.testing.assert_close(state["head.norm.running_mean"], official["norm.running_mean"])
    torch.testing.assert_close(state["head.fc.weight"], official["head.weight"])


def test_official_rmt_checkpoint_with_layer_scale_and_decay_check(tmp_path):
    depths = (1, 1, 2, 1)
    official = _official_state_dict("rmt_tiny", layer_scale_stages=(2, 3), depths=depths)
    torch.save({"model": official}, tmp_path / "rmt.pth")
    kwargs = dict(depths=depths, layer_scale_init_values=(None, None, 1e-6, 1e-6))
    overlay = dict(file=str(tmp_path / "rmt.pth"))
    model = timm.create_model("rmt_tiny", pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)  # strict
    gamma = official["layers.2.blocks.1.gamma_2"].flatten()
    torch.testing.assert_close(model.state_dict()["stages.2.blocks.1.ls2.gamma"], gamma)
    with pytest.raises(ValueError, match="decays"):
        timm.create_model(
            "rmt_tiny", pretrained=True, pretrained_cfg_overlay=overlay, heads_ranges=(4, 4, 6, 5), **kwargs
        )
    with pytest.raises(ValueError, match="no Manhattan attention"):
        timm.create_model("ppma_tiny", pretrained=True, pretrained_cfg_overlay=overlay, depths=depths)


@pytest.mark.parametrize("name", ["rmt_tiny", "ppma_tiny"])
@torch.no_grad()
def test_odd_input_sizes(name):
    model = timm.create_model(name, depths=(1, 1, 2, 1), num_classes=3).eval()
    x = torch.randn(1, 3, 97, 131)
    final, maps = model.forward_intermediates(x)
    assert [tuple(m.shape[-2:]) for m in maps] == [(25, 33), (13, 17), (7, 9), (4, 5)]
    logits = model.forward_head(final)
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()
    assert model.forward_head(final, pre_logits=True).shape == (1, 1024)


def test_detection_backbone():
    backbone = build_backbone("ppma_tiny", depths=(1, 1, 1, 1)).eval()
    with torch.no_grad():
        levels = backbone(torch.randn(1, 3, 96, 160))
    assert [tuple(m.shape) for m in levels.values()] == [
        (1, 256, math.ceil(96 / s), math.ceil(160 / s)) for s in (4, 8, 16, 32, 64)
    ]


def test_ppma_downstream_backbone_output_norms_and_official_layout():
    """``out_norms=True`` is the official PPMA detection backbone: a LayerNorm (eps 1e-5) on each returned map only
    (``outnorm{i}`` in its checkpoints); the classification weights load with the new norms named, the detection
    backbone's ``outnorm{i}`` keys map strictly onto them."""
    depths = (1, 1, 1, 1)
    plain = timm.create_model("ppma_tiny", depths=depths, features_only=True).eval()
    normed = timm.create_model("ppma_tiny", depths=depths, features_only=True, out_norms=True).eval()
    state = {k: v for k, v in normed.state_dict().items() if "out_norms" not in k}
    plain.load_state_dict(state, strict=True)
    for norm in normed.model.out_norms:
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        raw, out = plain(x), normed(x)
    for i, (r, o) in enumerate(zip(raw, out)):
        norm = normed.model.out_norms[i]
        expected = F.layer_norm(r.permute(0, 2, 3, 1), r.shape[1:2], norm.weight, norm.bias, eps=1e-5)
        torch.testing.assert_close(o, expected.permute(0, 3, 1, 2))

    official = _official_state_dict("ppma_tiny", depths=depths)
    backbone = {k: v for k, v in official.items() if not k.startswith(("proj.", "norm.", "head."))}
    widths = (64, 128, 256, 512)
    backbone |= {f"outnorm{i}.{p}": torch.randn(c) for i, c in enumerate(widths) for p in ("weight", "bias")}
    converted = convert_backbone_state("ppma_tiny", backbone, normed)
    normed.load_state_dict(converted, strict=True)
    torch.testing.assert_close(normed.model.out_norms[2].bias, backbone["outnorm2.bias"])
    with pytest.raises(ValueError, match="out_norms=True"):
        convert_backbone_state("ppma_tiny", backbone, plain)


@torch.no_grad()
def test_official_ppma_upernet_checkpoint_converts_to_identical_logits(tmp_path):
    """A released PPMA UperNet checkpoint (mmseg layout: PPMA:segmentation/ppma.py's backbone, i.e. the classification
    keys less ``head`` / ``norm`` / ``proj`` plus ``outnorm0..3``, and mmseg's head names) converts key for key for the
    shipped ``upernet_ppma_tiny_160k`` config and gives the logits of the same tensors loaded by hand."""
    config = yaml.safe_load((CONFIG_DIR / "ade20k" / "upernet_ppma_tiny_160k.yaml").read_text())["model"]
    config = {**config, "pretrained_backbone": False}
    torch.manual_seed(0)
    reference = SemanticSegmenter(**config).eval()
    g = torch.Generator().manual_seed(1)
    backbone = {
        k: v for k, v in _official_state_dict("ppma_tiny").items() if not k.startswith(("head.", "norm.", "proj."))
    }
    for i, width in enumerate((64, 128, 256, 512)):
        backbone[f"outnorm{i}.weight"] = torch.rand(width, generator=g) + 0.5
        backbone[f"outnorm{i}.bias"] = torch.randn(width, generator=g)
    state = {f"backbone.{k}": v for k, v in backbone.items()}
    for name, tensor in reference.model.state_dict().items():
        if name.startswith(("decode_head.", "auxiliary_head.")) and tensor.is_floating_point():
            state[name] = torch.rand(tensor.shape, generator=g) + (0.5 if "running_var" in name else -0.5)
        elif name.startswith(("decode_head.", "auxiliary_head.")):
            state[name] = tensor
    torch.save({"meta": {}, "state_dict": state}, tmp_path / "iter_160000.pth")
    converted = SemanticSegmenter(**config).eval()
    converted.load_state_dict(map_state_dict(converted, load_state_dict_file(tmp_path / "iter_160000.pth")))
    body = reference.model.backbone.body.model  # by hand: the family's filter, the head names as they are
    body.load_state_dict(checkpoint_filter_fn(backbone, body), strict=True)
    for head in ("decode_head", "auxiliary_head"):
        part = {k[len(head) + 1 :]: v for k, v in state.items() if k.startswith(head + ".")}
        getattr(reference.model, head).load_state_dict(part, strict=True)
    images = torch.rand(1, 3, 64, 96, generator=g)
    expected = reference(images)
    assert expected.shape == (1, 150, 64, 96) and expected.std() > 0
    torch.testing.assert_close(converted(images), expected, rtol=0, atol=0)
