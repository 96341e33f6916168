"""The timm contract: every model in ``attnzoo.list_models()`` must pass timm's own model checks.

Modelled on timm's ``tests/test_models.py`` (Apache-2.0): forward / backward, default cfgs and the model API the
optimizer factory and ``create_model`` rely on, ``features_only`` wrappers, ``forward_intermediates``,
``prune_intermediate_layers``, TorchScript and ``torch.compile``. Every test is parametrized over the registry, so a
newly registered model is checked without touching this file.

Two kinds of models are handled, told apart by the rank of ``forward_features``' output:

* maps (4-D, ``output_fmt`` attribute ``"NHWC"`` or default ``"NCHW"``): hierarchical backbones, checked like timm's
  standard models (``pool_size`` in the cfg, ``global_pool=''`` keeps the map);
* token sequences (3-D, ``(B, N, C)``): plain ViTs, checked like timm's "non-std" models.

Structural checks run on the meta device (no weights allocated, cheap for every size); numerical checks run on CPU at
small input sizes chosen like timm's ``_get_input_size`` (honouring ``fixed_input_size`` / ``min_input_size``).
Documented exclusion: a model class with ``supports_torchscript = False`` (its docstring says why) skips the TorchScript
check. Beyond timm's checks: every model switches its head to attention pooling (SimPool, efficient probing) and
back (``reset_classifier``, on the meta device), and plain ViTs take image sides that are not multiples of their
patch.

The two most expensive dynamic checks — the prune contract and ``torch.compile`` — run on one representative per
architecture, the smallest size (``nat_tiny`` shares every code path of ``nat_mini`` but depth and width; models at
another resolution with other windows or tables, e.g. ``agent_swin_base_384``, are architectures of their own);
``ATTNZOO_TEST_FULL=1`` runs them on every model. Every other check runs on every model, except in the families of
``SMALLEST_SIZE_ONLY`` (RMT, PPMA), whose larger sizes run no check here unless ``ATTNZOO_TEST_FULL=1``; RMT and PPMA
(one network class, two token mixers) share one representative for the heavy checks (``SAME_ARCHITECTURE``).
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import math
import os
import re

import pytest
import timm
import torch
from timm import create_model
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import FeatureInfo, get_pretrained_cfg
from timm.models._manipulate import group_parameters

import attnzoo

SIZE_ORDER = ("mini", "tiny", "small", "medium", "base", "large", "huge")


def _smallest_per_architecture(names: list[str], aliases: dict[str, str] | None = None) -> list[str]:
    """One model per architecture (the name without its size word; ``aliases`` maps an architecture onto another
    one), the smallest size first in ``SIZE_ORDER``."""
    size_pattern = re.compile(r"_(" + "|".join(SIZE_ORDER) + r")(?=_|$)")
    chosen: dict[str, tuple[int, str]] = {}
    for name in names:
        match = size_pattern.search(name)
        architecture = size_pattern.sub("", name, count=1)
        architecture = (aliases or {}).get(architecture, architecture)
        rank = SIZE_ORDER.index(match.group(1)) if match else -1
        if architecture not in chosen or rank < chosen[architecture][0]:
            chosen[architecture] = (rank, name)
    return sorted(name for _, name in chosen.values())


# Families whose larger sizes only add depth and width to the smallest one's code paths run the whole contract on the
# smallest size (their other sizes: parameter counts, key layouts and MACs in their own test files); the budget of the
# CI suite does not allow RMT-L at 224 px through every check. ATTNZOO_TEST_FULL=1 runs every size.
SMALLEST_SIZE_ONLY = ("rmt_", "ppma_")
# RMT and PPMA are one network class with another token mixer: the heavy checks run on PPMA (the mixers' own
# torch.compile checks are in test_decay_masks.py)
SAME_ARCHITECTURE = {"rmt": "ppma"}
_ALL_MODELS = attnzoo.list_models()
_SMALLEST = set(_smallest_per_architecture(_ALL_MODELS))
MODELS = [
    name
    for name in _ALL_MODELS
    if os.environ.get("ATTNZOO_TEST_FULL") or not name.startswith(SMALLEST_SIZE_ONLY) or name in _SMALLEST
]
HEAVY_CHECK_MODELS = (
    MODELS if os.environ.get("ATTNZOO_TEST_FULL") else _smallest_per_architecture(MODELS, SAME_ARCHITECTURE)
)
# token-sequence models (no pool_size in the cfg), one per architecture
PLAIN_VIT_MODELS = [name for name in HEAVY_CHECK_MODELS if get_pretrained_cfg(name).pool_size is None]

# input size targets (timm: TARGET_*_SIZE / MAX_*_SIZE); a fixed_input_size model above the max is skipped
TARGET_FWD_SIZE = 224
TARGET_BWD_SIZE = 128
TARGET_FFEAT_SIZE = 128
TARGET_JIT_SIZE = 128
TARGET_PRUNE_SIZE = 96  # timm's TARGET_FFEAT_SIZE
TARGET_COMPILE_SIZE = 64
MAX_FWD_SIZE = 384
MAX_BWD_SIZE = 320
MAX_JIT_SIZE = 320
MAX_FFEAT_SIZE = 256
MAX_FWD_OUT_SIZE = 448  # default cfg sizes above this skip the output-shape checks of the cfg test
MAX_PRUNE_INDICES = 6  # models with more feature taps (plain ViTs: one per block) prune at a representative subset

CFG_DEVICE = "meta"  # structural checks allocate no weights

# torch.compile backend: "aot_eager" traces through dynamo + AOTAutograd like inductor does, without inductor's C++
# codegen (gated_vit_tiny on 2 CPU cores: ~4 s with aot_eager, ~21 s with a cold inductor cache); set
# ATTNZOO_TEST_COMPILE_BACKEND=inductor to check inductor's codegen too
COMPILE_BACKEND = os.environ.get("ATTNZOO_TEST_COMPILE_BACKEND", "aot_eager")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _get_input_size(model: torch.nn.Module, target: int | None = None) -> tuple[int, ...]:
    """timm's ``_get_input_size``: the cfg size, shrunk to ``target`` unless fixed (or down to ``min_input_size``)."""
    cfg = model.pretrained_cfg
    input_size = tuple(cfg["input_size"])
    if cfg.get("fixed_input_size", False):
        return input_size
    min_input_size = cfg.get("min_input_size", None)
    if target and max(input_size) > target:
        input_size = tuple(min_input_size) if min_input_size else tuple(min(x, target) for x in input_size)
    return input_size


