"""Tables and figures from recorded runs: the papers' comparison from every `results.json` below some folders.

    python -m petl_apps.report RESULTS_DIR [RESULTS_DIR ...] --out DIR

writes into DIR:

- `report.md`: a dataset x method table of test accuracy (mean +- std), a detailed table (trainable
  parameters and %, run and fold counts, IEMOCAP's unweighted accuracy), the few-shot table, the runs used,
  the files left out and why, and links to
- `accuracy_vs_params.png`: the papers' main figure, test accuracy against trainable parameters (log axis),
  one panel per dataset, one labelled point per row (method, backbone and settings), error bars = std;
- `few_shot.png`: accuracy against K training items per class, one panel per dataset (when few-shot runs exist);
- `curves/<dataset>_<method>_<backbone>_seed<s>[_fewshot<K>].png`: per run, losses and validation accuracy per
  epoch from each fold's `train_log.txt`;
- `confusion/<same name>.png`: per run, the test confusion matrix summed over its folds, with class names;
- `grid_<dataset>_<method>_<backbone>_<key>[_fewshot<K>].png`: a grid sweep (`--grid kernel_size=1,3,8`), when
  rows of one dataset, backbone, method and K differ in one setting only, with numbers for values: test accuracy
  (mean, std error bars) against the setting's values, sorted (log axis when positive and spanning over a
  factor 10); a line per combination of the other settings when several such series exist; linked from report.md.

Rows of the MLSP 2024 paper's presets (`paper_preset` in results.json's `settings`,
`recipes/<DS>/hparams/paper/<preset>.yaml`) are set beside the paper's numbers, read through `petl_apps.paper`:
their labels name the paper's row (`conformer_adapter [paper: conformer Pfeiffer]`); report.md opens with a
"Paper comparison" section (the paper's source and protocol, then per row with a number in the paper for its
preset, dataset, backbone and K: the paper's table and row, measured and paper accuracy, the difference in points,
measured and paper trainable parameters; the preset rows without one are named); `accuracy_vs_params.png` shows
the paper's point as a hollow marker of the row's colour (x: the paper's parameter count, when it prints a
single one such as `249K`), the measured one filled.

A row (`Group`) is one experiment: dataset, backbone, method (results.json's `method`, what was trained)
and every setting that defines a run (the results' `settings` less `NON_DEFINING_SETTINGS`, with the
top-level `backbone_source`, `few_shot_samples` and `number_of_epochs`). Runs are in one row only when all
of these are equal; the seed is the replicate axis, so runs that differ only in seed are one row, and a seed
is counted once (of several results.json with the same row and seed the most recently written is used, the
others are listed as duplicates). When a dataset, backbone and method have several rows, each row's label
names the settings in which those rows differ (`adapter (number_of_epochs=20, num_adapters=4)`).

A row's mean and population std pool the test metric of every fold of every seed (run); `runs` counts
seeds, `folds` the fold results pooled. Left out of every table and figure, one log line each saying why:
runs recorded with `--debug`, untrained runs (a fold whose `epoch` is null: zero epochs or never validated),
results without fold results or without a method, and duplicate seeds. Runs with missing folds are used with
what they have and marked with a dagger. Everything is read from the files; nothing is recomputed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from petl_apps.paper import TABLES, PaperCell, paper_cell, protocol, source, table_cells
from petl_modules.atomic import atomic_path, write_text_atomic
from petl_modules.methods import METHOD_FILES

__all__ = [
    "METHOD_ORDER",
    "NON_DEFINING_SETTINGS",
    "Grid",
    "Group",
    "LeftOut",
    "Point",
    "ReportError",
    "Run",
    "accuracy_vs_params_points",
    "drop_duplicates",
    "find_grids",
    "find_runs",
    "group_runs",
    "main",
    "paper_params",
    "parse_train_log",
    "summed_confusion",
    "write_report",
]

logger = logging.getLogger(__name__)

RESULTS = "results.json"
TRAIN_LOG = "train_log.txt"
REPORT = "report.md"
MAIN_FIGURE = "accuracy_vs_params.png"
FEW_SHOT_FIGURE = "few_shot.png"
# Table order: the papers' (others follow alphabetically).
METHOD_ORDER = METHOD_FILES
_REQUIRED = ("dataset", "method", "folds", "parameters")
# Settings that do NOT define a run; every other key of results.json's `settings` does (two runs differing in
# one of them are two rows). These differ between runs of one experiment without changing what is trained or
# measured:
# - folders and paths of the run or the machine: where outputs, checkpoints, logs, data and caches live;
# - performance and logging knobs, which give the same numbers: loader workers, timing logs, TensorBoard and
#   Weights & Biases, the feature and embedding caches;
# - `fold`: every fold is part of one run; `seed`: the replicate axis (runs differing only in seed are one
#   row); `method_name`: a free-text label (the method is results.json's `method`, what was trained).
# `backbone_source` is NOT here: another checkpoint is another model.
NON_DEFINING_SETTINGS = frozenset(
    {
        "output_folder",
        "save_folder",
        "train_log",
        "data_folder",
        "feature_cache_folder",
        "num_workers",
        "log_timing",
        "use_tensorboard",
        "use_wandb",
        "wandb_project",
        "cache_features",
        "cache_embeddings",
        "fold",
        "seed",
        "method_name",
    }
)
# Top-level results.json fields that define a run (the recipe copies them from the settings).
_TOP_LEVEL_SETTINGS = ("backbone_source", "few_shot_samples", "number_of_epochs")
# The setting naming a run's paper preset (recipes/<DS>/hparams/paper/<preset>.yaml records it).
PAPER_PRESET = "paper_preset"
# A setting one row has and another of the same dataset, backbone and method lacks (shown as `unset`).
_UNSET = object()


class ReportError(ValueError):
    """The report cannot be made (no results, no matplotlib...); the message says why and what to do."""


@dataclass(frozen=True)
class LeftOut:
    """A results.json kept out of every table and figure: `kind` (debug, untrained, duplicate...) and why."""

    path: Path
    kind: str
    reason: str


@dataclass(frozen=True)
class Run:
    """One recipe output folder, read from its `results.json`."""

    path: Path
    results: dict[str, Any]

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def key(self) -> tuple[str, str, str, int | None]:
        """(dataset, backbone, method, few-shot K): what the run's figure names say."""
        r = self.results
        return (str(r["dataset"]), str(r.get("backbone") or "ast"), str(r["method"]), r.get("few_shot_samples"))

    @property
    def settings(self) -> dict[str, Any]:
        """The settings that define the run: `settings` less NON_DEFINING_SETTINGS, plus the top-level ones.

        Never `method_name` (the method is `results["method"]`) nor the seed (the replicate axis).
        """
        recorded = self.results.get("settings")
        settings = dict(recorded) if isinstance(recorded, dict) else {}
        settings.update((key, self.results[key]) for key in _TOP_LEVEL_SETTINGS if key in self.results)
        settings["backbone"] = self.key[1]
        return {key: value for key, value in settings.items() if key not in NON_DEFINING_SETTINGS}

    @property
    def row_key(self) -> tuple:
        """The row this run belongs to: equal exactly when dataset, backbone, method and settings are equal."""
        return (*self.key, json.dumps(self.settings, sort_keys=True, default=str))

    @property
    def seed(self) -> Any:
        return self.results.get("seed")

    @property
    def name(self) -> str:
        """`<dataset>_<method>_<backbone>_seed<s>[_fewshot<K>]`, the file name of its figures."""
        dataset, backbone, method, shots = self.key
        name = f"{dataset}_{method}_{backbone}_seed{self.seed}"
        return name + (f"_fewshot{shots}" if shots is not None else "")

    @property
    def folds(self) -> dict[str, dict[str, Any]]:
        return self.results.get("folds") or {}

    @property
    def partial(self) -> bool:
        return bool(self.results.get("folds_missing"))

    def values(self, split: str, metric: str) -> list[float]:
        """The metric of every recorded fold that has it."""
        return [
            float(fold[split][metric])
            for fold in self.folds.values()
            if isinstance(fold.get(split), dict) and fold[split].get(metric) is not None
        ]

    def fold_folder(self, fold_key: str) -> Path:
        """Where a fold trained: the output folder itself for the official split, else `fold<k>/`."""
        return self.folder if fold_key == "official" else self.folder / f"fold{fold_key}"


