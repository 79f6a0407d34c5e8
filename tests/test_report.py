"""`python -m petl_apps.report`: tables and figures from recorded results (hand-written and one real tiny
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

from petl_apps.report import Run, main, parse_train_log, summed_confusion, write_report
from petl_apps.synthetic import make_gsc
from petl_modules.random_backbones import write_random_checkpoint

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
    settings: dict | None = None,
    epochs: dict[str, int | None] | None = None,
    number_of_epochs: int = 2,
    backbone_source: str = "x",
    written: float | None = None,
) -> Path:
    """A results.json as the recipe driver writes it, with chosen test accuracies per fold.

    `settings` becomes the results' `settings` (with `number_of_epochs`, `seed` and `few_shot_samples` added as
    the recipe records them), `epochs` the selected epoch per fold (2 by default, None = never validated),
    `written` the file's modification time."""
    folds = {}
    for key, accuracy in accuracies.items():
        n = len(classes)
        confusion = (np.eye(n, dtype=int) * (1 + int(key.isdigit() and int(key)))).tolist()
        test = {"loss": 1.0, "accuracy": accuracy, "macro_f1": accuracy / 2, "confusion_matrix": confusion}
        test.update((extra or {}).get(key, {}))
        folds[key] = {
            "fold": None if key == "official" else int(key),
            "epoch": (epochs or {}).get(key, 2),
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
        "backbone_source": backbone_source,
        "few_shot_samples": few_shot,
        "seed": seed,
        "number_of_epochs": number_of_epochs,
        "git_revision": None,
        "debug": debug,
        "parameters": {"trainable": trainable, "backbone": 100000, "trainable_percent": trainable / 1000},
        "folds": folds,
        "folds_missing": list(missing),
        "mean": {},
        "std": {},
    }
    if settings is not None:
        recorded = {
            "number_of_epochs": number_of_epochs,
            "seed": seed,
            "few_shot_samples": few_shot,
            "backbone_source": backbone_source,
        }
        results["settings"] = {**recorded, **settings}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results))
    if written is not None:
        os.utime(folder / "results.json", (written, written))
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
    assert "6 run(s) (results.json) found" in text and "left out: 1 debug" in text
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


# --- rows: one per dataset, backbone, method and settings; a seed counts once; nothing untrained -------------


def per_run_folders(seed: int) -> dict:
    """Settings that differ between runs of one experiment without defining it (paths, workers, caches)."""
    return {
        "output_folder": f"/runs/seed{seed}",
        "save_folder": f"/runs/seed{seed}/save",
        "data_folder": f"/data/copy{seed}",
        "num_workers": seed,
        "cache_embeddings": seed % 2 == 0,
        "method_name": f"name{seed}",
    }


