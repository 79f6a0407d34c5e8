"""The driver every `recipes/<DS>/train.py` calls: command line, folds, one training run per fold, results.

A recipe only says which preparation function to call, which folds its protocol has and which extra
metrics it reports (`DatasetRecipe`). Everything else is the same for the five datasets:

    python recipes/<DS>/train.py recipes/<DS>/hparams/<method>.yaml --data_folder=DIR --output_folder=DIR \
        [--fold=all|K] [--few_shot_samples=K] [--any_yaml_key=value] [SpeechBrain run options]

Folded protocols run each fold in `<output_folder>/fold<k>/`; a fold whose `fold_result.json` exists is
finished and skipped, an unfinished one resumes from its latest checkpoint. `<output_folder>/results.json`
aggregates every finished fold found there (mean and population std over folds).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path

import ruamel.yaml
import speechbrain as sb
import torch
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.utils.seed import seed_everything

from .atomic import write_json_atomic, write_text_atomic
from .backbones import ASTBackbone, BackboneLoadError
from .data import AudioError, DataPreparationError, FeatureCache, read_audio, read_classes
from .hparams_loader import HparamsError, check_overrides, compose, load_hparams, parse_overrides
from .training import BASE_METRICS, MetricFn, PETLBrain, add_spec_augment, extra_train_loggers

logger = logging.getLogger(__name__)

FOLD_RESULT = "fold_result.json"
RESULTS = "results.json"
MANIFESTS = "manifests"
FEATURE_CACHE = "feature_cache"
REPO_ROOT = Path(__file__).resolve().parent.parent


class RecipeError(ValueError):
    """A command-line value is wrong; the message names the option and what was expected."""


@dataclass(frozen=True)
class DatasetRecipe:
    """What a dataset recipe contributes; the rest is shared."""

    name: str
    prepare: Callable[..., dict[str, Path]]  # (data_folder, save_folder, [fold,] few_shot_samples, seed)
    folds: tuple[int, ...] = ()  # empty: the official split, a single run
    extra_metrics: Mapping[str, MetricFn] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, MetricFn]:
        return {**BASE_METRICS, **self.extra_metrics}


def load_recipe(dataset: str) -> DatasetRecipe:
    """The `RECIPE` of recipes/<dataset>/train.py, imported as its script would be (for in-process runs)."""
    folder = REPO_ROOT / "recipes" / dataset
    if not (folder / "train.py").is_file():
        raise RecipeError(f"no recipe {dataset!r}: {folder / 'train.py'} not found")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(f"train_{dataset.lower()}", folder / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RECIPE


def git_revision() -> str | None:
    """The commit of this checkout (with `+dirty` when modified), None outside a git checkout."""
    try:
        revision = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return revision + ("+dirty" if dirty else "")


def select_folds(recipe: DatasetRecipe, fold: object) -> list[int | None]:
    """`--fold=all` -> every fold; `--fold=K` -> [K]. Single-split datasets have one run (fold None)."""
    if not recipe.folds:
        if fold not in ("all", 1):
            raise RecipeError(f"--fold: {recipe.name} has one official split; expected 'all' or 1, got {fold!r}")
        return [None]
    if fold == "all":
        return list(recipe.folds)
    if not isinstance(fold, int) or isinstance(fold, bool) or fold not in recipe.folds:
        raise RecipeError(
            f"--fold: {recipe.name} folds are {recipe.folds[0]}..{recipe.folds[-1]} or 'all'; got {fold!r}"
        )
    return [fold]


def build_datasets(
    manifests: Mapping[str, Path], classes: Sequence[str], load: Callable[[str], torch.Tensor] = read_audio
) -> dict[str, DynamicItemDataset]:
    """Manifests -> datasets yielding `sig` and `label_index` (position in classes.txt).

    `sig` is what `load` returns for the item's file: the 16 kHz waveform, or cached features.
    """
    index = {label: position for position, label in enumerate(classes)}

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav: str) -> torch.Tensor:
        return load(wav)

    @sb.utils.data_pipeline.takes("label")
    @sb.utils.data_pipeline.provides("label_index")
    def label_pipeline(label: str) -> int:  # an int, which PaddedBatch collates into a (batch,) tensor
        return index[label]

    return {
        split: DynamicItemDataset.from_csv(
            str(path), dynamic_items=[audio_pipeline, label_pipeline], output_keys=["id", "sig", "label_index"]
        )
        for split, path in manifests.items()
    }


def _dump_hparams(param_file: str, overrides: Mapping, path: Path) -> None:
    """The fully composed hyperparameters (with overrides) as run, for the record."""
    tree = compose(param_file)
    tree.update(overrides)
    stream = StringIO()
    ruamel.yaml.YAML().dump(tree, stream)
    write_text_atomic(path, stream.getvalue())


def input_loader(hparams: Mapping, default_cache_folder: Path) -> Callable[[str], torch.Tensor]:
    """What the data loaders read: AST's fbank through the feature cache (`cache_features`), else waveforms."""
    backbone = hparams["model"].backbone
    if not (hparams["cache_features"] and isinstance(backbone, ASTBackbone)):
        return read_audio
    folder = hparams["feature_cache_folder"] or default_cache_folder
    return FeatureCache(folder, backbone.front_end.single, backbone.front_end.settings())