def _format_value(value: Any) -> str:
    """A setting as a command line would give it: strings bare, the rest as JSON (`true`, `null`, `0.005`)."""
    if value is _UNSET:
        return "unset"
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _value_rank(value: Any) -> tuple[int, float | str]:
    """Order of setting values within a method's rows: numbers by value, then text, then unset."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value))
    return (2, "") if value is _UNSET else (1, _format_value(value))


@cache
def _paper_label(preset: str, backbone: str, few_shot: bool) -> str | None:
    """The paper's row label for `preset` on `backbone`: of a few-shot table (Table 2) for few-shot rows, else of
    a full-data one, else any; None when no table of that backbone has the preset.
    """
    cells = [cell for table in TABLES for cell in table_cells(table) if cell.preset == preset]
    cells = [cell for cell in cells if cell.backbone == backbone]
    fitting = [cell for cell in cells if (cell.few_shot is not None) == few_shot] or cells
    return fitting[0].label if fitting else None


@dataclass
class Group:
    """One row: the runs of one dataset, backbone, method, few-shot K and settings, pooled over seeds and folds.

    `settings` are the row's defining settings (equal for all its runs); `shown` names those that differ from
    other rows of the same dataset, backbone and method (empty when it is the only one), which its label says.
    Every run has its own seed.
    """

    dataset: str
    backbone: str
    method: str
    few_shot: int | None
    settings: dict[str, Any] = field(default_factory=dict)
    shown: tuple[str, ...] = ()
    runs: list[Run] = field(default_factory=list)

    @property
    def paper_preset(self) -> str | None:
        """The paper preset the row's runs were made with (`paper_preset` of their settings), or None."""
        preset = self.settings.get(PAPER_PRESET)
        return preset if isinstance(preset, str) and preset else None

    @property
    def paper(self) -> PaperCell | None:
        """The paper's number for this row: its preset on its dataset and backbone at its K; None without one."""
        if self.paper_preset is None:
            return None
        cell = paper_cell(self.paper_preset, self.dataset, self.few_shot)
        return cell if cell is not None and cell.backbone == self.backbone else None

    @property
    def paper_label(self) -> str | None:
        """The paper's name for the row's preset on its backbone (Table 2's for few-shot rows), or None."""
        return _paper_label(self.paper_preset, self.backbone, self.few_shot is not None) if self.paper_preset else None

    @property
    def title(self) -> str:
        """The method, with the paper's row for a preset row: `conformer_adapter [paper: conformer Pfeiffer]`."""
        return f"{self.method} [paper: {self.paper_label}]" if self.paper_label else self.method

    @property
    def setting_text(self) -> str:
        """`number_of_epochs=20, num_adapters=4`: the settings in which this row differs from its siblings
        (not the preset when the title names the paper's row).
        """
        shown = [key for key in self.shown if key != PAPER_PRESET or not self.paper_label]
        return ", ".join(f"{key}={_format_value(self.settings.get(key, _UNSET))}" for key in shown)

    @property
    def label(self) -> str:
        """The row's name in tables: its title, with the settings that tell it from its siblings."""
        return f"{self.title} ({self.setting_text})" if self.setting_text else self.title

    @property
    def order(self) -> tuple:
        """Rank among the rows of one dataset, backbone and K: papers' method order, then setting values."""
        return (_method_rank(self.method), tuple(_value_rank(self.settings.get(key, _UNSET)) for key in self.shown))

    def stats(self, metric: str, split: str = "test") -> tuple[float, float, int] | None:
        """(mean, population std, count) of the metric over every fold of every run; None when absent."""
        values = [value for run in self.runs for value in run.values(split, metric)]
        if not values:
            return None
        return statistics.fmean(values), statistics.pstdev(values), len(values)

    def _parameter(self, name: str) -> list:
        """The distinct recorded values of a `parameters` entry over the row's runs, in run order."""
        values = [run.results["parameters"].get(name) for run in self.runs if run.results["parameters"]]
        return list(dict.fromkeys(value for value in values if value is not None))

    @property
    def trainable(self) -> int | None:
        counts = self._parameter("trainable")
        return counts[0] if counts else None

    @property
    def trainable_counts(self) -> list[int]:
        """Every distinct trainable count of the row's runs (one, unless the code changed between runs)."""
        return self._parameter("trainable")

    @property
    def trainable_percent(self) -> float | None:
        counts = self._parameter("trainable_percent")
        return counts[0] if counts else None

    @property
    def partial(self) -> bool:
        return any(run.partial for run in self.runs)


