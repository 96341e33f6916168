"""Building blocks of the training recipe: samplers, schedule, embedded data, dataset errors, export."""

import math
import random
from collections import Counter

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import attnzoo  # noqa: F401
from attnzoo.recipes.data import ImageDataModule
from attnzoo.recipes.datasets import build_dataset, dataset_num_classes
from attnzoo.recipes.embedded import EmbeddedDigits, load_embedded
from attnzoo.recipes.export import export_for_timm
from attnzoo.recipes.module import ImageClassifier, check_model_name, create_step_scheduler, scaled_lr
from attnzoo.recipes.samplers import (
    AspectRatioBatchSampler,
    PaddedEvalDataset,
    RepeatedAugSampler,
    SeededDataset,
    ShardedEvalSampler,
)


def test_repeated_aug_sampler_shards_cover_the_epoch_and_spread_repeats():
    n, world = 10, 3
    shards = [list(RepeatedAugSampler(n, r, world, num_repeats=3, seed=1)) for r in range(world)]
    assert all(len(s) == math.ceil(n / world) for s in shards)
    # with 3 repeats on 3 ranks, every rank sees a different copy of the same images: identical shards
    assert shards[0] == shards[1] == shards[2]
    plain = [list(RepeatedAugSampler(n, r, world, num_repeats=1, seed=1)) for r in range(world)]
    flat = [i for s in plain for i in s]
    assert len(flat) == 12 and set(flat) == set(range(n))  # every image, plus 2 wrapped-around paddings
    first = RepeatedAugSampler(n, 0, 1, seed=1)
    order0 = list(first)
    first.set_epoch(1)
    assert list(first) != order0 and sorted(first) == list(range(n))


