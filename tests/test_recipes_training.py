"""Short real training runs of the recipe on CPU: learning, mixup/EMA/layer decay, crash-and-resume, DDP."""

import csv
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import load_file

from attnzoo.recipes.callbacks import ExportWeights, TrainingSummary
from attnzoo.recipes.checkpoint_io import AtomicCheckpointIO
from attnzoo.recipes.data import ImageDataModule
from attnzoo.recipes.module import ImageClassifier

TINY = dict(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def make_data(**kwargs) -> ImageDataModule:
    defaults = dict(
        dataset="embedded/mnist_5k",
        val_split="test",
        batch_size=16,
        num_workers=0,
        augment=False,
        input_size=(3, 28, 28),
        crop_pct=1.0,
        num_train_samples=96,
        num_eval_samples=45,
    )
    return ImageDataModule(**{**defaults, **kwargs})


def make_model(**kwargs) -> ImageClassifier:
    torch.manual_seed(0)
    defaults = dict(
        model_name="gated_vit_tiny_patch16_224",
        model_kwargs=TINY,
        num_classes=10,
        lr=2e-3,
        base_batch_size=None,
        warmup_epochs=0.5,
        label_smoothing=0.0,
    )
    return ImageClassifier(**{**defaults, **kwargs})


def make_trainer(tmp_path, max_epochs=2, callbacks=(), **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        plugins=[AtomicCheckpointIO()],
        callbacks=list(callbacks),
        **kwargs,
    )


def fixed_batch_loss(module: ImageClassifier, num_samples: int) -> float:
    dm = make_data(num_train_samples=num_samples)
    dm.setup("fit")
    x, y = next(iter(torch.utils.data.DataLoader(dm.datasets["train"], batch_size=num_samples)))
    module.eval()
    with torch.no_grad():
        loss = F.cross_entropy(module(x), y).item()
    module.train()
    return loss


def test_training_lowers_the_loss_and_summarises(tmp_path, capsys):
    module = make_model(lr=3e-3)
    before = fixed_batch_loss(module, 32)
    summary = TrainingSummary()
    trainer = make_trainer(
        tmp_path, max_epochs=15, callbacks=[summary], enable_checkpointing=False, check_val_every_n_epoch=5
    )
    trainer.fit(module, datamodule=make_data(num_train_samples=32, batch_size=8))
    after = fixed_batch_loss(module, 32)
    assert after < 0.9 * before  # 60 steps on 32 digits: about 2.31 -> 1.84
    assert summary.summary["steps"] == 60 and summary.summary["metrics"]["val/images"] == 45
    assert "training summary: gated_vit_tiny_patch16_224, 60 steps" in capsys.readouterr().out


def test_mixup_ema_layer_decay_and_export(tmp_path):
    module = make_model(
        mixup=0.8, cutmix=1.0, label_smoothing=0.1, ema_decay=0.9, ema_warmup=True, layer_decay=0.75,
        model_kwargs={**TINY, "drop_path_rate": 0.1}, grad_checkpointing=True,
    )  # fmt: skip
    export = ExportWeights(dirpath=str(tmp_path / "export"))
    trainer = make_trainer(
        tmp_path, max_epochs=1, callbacks=[export], enable_checkpointing=False, gradient_clip_val=1.0
    )
    trainer.fit(module, datamodule=make_data())
    groups = trainer.optimizers[0].param_groups
    lrs = {g["lr_scale"] for g in groups}
    assert min(lrs) == pytest.approx(0.75**3) and max(lrs) == 1.0  # patch embed ... head of a depth-2 ViT
    top = max(g["lr"] for g in groups)  # the scheduler scales every group's lr by its layer decay
    assert top > 0 and all(g["lr"] == pytest.approx(top * g["lr_scale"]) for g in groups)
    no_decay = {id(p) for g in trainer.optimizers[0].param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    for name, param in module.model.named_parameters():  # norms, biases and no_weight_decay() names (pos_embed)
        assert (id(param) in no_decay) == (param.ndim <= 1 or name in module.model.no_weight_decay()), name
    metrics = trainer.callback_metrics
    assert {"val/top1", "val_ema/top1", "val/top5", "val_ema/loss"} <= set(metrics)
    raw = {k: v for k, v in module.model.state_dict().items()}
    ema = module.ema.module.state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    exported = load_file(export.weights_path)
    assert all(torch.equal(exported[k], ema[k]) for k in ema)  # EMA weights exported by default


class CrashAt(Callback):
    """Simulates a crash: raises at the start of optimizer step ``step`` (after the checkpoint of ``step - 1``)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def _final_state(module: ImageClassifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("num_workers", [0, 1])  # with workers, Lightning builds the loader iterator before restoring
def test_crash_and_resume_equals_an_uninterrupted_run(tmp_path, num_workers):
    kwargs = dict(
        mixup=0.8, cutmix=1.0, label_smoothing=0.1, ema_decay=0.9, ema_warmup=True,
        model_kwargs={**TINY, "drop_path_rate": 0.2},
    )  # fmt: skip
    # the default random augmentation (random resized crop, flip, RandAugment rand-m9-mstd0.5-inc1, random erasing)
    data = dict(num_workers=num_workers, augment=True)
    # 96 images / 16 = 6 steps per epoch, 2 epochs; the crash comes in the middle of epoch 1
    reference = make_model(**kwargs)
    make_trainer(tmp_path / "a", enable_checkpointing=False).fit(reference, datamodule=make_data(**data))

    def checkpoints(folder):
        return ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=1, save_top_k=0)

    crashed = make_model(**kwargs)
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(tmp_path / "b", callbacks=[checkpoints(tmp_path / "ckpt"), CrashAt(8)]).fit(
            crashed, datamodule=make_data(**data)
        )
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 8
    assert not list((tmp_path / "ckpt").glob("*.tmp"))  # atomic writes leave no temporary files

    resumed = make_model(**{**kwargs, "seed": 0})
    trainer = make_trainer(tmp_path / "c", callbacks=[checkpoints(tmp_path / "ckpt")])
    trainer.fit(resumed, datamodule=make_data(**data), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 12
    expected, got = _final_state(reference), _final_state(resumed)
    assert expected.keys() == got.keys()
    for key in expected:  # raw and EMA weights (the EMA lives in the module's state dict)
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


DDP_CONFIG = """
seed_everything: 0
model:
  model_name: gated_vit_tiny_patch16_224
  model_kwargs: {img_size: 28, patch_size: 7, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2.0}
  num_classes: 10
  lr: 2.0e-3
  base_batch_size: 16
  warmup_epochs: 0.5
  label_smoothing: 0.1
  ema_decay: 0.9
data:
  dataset: embedded/mnist_5k
  val_split: test
  num_workers: 0
  augment: false
  input_size: [3, 28, 28]
  crop_pct: 1.0
  num_train_samples: 64
  num_eval_samples: 45
  eval_batch_size: 8
trainer:
  accelerator: cpu
  max_epochs: 2
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  logger: {class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: %(out)s, name: csv}}
checkpoint: {dirpath: %(out)s/checkpoints}
export: {dirpath: %(out)s/export, weights: raw}
"""


def _run_cli(tmp_path, name, *overrides):
    out = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    config.write_text(textwrap.dedent(DDP_CONFIG % {"out": out}))
    cmd = [sys.executable, "-m", "attnzoo.recipes.cli", "fit", "--config", str(config), *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/top1")]
    return load_file(out / "export" / "model.safetensors"), rows[-1], result.stderr


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path):
    single, single_val, _ = _run_cli(tmp_path, "single", "--trainer.devices", "1", "--data.batch_size", "16")
    ddp, ddp_val, log = _run_cli(
        tmp_path, "ddp", "--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.batch_size", "8"
    )
    assert "MEMBER: 2/2" in log  # two gloo processes took part
    assert float(single_val["val/images"]) == float(ddp_val["val/images"]) == 45  # no padded duplicate counted
    assert float(ddp_val["val/top1"]) == pytest.approx(float(single_val["val/top1"]), abs=1e-6)
    assert float(ddp_val["val_ema/top1"]) == pytest.approx(float(single_val["val_ema/top1"]), abs=1e-6)
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
