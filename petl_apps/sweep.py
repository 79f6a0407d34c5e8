"""Run a grid of recipe runs one after another, skip the finished ones, and end with the report.

    python -m petl_apps.sweep --datasets FSC,ESC50,... --methods all|M1,M2 --data_root DIR \
        [--backbone_source ID] [--backbone ast|wav2vec2|hubert|data2vec|wavlm] [--seeds 1,2,3] \
        [--few_shot_samples full,1,2,4,8] [--grid KEY=V1,V2,... ...] [--output_folder DIR] \
        [--data_folder DS=DIR ...] [--recipes DIR] [--print | --slurm DIR [--sbatch=OPTION ...]] \
        [-- extra recipe options]
    python -m petl_apps.sweep --paper table1|table2|table3 [--datasets DS,...] [--methods all|PRESET,...] \
        --data_root DIR [same options]

Every (dataset, method, seed, K) is one recipe command, run in the current directory, with the recipes of
`--recipes` (default `recipes/` under the current directory, so from the repository root):

    python recipes/<DS>/train.py recipes/<DS>/hparams/<method>.yaml --data_folder=<data_root>/<folder> \
        --output_folder=<out>/<DS>/<method>/seed<s>[/fewshot<K>] [--backbone=B] [--backbone_source=ID] \
        --seed=<s> [--few_shot_samples=K] [extra options]

Data folders are the official names below `--data_root` (`DATA_FOLDERS`; a recipe without one uses
`<data_root>/<DS>`), or `--data_folder DS=DIR`. `--methods all` is every `hparams/*.yaml` of the recipe that is
a method file (its composed keys hold `method_name`), so the dataset block is left out. `--few_shot_samples`
lists K values; `full` in the list is the whole training set (the default when the option is absent).

`--paper TABLE` runs the rows of the MLSP 2024 paper's table (`petl_apps.paper`): for each of its datasets
and each row's preset, in the paper's order, `recipes/<DS>/hparams/paper/<preset>.yaml` with the output folder
`<out>/<DS>/paper/<preset>/seed<s>[/fewshot<K>]`; Table 2 runs each K of its `few_shot` list
(`--few_shot_samples` is then not given). `--datasets` may pick some of the table's datasets, `--methods` some
of its presets; `--backbone` may only repeat the table's (Table 3: wav2vec2, which its presets set).

`--grid KEY=V1,V2,...` (repeatable: several give their cartesian product) repeats every run for each value,
with `--KEY=V` added and a folder level `KEY-V[,KEY2-V2]` before `seed<s>` (not `KEY=V`: the recipes' command
line reads every `=` of an option as a separator, so no option value may hold one); the sweep's own options
(`--seed`, `--output_folder`...) and `--fold` are no grid keys, and values are letters, digits, `.`, `_`, `+`, `-`.

A run is finished, and skipped, when its `results.json` is not a debug run and misses no fold. Runs stream one
status line each; a run's output goes to `<run folder>/sweep.log`. A failed run does not stop the sweep; the
exit status is 1 when one failed. The sweep ends with `python -m petl_apps.report <out> --out <out>/report`.
`--print` writes the commands of the unfinished runs, then the report command, one per line, for a cluster.

`--slurm DIR` runs nothing: it writes a SLURM job array for the unfinished work into DIR:

- `runs.txt`: one task per line, `cd <current dir> && <python> <recipe command>`: one per unfinished fold
  (`--fold=K` added; a fold is done once its `fold<K>/fold_result.json` exists) for recipes whose `train.py`
  declares its folds (`FOLDS = ...`, read from the source, never run: `recipe_folds`), else one per run (a
  single split; a declaration this cannot read; `--fold` among the extra options). A folded run whose folds
  are all done but whose `results.json` misses some gets one line that only aggregates them.
- `array.sbatch`: `#SBATCH --array=1-N`, logs in `DIR/logs/`, then each `--sbatch=OPTION` as an `#SBATCH`
  line; task i runs line i of runs.txt with bash and exits with its status. It runs under plain bash too
  (`SLURM_ARRAY_TASK_ID=i bash DIR/array.sbatch`); a finished line is a no-op (the recipe skips finished folds).
- `report.sbatch`: the report command (its `#SBATCH` lines: `--sbatch_report` options, else the `--sbatch` ones).
- `submit.sh`: submits the array, then the report once every task has ended (`--dependency=afterany`).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from petl_apps.commands import RecipesNotFoundError, recipes_folder
from petl_apps.paper import TABLES, paper_tables, preset_file, table_presets
from petl_apps.report import ReportError, write_report
from petl_modules.atomic import write_text_atomic
from petl_modules.backbones import BACKBONES
from petl_modules.hparams_loader import HparamsError, compose

__all__ = [
    "DATA_FOLDERS",
    "SweepError",
    "SweepRun",
    "execute",
    "is_finished",
    "main",
    "method_files",
    "plan",
    "recipe_folds",
    "recipes",
    "slurm_tasks",
    "write_slurm",
]

RESULTS = "results.json"
FOLD_RESULT = "fold_result.json"  # the recipe's <output_folder>/fold<K>/fold_result.json (petl_modules.recipe)
SWEEP_LOG = "sweep.log"
REPORT_FOLDER = "report"
PAPER_FOLDER = "paper"  # <out>/<DS>/paper/<preset>/...
# The folder each dataset's archive unpacks to, below --data_root.
DATA_FOLDERS = {
    "FSC": "fluent_speech_commands_dataset",
    "ESC50": "ESC-50-master",
    "UrbanSound8K": "UrbanSound8K",
    "GSC": "speech_commands_v0.02",
    "IEMOCAP": "IEMOCAP_full_release",
}
# Options the sweep sets itself: giving them after `--` would make the runs disagree with their folders.
_OWN_OPTIONS = ("data_folder", "output_folder", "seed", "few_shot_samples", "backbone", "backbone_source")
# The files of --slurm DIR.
SLURM_RUNS, SLURM_ARRAY, SLURM_REPORT, SLURM_SUBMIT, SLURM_LOGS = (
    "runs.txt",
    "array.sbatch",
    "report.sbatch",
    "submit.sh",
    "logs",
)
_SBATCH_OWN = ("--array", "-a", "--output", "-o")  # array.sbatch sets them itself
_GRID_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_GRID_VALUE = re.compile(r"[A-Za-z0-9._+-]+\Z")  # a folder name part, and a YAML plain scalar


class SweepError(ValueError):
    """A sweep option is wrong; the message names it and what was expected."""


@dataclass(frozen=True)
class SweepRun:
    """One recipe command of the grid."""

    dataset: str
    method: str  # a method file's name, or with `table` the paper preset's
    seed: int
    few_shot: int | None
    output: Path
    args: tuple[str, ...]  # after `python`, run in the current directory
    grid: str = ""  # `KEY=V[,KEY2=V2]`: the run's --grid values
    table: str | None = None  # the paper's table (--paper) the preset is a row of

    @property
    def title(self) -> str:
        parts = [self.dataset, *[self.table] * bool(self.table), self.method, *[self.grid] * bool(self.grid)]
        return " ".join([*parts, f"seed{self.seed}"]) + (f" K={self.few_shot}" if self.few_shot else "")


@dataclass(frozen=True)
class _Job:
    """A hyperparameter file on a dataset, before the grid, the seeds and K."""

    dataset: str
    method: str
    hparams: Path
    folder: Path  # below the output folder
    shots: tuple[int | None, ...]


def recipes(folder: Path) -> list[str]:
    """The recipes in `folder` (its sub-folders with a train.py)."""
    return sorted(path.parent.name for path in folder.glob("*/train.py"))


def method_files(folder: Path, dataset: str) -> list[str]:
    """The method names (file stems) of a recipe: its hparams files whose composed keys hold `method_name`."""
    methods = []
    for path in sorted((folder / dataset / "hparams").glob("*.yaml")):
        try:
            if "method_name" in compose(path):
                methods.append(path.stem)
        except HparamsError as error:
            raise SweepError(f"--methods: {error}") from error
    return methods


def is_finished(output: Path) -> bool:
    """Whether `output/results.json` records a finished run: not a debug run, no fold missing."""
    try:
        results = json.loads((output / RESULTS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(results, dict) and not results.get("debug") and not results.get("folds_missing")


def _recorded_backbone(output: Path) -> str | None:
    try:
        return json.loads((output / RESULTS).read_text(encoding="utf-8")).get("backbone")
    except (OSError, ValueError, AttributeError):
        return None


def _list(option: str, text: str, parse=str, expected: str = "") -> list:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise SweepError(f"--{option}: give a comma-separated list, got {text!r}")
    try:
        return [parse(item) for item in items]
    except ValueError:
        raise SweepError(f"--{option}: expected a comma-separated list of {expected}, got {text!r}") from None


def _few_shot(item: str) -> int | None:
    if item == "full":
        return None
    value = int(item)
    if value <= 0:
        raise ValueError(item)
    return value


def _option_name(option: str) -> str:
    return option.lstrip("-").split("=", 1)[0]


def _data_folders(data_root: Path | None, overrides: Sequence[str], datasets: Sequence[str]) -> dict[str, Path]:
    folders = {}
    for override in overrides:
        dataset, sep, folder = override.partition("=")
        if not sep or not folder or dataset not in datasets:
            raise SweepError(
                f"--data_folder: expected DATASET=DIR with DATASET one of {list(datasets)}, got {override!r}"
            )
        folders[dataset] = Path(os.path.abspath(folder))
    for dataset in datasets:
        if dataset not in folders:
            if data_root is None:
                raise SweepError(f"--data_root DIR (or --data_folder {dataset}=DIR) is required")
            folders[dataset] = Path(os.path.abspath(data_root)) / DATA_FOLDERS.get(dataset, dataset)
    return folders


def _grid(specs: Sequence[str], extra: Sequence[str]) -> list[tuple[tuple[str, str], ...]]:
    """The combinations of the `--grid KEY=V1,V2` values (their cartesian product, in the order given); [()]
    without a grid.
    """
    given = {_option_name(option) for option in extra}
    axes: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, text = spec.partition("=")
        if not sep or not _GRID_KEY.match(key):
            raise SweepError(f"--grid: expected KEY=V1,V2,... with KEY a setting name, got {spec!r}")
        if key in _OWN_OPTIONS:
            option = {"seed": "--seeds", "data_folder": "--data_folder DS=DIR"}.get(key, f"--{key}")
            raise SweepError(f"--grid {spec}: the sweep sets --{key} itself; use its {option} option")
        if key == "fold":
            raise SweepError(f"--grid {spec}: a run is all its folds, not a setting (-- --fold=K runs one)")
        if key in axes:
            raise SweepError(f"--grid: {key} given twice; give all its values in one --grid {key}=V1,V2,...")
        if key in given:
            raise SweepError(f"--grid: {key} is also given after `--`; give it in one place")
        values = [value.strip() for value in text.split(",")]
        if not text.strip() or not all(values):
            raise SweepError(f"--grid {key}: give a comma-separated list of values, got {text!r}")
        bad = next((value for value in values if not _GRID_VALUE.match(value)), None)
        if bad is not None:
            raise SweepError(f"--grid {key}: the value {bad!r} cannot name a folder; use letters, digits, . _ + -")
        if len(set(values)) < len(values):
            raise SweepError(f"--grid {key}: a value is given twice in {text!r}")
        axes[key] = values
    return [tuple(zip(axes, combination)) for combination in itertools.product(*axes.values())]


def _table_backbone(args: argparse.Namespace) -> str:
    backbone = paper_tables()["tables"][args.paper]["backbone"]
    if args.backbone and args.backbone != backbone:
        raise SweepError(f"--backbone: --paper {args.paper} runs {backbone}, not {args.backbone}")
    return backbone


def _paper_jobs(args: argparse.Namespace, folder: Path, available: Sequence[str]) -> list[_Job]:
    """The runs of the paper's table: each of its datasets, each row's preset there, in the paper's order."""
    table = args.paper
    spec = paper_tables()["tables"][table]
    presets = table_presets(table)
    table_datasets = [dataset for dataset in spec["datasets"] if dataset in presets]
    datasets = table_datasets if args.datasets is None else _list("datasets", args.datasets)
    outside = [dataset for dataset in datasets if dataset not in table_datasets]
    if outside:
        raise SweepError(f"--datasets: {table} has no {outside[0]!r}; its datasets are {','.join(table_datasets)}")
    missing = [dataset for dataset in datasets if dataset not in available]
    if missing:
        raise SweepError(f"--datasets: no recipe {missing[0]!r} in {folder}; recipes are {','.join(available)}")
    if args.few_shot_samples is not None:
        raise SweepError(f"--few_shot_samples: --paper {table} runs the table's own K; leave it out")
    rows = list(dict.fromkeys(preset for dataset in datasets for preset in presets[dataset]))
    wanted = rows if args.methods == "all" else _list("methods", args.methods)
    unknown = [preset for preset in wanted if preset not in rows]
    if unknown:
        raise SweepError(
            f"--methods: {table} has no preset {unknown[0]!r} on {','.join(datasets)}; its presets are {','.join(rows)}"
        )
    shots = spec.get("few_shot", {})
    jobs = []
    for dataset in datasets:
        for preset in (preset for preset in presets[dataset] if preset in wanted):
            hparams = preset_file(folder, dataset, preset)
            if not hparams.is_file():
                raise SweepError(f"--paper {table}: the preset file {hparams} is missing")
            ks = tuple(int(k) for k in shots[dataset]) if dataset in shots else (None,)
            jobs.append(_Job(dataset, preset, hparams, Path(dataset) / PAPER_FOLDER / preset, ks))
    return jobs