def _left_out(path: Path, kind: str, reason: str) -> LeftOut:
    """Record and log (one line) a results.json that no table or figure uses."""
    logger.warning("report: left out %s: %s", path, reason)
    return LeftOut(path, kind, reason)


def _why_untrained(results: dict[str, Any]) -> str | None:
    """Why a run's model is not a trained one (no folds, a fold never validated), or None when it is."""
    folds = results["folds"]
    if not isinstance(folds, dict) or not folds:
        return "no fold results; finish a fold of its recipe"
    unvalidated = [key for key, fold in folds.items() if not isinstance(fold, dict) or fold.get("epoch") is None]
    if unvalidated:
        return (
            f"untrained: fold {', '.join(unvalidated)} has no selected epoch (zero epochs or never validated); "
            "rerun its recipe with --number_of_epochs of at least 1"
        )
    return None


def find_runs(roots: Iterable[str | Path]) -> tuple[list[Run], list[LeftOut]]:
    """Every usable `results.json` below `roots` (each file once), and those left out with the reason.

    Left out, each with one log line: debug runs, untrained runs (a fold whose `epoch` is null), results
    without folds or without a method. A missing root or a file that is not a recipe's results stops with a
    one-line ReportError. Duplicate seeds are kept here; `drop_duplicates` removes them.
    """
    runs, left_out, seen = [], [], set()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise ReportError(f"results folder {root} not found; give folders holding recipe output folders")
        for path in sorted(root.rglob(RESULTS)):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            try:
                results = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise ReportError(f"{path}: not readable as JSON ({error}); delete it or rerun its recipe") from error
            missing = [key for key in _REQUIRED if not isinstance(results, dict) or key not in results]
            if missing:
                raise ReportError(f"{path}: not a recipe's results.json (no {', '.join(missing)}); move it away")
            untrained = _why_untrained(results)
            if results.get("debug"):
                left_out.append(_left_out(path, "debug", "recorded with --debug; rerun without --debug"))
            elif untrained:
                left_out.append(_left_out(path, "untrained", untrained))
            elif not results["method"]:
                left_out.append(_left_out(path, "no method", "no method recorded; rerun its recipe"))
            else:
                runs.append(Run(path, results))
    return runs, left_out


def _written(run: Run) -> tuple[int, str]:
    """When a run's results.json was written (then its path), for choosing among duplicates."""
    try:
        return run.path.stat().st_mtime_ns, str(run.path)
    except OSError:
        return 0, str(run.path)


def drop_duplicates(runs: Iterable[Run]) -> tuple[list[Run], list[LeftOut]]:
    """Each seed of each row once: of runs with the same row (`Run.row_key`) and seed, the most recently
    written results.json (ties: the last path) is kept; the others are returned as left out, one log line each.

    The kept runs stay in their given order.
    """
    runs = list(runs)
    newest: dict[tuple, Run] = {}
    for run in runs:
        replicate = (run.row_key, json.dumps(run.seed, default=str))
        if replicate not in newest or _written(run) > _written(newest[replicate]):
            newest[replicate] = run
    kept_paths = {run.path for run in newest.values()}
    left_out = []
    for run in runs:
        if run.path not in kept_paths:
            kept = newest[(run.row_key, json.dumps(run.seed, default=str))]
            reason = f"duplicate: same settings and seed {run.seed} as {kept.path}, which is newer; a seed counts once"
            left_out.append(_left_out(run.path, "duplicate", reason))
    return [run for run in runs if run.path in kept_paths], left_out


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _comparable(settings: dict[str, Any], key: str) -> tuple[bool, str]:
    """A setting as `Run.row_key` compares it: present or not, and its JSON text."""
    return key in settings, json.dumps(settings.get(key), sort_keys=True, default=str)