def test_repeated_aug_sampler_resumes_inside_an_epoch():
    sampler = RepeatedAugSampler(20, 0, 1, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    resumed = RepeatedAugSampler(20, 0, 1, seed=3, batch_size=4, resume_fn=lambda epoch: 3 if epoch == 2 else 0)
    resumed.set_epoch(2)
    assert list(resumed) == full[12:]
    resumed.set_epoch(3)
    assert len(list(resumed)) == 20  # another epoch is not shortened
    with pytest.raises(ValueError, match="rank"):
        RepeatedAugSampler(5, rank=2, world_size=2)


def test_seeded_draws_depend_on_seed_epoch_and_position_only():
    def draws(rank, world, resume=0, epoch=1, seed=3, num_repeats=2):
        sampler = RepeatedAugSampler(
            12, rank, world, num_repeats=num_repeats, seed=seed, batch_size=2, resume_fn=lambda e: resume, seeded=True
        )
        sampler.set_epoch(epoch)
        return list(sampler)

    full = draws(0, 1)
    plain = RepeatedAugSampler(12, num_repeats=2, seed=3)
    plain.set_epoch(1)
    assert [i for i, _ in full] == list(plain)  # the same order as without seeds
    assert draws(0, 1, resume=2) == full[4:]  # a resumed epoch draws the same seeds for the same positions
    assert len({i for i, _ in full}) == 6 and len({s for _, s in full}) == 12  # repeats get other augmentations
    assert draws(0, 1, epoch=2) != full and draws(0, 1, seed=4) != full
    shards = [draws(r, 2) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(full)  # the same global draws, dealt to the ranks
    batches = list(AspectRatioBatchSampler([1.0] * 6, [1.0], batch_size=2, seed=3, seeded=True))
    assert [len(b) for b in batches] == [2, 2, 2] and len({s for b in batches for _, s in b}) == 6

    class Noise(torch.utils.data.Dataset):
        def __getitem__(self, index):
            return torch.rand(2), random.random(), np.random.rand()

    data = SeededDataset(Noise())
    torch.manual_seed(0)
    first = data[(5, 123)]
    torch.manual_seed(1), random.seed(1), np.random.seed(1)  # another caller state (another worker): same draw
    again = data[(5, 123)]
    assert again[1:] == first[1:] and torch.equal(again[0], first[0])
    assert data[(5, 124)][1] != first[1]
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    data[(5, 123)]
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert (np.random.get_state()[1] == states[2]).all()  # the caller's generators are left as they were


def test_padded_eval_shards_count_every_image_once():
    data = [(torch.zeros(1), i) for i in range(7)]
    padded = PaddedEvalDataset(data, world_size=3)
    assert len(padded) == 9
    seen = Counter()
    lengths = set()
    for rank in range(3):
        indices = list(ShardedEvalSampler(len(padded), rank, 3))
        lengths.add(len(indices))
        for i in indices:
            _, target, real = padded[i]
            if real:
                seen[target] += 1
    assert lengths == {3} and seen == Counter(range(7))


def test_warmup_cosine_schedule():
    # lr 1 (a layer-decay group at scale 0.5 beside it), warm-up from 0.01 over 10 steps, cosine to 0.1 at step 100,
    # cool-down at 0.1 until step 110
    weights = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": weights[:1]}, {"params": weights[1:], "lr_scale": 0.5}], lr=1.0)
    scheduler = create_step_scheduler(optimizer, 110, warmup_steps=10, cooldown_steps=10, warmup_lr=0.01, min_lr=0.1)
    lrs = []
    for step in range(110):
        scheduler.step_update(num_updates=step)
        lrs.append(optimizer.param_groups[0]["lr"])
        assert optimizer.param_groups[1]["lr"] == pytest.approx(0.5 * lrs[-1])
    s = lrs.__getitem__
    assert s(0) == pytest.approx(0.01) and s(5) == pytest.approx(0.505) and s(10) == pytest.approx(1.0)
    assert s(55) == pytest.approx(0.55) and s(100) == pytest.approx(0.1) and s(109) == pytest.approx(0.1)
    assert all(s(i) >= s(i + 1) for i in range(10, 109))
    assert scaled_lr(1e-3, 256, 1024) == pytest.approx(2.5e-4) and scaled_lr(1e-3, 256, None) == 1e-3
    with pytest.raises(ValueError, match="warmup_steps"):
        create_step_scheduler(optimizer, total_steps=10, warmup_steps=8, cooldown_steps=5)


def test_embedded_digits_are_real_balanced_and_disjoint():
    train_x, train_y = load_embedded("mnist_5k", "train")
    test_x, test_y = load_embedded("mnist_5k", "test")
    assert train_x.shape == (4000, 28, 28) and test_x.shape == (1000, 28, 28)
    assert Counter(test_y.tolist()) == {c: 100 for c in range(10)}
    assert Counter(train_y[:20].tolist()) == {c: 2 for c in range(10)}  # round-robin prefix
    assert 0.08 < (train_x > 128).mean() < 0.25  # ink fraction of real handwritten digits
    assert not (set(map(bytes, test_x[:50])) & set(map(bytes, train_x)))
    digits = EmbeddedDigits("sklearn_digits", "test")
    image, label = digits[0]
    assert len(digits) == 300 and image.size == (8, 8) and image.mode == "RGB" and label in range(10)
    with pytest.raises(ValueError, match="embedded dataset must be one of"):
        load_embedded("cifar", "train")


def _write_images(folder, n, corrupt=False):
    folder.mkdir(parents=True)
    for i in range(n):
        path = folder / f"{i}.jpg"
        if corrupt:
            path.write_bytes(b"not a jpeg")
        else:
            Image.new("RGB", (12, 10), color=(i * 40 % 255, 0, 0)).save(path)


def test_folder_dataset_and_its_errors(tmp_path):
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            _write_images(tmp_path / "ok" / split / cls, 2)
    train = build_dataset("", str(tmp_path / "ok"), "train", transform=None)
    assert len(train) == 4 and dataset_num_classes(train) == 2
    val = build_dataset("", str(tmp_path / "ok"), "validation", transform=None)  # synonym of val/
    assert len(val) == 4

    with pytest.raises(FileNotFoundError, match="does not exist; expected the ImageNet layout"):
        build_dataset("", str(tmp_path / "missing"), "train", transform=None)
    (tmp_path / "nosplit" / "training_data").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="split 'val' not found"):
        build_dataset("", str(tmp_path / "nosplit"), "val", transform=None)
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no usable images"):
        build_dataset("", str(tmp_path / "empty"), "train", transform=None)
    with pytest.raises(ValueError, match="data.root is required"):
        build_dataset("", None, "train", transform=None)
    with pytest.raises(ValueError, match="unknown embedded dataset"):
        build_dataset("embedded/cifar", None, "train", transform=None)


def test_corrupt_images_fail_with_the_loader_error(tmp_path):
    _write_images(tmp_path / "bad" / "train" / "cat", 3, corrupt=True)
    ds = build_dataset("", str(tmp_path / "bad"), "train", transform=None)
    with pytest.raises(RuntimeError, match="consecutive samples"):
        ds[0]


def test_datamodule_uses_model_and_override_data_config():
    dm = ImageDataModule(dataset="embedded/sklearn_digits", input_size=(3, 8, 8), crop_pct=1.0, num_workers=0)
    config = dm.data_config()
    assert config["input_size"] == (3, 8, 8) and config["crop_pct"] == 1.0
    with pytest.raises(ValueError, match="batch_size"):
        ImageDataModule(batch_size=0)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown model 'gated_vit_tiny_patch16_22'.*gated_vit_tiny_patch16_224"):
        check_model_name("gated_vit_tiny_patch16_22")
    with pytest.raises(ValueError, match="unknown model"):
        ImageClassifier("no_such_model_at_all")
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        ImageClassifier("gated_vit_tiny_patch16_224", pretrained="/nonexistent/weights.safetensors")
    with pytest.raises(TypeError, match="model_kwargs"):
        ImageClassifier("gated_vit_tiny_patch16_224", model_kwargs={"not_an_arg": 1})


def test_export_loads_back_in_timm_both_ways(tmp_path):
    kwargs = dict(img_size=28, patch_size=7, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    model = timm.create_model("gated_vit_tiny_patch16_224", **kwargs).eval()
    weights = export_for_timm(model, tmp_path, data_config={"input_size": (3, 28, 28), "crop_pct": 1.0})
    x = torch.randn(2, 3, 28, 28)
    by_dir = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    by_file = timm.create_model(
        "gated_vit_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(weights), num_classes=10),
        **kwargs,
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(by_dir(x), model(x))
        torch.testing.assert_close(by_file(x), model(x))
    assert by_dir.pretrained_cfg["input_size"] == (3, 28, 28)