def _skip_if_too_large(input_size: tuple[int, ...], limit: int) -> None:
    if max(input_size) > limit:
        pytest.skip(f"fixed input size {input_size} > {limit}")


def _meta_model(model_name: str, **kwargs) -> torch.nn.Module:
    with torch.device(CFG_DEVICE):
        return create_model(model_name, pretrained=False, device=CFG_DEVICE, dtype=torch.float32, **kwargs).eval()


def _map_axes(output_fmt) -> tuple[int, tuple[int, ...]]:
    """(channel axis, spatial axes) of a 4-D feature map in ``output_fmt``."""
    return get_channel_dim(output_fmt), get_spatial_dim(output_fmt)


def _assert_feature_maps(outputs, channels, reductions, input_size, batch_size, output_fmt, check_lower=True):
    """Feature maps have the expected widths and a spatial size plausible for their reduction (as timm checks)."""
    assert len(outputs) == len(channels), f"{len(outputs)} feature maps, feature_info has {len(channels)}"
    feat_axis, spatial_axis = _map_axes(output_fmt)
    spatial_size = input_size[-2:]
    for i, (c, r, o) in enumerate(zip(channels, reductions, outputs)):
        assert o.ndim == 4, f"feature {i}: expected a 4-D map, got shape {tuple(o.shape)}"
        assert o.shape[0] == batch_size
        assert o.shape[feat_axis] == c, f"feature {i}: {o.shape[feat_axis]} channels, feature_info says {c}"
        for axis, size in zip(spatial_axis, spatial_size):
            assert o.shape[axis] <= math.ceil(size / r) + 1, f"feature {i}: {tuple(o.shape)} too large for r={r}"
            if check_lower:  # catch feature_info reductions that are off by 2x or more
                assert o.shape[axis] > size / (2 * r), f"feature {i}: {tuple(o.shape)} too small for r={r}"
        assert not torch.isnan(o).any(), f"feature {i} has NaNs"


