"""Run a grid of recipe runs one after another, skip the finished ones, and end with the report.

    python -m petl_apps.sweep --datasets FSC,ESC50,... --methods all|M1,M2 --data_root DIR \
        [--backbone_source ID] [--backbone ast|wav2vec2|hubert|data2vec|wavlm] [--seeds 1,2,3] \
        [--few_shot_samples full,1,2,4,8] [--output_folder DIR] [--data_folder DS=DIR ...] [--recipes DIR] \
        [--print] [-- extra recipe options]

Every (dataset, method, seed, K) is one recipe command, run in the current directory, with the recipes of
`--recipes` (default `recipes/` under the current directory, so from the repository root):

    python recipes/<DS>/train.py recipes/<DS>/hparams/<method>.yaml --data_folder=<data_root>/<folder> \
        --output_folder=<out>/<DS>/<method>/seed<s>[/fewshot<K>] [--backbone=B] [--backbone_source=ID] \
        --seed=<s> [--few_shot_samples=K] [extra options]

Data folders are the official names below `--data_root` (`DATA_FOLDERS`; a recipe without one uses
`<data_root>/<DS>`), or `--data_folder DS=DIR`. `--methods all` is every `hparams/*.yaml` of the recipe that is
a method file (its composed keys hold `method_name`), so the dataset block is left out. `--few_shot_samples`
lists K values; `full` in the list is the whole training set (the default when the option is absent).

A run is finished, and skipped, when its `results.json` is not a debug run and misses no fold. Runs stream one
status line each; a run's output goes to `<run folder>/sweep.log`. A failed run does not stop the sweep; the
exit status is 1 when one failed. The sweep ends with `python -m petl_apps.report <out> --out <out>/report`.
`--print` writes the commands of the unfinished runs, then the report command, one per line, for a cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from petl_apps.commands import RecipesNotFoundError, recipes_folder
from petl_apps.report import ReportError, write_report
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
    "recipes",
]

RESULTS = "results.json"
SWEEP_LOG = "sweep.log"
REPORT_FOLDER = "report"
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


class SweepError(ValueError):
    """A sweep option is wrong; the message names it and what was expected."""


@dataclass(frozen=True)
class SweepRun:
    """One recipe command of the grid."""

    dataset: str
    method: str
    seed: int
    few_shot: int | None
    output: Path
    args: tuple[str, ...]  # after `python`, run in the current directory

    @property
    def title(self) -> str:
        return f"{self.dataset} {self.method} seed{self.seed}" + (f" K={self.few_shot}" if self.few_shot else "")


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


def plan(args: argparse.Namespace, extra: Sequence[str]) -> list[SweepRun]:
    """Every run of the grid, in dataset, method, seed, K order."""
    folder = recipes_folder(args.recipes)
    available = recipes(folder)
    datasets = _list("datasets", args.datasets)
    unknown = [d for d in datasets if d not in available]
    if unknown:
        raise SweepError(f"--datasets: no recipe {unknown[0]!r}; recipes are {','.join(available)}")
    for option in extra:
        name = option.lstrip("-").split("=", 1)[0]
        if name in _OWN_OPTIONS:
            raise SweepError(f"extra option {option!r}: the sweep sets --{name} itself; use the sweep's --{name}")
    seeds = _list("seeds", args.seeds, int, "integers")
    shots = _list("few_shot_samples", args.few_shot_samples, _few_shot, "positive integers or 'full'")
    folders = _data_folders(args.data_root, args.data_folder, datasets)
    out = Path(os.path.abspath(args.output_folder))
    runs = []
    for dataset in datasets:
        methods = method_files(folder, dataset)
        wanted = methods if args.methods == "all" else _list("methods", args.methods)
        missing = [m for m in wanted if m not in methods]
        if missing:
            raise SweepError(f"--methods: {dataset} has no method {missing[0]!r}; it has {','.join(methods)}")
        for method in wanted:
            for seed in seeds:
                for k in shots:
                    output = out / dataset / method / f"seed{seed}" / (f"fewshot{k}" if k else "")
                    output = Path(os.path.normpath(output))
                    command = [
                        str(folder / dataset / "train.py"),
                        str(folder / dataset / "hparams" / f"{method}.yaml"),
                        f"--data_folder={folders[dataset]}",
                        f"--output_folder={output}",
                    ]
                    command += [f"--backbone={args.backbone}"] * bool(args.backbone)
                    command += [f"--backbone_source={args.backbone_source}"] * bool(args.backbone_source)
                    command += [f"--seed={seed}"] + [f"--few_shot_samples={k}"] * bool(k) + list(extra)
                    runs.append(SweepRun(dataset, method, seed, k, output, tuple(command)))
    backbone = args.backbone or "ast"
    for run in runs:
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m petl_apps.sweep",
        description=__doc__.splitlines()[0],
        epilog="Options after `--` go to every recipe command (e.g. -- --number_of_epochs=5 --device=cuda).",
    )
    parser.add_argument("--datasets", required=True, help="comma-separated recipe names, e.g. FSC,ESC50")
    parser.add_argument("--methods", default="all", help="'all' or comma-separated method files, e.g. lora,adapter")
    parser.add_argument("--data_root", default=None, help="folder holding the datasets under their official names")
    parser.add_argument(
        "--data_folder", action="append", default=[], metavar="DS=DIR", help="one dataset's folder (repeatable)"
    )
    parser.add_argument("--backbone_source", default=None, help="hub id or local folder (default: the recipe's)")
    parser.add_argument("--backbone", default=None, choices=BACKBONES)
    parser.add_argument("--seeds", default="10", help="comma-separated seeds (default 10, the recipes' seed)")
    parser.add_argument("--few_shot_samples", default="full", help="comma-separated K per class; 'full' = all data")
    parser.add_argument("--output_folder", default="results/sweep", help="root of the run folders and the report")
    parser.add_argument("--recipes", default=None, help="the recipes folder (default: recipes/ here)")
    parser.add_argument("--print", action="store_true", help="only print the commands of the unfinished runs")
    return parser


def main(argv: Sequence[str] | None = None, stream: TextIO = sys.stdout) -> int:
    """Command line; returns the exit status (user errors: one line on stderr, status 1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = _parser().parse_args(argv[:split])
    out = Path(os.path.abspath(args.output_folder))
    report_args = ["-m", "petl_apps.report", str(out), "--out", str(out / REPORT_FOLDER)]
    try:
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