def _method_jobs(args: argparse.Namespace, folder: Path, available: Sequence[str]) -> list[_Job]:
    """The runs of `--datasets` x `--methods` (method files) x `--few_shot_samples`."""
    if args.datasets is None:
        raise SweepError("--datasets DS,... is required (or --paper TABLE: the table's datasets)")
    datasets = _list("datasets", args.datasets)
    unknown = [d for d in datasets if d not in available]
    if unknown:
        raise SweepError(f"--datasets: no recipe {unknown[0]!r}; recipes are {','.join(available)}")
    shots = _list("few_shot_samples", args.few_shot_samples or "full", _few_shot, "positive integers or 'full'")
    jobs = []
    for dataset in datasets:
        methods = method_files(folder, dataset)
        wanted = methods if args.methods == "all" else _list("methods", args.methods)
        missing = [m for m in wanted if m not in methods]
        if missing:
            raise SweepError(f"--methods: {dataset} has no method {missing[0]!r}; it has {','.join(methods)}")
        for method in wanted:
            hparams = folder / dataset / "hparams" / f"{method}.yaml"
            jobs.append(_Job(dataset, method, hparams, Path(dataset) / method, tuple(shots)))
    return jobs


def _check_equals(options: Sequence[str]) -> None:
    """SpeechBrain's command line splits `--key=value` options at every `=`: a value holding one would change."""
    for option in options:
        name, sep, value = option.partition("=")
        if sep and "=" in value:
            raise SweepError(
                f"{option!r}: the recipes read every '=' of an option as a separator ({name}={value.replace('=', ' ')} "
                "would run); choose a folder or value without '='"
            )


