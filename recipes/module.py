"""``ImageClassifier``: a LightningModule that trains any timm model (attnzoo's or timm's) with the DeiT/Swin recipe.

The optimizer lives in ``configure_optimizers`` (LightningCLI's automatic optimizer only sees ``model.parameters()``
and cannot build parameter groups): any timm optimizer through ``timm.optim.create_optimizer_v2``, no weight decay on
norms / biases / the model's ``no_weight_decay()`` names, optional layer-wise lr decay (fine-tuning), timm's cosine
schedule with warm-up and cool-down updated every optimizer step, and the linear lr scaling rule. Mixup/CutMix
(``timm.data.Mixup``) with soft-target cross-entropy, label smoothing, drop path (``model_kwargs.drop_path_rate``) and
an EMA of the weights (timm's ``ModelEmaV3``, with optional warm-up) that is evaluated alongside the raw weights
(``val/*`` and ``val_ema/*``). Gradient clipping, precision and the strategy are Trainer settings.

A checkpoint restores only into the architecture it was trained with (``model_name``, ``model_kwargs``,
``num_classes``, ``probe``, ``probe_kwargs``); a different one is a ValueError naming the differing keys.

Frozen-backbone probing (``probe``: a head trained on the frozen model, optionally on cached features) is
:mod:`attnzoo.recipes.probe`; mixture-of-head models (``gate="moh"``) get their routers' load-balance loss added to
the task loss (``moh_balance_weight``, logged as ``train/moh_balance``).
"""

from __future__ import annotations

import difflib
import os
import random
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics import MeanMetric, MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy

import attnzoo  # noqa: F401  (registers the zoo models into timm)
from attnzoo.layers import moh_balance_loss

from .probe import ProbedModel
from .probe import cache_features as cache_probe_features

__all__ = ["ARCHITECTURE_HPARAMS", "ImageClassifier", "check_model_name", "create_step_scheduler", "scaled_lr"]

# the hyperparameters that fix the network (and so the checkpoint's keys and shapes)
ARCHITECTURE_HPARAMS = ("model_name", "model_kwargs", "num_classes", "probe", "probe_kwargs")


def check_model_name(name: str) -> None:
    """Raise a ``ValueError`` naming close matches when ``name`` is not in timm's registry."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; list them with `attnzoo models` or timm.list_models()"
    raise ValueError(f"unknown model {name!r} (model.model_name){hint}")


def scaled_lr(lr: float, global_batch_size: int, base_batch_size: int | None) -> float:
    """Linear scaling rule: ``lr`` is given for ``base_batch_size`` images per step (``None``: no scaling)."""
    if base_batch_size is None:
        return lr
    if base_batch_size < 1:
        raise ValueError(f"base_batch_size must be positive, got {base_batch_size}")
    return lr * global_batch_size / base_batch_size


def create_step_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    cooldown_steps: int = 0,
    warmup_lr: float = 0.0,
    min_lr: float = 0.0,
) -> Scheduler:
    """timm's cosine scheduler counted in optimizer steps (update it with ``step_update(num_updates=step)``).

    Steps ``0 .. warmup_steps`` go linearly from ``warmup_lr`` to each group's lr, a half cosine then goes to
    ``min_lr`` at ``total_steps - cooldown_steps``, and the last ``cooldown_steps`` stay at ``min_lr``; a group's
    ``lr_scale`` (layer decay) multiplies all three. The groups already hold the lr of step 0 on return.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if warmup_steps < 0 or cooldown_steps < 0 or warmup_steps + cooldown_steps > total_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) + cooldown_steps ({cooldown_steps}) must be within total_steps "
            f"({total_steps}) and non-negative"
        )
    scheduler = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=max(1, total_steps - warmup_steps - cooldown_steps),  # the cosine's length, after the warm-up
        warmup_epochs=warmup_steps,
        warmup_prefix=True,
        warmup_lr=warmup_lr,
        min_lr=min_lr,
        cooldown_epochs=cooldown_steps,
        step_on_epochs=False,
        updates_per_epoch=1,  # every length above is in optimizer steps
    )[0]
    scheduler.step_update(num_updates=0)
    return scheduler


def _eval_metrics(num_classes: int) -> MetricCollection:
    return MetricCollection(
        {
            "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
            "loss": MeanMetric(),
            "images": SumMetric(),
        }
    )