def _mark_differences(groups: Iterable[Group]) -> None:
    """Set each row's `shown`: the settings that differ between the rows of its dataset, backbone and method.

    Full-data rows and few-shot rows are compared apart (they are separate tables); K itself is a column of
    the few-shot table, so `few_shot_samples` is never shown.
    """
    siblings: dict[tuple, list[Group]] = defaultdict(list)
    for group in groups:
        siblings[(group.dataset, group.backbone, group.method, group.few_shot is None)].append(group)
    for rows in siblings.values():
        names = sorted({key for row in rows for key in row.settings} - {"few_shot_samples"})
        shown = tuple(key for key in names if len({_comparable(row.settings, key) for row in rows}) > 1)
        for row in rows:
            row.shown = shown


def group_runs(runs: Iterable[Run]) -> list[Group]:
    """One row per (dataset, backbone, method, K, defining settings), each seed once (`drop_duplicates`).

    Ordered by dataset, backbone, K, papers' method order, then the values of the settings the rows show.
    """
    groups: dict[tuple, Group] = {}
    for run in drop_duplicates(runs)[0]:
        if run.row_key not in groups:
            groups[run.row_key] = Group(*run.key, settings=run.settings)
        groups[run.row_key].runs.append(run)
    _mark_differences(groups.values())
    return sorted(
        groups.values(),
        key=lambda g: (g.dataset, g.backbone, g.few_shot is not None, g.few_shot or 0, g.order),
    )


def parse_train_log(path: str | Path) -> tuple[dict[int, dict[str, float]], int | None]:
    """Per-epoch values of a SpeechBrain `train_log.txt`, and the epoch the test stage chose.

    Lines are `epoch: 1, lr: 5e-03 - train loss: 1.38 - valid loss: 1.37, valid accuracy: 2.50e-01` (groups
    joined by " - ", "name: value" pairs by ", ") and a last `epoch chosen: N - test ...`. An epoch logged again
    (after a resume) keeps its last line; values that are not numbers are skipped.
    """
    epochs: dict[int, dict[str, float]] = {}
    chosen = None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        values: dict[str, float] = {}
        for segment in line.split(" - "):
            for pair in segment.split(", "):
                name, sep, text = pair.partition(": ")
                if not sep:
                    continue
                try:
                    values[name.strip()] = float(text)
                except ValueError:
                    continue
        if "epoch chosen" in values:
            chosen = int(values["epoch chosen"])
        elif "epoch" in values:
            epochs[int(values.pop("epoch"))] = values
    return dict(sorted(epochs.items())), chosen


# ----------------------------------------------------------------------------------------------- figures


def _pyplot():
    """Matplotlib's pyplot on the Agg backend (files only, no display)."""
    try:
        import matplotlib
    except ImportError as error:
        raise ReportError("the report's figures need matplotlib: pip install matplotlib (or -e .[report])") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ticker():
    """matplotlib.ticker, once `_pyplot` has checked matplotlib is there."""
    _pyplot()
    import matplotlib.ticker

    return matplotlib.ticker


def _save(fig, path: Path) -> None:
    """Write a figure atomically as PNG and release it."""
    plt = _pyplot()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def _panels(count: int, width: float = 4.8, height: float = 3.8):
    plt = _pyplot()
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def _label(group: Group, backbones: set[str]) -> str:
    """The row's name: its method, with its backbone when the figure shows several, and its shown settings."""
    if len(backbones) == 1:
        return group.label
    return f"{group.title} ({'; '.join(filter(None, (group.backbone, group.setting_text)))})"