def plan(args: argparse.Namespace, extra: Sequence[str]) -> list[SweepRun]:
    """Every run of the grid, in dataset, method (or paper preset), grid values, seed, K order."""
    folder = recipes_folder(args.recipes)
    available = recipes(folder)
    for option in extra:
        name = _option_name(option)
        if name in _OWN_OPTIONS:
            raise SweepError(f"extra option {option!r}: the sweep sets --{name} itself; use the sweep's --{name}")
    backbone = _table_backbone(args) if args.paper else args.backbone or "ast"
    jobs = _paper_jobs(args, folder, available) if args.paper else _method_jobs(args, folder, available)
    combinations = _grid(args.grid, extra)
    seeds = _list("seeds", args.seeds, int, "integers")
    folders = _data_folders(args.data_root, args.data_folder, list(dict.fromkeys(job.dataset for job in jobs)))
    out = Path(os.path.abspath(args.output_folder))
    runs = []
    for job in jobs:
        for combination in combinations:
            setting = ",".join(f"{key}-{value}" for key, value in combination)
            for seed in seeds:
                for k in job.shots:
                    output = out / job.folder / setting / f"seed{seed}" / (f"fewshot{k}" if k else "")
                    output = Path(os.path.normpath(output))
                    command = [
                        str(folder / job.dataset / "train.py"),
                        str(job.hparams),
                        f"--data_folder={folders[job.dataset]}",
                        f"--output_folder={output}",
                    ]
                    command += [f"--backbone={args.backbone}"] * bool(args.backbone)
                    command += [f"--backbone_source={args.backbone_source}"] * bool(args.backbone_source)
                    command += [f"--seed={seed}"] + [f"--few_shot_samples={k}"] * bool(k)
                    command += [f"--{key}={value}" for key, value in combination] + list(extra)
                    run = SweepRun(job.dataset, job.method, seed, k, output, tuple(command), setting, args.paper)
                    runs.append(run)
    for run in runs:
        _check_equals(run.args[2:])
        recorded = _recorded_backbone(run.output)
        if recorded is not None and recorded != backbone:
            raise SweepError(
                f"{run.output / RESULTS} records a {recorded} run, not {backbone}; give another --output_folder"
            )
    return runs


