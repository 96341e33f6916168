"""Short real detection runs on a synthetic COCO folder (CPU): learning + COCOeval on the results JSON, optimizer
groups and schedule, crash-and-resume, and a 2-process gloo evaluation equal to a 1-process one."""

import csv
import json
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import pytest
import torch
from detection_fixtures import write_shapes_coco
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from attnzoo.recipes.checkpoint_io import AtomicCheckpointIO
from attnzoo.recipes.detection import CocoDataModule, ObjectDetector
from attnzoo.recipes.detection.schedule import WarmupMultiStep, resolve_schedule

NAT = dict(depths=[1, 1, 1, 1], embed_dim=32, num_heads=[1, 2, 4, 8])
SMALL_RCNN = dict(
    box_batch_size_per_image=64,
    rpn_batch_size_per_image=64,
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=200,
    rpn_post_nms_top_n_test=100,
)


def make_model(**kwargs) -> ObjectDetector:
    torch.manual_seed(0)
    defaults = dict(
        arch="faster_rcnn",
        backbone="nat_mini",
        num_classes=2,
        backbone_kwargs=NAT,
        fpn_channels=32,
        min_size=128,
        max_size=160,
        detector_kwargs=SMALL_RCNN,
        lr=1e-3,
        schedule=None,
        epochs=2,
        milestones=[2],
        warmup_steps=2,
    )
    return ObjectDetector(**{**defaults, **kwargs})


def make_data(ann, images, **kwargs) -> CocoDataModule:
    defaults = dict(
        train_ann=str(ann),
        train_images=str(images),
        val_ann=str(ann),
        val_images=str(images),
        batch_size=2,
        num_workers=0,
        train_scales=(96, 128),
        train_max_size=160,
    )
    return CocoDataModule(**{**defaults, **kwargs})


def make_trainer(root, max_epochs=2, callbacks=(), **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        plugins=[AtomicCheckpointIO()],
        callbacks=list(callbacks),
        **kwargs,
    )


class EpochLosses(Callback):
    def __init__(self):
        self.losses = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.losses.append(float(trainer.callback_metrics["train/loss_epoch"]))


def test_mask_rcnn_learns_and_its_results_json_evaluates(tmp_path):
    ann, images = write_shapes_coco(tmp_path, 8)
    model = make_model(arch="mask_rcnn", epochs=6, milestones=[5], results_dir=str(tmp_path / "results"))
    losses = EpochLosses()
    trainer = make_trainer(tmp_path, max_epochs=6, callbacks=[losses], check_val_every_n_epoch=6)
    trainer.fit(model, datamodule=make_data(ann, images))
    assert losses.losses[-1] < 0.7 * losses.losses[0], losses.losses
    metrics = trainer.callback_metrics
    assert {f"val/{t}_{m}" for t in ("bbox", "segm") for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")} <= set(
        metrics
    )
    assert float(metrics["val/bbox_AP50"]) > 0.2 and float(metrics["val/segm_AP50"]) > 0.2
    results = tmp_path / "results" / "val_detections_epoch005.json"
    detections = json.loads(results.read_text())
    assert detections and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(detections[0])
    assert {d["category_id"] for d in detections} <= {3, 7}  # mapped back to the file's category ids
    gt = COCO(str(ann))
    for iou_type in ("bbox", "segm"):  # the official evaluation of the written file gives the logged AP
        dets = [{k: v for k, v in d.items() if not (iou_type == "segm" and k == "bbox")} for d in detections]
        evaluator = COCOeval(gt, gt.loadRes(dets), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert evaluator.stats[0] == pytest.approx(float(metrics[f"val/{iou_type}_AP"]), abs=1e-6)


def test_optimizer_groups_and_step_schedule(tmp_path):
    ann, images = write_shapes_coco(tmp_path, 4)
    model = make_model(
        arch="fcos", backbone="gated_vit_tiny_patch16_224", backbone_kwargs=dict(embed_dim=32, depth=2, num_heads=2),
        backbone_lr_mult=0.1, layer_decay=0.5, epochs=2, milestones=[2], weight_decay=0.05, detector_kwargs=None,
    )  # fmt: skip
    trainer = make_trainer(tmp_path, max_epochs=1, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(model, datamodule=make_data(ann, images))
    groups = trainer.optimizers[0].param_groups
    vit = model.model.backbone.body.model
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(vit.pos_embed)]["weight_decay"] == 0.0 and by_param[id(vit.cls_token)]["weight_decay"] == 0.0
    assert by_param[id(vit.blocks[1].norm1.weight)]["weight_decay"] == 0.0
    assert by_param[id(vit.blocks[1].mlp.fc1.weight)]["weight_decay"] == 0.05
    head_conv = model.model.head.classification_head.conv[0].weight
    assert by_param[id(head_conv)]["weight_decay"] == 0.05
    # after the 2 steps: lr factor 1 (warm-up done, no milestone passed): backbone lr = 1e-3 x 0.1 x layer scale,
    # the scale 0.5 ** (layers above): the last kept block 1, the first 0.5, the patch embedding 0.25
    assert by_param[id(head_conv)]["lr"] == pytest.approx(1e-3)
    assert by_param[id(vit.blocks[1].mlp.fc1.weight)]["lr"] == pytest.approx(1e-4)
    assert by_param[id(vit.blocks[0].mlp.fc1.weight)]["lr"] == pytest.approx(1e-4 * 0.5)
    assert by_param[id(vit.patch_embed.proj.weight)]["lr"] == pytest.approx(1e-4 * 0.5**2)
    schedule = WarmupMultiStep(steps_per_epoch=10, milestones=resolve_schedule("1x")[1], warmup_steps=5)
    assert schedule(0) == pytest.approx(0.001) and schedule(5) == 1.0 and schedule(79) == 1.0
    assert schedule(80) == pytest.approx(0.1) and schedule(110) == pytest.approx(0.01)
    assert resolve_schedule("3x") == (36, (27, 33))
    with pytest.raises(ValueError, match="schedule must be one of"):
        resolve_schedule("2x")


class CrashAt(Callback):
    """Raises at the start of optimizer step ``step`` (after the checkpoint of ``step - 1``)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("num_workers", [0, 1])  # with workers, Lightning builds the loader iterator before restoring
def test_crash_and_resume_equals_an_uninterrupted_run(tmp_path, num_workers):
    ann, images = write_shapes_coco(tmp_path, 8)
    kwargs = dict(backbone_kwargs={**NAT, "drop_path_rate": 0.2})  # drop path: per-step randomness is replayed
    # 8 images / 2 = 4 steps per epoch, 2 epochs; the crash comes in the middle of epoch 1
    reference = make_model(**kwargs)
    make_trainer(tmp_path / "a", enable_checkpointing=False, limit_val_batches=0).fit(
        reference, datamodule=make_data(ann, images, num_workers=num_workers)
    )

    def checkpoints():
        return ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)

    crashed = make_model(**kwargs)
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(tmp_path / "b", callbacks=[checkpoints(), CrashAt(6)], limit_val_batches=0).fit(
            crashed, datamodule=make_data(ann, images, num_workers=num_workers)
        )
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 6
    resumed = make_model(**kwargs)
    trainer = make_trainer(tmp_path / "c", callbacks=[checkpoints()], limit_val_batches=0)
    data = make_data(ann, images, num_workers=num_workers)
    trainer.fit(resumed, datamodule=data, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 8
    expected, got = reference.state_dict(), resumed.state_dict()
    changed = [k for k in expected if not torch.equal(expected[k], crashed.state_dict()[k])]
    assert changed  # the crashed run stopped before the end
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


CONFIG = """
seed_everything: 0
model:
  arch: faster_rcnn
  backbone: nat_mini
  num_classes: 2
  backbone_kwargs: {depths: [1, 1, 1, 1], embed_dim: 32, num_heads: [1, 2, 4, 8]}
  fpn_channels: 32
  min_size: 128
  max_size: 160
  detector_kwargs: {rpn_pre_nms_top_n_test: 200, rpn_post_nms_top_n_test: 100}
  schedule: 1x
  results_dir: %(out)s/results
data:
  train_ann: %(ann)s
  train_images: %(images)s
  val_ann: %(ann)s
  val_images: %(images)s
  eval_batch_size: 1  # batched evaluation pads images together, so results depend on the batching
  num_workers: 0
trainer:
  accelerator: cpu
  enable_progress_bar: false
  enable_model_summary: false
  logger: {class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: %(out)s, name: csv}}
