"""Honest failures, through the recipes' command line: a wrong command exits 1 with one line and writes
nothing (or nothing that blocks the corrected command, which then runs in the same output folder); a finished
run trains on with more epochs; the hyperparameter file is found from the repository root; the console says
what a person needs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from recipe_helpers import REPO, recipe_args, run_recipe, run_recipes, write_workspace

from petl_modules.recipe import FOLD_RESULT, RESULTS

# name -> (options, the error message after "GSC recipe: error: ")
BAD_VALUES = {
    "lr_text": (["--lr=abc"], "--lr must be a number, got 'abc'"),
    "epochs_text": (["--number_of_epochs=two"], "--number_of_epochs must be a positive integer; got 'two'"),
    "epochs_zero": (["--number_of_epochs=0"], "--number_of_epochs must be a positive integer; got 0"),
    "epochs_negative": (["--number_of_epochs=-1"], "--number_of_epochs must be a positive integer; got -1"),
    "batch_zero": (["--batch_size=0"], "--batch_size must be a positive integer; got 0"),
    "batch_fraction": (["--batch_size=2.5"], "--batch_size must be an integer, got '2.5'"),
    "few_shot_zero": (["--few_shot_samples=0"], "--few_shot_samples must be a positive integer or null; got 0"),
    "few_shot_negative": (["--few_shot_samples=-3"], "--few_shot_samples must be a positive integer or null; got -3"),
    "method_string": (
        ["--method=lora"],
        "--method is an object the file builds (!new:petl_modules.methods.LoRA); not a value to set: "
        "a method is chosen by its file, hparams/<method>.yaml",
    ),
    "backbone_name": (
        ["--backbone=beats"],
        "--backbone must be one of ast, wav2vec2, hubert, data2vec, wavlm, whisper; got 'beats'",
    ),
    "method_option": (
        ["--lora_scaling=fancy"],
        "LoRA: scaling must be one of reference, peft; got 'fancy' (the method's options: hparams/methods/*.yaml)",
    ),
    "selection_metric": (
        ["--selection_metric=f1"],
        "--selection_metric must be one of loss, accuracy, macro_f1; got 'f1'",
    ),
    "no_cuda": (
        ["--device=cuda"],
        "--device=cuda: no CUDA device is available here (PyTorch finds none); use --device=cpu",
    ),
}


def ok(outcome: dict) -> dict:
    assert outcome["code"] == 0, outcome["message"]
    return outcome


def last_line(outcome: dict) -> str:
    return outcome["stdout"].strip().splitlines()[-1]


def file_states(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(path): (path.stat().st_mtime_ns, path.stat().st_size) for path in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two batches of command lines, each in one interpreter; between them the test edits run folders as a
    crash or a person would. Returns (outcomes by name, root, workspace, file states before `test_only`)."""
    root = tmp_path_factory.mktemp("honest")
    ws = write_workspace(root / "workspace")
    gsc = lambda out, *extra, **kw: recipe_args("GSC", "lora", ws, root / out, *extra, **kw)  # noqa: E731
    bad_yaml = root / "bad.yaml"
    bad_yaml.write_text(f"extends: {REPO / 'recipes/GSC/hparams/lora.yaml'}\nlr: [0.1\nbatch_size: 2\n")
    first = {f"bad_{name}": gsc(f"bad_{name}", *options) for name, (options, _) in BAD_VALUES.items()}
    first.update(
        {
            "bad_repeated": [*gsc("bad_repeated"), "--lr=0.1", "--lr=0.2"],
            "bad_missing_file": gsc("bad_missing_file", hparams=Path("hparams/lorra.yaml")),
            "bad_yaml_syntax": gsc("bad_yaml_syntax", hparams=bad_yaml),
            # Wrong data, then the corrected command in the same output folder.
            "num_classes_wrong": gsc("n", "--num_classes=5"),
            "num_classes_fixed": gsc("n"),
            "few_shot_too_many": gsc("f", "--few_shot_samples=100"),
            "few_shot_fixed": gsc("f", "--few_shot_samples=2"),
            "layout_wrong": gsc("d", f"--data_folder={ws['ESC50']}"),
            "layout_fixed": gsc("d"),
            # Training on, against a fresh run of as many epochs.
            "one_epoch": gsc("t", "--number_of_epochs=1"),
            "train_on": gsc("t", "--number_of_epochs=2"),
            "fewer_epochs": gsc("t", "--number_of_epochs=1"),
            "train_on_and_lr": gsc("t", "--number_of_epochs=3", "--lr=0.01"),
            "fresh_two": gsc("u", "--number_of_epochs=2"),
            # The project's command as written: recipes/GSC/train.py hparams/lora.yaml, from the repository root.
            "from_root": gsc("r", hparams=Path("hparams/lora.yaml")),
            "esc50_fold": recipe_args("ESC50", "linear", ws, root / "e", "--fold=2"),
            # Finished, then its checkpoints and result lost: a record that never trained (edited below).
            "crashed": gsc("c"),
        }
    )
    datasets = ["ESC50" if name.startswith("esc50") else "GSC" for name in first]
    outcomes = dict(zip(first, run_recipes(list(zip(datasets, first.values())), root / "first.json")))

    for path in [*(root / "c" / "save").glob("CKPT+*"), root / "c" / FOLD_RESULT, root / "c" / RESULTS]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    before = file_states(root / "u")
    second = {
        "after_crash_other_lr": gsc("c", "--lr=0.02"),
        "test_only": [*gsc("u", "--number_of_epochs=2"), "--test_only"],
    }
    outcomes.update(zip(second, run_recipes([("GSC", args) for args in second.values()], root / "second.json")))
    return outcomes, root, ws, before


