"""NAT / DiNAT: official parameter counts, any input size, official and Hugging Face checkpoint layouts, training.

The timm API contract of every variant is checked by tests/test_timm_contract.py."""

import pytest
import timm
import torch

import attnzoo  # noqa: F401  (registers the models)
from attnzoo.nat import checkpoint_filter_fn

# Official parameter counts (NAT:classification/README, DiNAT paper); DiNAT-Small has no layer scale.
PARAMS = {
    "nat_mini": 19_984_174,
    "nat_tiny": 27_901_582,
    "nat_small": 50_743_297,
    "nat_base": 89_769_652,
    "dinat_mini": 19_984_174,
    "dinat_tiny": 27_901_582,
    "dinat_small": 50_719_681,
    "dinat_base": 89_769_652,
    "dinat_large": 200_943_514,  # published "200M"; the official 804 MB float32 file (Hub) holds ~201M
}
PUBLISHED_M = {"nat_mini": 19.98, "nat_tiny": 27.90, "nat_small": 50.74, "nat_base": 89.77, "dinat_small": 50.72}
OFFICIAL = {  # depths, heads, embed dim, mlp ratio, layer scale
    "nat_mini": ((3, 4, 6, 5), (2, 4, 8, 16), 64, 3, False),
    "dinat_mini": ((3, 4, 6, 5), (2, 4, 8, 16), 64, 3, False),
    "dinat_small": ((3, 4, 18, 5), (3, 6, 12, 24), 96, 2, False),
    "dinat_large": ((3, 4, 18, 5), (6, 12, 24, 48), 192, 2, False),  # NAT:classification/dinat.py
}
LAYER_SCALE = ((3, 4, 6, 5), (2, 4, 8, 16), 64, 3, True)  # NAT-Mini with NAT-S/B's layer scale (gamma1 / gamma2)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts_match_official(name):
    model = timm.create_model(name, device="meta")
    count = sum(p.numel() for p in model.parameters())
    assert count == PARAMS[name]
    if name in PUBLISHED_M:
        assert round(count / 1e6, 2) == PUBLISHED_M[name]


def test_dinat_dilations_and_cfg():
    model = timm.create_model("dinat_tiny", device="meta")
    dilations = [[block.attn.dilation[0] for block in stage.blocks] for stage in model.stages]
    assert dilations == [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]
    assert all(block.attn.rpb.shape[-2:] == (13, 13) for stage in model.stages for block in stage.blocks)
    cfg = model.pretrained_cfg
    assert cfg["url"] == "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_tiny_in1k_224.pth"
    assert (cfg["license"], cfg["paper_ids"], cfg["crop_pct"], cfg["interpolation"]) == (
        "mit",
        "arXiv:2209.15001",
        0.875,
        "bicubic",
    )
    nat_cfg = timm.create_model("nat_tiny", device="meta").pretrained_cfg
    assert nat_cfg["url"] == "https://shi-labs.com/projects/nat/checkpoints/CLS/nat_tiny.pth"
    assert nat_cfg["paper_ids"] == "arXiv:2204.07143"


