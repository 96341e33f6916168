"""Multi-aspect training: the aspect-ratio batch sampler, image sizes from headers, per-bin transforms, and real
Lightning runs with batches of different shapes (resumed mid-epoch)."""

from collections import Counter
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from PIL import Image
from torch.utils.data import Dataset, Subset

from attnzoo.recipes.data import AspectBinDataset, ImageDataModule, aspect_bin_size, image_sizes
from attnzoo.recipes.datasets import build_dataset
from attnzoo.recipes.embedded import EmbeddedDigits
from attnzoo.recipes.module import ImageClassifier
from attnzoo.recipes.samplers import AspectRatioBatchSampler, RepeatedAugSampler

BINS = [0.75, 1.0, 4 / 3]
# (width, height) of the three kinds of test images and the (h, w) of their bin for input 32x32, multiple 8
KINDS = {"landscape": ((40, 30), (24, 40)), "portrait": ((30, 40), (40, 24)), "square": ((32, 32), (32, 32))}


def _ratios(counts: dict[float, int]) -> list[float]:
    return [ratio for ratio, n in counts.items() for _ in range(n)]


def _all_batches(ratios, world_size, **kwargs):
    return [
        list(AspectRatioBatchSampler(ratios, BINS, rank=r, world_size=world_size, **kwargs)) for r in range(world_size)
    ]


def test_sampler_batches_are_single_bin_and_dealt_once_over_ranks():
    # bins of 8, 4 and 4 samples (ratios near but not at the targets), batches of 4: 4 batches for 1, 2 or 4 ranks
    ratios = _ratios({1.05: 8, 0.7: 4, 1.5: 4})
    bin_of = {i: 1 if r == 1.05 else 0 if r == 0.7 else 2 for i, r in enumerate(ratios)}
    for world in (1, 2, 4):
        for drop_last in (False, True):
            shards = _all_batches(ratios, world, batch_size=4, seed=5, drop_last=drop_last)
            assert {len(s) for s in shards} == {4 // world}
            assert all(len({bin_of[i] for i in b}) == 1 and len(b) == 4 for s in shards for b in s)
            assert Counter(i for s in shards for b in s for i in b) == Counter(range(16))  # exactly once

    uneven = _ratios({1.0: 7, 0.75: 5, 1.4: 2, 1.3: 1})  # 7, 5 and 3 samples, 3 ranks, batches of 2
    for drop_last, per_rank in ((False, 3), (True, 2)):  # 4 + 3 + 2 = 9 batches, or 3 + 2 + 1 = 6 full ones
        shards = _all_batches(uneven, 3, batch_size=2, seed=1, drop_last=drop_last)
        assert [len(s) for s in shards] == [per_rank] * 3
        sampler = AspectRatioBatchSampler(uneven, BINS, batch_size=2, world_size=3, drop_last=drop_last)
        assert len(sampler) == per_rank
        bin_of = {1.0: 1, 0.75: 0, 1.4: 2, 1.3: 2}
        assert all(len(b) == 2 and len({bin_of[uneven[i]] for i in b}) == 1 for s in shards for b in s)
        seen = Counter(i for s in shards for b in s for i in b)
        if drop_last:
            assert max(seen.values()) == 1 and len(seen) == 12
        else:  # padding by wrap-around: 3 partial batches padded with one sample each, no rank padding needed
            assert set(seen) == set(range(15)) and sum(seen.values()) == 18
    two_ranks = _all_batches(uneven, 2, batch_size=2, seed=1)  # 9 batches: one dealt twice to give 5 per rank
    assert [len(s) for s in two_ranks] == [5, 5]
    assert Counter(map(tuple, two_ranks[0] + two_ranks[1])).most_common(1)[0][1] == 2


def test_sampler_order_depends_on_seed_and_epoch_only():
    ratios = _ratios({1.0: 10, 0.75: 6, 4 / 3: 8})
    a = AspectRatioBatchSampler(ratios, BINS, batch_size=2, rank=1, world_size=2, seed=7)
    b = AspectRatioBatchSampler(ratios, BINS, batch_size=2, rank=1, world_size=2, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    epoch3 = list(a)
    a.set_epoch(4)
    assert list(a) != epoch3 and sorted(map(sorted, a)) != sorted(map(sorted, epoch3))
    other_seed = AspectRatioBatchSampler(ratios, BINS, batch_size=2, rank=1, world_size=2, seed=8)
    other_seed.set_epoch(3)
    assert list(other_seed) != epoch3
    fixed = AspectRatioBatchSampler(ratios, BINS, batch_size=2, shuffle=False)
    assert list(fixed)[:3] == [[10, 11], [12, 13], [14, 15]]  # bin 0.75 first, dataset order
    assert fixed.sampler is fixed  # where Lightning looks for set_epoch


def test_sampler_resumes_after_the_trained_batches():
    ratios = _ratios({1.0: 12, 0.75: 8})
    full = AspectRatioBatchSampler(ratios, BINS, batch_size=2, rank=0, world_size=2, seed=3)
    full.set_epoch(2)
    resumed = AspectRatioBatchSampler(
        ratios, BINS, batch_size=2, rank=0, world_size=2, seed=3, resume_fn=lambda epoch: 3 if epoch == 2 else 0
    )
    batches = iter(resumed)  # Lightning creates the iterator before it calls set_epoch: batches are built lazily
    resumed.set_epoch(2)
    assert len(list(full)) == 5 and list(batches) == list(resumed) == list(full)[3:]
    resumed.set_epoch(3)
    assert len(list(resumed)) == len(resumed) == 5  # another epoch is not shortened


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(rank=2, world_size=2), "rank"),
        (dict(world_size=0), "world_size"),
        (dict(bins=[]), "bins must be a non-empty"),
        (dict(bins=[1.0, 1.0]), "bins must be distinct"),
        (dict(bins=[0.0, 1.0]), "bins must hold finite positive"),
        (dict(aspect_ratios=[1.0, float("nan")]), "aspect_ratios must hold finite positive"),
        (dict(aspect_ratios=[[1.0, 2.0]]), "aspect_ratios must be a non-empty 1-D"),
        (dict(batch_size=3, drop_last=True), "drop_last=True leaves no batch"),
    ],
)
def test_sampler_rejects_bad_arguments(kwargs, match):
    args = {**dict(aspect_ratios=[1.0, 1.0, 0.75, 0.75], bins=BINS, batch_size=2), **kwargs}
    with pytest.raises(ValueError, match=match):
        AspectRatioBatchSampler(**args)


