"""`python -m petl_apps.report` beside the MLSP 2024 paper: the comparison table of the paper presets' rows, the
protocol paragraph, the paper's hollow markers in accuracy_vs_params.png, and the grid-sweep figures. The paper's
numbers are read through `petl_apps.paper`, never typed here; the expected differences are written by hand."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import matplotlib.colors
import pytest
from recipe_helpers import REPO, recipe_args
from test_report import ENV, PNG, cell, fake_results, table_rows

from petl_apps import report as report_module
from petl_apps.paper import paper_cell, preset_file, protocol, source, table_cells
from petl_apps.report import (
    accuracy_vs_params_points,
    find_grids,
    find_runs,
    group_runs,
    paper_params,
    plot_accuracy_vs_params,
    plot_grid,
    write_report,
)
from petl_apps.synthetic import make_gsc
from petl_modules.random_backbones import write_random_checkpoint

COMPARISON = "| table | paper row | dataset | K | method |"
DETAILS = "| dataset | backbone | method | test accuracy"


def preset_run(folder: Path, dataset: str, method: str, preset: str | None, accuracies, **options) -> Path:
    """A results.json of a paper preset's run (`paper_preset` among its settings; None: no preset)."""
    settings = {"lr": 0.005, **options.pop("settings", {})}
    if preset is not None:
        settings["paper_preset"] = preset
    return fake_results(folder, dataset, method, options.pop("seed", 10), accuracies, settings=settings, **options)


def set_backbone(folder: Path, backbone: str) -> None:
    """Record another backbone in a fabricated results.json (the fabricator writes `ast`)."""
    path = folder / "results.json"
    results = json.loads(path.read_text())
    results["backbone"] = results["settings"]["backbone"] = backbone
    path.write_text(json.dumps(results))


def groups_below(root: Path):
    return group_runs(find_runs([root])[0])


def signed(value: Decimal) -> str:
    return f"{value.quantize(Decimal('0.01')):+}"


@pytest.fixture
def presets(tmp_path) -> Path:
    """Paper-preset runs (Tables 1, 2 and 3, and a few-shot K the paper lacks), and a run of no preset."""
    root = tmp_path / "results"
    pfeiffer = paper_cell("conformer_pfeiffer", "ESC50")
    lora = paper_cell("lora", "GSC")
    dpt = next(c for c in table_cells("table2") if (c.preset, c.dataset) == ("dpt25", "GSC"))
    iemocap = paper_cell("wav2vec2_linear", "IEMOCAP")
    assert None not in (pfeiffer, lora, iemocap) and paper_cell("dpt25", "GSC", 3) is None
    preset_run(root / "ESC50/pfeiffer", "ESC50", "conformer_adapter", "conformer_pfeiffer", {"1": 0.9, "2": 0.9})
    # two seeds, 1.25 and 0.75 points above the paper: mean 1.00 above, std 0.25
    for seed, above in ((1, 0.0125), (2, 0.0075)):
        accuracy = {"official": lora.accuracy / 100 + above}
        preset_run(root / f"GSC/lora/seed{seed}", "GSC", "lora", "lora", accuracy, seed=seed, trainable=221184)
    few = {"official": dpt.accuracy / 100 - 0.025}  # 2.50 points below the paper
    preset_run(root / "GSC/dpt", "GSC", "prompt_tuning", "dpt25", few, few_shot=dpt.few_shot, trainable=230400)
    preset_run(root / "GSC/dpt_k3", "GSC", "prompt_tuning", "dpt25", {"official": 0.11}, few_shot=3)
    folder = preset_run(root / "IEMOCAP/w2v", "IEMOCAP", "linear", "wav2vec2_linear", {"1": 0.5, "2": 0.6})
    set_backbone(folder, "wav2vec2")
    preset_run(root / "ESC50/plain", "ESC50", "linear", None, {"1": 0.6, "2": 0.7}, trainable=40000)
    return root