# --- helpers of the cfg / API contract test (timm's _assert_* helpers) ---


def _assert_model_api_contract(model, model_name):
    """The parts of the model API the optimizer factory and model creation rely on."""
    # unknown constructor args must raise, not be silently ignored
    with torch.device(CFG_DEVICE), pytest.raises(TypeError):
        create_model(model_name, pretrained=False, device=CFG_DEVICE, not_a_model_arg=1)

    # reset_classifier keeps the current pooling by default
    param = inspect.signature(model.reset_classifier).parameters.get("global_pool")
    if param is not None:
        assert param.default is None, f"reset_classifier global_pool default is {param.default!r}, not None"

    # group_matcher() / no_weight_decay() must match the model's params
    param_names = [n for n, _ in model.named_parameters()]
    assert hasattr(model, "group_matcher"), "model has no group_matcher() (layer-wise lr decay)"
    groups = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    assert len(set(groups.values())) > 1, "group_matcher() puts all params in a single group"
    if hasattr(model, "no_weight_decay"):
        for pattern in model.no_weight_decay():
            if any(fnmatch.fnmatch(n, pattern) for n in param_names):
                continue
            # an optional param (e.g. a class or distillation token) may be listed when this config lacks it
            obj = model
            for attr in pattern.split("."):
                obj = getattr(obj, attr, None)
                if obj is None:
                    break
            assert obj is None, f"no_weight_decay() entry {pattern!r} matches no parameter"


def _assert_cfg_names(model):
    """The cfg's ``classifier`` and ``first_conv`` name real weights."""
    cfg = model.pretrained_cfg
    state_dict = model.state_dict()
    if cfg.get("num_classes", None):
        classifier = cfg["classifier"]
        for c in (classifier,) if isinstance(classifier, str) else classifier:
            assert c + ".weight" in state_dict, f"cfg classifier {c!r} not in model params"
    first_conv = cfg["first_conv"]
    first_conv = (first_conv,) if isinstance(first_conv, str) else first_conv
    assert isinstance(first_conv, (tuple, list))
    for fc in first_conv:
        assert fc + ".weight" in state_dict, f"cfg first_conv {fc!r} not in model params"


def _assert_reset_classifier_preserves_parent_device_dtype(model):
    model.to(device=CFG_DEVICE, dtype=torch.float64)
    expected = next(model.parameters())
    expected_training = model.training
    model.reset_classifier(0)
    model.reset_classifier(2)
    classifier = model.get_classifier()
    classifiers = classifier if isinstance(classifier, (tuple, list)) else (classifier,)
    params = [p for head in classifiers for p in head.parameters()]
    assert params, "get_classifier() has no parameters after reset_classifier(2)"
    assert all(p.device == expected.device for p in params), "reset_classifier() changed the head's device"
    assert all(p.dtype == expected.dtype for p in params), "reset_classifier() changed the head's dtype"
    assert all(m.training == expected_training for m in model.modules()), "reset_classifier() changed train/eval"


def _assert_factory_device(model_name):
    """``create_model(device=...)`` without a device context places every param and buffer on that device."""
    model = create_model(model_name, pretrained=False, device=CFG_DEVICE, dtype=torch.float32)
    expected = torch.device(CFG_DEVICE)
    misplaced = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device != expected]
    assert not misplaced, f"tensors not created on {expected}: {misplaced[:5]}"


