"""The one SpeechBrain Brain of every recipe: training, validation with checkpoint selection, testing.

Also the pieces it needs that SpeechBrain does not offer as we want them: a per-step cosine schedule that
checkpoints, a checkpointer that saves only the trainable state and saves atomically (also under DDP, where
rank 0 writes and the other ranks wait), the RNG state as a recoverable (so a resumed run continues exactly),
and classification metrics. SpecAugment is declared in the YAML (`augmentation`) and applied by
`compute_forward` on the training stage, as SpeechBrain recipes apply their augmentations.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import speechbrain as sb
import torch
import torch.nn.functional as F
from speechbrain.dataio.dataloader import LoopedLoader
from speechbrain.dataio.sampler import ReproducibleRandomSampler
from speechbrain.utils.checkpoints import (
    Checkpoint,
    Checkpointer,
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)
from speechbrain.utils.distributed import ddp_barrier, ddp_broadcast, if_main_process
from torch.utils.data import DataLoader

from .linear_cached import PooledOrFull, recipe_cache_blocker
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
        self.model.load_trainable_state_dict(torch.load(path, map_location="cpu", weights_only=True))


@register_checkpoint_hooks
class RNGState:
    """Python, NumPy and torch generators, so that a resumed run draws what the uninterrupted one drew.

    Saved as tensors, ints and strings only, so that it loads with `torch.load(weights_only=True)`: Python's
    state is (version, 625 ints, gauss) and NumPy's (name, 624 uint32 keys, pos, has_gauss, cached_gaussian).
    """

    @mark_as_saver
    def save(self, path: Path) -> None:
        version, python_state, gauss = random.getstate()
        name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
        state = {
            "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss},
            "numpy": {
                "name": name,
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached_gaussian),
            },
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(state, path)

    @mark_as_loader
    def load(self, path: Path, end_of_epoch: bool) -> None:
        state = torch.load(path, weights_only=True)
        python, numpy = state["python"], state["numpy"]
        random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
        np.random.set_state(
            (
                numpy["name"],
                numpy["keys"].numpy().astype(np.uint32),
                numpy["pos"],
                numpy["has_gauss"],
                numpy["cached_gaussian"],
            )
        )
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class AtomicCheckpointer(Checkpointer):
    """A Checkpointer whose checkpoints appear whole or not at all.

    SpeechBrain writes CKPT.yaml first and the parameter files after, so a run killed while saving leaves a
    checkpoint that looks valid and fails to load. Here each checkpoint is written in a staging folder and
    renamed into place (an atomic rename on one file system). Under DDP every rank calls `save_checkpoint`
    (SpeechBrain's savers are collective); rank 0 chooses the name, writes and renames, and the other ranks
    wait for the rename and return None, as SpeechBrain's Checkpointer does on them.
    """

    STAGING = ".staging"

    def __init__(self, checkpoints_dir: str | Path, *args, **kwargs) -> None:
        super().__init__(checkpoints_dir, *args, **kwargs)
        if if_main_process():
            shutil.rmtree(Path(checkpoints_dir) / self.STAGING, ignore_errors=True)

    def save_checkpoint(
        self,
        meta: Mapping | None = None,
        end_of_epoch: bool = True,
        name: str | None = None,
        verbosity: int = logging.INFO,
    ) -> Checkpoint | None:
        final_dir = None
        if if_main_process():
            final_dir = self._custom_checkpoint_dirpath(name) if name else self._new_checkpoint_dirpath()
        final_dir = ddp_broadcast(final_dir)
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
        if staged is not None:  # rank 0
            os.replace(staged.path, final_dir)
            (root / self.STAGING).rmdir()  # empty now: a finished run leaves no staging folder
            logger.log(verbosity, "Saved a checkpoint in %s", final_dir)
        ddp_barrier()  # the other ranks may read it from now on
        if staged is None:
            return None
        return Checkpoint(
            final_dir, staged.meta, {key: final_dir / path.name for key, path in staged.paramfiles.items()}
        )


@register_checkpoint_hooks
class CosineSchedule:
    """Per-optimizer-step learning rate: linear warm-up to the base lr, then cosine decay to 0 (papers).

    Training on: a schedule built for more steps than its checkpoint recorded (a finished run given more
    `number_of_epochs`) keeps the recorded cosine for the recorded steps and adds a new cosine over the added
    ones, from the base lr to 0 without warm-up. `segments` lists them as (first step, steps, warm-up steps), so
    a run trained for 10 epochs then on to 20 follows the same learning rates as one interrupted in its first 10
    epochs and resumed with 20.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0) -> None:
        if warmup_steps >= total_steps > 0:
            raise ValueError(f"warmup_steps ({warmup_steps}) must be smaller than the {total_steps} training steps")
        self.optimizer = optimizer
        self.total_steps = max(total_steps, 1)
        self.warmup_steps = warmup_steps
        self.segments: list[tuple[int, int, int]] = [(0, self.total_steps, warmup_steps)]
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.steps = 0
        self._apply()

    def factor(self, step: int) -> float:
        start, length, warmup = next(segment for segment in reversed(self.segments) if segment[0] <= step)
        step -= start
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / (length - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def lr_at(self, step: int) -> float:
        """The learning rate of the first parameter group at optimizer step `step` (0-based)."""
        return self.base_lrs[0] * self.factor(step)

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
        torch.save({"steps": self.steps, "total_steps": self.total_steps, "segments": self.segments}, path)

    @mark_as_loader
    def load(self, path: Path, end_of_epoch: bool) -> None:
        state = torch.load(path, weights_only=True)
        recorded = state["total_steps"]
        segments = [tuple(segment) for segment in state.get("segments", [(0, recorded, self.warmup_steps)])]
        if self.total_steps < recorded:
            raise ValueError(
                f"{path}: the learning-rate schedule ran {recorded} steps, this run has {self.total_steps} "
                "(fewer epochs, a larger batch or more processes than the run that saved it)"
            )
        if self.total_steps > recorded:  # training on: a new cosine over the added steps
            segments.append((recorded, self.total_steps - recorded, 0))
        self.segments = segments
        self.steps = state["steps"]
        self._apply()


# --- the Brain ----------------------------------------------------------------------------------


class PETLBrain(sb.Brain):
    """Cross-entropy classification with a PETLModel in `modules["model"]`.

    Only trainable parameters reach AdamW; the cosine schedule steps with the optimizer over
    `number_of_epochs` x the length of the train loader that `fit` iterates, whoever built it (`fit` given a
    dataset and `train_loader_kwargs`, or a DataLoader). A train loader made here draws a seeded order
    (`seed` and the epoch: resumable mid-epoch), split round-robin across ranks under DDP. Each validation saves
    a checkpoint carrying the validation metrics, keeping the best (by `selection_metric`) and the latest;
    `evaluate` then loads the best one. Expects hparams: `model`, `num_classes`, `number_of_epochs`, `seed`,
    `warmup_steps`, `selection_metric`, `train_logger`; optional: `spec_augment` with `augmentation`,
    `cache_embeddings`, `log_timing` (per epoch in train_log.txt: `train_s`, the training stage's wall time;
    `step_s`, the part inside `fit_batch` (forward, backward, optimizer step; CUDA synchronised); `data_s`, the
    rest (waiting for the loader, its workers' start, the loop); `valid_s`). Batches with `pooled` vectors
    (linear probing from cached embeddings) go through the head alone (`linear_cached.PooledOrFull`, which
    then wraps the model where `recipe_cache_blocker` allows).
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
        self.augment_fbank = bool(getattr(self.hparams, "spec_augment", False))
        if self.augment_fbank and self.hparams.model.backbone.front_end is None:
            logger.info(
                "SpecAugment skipped: %s takes waveforms, not an fbank", type(self.hparams.model.backbone).__name__
            )
            self.augment_fbank = False
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable("rng", RNGState())
        self.log_timing = bool(getattr(self.hparams, "log_timing", False))
        self.timing: dict[str, float] = {}
        self._stage_started = 0.0
        model = self.hparams.model
        if recipe_cache_blocker(model, getattr(self.hparams, "cache_embeddings", False), self.augment_fbank) is None:
            self.modules["model"] = PooledOrFull(model)  # batches may hold cached vectors (`pooled`)

    def make_dataloader(self, dataset, stage: sb.Stage, ckpt_prefix: str | None = "dataloader-", **loader_kwargs):
        """SpeechBrain's loaders; the train one gets the seeded sampler unless a sampler or shuffle is given."""
        if stage == sb.Stage.TRAIN and not {"sampler", "batch_sampler", "shuffle"} & set(loader_kwargs):
            loader_kwargs["sampler"] = ReproducibleRandomSampler(dataset, seed=self.hparams.seed)
            self.train_sampler = loader_kwargs["sampler"]  # fit() calls set_epoch on it (or on its DDP wrapper)
        return super().make_dataloader(dataset, stage, ckpt_prefix=ckpt_prefix, **loader_kwargs)

    def fit(
        self,
        epoch_counter,
        train_set,
        valid_set=None,
        progressbar: bool | None = None,
        train_loader_kwargs: Mapping | None = None,
        valid_loader_kwargs: Mapping | None = None,
    ) -> None:
        """SpeechBrain's `fit`; the train loader is built first so the schedule knows its length."""
        if not self.test_only and not isinstance(train_set, (DataLoader, LoopedLoader)):
            train_set = self.make_dataloader(train_set, sb.Stage.TRAIN, **dict(train_loader_kwargs or {}))
        if not self.test_only:
            self.steps_per_epoch = len(train_set)
        super().fit(
            epoch_counter,
            train_set,
            valid_set,
            progressbar=progressbar,
            valid_loader_kwargs=dict(valid_loader_kwargs or {}),
        )

    def _wrap_distributed(self) -> None:
        """SpeechBrain's DDP wrapping, except that BatchNorm stays plain where SyncBatchNorm cannot run.

        Invariant: on a device type SyncBatchNorm runs on (CUDA, HPU, XPU, a PrivateUse1 backend) and outside a
        `torchrun` launch this is exactly `sb.Brain._wrap_distributed` (BatchNorm -> SyncBatchNorm, then DDP;
        DataParallel). Elsewhere (CPU with gloo) each module with a trainable parameter is wrapped in DDP
        unconverted: BatchNorm normalises over each process's own share of the batch and keeps running
        statistics per process (DDP broadcasts rank 0's buffers at each training forward; rank 0's are saved).
        Gradients are still averaged over all processes, so the other trainable tensors stay equal across ranks.
        """
        device_type = torch.device(self.device).type
        if not self.distributed_launch or device_type in (
            "cuda",
            "hpu",
            "xpu",
            torch._C._get_privateuse1_backend_name(),
        ):
            super()._wrap_distributed()
            return
        wrapped = [name for name, module in self.modules.items() if any(p.requires_grad for p in module.parameters())]
        batch_norm = torch.nn.modules.batchnorm._BatchNorm
        if if_main_process() and any(isinstance(m, batch_norm) for n in wrapped for m in self.modules[n].modules()):
            logger.info(
                "BatchNorm statistics stay per process on %s (SyncBatchNorm needs a GPU): each process normalises "
                "over its own share of the batch; checkpoints keep rank 0's running statistics",
                device_type,
            )
        for name in wrapped:
            self.modules[name] = torch.nn.parallel.DistributedDataParallel(
                self.modules[name], device_ids=None, find_unused_parameters=self.find_unused_parameters
            )

    def init_optimizers(self) -> None:
        trainable = [p for p in self.modules.parameters() if p.requires_grad]
        self.optimizer = self.opt_class(trainable)
        self.optimizers_dict = {"opt_class": self.optimizer}
        total_steps = self.hparams.number_of_epochs * self.updates_per_epoch
        self.lr_schedule = CosineSchedule(self.optimizer, total_steps, self.hparams.warmup_steps)
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable("optimizer", self.optimizer)
            self.checkpointer.add_recoverable("lr_schedule", self.lr_schedule)

    @property
    def updates_per_epoch(self) -> int:
        """Optimizer steps per epoch (train batches over the gradient accumulation factor, rounded up)."""
        return math.ceil(self.steps_per_epoch / self.grad_accumulation_factor)

    def lr_schedule_epochs(self) -> list[dict]:
        """The learning-rate schedule in epochs: one cosine per entry (two or more after training on)."""
        if self.lr_schedule is None:  # --test_only: nothing trained here
            return []
        return [
            {
                "first_epoch": start // self.updates_per_epoch + 1,
                "last_epoch": (start + length) // self.updates_per_epoch,
                "warmup_steps": warmup,
            }
            for start, length, warmup in self.lr_schedule.segments
        ]

    def compute_forward(self, batch, stage: sb.Stage) -> torch.Tensor:
        batch = batch.to(self.device)
        if hasattr(batch, "pooled"):  # cached vectors (`recipe.build_datasets`): the head alone, see linear_cached.py
            return self.modules.model(batch.pooled.data, pooled=True)
        inputs, lengths = batch.sig  # waveforms (batch, samples) or cached fbank (batch, frames, mel)
        if stage == sb.Stage.TRAIN and self.augment_fbank:
            backbone = self.hparams.model.backbone
            inputs = self.hparams.augmentation(backbone.features(inputs, lengths))
        return self.modules.model(inputs, lengths)

    def compute_objectives(self, logits: torch.Tensor, batch, stage: sb.Stage) -> torch.Tensor:
        targets = batch.label_index.to(logits.device)
        if stage != sb.Stage.TRAIN:
            self.confusion += confusion_matrix(logits.argmax(dim=-1), targets, self.hparams.num_classes)
        return F.cross_entropy(logits.float(), targets)

    def fit_batch(self, batch) -> torch.Tensor:
        """SpeechBrain's step; with `log_timing`, its wall time (device synchronised) adds to `step_s`."""
        if not self.log_timing:
            return super().fit_batch(batch)
        started = time.perf_counter()
        loss = super().fit_batch(batch)
        if self.device_type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timing["step_s"] += time.perf_counter() - started
        return loss

    def on_fit_batch_end(self, batch, outputs, loss, should_step: bool) -> None:
        if should_step:
            self.lr_schedule.step()

    def on_stage_start(self, stage: sb.Stage, epoch: int | None = None) -> None:
        self._stage_started = time.perf_counter()
        if stage == sb.Stage.TRAIN:
            self.timing = {"step_s": 0.0}
            self.epoch_lr = self.lr_schedule.lr_at((epoch - 1) * self.updates_per_epoch)
        if stage != sb.Stage.TRAIN:
            self.confusion = torch.zeros(self.hparams.num_classes, self.hparams.num_classes, dtype=torch.long)

    def stage_metrics(self, loss: float) -> dict[str, float]:
        return {"loss": float(loss), **{name: metric(self.confusion) for name, metric in self.metrics.items()}}

    def _log(self, stats_meta: dict, **stats: dict) -> None:
        """train_log.txt and the extra loggers; with `--test_only` the console alone (nothing is written)."""
        if self.test_only:
            logger.info(" - ".join(f"{key}: {value}" for key, value in {**stats_meta, **stats}.items()))
            return
        for train_logger in (self.hparams.train_logger, *self.extra_loggers):
            train_logger.log_stats(stats_meta, **stats)

    def on_stage_end(self, stage: sb.Stage, stage_loss: float, epoch: int | None = None) -> None:
        elapsed = time.perf_counter() - self._stage_started
        if stage == sb.Stage.TRAIN:
            self.train_loss = float(stage_loss)
            self.timing.update(train_s=elapsed, data_s=elapsed - self.timing["step_s"])
            return
        stats = self.stage_metrics(stage_loss)
        if stage == sb.Stage.VALID:
            train_stats = {"loss": self.train_loss}
            if self.log_timing:
                train_stats.update(self.timing, valid_s=elapsed)
            self._log({"epoch": epoch, "lr": self.epoch_lr}, train_stats=train_stats, valid_stats=stats)
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
    """TensorBoard and wandb loggers when asked for, on rank 0 only (imported lazily: optional packages).

    Recipes check that the packages are installed before anything is written (`missing_optional_packages`).
    """
    if not if_main_process():
        return ()
    loggers = []
    if hparams.get("use_tensorboard"):
        from speechbrain.utils.train_logger import TensorboardLogger

        loggers.append(TensorboardLogger(save_dir=str(Path(hparams["output_folder"]) / "tensorboard")))
    if hparams.get("use_wandb"):
        loggers.append(WandbLogger(hparams))
    return tuple(loggers)


OPTIONAL_PACKAGES = {"use_tensorboard": "tensorboard", "use_wandb": "wandb"}


def missing_optional_packages(settings: Mapping) -> list[str]:
    """`--option=True (needs PACKAGE)` for each logger asked for whose package is not installed."""
    return [
        f"--{option}=True needs the {package} package (pip install {package})"
        for option, package in OPTIONAL_PACKAGES.items()
        if settings.get(option) and importlib.util.find_spec(package) is None
    ]


class WandbLogger:
    """Logs the same stats as train_log.txt to Weights & Biases (one run per fold)."""

    def __init__(self, hparams: Mapping) -> None:
        import wandb  # checked by missing_optional_packages before the run starts

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
