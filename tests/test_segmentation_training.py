"""Short real segmentation runs on digit scenes (CPU): the loss falls, the optimizer groups, crash-and-resume equals an
uninterrupted run, a 2-process gloo evaluation equals a 1-process one, and ``attnzoo segment predict`` writes index
PNGs and overlays."""

import json
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from PIL import Image

from attnzoo.recipes.checkpoint_io import AtomicCheckpointIO
from attnzoo.recipes.param_groups import dense_param_groups
from attnzoo.recipes.segmentation import SegmentationDataModule, SemanticSegmenter
from attnzoo.recipes.segmentation.cli import main
from attnzoo.recipes.segmentation.demo import write_digit_masks

NAT = dict(depths=[1, 1, 1, 1], embed_dim=16, num_heads=[1, 1, 2, 2])
SCENES = dict(canvas_size=64, digits_per_scene=(1, 2), digit_size=(20, 36))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    return write_digit_masks(root, "train", 8, **SCENES), write_digit_masks(root, "test", 5, **SCENES)


def make_model(**kwargs) -> SemanticSegmenter:
    torch.manual_seed(0)
    defaults = dict(
        decoder="upernet", backbone="nat_mini", num_classes=11, backbone_kwargs=NAT, channels=16, lr=2e-3,
        weight_decay=0.01, max_iters=12, warmup_iters=2, warmup_ratio=0.1, test_scale=None,
    )  # fmt: skip
    return SemanticSegmenter(**{**defaults, **kwargs})


def make_data(scenes, **kwargs) -> SegmentationDataModule:
    train, test = scenes
    defaults = dict(
        train_images=str(train / "images"), train_masks=str(train / "masks"), val_images=str(test / "images"),
        val_masks=str(test / "masks"), num_classes=11, batch_size=4, num_workers=0, crop_size=(48, 48), scale=None,
        ratio_range=(0.75, 1.25), hflip=0.0,
    )  # fmt: skip
    return SegmentationDataModule(**{**defaults, **kwargs})


def make_trainer(root, max_steps, callbacks=(), **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, use_distributed_sampler=False, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root,
        plugins=[AtomicCheckpointIO()], callbacks=list(callbacks), **kwargs,
    )  # fmt: skip