def _assert_frozen_survives_reset_and_resize(model_name, reset_pool=True):
    """``reset_classifier(0, ...)`` and ``set_input_size()`` rebuild modules from weights; they must stay frozen."""
    model = create_model(model_name, pretrained=False, device=CFG_DEVICE, dtype=torch.float32)
    model.requires_grad_(False)
    model.reset_classifier(0)
    if reset_pool:
        model.reset_classifier(0, "")
    if callable(getattr(model, "set_input_size", None)):
        model.set_input_size(img_size=tuple(2 * s for s in model.pretrained_cfg["input_size"][-2:]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not trainable, f"frozen parameters became trainable: {trainable[:5]}"


def _assert_dtype_change_after_forward(model, input_tensor, dtype=torch.bfloat16):
    """Converting dtype after a forward must not leave stale caches or upcast activations."""
    model.to(dtype)
    output = model(input_tensor.to(dtype))
    if isinstance(output, (tuple, list)):
        output = output[0]
    assert output.dtype == dtype, f"output dtype {output.dtype} != {dtype} after .to({dtype})"
    model.to(torch.float32)


# --- the contract ---


@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward(model_name):
    """Eval forward gives finite (B, num_classes) logits; grad checkpointing doesn't change them."""
    batch_size = 2
    model = create_model(model_name, pretrained=False).eval()
    input_size = _get_input_size(model, TARGET_FWD_SIZE)
    _skip_if_too_large(input_size, MAX_FWD_SIZE)
    inputs = torch.randn((batch_size, *input_size))
    outputs = model(inputs)
    assert isinstance(outputs, torch.Tensor)
    assert outputs.shape == (batch_size, model.num_classes)
    assert torch.isfinite(outputs).all(), "output has NaN / inf"

    model.set_grad_checkpointing()
    outputs2 = model(inputs)
    torch.testing.assert_close(outputs2, outputs, rtol=1e-4, atol=1e-5, msg="grad checkpointing changed the output")


@pytest.mark.parametrize("model_name", MODELS)
def test_model_backward(model_name):
    """Train forward / backward with a new head: every parameter gets a gradient."""
    batch_size = 2
    model = create_model(model_name, pretrained=False, num_classes=42).train()
    input_size = _get_input_size(model, TARGET_BWD_SIZE)
    _skip_if_too_large(input_size, MAX_BWD_SIZE)
    outputs = model(torch.randn((batch_size, *input_size)))
    assert outputs.shape == (batch_size, 42)
    outputs.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:10]}"
    assert not torch.isnan(outputs).any(), "output has NaNs"