class ImageClassifier(pl.LightningModule):
    """Image classification with ``timm.create_model(model_name, **model_kwargs)``.

    Args:
        model_name: any timm model name (``import attnzoo`` registers the zoo's).
        model_kwargs: extra ``create_model`` arguments (``drop_path_rate``, ``img_size``, ``embed_dim``...).
        num_classes: classifier width (default: the model's, 1000).
        pretrained: ``True`` for the model's default weights, or the path of a weights file to fine-tune from
            (loaded through ``pretrained_cfg_overlay=dict(file=...)``, so timm's filter and head reset apply).
        optimizer: a ``timm.optim`` name (``adamw``, ``lamb``, ``sgd``...); ``optimizer_kwargs`` go to it.
        lr: peak learning rate for a global batch of ``base_batch_size`` (linear scaling; ``None``: as given).
        weight_decay: decoupled weight decay (not applied to 1-D parameters and ``no_weight_decay()`` names).
        layer_decay: layer-wise lr decay factor (fine-tuning; uses the model's ``group_matcher``).
        warmup_epochs: linear warm-up length in epochs (fractions allowed), from ``warmup_lr``.
        min_lr: the cosine's final learning rate (absolute, not scaled).
        cooldown_epochs: the last epochs of ``trainer.max_epochs`` held at ``min_lr`` (timm's cool-down).
        mixup, cutmix: Beta alphas (0 disables); ``mixup_prob``, ``mixup_switch_prob``, ``mixup_mode`` as in timm.
        label_smoothing: label smoothing of the (soft) targets.
        ema_decay: EMA decay of the weights (``None`` disables EMA); ``ema_warmup`` ramps the decay up.
        compile: ``torch.compile`` the model (in place, so checkpoint keys do not change).
        grad_checkpointing: activation checkpointing through ``model.set_grad_checkpointing``.
        seed: seed of the per-step randomness (drop path, mixup): step ``(epoch, batch)`` on rank ``r`` always draws
            the same numbers, so a resumed run repeats an uninterrupted one.
        probe: train only a head on the frozen model: ``linear``, ``ep``, ``simpool`` or ``attentive``
            (:class:`~attnzoo.recipes.probe.ProbedModel`; ``None``: train the whole model); ``probe_kwargs`` go to
            the head's pooling.
        cache_features: with ``probe``, run the backbone once over the training and validation images and train on
            the stored features (needs ``data.augment: false``; :func:`~attnzoo.recipes.probe.cache_features`).
        moh_balance_weight: weight of the mixture-of-head load-balance loss (models with ``gate="moh"``).
    """

    def __init__(
        self,
        model_name: str,
        model_kwargs: dict[str, Any] | None = None,
        num_classes: int | None = None,
        pretrained: bool | str = False,
        optimizer: str = "adamw",
        optimizer_kwargs: dict[str, Any] | None = None,
        lr: float = 1e-3,
        base_batch_size: int | None = 1024,
        weight_decay: float = 0.05,
        layer_decay: float | None = None,
        warmup_epochs: float = 5.0,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-5,
        cooldown_epochs: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: str = "batch",
        label_smoothing: float = 0.1,
        ema_decay: float | None = None,
        ema_warmup: bool = False,
        compile: bool = False,
        grad_checkpointing: bool = False,
        seed: int = 0,
        probe: str | None = None,
        probe_kwargs: dict[str, Any] | None = None,
        cache_features: bool = False,
        moh_balance_weight: float = 0.01,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_model_name(model_name)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        if (cache_features or probe_kwargs) and probe is None:
            raise ValueError(
                "model.cache_features and model.probe_kwargs need model.probe (linear, ep, simpool, attentive)"
            )
        if probe is not None and layer_decay is not None:
            raise ValueError("model.layer_decay does not apply to a probe (only its head trains); set it to null")
        if cache_features and (mixup > 0 or cutmix > 0):
            raise ValueError(
                "model.cache_features trains on stored features, which mixup/cutmix cannot mix; disable them"
            )
        if moh_balance_weight < 0:
            raise ValueError(f"moh_balance_weight must be >= 0, got {moh_balance_weight}")
        self.model = self._create_model()
        self.num_classes: int = self.model.num_classes
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.ema: ModelEmaV3 | None = None
        if ema_decay is not None:
            self.ema = ModelEmaV3(self.model, decay=ema_decay, use_warmup=ema_warmup)
            self.ema.requires_grad_(False)
            self.ema.train()  # only run in validation/test, where Lightning switches the whole module to eval
        self.mixup_fn: Mixup | None = None
        if mixup > 0 or cutmix > 0:
            self.mixup_fn = Mixup(
                mixup_alpha=mixup,
                cutmix_alpha=cutmix,
                prob=mixup_prob,
                switch_prob=mixup_switch_prob,
                mode=mixup_mode,
                label_smoothing=label_smoothing,
                num_classes=self.num_classes,
            )
        self.metrics = nn.ModuleDict(
            {prefix: _eval_metrics(self.num_classes) for prefix in ("val", "val_ema", "test", "test_ema")}
        )
        if compile:
            self.model.compile()

    def _create_model(self) -> nn.Module:
        hp = self.hparams
        kwargs = dict(hp.model_kwargs or {})
        if hp.num_classes is not None:
            kwargs["num_classes"] = hp.num_classes
        pretrained = hp.pretrained
        if isinstance(pretrained, str):
            if not os.path.isfile(pretrained):
                raise FileNotFoundError(f"model.pretrained: weights file {pretrained!r} not found")
            kwargs["pretrained_cfg_overlay"] = dict(file=pretrained)
            pretrained = True
        if hp.probe is not None:
            kwargs["num_classes"] = 0  # the probe brings its own classifier
        try:
            model = timm.create_model(hp.model_name, pretrained=pretrained, **kwargs)
        except TypeError as err:
            raise TypeError(f"model.model_kwargs {sorted(kwargs)} rejected by {hp.model_name}: {err}") from err
        if hp.probe is None:
            return model
        return ProbedModel(model, hp.probe, hp.num_classes or 1000, **(hp.probe_kwargs or {}))

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if stage == "fit" and self.mixup_fn is not None and getattr(dm, "batch_size", 0) % 2:
            raise ValueError(f"mixup/cutmix need an even data.batch_size, got {dm.batch_size}")
        if self.ema is not None and "fsdp" in type(self.trainer.strategy).__name__.lower():
            raise ValueError("the weight EMA (model.ema_decay) is not supported with FSDP; use DDP or disable it")
        if self.hparams.probe is not None:  # the frozen backbone is in eval mode on purpose
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
        if stage == "fit" and self.hparams.cache_features:
            cache_probe_features(self.model, dm, self.trainer.strategy.root_device)

    def global_batch_size(self) -> int:
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if batch_size is None:
            raise ValueError("the linear lr scaling needs the datamodule's batch_size (or model.base_batch_size: null)")
        return batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        lr = scaled_lr(hp.lr, self.global_batch_size(), hp.base_batch_size) if hp.base_batch_size else hp.lr
        optimizer = create_optimizer_v2(
            self.model,
            opt=hp.optimizer,
            lr=lr,
            weight_decay=hp.weight_decay,
            layer_decay=hp.layer_decay,
            **(hp.optimizer_kwargs or {}),
        )
        total = int(self.trainer.estimated_stepping_batches)
        steps_per_epoch = max(1, -(-int(self.trainer.num_training_batches) // self.trainer.accumulate_grad_batches))
        warmup = min(total, round(hp.warmup_epochs * steps_per_epoch))
        cooldown = min(total - warmup, round(hp.cooldown_epochs * steps_per_epoch))
        scheduler = create_step_scheduler(optimizer, total, warmup, cooldown, warmup_lr=hp.warmup_lr, min_lr=hp.min_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: Scheduler, metric: Any | None) -> None:
        """timm schedulers take the number of optimizer steps done (Lightning calls this after every step)."""
        scheduler.step_update(num_updates=self.global_step)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """ValueError naming the differing ``model.*`` keys when the checkpoint holds another architecture."""
        saved = checkpoint.get("hyper_parameters", {})
        differing = []
        for key in ARCHITECTURE_HPARAMS:
            old, new = saved.get(key), self.hparams.get(key)
            if key == "model_kwargs":
                old, new = old or {}, new or {}
                differing += [
                    f"model.model_kwargs.{k}: checkpoint {old.get(k)!r}, config {new.get(k)!r}"
                    for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k)
                ]
            elif old != new:
                differing.append(f"model.{key}: checkpoint {old!r}, config {new!r}")
        if differing and "hyper_parameters" in checkpoint:
            raise ValueError(
                "the checkpoint was trained with another architecture than the config asks for: "
                + "; ".join(differing)
                + ". To resume or evaluate it, use its model.* values; to start a new training from its weights, pass "
                "the exported weights (<run>/export/model.safetensors) as model.pretrained instead of --ckpt_path"
            )

    # ------------------------------------------------------------------ training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seed = hash((self.hparams.seed, self.current_epoch, batch_idx, self.global_rank)) % (2**31)
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of images ``(B, C, H, W)``."""
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, target = batch[0], batch[1]
        if self.mixup_fn is not None:
            x, target = self.mixup_fn(x, target)  # soft targets (B, num_classes), smoothing included
            loss = F.cross_entropy(self.model(x), target)
        else:
            loss = F.cross_entropy(self.model(x), target, label_smoothing=self.hparams.label_smoothing)
        balance = moh_balance_loss(self.model)
        if balance is not None:
            self.log("train/moh_balance", balance, on_step=True, on_epoch=True, batch_size=x.shape[0])
            loss = loss + self.hparams.moh_balance_weight * balance
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} at step {self.global_step}")
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: Any, prefix: str) -> None:
        x, target = batch[0], batch[1]
        real = batch[2] if len(batch) > 2 else torch.ones_like(target, dtype=torch.bool)
        models = [(prefix, self.model)]
        if self.ema is not None:
            models.append((f"{prefix}_ema", self.ema.module))
        for name, model in models:
            logits = model(x)[real].float()
            metrics = self.metrics[name]
            metrics["top1"].update(logits, target[real])
            metrics["top5"].update(logits, target[real])
            metrics["loss"].update(F.cross_entropy(logits, target[real], reduction="none"))
            metrics["images"].update(real.sum())
            for key, metric in metrics.items():
                self.log(f"{name}/{key}", metric, on_epoch=True, prog_bar=key == "top1")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        """Class probabilities ``(B, num_classes)`` with the targets and the real/padding flags of the batch."""
        x = batch[0]
        out = {"probs": self.model(x).softmax(-1)}
        if len(batch) > 1:
            out["target"] = batch[1]
        if len(batch) > 2:
            out["is_real"] = batch[2]
        return out