@pytest.mark.parametrize("name", ["nat_tiny", "dinat_tiny"])
def test_any_input_size(name):
    """224 / 256 / 320 px and a 64x96 map (stage maps 16x24 ... 2x3: dilations clamped, kernels padded)."""
    model = timm.create_model(name).eval()
    with torch.no_grad():
        for size in [(224, 224), (256, 256), (320, 320), (64, 96)]:
            out = model.forward_features(torch.randn(1, 3, *size))
            assert out.shape == (1, -(-size[0] // 32), -(-size[1] // 32), 512)
            assert torch.isfinite(out).all()


def _official_state_dict(
    config: tuple, seed: int = 0, kernel_size: int = 7, num_classes: int = 1000, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Random tensors under the official NAT / DiNAT key names and shapes (NAT:classification/nat.py); on the meta
    device only the shapes."""
    depths, heads, dim, mlp_ratio, layer_scale = config
    g = torch.Generator().manual_seed(seed)
    rpb = 2 * kernel_size - 1

    def rand(*shape):
        return torch.empty(*shape, device="meta") if device == "meta" else torch.randn(*shape, generator=g)

    sd = {
        "patch_embed.proj.0.weight": rand(dim // 2, 3, 3, 3),
        "patch_embed.proj.0.bias": rand(dim // 2),
        "patch_embed.proj.1.weight": rand(dim, dim // 2, 3, 3),
        "patch_embed.proj.1.bias": rand(dim),
        "patch_embed.norm.weight": rand(dim),
        "patch_embed.norm.bias": rand(dim),
    }
    for i, (depth, n) in enumerate(zip(depths, heads)):
        c = dim * 2**i
        for j in range(depth):
            p = f"levels.{i}.blocks.{j}."
            sd.update(
                {
                    p + "norm1.weight": rand(c),
                    p + "norm1.bias": rand(c),
                    p + "attn.rpb": rand(n, rpb, rpb),
                    p + "attn.qkv.weight": rand(3 * c, c),
                    p + "attn.qkv.bias": rand(3 * c),
                    p + "attn.proj.weight": rand(c, c),
                    p + "attn.proj.bias": rand(c),
                    p + "norm2.weight": rand(c),
                    p + "norm2.bias": rand(c),
                    p + "mlp.fc1.weight": rand(mlp_ratio * c, c),
                    p + "mlp.fc1.bias": rand(mlp_ratio * c),
                    p + "mlp.fc2.weight": rand(c, mlp_ratio * c),
                    p + "mlp.fc2.bias": rand(c),
                }
            )
            if layer_scale:
                sd.update({p + "gamma1": rand(c), p + "gamma2": rand(c)})
        if i < len(depths) - 1:
            sd[f"levels.{i}.downsample.reduction.weight"] = rand(2 * c, c, 3, 3)
            sd[f"levels.{i}.downsample.norm.weight"] = rand(2 * c)
            sd[f"levels.{i}.downsample.norm.bias"] = rand(2 * c)
    c = dim * 2 ** (len(depths) - 1)
    sd.update({"norm.weight": rand(c), "norm.bias": rand(c)})
    sd.update({"head.weight": rand(num_classes, c), "head.bias": rand(num_classes)})
    return sd


@pytest.mark.parametrize("name", ["nat_mini", "dinat_mini"])
def test_official_checkpoint_file_loads(name, tmp_path):
    """An official-layout file loads through timm's pretrained path with no missing / unexpected keys."""
    official = _official_state_dict(OFFICIAL[name])
    path = tmp_path / f"{name}.pth"
    torch.save(official, path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))  # strict load
    state = model.state_dict()
    torch.testing.assert_close(state["stem.proj.1.weight"], official["patch_embed.proj.1.weight"])
    torch.testing.assert_close(
        state["stages.1.downsample.reduction.weight"], official["levels.0.downsample.reduction.weight"]
    )
    torch.testing.assert_close(state["stages.2.blocks.3.attn.rpb"], official["levels.2.blocks.3.attn.rpb"])
    torch.testing.assert_close(state["head.fc.weight"], official["head.weight"])


def test_official_layer_scale_and_wrapped_checkpoint():
    official = _official_state_dict(LAYER_SCALE)
    model = timm.create_model("nat_mini", layer_scale=1e-5, device="meta")
    converted = checkpoint_filter_fn({"model": official, "epoch": 300}, model)
    result = model.load_state_dict(converted, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(model.stages[3].blocks[4].ls2.gamma, official["levels.3.blocks.4.gamma2"])


# Official DiNAT-L checkpoints (NAT:classification/dinat.py, DiNAT.md): tag -> file, kernel, dilations of the dilated
# blocks per stage, classes, drop path, eval size / crop, params
_DINAT_224 = [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]
_DINAT_384 = [[1, 13, 1], [1, 6, 1, 6], [1, 3] * 9, [1] * 5]
_IN1K, _IN22K = "imagenet1k/dinat_large_in22k_in1k_", "imagenet22k/dinat_large_in22k_"
DINAT_LARGE = {
    "in22k_ft_in1k": (_IN1K + "224", 7, _DINAT_224, 1000, 0.35, 224, 0.875, 200_943_514),
    "in22k_ft_in1k_384": (_IN1K + "384", 7, _DINAT_384, 1000, 0.35, 384, 1.0, 200_943_514),
    "in22k_ft_in1k_384_k11": (_IN1K + "384_11x11", 11, _DINAT_224, 1000, 0.35, 384, 1.0, 201_144_250),
    "in22k": (_IN22K + "224", 7, _DINAT_224, 21841, 0.2, 224, 0.875, 232_976_131),
    "in22k_k11": (_IN22K + "224_11x11interp", 11, _DINAT_224, 21841, 0.2, 224, 0.875, 233_176_867),
}


@pytest.mark.parametrize("tag", sorted(DINAT_LARGE))
def test_dinat_large_tags_build_the_official_models(tag):
    """Each pretrained tag builds its checkpoint's architecture, and its official-layout file loads strictly."""
    file, kernel, dilations, classes, drop_path, size, crop, params = DINAT_LARGE[tag]
    model = timm.create_model(f"dinat_large.{tag}", device="meta")
    blocks = [block for stage in model.stages for block in stage.blocks]
    assert [[block.attn.dilation[0] for block in stage.blocks] for stage in model.stages] == dilations
    assert {block.attn.kernel_size for block in blocks} == {(kernel, kernel)}
    assert model.num_classes == classes
    assert blocks[-1].drop_path1.drop_prob == pytest.approx(drop_path)  # the official rate of that training run
    assert not any(name.endswith("gamma") for name, _ in model.named_parameters())  # no layer scale
    cfg = model.pretrained_cfg
    assert cfg["url"] == f"https://shi-labs.com/projects/dinat/checkpoints/{file}.pth"
    assert (cfg["input_size"], cfg["crop_pct"], cfg["num_classes"]) == ((3, size, size), crop, classes)
    assert cfg["pool_size"] == (size // 32, size // 32)

    official = _official_state_dict(OFFICIAL["dinat_large"], kernel_size=kernel, num_classes=classes, device="meta")
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in official.values()) == params
    model.load_state_dict(checkpoint_filter_fn(official, model), strict=True, assign=True)  # raises on any mismatch


def test_dinat_large_dilations_per_resolution():
    """The 384 px checkpoint's dilations (side // 7 of the 96/48/24 maps) clamp back to the 224 px ones on 224 px
    maps, so it runs at 224 like the 224 px model; the 224 px model keeps its small dilations at 384 px."""
    model_384 = timm.create_model("dinat_large.in22k_ft_in1k_384", device="meta")
    model_224 = timm.create_model("dinat_large", device="meta")

    def effective(model, image_size):
        sides = [image_size // 4 // 2**i for i in range(4)]
        return [[b.attn.effective_dilation(s, s)[0] for b in stage.blocks] for stage, s in zip(model.stages, sides)]

    assert effective(model_384, 384) == _DINAT_384
    assert effective(model_384, 224) == effective(model_224, 224) == _DINAT_224
    assert effective(model_224, 384) == _DINAT_224


def test_dinat_large_kernel_11_file_loads_through_timm(tmp_path):
    """timm's pretrained path with a ``*_k11`` tag builds 11x11 neighborhoods, so an official file with 21x21 RPB
    tables loads strictly (a narrow, shallow DiNAT-L keeps the file small); explicit kwargs override the tag."""
    config = ((1, 1, 2, 1), (1, 2, 4, 8), 32, 2, False)
    official = _official_state_dict(config, kernel_size=11)
    path = tmp_path / "dinat_large_k11.pth"
    torch.save(official, path)
    model = timm.create_model(
        "dinat_large.in22k_ft_in1k_384_k11",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
        depths=config[0],
        num_heads=config[1],
        embed_dim=config[2],
        dilations=[[2], [2], [1, 2], [1]],
    ).eval()
    assert model.stages[2].blocks[1].attn.kernel_size == (11, 11)
    torch.testing.assert_close(model.stages[2].blocks[1].attn.rpb, official["levels.2.blocks.1.attn.rpb"])
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 96))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def _to_hugging_face(official: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The same weights under transformers' NatForImageClassification / DinatForImageClassification names."""
    hf = {}
    for key, value in official.items():
        key = key.replace("patch_embed.proj.", "embeddings.patch_embeddings.projection.")
        key = key.replace("patch_embed.norm.", "embeddings.norm.").replace(".blocks.", ".layers.")
        for old, new in [
            ("norm1.", "layernorm_before."),
            ("norm2.", "layernorm_after."),
            ("attn.rpb", "attention.self.rpb"),
            ("attn.proj.", "attention.output.dense."),
            ("mlp.fc1.", "intermediate.dense."),
            ("mlp.fc2.", "output.dense."),
        ]:
            key = key.replace(old, new)
        if key.startswith("head."):
            hf["classifier." + key[5:]] = value
            continue
        if key.startswith("norm."):
            key = "layernorm." + key[5:]
        elif key.startswith("levels."):
            key = "encoder." + key
        if ".attn.qkv." in key:
            for part, chunk in zip(("query", "key", "value"), value.chunk(3)):
                hf[prefix + key.replace("attn.qkv.", f"attention.self.{part}.")] = chunk
        elif key.endswith("gamma1"):
            hf[prefix + key.replace("gamma1", "layer_scale_parameters")] = torch.stack(
                [value, official[key.replace("encoder.", "").replace(".layers.", ".blocks.")[:-1] + "2"]]
            )
        elif not key.endswith("gamma2"):
            hf[prefix + key] = value
    return hf


@pytest.mark.parametrize(
    ("name", "config", "kwargs", "prefix"),
    [
        ("nat_mini", LAYER_SCALE, dict(layer_scale=1e-5), "nat."),
        ("dinat_small", OFFICIAL["dinat_small"], {}, "dinat."),
    ],
)
def test_hugging_face_layout_loads(name, config, kwargs, prefix):
    official = _official_state_dict(config)
    model = timm.create_model(name, device="meta", **kwargs)
    from_official = checkpoint_filter_fn(official, model)
    from_hf = checkpoint_filter_fn(_to_hugging_face(official, prefix), model)
    assert from_hf.keys() == from_official.keys() == model.state_dict().keys()
    for key, value in from_official.items():
        torch.testing.assert_close(from_hf[key], value, msg=key)


def test_tiny_nat_trains():
    torch.manual_seed(0)
    model = timm.create_model(
        "dinat_mini",
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 4, 8),
        embed_dim=32,
        dilations=[[2], [2], [1, 2], [1]],
        num_classes=4,
        drop_path_rate=0.0,
    )
    x, y = torch.randn(8, 3, 64, 64), torch.arange(8) % 4
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(p.grad is not None for p in model.parameters())
