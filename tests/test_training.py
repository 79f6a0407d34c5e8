"""Units of petl_modules.training: metrics, the cosine schedule and the loader it is sized from, atomic
checkpoints and files, the RNG state, SpecAugment in compute_forward, fold selection."""

from __future__ import annotations

import math
import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest
import speechbrain as sb
import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks
from speechbrain.utils.epoch_loop import EpochCounter

from petl_modules.atomic import write_text_atomic
from petl_modules.backbones.ast import SpecAugment
from petl_modules.hparams_loader import load_hparams
from petl_modules.recipe import RecipeError, select_folds
from petl_modules.training import (
    AtomicCheckpointer,
    CosineSchedule,
    PETLBrain,
    RNGState,
    accuracy,
    confusion_matrix,
    macro_f1,
    unweighted_accuracy,
)

REPO = Path(__file__).resolve().parents[1]


def test_metrics_on_a_known_confusion_matrix():
    targets = torch.tensor([0, 0, 0, 1, 2, 2])
    predictions = torch.tensor([0, 0, 1, 1, 2, 0])
    confusion = confusion_matrix(predictions, targets, num_classes=4)
    assert confusion.tolist() == [[2, 1, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert accuracy(confusion) == pytest.approx(4 / 6)
    # F1 per class: 2*2/(3+3), 2*1/(2+1), 2*1/(2+1); class 3 never occurs and is left out
    assert macro_f1(confusion) == pytest.approx((4 / 6 + 2 / 3 + 2 / 3) / 3)
    assert unweighted_accuracy(confusion) == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)


def make_schedule(total_steps: int, warmup_steps: int = 0, lr: float = 0.1) -> CosineSchedule:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    return CosineSchedule(optimizer, total_steps, warmup_steps)


def test_cosine_schedule_decays_to_zero_per_step_and_resumes(tmp_path):
    schedule = make_schedule(total_steps=10)
    lrs = [schedule.lr]
    for _ in range(10):
        schedule.step()
        lrs.append(schedule.lr)
    assert lrs[0] == pytest.approx(0.1) and lrs[5] == pytest.approx(0.05) and lrs[10] == pytest.approx(0.0)
    assert lrs[3] == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.3)))
    schedule.save(tmp_path / "schedule.ckpt")
    restored = make_schedule(total_steps=10)
    restored.load(tmp_path / "schedule.ckpt", end_of_epoch=False)
    assert restored.steps == 10 and restored.lr == pytest.approx(0.0)


def test_warmup_rises_linearly_then_decays():
    schedule = make_schedule(total_steps=6, warmup_steps=2)
    lrs = [schedule.lr]
    for _ in range(6):
        schedule.step()
        lrs.append(schedule.lr)
    assert lrs[:3] == pytest.approx([0.05, 0.1, 0.1]) and lrs[4] == pytest.approx(0.05) and lrs[6] == 0.0
    with pytest.raises(ValueError, match="warmup_steps"):
        make_schedule(total_steps=4, warmup_steps=4)


def lrs_after_resuming(saved_at: int, first_total: int, total: int, tmp_path, warmup_steps: int = 0) -> list[float]:
    """Steps `saved_at` times in a `first_total`-step schedule, saves, reloads into a `total`-step one, then
    returns the learning rates of every step from the one after the save to the end."""
    schedule = make_schedule(first_total, warmup_steps)
    for _ in range(saved_at):
        schedule.step()
    schedule.save(tmp_path / f"at{saved_at}.ckpt")
    resumed = make_schedule(total, warmup_steps)
    resumed.load(tmp_path / f"at{saved_at}.ckpt", end_of_epoch=True)
    lrs = [resumed.lr]
    for _ in range(total - saved_at - 1):
        resumed.step()
        lrs.append(resumed.lr)
    return lrs