@pytest.mark.parametrize("name", BAD_VALUES)
def test_a_bad_value_is_one_line_exit_1_and_nothing_written(runs, name):
    outcomes, root, _, _ = runs
    if name == "no_cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    outcome = outcomes[f"bad_{name}"]
    assert (outcome["code"], outcome["message"]) == (1, f"GSC recipe: error: {BAD_VALUES[name][1]}")
    assert not (root / f"bad_{name}").exists()


def test_a_repeated_option_names_the_key(runs):
    outcomes, root, _, _ = runs
    assert outcomes["bad_repeated"]["message"] == "GSC recipe: error: --lr is given more than once; keep one"
    assert not (root / "bad_repeated").exists()


def test_a_missing_hyperparameter_file_lists_the_recipes_files(runs):
    outcomes, root, _, _ = runs
    message = outcomes["bad_missing_file"]["message"]
    assert message.startswith(f"GSC recipe: error: hyperparameter file not found: {REPO / 'hparams/lorra.yaml'} or ")
    listed = re.search(r"<([^>]*)>\.yaml$", message).group(1).split("|")
    assert {"lora", "soft_moa", "conformer_adapter", "linear"} <= set(listed) and "lorra" not in listed
    assert not (root / "bad_missing_file").exists()


def test_a_yaml_syntax_error_gives_file_line_and_column(runs):
    outcomes, root, _, _ = runs
    message = outcomes["bad_yaml_syntax"]["message"]
    # The flow sequence opened at line 2, column 5 is still open where line 3 puts a key.
    assert message.startswith(f"GSC recipe: error: {root / 'bad.yaml'}:3:11: not valid YAML (")
    assert "line 2, column 5" in message and "\n" not in message


def test_one_line_on_stderr_and_no_torchvision_line():
    """In a process of its own: stderr is the error line alone (SpeechBrain's import-time line included)."""
    process = run_recipe("GSC", [str(REPO / "recipes/GSC/hparams/lora.yaml"), "--lr=abc", "--device=cpu"])
    assert process.returncode == 1
    assert process.stderr.strip().splitlines() == ["GSC recipe: error: --lr must be a number, got 'abc'"]


def test_petl_traceback_shows_the_traceback_of_a_user_error():
    env = {"PETL_TRACEBACK": "1"}
    process = run_recipe("GSC", [str(REPO / "recipes/GSC/hparams/lora.yaml"), "--lr=abc", "--device=cpu"], env=env)
    assert process.returncode == 1
    assert "Traceback (most recent call last)" in process.stderr
    assert (
        process.stderr.strip().splitlines()[-1]
        == "petl_modules.hparams_loader.HparamsError: --lr must be a number, got 'abc'"
    )


@pytest.mark.parametrize(
    ("wrong", "fixed", "message"),
    [
        ("num_classes_wrong", "num_classes_fixed", "num_classes is 5 but the prepared GSC data has 4 classes"),
        ("few_shot_too_many", "few_shot_fixed", "few-shot K=100 needs 100 items per class"),
        ("layout_wrong", "layout_fixed", "validation_list.txt not found"),
    ],
)
def test_a_wrong_start_does_not_block_the_corrected_command(runs, wrong, fixed, message):
    outcomes, root, _, _ = runs
    assert outcomes[wrong]["code"] == 1 and message in outcomes[wrong]["message"]
    ok(outcomes[fixed])
    name = {"num_classes_fixed": "n", "few_shot_fixed": "f", "layout_fixed": "d"}[fixed]
    assert json.loads((root / name / RESULTS).read_text())["method"] == "lora"