def test_the_comparison_table_holds_the_papers_numbers_and_the_differences(presets, tmp_path):
    text = write_report([presets], tmp_path / "report").read_text()
    pfeiffer = paper_cell("conformer_pfeiffer", "ESC50")
    lora = paper_cell("lora", "GSC")
    dpt = next(c for c in table_cells("table2") if (c.preset, c.dataset) == ("dpt25", "GSC"))
    iemocap = paper_cell("wav2vec2_linear", "IEMOCAP")
    rows = table_rows(text, COMPARISON)
    assert list(rows) == [  # Table 1 in the paper's row order, then Table 2, then Table 3
        ("Table 1", lora.label, "GSC"),
        ("Table 1", pfeiffer.label, "ESC50"),
        ("Table 2", dpt.label, "GSC"),
        ("Table 3", iemocap.label, "IEMOCAP"),
    ]
    # measured 90.00 against the paper's number, subtracted here in decimal
    esc = rows[("Table 1", pfeiffer.label, "ESC50")]
    difference = signed(Decimal("90.00") - Decimal(str(pfeiffer.accuracy)))
    assert esc[3:] == [
        "-",
        "conformer_adapter",
        "90.00 ± 0.00",
        f"{pfeiffer.accuracy:.2f}",
        difference,
        "1,000",
        pfeiffer.params,
    ]
    gsc = rows[("Table 1", lora.label, "GSC")]
    lora_folds = [lora.accuracy / 100 + 0.0125, lora.accuracy / 100 + 0.0075]
    assert gsc[5] == cell(lora_folds) and gsc[5].endswith(" ± 0.25")
    assert gsc[6:] == [f"{lora.accuracy:.2f}", "+1.00", "221,184", lora.params]
    few = rows[("Table 2", dpt.label, "GSC")]
    assert few[3:5] == [str(dpt.few_shot), "prompt_tuning"]
    assert few[6:] == [f"{dpt.accuracy:.2f}", "-2.50", "230,400", "-"]  # Table 2 prints no parameters
    w2v = rows[("Table 3", iemocap.label, "IEMOCAP")]
    assert w2v[5:] == [
        "55.00 ± 5.00",
        f"{iemocap.accuracy:.2f}",
        signed(Decimal("55.00") - Decimal(str(iemocap.accuracy))),
        "1,000",
        iemocap.params,
    ]
    # the K the paper lacks: not compared (the four rows above), named as without a number, in the few-shot table
    assert f"prompt_tuning [paper: {dpt.label}] on GSC (ast, K=3)" in text.split("## Test accuracy")[0]
    by_k = {dpt.few_shot: few[5], 3: "11.00 ± 0.00"}  # one row: the K the paper lacks is on the preset's row
    header = "| dataset | backbone | method | " + " | ".join(f"K={k}" for k in sorted(by_k)) + " |"
    row = table_rows(text, header)[("GSC", "ast", f"prompt_tuning [paper: {dpt.label}]")]
    assert row[3:] == [by_k[k] for k in sorted(by_k)]


def test_preset_rows_carry_the_papers_row_label_and_the_others_none(presets, tmp_path):
    text = write_report([presets], tmp_path / "report").read_text()
    details = table_rows(text, DETAILS)
    pfeiffer = paper_cell("conformer_pfeiffer", "ESC50")
    lora = paper_cell("lora", "GSC")
    assert details[("ESC50", "ast", f"conformer_adapter [paper: {pfeiffer.label}]")][3] == "90.00 ± 0.00"
    assert details[("GSC", "ast", f"lora [paper: {lora.label}]")][-2:] == ["2", "2"]  # both seeds, one row
    assert details[("ESC50", "ast", "linear")][3] == "65.00 ± 5.00"  # no preset: plain label
    main_table = table_rows(text, "| method | ESC50 | GSC |")
    assert ("linear", "65.00 ± 5.00", "-") in main_table
    compared = table_rows(text, COMPARISON).values()
    assert [row[2:5] for row in compared if row[2] == "ESC50"] == [["ESC50", "-", "conformer_adapter"]]  # no plain run


