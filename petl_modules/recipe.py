"""The recipe runtime every `recipes/<DS>/train.py` shares; the flow itself is in train.py, as in SpeechBrain.

    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    sb.utils.distributed.ddp_init_group(run_opts)
    with recipe_errors(DATASET):                                   # user errors: one line, exit status 1
        plan = RecipePlan(DATASET, hparams_file, overrides, run_opts, FOLDS, METRICS, Path(__file__).parent)
        if plan.debug:
            run_on_main(shutil.rmtree, args=[plan.output_folder], kwargs={"ignore_errors": True})
        ddp_barrier()
        record = RunRecord(plan)
        for fold in plan.folds_to_run():
            settings = plan.fold_settings(fold)
            manifests = run_on_main(prepare_<ds>, kwargs={"data_folder": settings["data_folder"], ...})
            hparams = plan.load_hparams(fold, manifests)           # the data checked against num_classes
            if not plan.test_only:
                sb.create_experiment_directory(experiment_directory=hparams["output_folder"])
                record.record_hyperparams(fold)
            datasets = build_datasets(manifests, input_loader(hparams, plan.feature_cache_folder, ...))
            brain = PETLBrain(...); brain.fit(...); brain.evaluate(...)
            record.finish_fold(fold, brain, manifests)
        record.write_results()

`RecipePlan` is the command composed once and checked, writing nothing; `RunRecord` writes what the command
leaves (rank 0; the other ranks wait). Every operation on the configuration tree is `hparams_loader`'s.

Invariants:
- One training run per fold in `<output_folder>/fold<k>/` (`<output_folder>/` for single-split datasets). A run
  folder holds `hyperparams.yaml` (exactly what ran: loadable by plain `load_hyperpyyaml`), `save/CKPT+*/`,
  `train_log.txt` and, once finished, `fold_result.json`. `<output_folder>/results.json` aggregates every
  finished fold found there (mean and population std over folds), whichever job ran it.
- Honest reruns: a finished fold with the same settings is skipped (the console says where its result is); a
  run folder that trained other settings stops the recipe, naming the keys, before anything is written; more
  `number_of_epochs` alone trains it on. Folds that ran with different settings are never aggregated.
- `--test_only` needs a checkpoint and writes nothing; `--debug` runs in `<output_folder>/debug/`, afresh.
- Under DDP (torchrun) every rank runs the same flow; rank 0 alone writes files, the others wait for it.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import speechbrain as sb
import torch
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.utils.distributed import if_main_process, run_on_main
from speechbrain.utils.seed import seed_everything

from .atomic import follow_umask, write_json_atomic, write_text_atomic
from .backbones import BackboneLoadError
from .backbones.base import OptionError
from .data import (
    CLASSES_FILE,
    AudioError,
    DataPreparationError,
    FeatureCache,
    read_audio,
    read_classes,
    read_manifest,
)
from .data.embedding_cache import EmbeddingCache
from .hparams_checks import RULES, check_settings, one_of
from .hparams_loader import (
    HparamsError,
    compose_tree,
    differing_keys,
    dump_tree,
    load_tree,
    load_yaml,
    parse_overrides,
    placeholders,
    plain,
    resolved_settings,
    value_of,
)
from .linear_cached import recipe_cache_blocker
from .training import BASE_METRICS, MetricFn, missing_optional_packages

logger = logging.getLogger(__name__)

FOLD_RESULT = "fold_result.json"
RESULTS = "results.json"
HYPERPARAMS = "hyperparams.yaml"
MANIFESTS = "manifests"
FEATURE_CACHE = "feature_cache"
DEBUG_FOLDER = "debug"


class RecipeError(ValueError):
    """A command-line value is wrong; the message names the option and what was expected."""


USER_ERRORS = (HparamsError, RecipeError, DataPreparationError, AudioError, BackboneLoadError, OptionError)


TRACEBACK_VARIABLE = "PETL_TRACEBACK"


@contextmanager
def recipe_errors(dataset: str) -> Iterator[None]:
    """User errors as one line on stderr (`<DS> recipe: error: ...`) and exit status 1, no traceback.

    Tracebacks remain for real bugs; `PETL_TRACEBACK=1` in the environment shows them for user errors too.
    """
    try:
        yield
    except USER_ERRORS as error:
        if os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
            raise
        sys.exit(f"{dataset} recipe: error: {error}")


def git_revision(folder: str | Path) -> str | None:
    """The commit of the git checkout holding `folder` (a recipe's own folder), `+dirty` when modified; None
    outside a git checkout.
    """
    git = ["git", "-C", str(folder)]
    try:
        revision = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return revision + ("+dirty" if dirty else "")


def select_folds(dataset: str, folds: Sequence[int], fold: object) -> list[int | None]:
    """`--fold=all` -> every fold; `--fold=K` -> [K]. Single-split datasets (no folds) have one run (None)."""
    if not folds:
        if fold not in ("all", 1):
            raise RecipeError(f"--fold: {dataset} has one official split; expected 'all' or 1, got {fold!r}")
        return [None]
    if fold == "all":
        return list(folds)
    if not isinstance(fold, int) or isinstance(fold, bool) or fold not in folds:
        raise RecipeError(f"--fold: {dataset} folds are {folds[0]}..{folds[-1]} or 'all'; got {fold!r}")
    return [fold]


def fold_key(fold: int | None) -> str:
    return "official" if fold is None else str(fold)


# --- the data pipeline --------------------------------------------------------------------------


def input_loader(hparams: Mapping, cache_folder: Path, read_only: bool = False) -> Callable[[str], torch.Tensor]:
    """What a file becomes: its pooled vector (linear probing, `cache_embeddings`), AST's fbank through the
    feature cache (`cache_features`), else the 16 kHz waveform.

    The pooled vectors (`EmbeddingCache`, valid only where `recipe_cache_blocker` finds nothing) make
    `build_datasets` fill the cache before training and yield `pooled` instead of `sig`; a log line says which
    path runs. `feature_cache_folder` (null: `cache_folder`) may be shared by runs. Under DDP only rank 0
    writes cached features; the other ranks read what is there and compute the rest, as every rank does when
    `read_only` (`--test_only`, which writes nothing).
    """
    read_only = read_only or not if_main_process()
    model = hparams["model"]
    folder = hparams["feature_cache_folder"] or cache_folder
    blocker = recipe_cache_blocker(model, hparams.get("cache_embeddings", False), hparams.get("spec_augment", False))
    if blocker is None:
        logger.info("Linear probing from cached embeddings: the backbone runs once per file (%s)", folder)
        options = hparams["test_dataloader_options"]
        return EmbeddingCache(
            folder,
            model,
            read_only=read_only,
            batch_size=options.get("batch_size", 1),
            num_workers=options.get("num_workers", 0),
        )
    if model.method.name == "linear":
        logger.info("Linear probing runs the backbone every step: %s", blocker)
    backbone = model.backbone
    if not (hparams["cache_features"] and backbone.front_end is not None):
        return read_audio
    front_end = backbone.front_end
    return FeatureCache(folder, front_end.single, front_end.settings(), read_only=read_only)


def fill_device() -> torch.device:
    """Where `build_datasets` fills the embedding cache: this process's GPU when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def build_datasets(
    manifests: Mapping[str, Path], load: Callable[[str], torch.Tensor] = read_audio
) -> dict[str, DynamicItemDataset]:
    """Manifests -> datasets yielding `sig` (what `load` returns for the item's file) and `label_index`.

    `label_index` is the label's line in the `classes.txt` beside the manifests. With an `EmbeddingCache` as
    `load`, the items yield `pooled` instead of `sig` (what the Brain passes to `logits_from_pooled`), and the
    main process fills the cache for every file of every split first (the other ranks wait), and every
    process then keeps the vectors in memory.
    """
    classes = read_classes(Path(manifests["train"]).parent / CLASSES_FILE)
    index = {label: position for position, label in enumerate(classes)}
    input_key = "pooled" if isinstance(load, EmbeddingCache) else "sig"
    if isinstance(load, EmbeddingCache):
        files = [row["wav"] for path in manifests.values() for row in read_manifest(path)]
        run_on_main(load.fill, args=[files], kwargs={"device": fill_device()})
        load.preload(files)

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides(input_key)
    def audio_pipeline(wav: str) -> torch.Tensor:
        return load(wav)

    @sb.utils.data_pipeline.takes("label")
    @sb.utils.data_pipeline.provides("label_index")
    def label_pipeline(label: str) -> int:  # an int, which PaddedBatch collates into a (batch,) tensor
        return index[label]

    return {
        split: DynamicItemDataset.from_csv(
            str(path), dynamic_items=[audio_pipeline, label_pipeline], output_keys=["id", input_key, "label_index"]
        )
        for split, path in manifests.items()
    }


