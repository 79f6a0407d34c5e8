"""What a finished recipe run left behind, found from the folder a user names.

A recipe writes one run per fold: `<output_folder>/` for single-split datasets, `<output_folder>/fold<k>/`
for folded ones. A run folder holds `hyperparams.yaml` (the configuration as run), `save/CKPT+*/` (the
checkpoints, `model.ckpt` = trainable tensors, `CKPT.yaml` = validation metrics) and `fold_result.json`
(with `classes`, the label order). The checkpoint the test stage scored is the one SpeechBrain's
`Checkpointer.find_checkpoint(max_key=selection_metric)` returns; `locate_run` picks the same one.

Invariant: nothing here writes into the run folder or instantiates anything of the training
configuration (no checkpointer, logger or model): the files are only read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import ruamel.yaml
from speechbrain.utils.checkpoints import Checkpointer

from .hparams_loader import HparamsError, compose

HPARAMS_FILE = "hyperparams.yaml"
FOLD_RESULT = "fold_result.json"
RESULTS = "results.json"
EXPORT_INFO = "export.json"


class InferenceError(ValueError):
    """A run, export or input given to prediction or export is unusable; the message names it and the fix."""


@dataclass(frozen=True)
class TrainedRun:
    """One finished run: its configuration, the selected checkpoint's trainable tensors and the label order."""

    folder: Path
    hparams_file: Path
    checkpoint: Path  # <folder>/save/CKPT+*/model.ckpt
    classes: list[str]
    meta: dict  # the checkpoint's CKPT.yaml (epoch, validation metrics)
    git_revision: str | None


def is_export(folder: Path) -> bool:
    return (folder / EXPORT_INFO).is_file() and (folder / HPARAMS_FILE).is_file()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InferenceError(f"{path}: cannot read it as JSON ({error})") from None


def run_folders(folder: Path) -> list[Path]:
    """The run folders a recipe output folder holds (itself for a single split, fold<k>/ for folds)."""
    if (folder / HPARAMS_FILE).is_file() and (folder / "save").is_dir():
        return [folder]
    folds = [path for path in folder.glob("fold*") if (path / HPARAMS_FILE).is_file() and (path / "save").is_dir()]
    return sorted(folds, key=lambda path: (len(path.name), path.name))


def _classes(run: Path) -> list[str]:
    """Label order from the run's fold_result.json, else from results.json beside or above it."""
    if (run / FOLD_RESULT).is_file():
        return list(_read_json(run / FOLD_RESULT)["classes"])
    for results_file, fold in ((run / RESULTS, None), (run.parent / RESULTS, run.name.removeprefix("fold"))):
        if results_file.is_file():
            folds = _read_json(results_file).get("folds", {})
            entry = folds.get(fold) if fold is not None else next(iter(folds.values()), None)
            if entry and "classes" in entry:
                return list(entry["classes"])
    raise InferenceError(
        f"{run}: no {FOLD_RESULT} or {RESULTS} with the class list; is the run finished (not a --debug run)?"
    )


def _git_revision(run: Path) -> str | None:
    for results_file in (run / RESULTS, run.parent / RESULTS):
        if results_file.is_file():
            return _read_json(results_file).get("git_revision")
    return None


def locate_run(path: str | Path) -> TrainedRun:
    """The run in `path` (a run folder, or a recipe output folder holding exactly one run)."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise InferenceError(f"--run {path}: folder not found; give a recipe run folder or an export folder")
    runs = run_folders(folder)
    if not runs:
        raise InferenceError(
            f"--run {path}: no run here (no {HPARAMS_FILE} with save/, in it or in fold*/); "
            "give a recipe run folder, its output folder or an export folder"
        )
    if len(runs) > 1:
        names = ", ".join(run.name for run in runs)
        raise InferenceError(f"--run {path}: holds {len(runs)} runs ({names}); pass one, e.g. --run {runs[0]}")
    run = runs[0]
    tree = read_tree(run / HPARAMS_FILE)
    selection_metric = str(tree.get("selection_metric", "accuracy"))
    best = Checkpointer(run / "save").find_checkpoint(max_key=selection_metric)
    if best is None or "model" not in best.paramfiles:
        raise InferenceError(
            f"{run / 'save'}: no checkpoint with a validation '{selection_metric}'; has the run validated once?"
        )
    return TrainedRun(
        folder=run,
        hparams_file=run / HPARAMS_FILE,
        checkpoint=Path(best.paramfiles["model"]),
        classes=_classes(run),
        meta=dict(best.meta),
        git_revision=_git_revision(run),
    )


# --- the part of a configuration the model needs ----------------------------------------------------


def read_tree(path: Path) -> ruamel.yaml.comments.CommentedMap:
    """The unresolved tree of a hyperparameter file (tags kept), `extends:` merged."""
    try:
        return compose(path)
    except HparamsError as error:
        raise InferenceError(str(error)) from None