def test_the_protocol_is_stated_only_beside_paper_presets(presets, tmp_path):
    text = write_report([presets], tmp_path / "with").read_text()
    assert f"Protocol: {protocol()}" in text and source() in text
    assert text.index("## Paper comparison") < text.index("## Test accuracy")
    plain = tmp_path / "plain"
    preset_run(plain / "a", "ESC50", "linear", None, {"1": 0.6, "2": 0.7})
    preset_run(plain / "b", "GSC", "lora", None, {"official": 0.5})
    text = write_report([plain], tmp_path / "without").read_text()
    assert "Paper comparison" not in text and "Protocol" not in text and protocol() not in text
    assert "[paper:" not in text and source() not in text


def test_a_preset_without_a_number_for_its_dataset_is_listed_as_usual(tmp_path):
    """A preset on a dataset its table lacks (Table 3's wav2vec2 linear on ESC50), and Table 1's preset on
    another backbone: in the tables as usual, no comparison row, named as without a number."""
    assert paper_cell("wav2vec2_linear", "ESC50") is None
    root = tmp_path / "results"
    preset_run(root / "a", "ESC50", "linear", "wav2vec2_linear", {"1": 0.6, "2": 0.7})
    set_backbone(preset_run(root / "b", "GSC", "lora", "lora", {"official": 0.5}), "hubert")
    text = write_report([root], tmp_path / "report").read_text()
    assert COMPARISON not in text and f"Protocol: {protocol()}" in text
    assert (
        "Without a number in the paper" in text and "linear on ESC50 (ast)" in text and "lora on GSC (hubert)" in text
    )
    assert table_rows(text, DETAILS)[("ESC50", "ast", "linear")][3] == "65.00 ± 5.00"
    assert table_rows(text, DETAILS)[("GSC", "hubert", "lora")][3] == "50.00 ± 0.00"


# --- accuracy_vs_params.png: the paper's point hollow, in the measured point's colour -------------------------


def test_paper_params_reads_the_papers_counts():
    assert paper_params("249K") == 249e3 and paper_params("85M") == 85e6 and paper_params("1.5M") == 1.5e6
    assert paper_params("4K") == 4e3 and paper_params(" 90M ") == 90e6
    assert paper_params("9K/40K") is None and paper_params(None) is None and paper_params("") is None


def captured_figures(monkeypatch) -> dict[str, object]:
    """Figures by file name, kept open instead of written."""
    figures = {}
    monkeypatch.setattr(report_module, "_save", lambda fig, path: figures.__setitem__(Path(path).name, fig))
    return figures


def test_the_papers_point_is_hollow_in_the_rows_colour(presets, monkeypatch):
    groups = [g for g in groups_below(presets) if g.few_shot is None]
    pfeiffer, lora = paper_cell("conformer_pfeiffer", "ESC50"), paper_cell("lora", "GSC")
    points = accuracy_vs_params_points(groups)
    esc = [p for p in points if p.dataset == "ESC50"]
    measured, paper = (
        next(p for p in esc if not p.paper and "conformer" in p.label),
        next(p for p in esc if p.paper),
    )
    assert (measured.params, measured.accuracy, measured.std) == (1000.0, pytest.approx(90.0), pytest.approx(0.0))
    assert paper.params == paper_params(pfeiffer.params) and paper.accuracy == pfeiffer.accuracy
    assert (
        paper.std is None
        and paper.color == measured.color
        and paper.label == f"paper: {pfeiffer.label} ({pfeiffer.params})"
    )
    assert len([p for p in esc if p.paper]) == 1  # the run of no preset has no paper point
    assert len({p.color for p in esc if not p.paper}) == 2
    gsc_paper = [p for p in points if p.dataset == "GSC" and p.paper]
    assert [(p.params, p.accuracy) for p in gsc_paper] == [(paper_params(lora.params), lora.accuracy)]
    # the drawing: hollow markers where the points say, filled ones for the measured rows
    figures = captured_figures(monkeypatch)
    plot_accuracy_vs_params(groups, Path("accuracy_vs_params.png"))
    axes = {ax.get_title(): ax for ax in figures["accuracy_vs_params.png"].axes if ax.get_visible()}
    hollow = [line for line in axes["ESC50"].lines if line.get_markerfacecolor() == "none"]
    assert len(hollow) == 1 and list(hollow[0].get_xdata()) == [paper.params]
    assert list(hollow[0].get_ydata()) == [paper.accuracy]
    assert matplotlib.colors.same_color(hollow[0].get_markeredgecolor(), measured.color)
    filled = [line for line in axes["ESC50"].lines if line.get_marker() == "o" and line.get_markerfacecolor() != "none"]
    assert sorted(line.get_xdata()[0] for line in filled) == [1000.0, 40000.0]
    legend = [text.get_text() for text in axes["ESC50"].get_legend().get_texts()]
    assert legend == [paper.label]
    assert axes["IEMOCAP"].get_legend() is not None  # Table 3's "4K"


