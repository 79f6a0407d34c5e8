"""Units of petl_modules.training: metrics, the cosine schedule, atomic checkpoints, SpecAugment, fold selection."""

from __future__ import annotations

import math

import pytest
import torch
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks

from petl_modules.backbones.ast import SpecAugment
from petl_modules.recipe import DatasetRecipe, RecipeError, select_folds
from petl_modules.training import (
    AtomicCheckpointer,
    CosineSchedule,
    accuracy,
    confusion_matrix,
    macro_f1,
    unweighted_accuracy,
)


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


def dummy_prepare(**kwargs):
    raise AssertionError("not called")


def test_fold_selection():
    folded = DatasetRecipe("X", dummy_prepare, folds=(1, 2, 3))
    assert select_folds(folded, "all") == [1, 2, 3] and select_folds(folded, 2) == [2]
    single = DatasetRecipe("Y", dummy_prepare)
    assert select_folds(single, "all") == [None] and select_folds(single, 1) == [None]
    with pytest.raises(RecipeError, match="one official split"):
        select_folds(single, 2)
    with pytest.raises(RecipeError, match="folds are 1..3"):
        select_folds(folded, "some")