def test_bin_sizes_keep_the_area_on_the_multiple():
    assert aspect_bin_size((3, 224, 224), 4 / 3) == (192, 256)
    assert aspect_bin_size((3, 224, 224), 0.75) == (256, 192)
    assert aspect_bin_size((224, 224), 1.0) == (224, 224)
    assert aspect_bin_size((3, 32, 32), 4 / 3, multiple=8) == (24, 40)
    assert aspect_bin_size((3, 32, 32), 100.0, multiple=8) == (8, 320)  # at least one multiple


def _write_folder(root, splits=("train", "val")) -> dict[int, str]:
    """Two classes x two images of each kind per split; training image ``j`` is a flat colour of value ``40 + 15 j``
    in the channel of its kind (0 landscape, 1 portrait, 2 square). Returns value -> kind."""
    value_kind = {}
    for split in splits:
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for channel, (kind, (size, _)) in enumerate(KINDS.items()):
                for copy in range(2):
                    value = 40 + 15 * len(value_kind) if split == "train" else 100
                    color = [0, 0, 0]
                    color[channel] = value
                    Image.new("RGB", size, tuple(color)).save(folder / f"{kind}{copy}.png")
                    if split == "train":
                        value_kind[value] = kind
    return value_kind


def _folder_data(root, **kwargs) -> ImageDataModule:
    defaults = dict(
        root=str(root), batch_size=2, num_workers=0, augment=False, input_size=(3, 32, 32), crop_pct=1.0,
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), aspect_ratio_bins=BINS, aspect_ratio_multiple=8,
    )  # fmt: skip
    return ImageDataModule(**{**defaults, **kwargs})