def test_no_hollow_point_without_a_single_parameter_count(presets, monkeypatch):
    """A paper cell whose params are not one count (`9K/40K`) or none: the measured point only."""
    real = report_module.paper_cell
    groups = [g for g in groups_below(presets) if g.few_shot is None]
    for params in ("9K/40K", None):

        def with_params(*key, params=params):
            found = real(*key)
            return found and dataclasses.replace(found, params=params)

        monkeypatch.setattr(report_module, "paper_cell", with_params)
        assert [g.paper.params for g in groups if g.paper_preset] == [params] * 3
        points = accuracy_vs_params_points(groups)
        assert not any(p.paper for p in points) and len(points) == 4


# --- grid sweeps ---------------------------------------------------------------------------------------------


def grid_runs(root: Path, names: tuple[str, ...], accuracies: dict[tuple, dict[str, float]], **fixed) -> None:
    """One run per entry of `accuracies` (the values of the settings `names` -> fold accuracies), written in
    reverse order, with the `fixed` settings too."""
    for index, (values, folds) in enumerate(reversed(list(accuracies.items()))):
        settings = {**fixed, **dict(zip(names, values))}
        folder = root / f"run{index}"
        fake_results(folder, "ESC50", "conformer_adapter", 10, folds, settings=settings, trainable=271000)


def test_a_kernel_size_grid_has_its_figure(tmp_path, monkeypatch):
    root = tmp_path / "results"
    accuracies = {(3,): {"1": 0.8, "2": 0.9}, (8,): {"1": 0.9, "2": 0.9}, (15,): {"1": 0.7, "2": 0.8}}
    grid_runs(root, ("kernel_size",), accuracies, reduction_rate=96, paper_preset="conformer_pfeiffer")
    text = write_report([root], tmp_path / "report").read_text()
    name = "grid_ESC50_conformer_adapter_ast_kernel_size.png"
    assert (tmp_path / "report" / name).read_bytes()[:8] == PNG
    assert f"`kernel_size` = 3, 8, 15: [png]({name})" in text
    assert sorted(p.name for p in (tmp_path / "report").glob("grid_*")) == [name]
    # the plotted values: sorted, mean and std of each row's folds, a linear axis (15 / 3 < 10)
    (grid,) = find_grids(groups_below(root))
    assert (grid.key, grid.values, grid.file) == ("kernel_size", [3, 8, 15], name)
    figures = captured_figures(monkeypatch)
    plot_grid(grid, Path(name))
    (ax,) = figures[name].axes
    (line,) = [line for line in ax.lines if line.get_marker() == "o"]
    assert list(line.get_xdata()) == [3, 8, 15]
    assert list(line.get_ydata()) == pytest.approx([85.0, 90.0, 75.0])
    assert ax.get_xscale() == "linear" and ax.get_xlabel() == "kernel_size"
    paper = paper_cell("conformer_pfeiffer", "ESC50")
    assert [text.get_text() for text in ax.get_legend().get_texts()] == [f"paper: {paper.label}"]


