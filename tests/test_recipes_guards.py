"""The recipe never goes silently wrong: one class map from training (checkpoint and export), clear messages for
malformed folders, checkpoints of another architecture, file modes, stale temporary files, existing exports, and the
public names of ``attnzoo.recipes``."""

import json
import os
import stat
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from attnzoo.recipes.callbacks import ExportWeights, PredictionWriter, RemoveStaleTempFiles
from attnzoo.recipes.checkpoint_io import AtomicCheckpointIO, atomic_write, remove_stale_temp_files
from attnzoo.recipes.cli import run_cli
from attnzoo.recipes.data import ImageDataModule
from attnzoo.recipes.module import ImageClassifier

TINY = dict(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0)
COLOURS = {"ant": (0, 0, 255), "cat": (255, 0, 0), "dog": (0, 255, 0), "fish": (255, 255, 0)}


def _write_split(root, split, classes, per_class=4):
    for name in classes:
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), color=tuple(max(0, c - 20 * i) for c in COLOURS[name])).save(folder / f"{i}.png")


def _data(root, **kwargs) -> ImageDataModule:
    defaults = dict(
        root=str(root), batch_size=4, num_workers=0, augment=False, input_size=(3, 8, 8), crop_pct=1.0,
        interpolation="bilinear",
    )  # fmt: skip
    return ImageDataModule(**{**defaults, **kwargs})


def _model(num_classes=3, **kwargs) -> ImageClassifier:
    torch.manual_seed(0)
    defaults = dict(model_kwargs=TINY, lr=3e-3, base_batch_size=None, warmup_epochs=0, label_smoothing=0.0)
    return ImageClassifier("gated_vit_tiny_patch16_224", num_classes=num_classes, **{**defaults, **kwargs})


def _trainer(root, callbacks=(), **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False, default_root_dir=root,
        plugins=[AtomicCheckpointIO()],
    )  # fmt: skip
    return pl.Trainer(callbacks=list(callbacks), **{**defaults, **kwargs})


def test_fit_validate_and_export_share_the_training_class_map(tmp_path):
    _write_split(tmp_path, "train", ["cat", "dog", "fish"])
    _write_split(tmp_path, "val", ["dog", "fish"])  # a split may lack a training class
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    export = ExportWeights(dirpath=str(tmp_path / "export"))
    trainer = _trainer(tmp_path, callbacks=[checkpoint, export])
    trainer.fit(_model(), datamodule=_data(tmp_path))
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    assert fit_metrics["val/images"] == 8

    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["ImageDataModule"] == {"class_names": ["cat", "dog", "fish"]}
    assert json.loads((tmp_path / "export" / "config.json").read_text())["label_names"] == ["cat", "dog", "fish"]

    data = _data(tmp_path)
    validated = _trainer(tmp_path).validate(_model(), datamodule=data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")[0]
    assert {t for _, t in data.eval_dataset("val")} == {1, 2}  # dog and fish keep their training labels
    assert validated["val/images"] == 8
    for key in ("val/top1", "val/loss"):
        assert validated[key] == pytest.approx(fit_metrics[key], abs=1e-6), key

    digits = _data(tmp_path, dataset="embedded/sklearn_digits", val_split="test")  # classes '0'..'9'
    with pytest.raises(ValueError, match=r"split 'test' labels its classes differently from training"):
        _trainer(tmp_path).validate(_model(), datamodule=digits, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    _write_split(tmp_path / "renamed", "train", ["ant", "dog", "fish"])  # resuming on other training classes
    _write_split(tmp_path / "renamed", "val", ["dog"])
    with pytest.raises(ValueError, match=r"training split's classes differ from the checkpoint's \(new: \['ant'\]"):
        _trainer(tmp_path, max_epochs=3).fit(
            _model(), datamodule=_data(tmp_path / "renamed"), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
        )

    _write_split(tmp_path / "other", "train", ["cat", "dog", "fish"])
    _write_split(tmp_path / "other", "val", ["ant", "cat", "dog"])  # ant was never trained on
    with pytest.raises(ValueError, match=r"class\(es\) that training did not have: \['ant'\] \(4 images\)"):
        _trainer(tmp_path / "other").fit(_model(), datamodule=_data(tmp_path / "other"))


def test_flat_folders_and_splits_missing_a_class_get_the_right_advice(tmp_path):
    flat = tmp_path / "flat" / "train"
    flat.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8)).save(flat / f"{i}.png")
    _write_split(tmp_path / "flat", "val", ["cat", "dog", "fish"])
    with pytest.raises(ValueError, match="holds images directly, not in class subfolders"):
        _trainer(tmp_path).fit(_model(), datamodule=_data(tmp_path / "flat"))

    _write_split(tmp_path / "two", "test", ["dog", "fish"])  # no class map known: a 3-class model on 2 classes
    with pytest.raises(ValueError, match=r"no training class map is known.*evaluate the training checkpoint"):
        _trainer(tmp_path).test(_model(), datamodule=_data(tmp_path / "two", test_split="test"))
    _write_split(tmp_path / "two", "train", ["dog", "fish"])  # training 2 classes with 3 outputs: the old advice
    with pytest.raises(ValueError, match=r"training split 'train' has 2 classes \(dog, fish\).*num_classes: 2"):
        _trainer(tmp_path).fit(_model(), datamodule=_data(tmp_path / "two", val_split="test"))


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """LightningCLI writes ``config.yaml`` into the working folder when a run has no logger: keep it out of the repo."""
    monkeypatch.chdir(tmp_path)


