"""The shipped ADE20K configs: each resolves through ``attnzoo segment --print_config`` and builds on the meta device
with the parameter count its header reports (the papers round to whole millions)."""

import re

import pytest
import torch
import yaml

from attnzoo.recipes.cli import CONFIG_DIR
from attnzoo.recipes.segmentation import SemanticSegmenter
from attnzoo.recipes.segmentation.cli import run_cli

CONFIGS = sorted((CONFIG_DIR / "ade20k").glob("*.yaml"))


def test_the_published_settings_are_shipped():
    names = {p.stem for p in CONFIGS}
    upernet = {
        f"upernet_{b}_160k"
        for b in ("nat_mini", "nat_tiny", "dinat_mini", "dinat_tiny", "biformer_small", "agent_swin_tiny")
        + ("ppma_tiny", "ppma_small", "ppma_base")
    }
    fpn = {"fpn_biformer_small_80k", "fpn_agent_pvt_tiny_40k", "fpn_agent_pvt_small_40k"}
    assert names == upernet | fpn


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_resolves_and_builds_on_meta(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", f"ade20k/{path.name}", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    config = yaml.safe_load(path.read_text())
    assert printed["model"]["backbone_kwargs"] == config["model"]["backbone_kwargs"]
    assert printed["trainer"]["max_steps"] == config["model"]["max_iters"]
    header = path.read_text().split("\nseed_everything", 1)[0]
    with torch.device("meta"):
        module = SemanticSegmenter(**{**config["model"], "pretrained_backbone": False})
    count = sum(p.numel() for p in module.parameters())
    published = re.search(r"(\d+)M parameters", header)
    if published:  # BiFormer publishes no segmentation parameter counts
        assert round(count / 1e6) == int(published.group(1)), count