@pytest.mark.parametrize("model_name", MODELS)
def test_model_default_cfgs(model_name):
    """Cfg metadata, feature / head widths and the model API, on the meta device (timm's test_model_default_cfgs
    for feature-map models, test_model_default_cfgs_non_std for token-sequence models)."""
    batch_size = 1
    model = _meta_model(model_name)
    _assert_model_api_contract(model, model_name)
    assert model.num_classes >= 0
    assert model.num_features > 0
    assert model.head_hidden_size > 0
    cfg = model.pretrained_cfg
    assert model.in_chans == cfg["input_size"][0], f"in_chans {model.in_chans} != cfg input_size {cfg['input_size']}"
    _assert_cfg_names(model)

    input_size = tuple(cfg["input_size"])
    if max(input_size) > MAX_FWD_OUT_SIZE:
        _assert_reset_classifier_preserves_parent_device_dtype(model)
        pytest.skip(f"default input size {input_size} > {MAX_FWD_OUT_SIZE}, output shapes not checked")
    input_tensor = torch.randn((batch_size, *input_size), device=CFG_DEVICE)

    # forward_features is always unpooled; forward_head(pre_logits=True) is the pooled head input
    features = model.forward_features(input_tensor)
    pre_logits = model.forward_head(features, pre_logits=True)
    assert isinstance(features, torch.Tensor), "forward_features must return a tensor"
    assert features.ndim in (3, 4), f"forward_features output {tuple(features.shape)} is neither a map nor tokens"
    is_map = features.ndim == 4
    assert pre_logits.shape == (batch_size, model.head_hidden_size), (
        f"pre_logits {tuple(pre_logits.shape)} != (B, head_hidden_size={model.head_hidden_size})"
    )
    if is_map:
        feat_axis, spatial_axis = _map_axes(getattr(model, "output_fmt", "NCHW"))
        pool_size = cfg["pool_size"]
        assert pool_size is not None, "feature-map model without pool_size in its cfg"
        spatial = tuple(features.shape[a] for a in spatial_axis)
        assert spatial == tuple(pool_size), f"unpooled feature shape {tuple(features.shape)} != cfg pool_size"
    else:
        feat_axis = getattr(model, "feature_dim", None) or -1
    assert features.shape[feat_axis] == model.num_features, (
        f"unpooled feature dim {features.shape[feat_axis]} != num_features {model.num_features}"
    )
    _assert_dtype_change_after_forward(model, input_tensor)

    # forward w/o classifier is pooled to head_hidden_size
    model.reset_classifier(0)
    assert model.num_classes == 0, f"num_classes is {model.num_classes} after reset_classifier(0)"
    outputs = model(input_tensor)
    assert outputs.shape == pre_logits.shape, f"reset_classifier(0) output {tuple(outputs.shape)} != pre_logits"

    # every model switches its head to attention pooling (SimPool, efficient probing) and back to its own pooling
    own_pool = model.global_pool
    for attention_pool in ("simpool", "ep"):
        model.reset_classifier(3, attention_pool)
        assert model(input_tensor).shape == (batch_size, 3), f"reset_classifier(3, {attention_pool!r}) output shape"
    model.reset_classifier(0, own_pool)
    assert model(input_tensor).shape == pre_logits.shape, f"reset_classifier(0, {own_pool!r}) after attention pooling"

    if is_map:
        # w/o classifier and pooling the output is the unpooled map
        model.reset_classifier(0, "")
        outputs = model(input_tensor)
        assert outputs.ndim == 4, f"reset_classifier(0, '') output {tuple(outputs.shape)} is not a map"
        assert tuple(outputs.shape[a] for a in spatial_axis) == tuple(pool_size)

    # classifier (and pooling) removed through the constructor
    model = _meta_model(model_name, num_classes=0)
    outputs = model(input_tensor)
    assert outputs.shape == pre_logits.shape, f"num_classes=0 output {tuple(outputs.shape)} != pre_logits"
    assert outputs.shape[1] == model.head_hidden_size
    if not is_map:
        assert model.num_features == model.head_hidden_size
    if is_map:
        # explicit factory kwargs must also work without the device context
        model_np = create_model(
            model_name, pretrained=False, num_classes=0, global_pool="", device=CFG_DEVICE, dtype=torch.float32
        ).eval()
        outputs = model_np(input_tensor)
        assert outputs.ndim == 4, f"num_classes=0, global_pool='' output {tuple(outputs.shape)} is not a map"
        assert tuple(outputs.shape[a] for a in spatial_axis) == tuple(pool_size)

    _assert_reset_classifier_preserves_parent_device_dtype(model)
    _assert_factory_device(model_name)
    _assert_frozen_survives_reset_and_resize(model_name, reset_pool=is_map)