def run_fold(
    recipe: DatasetRecipe,
    param_file: str,
    run_opts,
    overrides: Mapping,
    fold: int | None,
    run_folder: Path,
    output_folder: Path,
    seed: int,
) -> dict:
    """Train, select on validation, test with the selected checkpoint; returns this fold's results.

    The seed is set before the model is built, so every fold starts from the same initialisation.
    """
    seed_everything(seed)
    hparams = load_hparams(param_file, {**overrides, "output_folder": str(run_folder)})
    sb.create_experiment_directory(experiment_directory=str(run_folder))
    _dump_hparams(param_file, {**overrides, "output_folder": str(run_folder)}, run_folder / "hyperparams.yaml")

    fold_args = {} if fold is None else {"fold": fold}
    manifests = recipe.prepare(
        data_folder=hparams["data_folder"],
        save_folder=output_folder / MANIFESTS,
        few_shot_samples=hparams["few_shot_samples"],
        seed=hparams["seed"],
        **fold_args,
    )
    classes = read_classes(Path(manifests["train"]).parent / "classes.txt")
    if len(classes) != hparams["num_classes"]:
        raise RecipeError(
            f"num_classes is {hparams['num_classes']} but the prepared {recipe.name} data has "
            f"{len(classes)} classes; set --num_classes={len(classes)}"
        )
    datasets = build_datasets(manifests, classes, input_loader(hparams, output_folder / FEATURE_CACHE))

    model = hparams["model"]
    if hparams["spec_augment"]:
        add_spec_augment(model, hparams["freq_mask"], hparams["time_mask"])
    brain = PETLBrain(
        modules={"model": model},
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
        metrics=recipe.metrics,
        extra_loggers=extra_train_loggers(hparams),
    )
    train_loader = brain.make_train_loader(datasets["train"])
    brain.fit(
        hparams["epoch_counter"],
        train_loader,
        datasets["valid"],
        valid_loader_kwargs=hparams["test_dataloader_options"],
    )
    brain.evaluate(
        datasets["test"],
        max_key=hparams["selection_metric"],
        test_loader_kwargs=dict(hparams["test_dataloader_options"]),
    )
    best = brain.best_checkpoint()
    groups = model.trainable_parameter_groups()
    return {
        "fold": fold,
        "epoch": best.meta["epoch"] if best else None,
        "valid": {name: best.meta[name] for name in ("loss", *recipe.metrics)} if best else None,
        "test": brain.test_stats,
        "classes": classes,
        "train_items": len(datasets["train"]),
        "parameters": {
            "trainable": sum(groups.values()),
            "trainable_groups": groups,
            "backbone": model.backbone_parameters(),
        },
    }


def _mean_std(results: Sequence[dict], split: str, names: Sequence[str]) -> tuple[dict, dict]:
    values = {name: [result[split][name] for result in results if result[split]] for name in names}
    mean = {name: statistics.fmean(v) for name, v in values.items() if v}
    std = {name: statistics.pstdev(v) for name, v in values.items() if v}
    return mean, std


