"""Tiny datasets, tiny checkpoints, and the recipes' public command line, for the recipe tests.

Recipes run as `python recipes/<DS>/train.py HPARAMS --key=value ...`: `run_recipe` in a subprocess of its
own, `run_recipes` several command lines in one interpreter (each script run as `__main__` with its argv, its
folder first on sys.path, as `python` runs it), which saves the interpreter start and the imports per run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from petl_modules import commands
from petl_modules.checkpoints import write_random_checkpoint
from petl_modules.commands import recipe_command
from petl_modules.data.synthetic import make_esc50, make_fsc, make_gsc, make_iemocap, make_urbansound8k
from petl_modules.methods import METHOD_FILES

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
METHODS = METHOD_FILES
TARGET_LENGTH = 50  # AST frames: 4 time columns x 12 frequency rows
# What makes a recipe run take seconds: tiny input, one epoch, small batches, no loader workers.
QUICK_OPTIONS = (
    f"--target_length={TARGET_LENGTH}",
    "--number_of_epochs=1",
    "--batch_size=4",
    "--num_workers=0",
    "--device=cpu",
    "--noprogressbar",
)

# recipe folder -> (dataset generator with its tiny options, class count, extra options for a quick run)
DATASETS = {
    "FSC": (lambda root: make_fsc(root, num_classes=4, n_per_class=2), 4, []),
    "GSC": (lambda root: make_gsc(root, num_words=4, n_per_class=2), 4, []),
    "ESC50": (lambda root: make_esc50(root, num_classes=3, n_per_fold=2), 3, ["--fold=1"]),
    "UrbanSound8K": (lambda root: make_urbansound8k(root, num_classes=3, n_per_fold=1), 3, ["--fold=2"]),
    "IEMOCAP": (
        lambda root: make_iemocap(root, n_per_class=1, dialogs_per_session=1),
        4,
        ["--fold=3", "--few_shot_samples=2"],
    ),
}

# Runs the command lines given as JSON in argv[1] ([[script, cwd, [args...]], ...]) in this interpreter and
# writes, for each, its exit status, message and printed lines to the JSON file argv[2]. Code in argv[3] runs
# first.
DRIVER = """
import contextlib, io, json, os, runpy, sys, traceback
commands, report = json.loads(sys.argv[1]), sys.argv[2]
exec(sys.argv[3])
outcomes = []
for script, cwd, args in commands:
    os.chdir(cwd)
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            runpy.run_path(script, run_name="__main__")
        outcome = {"code": 0, "message": ""}
    except SystemExit as stop:
        code = stop.code
        outcome = {"code": code if isinstance(code, int) else 1, "message": "" if code is None else str(code)}
    except BaseException as error:
        outcome = {"code": "raised", "message": type(error).__name__ + ": " + traceback.format_exc()[-2000:]}
    finally:
        sys.path.pop(0)
    outcomes.append({**outcome, "stdout": printed.getvalue()})
    with open(report, "w") as handle:
        json.dump(outcomes, handle)
"""


def write_workspace(root: Path) -> dict[str, Path]:
    """Every dataset and the tiny AST / wav2vec2 checkpoints under `root`."""
    paths = {name: make(root / "data" / name) for name, (make, _, _) in DATASETS.items()}
    paths["ast"] = write_random_checkpoint("ast", root / "ast")
    paths["wav2vec2"] = write_random_checkpoint("wav2vec2", root / "wav2vec2")
    return paths


def recipe_args(
    dataset: str,
    method: str,
    workspace: dict[str, Path],
    output: Path,
    *extra: str,
    backbone: str = "ast",
    hparams: Path | None = None,
) -> list[str]:
    """The arguments after `train.py` of a quick tiny run (1 epoch, batch 4); an option in `extra` replaces the
    default."""
    _, num_classes, options = DATASETS[dataset]
    settings = {
        "data_folder": workspace[dataset],
        "output_folder": output,
        "backbone": backbone,
        "backbone_source": workspace[backbone],
        "num_classes": num_classes,
    }
    return recipe_command(dataset, method, settings, *QUICK_OPTIONS, *options, *extra, hparams=hparams)[2:]


def train_script(dataset: str) -> str:
    return str(commands.train_script(dataset))


def run_recipe(
    dataset: str, args: Sequence[str], cwd: Path | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`python recipes/<dataset>/train.py ARGS` in a subprocess (cwd: the repository root by default)."""
    return subprocess.run(
        [sys.executable, train_script(dataset), *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd or REPO,
        timeout=timeout,
    )


def run_recipes(
    commands: Sequence[tuple[str, Sequence[str]]],
    report: Path,
    prelude: str = "",
    env: Mapping[str, str] | None = None,
    timeout: int = 1200,
) -> list[dict]:
    """Several `train.py` command lines [(dataset, args)] in one interpreter; each one's exit code and message.

    A command that fails does not stop the next ones; `prelude` (Python code) runs once before them.
    """
    payload = json.dumps([[train_script(dataset), str(REPO), list(args)] for dataset, args in commands])
    process = subprocess.run(
        [sys.executable, "-c", DRIVER, payload, str(report), prelude],
        capture_output=True,
        text=True,
        env={**ENV, **(env or {})},
        cwd=REPO,
        timeout=timeout,
    )
    outcomes = json.loads(report.read_text()) if report.is_file() else []
    assert len(outcomes) == len(commands), process.stderr[-3000:]
    return outcomes