def test_a_grid_spanning_over_a_factor_ten_has_a_log_axis(tmp_path, monkeypatch):
    root = tmp_path / "results"
    grid_runs(root, ("kernel_size",), {(1,): {"1": 0.5}, (8,): {"1": 0.6}, (31,): {"1": 0.7}})
    (grid,) = find_grids(groups_below(root))
    figures = captured_figures(monkeypatch)
    plot_grid(grid, Path(grid.file))
    (ax,) = figures[grid.file].axes
    assert ax.get_xscale() == "log" and ax.get_legend() is None


def test_no_grid_figure_when_two_settings_differ(tmp_path):
    root = tmp_path / "results"
    accuracies = {(3, 32): {"1": 0.5}, (8, 64): {"1": 0.6}, (15, 96): {"1": 0.7}}
    grid_runs(root, ("kernel_size", "reduction_rate"), accuracies)
    text = write_report([root], tmp_path / "report").read_text()
    assert not list((tmp_path / "report").glob("grid_*")) and "Grid sweeps" not in text
    # nor for values that are not numbers
    other = tmp_path / "other"
    grid_runs(other, ("adapter_type",), {("Pfeiffer",): {"1": 0.5}, ("Houlsby",): {"1": 0.6}})
    assert find_grids(groups_below(other)) == []


def test_a_two_setting_grid_has_a_series_per_value_of_the_other(tmp_path):
    root = tmp_path / "results"
    accuracies = {(k, r): {"1": 0.1 * k + r / 1000} for k in (3, 8) for r in (32, 64)}
    grid_runs(root, ("kernel_size", "reduction_rate"), accuracies)
    grids = {grid.key: grid for grid in find_grids(groups_below(root))}
    assert sorted(grids) == ["kernel_size", "reduction_rate"]
    kernel = grids["kernel_size"]
    assert [label for label, _ in kernel.series] == ["reduction_rate=32", "reduction_rate=64"]
    assert [[row.settings["kernel_size"] for row in rows] for _, rows in kernel.series] == [[3, 8], [3, 8]]
    assert [label for label, _ in grids["reduction_rate"].series] == ["kernel_size=3", "kernel_size=8"]


# --- a real preset run ---------------------------------------------------------------------------------------


def test_report_of_a_real_preset_run(tmp_path):
    """The GSC recipe run with the paper's LoRA preset (tiny AST, 2 epochs) records its preset; the report sets
    its measured accuracy beside the paper's, the difference computed here from the recorded fraction."""
    workspace = {
        "GSC": make_gsc(tmp_path / "data", num_words=4, n_per_class=2),
        "ast": write_random_checkpoint("ast", tmp_path / "ast"),
    }
    output = tmp_path / "runs" / "GSC" / "lora"
    hparams = preset_file(REPO / "recipes", "GSC", "lora")
    args = recipe_args("GSC", "lora", workspace, output, "--number_of_epochs=2", hparams=hparams)
    subprocess.run(
        [sys.executable, str(REPO / "recipes/GSC/train.py"), *args], check=True, env=ENV, capture_output=True
    )
    results = json.loads((output / "results.json").read_text())
    assert results["settings"]["paper_preset"] == "lora"
    text = write_report([tmp_path / "runs"], tmp_path / "report").read_text()
    lora = paper_cell("lora", "GSC")
    measured = 100 * results["folds"]["official"]["test"]["accuracy"]
    row = table_rows(text, COMPARISON)[("Table 1", lora.label, "GSC")]
    assert row[5:7] == [f"{measured:.2f} ± 0.00", f"{lora.accuracy:.2f}"]
    # signed, two decimals, within rounding of the recorded fraction's difference (a test set of a few items)
    assert row[7][0] in "+-" and len(row[7].split(".")[1]) == 2
    assert float(row[7]) == pytest.approx(measured - lora.accuracy, abs=0.0051)
    assert row[8:] == [f"{results['parameters']['trainable']:,}", lora.params]
    assert f"Protocol: {protocol()}" in text
    assert table_rows(text, DETAILS)[("GSC", "ast", f"{results['method']} [paper: {lora.label}]")][3] == row[5]