CONFIG = """
model:
  model_name: gated_vit_tiny_patch16_224
  model_kwargs: {img_size: 8, patch_size: 4, embed_dim: %(embed)d, depth: 1, num_heads: 2, mlp_ratio: 4.0}
  num_classes: 10
data: {dataset: embedded/sklearn_digits, val_split: test, num_workers: 0, input_size: [3, 8, 8], crop_pct: 1.0,
       num_eval_samples: 20, eval_batch_size: 20}
trainer: {accelerator: cpu, logger: false, enable_progress_bar: false, enable_model_summary: false}
"""


def test_ckpt_path_of_another_architecture_names_the_differing_keys(tmp_path):
    module = ImageClassifier("gated_vit_tiny_patch16_224", model_kwargs={**TINY, "mlp_ratio": 4.0}, num_classes=10)
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0, enable_checkpointing=False)
    digits = dict(val_split="test", batch_size=8, num_workers=0, num_train_samples=8, input_size=(3, 8, 8), crop_pct=1)
    trainer.fit(module, datamodule=ImageDataModule("embedded/sklearn_digits", **digits))
    ckpt = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(ckpt)

    def validate(embed: int):
        config = tmp_path / f"embed{embed}.yaml"
        config.write_text(textwrap.dedent(CONFIG % {"embed": embed}))
        return run_cli(["validate", "--config", str(config), "--ckpt_path", str(ckpt)])

    assert validate(16).trainer.callback_metrics["val/images"] == 20  # the same architecture loads
    with pytest.raises(ValueError, match=r"model.model_kwargs.embed_dim: checkpoint 16, config 32") as err:
        validate(32)
    assert "model.pretrained" in str(err.value) and "mlp_ratio" not in str(err.value)  # 4.0 in both (from the YAML)