def test_training_on_adds_a_new_cosine_and_keeps_the_recorded_one(tmp_path):
    """4 steps with warm-up 1, then 4 more: steps 4..7 follow 0.1 * (1 + cos(pi k / 4)) / 2, k = 0..3, without
    warm-up; a run saved at step 2 of the 4 and resumed with 8 follows the same learning rates."""
    new_cosine = [0.05 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs_after_resuming(4, 4, 8, tmp_path, warmup_steps=1) == pytest.approx(new_cosine)
    first_cosine = [0.05 * (1 + math.cos(math.pi * (step - 1) / 3)) for step in (2, 3)]  # warm-up: step 0
    assert lrs_after_resuming(2, 4, 8, tmp_path, warmup_steps=1) == pytest.approx(first_cosine + new_cosine)
    with pytest.raises(ValueError, match="ran 4 steps, this run has 3"):
        lrs_after_resuming(2, 4, 3, tmp_path)


@register_checkpoint_hooks
class Failing:
    """A recoverable whose save dies half way, like a run killed while checkpointing."""

    @mark_as_saver
    def save(self, path):
        path.write_text("partial")
        raise KeyboardInterrupt

    @mark_as_loader
    def load(self, path, end_of_epoch):
        pass


def test_a_checkpoint_killed_while_saving_is_never_found(tmp_path):
    checkpointer = AtomicCheckpointer(tmp_path, recoverables={"broken": Failing()})
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save_checkpoint(meta={"accuracy": 1.0})
    assert checkpointer.list_checkpoints() == []
    AtomicCheckpointer(tmp_path)  # the next run clears the staging area
    assert not (tmp_path / AtomicCheckpointer.STAGING).exists()


def test_atomic_checkpoint_saves_and_recovers(tmp_path):
    layer = torch.nn.Linear(2, 2)
    checkpointer = AtomicCheckpointer(tmp_path, recoverables={"layer": layer})
    saved = checkpointer.save_checkpoint(meta={"accuracy": 0.5})
    assert saved.path.parent == tmp_path and saved.paramfiles["layer"].is_file()
    expected = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.zero_()
    checkpointer.recover_if_possible(max_key="accuracy")
    torch.testing.assert_close(layer.weight.detach(), expected)


def test_spec_augment_masks_in_training_only():
    torch.manual_seed(0)
    augment = SpecAugment(freq_mask=10, time_mask=20)
    fbank = torch.ones(8, 60, 40)  # (batch, frames, mel)
    augment.eval()
    assert torch.equal(augment(fbank), fbank)
    augment.train()
    masked = augment(fbank)
    assert masked.shape == (8, 60, 40)
    assert (masked == 0).any() and (masked == 1).any()
    zero_mel_bins = (masked == 0).all(dim=1).sum(dim=1)  # fully masked mel bins per item
    assert (zero_mel_bins <= 10).all()
    assert len({tuple(row.tolist()) for row in (masked == 0).all(dim=1)}) > 1  # masks differ between items


def test_fold_selection():
    assert select_folds("X", (1, 2, 3), "all") == [1, 2, 3] and select_folds("X", (1, 2, 3), 2) == [2]
    assert select_folds("Y", (), "all") == [None] and select_folds("Y", (), 1) == [None]
    with pytest.raises(RecipeError, match="one official split"):
        select_folds("Y", (), 2)
    with pytest.raises(RecipeError, match="folds are 1..3"):
        select_folds("X", (1, 2, 3), "some")


def test_rng_state_round_trips_through_weights_only_loading(tmp_path):
    state = RNGState()
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    random.gauss(0, 1), np.random.standard_normal()  # leave cached Gaussians in both generators
    state.save(tmp_path / "rng.ckpt")
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    state.load(tmp_path / "rng.ckpt", end_of_epoch=True)  # loads with weights_only=True
    drawn = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert drawn[:3] == expected[:3] and torch.equal(drawn[3], expected[3])
    torch.load(tmp_path / "rng.ckpt", weights_only=True)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomic_files_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "file.txt", "x")
        (tmp_path / "plain.txt").write_text("x")  # what open() creates under this umask
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "file.txt").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "file.txt").stat().st_mode) == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)


@pytest.fixture(scope="module")
def tiny_brain_parts(tmp_path_factory):
    """The ESC-50 linear-probing hyperparameters on the tiny AST, and a dataset of 10 random clips."""
    from tiny_models import write_checkpoints

    root = tmp_path_factory.mktemp("brain")
    source = write_checkpoints(root)["ast"]
    overrides = {
        "backbone_source": str(source),
        "target_length": 50,
        "num_classes": 3,
        "data_folder": str(root),
        "output_folder": str(root / "out"),
        "number_of_epochs": 3,
    }
    hparams = load_hparams(REPO / "recipes" / "ESC50" / "hparams" / "linear.yaml", overrides)
    generator = torch.Generator().manual_seed(0)
    items = {f"u{i}": {"sig": torch.randn(8000, generator=generator), "label_index": i % 3} for i in range(10)}
    dataset = DynamicItemDataset(items, output_keys=["id", "sig", "label_index"])
    return hparams, dataset


def make_brain(hparams, **changes) -> PETLBrain:
    return PETLBrain(
        modules={"model": hparams["model"]},
        opt_class=hparams["opt_class"],
        hparams={**hparams, **changes},
        run_opts={"device": "cpu", "noprogressbar": True},
    )


@pytest.mark.parametrize("built_outside", [False, True])
def test_standard_fit_sizes_the_cosine_schedule_from_the_train_loader(tiny_brain_parts, built_outside):
    """10 items in batches of 4: 3 steps an epoch, 3 epochs: the schedule is 9 steps, whoever built the loader."""
    hparams, dataset = tiny_brain_parts
    brain = make_brain(hparams)
    train = brain.make_dataloader(dataset, sb.Stage.TRAIN, batch_size=4) if built_outside else dataset
    brain.fit(EpochCounter(3), train, train_loader_kwargs={"batch_size": 4})
    assert brain.lr_schedule.total_steps == 9 and brain.lr_schedule.steps == 9
    assert brain.lr_schedule.lr == pytest.approx(0.0)


def test_spec_augment_is_applied_in_compute_forward_on_the_training_stage_only(tiny_brain_parts):
    hparams, dataset = tiny_brain_parts
    batch = PaddedBatch([dataset[0], dataset[1]])
    model = hparams["model"].eval()
    augmented = make_brain(hparams)  # ESC-50: spec_augment True
    plain = make_brain(hparams, spec_augment=False)
    with torch.no_grad():
        torch.manual_seed(0)
        train = augmented.compute_forward(batch, sb.Stage.TRAIN)
        valid = augmented.compute_forward(batch, sb.Stage.VALID)
        torch.testing.assert_close(plain.compute_forward(batch, sb.Stage.TRAIN), valid)
        assert not torch.allclose(train, valid)
        # the same masks drawn by hand on the model's own fbank give the same logits
        torch.manual_seed(0)
        fbank = hparams["augmentation"](model.backbone.front_end(*batch.sig))
        torch.testing.assert_close(model(fbank, batch.sig[1]), train)
