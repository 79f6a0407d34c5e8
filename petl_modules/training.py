"""The one SpeechBrain Brain of every recipe: training, validation with checkpoint selection, testing.

Also the pieces it needs that SpeechBrain does not offer as we want them: a per-step cosine schedule that
checkpoints, a checkpointer that saves only the trainable state and saves atomically, the RNG state as a
recoverable (so a resumed run continues exactly), SpecAugment on AST's fbank, and classification metrics.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import speechbrain as sb
import torch
import torch.nn.functional as F
from speechbrain.dataio.sampler import ReproducibleRandomSampler
from speechbrain.utils.checkpoints import (
    Checkpoint,
    Checkpointer,
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)

from .backbones.ast import ASTBackbone, SpecAugment
from .model import PETLModel

logger = logging.getLogger(__name__)

MetricFn = Callable[[torch.Tensor], float]


# --- metrics ------------------------------------------------------------------------------------


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts; row = true class, column = predicted class."""
    flat = targets.long() * num_classes + predictions.long()
    return torch.bincount(flat.cpu(), minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(confusion: torch.Tensor) -> float:
    total = confusion.sum().item()
    return confusion.diagonal().sum().item() / total if total else 0.0


def _present(confusion: torch.Tensor) -> torch.Tensor:
    """Classes that occur in the targets or the predictions (absent classes would add zeros)."""
    return (confusion.sum(dim=1) + confusion.sum(dim=0)) > 0


def macro_f1(confusion: torch.Tensor) -> float:
    """Mean F1 over the classes present in targets or predictions."""
    confusion = confusion.double()
    true_pos = confusion.diagonal()
    denominator = confusion.sum(dim=0) + confusion.sum(dim=1)
    f1 = torch.where(denominator > 0, 2 * true_pos / denominator.clamp(min=1), torch.zeros_like(true_pos))
    present = _present(confusion)
    return f1[present].mean().item() if present.any() else 0.0


def unweighted_accuracy(confusion: torch.Tensor) -> float:
    """Mean per-class recall over the classes present in the targets (IEMOCAP's "UA")."""
    support = confusion.sum(dim=1)
    recall = confusion.diagonal().double()[support > 0] / support[support > 0]
    return recall.mean().item() if len(recall) else 0.0


BASE_METRICS: dict[str, MetricFn] = {"accuracy": accuracy, "macro_f1": macro_f1}


# --- checkpointing ------------------------------------------------------------------------------


@register_checkpoint_hooks
class TrainableState:
    """Checkpoints a PETLModel's trainable tensors only (never the frozen backbone)."""

    def __init__(self, model: PETLModel) -> None:
        self.model = model

    @mark_as_saver
    def save(self, path: Path) -> None:
        torch.save(self.model.trainable_state_dict(), path)

    @mark_as_loader
    def load(self, path: Path, end_of_epoch: bool) -> None:
        self.model.load_trainable_state_dict(torch.load(path, map_location="cpu"))


@register_checkpoint_hooks
class RNGState:
    """Python, NumPy and torch generators, so that a resumed run draws what the uninterrupted one drew."""

    @mark_as_saver
    def save(self, path: Path) -> None:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(state, path)

    @mark_as_loader
    def load(self, path: Path, end_of_epoch: bool) -> None:
        state = torch.load(path, weights_only=False)
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class AtomicCheckpointer(Checkpointer):
    """A Checkpointer whose checkpoints appear whole or not at all.

    SpeechBrain writes CKPT.yaml first and the parameter files after, so a run killed while saving leaves a
    checkpoint that looks valid and fails to load. Here each checkpoint is written in a staging folder and
    renamed into place (an atomic rename on one file system). Single-process saving (no DDP) is assumed.
    """

    STAGING = ".staging"

    def __init__(self, checkpoints_dir: str | Path, *args, **kwargs) -> None:
        super().__init__(checkpoints_dir, *args, **kwargs)
        shutil.rmtree(Path(checkpoints_dir) / self.STAGING, ignore_errors=True)

    def save_checkpoint(
        self,
        meta: Mapping | None = None,
        end_of_epoch: bool = True,
        name: str | None = None,
        verbosity: int = logging.INFO,
    ) -> Checkpoint:
        final_dir = self._custom_checkpoint_dirpath(name) if name else self._new_checkpoint_dirpath()
        root = self.checkpoints_dir
        self.checkpoints_dir = root / self.STAGING
        try:
            staged = super().save_checkpoint(
                meta=dict(meta or {}),
                end_of_epoch=end_of_epoch,
                name=final_dir.name.split("+", 1)[1],
                verbosity=logging.DEBUG,
            )
        finally:
            self.checkpoints_dir = root
        os.replace(staged.path, final_dir)
        logger.log(verbosity, "Saved a checkpoint in %s", final_dir)
        return Checkpoint(
            final_dir, staged.meta, {key: final_dir / path.name for key, path in staged.paramfiles.items()}
        )


@register_checkpoint_hooks
class CosineSchedule:
    """Per-optimizer-step learning rate: linear warm-up to the base lr, then cosine decay to 0 (papers)."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0) -> None:
        if warmup_steps >= total_steps > 0:
            raise ValueError(f"warmup_steps ({warmup_steps}) must be smaller than the {total_steps} training steps")
        self.optimizer = optimizer
        self.total_steps = max(total_steps, 1)
        self.warmup_steps = warmup_steps
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.steps = 0
        self._apply()

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * self.factor(self.steps)

    def step(self) -> None:
        self.steps += 1
        self._apply()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @mark_as_saver
    def save(self, path: Path) -> None:
        torch.save({"steps": self.steps, "total_steps": self.total_steps}, path)

    @mark_as_loader
    def load(self, path: Path, end_of_epoch: bool) -> None:
        self.steps = torch.load(path)["steps"]
        self._apply()


# --- SpecAugment --------------------------------------------------------------------------------


def add_spec_augment(model: PETLModel, freq_mask: int, time_mask: int) -> bool:
    """SpecAugment on AST's fbank during training; False (unchanged) for waveform backbones."""
    if not isinstance(model.backbone, ASTBackbone):
        logger.info("SpecAugment skipped: %s takes waveforms, not an fbank", type(model.backbone).__name__)
        return False
    model.backbone.spec_augment = SpecAugment(freq_mask, time_mask)
    return True


# --- the Brain ----------------------------------------------------------------------------------


class PETLBrain(sb.Brain):
    """Cross-entropy classification with a PETLModel in `modules["model"]`.

    Only trainable parameters reach AdamW; the cosine schedule steps with the optimizer. Each validation saves
    a checkpoint carrying the validation metrics, keeping the best (by `selection_metric`) and the latest;
    `evaluate` then loads the best one. Expects hparams: `num_classes`, `number_of_epochs`, `seed`,
    `warmup_steps`, `selection_metric`, `train_logger`, `train_dataloader_options`.
    """

    def __init__(
        self, *args, metrics: Mapping[str, MetricFn] | None = None, extra_loggers: tuple = (), **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self.metrics = dict(metrics or BASE_METRICS)
        self.extra_loggers = extra_loggers
        self.steps_per_epoch = 0
        self.lr_schedule: CosineSchedule | None = None
        self.train_loss: float | None = None
        self.test_stats: dict | None = None
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable("rng", RNGState())

    def make_train_loader(self, dataset) -> torch.utils.data.DataLoader:
        """A checkpointable loader whose order depends on the seed and the epoch only (resumable)."""
        sampler = ReproducibleRandomSampler(dataset, seed=self.hparams.seed)
        self.train_sampler = sampler  # fit() calls set_epoch on it
        loader = self.make_dataloader(dataset, sb.Stage.TRAIN, sampler=sampler, **self.hparams.train_dataloader_options)
        self.steps_per_epoch = len(loader)
        return loader

    def init_optimizers(self) -> None:
        trainable = [p for p in self.modules.parameters() if p.requires_grad]
        self.optimizer = self.opt_class(trainable)
        self.optimizers_dict = {"opt_class": self.optimizer}
        total_steps = self.hparams.number_of_epochs * math.ceil(self.steps_per_epoch / self.grad_accumulation_factor)
        self.lr_schedule = CosineSchedule(self.optimizer, total_steps, self.hparams.warmup_steps)
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable("optimizer", self.optimizer)
            self.checkpointer.add_recoverable("lr_schedule", self.lr_schedule)

    def compute_forward(self, batch, stage: sb.Stage) -> torch.Tensor:
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        return self.modules.model(wavs, wav_lens)

    def compute_objectives(self, logits: torch.Tensor, batch, stage: sb.Stage) -> torch.Tensor:
        targets = batch.label_index.to(logits.device)
        if stage != sb.Stage.TRAIN:
            self.confusion += confusion_matrix(logits.argmax(dim=-1), targets, self.hparams.num_classes)
        return F.cross_entropy(logits.float(), targets)

    def on_fit_batch_end(self, batch, outputs, loss, should_step: bool) -> None:
        if should_step:
            self.lr_schedule.step()

    def on_stage_start(self, stage: sb.Stage, epoch: int | None = None) -> None:
        if stage != sb.Stage.TRAIN:
            self.confusion = torch.zeros(self.hparams.num_classes, self.hparams.num_classes, dtype=torch.long)

    def stage_metrics(self, loss: float) -> dict[str, float]:
        return {"loss": float(loss), **{name: metric(self.confusion) for name, metric in self.metrics.items()}}

    def _log(self, stats_meta: dict, **stats: dict) -> None:
        for train_logger in (self.hparams.train_logger, *self.extra_loggers):
            train_logger.log_stats(stats_meta, **stats)

    def on_stage_end(self, stage: sb.Stage, stage_loss: float, epoch: int | None = None) -> None:
        if stage == sb.Stage.TRAIN:
            self.train_loss = float(stage_loss)
            return
        stats = self.stage_metrics(stage_loss)
        if stage == sb.Stage.VALID:
            self._log(
                {"epoch": epoch, "lr": self.lr_schedule.lr}, train_stats={"loss": self.train_loss}, valid_stats=stats
            )
            self.checkpointer.save_and_keep_only(
                meta={**stats, "epoch": epoch}, max_keys=[self.hparams.selection_metric], num_to_keep=1
            )
        else:
            best = self.best_checkpoint()
            self._log({"epoch chosen": best.meta["epoch"] if best else None}, test_stats=stats)
            self.test_stats = {**stats, "confusion_matrix": self.confusion.tolist()}

    def best_checkpoint(self) -> Checkpoint | None:
        """The checkpoint selected on validation (the one `evaluate` loads)."""
        return self.checkpointer.find_checkpoint(max_key=self.hparams.selection_metric)


def extra_train_loggers(hparams: Mapping) -> tuple:
    """TensorBoard and wandb loggers when asked for; imported lazily, with a clear error when missing."""
    loggers = []
    if hparams.get("use_tensorboard"):
        try:
            from speechbrain.utils.train_logger import TensorboardLogger

            loggers.append(TensorboardLogger(save_dir=str(Path(hparams["output_folder"]) / "tensorboard")))
        except ImportError as error:
            raise RuntimeError(f"--use_tensorboard=True needs the tensorboard package ({error})") from None
    if hparams.get("use_wandb"):
        loggers.append(WandbLogger(hparams))
    return tuple(loggers)


class WandbLogger:
    """Logs the same stats as train_log.txt to Weights & Biases (one run per fold)."""

    def __init__(self, hparams: Mapping) -> None:
        try:
            import wandb
        except ImportError:
            raise RuntimeError("--use_wandb=True needs the wandb package (pip install wandb)") from None
        self.run = wandb.init(
            project=hparams.get("wandb_project"),
            dir=str(hparams["output_folder"]),
            name=f"{hparams['method_name']}-{hparams['backbone']}-{Path(hparams['output_folder']).name}",
            config={k: v for k, v in hparams.items() if isinstance(v, (int, float, str, bool))},
            reinit=True,
        )

    def log_stats(
        self,
        stats_meta: dict,
        train_stats: dict | None = None,
        valid_stats: dict | None = None,
        test_stats: dict | None = None,
        verbose: bool = False,
    ) -> None:
        record = dict(stats_meta)
        for prefix, stats in (("train", train_stats), ("valid", valid_stats), ("test", test_stats)):
            record.update({f"{prefix}/{key}": value for key, value in (stats or {}).items()})
        self.run.log(record)