def _test_accuracy(output: Path) -> str:
    try:
        accuracy = json.loads((output / RESULTS).read_text(encoding="utf-8"))["mean"]["test"]["accuracy"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return f", test accuracy {100 * accuracy:.2f} %"


def execute(runs: Sequence[SweepRun], stream: TextIO = sys.stdout) -> list[SweepRun]:
    """Run the unfinished runs one after another, one status line each; returns the failed ones."""
    failed = []
    for index, run in enumerate(runs, start=1):
        prefix = f"[{index}/{len(runs)}] {run.title}:"
        if is_finished(run.output):
            print(f"{prefix} finished before, skipped", file=stream, flush=True)
            continue
        run.output.mkdir(parents=True, exist_ok=True)
        log = run.output / SWEEP_LOG
        print(f"{prefix} running (log {log}) ...", end=" ", file=stream, flush=True)
        start = time.monotonic()
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"$ python {shlex.join(run.args)}\n")
            handle.flush()
            code = subprocess.call([sys.executable, *run.args], stdout=handle, stderr=subprocess.STDOUT)
        seconds = time.monotonic() - start
        if code == 0 and is_finished(run.output):
            print(f"done in {seconds:.1f} s{_test_accuracy(run.output)}", file=stream, flush=True)
        else:
            failed.append(run)
            print(f"FAILED (exit status {code}) after {seconds:.1f} s; see {log}", file=stream, flush=True)
    return failed