def _compact(count: float) -> str:
    """A parameter count for an axis: 500, 2k, 1.5M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:g}{suffix}"
    return f"{count:g}"


_PARAMS = re.compile(r"(\d+(?:\.\d+)?)\s*([KMG]?)", re.IGNORECASE)
_SCALES = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


def paper_params(text: str | None) -> float | None:
    """A parameter count as the paper prints it, as a number: `249K` -> 249e3, `85M` -> 85e6; None for None
    or anything that is not one count (`9K/40K`).
    """
    match = _PARAMS.fullmatch(text.strip()) if isinstance(text, str) else None
    return float(match[1]) * _SCALES[match[2].lower()] if match else None


@dataclass(frozen=True)
class Point:
    """A marker of `accuracy_vs_params.png`: a row's measured test accuracy (filled, error bar = std) or, for a
    paper-preset row, the paper's (hollow, `paper` True, no std), in the row's colour. Accuracies in %.
    """

    dataset: str
    label: str
    params: float
    accuracy: float
    std: float | None
    color: str
    marker: str
    paper: bool = False


def accuracy_vs_params_points(groups: Sequence[Group]) -> list[Point]:
    """Every marker of `accuracy_vs_params.png`, panel (dataset) by panel, in row order.

    A row without test accuracy or trainable count has none. Colours `C0`, `C1`... go to the rows in order,
    except that the rows compared with one number of the paper (a preset's rows, several in a grid) share one;
    that number has one hollow marker in that colour at the paper's values, when the paper prints a single
    parameter count for it (`paper_params`).
    """
    backbones = {g.backbone for g in groups}
    markers = {backbone: marker for backbone, marker in zip(sorted(backbones), "osD^v")}
    points = []
    for dataset in sorted({g.dataset for g in groups}):
        colors: dict[Any, str] = {}
        for group in (g for g in groups if g.dataset == dataset and g.stats("accuracy") and g.trainable):
            mean, std, _ = group.stats("accuracy")
            cell, marker = group.paper, markers[group.backbone]
            shared = cell in colors
            color = colors.setdefault(cell if cell is not None else id(group), f"C{len(colors) % 10}")
            label = _label(group, backbones)
            points.append(Point(dataset, label, float(group.trainable), 100 * mean, 100 * std, color, marker))
            params = paper_params(cell.params) if cell and not shared else None
            if params is not None:
                paper = f"paper: {cell.label} ({cell.params})"
                points.append(Point(dataset, paper, params, cell.accuracy, None, color, marker, paper=True))
    return points


def plot_accuracy_vs_params(groups: Sequence[Group], path: Path) -> None:
    """Test accuracy (%) against trainable parameters, log x axis, a panel per dataset, a point per row
    (`accuracy_vs_params_points`): measured filled and annotated, the paper's hollow and in the legend.
    """
    points = accuracy_vs_params_points(groups)
    datasets = sorted({g.dataset for g in groups})
    fig, axes = _panels(len(datasets))
    for ax, dataset in zip(axes, datasets):
        for point in (p for p in points if p.dataset == dataset):
            if point.paper:
                ax.plot(
                    point.params,
                    point.accuracy,
                    linestyle="none",
                    marker=point.marker,
                    markersize=8,
                    markerfacecolor="none",
                    markeredgecolor=point.color,
                    label=point.label,
                )
                continue
            ax.errorbar(point.params, point.accuracy, yerr=point.std, marker=point.marker, color=point.color, capsize=3)
            ax.annotate(point.label, (point.params, point.accuracy), textcoords="offset points", xytext=(4, 4))
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(_ticker().LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(_ticker().FuncFormatter(lambda x, _: _compact(x)))
        ax.xaxis.set_minor_formatter(_ticker().NullFormatter())
        ax.set_title(dataset)
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
        if any(p.paper and p.dataset == dataset for p in points):
            ax.legend(fontsize="x-small", title="hollow: the paper's", title_fontsize="x-small")
    fig.suptitle("Accuracy against trainable parameters")
    _save(fig, path)


def plot_few_shot(groups: Sequence[Group], path: Path) -> None:
    """Test accuracy (%) against K training items per class, a panel per dataset, a line per row label."""
    datasets = sorted({g.dataset for g in groups})
    backbones = {g.backbone for g in groups}
    fig, axes = _panels(len(datasets))
    for ax, dataset in zip(axes, datasets):
        lines: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
        ranks: dict[str, tuple] = {}
        for group in (g for g in groups if g.dataset == dataset):
            stats = group.stats("accuracy")
            if stats is not None:
                label = _label(group, backbones)
                lines[label].append((group.few_shot, 100 * stats[0], 100 * stats[1]))
                ranks.setdefault(label, (group.backbone, group.order))
        for label, points in sorted(lines.items(), key=lambda item: ranks[item[0]]):
            shots, means, stds = zip(*sorted(points))
            ax.errorbar(shots, means, yerr=stds, marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        shots = sorted({g.few_shot for g in groups if g.dataset == dataset})
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.xaxis.set_minor_formatter(_ticker().NullFormatter())
        ax.set_title(dataset)
        ax.set_xlabel("training items per class (K)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Few-shot accuracy")
    _save(fig, path)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _file_part(text: str) -> str:
    """A name part safe in a file name (letters, digits, `.`, `_`, `-`; anything else becomes `_`)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


@dataclass(frozen=True)
class Grid:
    """A grid sweep: rows of one dataset, backbone, method and K that differ only in the setting `key`, whose
    values are numbers. `series` are (label, rows sorted by the key's value): one per combination of the other
    settings (label empty when there is one; else the settings in which the series differ).
    """

    dataset: str
    backbone: str
    method: str
    few_shot: int | None
    key: str
    series: tuple[tuple[str, tuple[Group, ...]], ...]

    @property
    def file(self) -> str:
        """`grid_<dataset>_<method>_<backbone>_<key>[_fewshot<K>].png`."""
        name = "_".join(_file_part(part) for part in ("grid", self.dataset, self.method, self.backbone, self.key))
        return name + (f"_fewshot{self.few_shot}" if self.few_shot is not None else "") + ".png"

    @property
    def values(self) -> list[float | int]:
        """The key's values over every series, sorted."""
        return sorted({row.settings[self.key] for _, rows in self.series for row in rows})


def find_grids(groups: Sequence[Group]) -> list[Grid]:
    """Every grid sweep among the rows: for each dataset, backbone, method and K, and each setting, the rows
    that are equal in every other setting, when at least two of them share it and all have a number for it.

    Rows differing in two settings at once are no grid of either; of a two-setting grid (each value of one with
    each of the other), each setting has a grid with a series per value of the other.
    """
    siblings: dict[tuple, list[Group]] = defaultdict(list)
    for group in groups:
        siblings[(group.dataset, group.backbone, group.method, group.few_shot)].append(group)
    grids = []
    for (dataset, backbone, method, few_shot), rows in siblings.items():
        if len(rows) < 2:
            continue
        for key in sorted({name for row in rows for name in row.settings} - {"few_shot_samples"}):
            others: dict[str, list[Group]] = defaultdict(list)
            for row in rows:
                rest = {name: value for name, value in row.settings.items() if name != key}
                others[json.dumps(rest, sort_keys=True, default=str)].append(row)
            series = [
                sorted(members, key=lambda row: row.settings[key])
                for members in others.values()
                if len(members) > 1 and all(_is_number(row.settings.get(key)) for row in members)
            ]
            if not series:
                continue
            heads = [members[0].settings for members in series]  # a series' rows differ in `key` only
            names = sorted({name for head in heads for name in head} - {key})
            differing = [name for name in names if len({_comparable(head, name) for head in heads}) > 1]
            series.sort(key=lambda members: [_value_rank(members[0].settings.get(n, _UNSET)) for n in differing])
            labelled = tuple(
                (", ".join(f"{n}={_format_value(head.get(n, _UNSET))}" for n in differing), tuple(members))
                for members in series
                for head in [members[0].settings]
            )
            grids.append(Grid(dataset, backbone, method, few_shot, key, labelled))
    return sorted(grids, key=lambda g: (g.dataset, g.backbone, g.few_shot or 0, _method_rank(g.method), g.key))


def plot_grid(grid: Grid, path: Path) -> None:
    """Test accuracy (%, mean with std error bars) against the grid's setting, a line per series; log x axis when
    the values are positive and span more than a factor 10; the paper's number dashed when all rows share one.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for label, rows in grid.series:
        points = [(row.settings[grid.key], row.stats("accuracy")) for row in rows]
        points = [(value, 100 * stats[0], 100 * stats[1]) for value, stats in points if stats is not None]
        if points:
            values, means, stds = zip(*points)
            ax.errorbar(values, means, yerr=stds, marker="o", capsize=3, label=label or None)
    values = grid.values
    if values[0] > 0 and values[-1] > 10 * values[0]:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(_ticker().NullFormatter())
    ax.set_xticks(values, [_format_value(value) for value in values])
    cells = {row.paper for _, rows in grid.series for row in rows}
    if len(cells) == 1 and None not in cells:
        cell = cells.pop()
        ax.axhline(cell.accuracy, color="gray", linestyle="--", label=f"paper: {cell.label}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    shots = f", K={grid.few_shot}" if grid.few_shot is not None else ""
    ax.set_title(f"{grid.dataset}: {grid.method} ({grid.backbone}{shots})")
    ax.set_xlabel(grid.key)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
    _save(fig, path)


def plot_curves(run: Run, path: Path) -> bool:
    """Train/valid loss and valid accuracy per epoch, a line per fold; False when no fold has a train log."""
    logs = {}
    for key in run.folds:
        log = run.fold_folder(key) / TRAIN_LOG
        if log.is_file():
            logs[key] = parse_train_log(log)
    if not any(epochs for epochs, _ in logs.values()):
        return False
    fig, (loss_ax, accuracy_ax) = _panels(2)
    for index, (key, (epochs, chosen)) in enumerate(logs.items()):
        color = f"C{index % 10}"
        xs = list(epochs)
        label = "" if key == "official" else f"fold {key} "
        for name, style in (("train loss", "--"), ("valid loss", "-")):
            points = [(x, epochs[x][name]) for x in xs if name in epochs[x]]
            if points:
                loss_ax.plot(*zip(*points), style, color=color, marker=".", label=f"{label}{name}")
        points = [(x, 100 * epochs[x]["valid accuracy"]) for x in xs if "valid accuracy" in epochs[x]]
        if points:
            accuracy_ax.plot(*zip(*points), "-", color=color, marker=".", label=f"{label}valid".strip())
        if chosen is not None:
            accuracy_ax.axvline(chosen, color=color, alpha=0.3, linestyle=":")
    for ax in (loss_ax, accuracy_ax):
        ax.xaxis.set_major_locator(_ticker().MaxNLocator(integer=True))
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.legend(fontsize="x-small")
    accuracy_ax.set_xlabel("epoch (dotted: chosen for test)")
    accuracy_ax.set_ylabel("valid accuracy (%)")
    accuracy_ax.legend(fontsize="x-small")
    fig.suptitle(run.name)
    _save(fig, path)
    return True


def summed_confusion(run: Run) -> tuple[list[str], list[list[int]], int] | None:
    """(classes, test confusion summed over folds, folds summed); None without folds sharing one class list."""
    matrices = [
        (fold.get("classes"), fold["test"]["confusion_matrix"])
        for fold in run.folds.values()
        if isinstance(fold.get("test"), dict) and fold["test"].get("confusion_matrix")
    ]
    if not matrices or any(classes != matrices[0][0] for classes, _ in matrices):
        return None
    classes = matrices[0][0] or [str(index) for index in range(len(matrices[0][1]))]
    size = len(classes)
    total = [[sum(int(matrix[i][j]) for _, matrix in matrices) for j in range(size)] for i in range(size)]
    return classes, total, len(matrices)


def plot_confusion(run: Run, path: Path) -> bool:
    """The test confusion matrix (rows true, columns predicted, colour = row share); False when there is none."""
    confusion = summed_confusion(run)
    if confusion is None:
        return False
    classes, matrix, folds = confusion
    plt = _pyplot()
    size = max(4.0, 0.32 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    shares = [[count / max(1, sum(row)) for count in row] for row in matrix]
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize="small")
    ax.set_yticks(range(len(classes)), classes, fontsize="small")
    if len(classes) <= 30:
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                color = "white" if shares[i][j] > 0.5 else "black"
                ax.text(j, i, str(count), ha="center", va="center", fontsize="x-small", color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{run.name}\ntest, {'summed over ' + str(folds) + ' folds' if folds > 1 else 'one split'}")
    _save(fig, path)
    return True


# ----------------------------------------------------------------------------------------------- markdown


def _cell(stats: tuple[float, float, int] | None, partial: bool = False) -> str:
    if stats is None:
        return "-"
    return f"{100 * stats[0]:.2f} ± {100 * stats[1]:.2f}" + (" †" if partial else "")


def _md(text: str) -> str:
    """Text for a markdown table cell (a `|` in a setting would end the cell)."""
    return text.replace("|", "\\|")


def _main_tables(groups: Sequence[Group]) -> list[str]:
    """Per backbone, a row label x dataset table of test accuracy (full training data only).

    A label is the method, with the settings that tell its rows apart on a dataset where it has several.
    """
    lines = []
    for backbone in sorted({g.backbone for g in groups}):
        chosen = [g for g in groups if g.backbone == backbone]
        datasets = sorted({g.dataset for g in chosen})
        ranks: dict[str, tuple] = {}
        for g in chosen:
            ranks[g.label] = min(ranks.get(g.label, g.order), g.order)
        cells = {(g.label, g.dataset): _cell(g.stats("accuracy"), g.partial) for g in chosen}
        lines += [f"### {backbone}", "", "| method | " + " | ".join(datasets) + " |"]
        lines.append("|---" * (len(datasets) + 1) + "|")
        for label in sorted(ranks, key=lambda label: (ranks[label], label)):
            lines.append(f"| {_md(label)} | " + " | ".join(cells.get((label, d), "-") for d in datasets) + " |")
        lines.append("")
    return lines


def _detail_table(groups: Sequence[Group]) -> list[str]:
    unweighted = any(g.stats("unweighted_accuracy") for g in groups)
    few_shot = any(g.few_shot is not None for g in groups)
    header = ["dataset", "backbone", "method"] + ["K"] * few_shot + ["test accuracy (%)"]
    header += ["unweighted accuracy (%)"] * unweighted
    header += ["valid accuracy (%)", "trainable params", "trainable %", "runs", "folds"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for g in groups:
        row = [g.dataset, g.backbone, _md(g.label)] + [str(g.few_shot)] * few_shot
        row += [_cell(g.stats("accuracy"), g.partial)]
        row += [_cell(g.stats("unweighted_accuracy"))] * unweighted
        test = g.stats("accuracy")
        row += [
            _cell(g.stats("accuracy", "valid")),
            " / ".join(f"{count:,}" for count in g.trainable_counts) or "-",
            f"{g.trainable_percent:.3f}" if g.trainable_percent is not None else "-",
            str(len(g.runs)),
            str(test[2] if test else 0),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def _few_shot_table(groups: Sequence[Group]) -> list[str]:
    shots = sorted({g.few_shot for g in groups})
    cells = {(g.dataset, g.backbone, _md(g.label), g.few_shot): _cell(g.stats("accuracy"), g.partial) for g in groups}
    ranks: dict[tuple[str, str, str], tuple] = {}
    for g in groups:
        row = (g.dataset, g.backbone, _md(g.label))
        ranks[row] = min(ranks.get(row, g.order), g.order)
    rows = sorted(ranks, key=lambda r: (r[0], r[1], ranks[r], r[2]))
    lines = ["| dataset | backbone | method | " + " | ".join(f"K={k}" for k in shots) + " |"]
    lines.append("|---" * (len(shots) + 3) + "|")
    for row in rows:
        lines.append("| " + " | ".join(row) + " | " + " | ".join(cells.get((*row, k), "-") for k in shots) + " |")
    return lines + [""]


def _paper_section(groups: Sequence[Group]) -> list[str]:
    """The paper's source and protocol, and a row per preset row with a number in the paper (none without
    preset rows): measured beside the paper's accuracy, the difference in points, and the parameters.
    """
    presets = [g for g in groups if g.paper_preset]
    if not presets:
        return []
    compared = [g for g in presets if g.paper]
    order = {cell: index for table in TABLES for index, cell in enumerate(table_cells(table))}
    compared.sort(key=lambda g: (g.paper.table, order[g.paper], g.order))  # the paper's order
    lines = [
        "## Paper comparison",
        "",
        f"Rows run with a paper preset (`{PAPER_PRESET}` in their settings) beside the paper's number for the preset,",
        f"dataset, backbone and K: {source()}.",
        "Difference = measured mean - paper, in points. Rows of one preset that differ in another setting (a grid)",
        "are each compared, their method naming the setting.",
        "",
        f"Protocol: {protocol()}",
        "",
    ]
    if compared:
        header = ["table", "paper row", "dataset", "K", "method", "test accuracy (%)", "paper (%)"]
        header += ["difference (points)", "trainable params", "paper params"]
        lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for g in compared:
            cell, test = g.paper, g.stats("accuracy")
            method = f"{g.method} ({g.setting_text})" if g.setting_text else g.method
            row = [f"Table {cell.table.removeprefix('table')}", _md(cell.label), g.dataset]
            row += ["-" if g.few_shot is None else str(g.few_shot), _md(method), _cell(test, g.partial)]
            row += [f"{cell.accuracy:.2f}", f"{100 * test[0] - cell.accuracy:+.2f}" if test else "-"]
            row += [" / ".join(f"{count:,}" for count in g.trainable_counts) or "-", _md(cell.params or "-")]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    missing = [g for g in presets if not g.paper]
    if missing:
        named = "; ".join(
            f"{g.label} on {g.dataset} ({g.backbone}{'' if g.few_shot is None else f', K={g.few_shot}'})"
            for g in missing
        )
        lines += [f"Without a number in the paper (its preset, dataset, backbone or K not there): {_md(named)}.", ""]
    return lines


def _grid_section(grids: Sequence[Grid]) -> list[str]:
    lines = [
        "## Grid sweeps",
        "",
        "Test accuracy against one setting, where rows of a dataset, backbone, method and K differ in it only:",
        "",
    ]
    for grid in grids:
        shots = "" if grid.few_shot is None else f", K={grid.few_shot}"
        values = ", ".join(_format_value(value) for value in grid.values)
        row = f"{grid.dataset}, {_md(grid.method)} ({grid.backbone}{shots})"
        lines.append(f"- {row}, `{grid.key}` = {values}: [png]({grid.file})")
    return lines + [""]


def _unique_names(runs: Sequence[Run]) -> dict[Path, str]:
    """Each run's figure name, suffixed `_2`, `_3`... when two runs would share one."""
    names, used = {}, defaultdict(int)
    for run in runs:
        used[run.name] += 1
        names[run.path] = run.name if used[run.name] == 1 else f"{run.name}_{used[run.name]}"
    return names


