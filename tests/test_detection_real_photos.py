"""Detection on real photos: the two annotated NEON tiles of the DeepForest wheel (tests/data/deepforest), converted
with the project's CSV / VOC -> COCO converter, fitted by a short CPU training of a Faster R-CNN on a small zoo
backbone. This shows that the recipe learns on real aerial imagery (AP50 on the annotated tiles from ~0 to well
above); the tiles are both the training and the evaluation set, so it is not a generalisation claim."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from attnzoo.recipes.detection.coco_convert import csv_to_coco, merge_coco, voc_to_coco
from attnzoo.recipes.detection.data import CocoDataModule
from attnzoo.recipes.detection.module import ObjectDetector

DATA = Path(__file__).parent / "data" / "deepforest"
STEPS = 60


def _trees_json(tmp_path: Path) -> str:
    """Both tiles as one "Tree" category: OSBS_029 from its CSV (61 boxes), SOAP_061 from its VOC xml (37)."""
    osbs = csv_to_coco(DATA / "OSBS_029.csv", DATA, rename_images={"OSBS_029.tif": "OSBS_029.png"})
    soap = voc_to_coco(DATA / "SOAP_061.xml", DATA, label_map={"Alive": "Tree", "Dead": "Tree"})
    out = tmp_path / "trees.json"
    merge_coco(osbs, soap, out_json=out)
    return str(out)


@pytest.mark.slow
def test_short_training_on_deepforest_tiles_raises_ap50(tmp_path):
    ann = _trees_json(tmp_path)
    data = CocoDataModule(
        train_ann=ann,
        train_images=str(DATA),
        val_ann=ann,
        val_images=str(DATA),
        batch_size=2,
        eval_batch_size=2,
        num_workers=0,
        train_scales=[256],  # the 400 px tiles at 256 px: crowns of 10-40 px
        train_max_size=256,
        hflip=0.5,
        aspect_ratio_bins=None,
    )
    torch.manual_seed(0)
    model = ObjectDetector(
        "faster_rcnn",
        "agent_pvt_tiny",
        num_classes=1,
        backbone_kwargs={"depths": [1, 1, 1, 1]},
        fpn_channels=64,
        min_size=256,
        max_size=256,
        lr=1e-3,
        schedule=None,
        epochs=STEPS,  # one step per epoch (two images, batch 2)
        milestones=[STEPS],
        warmup_steps=10,
        results_dir=str(tmp_path / "detections"),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=STEPS,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=5.0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        default_root_dir=str(tmp_path),
    )
    untrained = trainer.test(model, datamodule=data, verbose=False)[0]["test/bbox_AP50"]
    trainer.fit(model, datamodule=data)
    trained = trainer.test(model, datamodule=data, verbose=False)[0]["test/bbox_AP50"]
    print(f"DeepForest tiles (98 trees), Faster R-CNN: AP50 untrained {untrained:.3f}, trained {trained:.3f}")
    assert untrained < 0.1
    assert trained > 0.5 and trained > untrained + 0.4