def test_a_record_that_never_trained_binds_nothing(runs):
    """A run folder with hyperparams.yaml but no checkpoint and no result (a start that died before training)
    takes the next command's settings."""
    outcomes, root, _, _ = runs
    ok(outcomes["after_crash_other_lr"])
    assert json.loads((root / "c" / RESULTS).read_text())["settings"]["lr"] == 0.02
    assert "lr: 0.02" in (root / "c" / "hyperparams.yaml").read_text()


def test_more_epochs_train_a_finished_run_on_with_a_new_cosine(runs):
    outcomes, root, _, _ = runs
    ok(outcomes["one_epoch"]), ok(outcomes["train_on"]), ok(outcomes["fresh_two"])
    assert "training" in outcomes["train_on"]["stdout"] and "on from 1 epochs" in outcomes["train_on"]["stdout"]
    log = (root / "t" / "train_log.txt").read_text()
    # lora's lr is 0.005; GSC's 8 training clips in batches of 4 are 2 steps an epoch. Epoch 2 of the trained-on
    # run starts a new cosine at the full lr; in a fresh 2-epoch run its first step is half way down: 0.0025.
    assert re.findall(r"epoch: (\d+), lr: ([0-9.e+-]+)", log) == [("1", "5.00e-03"), ("2", "5.00e-03")]
    fresh = (root / "u" / "train_log.txt").read_text()
    assert re.findall(r"epoch: (\d+), lr: ([0-9.e+-]+)", fresh) == [("1", "5.00e-03"), ("2", "2.50e-03")]
    result = json.loads((root / "t" / FOLD_RESULT).read_text())
    assert result["lr_schedule"] == [
        {"first_epoch": 1, "last_epoch": 1, "warmup_steps": 0},
        {"first_epoch": 2, "last_epoch": 2, "warmup_steps": 0},
    ]
    assert json.loads((root / "t" / RESULTS).read_text())["number_of_epochs"] == 2
    assert "Trained on: epochs 1-1 ran first" in (root / "t" / "hyperparams.yaml").read_text()


def test_fewer_epochs_or_other_settings_are_still_refused(runs):
    outcomes, root, _, _ = runs
    assert outcomes["fewer_epochs"]["code"] == 1
    assert "(number_of_epochs differ from" in outcomes["fewer_epochs"]["message"]
    assert outcomes["train_on_and_lr"]["code"] == 1
    assert "(lr, number_of_epochs differ from" in outcomes["train_on_and_lr"]["message"]
    assert json.loads((root / "t" / RESULTS).read_text())["number_of_epochs"] == 2  # untouched


def test_the_hyperparameter_file_is_found_in_the_recipe_folder(runs):
    outcomes, root, _, _ = runs
    ok(outcomes["from_root"])
    header = (root / "r" / "hyperparams.yaml").read_text().splitlines()[0]
    assert f"{REPO / 'recipes/GSC/hparams/lora.yaml'} with its `extends:`" in header


def test_a_finished_recipe_prints_its_test_accuracy_last(runs):
    outcomes, root, _, _ = runs
    accuracy = json.loads((root / "u" / RESULTS).read_text())["mean"]["test"]["accuracy"]
    assert last_line(outcomes["fresh_two"]) == f"GSC lora: test accuracy {100 * accuracy:.2f} %"
    esc50 = json.loads((root / "e" / RESULTS).read_text())
    test = esc50["folds"]["2"]["test"]["accuracy"]
    assert (
        last_line(outcomes["esc50_fold"]) == f"ESC50 linear: test accuracy {100 * test:.2f} ± 0.00 % over 1 of 5 folds"
    )


def test_test_only_writes_nothing(runs):
    outcomes, root, _, before = runs
    outcome = ok(outcomes["test_only"])
    assert file_states(root / "u") == before  # train_log.txt, log.txt, checkpoints: untouched
    accuracy = json.loads((root / "u" / FOLD_RESULT).read_text())["test"]["accuracy"]
    assert last_line(outcome).startswith(f"GSC lora: test accuracy {100 * accuracy:.2f} % (epoch ")
