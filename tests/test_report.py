"""`python -m petl_modules.report`: tables and figures from recorded results (hand-written and one real tiny
recipe run), checked against numpy on the recorded values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from recipe_helpers import REPO, recipe_args

from petl_modules.checkpoints import write_random_checkpoint
from petl_modules.data.synthetic import make_gsc
from petl_modules.report import Run, main, parse_train_log, summed_confusion, write_report

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
PNG = b"\x89PNG\r\n\x1a\n"


def fake_results(
    folder: Path,
    dataset: str,
    method: str,
    seed: int,
    accuracies: dict[str, float],
    *,
    few_shot: int | None = None,
    missing: list[str] = (),
    debug: bool = False,
    trainable: int = 1000,
    classes: list[str] = ("a", "b"),
    extra: dict[str, dict[str, float]] | None = None,
) -> Path:
    """A results.json as the recipe driver writes it, with chosen test accuracies per fold."""
    folds = {}
    for key, accuracy in accuracies.items():
        n = len(classes)
        confusion = (np.eye(n, dtype=int) * (1 + int(key.isdigit() and int(key)))).tolist()
        test = {"loss": 1.0, "accuracy": accuracy, "macro_f1": accuracy / 2, "confusion_matrix": confusion}
        test.update((extra or {}).get(key, {}))
        folds[key] = {
            "fold": None if key == "official" else int(key),
            "epoch": 2,
            "valid": {"loss": 1.0, "accuracy": accuracy / 2, "macro_f1": 0.1},
            "test": test,
            "classes": list(classes),
            "train_items": 10,
            "parameters": {"trainable": trainable, "trainable_groups": {"head": trainable}, "backbone": 100000},
        }
    results = {
        "dataset": dataset,
        "method": method,
        "backbone": "ast",
        "backbone_source": "x",
        "few_shot_samples": few_shot,
        "seed": seed,
        "number_of_epochs": 2,
        "git_revision": None,
        "debug": debug,
        "parameters": {"trainable": trainable, "backbone": 100000, "trainable_percent": trainable / 1000},
        "folds": folds,
        "folds_missing": list(missing),
        "mean": {},
        "std": {},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def table_rows(report: str, header_start: str) -> dict[tuple[str, ...], list[str]]:
    """The rows of the first markdown table whose header starts with `header_start`, keyed by first cells."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[tuple(cells[:3])] = cells
    return rows


def cell(values: list[float], dagger: bool = False) -> str:
    return f"{100 * np.mean(values):.2f} ± {100 * np.std(values):.2f}" + (" †" if dagger else "")


LOG = """epoch: 1, lr: 5.00e-03 - train loss: 1.50 - valid loss: 1.40, valid accuracy: 2.50e-01, valid macro_f1: 1e-01
epoch: 2, lr: 2.50e-03 - train loss: 1.20 - valid loss: 1.30, valid accuracy: 5.00e-01, valid macro_f1: 3.00e-01
epoch: 2, lr: 2.50e-03 - train loss: 1.10 - valid loss: 1.25, valid accuracy: 6.25e-01, valid macro_f1: 3.00e-01
epoch: 3, lr: [1e-3, 2e-3] - train loss: 1.00 - valid loss: 1.20, valid accuracy: 7.50e-01, valid macro_f1: 4.00e-01
epoch chosen: 3 - test loss: 1.21, test accuracy: 7.00e-01, test macro_f1: 4.00e-01
"""


def test_parse_train_log(tmp_path):
    (tmp_path / "train_log.txt").write_text(LOG)
    epochs, chosen = parse_train_log(tmp_path / "train_log.txt")
    assert chosen == 3
    assert epochs == {
        1: {"lr": 5e-3, "train loss": 1.5, "valid loss": 1.4, "valid accuracy": 0.25, "valid macro_f1": 0.1},
        2: {"lr": 2.5e-3, "train loss": 1.1, "valid loss": 1.25, "valid accuracy": 0.625, "valid macro_f1": 0.3},
        3: {"train loss": 1.0, "valid loss": 1.2, "valid accuracy": 0.75, "valid macro_f1": 0.4},  # list lr skipped
    }


@pytest.fixture
def recorded(tmp_path) -> Path:
    """ESC50 adapter (seed 1 complete, seed 2 partial), ESC50 linear, IEMOCAP lora, GSC lora few-shot, a debug run."""
    root = tmp_path / "results"
    esc = {"1": 0.5, "2": 0.6, "3": 0.7, "4": 0.8, "5": 0.9}
    fake_results(root / "ESC50/adapter/seed1", "ESC50", "adapter", 1, esc, trainable=5000)
    fake_results(
        root / "ESC50/adapter/seed2",
        "ESC50",
        "adapter",
        2,
        {"1": 0.4, "2": 0.3},
        missing=["3", "4", "5"],
        trainable=5000,
    )
    fake_results(root / "ESC50/linear/seed1", "ESC50", "linear", 1, {"1": 0.2, "2": 0.2, "3": 0.2, "4": 0.3, "5": 0.1})
    ua = {"1": {"unweighted_accuracy": 0.45}, "2": {"unweighted_accuracy": 0.55}}
    fake_results(root / "IEMOCAP/lora/seed1", "IEMOCAP", "lora", 1, {"1": 0.5, "2": 0.6}, extra=ua)
    for k, accuracy in ((1, 0.3), (2, 0.5)):
        fake_results(root / f"GSC/lora/seed1/fewshot{k}", "GSC", "lora", 1, {"official": accuracy}, few_shot=k)
    fake_results(root / "GSC/lora/seed9", "GSC", "lora", 9, {"official": 0.99}, debug=True)
    log_folder = root / "ESC50/adapter/seed1/fold2"
    log_folder.mkdir(parents=True)
    (log_folder / "train_log.txt").write_text(LOG)
    return root


