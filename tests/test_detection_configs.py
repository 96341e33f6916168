"""Every shipped COCO config parses with `attnzoo detect` and builds its detector (on the meta device)."""

import contextlib
import io
from pathlib import Path

import pytest
import torch
import yaml

from attnzoo.recipes.cli import CONFIG_DIR
from attnzoo.recipes.detection import ObjectDetector
from attnzoo.recipes.detection.cli import run_cli
from attnzoo.recipes.detection.schedule import SCHEDULES

CONFIGS = sorted((CONFIG_DIR / "coco").glob("*.yaml"))
EXPECTED = {
    f"{b}_mask_rcnn_{s}"
    for b in ("nat_tiny", "dinat_tiny", "biformer_small", "agent_pvt_small", "agent_swin_tiny", "metapool_hybrid_s12")
    for s in ("1x", "3x")
} | {"biformer_small_retinanet_1x", "agent_pvt_tiny_retinanet_1x"}
EXPECTED |= {f"ppma_{size}_mask_rcnn_1x" for size in ("tiny", "small", "base")}


def _print_config(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", *args, "--print_config"])
    return exit_info.value.code, out.getvalue(), err.getvalue()


def test_the_issue_configs_are_shipped():
    assert {p.stem for p in CONFIGS} == EXPECTED


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_and_builds_on_meta(path: Path):
    text = path.read_text()
    assert "# Reported result for the official setting:" in text.splitlines()[2]
    code, printed, err = _print_config("--config", str(path))
    assert code == 0, err
    config = yaml.safe_load(printed)
    model = config["model"]
    assert path.stem == f"{model['backbone']}_{model['arch']}_{model['schedule']}"
    epochs, milestones = SCHEDULES[model["schedule"]]
    assert config["trainer"]["max_epochs"] == epochs
    assert config["trainer"]["use_distributed_sampler"] is False
    with torch.device("meta"):
        detector = ObjectDetector(**{**model, "pretrained_backbone": False})
    if model["arch"] == "mask_rcnn":
        assert detector.model.roi_heads.has_mask() and detector.iou_types == ("bbox", "segm")
    assert detector.milestones == milestones
    assert next(detector.parameters()).device.type == "meta"


def test_shipped_coco_config_resolves_by_name():
    code, printed, err = _print_config("--config", "coco/nat_tiny_mask_rcnn_3x.yaml")
    assert code == 0, err
    assert yaml.safe_load(printed)["model"]["backbone"] == "nat_tiny"