# --- the recipes' folds, read without running them ----------------------------------------------------------


def _static_value(node: ast.expr, names: dict[str, Callable[[], object]]) -> object:
    """The value of a small constant expression (ints, tuples, lists, + and -, range/tuple/list calls, known
    names); ValueError for anything else.
    """
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_static_value(element, names) for element in node.elts)
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]()
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
        left, right = _static_value(node.left, names), _static_value(node.right, names)
        if type(left) is int and type(right) is int:
            return left + right if isinstance(node.op, ast.Add) else left - right
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        values = [_static_value(argument, names) for argument in node.args]
        if node.func.id == "range" and 1 <= len(values) <= 3 and all(type(value) is int for value in values):
            return tuple(range(*values))
        if node.func.id in ("tuple", "list") and len(values) == 1 and isinstance(values[0], tuple):
            return values[0]
    raise ValueError(ast.dump(node))


def _library_value(module: str, name: str) -> Callable[[], object]:
    def value() -> object:
        try:
            found = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"{module}.{name}") from error
        if type(found) is not int:
            raise ValueError(f"{module}.{name}")
        return found

    return value


def recipe_folds(script: Path) -> tuple[int, ...] | None:
    """The folds a recipe's `train.py` declares (`FOLDS = ...` at module level), read from its source without
    running or importing it: () for a single split, None when the declaration is missing or not a constant
    this reads (ints, tuples, `range`, + and -, earlier module constants, ints imported from `petl_modules`).
    """
    try:
        module = ast.parse(script.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    names: dict[str, Callable[[], object]] = {}
    folds = None
    for node in module.body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "petl_modules":
            for alias in node.names:
                names[alias.asname or alias.name] = _library_value(node.module, alias.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            try:
                value = _static_value(node.value, names)
            except ValueError:
                value = None
            for target in targets:
                if isinstance(target, ast.Name):
                    names.pop(target.id, None)
                    if value is not None:
                        names[target.id] = lambda value=value: value
                    if target.id == "FOLDS":
                        folds = value
    if not isinstance(folds, tuple) or not all(type(fold) is int for fold in folds) or len(set(folds)) < len(folds):
        return None
    return folds


# --- SLURM ----------------------------------------------------------------------------------------------


def slurm_tasks(runs: Sequence[SweepRun], cwd: Path, python: str = sys.executable) -> list[str]:
    """The lines of runs.txt: `cd <cwd> && <python> <command> [--fold=K]` for each unfinished fold of each
    unfinished run whose recipe declares folds (`recipe_folds`), else one line per unfinished run.

    A folded run whose folds all have their `fold_result.json` but whose results.json is not finished (two
    folds that ended at once) gets one line without `--fold`: it trains nothing and aggregates them.
    """
    lines = []
    folds: dict[str, tuple[int, ...] | None] = {}
    prefix = f"cd {shlex.quote(str(cwd))} && "
    for run in runs:
        if is_finished(run.output):
            continue
        script = run.args[0]
        if script not in folds:
            folds[script] = recipe_folds(Path(cwd) / script)
        command = [python, *run.args]
        todo = []
        if folds[script] and not any(_option_name(option) == "fold" for option in run.args[2:]):
            todo = [fold for fold in folds[script] if not (run.output / f"fold{fold}" / FOLD_RESULT).is_file()]
        if todo:
            lines += [prefix + shlex.join([*command, f"--fold={fold}"]) for fold in todo]
        else:
            lines.append(prefix + shlex.join(command))
    return lines


def _check_sbatch(options: Sequence[str], flag: str) -> None:
    for option in options:
        if not option.startswith("-") or "\n" in option:
            raise SweepError(f"{flag}: expected an sbatch option such as {flag}=--gres=gpu:1, got {option!r}")
        if option.split("=", 1)[0] in _SBATCH_OWN:
            raise SweepError(f"{flag}={option}: array.sbatch sets --array and --output itself")


def _write_script(path: Path, text: str) -> None:
    """`text` written atomically, then executable by whoever may read it."""
    write_text_atomic(path, text)
    mode = path.stat().st_mode
    path.chmod(mode | (mode & 0o444) >> 2)


_HEADER = "#!/bin/bash\n# Written by `python -m petl_apps.sweep --slurm`; submit.sh beside this file submits it.\n"

# The body of array.sbatch; {runs} and {array} are shell-quoted paths.
_ARRAY_BODY = """\
# Task i runs line i of runs.txt (one recipe run, or one fold of one) and exits with its status. A finished
# line is a no-op when run again: the recipe skips finished folds. Without SLURM:
#     SLURM_ARRAY_TASK_ID=1 bash {array}
runs={runs}
task=${{SLURM_ARRAY_TASK_ID:-}}
case $task in
    '' | *[!0-9]*)
        echo "array.sbatch: SLURM_ARRAY_TASK_ID must be a line number of $runs, got '$task'" >&2
        exit 2 ;;
esac
line=$(sed -n "${{task}}p" "$runs")
if [ -z "$line" ]; then
    echo "array.sbatch: $runs has no line $task" >&2
    exit 2
fi
echo "task $task: $line"
bash -c "$line"
status=$?
echo "task $task: exit status $status"
exit $status
"""

# The body of submit.sh; {array} and {report} are shell-quoted paths.
_SUBMIT_BODY = """\
# The job array (a task per line of runs.txt), then the report once every task has ended, failed ones too.
jid=$(sbatch --parsable {array}) || exit
jid=${{jid%%;*}}  # --parsable prints JOBID[;CLUSTER]
echo "submitted the job array $jid ({count} tasks)"
sbatch --dependency=afterany:"$jid" {report}
"""


def _directives(options: Sequence[str]) -> str:
    return "".join(f"#SBATCH {option}\n" for option in options)


def write_slurm(
    folder: Path,
    tasks: Sequence[str],
    report: str,
    sbatch: Sequence[str] = (),
    sbatch_report: Sequence[str] | None = None,
) -> list[Path]:
    """Write runs.txt (`tasks`, a line each), array.sbatch (none without tasks), report.sbatch (runs the shell
    line `report`) and submit.sh into `folder`, each atomically; returns the paths written.

    The `#SBATCH` lines of array.sbatch are the job name, `--array=1-N`, `--output` in `folder/logs/`, then
    `sbatch`; report.sbatch's are its job name and log, then `sbatch_report`, else `sbatch`.
    """
    folder = Path(os.path.abspath(folder))
    logs = folder / SLURM_LOGS
    logs.mkdir(parents=True, exist_ok=True)
    runs, array, report_script, submit = (
        folder / name for name in (SLURM_RUNS, SLURM_ARRAY, SLURM_REPORT, SLURM_SUBMIT)
    )
    write_text_atomic(runs, "".join(f"{line}\n" for line in tasks))
    written = [runs]
    if tasks:
        directives = ["--job-name=petl-sweep", f"--array=1-{len(tasks)}", f"--output={logs}/array-%A_%a.out", *sbatch]
        body = _ARRAY_BODY.format(runs=shlex.quote(str(runs)), array=shlex.quote(str(array)))
        _write_script(array, _HEADER + _directives(directives) + body)
        written.append(array)
    else:
        array.unlink(missing_ok=True)  # a stale one would run the lines of an older runs.txt
    options = sbatch if sbatch_report is None else sbatch_report
    directives = ["--job-name=petl-report", f"--output={logs}/report-%j.out", *options]
    _write_script(report_script, _HEADER + _directives(directives) + f"# The sweep's report.\n{report}\n")
    written.append(report_script)
    if tasks:
        body = _SUBMIT_BODY.format(
            array=shlex.quote(str(array)), report=shlex.quote(str(report_script)), count=len(tasks)
        )
    else:
        body = f"# Nothing left to run: the report alone.\nsbatch {shlex.quote(str(report_script))}\n"
    _write_script(submit, "#!/bin/bash\n# Written by `python -m petl_apps.sweep --slurm`.\n" + body)
    written.append(submit)
    return written


def _slurm(args: argparse.Namespace, runs: Sequence[SweepRun], report_args: Sequence[str], stream: TextIO) -> None:
    cwd = Path.cwd()
    tasks = slurm_tasks(runs, cwd)
    report = f"cd {shlex.quote(str(cwd))} && {shlex.join([sys.executable, *report_args])}"
    try:
        written = write_slurm(Path(args.slurm), tasks, report, args.sbatch, args.sbatch_report or None)
    except OSError as error:
        raise SweepError(f"--slurm {args.slurm}: {error}") from error
    unfinished = sum(not is_finished(run.output) for run in runs)
    print(f"{written[0]}: {len(tasks)} task(s) for {unfinished} unfinished run(s) of {len(runs)}", file=stream)
    for path in written[1:]:
        print(f"{path}", file=stream)
    submit = written[-1]
    if tasks:
        print(f"submit: bash {shlex.quote(str(submit))} (the array, then the report once it has ended)", file=stream)
    else:
        print(f"submit: bash {shlex.quote(str(submit))} (nothing left to run: the report alone)", file=stream)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m petl_apps.sweep",
        description=__doc__.splitlines()[0],
        epilog="Options after `--` go to every recipe command (e.g. -- --number_of_epochs=5 --device=cuda).",
    )
    parser.add_argument(
        "--datasets", default=None, help="comma-separated recipe names, e.g. FSC,ESC50 (--paper: some of its)"
    )
    parser.add_argument(
        "--methods", default="all", help="'all' or comma-separated method files, e.g. lora,adapter (--paper: presets)"
    )
    parser.add_argument("--paper", default=None, choices=TABLES, help="run the rows of the MLSP 2024 paper's table")
    parser.add_argument("--data_root", default=None, help="folder holding the datasets under their official names")
    parser.add_argument(
        "--data_folder", action="append", default=[], metavar="DS=DIR", help="one dataset's folder (repeatable)"
    )
    parser.add_argument("--backbone_source", default=None, help="hub id or local folder (default: the recipe's)")
    parser.add_argument("--backbone", default=None, choices=BACKBONES)
    parser.add_argument("--seeds", default="10", help="comma-separated seeds (default 10, the recipes' seed)")
    parser.add_argument(
        "--few_shot_samples", default=None, help="comma-separated K per class; 'full' = all data (the default)"
    )
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="repeat every run for each value (repeatable: the product)",
    )
    parser.add_argument("--output_folder", default="results/sweep", help="root of the run folders and the report")
    parser.add_argument("--recipes", default=None, help="the recipes folder (default: recipes/ here)")
    parser.add_argument("--print", action="store_true", help="only print the commands of the unfinished runs")
    parser.add_argument("--slurm", default=None, metavar="DIR", help="write a SLURM job array into DIR, run nothing")
    parser.add_argument(
        "--sbatch", action="append", default=[], metavar="OPTION", help="an #SBATCH line, e.g. --sbatch=--gres=gpu:1"
    )
    parser.add_argument(
        "--sbatch_report", action="append", default=[], metavar="OPTION", help="report.sbatch's (default: --sbatch's)"
    )
    return parser