class StepLosses(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_loss_falls_and_the_metrics_are_written(scenes, tmp_path):
    model = make_model(results_dir=str(tmp_path / "metrics"), no_decay_keys=["rpb", "norm"], lr=1e-2, max_iters=16)
    losses = StepLosses()
    trainer = make_trainer(tmp_path, 16, [losses], limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(model, datamodule=make_data(scenes))
    first, last = sum(losses.losses[:3]) / 3, sum(losses.losses[-3:]) / 3
    assert last < 0.7 * first, losses.losses
    # mmcv's custom_keys rule: no decay where the name holds a key, decay on everything else (BatchNorm and biases)
    groups = {id(p): g for g in trainer.optimizers[0].param_groups for p in g["params"]}
    inner, head = model.model.backbone.body.model, model.model.decode_head
    block = inner.stages[0].blocks[0]
    assert groups[id(block.attn.rpb)]["weight_decay"] == groups[id(block.norm1.weight)]["weight_decay"] == 0.0
    assert groups[id(block.attn.qkv.weight)]["weight_decay"] == groups[id(head.bottleneck.bn.weight)]["weight_decay"]
    assert groups[id(head.conv_seg.bias)]["weight_decay"] == 0.01 and len(trainer.optimizers[0].param_groups) == 2
    # timm's rule (no_decay_keys None): none on 1-D parameters and the backbone's no_weight_decay() tables
    timm_groups = {id(p): g for g in dense_param_groups(model.model, inner, 1e-3, 0.01) for p in g["params"]}
    assert (
        timm_groups[id(block.attn.rpb)]["weight_decay"]
        == timm_groups[id(head.bottleneck.bn.weight)]["weight_decay"]
        == 0
    )
    assert timm_groups[id(block.attn.qkv.weight)]["weight_decay"] == 0.01
    # mmseg's averaging: over all pixels, ignored ones included, or over the labelled ones (avg_non_ignore)
    logits, masks = torch.randn(1, 11, 4, 4), torch.randint(0, 11, (1, 4, 4))
    masks[0, 0] = 255
    per_pixel = torch.nn.functional.cross_entropy(logits, masks, ignore_index=255, reduction="none")
    assert float(model._ce(logits, masks)) == pytest.approx(float(per_pixel.sum()) / 16)
    model.hparams.avg_non_ignore = True
    assert float(model._ce(logits, masks)) == pytest.approx(float(per_pixel.sum()) / 12)
    result = trainer.test(model, datamodule=make_data(scenes), verbose=False)[0]
    table = json.loads((tmp_path / "metrics" / "test_per_class.json").read_text())
    assert table["mIoU"] == pytest.approx(result["test/mIoU"]) and len(table["per_class"]) == 11
    assert table["per_class"][0]["gt_pixels"] + sum(r["gt_pixels"] for r in table["per_class"][1:]) == 5 * 64 * 64


class CrashAt(Callback):
    """Raises at the start of optimizer step ``step`` (after the checkpoint of ``step - 1``)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_crash_and_resume_equals_an_uninterrupted_run(scenes, tmp_path):
    kwargs = dict(backbone_kwargs={**NAT, "drop_path_rate": 0.2}, max_iters=5)  # drop path + dropout: replayed
    reference = make_model(**kwargs)  # 8 scenes / 4 = 2 steps per epoch: the crash is inside epoch 1
    make_trainer(tmp_path / "a", 5, enable_checkpointing=False, limit_val_batches=0).fit(
        reference, datamodule=make_data(scenes)
    )

    def checkpoints():
        return ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)

    crashed = make_model(**kwargs)
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(tmp_path / "b", 5, [checkpoints(), CrashAt(3)], limit_val_batches=0).fit(
            crashed, datamodule=make_data(scenes)
        )
    resumed = make_model(**kwargs)
    trainer = make_trainer(tmp_path / "c", 5, [checkpoints()], limit_val_batches=0)
    trainer.fit(resumed, datamodule=make_data(scenes), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 5
    expected, got = reference.state_dict(), resumed.state_dict()
    assert any(not torch.equal(expected[k], crashed.state_dict()[k]) for k in expected)  # it did stop early
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


CONFIG = """
seed_everything: 0
model:
  decoder: fpn
  backbone: nat_mini
  num_classes: 11
  backbone_kwargs: {depths: [1, 1, 1, 1], embed_dim: 16, num_heads: [1, 1, 2, 2]}
  channels: 16
  fpn_channels: 16
  test_scale: null
  results_dir: %(out)s/metrics
data:
  train_images: %(train)s/images
  train_masks: %(train)s/masks
  val_images: %(test)s/images
  val_masks: %(test)s/masks
  num_classes: 11
  num_workers: 0
trainer:
  accelerator: cpu
  default_root_dir: %(out)s  # Lightning's config.yaml goes here, not into the working directory
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
checkpoint: {dirpath: %(out)s/checkpoints}
predictions: {dirpath: %(out)s/predictions}
"""


def _segment(tmp_path, scenes, name, command, *overrides, subprocess_run=False):
    """``attnzoo segment <command>`` on the test config: in this process, or as a subprocess (DDP)."""
    config = tmp_path / f"{name}.yaml"
    out = tmp_path / name
    config.write_text(textwrap.dedent(CONFIG % {"out": out, "train": scenes[0], "test": scenes[1]}))
    args = [command, "--config", str(config), *overrides]
    if not subprocess_run:
        main(args)
        return out, ""
    cmd = [sys.executable, "-m", "attnzoo.recipes.segmentation.cli", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stderr


@pytest.mark.slow
def test_two_process_gloo_evaluation_equals_one_process_and_predict_writes_pngs_only_when_trained(
    scenes, tmp_path, capsys
):
    model = make_model(decoder="fpn", channels=16, fpn_channels=16, max_iters=6)
    trainer = make_trainer(tmp_path / "train", 6, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(model, datamodule=make_data(scenes))
    trainer.save_checkpoint(tmp_path / "trained.ckpt")
    ckpt = ["--ckpt_path", str(tmp_path / "trained.ckpt")]
    single, _ = _segment(tmp_path, scenes, "single", "validate", *ckpt)
    ddp_args = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    ddp, log = _segment(tmp_path, scenes, "ddp", "validate", *ckpt, *ddp_args, subprocess_run=True)
    assert "MEMBER: 2/2" in log  # two gloo processes took part (5 scenes: rank 1 gets a padded copy)
    one = json.loads((single / "metrics" / "val_per_class_step0000000.json").read_text())
    two = json.loads((ddp / "metrics" / "val_per_class_step0000000.json").read_text())
    assert one["pixels"] == 5 * 64 * 64 and one["mIoU"] > 0
    assert two == one  # the same confusion matrix: every count and metric equal
    with pytest.raises(ValueError, match=r"segment predict needs --ckpt_path .* randomly initialised"):
        _segment(tmp_path, scenes, "random", "predict")  # no checkpoint, no converted weights: random heads
    assert not (tmp_path / "random").exists()
    capsys.readouterr()
    out, _ = _segment(tmp_path, scenes, "predict", "predict", *ckpt, "--render", str(tmp_path / "renders"))
    names = sorted(p.name for p in (scenes[1] / "images").iterdir())
    assert sorted(p.name for p in (out / "predictions").iterdir()) == names
    with Image.open(out / "predictions" / names[0]) as index, Image.open(tmp_path / "renders" / names[0]) as render:
        assert index.mode == "L" and index.size == (64, 64) and np.asarray(index).max() < 11
        assert render.mode == "RGB" and render.size[1] == 64 and render.size[0] > 64  # image + legend
    assert f"wrote 5 index PNGs to {out / 'predictions'}" in capsys.readouterr().out


def test_shipped_config_fits_and_validates_on_an_ade20k_folder(scenes, tmp_path):
    """``attnzoo segment fit`` / ``validate --ckpt_path last`` with a shipped ADE20K config on a folder in the ADE20K
    layout (``ADEChallengeData2016/{images,annotations}/{training,validation}``, annotation 0 = unlabelled, 1..150 the
    classes); only the model's size, the schedule and the machine are overridden."""
    root = tmp_path / "ADEChallengeData2016"
    for split, source in (("training", scenes[0]), ("validation", scenes[1])):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for mask_file in sorted((source / "masks").iterdir()):
            with Image.open(source / "images" / mask_file.name) as image:
                image.convert("RGB").save(root / "images" / split / f"{mask_file.stem}.jpg")
            mask = np.asarray(Image.open(mask_file)).astype(np.uint8) + 1  # digit classes 1..11 of 150
            mask[:2] = 0  # an unlabelled strip: the ignore label after reduce_zero_label
            Image.fromarray(mask).save(root / "annotations" / split / mask_file.name)
    out = tmp_path / "run"
    common = [
        "--config", "ade20k/upernet_nat_mini_160k.yaml", "--data.root", str(tmp_path), "--data.num_workers", "0",
        "--model.pretrained_backbone", "false", "--model.channels", "16", "--model.test_scale", "null",
        "--model.backbone_kwargs", json.dumps({**NAT, "out_norms": True, "small_maps": "zero_pad"}),
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(out),
        "--checkpoint.dirpath", str(out / "checkpoints"), "--model.results_dir", str(out / "metrics"),
    ]  # fmt: skip
    fit = ["--data.batch_size", "2", "--data.crop_size", "[48, 48]", "--data.scale", "null"]
    schedule = ["--model.max_iters", "3", "--trainer.max_steps", "3", "--model.warmup_iters", "1"]
    main(["fit", *common, *fit, *schedule, "--trainer.val_check_interval", "3"])
    assert (out / "checkpoints" / "last.ckpt").is_file()
    main(["validate", *common, "--ckpt_path", "last"])
    metrics = json.loads(max((out / "metrics").glob("val_per_class_step*.json")).read_text())
    assert metrics["pixels"] == 5 * (64 - 2) * 64  # the unlabelled strip is left out of the metric
    assert [row["class"] for row in metrics["per_class"][:2]] == ["wall", "building"]  # ADE20K's 150 names
    assert len(metrics["per_class"]) == 150 and metrics["mIoU"] >= 0
