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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from petl_apps.commands import recipe_command
from petl_apps.commands import train_script as train_script_path
from petl_apps.synthetic import make_esc50, make_fsc, make_gsc, make_iemocap, make_urbansound8k
from petl_modules.methods import METHOD_FILES
from petl_modules.random_backbones import write_random_checkpoint

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
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

# Runs several command lines in one interpreter and reports each one's outcome (see its docstring).
DRIVER = Path(__file__).resolve().parent / "recipe_driver.py"


def write_workspace(root: Path) -> dict[str, Path]:
    """Every dataset and the tiny AST / wav2vec2 / data2vec / wavlm / whisper checkpoints under `root`."""
    paths = {name: make(root / "data" / name) for name, (make, _, _) in DATASETS.items()}
    for kind in ("ast", "wav2vec2", "data2vec", "wavlm", "whisper"):
        paths[kind] = write_random_checkpoint(kind, root / kind)
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
    return recipe_command(
        dataset, method, settings, *QUICK_OPTIONS, *options, *extra, hparams=hparams, recipes=RECIPES
    )[2:]


def train_script(dataset: str) -> str:
    return str(train_script_path(dataset, RECIPES))


def run_recipe(
    dataset: str,
    args: Sequence[str],
    cwd: Path | None = None,
    timeout: int = 600,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`python recipes/<dataset>/train.py ARGS` in a subprocess (cwd: the repository root by default; `env` adds
    variables)."""
    return subprocess.run(
        [sys.executable, train_script(dataset), *args],
        capture_output=True,
        text=True,
        env={**ENV, **(env or {})},
        cwd=cwd or REPO,
        timeout=timeout,
    )


def prelude_name(prelude: Callable[[], object]) -> str:
    """The `module:function` name by which the driver imports `prelude` (a module-level function)."""
    module, qualname = prelude.__module__, prelude.__qualname__
    if module == "__main__" or "<locals>" in qualname:
        raise ValueError(f"a prelude must be a module-level function the driver can import, got {module}:{qualname}")
    return f"{module}:{qualname}"


def run_recipes(
    commands: Sequence[tuple[str, Sequence[str]]],
    report: Path,
    prelude: Callable[[], object] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: int = 1200,
) -> list[dict]:
    """Several `train.py` command lines [(dataset, args)] in one interpreter; each one's outcome (`recipe_driver`).

    A command that fails does not stop the next ones; `prelude` (a module-level function, such as those of
    `recipe_preludes`) is imported by name and called once before them, with `env` set.
    """
    payload = json.dumps([[train_script(dataset), str(REPO), list(args)] for dataset, args in commands])
    process = subprocess.run(
        [sys.executable, str(DRIVER), payload, str(report), prelude_name(prelude) if prelude else ""],
        capture_output=True,
        text=True,
        env={**ENV, **(env or {})},
        cwd=REPO,
        timeout=timeout,
    )
    outcomes = json.loads(report.read_text()) if report.is_file() else []
    assert len(outcomes) == len(commands), process.stderr[-3000:]
    return outcomes
