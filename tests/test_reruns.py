"""Honest runs: reruns of finished runs, `--test_only`, `--debug`, settings given in a YAML file, what is
recorded, optional packages, folds run as separate jobs, and bf16. All through the recipes' command line."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from hyperpyyaml import load_hyperpyyaml
from recipe_helpers import recipe_args, run_recipes, write_workspace

from petl_modules.flatten import flatten
from petl_modules.recipe import FOLD_RESULT, RESULTS

TINY = ["--device=cpu", "--noprogressbar"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One interpreter runs the command lines of every test here, in order; returns (outcomes, root)."""
    root = tmp_path_factory.mktemp("reruns")
    workspace = write_workspace(root / "workspace")
    base = recipe_args("GSC", "lora", workspace, root / "a")
    # A YAML file that sets data_folder and output_folder itself (any key may be set in a file).
    own = root / "own.yaml"
    options = {arg[2:].split("=", 1)[0]: arg.split("=", 1)[1] for arg in base[1:] if "=" in arg}
    settings = {key: value for key, value in options.items() if key not in ("device", "noprogressbar")}
    settings["output_folder"] = str(root / "h")
    own.write_text(
        f"extends: {base[0]}\n"
        + "".join(f"{key}: {value}\n" for key, value in settings.items() if key != "output_folder")
        + f"output_folder: {settings['output_folder']}\n"
    )
    flat = root / "flat.yaml"
    flat.write_text(
        flatten(base[0], "\n".join(f"{k}: {v}" for k, v in {**settings, "output_folder": root / "j"}.items()))
    )
    esc = lambda *extra: recipe_args("ESC50", "linear", workspace, root / "k", *extra)  # noqa: E731
    commands = {
        "first": base,
        "same": base,
        "more_epochs": recipe_args("GSC", "lora", workspace, root / "a", "--number_of_epochs=2", "--lr=0.01"),
        "test_only": [*base, "--test_only"],
        "debug": [*base, "--debug"],
        "test_only_fresh": recipe_args("GSC", "lora", workspace, root / "f", "--test_only"),
        "wandb": recipe_args("GSC", "lora", workspace, root / "g", "--use_wandb=True"),
        "own_yaml": [str(own), *TINY],
        "nested": recipe_args("GSC", "lora", workspace, root / "i", "--train_dataloader_options={batch_size: 2}"),
        "flat": [str(flat), *TINY],
        "fold1": esc("--fold=1"),
        "fold2": esc("--fold=2"),
        "fold3_other_lr": esc("--fold=3", "--lr=0.5"),
        "bf16": recipe_args("GSC", "lora", workspace, root / "b", "--precision=bf16", "--eval_precision=bf16"),
    }
    datasets = ["ESC50" if name.startswith("fold") else "GSC" for name in commands]
    outcomes = run_recipes(list(zip(datasets, commands.values())), root / "report.json")
    return dict(zip(commands, outcomes)), root


def ok(outcome: dict) -> dict:
    assert outcome["code"] == 0, outcome["message"]
    return outcome


def test_rerunning_a_finished_run_says_so_and_changes_nothing(runs):
    outcomes, root = runs
    ok(outcomes["first"])
    assert f"{root / 'a'} is finished with these settings: {root / 'a' / FOLD_RESULT}" in ok(outcomes["same"])["stdout"]
    results = json.loads((root / "a" / RESULTS).read_text())
    assert results["folds"]["official"] == json.loads((root / "a" / FOLD_RESULT).read_text())
    assert results["debug"] is False


def test_other_settings_on_a_finished_run_are_an_error_naming_them(runs):
    outcomes, root = runs
    assert outcomes["more_epochs"]["code"] == 1
    assert "(lr, number_of_epochs differ from" in outcomes["more_epochs"]["message"]
    results = json.loads((root / "a" / RESULTS).read_text())
    assert results["number_of_epochs"] == 1 and results["settings"]["lr"] == 0.005  # what ran
    assert (root / "a" / "train_log.txt").read_text().count("epoch: ") == 1