def test_runs_with_other_settings_are_other_rows(tmp_path):
    """(a) One method with other epochs, adapters or checkpoint: one row each, labelled with what differs."""
    root = tmp_path / "results"
    base = {"lr": 0.005, "backbone": "ast", "batch_size": 32}
    adapter = [
        (20, 4, {"1": 0.5, "2": 0.7}),
        (50, 4, {"1": 0.6, "2": 0.6}),
        (50, 8, {"1": 0.9, "2": 0.8}),
    ]
    for number, (epochs, adapters, accuracies) in enumerate(adapter):
        settings = {**base, **per_run_folders(number), "num_adapters": adapters}
        folder = root / f"ESC50/adapter{number}"
        fake_results(folder, "ESC50", "soft_moa", 1, accuracies, settings=settings, number_of_epochs=epochs)
    one = {**base, "num_adapters": 4}
    fake_results(root / "GSC/moa", "GSC", "soft_moa", 1, {"official": 0.4}, settings=one, number_of_epochs=20)
    for source, accuracy in (("ckpt_a", 0.25), ("ckpt_b", 0.75)):  # another checkpoint is another model
        folder = root / f"GSC/linear_{source}"
        fake_results(folder, "GSC", "linear", 1, {"official": accuracy}, settings=base, backbone_source=source)
    text = write_report([root], tmp_path / "report").read_text()
    details = table_rows(text, "| dataset | backbone | method | test accuracy")
    moa = "soft_moa (num_adapters={}, number_of_epochs={})"
    # hand-computed: means and population stds of each run's two folds; one run (seed) per row
    assert details[("ESC50", "ast", moa.format(4, 20))][3] == "60.00 ± 10.00"
    assert details[("ESC50", "ast", moa.format(4, 50))][3] == "60.00 ± 0.00"
    assert details[("ESC50", "ast", moa.format(8, 50))][3] == "85.00 ± 5.00"
    for key in ((4, 20), (4, 50), (8, 50)):
        assert details[("ESC50", "ast", moa.format(*key))][-2:] == ["1", "2"]
    assert details[("GSC", "ast", "soft_moa")][3] == "40.00 ± 0.00"  # its only row on GSC: no settings named
    assert details[("GSC", "ast", "linear (backbone_source=ckpt_a)")][3] == "25.00 ± 0.00"
    assert details[("GSC", "ast", "linear (backbone_source=ckpt_b)")][3] == "75.00 ± 0.00"
    assert len(details) == 6
    main_table = table_rows(text, "| method | ESC50 | GSC |")
    assert list(main_table) == [
        ("linear (backbone_source=ckpt_a)", "-", "25.00 ± 0.00"),
        ("linear (backbone_source=ckpt_b)", "-", "75.00 ± 0.00"),
        ("soft_moa", "-", "40.00 ± 0.00"),
        (moa.format(4, 20), "60.00 ± 10.00", "-"),
        (moa.format(4, 50), "60.00 ± 0.00", "-"),
        (moa.format(8, 50), "85.00 ± 5.00", "-"),
    ]
    assert (tmp_path / "report/accuracy_vs_params.png").read_bytes()[:8] == PNG


def test_seeds_of_one_setting_are_one_row(tmp_path):
    """(b) Seeds 1 and 2 with equal settings (paths, workers, caches, method_name aside): one row, 2 runs; a
    third seed with another learning rate is a row of its own."""
    root = tmp_path / "results"
    runs = ((1, 0.01, {"1": 0.5, "2": 0.7}), (2, 0.01, {"1": 0.6, "2": 0.8}), (3, 0.02, {"1": 0.1, "2": 0.2}))
    for seed, lr, accuracies in runs:
        settings = {"lr": lr, **per_run_folders(seed)}
        fake_results(root / f"seed{seed}", "ESC50", "lora", seed, accuracies, settings=settings)
    text = write_report([root], tmp_path / "report").read_text()
    details = table_rows(text, "| dataset | backbone | method | test accuracy")
    assert list(details) == [("ESC50", "ast", "lora (lr=0.01)"), ("ESC50", "ast", "lora (lr=0.02)")]
    # folds 0.5 0.7 0.6 0.8: mean 0.65, variance (0.15^2 + 0.05^2 + 0.05^2 + 0.15^2) / 4 = 0.0125
    assert details[("ESC50", "ast", "lora (lr=0.01)")][3] == "65.00 ± 11.18"
    assert details[("ESC50", "ast", "lora (lr=0.01)")][-2:] == ["2", "4"]
    assert details[("ESC50", "ast", "lora (lr=0.02)")][3] == "15.00 ± 5.00"
    assert details[("ESC50", "ast", "lora (lr=0.02)")][-2:] == ["1", "2"]
    assert "Left out" not in text