def _left_out_summary(left_out: Sequence[LeftOut]) -> str:
    """`1 debug, 2 untrained, 1 duplicate`: how many files each reason kept out."""
    counts: dict[str, int] = defaultdict(int)
    for item in left_out:
        counts[item.kind] += 1
    return ", ".join(f"{count} {kind}" for kind, count in counts.items())


def write_report(roots: Sequence[str | Path], out: str | Path) -> Path:
    """Find the runs below `roots`, write report.md and the figures into `out`; returns report.md's path.

    Only runs that `find_runs` accepts and `drop_duplicates` keeps reach a table or figure; the
    others are listed under "Left out" with the reason (and logged, one line each).
    """
    found, left_out = find_runs(roots)
    runs, duplicates = drop_duplicates(found)
    left_out += duplicates
    if not runs:
        where = ", ".join(str(root) for root in roots)
        raise ReportError(
            f"no finished recipe results.json below {where} (debug, untrained and duplicate runs are left out); "
            "run a recipe"
        )
    out = Path(out)
    groups = group_runs(runs)
    full = [g for g in groups if g.few_shot is None]
    few = [g for g in groups if g.few_shot is not None]
    lines = [
        "# Results",
        "",
        f"{len(runs)} run(s) (results.json) found below {', '.join(f'`{root}`' for root in roots)}"
        + (f"; left out: {_left_out_summary(left_out)} (see *Left out*)." if left_out else "."),
        "A row is one dataset, backbone, method and settings: runs differ only in seed, and each seed counts once.",
        "Where a method has several rows for a dataset, its label names the settings in which they differ.",
        "Accuracies in %, mean ± population std over every fold of every seed; `runs` counts seeds (results.json),",
        "`folds` the fold results pooled. † = some folds of a run are missing (partial).",
        "",
        *_paper_section(groups),
    ]
    if full:
        plot_accuracy_vs_params(full, out / MAIN_FIGURE)
        lines += ["## Test accuracy", "", *_main_tables(full), "## Details", "", *_detail_table(full)]
        lines += ["## Accuracy against trainable parameters", "", f"![accuracy against parameters]({MAIN_FIGURE})", ""]
    if few:
        plot_few_shot(few, out / FEW_SHOT_FIGURE)
        lines += ["## Few-shot (test accuracy, K training items per class)", "", *_few_shot_table(few)]
        lines += [f"![few-shot accuracy]({FEW_SHOT_FIGURE})", "", "### Details", "", *_detail_table(few)]
    grids = find_grids(groups)
    for grid in grids:
        plot_grid(grid, out / grid.file)
    if grids:
        lines += _grid_section(grids)
    rows = {run.path: _md(g.label) for g in groups for run in g.runs}
    lines += ["## Runs", "", "| run | row | folds | missing | curves | confusion | results |"]
    lines.append("|---|---|---|---|---|---|---|")
    names = _unique_names(runs)
    for run in sorted(runs, key=lambda r: names[r.path]):
        name = names[run.path]
        curves = f"curves/{name}.png"
        confusion = f"confusion/{name}.png"
        curves_link = f"[png]({curves})" if plot_curves(run, out / curves) else "-"
        confusion_link = f"[png]({confusion})" if plot_confusion(run, out / confusion) else "-"
        missing = ", ".join(run.results.get("folds_missing") or []) or "-"
        cells = [name, rows[run.path], str(len(run.folds)), missing, curves_link, confusion_link, f"`{run.path}`"]
        lines.append("| " + " | ".join(cells) + " |")
    if left_out:
        lines += ["", "## Left out", "", "| results | why |", "|---|---|"]
        lines += [f"| `{item.path}` | {_md(item.reason)} |" for item in left_out]
    report = out / REPORT
    write_text_atomic(report, "\n".join(lines) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line; user errors end with one line on stderr and exit status 1."""
    parser = argparse.ArgumentParser(prog="python -m petl_apps.report", description=__doc__.splitlines()[0])
    parser.add_argument("results_dirs", nargs="+", metavar="RESULTS_DIR", help="folders searched for results.json")
    parser.add_argument("--out", required=True, help="folder for report.md and the figures")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.results_dirs, args.out)
    except ReportError as error:
        sys.exit(f"report: error: {error}")
    print(f"report written to {report}")
    return report


if __name__ == "__main__":
    main()
