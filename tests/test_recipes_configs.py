"""Every shipped YAML config parses with the CLI and names a registered model; bad configs give clear errors."""

import contextlib
import io
from pathlib import Path

import pytest
import timm
import yaml

import attnzoo  # noqa: F401  (registers the zoo models)
from attnzoo.recipes.cli import CONFIG_DIR, resolve_config_path, run_cli

# classification configs; coco/ and ade20k/ are tested by test_detection_configs / test_segmentation_configs
CONFIGS = sorted(p for p in CONFIG_DIR.glob("*/*.yaml") if p.parent.name not in ("coco", "ade20k"))
FAMILIES = ("nat", "dinat", "biformer", "agent_deit", "agent_pvt", "agent_swin", "gated_vit", "tome", "rmt", "ppma")


def _parse(*args: str) -> tuple[int | str, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", *args, "--print_config"])
    code = exit_info.value.code
    return code, out.getvalue(), err.getvalue() + (code if isinstance(code, str) else "")


def test_configs_exist_for_every_family_and_folder():
    names = {p.stem for p in (CONFIG_DIR / "imagenet").glob("*.yaml")}
    for family in FAMILIES:
        assert any(n.startswith(family + "_") for n in names), family
    assert (CONFIG_DIR / "demo" / "gated_vit_mnist.yaml").is_file()
    assert len(list((CONFIG_DIR / "finetune").glob("*.yaml"))) >= len(FAMILIES)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_parses_and_builds_its_model(path: Path):
    config = yaml.safe_load(path.read_text())
    name = config["model"]["model_name"]
    assert timm.is_model(name), f"{path.name}: model {name!r} is not registered in timm after `import attnzoo`"
    code, printed, err = _parse("--config", str(path))
    assert code == 0, err
    assert yaml.safe_load(printed)["model"]["model_name"] == name
    assert config["trainer"].get("use_distributed_sampler", False) is False
    kwargs = dict(config["model"].get("model_kwargs") or {})
    if config["model"].get("num_classes"):
        kwargs["num_classes"] = config["model"]["num_classes"]
    model = timm.create_model(name, device="meta", **kwargs)  # the kwargs are accepted by the model
    assert model.num_classes == config["model"].get("num_classes", 1000)


def test_shipped_config_names_resolve_from_anywhere():
    assert resolve_config_path("imagenet/nat_tiny.yaml") == str(CONFIG_DIR / "imagenet" / "nat_tiny.yaml")
    assert resolve_config_path("recipes/configs/demo/gated_vit_mnist.yaml").endswith("demo/gated_vit_mnist.yaml")
    assert resolve_config_path("mine.yaml") == "mine.yaml"


def test_bad_configs_give_clear_errors(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  model_name: gated_vit_tiny_patch16_224\n  lr: [1e-3\n")
    code, _, err = _parse("--config", str(broken))
    assert code != 0 and "broken.yaml is not valid YAML" in err

    unknown_key = tmp_path / "unknown_key.yaml"
    unknown_key.write_text("model:\n  model_name: gated_vit_tiny_patch16_224\n  learning_rate: 1e-3\n")
    code, _, err = _parse("--config", str(unknown_key))
    assert code != 0 and "does not accept option 'learning_rate'" in err

    wrong_type = tmp_path / "wrong_type.yaml"
    wrong_type.write_text("model:\n  model_name: gated_vit_tiny_patch16_224\n  lr: fast\n")
    code, _, err = _parse("--config", str(wrong_type))
    assert code != 0 and 'Parser key "model.lr"' in err and "fast" in err

    code, _, err = _parse("--config", str(tmp_path / "missing.yaml"))
    assert code != 0 and "missing.yaml" in err


def test_unknown_model_in_a_config_names_it(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("model:\n  model_name: gated_vit_tiny_patch16\ndata:\n  dataset: embedded/sklearn_digits\n")
    with pytest.raises(ValueError, match="unknown model 'gated_vit_tiny_patch16'.*did you mean"):
        run_cli(["--config", str(config)], run=False)