@pytest.mark.parametrize("feature_cls", [None, "getter"])
@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward_features(model_name, feature_cls):
    """``features_only=True`` with the model's default feature wrapper and with ``feature_cls='getter'``
    (FeatureGetterNet over forward_intermediates) gives >= 3 maps matching feature_info."""
    batch_size = 1
    kwargs = {"feature_cls": feature_cls} if feature_cls else {}
    model = create_model(model_name, pretrained=False, features_only=True, **kwargs).eval()
    channels = model.feature_info.channels()
    reductions = model.feature_info.reduction()
    assert len(channels) >= 3, f"only {len(channels)} default feature levels"
    input_size = _get_input_size(model, TARGET_FFEAT_SIZE)
    _skip_if_too_large(input_size, MAX_FFEAT_SIZE)
    outputs = model(torch.randn((batch_size, *input_size)))
    # as timm, the getter's lower bound on map sizes is not checked
    _assert_feature_maps(
        outputs,
        channels,
        reductions,
        input_size,
        batch_size,
        getattr(model, "output_fmt", "NCHW"),
        check_lower=feature_cls is None,
    )


@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward_intermediates(model_name):
    """``forward_intermediates`` returns one NCHW map per feature_info entry and the forward_features output."""
    batch_size = 1
    model = create_model(model_name, pretrained=False).eval()
    feature_info = FeatureInfo(model.feature_info, len(model.feature_info))
    channels = feature_info.channels()
    reductions = feature_info.reduction()
    assert len(channels) >= 3, f"only {len(channels)} feature levels"
    input_size = _get_input_size(model, TARGET_FFEAT_SIZE)
    _skip_if_too_large(input_size, MAX_FFEAT_SIZE)
    output_fmt = "NCHW"  # set by forward_intermediates' argument, not the model's attribute
    inputs = torch.randn((batch_size, *input_size))
    output, intermediates = model.forward_intermediates(inputs, output_fmt=output_fmt)
    _assert_feature_maps(intermediates, channels, reductions, input_size, batch_size, output_fmt, check_lower=False)
    torch.testing.assert_close(output, model.forward_features(inputs), rtol=1e-5, atol=1e-8)

    model.set_grad_checkpointing()
    output3, _ = model.forward_intermediates(inputs, output_fmt=output_fmt)
    torch.testing.assert_close(output3, output, rtol=1e-4, atol=1e-5, msg="grad checkpointing changed the output")


@pytest.mark.parametrize("model_name", PLAIN_VIT_MODELS)
def test_plain_vit_takes_sides_not_divisible_by_the_patch(model_name):
    """Plain ViTs zero-pad the image at the bottom/right to whole patches (timm's ``dynamic_img_pad``): a 200x232
    image gives the outputs of its zero-padded 208x240 version, on a 13x15 patch grid."""
    model = create_model(model_name, pretrained=False, depth=2, num_classes=3).eval()
    x = torch.randn(1, 3, 200, 232)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, model(torch.nn.functional.pad(x, (0, 8, 0, 8))))
        maps = model.forward_intermediates(x, intermediates_only=True)
    assert out.shape == (1, 3) and torch.isfinite(out).all()
    assert [tuple(m.shape[-2:]) for m in maps] == [(13, 15)] * 2