def test_a_seed_written_twice_counts_once(tmp_path, caplog):
    """(c) Two results.json with the same settings and seed: the newer is used, the other listed as a duplicate."""
    root = tmp_path / "results"
    settings = {"lr": 0.01}
    old = fake_results(root / "b_old", "GSC", "lora", 3, {"official": 0.2}, settings=settings, written=1_000_000)
    new = fake_results(root / "a_new", "GSC", "lora", 3, {"official": 0.9}, settings=settings, written=2_000_000)
    fake_results(root / "c_seed4", "GSC", "lora", 4, {"official": 0.5}, settings=settings, written=1_500_000)
    with caplog.at_level("WARNING", logger="petl_apps.report"):
        text = write_report([root], tmp_path / "report").read_text()
    row = table_rows(text, "| dataset | backbone | method | test accuracy")[("GSC", "ast", "lora")]
    assert row[3] == "70.00 ± 20.00" and row[-2:] == ["2", "2"]  # 0.9 and 0.5; the older 0.2 is not counted
    assert "2 run(s) (results.json) found" in text and "left out: 1 duplicate" in text
    assert f"`{new / 'results.json'}`" in text.split("## Left out")[0]
    left_out = table_rows(text, "| results | why |")
    assert list(left_out) == [
        (
            f"`{old / 'results.json'}`",
            f"duplicate: same settings and seed 3 as {new}/results.json, which is newer; a seed counts once",
        )
    ]
    assert [r.getMessage() for r in caplog.records] == [
        f"report: left out {old / 'results.json'}: {left_out[list(left_out)[0]][1]}"
    ]


def test_debug_and_untrained_runs_are_in_no_table(tmp_path, caplog):
    """(d) A --debug run and a run with a fold that never validated (epoch null) are left out, each logged."""
    root = tmp_path / "results"
    settings = {"lr": 0.01}
    fake_results(root / "trained", "ESC50", "lora", 1, {"1": 0.5, "2": 0.6}, settings=settings)
    debug = fake_results(root / "debug", "ESC50", "lora", 2, {"1": 0.13, "2": 0.13}, settings=settings, debug=True)
    untrained = fake_results(
        root / "untrained", "ESC50", "lora", 3, {"1": 0.37, "2": 0.37}, settings=settings, epochs={"2": None}
    )
    few = fake_results(root / "few", "ESC50", "lora", 1, {"1": 0.41}, settings=settings, few_shot=2, epochs={"1": None})
    with caplog.at_level("WARNING", logger="petl_apps.report"):
        text = write_report([root], tmp_path / "report").read_text()
    details = table_rows(text, "| dataset | backbone | method | test accuracy")
    assert details == {("ESC50", "ast", "lora"): details[("ESC50", "ast", "lora")]}
    assert details[("ESC50", "ast", "lora")][3] == "55.00 ± 5.00"
    assert details[("ESC50", "ast", "lora")][-2:] == ["1", "2"]
    assert "13.00" not in text and "37.00" not in text and "41.00" not in text and "Few-shot" not in text
    assert "1 run(s) (results.json) found" in text and "left out: 1 debug, 2 untrained" in text
    messages = sorted(r.getMessage() for r in caplog.records)
    assert len(messages) == 3
    assert messages[0].startswith(f"report: left out {debug / 'results.json'}: recorded with --debug")
    assert messages[1].startswith(f"report: left out {few / 'results.json'}: untrained: fold 1 has no selected epoch")
    assert messages[2].startswith(f"report: left out {untrained / 'results.json'}: untrained: fold 2 has no selected")
    with pytest.raises(SystemExit, match="no finished recipe results.json below") as stop:
        main([str(untrained), "--out", str(tmp_path / "none")])
    assert "\n" not in str(stop.value)


def test_the_method_is_what_was_trained_not_method_name(tmp_path):
    """(e) `settings.method_name` is a free-text label: the row is results.json's `method`, one row for both."""
    root = tmp_path / "results"
    for seed, name in ((1, "foo"), (2, "bar")):
        settings = {"lr": 0.01, "method_name": name}
        fake_results(root / f"seed{seed}", "FSC", "lora", seed, {"official": 0.1 * seed}, settings=settings)
    text = write_report([root], tmp_path / "report").read_text()
    details = table_rows(text, "| dataset | backbone | method | test accuracy")
    assert list(details) == [("FSC", "ast", "lora")]
    assert details[("FSC", "ast", "lora")][3] == "15.00 ± 5.00" and details[("FSC", "ast", "lora")][-2:] == ["2", "2"]
    assert "foo" not in text and "bar" not in text
