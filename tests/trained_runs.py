"""Finished tiny GSC runs for the prediction and export tests, trained once per test session.

Each run goes through the recipe's command line (`python recipes/GSC/train.py ...`), as a user runs it.
Runs are kept under the session's base temporary folder, so test modules that ask for the same run share it.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from recipe_helpers import DATASETS, REPO, recipe_args

from petl_modules.random_backbones import write_random_checkpoint

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def workspace(base: Path) -> dict[str, Path]:
    """The tiny GSC data set and the tiny AST checkpoint (max_length 1024), written once."""
    root = base / "inference_workspace"
    if not (root / "done").is_file():
        data = DATASETS["GSC"][0](root / "data" / "GSC")
        write_random_checkpoint("ast", root / "ast")
        (root / "done").write_text(str(data))
    return {"GSC": Path((root / "done").read_text()), "ast": root / "ast"}


def trained_run(tmp_path_factory: pytest.TempPathFactory, method: str) -> Path:
    """The output folder of a finished one-epoch GSC run of `method` on the tiny AST."""
    base = tmp_path_factory.getbasetemp()
    output = base / "inference_runs" / method
    if not (output / "results.json").is_file():
        args = recipe_args("GSC", method, workspace(base), output)
        done = subprocess.run(
            [sys.executable, str(REPO / "recipes" / "GSC" / "train.py"), *args],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    return output


def manifest_items(output: Path) -> list[tuple[str, str]]:
    """(audio file, label) of the run's test manifest."""
    with open(output / "manifests" / "test.csv", newline="") as handle:
        return [(row["wav"], row["label"]) for row in csv.DictReader(handle)]


def recipe_test_stage(output: Path) -> dict:
    """The recipe's own test-stage result (loss, accuracy, confusion matrix) and its class order."""
    fold = json.loads((output / "results.json").read_text())["folds"]["official"]
    return {**fold["test"], "classes": fold["classes"]}


def check_equals_test_stage(records: list[dict], run) -> None:
    """Predictions on every test file give the test stage's confusion matrix and mean cross-entropy."""
    stage = recipe_test_stage(run)
    classes = stage["classes"]
    labels = dict(manifest_items(run))
    confusion = [[0] * len(classes) for _ in classes]
    losses = []
    for record in records:
        true = labels[record["file"]]
        confusion[classes.index(true)][classes.index(record["label"])] += 1
        probabilities = {entry["label"]: entry["score"] for entry in record["top_k"]}
        assert sorted(probabilities) == sorted(classes)  # top_k = all classes here
        losses.append(-np.log(probabilities[true]))
    assert confusion == stage["confusion_matrix"]
    # The test stage averages the per-batch mean loss; its batches (4) divide the 8 test items evenly.
    assert np.mean(losses) == pytest.approx(stage["loss"], rel=1e-5)
