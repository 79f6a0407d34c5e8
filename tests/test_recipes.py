"""The five recipes end to end on tiny data and a tiny backbone: every method, the command line, learning,
resuming, Wav2Vec2, and one-line errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from recipe_helpers import DATASETS, METHODS, REPO, recipe_args, write_workspace

from petl_modules.recipe import RESULTS, load_recipe, main, run
from petl_modules.training import PETLBrain

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> dict[str, Path]:
    return write_workspace(tmp_path_factory.mktemp("recipes"))


def latest_model_state(output: Path) -> dict[str, torch.Tensor]:
    """The trainable state in the most recent checkpoint of a run."""
    checkpoints = sorted((output / "save").glob("CKPT+*"), key=lambda p: p.stat().st_mtime)
    return torch.load(checkpoints[-1] / "model.ckpt")


def read_manifests(output: Path) -> dict[str, list[str]]:
    """The audio files of every prepared split under `output`."""
    manifests = {}
    for csv_path in (output / "manifests").rglob("*.csv"):
        with open(csv_path, newline="") as handle:
            manifests[str(csv_path)] = sorted({row["wav"] for row in csv.DictReader(handle)})
    return manifests


def check_results(results: dict, dataset: str, method: str, folds: list[str]) -> None:
    num_classes = DATASETS[dataset][1]
    assert results["dataset"] == dataset and results["method"] == method
    assert list(results["folds"]) == folds
    parameters = results["parameters"]
    assert 0 < parameters["trainable"] == sum(parameters["trainable_groups"].values())
    assert parameters["backbone"] > 0
    assert "git_revision" in results
    for fold in results["folds"].values():
        assert fold["epoch"] >= 1
        test = fold["test"]
        confusion = torch.tensor(test["confusion_matrix"])
        assert confusion.shape == (num_classes, num_classes)
        assert test["accuracy"] == pytest.approx(confusion.trace().item() / confusion.sum().item())
        for split in ("valid", "test"):
            assert 0.0 <= fold[split]["accuracy"] <= 1.0 and 0.0 <= fold[split]["macro_f1"] <= 1.0
            if dataset == "IEMOCAP":
                assert 0.0 <= fold[split]["unweighted_accuracy"] <= 1.0
    accuracies = [fold["test"]["accuracy"] for fold in results["folds"].values()]
    assert results["mean"]["test"]["accuracy"] == pytest.approx(sum(accuracies) / len(accuracies))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_every_method_trains_and_tests(workspace, tmp_path, dataset, method):
    results = run(load_recipe(dataset), recipe_args(dataset, method, workspace, tmp_path))
    fold = next(arg.split("=")[1] for arg in DATASETS[dataset][2] + ["--fold=official"] if arg.startswith("--fold"))
    check_results(results, dataset, method, [fold])
    assert json.loads((tmp_path / RESULTS).read_text()) == results
    run_folder = tmp_path if fold == "official" else tmp_path / f"fold{fold}"
    assert (run_folder / "train_log.txt").read_text().count("epoch: 1") == 1
    saved = sum(t.numel() for t in latest_model_state(run_folder).values())
    assert results["parameters"]["trainable"] <= saved < results["parameters"]["trainable"] + 1000  # + BN stats
    cached = list((tmp_path / "feature_cache").glob("*/*.pt"))  # AST's fbank, once per audio file
    assert len(cached) == sum(len(split) for split in read_manifests(tmp_path).values())


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_command_line(workspace, tmp_path, dataset):
    """The documented command; ESC-50 with --fold=all runs the 5 rotations in fold<k>/ and aggregates them."""
    extra = ["--fold=all"] if dataset == "ESC50" else []
    command = [
        sys.executable,
        str(REPO / "recipes" / dataset / "train.py"),
        *recipe_args(dataset, "linear", workspace, tmp_path, *extra),
    ]
    process = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    results = json.loads((tmp_path / RESULTS).read_text())
    if dataset == "ESC50":
        check_results(results, dataset, "linear", ["1", "2", "3", "4", "5"])
        assert all((tmp_path / f"fold{k}" / "fold_result.json").is_file() for k in range(1, 6))
        assert results["folds_missing"] == []
    else:
        assert results["dataset"] == dataset and len(results["folds"]) == 1


LEARNING_OPTIONS = ["--lr=0.05", "--number_of_epochs=25", "--batch_size=2", "--freq_mask=8", "--time_mask=10"]


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_learns_above_chance(workspace, tmp_path, dataset):
    """Sines at class-dependent frequencies: LoRA on the tiny AST separates them in 25 short epochs."""
    results = run(load_recipe(dataset), recipe_args(dataset, "lora", workspace, tmp_path, *LEARNING_OPTIONS))
    chance = 1 / DATASETS[dataset][1]
    assert results["mean"]["test"]["accuracy"] >= min(1.0, 2 * chance), results["mean"]["test"]


def test_wav2vec2_backbone(workspace, tmp_path):
    """--backbone=wav2vec2 trains on waveforms (ESC-50's SpecAugment is AST-only and is skipped)."""
    results = run(load_recipe("ESC50"), recipe_args("ESC50", "adapter", workspace, tmp_path, backbone="wav2vec2"))
    assert results["backbone"] == "wav2vec2"
    check_results(results, "ESC50", "adapter", ["1"])


def test_resume_mid_epoch_matches_an_uninterrupted_run(workspace, tmp_path, monkeypatch):
    recipe = load_recipe("GSC")
    options = ["--number_of_epochs=2", "--batch_size=2", "--ckpt_interval_steps=1", "--lr=0.05"]  # 4 steps/epoch
    reference = run(recipe, recipe_args("GSC", "lora", workspace, tmp_path / "reference", *options))

    calls = []
    original = PETLBrain.fit_batch

    def crash_at_sixth_step(self, batch):
        calls.append(self.step)
        if len(calls) == 6:
            raise KeyboardInterrupt  # killed in epoch 2, after its first step was checkpointed
        return original(self, batch)

    monkeypatch.setattr(PETLBrain, "fit_batch", crash_at_sixth_step)
    with pytest.raises(KeyboardInterrupt):
        run(recipe, recipe_args("GSC", "lora", workspace, tmp_path / "resumed", *options))
    assert calls == [1, 2, 3, 4, 1, 2]  # Brain.step: per-epoch step counter
    assert not (tmp_path / "resumed" / RESULTS).exists()

    calls.clear()
    monkeypatch.setattr(PETLBrain, "fit_batch", lambda self, batch: calls.append(self.step) or original(self, batch))
    resumed = run(recipe, recipe_args("GSC", "lora", workspace, tmp_path / "resumed", *options))
    assert calls == [2, 3, 4]  # epoch 2 continued after its checkpointed first step
    reference_state, resumed_state = (
        latest_model_state(tmp_path / "reference"),
        latest_model_state(tmp_path / "resumed"),
    )
    assert reference_state.keys() == resumed_state.keys()
    for name in reference_state:
        torch.testing.assert_close(resumed_state[name], reference_state[name], rtol=0, atol=0)
    assert resumed["folds"]["official"]["test"] == reference["folds"]["official"]["test"]

    calls.clear()  # a finished run is not trained again
    again = run(recipe, recipe_args("GSC", "lora", workspace, tmp_path / "resumed", *options))
    assert calls == [] and again["folds"] == resumed["folds"]


@pytest.mark.parametrize(
    ("dataset", "extra", "message"),
    [
        ("GSC", ["--not_a_key=3"], "unknown option --not_a_key"),
        ("GSC", ["--few_shot_samples=50"], "few-shot K=50 needs 50 items per class"),
        ("ESC50", ["--fold=6"], "--fold: ESC50 folds are 1..5 or 'all'; got 6"),
        ("FSC", ["--num_classes=31"], "set --num_classes=4"),
    ],
)
def test_bad_input_is_one_line(workspace, tmp_path, dataset, extra, message):
    with pytest.raises(SystemExit) as stop:
        main(load_recipe(dataset), recipe_args(dataset, "linear", workspace, tmp_path, *extra))
    text = str(stop.value.code)
    assert message in text and "\n" not in text


def test_missing_data_folder_from_the_command_line(workspace, tmp_path):
    args = recipe_args("IEMOCAP", "linear", workspace, tmp_path, f"--data_folder={tmp_path / 'nowhere'}")
    process = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "IEMOCAP" / "train.py"), *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert process.returncode == 1
    assert process.stderr.strip().splitlines()[-1] == (
        f"IEMOCAP recipe: error: --data_folder: {tmp_path / 'nowhere'} is not a folder; give the IEMOCAP dataset root"
    )
    assert "Traceback" not in process.stderr
