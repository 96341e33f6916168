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
    detections = json.loads((out / "results" / "validate_detections_epoch000.json").read_text())
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


# ---------------------------------------------------------------- one short training shared by the tests below
@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """One epoch (one step) on two images with validation: ``(folder, ann, images, checkpoint)``; the fit wrote
    ``<folder>/results/val_detections_epoch000.json``."""
    tmp = tmp_path_factory.mktemp("trained")
    ann, images = write_shapes_coco(tmp, 2)
    model = make_small_model(results_dir=str(tmp / "results"))
    trainer = make_trainer(tmp, max_epochs=1, enable_checkpointing=False)
    trainer.fit(model, datamodule=make_data(ann, images, train_scales=(64,), train_max_size=96))
    trainer.save_checkpoint(tmp / "trained.ckpt")
    return tmp, ann, images, tmp / "trained.ckpt"


def make_small_model(**kwargs) -> ObjectDetector:
    """:func:`make_model` evaluating at 64-96 px (the tests below check files and messages, not accuracy)."""
    return make_model(**{"min_size": 64, "max_size": 96, **kwargs})


def _annotations(tmp_path, ann, name, edit):
    data = json.loads(ann.read_text())
    edit(data)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _renumber(data):
    new_id = {3: 1, 7: 2}
    for category in data["categories"]:
        category["id"] = new_id[category["id"]]
    for annotation in data["annotations"]:
        annotation["category_id"] = new_id[annotation["category_id"]]


def _only_squares(data):
    data["categories"] = [c for c in data["categories"] if c["id"] == 3]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] == 3]


def test_checkpoint_category_map_must_match_the_data(trained, tmp_path):
    folder, ann, images, ckpt = trained
    model = make_small_model(results_dir=str(tmp_path / "results"))
    make_trainer(tmp_path).validate(model, datamodule=make_data(ann, images), ckpt_path=ckpt, verbose=False)
    assert model.categories == [{"id": 3, "name": "square"}, {"id": 7, "name": "disk"}]  # identical maps go through
    renumbered = _annotations(tmp_path, ann, "renumbered.json", _renumber)
    squares = _annotations(tmp_path, ann, "squares.json", _only_squares)
    both_maps = r"trained with \{3: 'square', 7: 'disk'\}, the data has \{%s\}"
    cases = [  # (annotation file, model.num_classes, message)
        (renumbered, 2, both_maps % "1: 'square', 2: 'disk'"),
        (squares, 1, both_maps % "3: 'square'"),  # what "set model.num_classes: 1" used to lead to
    ]
    for path, num_classes, message in cases:
        with pytest.raises(ValueError, match=message):
            model = make_small_model(num_classes=num_classes)
            make_trainer(tmp_path).validate(model, datamodule=make_data(path, images), ckpt_path=ckpt)
    with pytest.raises(ValueError, match=both_maps % "1: 'square', 2: 'disk'"):  # a resumed fit
        model, data = make_small_model(), make_data(renumbered, images)
        make_trainer(tmp_path, max_epochs=3).fit(model, datamodule=data, ckpt_path=ckpt)
    with pytest.raises(ValueError, match=r"trained with 2 categories .* set model.num_classes: 2"):
        make_trainer(tmp_path).validate(
            make_small_model(num_classes=3), datamodule=make_data(ann, images), ckpt_path=ckpt
        )
    with pytest.raises(ValueError, match=r"annotations have 1 categories \(\{3: 'square'\}\) .*num_classes: 1"):
        make_trainer(tmp_path).validate(make_small_model(), datamodule=make_data(squares, images))  # no checkpoint


def test_validate_keeps_the_validation_results_of_fit(trained, tmp_path):
    folder, ann, images, ckpt = trained
    fit_results = folder / "results" / "val_detections_epoch000.json"
    written_by_fit = fit_results.stat()
    model = make_small_model(results_dir=str(folder / "results"))
    make_trainer(tmp_path).validate(model, datamodule=make_data(ann, images), ckpt_path=ckpt, verbose=False)
    after = fit_results.stat()
    assert (after.st_ino, after.st_mtime_ns) == (written_by_fit.st_ino, written_by_fit.st_mtime_ns)  # not rewritten
    assert isinstance(json.loads((folder / "results" / "validate_detections_epoch000.json").read_text()), list)


def _plant_links(folder, names, outside):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).symlink_to(outside / name)
        (outside / name).write_text("not yours")


def _untouched(outside):
    return all(p.read_bytes() == b"not yours" for p in outside.iterdir())


def test_evaluation_results_never_follow_links_planted_in_their_folder(trained, tmp_path):
    _, ann, images, ckpt = trained
    results, outside = tmp_path / "results", tmp_path / "outside"
    outside.mkdir()
    names = ["val_detections_epoch000.json", "val_detections_epoch000.json.tmp"]
    _plant_links(results, [*names, *(n.replace("val_", "validate_") for n in names)], outside)
    model = make_small_model(results_dir=str(results))
    make_trainer(tmp_path).validate(model, datamodule=make_data(ann, images), ckpt_path=ckpt, verbose=False)
    assert _untouched(outside)
    written = [p for p in results.iterdir() if not p.is_symlink()]
    assert [p.name for p in written] == ["validate_detections_epoch000.json"]


def test_predict_outputs_name_their_input_files_and_never_follow_links(trained, tmp_path):
    from PIL import Image

    from attnzoo.recipes.detection import DetectionWriter

    _, ann, images, ckpt = trained
    photos, render, out, outside = tmp_path / "photos", tmp_path / "render", tmp_path / "out", tmp_path / "outside"
    photos.mkdir()
    outside.mkdir()
    sizes = {}
    for source, name in (("000.png", "a.png"), ("001.png", "a.jpg"), ("000.png", "c.png")):
        with Image.open(images / source) as picture:
            picture.convert("RGB").save(photos / name)
            sizes[name] = picture.size
    _plant_links(out, ["detections.json", "detections.json.tmp"], outside)
    _plant_links(render, ["c.png"], outside)
    writer = DetectionWriter(dirpath=str(out), render=str(render), score_threshold=0.0)
    model = make_small_model(detector_kwargs={**SMALL_RCNN, "box_score_thresh": 0.0})
    data = CocoDataModule(predict_images=str(photos), num_workers=0)
    make_trainer(tmp_path, callbacks=[writer]).predict(model, datamodule=data, ckpt_path=ckpt, return_predictions=False)
    assert _untouched(outside)
    detections = json.loads((out / "detections.json").read_text())
    ids = {im["id"]: im["file_name"] for im in data.datasets["predict"].base.coco.dataset["images"]}
    assert {d["file_name"] for d in detections} == {"a.png", "a.jpg", "c.png"}
    assert all(d["file_name"] == ids[d["image_id"]] for d in detections)
    pngs = {p.name: p for p in render.iterdir() if not p.is_symlink()}
    assert sorted(pngs) == ["a.jpg.png", "a.png.png", "c.png"] and not (render / "c.png").is_symlink()
    for name, png in pngs.items():
        with Image.open(png) as drawn:
            assert drawn.size == sizes[name.removesuffix(".png") if name != "c.png" else name]