# --- the experiment -----------------------------------------------------------------------------


def find_hparams_file(hparams_file: str | Path, recipe_folder: str | Path | None) -> Path:
    """The hyperparameter file as given, else the same relative path in the recipe's folder (absolute).

    `python recipes/FSC/train.py hparams/lora.yaml` from the repository root then runs exactly as
    `python train.py hparams/lora.yaml` from `recipes/FSC/`. A file found in neither is an error listing the
    recipe's method files.
    """
    path = Path(hparams_file).expanduser()
    candidates = [path]
    if recipe_folder is not None and not path.is_absolute():
        candidates.append(Path(recipe_folder) / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.absolute()
    where = " or ".join(str(candidate.absolute()) for candidate in candidates)
    listed = ""
    if recipe_folder is not None:
        names = [file.stem for file in sorted((Path(recipe_folder) / "hparams").glob("*.yaml"))]
        listed = f"; the recipe's files: {Path(recipe_folder) / 'hparams'}/<{'|'.join(names)}>.yaml"
    raise RecipeError(f"hyperparameter file not found: {where}{listed}")


def check_device(device: object) -> None:
    """`--device=cuda[:N]` needs that CUDA device; anything else is SpeechBrain's to check."""
    if not isinstance(device, str) or not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise RecipeError(f"--device={device}: no CUDA device is available here (PyTorch finds none); use --device=cpu")
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise RecipeError(f"--device={device}: this machine has CUDA devices 0..{torch.cuda.device_count() - 1}")


def check_method(tree: Mapping) -> None:
    """Builds the method block alone (an option object: cheap), so that its option checks run first."""
    if "method" not in tree:
        return
    try:
        value_of(tree, "method")
    except OptionError as error:
        name = str(getattr(getattr(tree["method"], "tag", None), "value", "")).rpartition(".")[2] or "method"
        raise RecipeError(f"{name}: {error} (the method's options: hparams/methods/*.yaml)") from None


def has_checkpoint(save_folder: Path) -> bool:
    return any(save_folder.glob("CKPT+*"))


class RecipePlan:
    """What one recipe command will do, composed once and written nowhere: its settings, the folds it runs and
    each fold's tree, which folds are finished, trained on or waiting to be.

    Everything that can be wrong with the command itself (options and their values, the device, placeholders,
    the data folder, optional packages, reruns with other settings, `--test_only` without checkpoint) is
    checked here, before anything is written; the data is checked against the settings by `load_hparams`,
    before the run is recorded. A run folder's `hyperparams.yaml` binds only once the run has trained (a
    checkpoint or `fold_result.json`): a start that failed earlier is overwritten by the next command. A
    `--debug` run is planned in a fresh `<output_folder>/debug/`, which train.py empties before it starts.
    """

    def __init__(
        self,
        dataset: str,
        hparams_file: str,
        overrides: str | Mapping | None,
        run_opts: Mapping,
        folds: Sequence[int] = (),
        metrics: Mapping[str, MetricFn] | None = None,
        recipe_folder: str | Path | None = None,
    ) -> None:
        self.dataset = dataset
        self.recipe_folder = recipe_folder
        self.hparams_file = str(find_hparams_file(hparams_file, recipe_folder))
        self.folds = tuple(folds)
        self.metrics = {**BASE_METRICS, **(metrics or {})}
        self.debug = bool(run_opts.get("debug"))
        self.test_only = bool(run_opts.get("test_only"))
        check_device(run_opts.get("device"))
        self.overrides = parse_overrides(overrides)
        tree = compose_tree(self.hparams_file, self.overrides)
        missing = placeholders(tree)
        if missing:
            raise RecipeError(f"{missing[0]} is not set: give --{missing[0]}=... or set {missing[0]} in {hparams_file}")
        self.settings = resolved_settings(tree)
        check_settings(self.settings, {**RULES, "selection_metric": one_of(("loss", *self.metrics))})
        check_method(tree)
        data_folder = Path(str(self.settings["data_folder"]))
        if not data_folder.is_dir():
            raise RecipeError(f"--data_folder: {data_folder} is not a folder; give the {dataset} dataset root")
        missing_packages = missing_optional_packages(self.settings)
        if missing_packages:
            raise RecipeError(missing_packages[0])
        output_folder = Path(str(self.settings["output_folder"])).absolute()
        self.output_folder = output_folder / DEBUG_FOLDER if self.debug else output_folder
        self.selected = select_folds(dataset, self.folds, self.settings.get("fold", "all"))
        self.trees = {fold: self._fold_tree(fold) for fold in self.selected}
        if self.debug and self.test_only:
            raise RecipeError("--test_only with --debug: a debug run starts afresh, with no checkpoint to test")
        self.trained_on: dict[int | None, object] = {}  # fold -> the epochs its record ran, when training on
        self.finished = {fold: self._check_rerun(fold) for fold in self.selected}
        self.pending = self._check_other_folds()

    # -- planning

    def run_folder(self, fold: int | None) -> Path:
        return self.output_folder if fold is None else self.output_folder / f"fold{fold}"

    @property
    def feature_cache_folder(self) -> Path:
        """The default feature cache, shared by the folds of this output folder."""
        return self.output_folder / FEATURE_CACHE

    @property
    def manifest_folder(self) -> Path:
        """Where the data preparation writes the manifests (`save_folder` of `prepare_<ds>`)."""
        return self.output_folder / MANIFESTS

    def _fold_tree(self, fold: int | None) -> dict:
        """The tree this fold runs: the command's, with its run folder and fold number."""
        fold_value = "all" if fold is None else fold
        return compose_tree(
            self.hparams_file, {**self.overrides, "output_folder": str(self.run_folder(fold)), "fold": fold_value}
        )

    def _binding_record(self, fold: int | None) -> Mapping | None:
        """The fold's recorded tree if the run trained (a checkpoint or a result), else None.

        A record without either is a start that failed before training: it binds nothing.
        """
        folder = self.run_folder(fold)
        record = folder / HYPERPARAMS
        save_folder = Path(str(resolved_settings(self._fold_tree(fold))["save_folder"]))
        if self.debug or not record.is_file() or not ((folder / FOLD_RESULT).is_file() or has_checkpoint(save_folder)):
            return None
        return load_yaml(record)

    @staticmethod
    def _differences(recorded: Mapping, tree: Mapping) -> list[str]:
        """Keys whose value in a run's record differs from `tree`'s.

        A null `num_classes` (the data's) is compared by `load_hparams`, once the data is prepared.
        """
        differ = differing_keys(recorded, tree)
        return [key for key in differ if not (key == "num_classes" and tree.get("num_classes") is None)]

    @staticmethod
    def _more_epochs(recorded: Mapping, tree: Mapping, differ: Sequence[str]) -> object | None:
        """The recorded `number_of_epochs` when it is the only difference and the tree asks for more, else None."""
        if list(differ) != ["number_of_epochs"]:
            return None
        before, after = value_of(recorded, "number_of_epochs"), value_of(tree, "number_of_epochs")
        return before if isinstance(before, int) and isinstance(after, int) and after > before else None

    def _check_rerun(self, fold: int | None) -> bool:
        """True when the fold is finished with these settings; an error when its folder trained other settings.

        More `number_of_epochs` than recorded, and nothing else changed, trains the run on (`trained_on`).
        """
        folder = self.run_folder(fold)
        recorded = self._binding_record(fold)
        if recorded is not None:
            differ = self._differences(recorded, self.trees[fold])
            before = self._more_epochs(recorded, self.trees[fold], differ)
            if before is not None and not self.test_only:
                self.trained_on[fold] = before
            elif differ:
                raise RecipeError(
                    f"{folder} ran with other settings ({', '.join(differ)} differ from {folder / HYPERPARAMS}); "
                    "rerun with the recorded values (more --number_of_epochs trains it on) or choose another "
                    "--output_folder"
                )
        if self.test_only:
            save_folder = Path(str(resolved_settings(self.trees[fold])["save_folder"]))
            if not has_checkpoint(save_folder):
                raise RecipeError(f"--test_only: no checkpoint in {save_folder}; train first (without --test_only)")
            return False
        return recorded is not None and fold not in self.trained_on and (folder / FOLD_RESULT).is_file()

    def _check_other_folds(self) -> set[int]:
        """Folds finished by other jobs in this output folder must have run this command's settings.

        A fold that ran fewer `number_of_epochs` and nothing else different is waiting to be trained on: it is
        returned, and left out of results.json until it is.
        """
        pending = set()
        for fold in self.folds:
            if fold in self.selected or not (self.run_folder(fold) / FOLD_RESULT).is_file():
                continue
            recorded = self._binding_record(fold)
            tree = self._fold_tree(fold)
            differ = self._differences(recorded, tree) if recorded is not None else []
            if differ and self._more_epochs(recorded, tree, differ) is not None:
                pending.add(fold)
            elif differ:
                raise RecipeError(
                    f"fold {fold} in {self.output_folder} ran with other settings ({', '.join(differ)} differ); "
                    "its results would be aggregated with these: choose another --output_folder"
                )
        return pending

    def folds_to_run(self) -> Iterator[int | None]:
        """The selected folds that still need training (all of them with `--test_only`)."""
        for fold in self.selected:
            if self.finished[fold]:
                say(
                    f"{self.dataset}: {self.run_folder(fold)} is finished with these settings: "
                    f"{self.run_folder(fold) / FOLD_RESULT}, aggregated in {self.output_folder / RESULTS}"
                )
                continue
            yield fold

    # -- one fold

    def fold_settings(self, fold: int | None) -> dict:
        """The fold's top-level values, resolved but not instantiated: what the data preparation takes."""
        return resolved_settings(self.trees[fold])

    def load_hparams(self, fold: int | None, manifests: Mapping[str, Path]) -> dict:
        """The fold's hyperparameters, instantiated after seeding (every fold starts from the same init).

        First the prepared data is checked against `num_classes` (a null `num_classes` becomes the data's class
        count, which `record_hyperparams` then records); nothing has been written into the run folder yet.
        """
        count = len(read_classes(Path(manifests["train"]).parent / CLASSES_FILE))
        num_classes = self.fold_settings(fold).get("num_classes")
        if num_classes is None:
            self._num_classes_from_data(fold, count)
        elif num_classes != count:
            raise RecipeError(
                f"num_classes is {num_classes} but the prepared {self.dataset} data has {count} classes; "
                f"set --num_classes={count}"
            )
        seed_everything(int(self.settings["seed"]))
        return load_tree(self.trees[fold])

    def _num_classes_from_data(self, fold: int | None, count: int) -> None:
        """The fold's null `num_classes` becomes the data's `count`; a run folder that trained another stops."""
        recorded = (self._binding_record(fold) or {}).get("num_classes")
        if recorded is not None and recorded != count:
            raise RecipeError(
                f"{self.run_folder(fold)} trained {recorded} classes but the prepared {self.dataset} data has "
                f"{count}; choose another --output_folder"
            )
        self.trees[fold]["num_classes"] = count


class RunRecord:
    """What one recipe command writes, on rank 0 (the other ranks wait): each fold's `hyperparams.yaml` before
    it trains, its `fold_result.json` once tested, and `<output_folder>/results.json` over the finished folds.
    Under `--test_only` nothing is written.
    """

    def __init__(self, plan: RecipePlan) -> None:
        self.plan = plan

    def record_hyperparams(self, fold: int | None) -> None:
        """`<run>/hyperparams.yaml`: the tree that runs, self-contained (rank 0; not under `--test_only`).

        Training on first takes the fold's result out of results.json (the run is not finished any more). The
        copy of train.py that `sb.create_experiment_directory` made gets the umask's mode.
        """
        if self.plan.test_only:
            return
        folder = self.plan.run_folder(fold)
        header = (
            f"What ran in {folder}: {self.plan.hparams_file} with its `extends:` and the command-line\n"
            "options merged. Self-contained: hyperpyyaml.load_hyperpyyaml loads it and train.py runs it unchanged."
        )
        if fold in self.plan.trained_on:
            before = self.plan.trained_on[fold]
            header += (
                f"\nTrained on: epochs 1-{before} ran first (their own learning-rate schedule); the added epochs "
                "follow a new cosine from lr to 0, without warm-up."
            )
            say(f"{self.plan.dataset}: training {folder} on from {before} epochs (a new cosine over the added epochs)")
            run_on_main(self._reopen, args=[fold])
        run_on_main(write_text_atomic, args=[folder / HYPERPARAMS, dump_tree(self.plan.trees[fold], header)])
        if (folder / "train.py").is_file():  # SpeechBrain's copy of the script keeps the source's mode
            run_on_main(follow_umask, args=[folder / "train.py"])

    def _reopen(self, fold: int | None) -> None:
        """A finished fold trained on: its result leaves the folder and results.json until it finishes again."""
        (self.plan.run_folder(fold) / FOLD_RESULT).unlink(missing_ok=True)
        results = self.finished_results()
        if results:
            write_json_atomic(self.plan.output_folder / RESULTS, self._aggregate(results))
        else:
            (self.plan.output_folder / RESULTS).unlink(missing_ok=True)

    def finish_fold(self, fold: int | None, brain, manifests: Mapping[str, Path]) -> dict:
        """This fold's result; written to `<run>/fold_result.json` by rank 0 unless `--test_only`."""
        best = brain.best_checkpoint()
        if best is None:
            raise RecipeError(f"{self.plan.run_folder(fold)}: no validated checkpoint; nothing was trained")
        model = brain.hparams.model
        groups = model.trainable_parameter_groups()
        folder = self.plan.run_folder(fold)
        result = {
            "fold": fold,
            "method": model.method.display_name,
            "epoch": best.meta["epoch"],
            "valid": {name: best.meta[name] for name in ("loss", *self.plan.metrics)},
            "test": brain.test_stats,
            "classes": read_classes(Path(manifests["train"]).parent / CLASSES_FILE),
            "train_items": len(read_manifest(manifests["train"])),
            "lr_schedule": brain.lr_schedule_epochs(),
            "parameters": {
                "trainable": sum(groups.values()),
                "trainable_groups": groups,
                "backbone": model.backbone_parameters(),
            },
            "settings": {
                key: plain(value)
                for key, value in vars(brain.hparams).items()
                if isinstance(value, (str, int, float, bool, type(None)))
                and key != "fold"
                and not (isinstance(value, str) and value.startswith(str(folder)))
            },
        }
        if self.plan.test_only:
            accuracy = 100 * brain.test_stats["accuracy"]
            say(f"{self.plan.dataset}: test only, nothing written; test set of {folder}: {brain.test_stats}")
            say(f"{self.plan.dataset} {result['method']}: test accuracy {accuracy:.2f} % (epoch {result['epoch']})")
        else:
            run_on_main(write_json_atomic, args=[folder / FOLD_RESULT, result])
        return result

    # -- results.json

    def finished_results(self) -> dict[str, dict]:
        """The finished folds under the output folder (this command's and other jobs'), by fold key.

        Folds waiting to be trained on (`pending`) are left out.
        """
        folds = self.plan.folds or (None,)
        results = {}
        for fold in folds:
            done = self.plan.run_folder(fold) / FOLD_RESULT
            if done.is_file() and fold not in self.plan.pending:
                results[fold_key(fold)] = json.loads(done.read_text(encoding="utf-8"))
        return results

    def _aggregate(self, results: Mapping[str, dict]) -> dict:
        revision = git_revision(self.plan.recipe_folder or Path(self.plan.hparams_file).parent)
        return aggregate(self.plan.dataset, self.plan.folds, self.plan.metrics, results, self.plan.debug, revision)

    def write_results(self) -> dict | None:
        """Aggregate the finished folds into `<output_folder>/results.json` (written by rank 0); None if none.

        Every rank aggregates (so an error stops every rank alike); rank 0 writes. The last line printed is the
        test accuracy in % (mean and population std over the folds of a folded protocol).
        """
        if self.plan.test_only:
            return None
        results = self.finished_results()
        if not results:
            return None
        summary = self._aggregate(results)
        run_on_main(write_json_atomic, args=[self.plan.output_folder / RESULTS, summary])
        say(f"{self.plan.dataset}: results of {len(results)} fold(s) in {self.plan.output_folder / RESULTS}")
        for fold in sorted(self.plan.pending):
            say(f"{self.plan.dataset}: fold {fold} ran fewer epochs; train it on (--fold={fold}) to aggregate it")
        say(accuracy_line(summary))
        return summary


def say(message: str) -> None:
    """A line on the console, from rank 0 only."""
    if if_main_process():
        print(message, flush=True)


def accuracy_line(summary: Mapping) -> str:
    """`GSC lora: test accuracy 93.25 %`, or `ESC50 lora: test accuracy 81.00 ± 2.10 % over 5 folds`."""
    name = f"{summary['dataset']} {summary['method']}"
    mean, std = 100 * summary["mean"]["test"]["accuracy"], 100 * summary["std"]["test"]["accuracy"]
    folds = len(summary["folds"])
    if not summary["folds_missing"] and folds == 1:
        return f"{name}: test accuracy {mean:.2f} %"
    of = f" of {folds + len(summary['folds_missing'])}" if summary["folds_missing"] else ""
    return f"{name}: test accuracy {mean:.2f} ± {std:.2f} % over {folds}{of} folds"


def _mean_std(results: Sequence[dict], split: str, names: Sequence[str]) -> tuple[dict, dict]:
    values = {name: [result[split][name] for result in results if result[split]] for name in names}
    mean = {name: statistics.fmean(v) for name, v in values.items() if v}
    std = {name: statistics.pstdev(v) for name, v in values.items() if v}
    return mean, std


def common_settings(results: Mapping[str, dict]) -> dict:
    """The settings the folds ran with; folds that ran with different settings cannot be aggregated."""
    items = list(results.items())
    first_key, first = items[0]
    settings = first.get("settings", {})
    for key, result in items[1:]:
        other = result.get("settings", {})
        differ = sorted(name for name in set(settings) | set(other) if settings.get(name) != other.get(name))
        if differ:
            raise RecipeError(
                f"fold {key} and fold {first_key} ran with different settings ({', '.join(differ)}); "
                "give each experiment its own --output_folder"
            )
    return settings


def aggregate(
    dataset: str,
    folds: Sequence[int],
    metrics: Mapping[str, MetricFn],
    results: Mapping[str, dict],
    debug: bool,
    git_revision: str | None = None,
) -> dict:
    """The content of results.json: per-fold results, mean/std over folds, parameters and provenance.

    Settings come from the folds' own records, never from the command that aggregates them.
    """
    names = ("loss", *metrics)
    ordered = [results[key] for key in sorted(results, key=lambda k: (len(k), k))]
    settings = common_settings(results)
    summary_mean, summary_std = {}, {}
    for split in ("valid", "test"):
        summary_mean[split], summary_std[split] = _mean_std(ordered, split, names)
    parameters = dict(ordered[0]["parameters"])
    parameters["trainable_percent"] = 100.0 * parameters["trainable"] / parameters["backbone"]
    all_folds = [str(k) for k in folds] if folds else ["official"]
    return {
        "dataset": dataset,
        "method": ordered[0].get("method", settings.get("method_name")),
        "backbone": settings.get("backbone"),
        "backbone_source": settings.get("backbone_source"),
        "few_shot_samples": settings.get("few_shot_samples"),
        "seed": settings.get("seed"),
        "number_of_epochs": settings.get("number_of_epochs"),
        "git_revision": git_revision,
        "debug": debug,
        "parameters": parameters,
        "folds": {fold_key(r["fold"]): r for r in ordered},
        "folds_missing": [k for k in all_folds if k not in results],
        "mean": summary_mean,
        "std": summary_std,
        "settings": settings,
    }