def test_test_only_needs_a_checkpoint_and_writes_no_result(runs):
    outcomes, root = runs
    assert outcomes["test_only_fresh"]["code"] == 1
    assert f"--test_only: no checkpoint in {root / 'f' / 'save'}" in outcomes["test_only_fresh"]["message"]
    assert not (root / "f").exists()
    assert "test only, nothing written" in ok(outcomes["test_only"])["stdout"]
    fold_result = json.loads((root / "a" / FOLD_RESULT).read_text())
    assert json.loads((root / "a" / RESULTS).read_text())["folds"]["official"] == fold_result


def test_debug_runs_apart_and_never_touches_real_results(runs):
    outcomes, root = runs
    ok(outcomes["debug"])
    assert json.loads((root / "a" / RESULTS).read_text())["debug"] is False
    assert json.loads((root / "a" / "debug" / RESULTS).read_text())["debug"] is True


def test_a_missing_optional_package_stops_before_anything_is_written(runs):
    outcomes, root = runs
    assert outcomes["wandb"]["code"] == 1
    assert outcomes["wandb"]["message"] == (
        "GSC recipe: error: --use_wandb=True needs the wandb package (pip install wandb)"
    )
    assert not (root / "g").exists()


def test_data_and_output_folders_may_be_set_in_the_yaml(runs):
    outcomes, root = runs
    ok(outcomes["own_yaml"])
    assert json.loads((root / "h" / RESULTS).read_text())["method"] == "lora"


def test_the_recorded_hyperparams_are_what_ran(runs):
    """A nested override keeps its sibling keys, and the record loads with plain HyperPyYAML."""
    outcomes, root = runs
    ok(outcomes["nested"])
    text = (root / "i" / "hyperparams.yaml").read_text()
    assert "\nextends:" not in text
    recorded = load_hyperpyyaml(StringIO(text))
    assert recorded["train_dataloader_options"] == {"batch_size": 2, "num_workers": 0}
    assert recorded["save_folder"] == str(root / "i" / "save")
    train_items = json.loads((root / "i" / FOLD_RESULT).read_text())["train_items"]
    assert (root / "i" / "train_log.txt").exists() and train_items == 8  # 8 items in batches of 2: 4 steps


def test_a_flattened_file_runs_unchanged(runs):
    outcomes, root = runs
    ok(outcomes["flat"])
    assert json.loads((root / "j" / RESULTS).read_text())["method"] == "lora"


def test_folds_run_as_separate_jobs_aggregate_and_refuse_other_settings(runs):
    outcomes, root = runs
    ok(outcomes["fold1"]), ok(outcomes["fold2"])
    assert outcomes["fold3_other_lr"]["code"] == 1
    assert (
        "fold 1 in" in outcomes["fold3_other_lr"]["message"] and "(lr differ)" in outcomes["fold3_other_lr"]["message"]
    )
    assert not (root / "k" / "fold3").exists()
    results = json.loads((root / "k" / RESULTS).read_text())
    assert list(results["folds"]) == ["1", "2"] and results["folds_missing"] == ["3", "4", "5"]


def test_bf16_trains_and_evaluates_under_autocast(runs):
    """SpeechBrain's `--precision=bf16 --eval_precision=bf16`: the run "first" makes in fp32, up to bf16 rounding."""
    outcomes, root = runs
    ok(outcomes["bf16"])
    assert "Using training precision: `--precision=bf16`" in (root / "b" / "log.txt").read_text()
    fp32, bf16 = (json.loads((root / run / FOLD_RESULT).read_text())["test"] for run in ("a", "b"))
    assert bf16["loss"] != fp32["loss"]  # the forward really ran in bf16 ...
    assert bf16["loss"] == pytest.approx(fp32["loss"], abs=0.02)  # ... and trained the same model