def _check_modes(args: argparse.Namespace) -> None:
    _check_sbatch(args.sbatch, "--sbatch")
    _check_sbatch(args.sbatch_report, "--sbatch_report")
    if args.print and args.slurm:
        raise SweepError("--print and --slurm: give one (--print lists the commands, --slurm writes a job array)")
    if (args.sbatch or args.sbatch_report) and not args.slurm:
        raise SweepError("--sbatch and --sbatch_report go with --slurm DIR")


def main(argv: Sequence[str] | None = None, stream: TextIO = sys.stdout) -> int:
    """Command line; returns the exit status (user errors: one line on stderr, status 1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = _parser().parse_args(argv[:split])
    out = Path(os.path.abspath(args.output_folder))
    report_args = ["-m", "petl_apps.report", str(out), "--out", str(out / REPORT_FOLDER)]
    try:
        _check_modes(args)
        runs = plan(args, argv[split + 1 :])
        if args.print:
            for run in runs:
                if not is_finished(run.output):
                    print(f"python {shlex.join(run.args)}", file=stream)
            print(f"python {shlex.join(report_args)}", file=stream)
            return 0
        absent = next((run for run in runs if not Path(run.args[2].split("=", 1)[1]).is_dir()), None)
        if absent is not None:
            raise SweepError(
                f"{absent.dataset} data folder {absent.args[2].split('=', 1)[1]} not found; "
                f"set --data_root or --data_folder {absent.dataset}=DIR"
            )
        if args.slurm:
            _slurm(args, runs, report_args, stream)
            return 0
        failed = execute(runs, stream)
        report = write_report([out], out / REPORT_FOLDER)
    except (SweepError, ReportError, RecipesNotFoundError) as error:
        print(f"sweep: error: {error}", file=sys.stderr)
        return 1
    print(f"report: {report}", file=stream)
    if failed:
        print(f"{len(failed)} of {len(runs)} run(s) failed: {', '.join(run.title for run in failed)}", file=stream)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