@pytest.mark.slow
@pytest.mark.parametrize("model_name", HEAVY_CHECK_MODELS)
def test_prune_intermediate_layers_contract(model_name):
    """Pruned / stop_early taps match the unpruned model's; pruned models keep their output w/ the head and train."""
    model = create_model(model_name, pretrained=False).eval()
    input_size = _get_input_size(model, TARGET_PRUNE_SIZE)
    _skip_if_too_large(input_size, MAX_FFEAT_SIZE)
    x = torch.randn((2, *input_size))
    last = len(model.feature_info) - 1
    # every stage of a hierarchical model; first / middle / last two taps of a plain ViT's identical blocks
    prune_indices = range(last + 1) if last < MAX_PRUNE_INDICES else sorted({0, last // 2, last - 1, last})

    with torch.no_grad():
        expected = model(x)
        taps = model.forward_intermediates(x, intermediates_only=True)
        pruned = copy.deepcopy(model)
        pruned.prune_intermediate_layers([last], prune_head=False)
        torch.testing.assert_close(pruned(x), expected, msg="prune_head=False at the last index changed the output")
        del pruned

    for i in prune_indices:
        with torch.no_grad():
            selected = model.forward_intermediates(x, indices=[i], stop_early=True, intermediates_only=True)
            torch.testing.assert_close(selected[0], taps[i], msg=f"stop_early tap {i}")

            pruned = copy.deepcopy(model)
            take_indices = pruned.prune_intermediate_layers([i])
            selected = pruned.forward_intermediates(x, indices=take_indices, intermediates_only=True)
            torch.testing.assert_close(selected[0], taps[i], msg=f"pruned tap {i}")

            # w/o the norm (as features_only), the features end at the tap
            pruned = copy.deepcopy(model)
            take_indices = pruned.prune_intermediate_layers([i], prune_norm=True)
            features = pruned.forward_features(x)
            if i < last and torch.is_tensor(features) and features.ndim == 4:
                if features.shape != taps[i].shape:
                    features = features.permute(0, 3, 1, 2)  # NHWC
                torch.testing.assert_close(features, taps[i], msg=f"pruned features {i}")

        pruned.train()
        selected = pruned.forward_intermediates(x, indices=take_indices, intermediates_only=True)
        features = pruned.forward_features(x)
        features = features if isinstance(features, (list, tuple)) else [features]
        sum(f.sum() for f in selected + features).backward()
        unused = [n for n, p in pruned.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused, f"pruned to {i}, unused params: {unused}"
        del pruned


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward_torchscript(model_name):
    """``torch.jit.script`` of the model built under ``set_scriptable(True)`` runs and matches eager."""
    with timm.set_scriptable(True):
        model = create_model(model_name, pretrained=False).eval()
    if not getattr(model, "supports_torchscript", True):
        pytest.skip(f"{model_name}: {type(model).__name__}.supports_torchscript is False (see its docstring)")
    input_size = _get_input_size(model, TARGET_JIT_SIZE)
    _skip_if_too_large(input_size, MAX_JIT_SIZE)
    inputs = torch.randn((1, *input_size))
    scripted = torch.jit.script(model)
    # as timm: profiling executor w/o profiling runs, the legacy executor is too slow for large models in unit tests
    prev_executor = torch._C._jit_set_profiling_executor(True)
    prev_mode = torch._C._jit_set_profiling_mode(False)
    try:
        with torch.no_grad():
            outputs = scripted(inputs)
            expected = model(inputs)
    finally:
        torch._C._jit_set_profiling_executor(prev_executor)
        torch._C._jit_set_profiling_mode(prev_mode)
    assert outputs.shape == (1, model.num_classes)
    assert not torch.isnan(outputs).any(), "output has NaNs"
    torch.testing.assert_close(outputs, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", HEAVY_CHECK_MODELS)
def test_model_forward_compile(model_name):
    """``torch.compile(fullgraph=True)`` forward matches eager (no graph breaks; ``torch._dynamo.explain`` reports
    them when there are)."""
    import torch._dynamo

    model = create_model(model_name, pretrained=False).eval()
    input_size = _get_input_size(model, TARGET_COMPILE_SIZE)
    _skip_if_too_large(input_size, MAX_JIT_SIZE)
    inputs = torch.randn((1, *input_size))
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            expected = model(inputs)
            try:
                outputs = torch.compile(model, backend=COMPILE_BACKEND, fullgraph=True)(inputs)
            except Exception:
                # fullgraph failed: name the graph breaks if dynamo can list them, else re-raise its error
                torch._dynamo.reset()
                try:
                    explanation = torch._dynamo.explain(model)(inputs)
                except Exception:
                    explanation = None
                if explanation is not None and explanation.graph_break_count:
                    pytest.fail(f"{explanation.graph_break_count} graph breaks: {explanation.break_reasons}")
                raise
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(outputs, expected, rtol=1e-4, atol=1e-5)