def test_last_checkpoint_follows_every_epoch_when_top1_does_not_improve(tmp_path):
    config = tmp_path / "frozen.yaml"  # lr 0: val/top1 never improves after the first epoch
    config.write_text(textwrap.dedent(CONFIG % {"embed": 16}))
    overrides = ["--model.lr", "0", "--model.warmup_lr", "0", "--model.min_lr", "0", "--model.warmup_epochs", "0"]
    overrides += ["--trainer.max_epochs", "3", "--trainer.limit_train_batches", "2", "--data.batch_size", "4"]
    overrides += ["--checkpoint.dirpath", str(tmp_path / "ckpt"), "--export.dirpath", str(tmp_path / "export")]
    overrides += ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path)]
    cli = run_cli(["fit", "--config", str(config), *overrides])
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 6)  # `--ckpt_path last` resumes after the third epoch
    assert [p.name for p in (tmp_path / "ckpt").glob("epoch*.ckpt")] == ["epoch000-step0000002.ckpt"]  # the best
    summary = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "TrainingSummary").summary
    assert summary["last_checkpoint"] == str(tmp_path / "ckpt" / "last.ckpt")


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_checkpoint_files_modes_stale_temps_and_existing_exports(tmp_path):
    from attnzoo.recipes.checkpoint_io import temp_path

    _write_split(tmp_path, "train", ["cat", "dog"])
    _write_split(tmp_path, "val", ["cat", "dog"])
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    stale = temp_path(ckpt_dir / "last.ckpt")  # what a kill -9 during a checkpoint write leaves
    stale.write_bytes(b"partial")
    keep = ckpt_dir / "notes.tmp"  # not a temporary checkpoint file

    def fit(**export_kwargs):
        cleanup = RemoveStaleTempFiles()
        callbacks = [ModelCheckpoint(dirpath=ckpt_dir, save_last=True), cleanup]
        callbacks.append(ExportWeights(dirpath=str(tmp_path / "export"), **export_kwargs))
        _trainer(tmp_path, callbacks=callbacks, max_epochs=1).fit(_model(2), datamodule=_data(tmp_path))
        return cleanup

    keep.write_bytes(b"x")
    old_umask = os.umask(0o027)
    try:
        assert fit().removed == [stale]
    finally:
        os.umask(old_umask)
    assert not stale.exists() and keep.exists()
    export_dir = tmp_path / "export"
    for path in (ckpt_dir / "last.ckpt", export_dir / "model.safetensors", export_dir / "config.json"):
        assert _mode(path) == 0o640, path  # 0o666 less the umask, as any other file
    assert not list(ckpt_dir.glob(".*.tmp"))

    weights = (tmp_path / "export" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds model.safetensors.*--export.overwrite true"):
        fit()
    assert (tmp_path / "export" / "model.safetensors").read_bytes() == weights  # refused before training
    fit(overwrite=True)


def test_stale_temp_clean_up_removes_only_the_recipes_own_temporary_files(tmp_path):
    during_write = []
    atomic_write(tmp_path / "last.ckpt", lambda f: during_write.extend(p.name for p in tmp_path.iterdir()))
    (leftover,) = during_write  # the temporary name atomic_write used, as a kill -9 would leave it
    (tmp_path / leftover).write_bytes(b"partial")
    users = [".notes.backup.tmp", ".last.ckpt.mine.tmp", ".model.safetensors.old.tmp", ".last.ckpt.4f2a9c.tmp"]
    for name in users:
        (tmp_path / name).write_text("a user's file")
    assert remove_stale_temp_files(tmp_path) == [tmp_path / leftover]
    assert all((tmp_path / name).read_text() == "a user's file" for name in users)


def _plant_links(folder, names, outside):
    folder.mkdir(parents=True, exist_ok=True)
    outside.mkdir(exist_ok=True)
    for name in names:
        (outside / name).write_text("not yours")
        (folder / name).symlink_to(outside / name)


def test_exports_never_write_through_links_and_a_dangling_link_counts_as_an_export(tmp_path, one_thread):
    from attnzoo.recipes.export import export_for_timm

    outside = tmp_path / "outside"
    _plant_links(tmp_path / "export", ["model.safetensors", "config.json"], outside)
    model = _model(2).model
    export_for_timm(model, tmp_path / "export")
    assert all(p.read_text() == "not yours" for p in outside.iterdir())
    for name in ("model.safetensors", "config.json"):
        assert not (tmp_path / "export" / name).is_symlink()
    assert json.loads((tmp_path / "export" / "config.json").read_text())["num_classes"] == 2

    _write_split(tmp_path, "train", ["cat", "dog"])
    _write_split(tmp_path, "val", ["cat", "dog"])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "model.safetensors").symlink_to(tmp_path / "nowhere")  # dangling
    export = ExportWeights(dirpath=str(tmp_path / "taken"))
    with pytest.raises(FileExistsError, match="already holds model.safetensors"):
        _trainer(tmp_path, callbacks=[export], max_epochs=1).fit(_model(2), datamodule=_data(tmp_path))


def test_prediction_csv_names_each_input_file_and_never_follows_a_link(tmp_path, one_thread):
    import csv

    _write_split(tmp_path, "train", ["cat", "dog"])
    _write_split(tmp_path, "val", ["cat", "dog"], per_class=3)
    outside = tmp_path / "outside"
    _plant_links(tmp_path / "out", ["predictions_rank0.csv"], outside)
    writer = PredictionWriter(dirpath=str(tmp_path / "out"), top_k=2)
    trainer = _trainer(tmp_path, callbacks=[writer])
    trainer.predict(_model(2), datamodule=_data(tmp_path), return_predictions=False)
    assert (outside / "predictions_rank0.csv").read_text() == "not yours"
    with open(tmp_path / "out" / "predictions_rank0.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(3)]
    assert [r["target"] for r in rows] == ["0"] * 3 + ["1"] * 3
    assert [int(r["index"]) for r in rows] == list(range(6))


def test_public_classes_are_exported_lazily():
    code = "import sys, attnzoo.recipes; assert 'lightning' not in sys.modules, 'attnzoo.recipes imported Lightning'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    import attnzoo.recipes as recipes
    from attnzoo.recipes import ImageClassifier as Classifier
    from attnzoo.recipes import ImageDataModule as DataModule

    assert Classifier is ImageClassifier and DataModule is ImageDataModule
    assert set(recipes.__all__) <= set(dir(recipes))
    for name in recipes.__all__:
        assert getattr(recipes, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'ImageDetector'"):
        recipes.ImageDetector  # noqa: B018