def aggregate(recipe: DatasetRecipe, settings: Mapping, results: Mapping[str, dict], debug: bool) -> dict:
    """The content of results.json: per-fold results, mean/std over folds, parameters and provenance."""
    names = ("loss", *recipe.metrics)
    ordered = [results[key] for key in sorted(results, key=lambda k: (len(k), k))]
    summary_mean, summary_std = {}, {}
    for split in ("valid", "test"):
        summary_mean[split], summary_std[split] = _mean_std(ordered, split, names)
    parameters = dict(ordered[0]["parameters"]) if ordered else {}
    if parameters:
        parameters["trainable_percent"] = 100.0 * parameters["trainable"] / parameters["backbone"]
    all_folds = [str(k) for k in recipe.folds] if recipe.folds else ["official"]
    return {
        "dataset": recipe.name,
        "method": settings.get("method_name"),
        "backbone": settings.get("backbone"),
        "backbone_source": settings.get("backbone_source"),
        "few_shot_samples": settings.get("few_shot_samples"),
        "seed": settings.get("seed"),
        "number_of_epochs": settings.get("number_of_epochs"),
        "git_revision": git_revision(),
        "debug": debug,
        "parameters": parameters,
        "folds": dict(zip((str(r["fold"] or "official") for r in ordered), ordered)),
        "folds_missing": [k for k in all_folds if k not in results],
        "mean": summary_mean,
        "std": summary_std,
    }


def _plain(value: object) -> object:
    """Command-line and YAML scalars as Python values (ruamel's tagged scalars become str)."""
    return value if isinstance(value, (int, float, bool, type(None))) else str(value)


def run(recipe: DatasetRecipe, argv: Sequence[str] | None = None) -> dict:
    """Run the recipe's folds as asked on the command line; returns the results.json content."""
    param_file, run_opts, override_text = sb.parse_arguments(list(sys.argv[1:] if argv is None else argv))
    overrides = parse_overrides(override_text)
    tree = compose(param_file)
    check_overrides(tree, overrides, param_file)  # before any model is built
    settings = {
        key: _plain(value) for key, value in {**tree, **overrides}.items() if not isinstance(value, (Mapping, list))
    }
    for required in ("data_folder", "output_folder"):
        if required not in overrides:
            raise RecipeError(f"--{required}=DIR is required")
    data_folder = Path(str(overrides["data_folder"]))
    if not data_folder.is_dir():
        raise RecipeError(f"--data_folder: {data_folder} is not a folder; give the {recipe.name} dataset root")
    output_folder = Path(str(overrides["output_folder"]))
    debug = bool(run_opts["debug"])

    results: dict[str, dict] = {}
    for fold in select_folds(recipe, settings.get("fold", "all")):
        run_folder = output_folder / f"fold{fold}" if fold is not None else output_folder
        key = str(fold or "official")
        done = run_folder / FOLD_RESULT
        if done.is_file():
            logger.info("%s: fold %s already finished (%s), skipped", recipe.name, key, done)
            results[key] = json.loads(done.read_text())
            continue
        results[key] = run_fold(
            recipe, param_file, run_opts, overrides, fold, run_folder, output_folder, int(settings["seed"])
        )
        if not debug:  # debug runs use throw-away checkpoints: never mark them finished
            write_json_atomic(done, results[key])
    for other in recipe.folds:  # folds finished by other invocations (e.g. one job per fold)
        done = output_folder / f"fold{other}" / FOLD_RESULT
        if str(other) not in results and done.is_file():
            results[str(other)] = json.loads(done.read_text())
    summary = aggregate(recipe, settings, results, debug)
    write_json_atomic(output_folder / RESULTS, summary)
    logger.info("%s results written to %s", recipe.name, output_folder / RESULTS)
    return summary


USER_ERRORS = (HparamsError, RecipeError, DataPreparationError, AudioError, BackboneLoadError)


def main(recipe: DatasetRecipe, argv: Sequence[str] | None = None) -> dict:
    """`run`, with user errors reported as one line on stderr and exit status 1 (no traceback)."""
    try:
        return run(recipe, argv)
    except USER_ERRORS as error:
        sys.exit(f"{recipe.name} recipe: error: {error}")