checkpoint: {dirpath: %(out)s/checkpoints}
"""


def _validate(tmp_path, name, ann, images, ckpt, *overrides):
    out = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    config.write_text(textwrap.dedent(CONFIG % {"out": out, "ann": ann, "images": images}))
    cmd = [sys.executable, "-m", "attnzoo.recipes.detection.cli", "validate", "--config", str(config)]
    result = subprocess.run([*cmd, "--ckpt_path", str(ckpt), *overrides], capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "csv" / "version_0" / "metrics.csv") as f:
        row = next(r for r in csv.DictReader(f) if r.get("val/bbox_AP"))
    detections = json.loads((out / "results" / "val_detections_epoch000.json").read_text())
    return row, detections, result.stderr


@pytest.mark.slow
def test_two_process_gloo_evaluation_equals_one_process(tmp_path):
    ann, images = write_shapes_coco(tmp_path, 5)  # 5 images on 2 ranks: rank 1 gets one padded copy
    model = make_model(epochs=4, milestones=[4])
    trainer = make_trainer(tmp_path / "train", max_epochs=4, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(model, datamodule=make_data(ann, images))
    trainer.save_checkpoint(tmp_path / "trained.ckpt")
    single, single_dets, _ = _validate(tmp_path, "single", ann, images, tmp_path / "trained.ckpt")
    ddp, ddp_dets, log = _validate(
        tmp_path, "ddp", ann, images, tmp_path / "trained.ckpt", "--trainer.devices", "2", "--trainer.strategy", "ddp"
    )
    assert "MEMBER: 2/2" in log  # two gloo processes took part
    assert float(single["val/bbox_AP50"]) > 0  # a trained model, so the comparison means something
    for key in ("val/bbox_AP", "val/bbox_AP50", "val/bbox_AP75"):
        assert float(ddp[key]) == pytest.approx(float(single[key]), abs=1e-6), key

    def key(d):
        return d["image_id"], d["category_id"], d["score"]

    assert len(ddp_dets) == len(single_dets)  # no padded duplicate, nothing lost
    assert {d["image_id"] for d in ddp_dets} == {100, 101, 102, 103, 104}
    for a, b in zip(sorted(single_dets, key=key), sorted(ddp_dets, key=key)):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        assert a["bbox"] == pytest.approx(b["bbox"], abs=0.05)