def test_report_from_recorded_results(recorded, tmp_path):
    report = write_report([recorded], tmp_path / "report")
    text = report.read_text()
    assert "6 run(s) (results.json) found" in text and "1 debug run(s) left out" in text
    assert "0.99" not in text  # the debug run's accuracy
    details = table_rows(text, "| dataset | backbone | method | test accuracy")
    adapter = [0.5, 0.6, 0.7, 0.8, 0.9, 0.4, 0.3]  # every fold of both seeds, pooled
    assert details[("ESC50", "ast", "adapter")][3] == cell(adapter, dagger=True)
    assert details[("ESC50", "ast", "adapter")][-5:] == [cell([a / 2 for a in adapter]), "5,000", "5.000", "2", "7"]
    assert details[("ESC50", "ast", "linear")][3] == cell([0.2, 0.2, 0.2, 0.3, 0.1])
    assert details[("IEMOCAP", "ast", "lora")][3:5] == [cell([0.5, 0.6]), cell([0.45, 0.55])]
    assert details[("ESC50", "ast", "linear")][4] == "-"  # no unweighted accuracy outside IEMOCAP
    main_table = table_rows(text, "| method | ESC50 | IEMOCAP |")
    assert list(main_table) == [
        ("linear", cell([0.2, 0.2, 0.2, 0.3, 0.1]), "-"),
        ("lora", "-", cell([0.5, 0.6])),
        ("adapter", cell(adapter, dagger=True), "-"),
    ]  # the papers' method order
    few = table_rows(text, "| dataset | backbone | method | K=1 | K=2 |")
    assert few[("GSC", "ast", "lora")][3:] == [cell([0.3]), cell([0.5])]
    assert f"| GSC | ast | lora | 1 | {cell([0.3])} |" in text and f"| GSC | ast | lora | 2 | {cell([0.5])} |" in text
    for figure in ("accuracy_vs_params.png", "few_shot.png", "curves/ESC50_adapter_ast_seed1.png"):
        assert (tmp_path / "report" / figure).read_bytes()[:8] == PNG
        assert f"({figure})" in text
    assert not (tmp_path / "report/curves/ESC50_linear_ast_seed1.png").exists()  # no train_log recorded
    confusions = sorted(p.name for p in (tmp_path / "report/confusion").iterdir())
    assert confusions == sorted(
        f"{name}.png"
        for name in (
            "ESC50_adapter_ast_seed1",
            "ESC50_adapter_ast_seed2",
            "ESC50_linear_ast_seed1",
            "IEMOCAP_lora_ast_seed1",
            "GSC_lora_ast_seed1_fewshot1",
            "GSC_lora_ast_seed1_fewshot2",
        )
    )


def test_confusion_is_summed_over_folds(recorded):
    run = Run(
        recorded / "ESC50/adapter/seed1/results.json",
        json.loads((recorded / "ESC50/adapter/seed1/results.json").read_text()),
    )
    classes, total, folds = summed_confusion(run)
    expected = sum(np.array(fold["test"]["confusion_matrix"]) for fold in run.results["folds"].values())
    assert classes == ["a", "b"] and folds == 5 and np.array_equal(np.array(total), expected)


def test_report_of_one_run_folder_and_the_command_line(recorded, tmp_path, capsys):
    main([str(recorded / "IEMOCAP/lora/seed1"), "--out", str(tmp_path / "one")])
    text = (tmp_path / "one/report.md").read_text()
    assert "1 run(s)" in text and "few-shot" not in text.lower()
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "one"), "--out", str(tmp_path / "none")])
    assert "no finished recipe results.json below" in str(stop.value) and "\n" not in str(stop.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/results.json").write_text('{"accuracy": 1}')
    with pytest.raises(SystemExit, match=r"bad/results.json: not a recipe's results.json \(no dataset"):
        main([str(tmp_path / "bad"), "--out", str(tmp_path / "none")])


def test_report_from_a_real_recipe_run(tmp_path):
    """The train_log.txt and results.json the GSC recipe writes (2 epochs, tiny AST) render as recorded."""
    workspace = {
        "GSC": make_gsc(tmp_path / "data", num_words=4, n_per_class=2),
        "ast": write_random_checkpoint("ast", tmp_path / "ast"),
    }
    output = tmp_path / "runs" / "GSC" / "linear"
    args = recipe_args("GSC", "linear", workspace, output, "--number_of_epochs=2")
    subprocess.run(
        [sys.executable, str(REPO / "recipes/GSC/train.py"), *args], check=True, env=ENV, capture_output=True
    )
    results = json.loads((output / "results.json").read_text())
    fold = results["folds"]["official"]
    epochs, chosen = parse_train_log(output / "train_log.txt")
    assert list(epochs) == [1, 2] and chosen == fold["epoch"]
    assert epochs[chosen]["valid accuracy"] == pytest.approx(fold["valid"]["accuracy"], rel=1e-2)
    assert epochs[chosen]["valid loss"] == pytest.approx(fold["valid"]["loss"], rel=1e-2)
    text = write_report([tmp_path / "runs"], tmp_path / "report").read_text()
    row = table_rows(text, "| dataset | backbone | method | test accuracy")[("GSC", "ast", "linear")]
    assert row[3] == f"{100 * fold['test']['accuracy']:.2f} ± 0.00"
    assert row[5] == f"{results['parameters']['trainable']:,}"
    for figure in ("accuracy_vs_params.png", "curves/GSC_linear_ast_seed10.png", "confusion/GSC_linear_ast_seed10.png"):
        assert (tmp_path / "report" / figure).read_bytes()[:8] == PNG
