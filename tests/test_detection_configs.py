"""Every shipped COCO config parses with `attnzoo detect`, builds its detector (on the meta device) and, for a
published row, has the published parameter count (80 classes) within 1.5%."""

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
# Parameters (millions) of the published rows, from the papers' READMEs (shared/downstream.md, section 1).
PUBLISHED_PARAMS = {
    "nat_mini_mask_rcnn_3x": 40,
    "nat_tiny_mask_rcnn_3x": 48,
    "nat_mini_cascade_mask_rcnn_3x": 77,
    "nat_tiny_cascade_mask_rcnn_3x": 85,
    "dinat_mini_mask_rcnn_3x": 40,
    "dinat_tiny_mask_rcnn_3x": 48,
    "dinat_mini_cascade_mask_rcnn_3x": 77,
    "dinat_tiny_cascade_mask_rcnn_3x": 85,
    "agent_swin_tiny_mask_rcnn_1x": 48,
    "agent_swin_tiny_mask_rcnn_3x": 48,
    "agent_swin_tiny_cascade_mask_rcnn_1x": 86,
    "agent_swin_tiny_cascade_mask_rcnn_3x": 86,
    "agent_pvt_tiny_mask_rcnn_1x": 31,
    "agent_pvt_small_mask_rcnn_1x": 40,
    "agent_pvt_tiny_retinanet_1x": 21,
    "agent_pvt_small_retinanet_1x": 30,
    "ppma_tiny_mask_rcnn_1x": 33,  # PPMA README
    "ppma_small_mask_rcnn_1x": 46,
    "ppma_base_mask_rcnn_1x": 73,
}
PUBLISHED_WITHOUT_PARAMS = {"biformer_small_mask_rcnn_1x", "biformer_small_retinanet_1x"}
NOT_PUBLISHED = {
    "nat_tiny_mask_rcnn_1x",
    "dinat_tiny_mask_rcnn_1x",
    "biformer_small_mask_rcnn_3x",
    "agent_pvt_small_mask_rcnn_3x",
    "metapool_hybrid_s12_mask_rcnn_1x",
    "metapool_hybrid_s12_mask_rcnn_3x",
}
EXPECTED = set(PUBLISHED_PARAMS) | PUBLISHED_WITHOUT_PARAMS | NOT_PUBLISHED


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
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "# Reported result for the official setting:" in text.splitlines()[2]
    assert "assumed" not in header and "not reported in the project" not in header
    assert ("not a published row" in header) == (path.stem in NOT_PUBLISHED)
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
    if model["arch"] in ("mask_rcnn", "cascade_mask_rcnn"):
        assert detector.model.roi_heads.has_mask() and detector.iou_types == ("bbox", "segm")
    assert detector.milestones == milestones
    assert next(detector.parameters()).device.type == "meta"
    if path.stem in PUBLISHED_PARAMS:
        published = PUBLISHED_PARAMS[path.stem]
        assert f"{published}M parameters" in header
        params = sum(p.numel() for p in detector.parameters()) / 1e6
        assert abs(params / published - 1) <= 0.015, f"{params:.2f}M parameters, published {published}M"


def test_shipped_coco_config_resolves_by_name():
    code, printed, err = _print_config("--config", "coco/nat_tiny_mask_rcnn_3x.yaml")
    assert code == 0, err
    assert yaml.safe_load(printed)["model"]["backbone"] == "nat_tiny"