class Items(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_image_sizes_from_headers_arrays_and_items(tmp_path):
    _write_folder(tmp_path, splits=("train",))
    folder = build_dataset("", str(tmp_path), "train", transform=None)
    sizes = image_sizes(folder)
    assert Counter(map(tuple, sizes.tolist())) == {(40, 30): 4, (30, 40): 4, (32, 32): 4}
    assert image_sizes(folder) is sizes  # cached per dataset object
    subset = Subset(folder, [5, 0])
    assert image_sizes(subset).tolist() == [sizes[5].tolist(), sizes[0].tolist()]
    digits = EmbeddedDigits("sklearn_digits", "train", num_samples=7)
    assert image_sizes(digits).tolist() == [[8, 8]] * 7
    items = Items([(Image.new("RGB", (5, 9)), 0), (Image.new("RGB", (6, 3)), 1)])  # no reader, no array: decoded
    assert image_sizes(items).tolist() == [[5, 9], [6, 3]]
    with pytest.raises(TypeError, match="untransformed PIL images"):
        image_sizes(Items([(torch.zeros(3, 4, 4), 0)]))


def test_datamodule_batches_have_their_bin_shape_on_one_and_two_ranks(tmp_path):
    value_kind = _write_folder(tmp_path)
    for world in (1, 2):
        seen, counts = Counter(), []
        for rank in range(world):
            dm = _folder_data(tmp_path, seed=4)
            dm.setup("fit")
            assert isinstance(dm.datasets["train"], AspectBinDataset)
            dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, global_step=0)
            loader = dm.train_dataloader()
            assert isinstance(dm._train_sampler, AspectRatioBatchSampler)
            counts.append(len(loader))
            for x, target in loader:
                kinds = {value_kind[round(v)] for v in (x.amax(dim=(1, 2, 3)) * 255).tolist()}
                assert len(kinds) == 1  # one bin per batch, and the batch has that bin's (h, w)
                assert x.shape == (2, 3, *KINDS[kinds.pop()][1]) and target.shape == (2,)
                seen.update(round(v) for v in (x.amax(dim=(1, 2, 3)) * 255).tolist())
            val = next(iter(dm.val_dataloader()))
            assert val[0].shape == (2, 3, 32, 32)  # evaluation keeps input_size
        assert counts == [6 // world] * world
        assert seen == Counter(value_kind.keys())  # every training image exactly once over the ranks

    plain = _folder_data(tmp_path, aspect_ratio_bins=None)  # without the option: one size, the old sampler
    plain.setup("fit")
    loader = plain.train_dataloader()
    assert isinstance(plain._train_sampler, RepeatedAugSampler)
    assert {tuple(x.shape) for x, _ in loader} == {(2, 3, 32, 32)}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(aspect_ratio_bins=[]), "aspect_ratio_bins must be a non-empty"),
        (dict(aspect_ratio_bins=[1.0, 1.0]), "aspect_ratio_bins must be distinct"),
        (dict(aspect_ratio_bins=[-1.0]), "aspect_ratio_bins must hold finite positive"),
        (dict(aspect_ratio_bins=[1.0], num_repeats=3), "num_repeats=1"),
        (dict(aspect_ratio_multiple=0), "aspect_ratio_multiple"),
    ],
)
def test_datamodule_rejects_bad_aspect_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageDataModule(**kwargs)


def test_aspect_ratio_bins_are_bounded_to_one_eighth_and_eight():
    for bins in ([1e9], [0.75, 100.0], [1e-3]):  # [1e9] made 32 x 1,011,936 px crops (5.2 GB before a step)
        with pytest.raises(ValueError, match=r"aspect_ratio_bins must hold width/height ratios in \[1/8, 8\]"):
            ImageDataModule(aspect_ratio_bins=bins)
    ImageDataModule(aspect_ratio_bins=[0.125, 1.0, 8.0])


TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


class RecordShapes(Callback):
    def __init__(self):
        self.shapes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.shapes.append(tuple(batch[0].shape))


class CrashAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def _model() -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(
        "gated_vit_tiny_patch16_224", model_kwargs=TINY, num_classes=2, lr=1e-3, base_batch_size=None,
        warmup_epochs=0.5, label_smoothing=0.0,
    )  # fmt: skip


def _trainer(root, max_epochs, callbacks=(), **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=max_epochs, use_distributed_sampler=False, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root,
        callbacks=list(callbacks), **kwargs,
    )  # fmt: skip


def test_fit_with_augmented_mixed_shape_batches(tmp_path):
    _write_folder(tmp_path / "data")
    shapes = RecordShapes()
    module = _model()
    trainer = _trainer(tmp_path, 1, [shapes], enable_checkpointing=False)
    trainer.fit(module, datamodule=_folder_data(tmp_path / "data", augment=True, mean=None, std=None))
    assert trainer.global_step == 6 and len(shapes.shapes) == 6
    assert set(shapes.shapes) == {(2, 3, 24, 40), (2, 3, 40, 24), (2, 3, 32, 32)}
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
    assert {"val/top1", "val/loss"} <= set(trainer.callback_metrics)


@pytest.mark.parametrize("num_workers", [0, 1])  # worker prefetch must not start before the checkpoint is restored
def test_crash_and_resume_with_aspect_bins_equals_an_uninterrupted_run(tmp_path, num_workers):
    _write_folder(tmp_path / "data")

    def data():
        return _folder_data(tmp_path / "data", num_workers=num_workers)

    reference, reference_data, shapes = _model(), data(), RecordShapes()
    _trainer(tmp_path / "a", 2, [shapes], enable_checkpointing=False).fit(reference, datamodule=reference_data)
    assert reference_data._train_sampler.epoch == 1  # Lightning called set_epoch through batch_sampler.sampler
    assert shapes.shapes[:6] != shapes.shapes[6:]  # epoch 1 has another batch order than epoch 0

    def checkpoints():
        return ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)

    crashed = _model()
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(tmp_path / "b", 2, [checkpoints(), CrashAt(8)]).fit(crashed, datamodule=data())
    resumed, resumed_shapes = _model(), RecordShapes()
    trainer = _trainer(tmp_path / "c", 2, [checkpoints(), resumed_shapes])
    trainer.fit(resumed, datamodule=data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 12 and resumed_shapes.shapes == shapes.shapes[8:]
    expected, got = reference.state_dict(), resumed.state_dict()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
