"""The attnzoo console script."""

import subprocess
import sys
from pathlib import Path

import pytest

from attnzoo.cli import main
from attnzoo.profiling import format_table, profile_model, sample_image_path


def test_profile_command_profiles_a_model_on_a_real_photo(capsys):
    assert main(["profile", "--models", "gated_vit_tiny*", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "china.jpg (640x427)" in out
    row = next(line for line in out.splitlines() if line.startswith("gated_vit_tiny_patch16_224"))
    params, gmacs = float(row.split()[1]), float(row.split()[2])
    assert params == pytest.approx(6.16, abs=0.01)
    assert gmacs == pytest.approx(1.34, abs=0.005)  # DeiT-Ti's 1.26 GMACs + the gate's 12 x 197 x 192 x 192


def test_profile_report_fields():
    from PIL import Image

    report = profile_model("gated_vit_tiny_patch16_224", Image.open(sample_image_path("flower.jpg")), repeats=1)
    assert report.input_size == (3, 224, 224) and report.output_shape == (1, 1000) and report.latency_ms > 0
    assert "gated_vit_tiny_patch16_224" in format_table([report])


def test_profile_rejects_unknown_pattern():
    with pytest.raises(ValueError, match="no attnzoo model matches"):
        main(["profile", "--models", "resnet*"])
    with pytest.raises(ValueError, match="sample image"):
        sample_image_path("owl.jpg")


def test_models_command(capsys):
    assert main(["models", "gated_vit_*"]) == 0
    assert capsys.readouterr().out.split() == [
        "gated_vit_base_patch16_224",
        "gated_vit_small_patch16_224",
        "gated_vit_tiny_patch16_224",
    ]


def test_demo_trains_evaluates_exports_and_reloads(tmp_path, monkeypatch, capsys):
    """The README's `attnzoo demo`, shortened to one epoch on 64 digits (the full run is measured in the README)."""
    monkeypatch.chdir(tmp_path)
    overrides = ["--trainer.max_epochs", "1", "--data.num_train_samples", "64", "--data.num_eval_samples", "40"]
    assert main(["demo", *overrides, "--trainer.enable_progress_bar", "false"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("demo finished: held-out top-1"))
    assert "on 40 images" in line and line.endswith("runs/demo/export/model.safetensors")
    assert (tmp_path / "runs/demo/export/config.json").is_file() and (
        tmp_path / "runs/demo/checkpoints/last.ckpt"
    ).is_file()
    assert list((tmp_path / "runs/demo/csv").glob("version_*/metrics.csv"))
    assert list((tmp_path / "runs/demo/tensorboard").glob("version_*/events.out.tfevents.*"))
    predict = ["predict", "--config", "demo/gated_vit_mnist.yaml", "--data.num_eval_samples", "40"]
    assert main([*predict, "--ckpt_path", "runs/demo/checkpoints/last.ckpt"]) == 0
    rows = (tmp_path / "runs/demo/predictions_rank0.csv").read_text().splitlines()
    assert rows[0] == "index,file,target,classes,probabilities" and len(rows) == 41  # embedded digits: no files


@pytest.mark.parametrize("command", [[], ["profile"], ["models"], ["fit"], ["demo"]])
def test_help_for_every_command(command):
    script = Path(sys.executable).parent / "attnzoo"  # the console script installed beside this interpreter
    out = subprocess.run([str(script), *command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: attnzoo" in out.stdout


def test_fit_without_a_logger(tmp_path, monkeypatch):
    """Lightning's LearningRateMonitor stops a logger-less run; the recipe's stays idle instead."""
    monkeypatch.chdir(tmp_path)
    small = ["--data.num_train_samples", "32", "--data.num_eval_samples", "16", "--trainer.max_epochs", "1"]
    args = ["fit", "--config", "demo/gated_vit_mnist.yaml", "--trainer.logger", "false", *small]
    assert main([*args, "--trainer.enable_progress_bar", "false"]) == 0
    assert (tmp_path / "runs/demo/checkpoints/last.ckpt").is_file()
