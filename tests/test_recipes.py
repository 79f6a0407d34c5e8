"""The five recipes end to end on tiny data and a tiny backbone, through their command line: every method,
folds, learning, resuming, Wav2Vec2, both working folders, and one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from recipe_helpers import DATASETS, METHODS, REPO, recipe_args, run_recipe, run_recipes, write_workspace
from recipe_preludes import count_steps_and_crash

from petl_modules.recipe import RESULTS

BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm statistics: saved, not trained
# SpecAugment (on in the ESC-50 and UrbanSound8K files) is off here: on 3 test clips a regulariser decides the
# outcome (UrbanSound8K: 1/3 with it, 2/3 without); it is tested in test_training and runs in every-method tests.
LEARNING_OPTIONS = ["--lr=0.05", "--number_of_epochs=25", "--batch_size=2", "--spec_augment=False"]


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> dict[str, Path]:
    return write_workspace(tmp_path_factory.mktemp("recipes"))


@pytest.fixture(scope="session")
def dataset_runs(workspace, tmp_path_factory):
    """Per dataset, in one interpreter: every method (1 epoch), LoRA learning, and ESC-50 on Wav2Vec2.

    Returns `runs(dataset)` -> {name: (outcome, output folder)}; each dataset's batch runs once, when first used.
    """
    done: dict[str, dict] = {}

    def runs(dataset: str) -> dict[str, tuple[dict, Path]]:
        if dataset not in done:
            root = tmp_path_factory.mktemp(f"runs_{dataset}")
            commands = {method: recipe_args(dataset, method, workspace, root / method) for method in METHODS}
            commands["learning"] = recipe_args(dataset, "lora", workspace, root / "learning", *LEARNING_OPTIONS)
            if dataset == "ESC50":
                commands["wav2vec2"] = recipe_args(dataset, "adapter", workspace, root / "w2v", backbone="wav2vec2")
            outcomes = run_recipes([(dataset, args) for args in commands.values()], root / "report.json")
            done[dataset] = {
                name: (outcome, Path(args[2].split("=", 1)[1]))
                for (name, args), outcome in zip(commands.items(), outcomes)
            }
        return done[dataset]

    return runs


def run_folder(output: Path, dataset: str) -> Path:
    fold = next((arg.split("=")[1] for arg in DATASETS[dataset][2] if arg.startswith("--fold")), None)
    return output if fold is None else output / f"fold{fold}"


def latest_model_state(output: Path) -> dict[str, torch.Tensor]:
    """The trainable state in the most recent checkpoint of a run."""
    checkpoints = sorted((output / "save").glob("CKPT+*"), key=lambda p: p.stat().st_mtime)
    return torch.load(checkpoints[-1] / "model.ckpt", weights_only=True)


def trained_elements(run: Path) -> int:
    """Trainable parameters counted from the saved checkpoint (BatchNorm statistics left out)."""
    return sum(t.numel() for name, t in latest_model_state(run).items() if not name.endswith(BUFFERS))


def read_manifests(output: Path) -> dict[str, list[str]]:
    """The audio files of every prepared split under `output`."""
    manifests = {}
    for csv_path in (output / "manifests").rglob("*.csv"):
        with open(csv_path, newline="") as handle:
            manifests[str(csv_path)] = sorted({row["wav"] for row in csv.DictReader(handle)})
    return manifests


def check_results(results: dict, dataset: str, method: str, folds: list[str], output: Path) -> None:
    num_classes = DATASETS[dataset][1]
    assert results["dataset"] == dataset and results["method"] == method
    assert list(results["folds"]) == folds
    parameters = results["parameters"]
    first_run = output if folds == ["official"] else output / f"fold{folds[0]}"
    assert parameters["trainable"] == trained_elements(first_run) > 0  # what the checkpoint holds
    assert parameters["backbone"] > parameters["trainable"] or method == "full_ft"
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
def test_every_method_trains_and_tests(dataset_runs, dataset, method):
    outcome, output = dataset_runs(dataset)[method]
    assert outcome["code"] == 0, outcome["message"]
    results = json.loads((output / RESULTS).read_text())
    run = run_folder(output, dataset)
    check_results(results, dataset, method, [run.name[4:] if run != output else "official"], output)
    assert (run / "train_log.txt").read_text().count("epoch: 1") == 1
    assert results["number_of_epochs"] == 1 and results["settings"]["batch_size"] == 4  # what ran
    cached = list((output / "feature_cache").glob("*/*.pt"))  # AST's fbank, once per audio file
    assert len(cached) == sum(len(split) for split in read_manifests(output).values())


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_learns_above_chance(dataset_runs, dataset):
    """Sines at class-dependent frequencies: LoRA on the tiny AST separates them in 25 short epochs."""
    outcome, output = dataset_runs(dataset)["learning"]
    assert outcome["code"] == 0, outcome["message"]
    results = json.loads((output / RESULTS).read_text())
    chance = 1 / DATASETS[dataset][1]
    assert results["mean"]["test"]["accuracy"] >= min(1.0, 2 * chance), results["mean"]["test"]


def test_wav2vec2_backbone(dataset_runs):
    """--backbone=wav2vec2 trains on waveforms (ESC-50's SpecAugment is AST-only and is skipped)."""
    outcome, output = dataset_runs("ESC50")["wav2vec2"]
    assert outcome["code"] == 0, outcome["message"]
    results = json.loads((output / RESULTS).read_text())
    assert results["backbone"] == "wav2vec2"
    check_results(results, "ESC50", "adapter", ["1"], output)
    assert not (output / "feature_cache").exists()  # waveforms are not cached


def test_all_folds_from_the_repository_root(workspace, tmp_path):
    """The documented command in a process of its own: ESC-50 --fold=all runs the 5 rotations and aggregates."""
    process = run_recipe("ESC50", recipe_args("ESC50", "linear", workspace, tmp_path, "--fold=all"))
    assert process.returncode == 0, process.stderr[-3000:]
    results = json.loads((tmp_path / RESULTS).read_text())
    check_results(results, "ESC50", "linear", ["1", "2", "3", "4", "5"], tmp_path)
    assert all((tmp_path / f"fold{k}" / "fold_result.json").is_file() for k in range(1, 6))
    assert results["folds_missing"] == []
    assert (tmp_path / "fold1" / "train.py").is_file()  # SpeechBrain keeps the script beside the run


def test_from_the_recipe_folder(workspace, tmp_path):
    """`cd recipes/FSC && python train.py hparams/linear.yaml ...`, as SpeechBrain users run recipes."""
    args = recipe_args("FSC", "linear", workspace, tmp_path)
    args[0] = "hparams/linear.yaml"
    process = run_recipe("FSC", args, cwd=REPO / "recipes" / "FSC")
    assert process.returncode == 0, process.stderr[-3000:]
    assert json.loads((tmp_path / RESULTS).read_text())["dataset"] == "FSC"


def test_resume_mid_epoch_matches_an_uninterrupted_run(workspace, tmp_path):
    options = ["--number_of_epochs=2", "--batch_size=2", "--ckpt_interval_steps=1", "--lr=0.05"]  # 4 steps/epoch
    reference_args = recipe_args("GSC", "lora", workspace, tmp_path / "reference", *options)
    resumed_args = recipe_args("GSC", "lora", workspace, tmp_path / "resumed", *options)
    calls = tmp_path / "calls.json"

    def run(args, name, crash=False):
        calls.unlink(missing_ok=True)
        env = {"CALLS": str(calls), "CRASH": "1" if crash else ""}
        outcome = run_recipes([("GSC", args)], tmp_path / f"{name}.json", prelude=count_steps_and_crash, env=env)[0]
        return outcome, json.loads(calls.read_text()) if calls.is_file() else []

    outcome, _ = run(reference_args, "reference")
    assert outcome["code"] == 0, outcome["message"]
    outcome, steps = run(resumed_args, "crash", crash=True)
    assert outcome["code"] == "raised" and "KeyboardInterrupt" in outcome["message"]
    assert steps == [1, 2, 3, 4, 1, 2]  # Brain.step: per-epoch step counter
    assert not (tmp_path / "resumed" / RESULTS).exists()

    outcome, steps = run(resumed_args, "resume")
    assert outcome["code"] == 0, outcome["message"]
    assert steps == [2, 3, 4]  # epoch 2 continued after its checkpointed first step
    reference_state, resumed_state = (
        latest_model_state(tmp_path / "reference"),
        latest_model_state(tmp_path / "resumed"),
    )
    assert reference_state.keys() == resumed_state.keys()
    for name in reference_state:
        torch.testing.assert_close(resumed_state[name], reference_state[name], rtol=0, atol=0)
    reference = json.loads((tmp_path / "reference" / RESULTS).read_text())
    resumed = json.loads((tmp_path / "resumed" / RESULTS).read_text())
    assert resumed["folds"]["official"]["test"] == reference["folds"]["official"]["test"]
    # The standard fit() path sizes the cosine schedule from its train loader: epoch 2 starts half way down,
    # lr = 0.05 / 2 (`lr` is the learning rate of the epoch's first step).
    log = (tmp_path / "reference" / "train_log.txt").read_text()
    assert "epoch: 1, lr: 5.00e-02" in log and "epoch: 2, lr: 2.50e-02" in log

    outcome, steps = run(resumed_args, "again")  # a finished run is not trained again
    assert outcome["code"] == 0 and steps == []
    assert json.loads((tmp_path / "resumed" / RESULTS).read_text())["folds"] == resumed["folds"]


BAD_INPUT = [
    ("GSC", ["--not_a_key=3"], "unknown option --not_a_key"),
    ("GSC", ["--few_shot_samples=50"], "few-shot K=50 needs 50 items per class"),
    ("ESC50", ["--fold=6"], "--fold: ESC50 folds are 1..5 or 'all'; got 6"),
    ("FSC", ["--num_classes=31"], "set --num_classes=4"),
    ("GSC", ["--spec_augment=no"], "--spec_augment must be a YAML boolean (True or False), got 'no'"),
    ("GSC", ["--use_wandb=no"], "--use_wandb must be a YAML boolean"),
    ("GSC", ["--use_tensorboard=off"], "--use_tensorboard must be a YAML boolean"),
    ("GSC", ["--cache_features=no"], "--cache_features must be a YAML boolean"),
    ("GSC", ["--apply_residual=no"], "--apply_residual must be a YAML boolean"),
]


@pytest.fixture(scope="session")
def bad_input_outcomes(workspace, tmp_path_factory) -> list[dict]:
    """Every BAD_INPUT command line, run in one interpreter."""
    root = tmp_path_factory.mktemp("bad_input")
    commands = [
        (dataset, recipe_args(dataset, "adapter", workspace, root / str(index), *extra))
        for index, (dataset, extra, _) in enumerate(BAD_INPUT)
    ]
    return run_recipes(commands, root / "report.json")


@pytest.mark.parametrize("case", range(len(BAD_INPUT)), ids=[" ".join(extra) for _, extra, _ in BAD_INPUT])
def test_bad_input_is_one_line(bad_input_outcomes, case):
    dataset, _, message = BAD_INPUT[case]
    outcome = bad_input_outcomes[case]
    assert outcome["code"] == 1
    assert outcome["message"].startswith(f"{dataset} recipe: error: ") and "\n" not in outcome["message"]
    assert message in outcome["message"]


def test_missing_data_folder_from_the_command_line(workspace, tmp_path):
    args = recipe_args("IEMOCAP", "linear", workspace, tmp_path / "out", f"--data_folder={tmp_path / 'nowhere'}")
    process = run_recipe("IEMOCAP", args, timeout=120)
    assert process.returncode == 1
    assert process.stderr.strip().splitlines()[-1] == (
        f"IEMOCAP recipe: error: --data_folder: {tmp_path / 'nowhere'} is not a folder; give the IEMOCAP dataset root"
    )
    assert "Traceback" not in process.stderr
    assert not (tmp_path / "out").exists()  # nothing written
