"""The dataset-independent half of every `recipes/<DS>/<ds>_prepare.py` script.

Each script only knows how to list its dataset's items per split; checking the
inputs, few-shot sampling of train, choosing the output folder, reuse and the
command line are the same for all five and live here.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from petl_modules.data.manifest import prepare_once, require_dir
from petl_modules.data.splits import check_few_shot, few_shot_sample

__all__ = ["prepare_cli", "prepare_dataset"]

# Bump when the manifest format changes so old preparations are rebuilt.
_FORMAT_VERSION = 1

Collect = Callable[[Path], dict[str, list[dict[str, Any]]]]


def prepare_dataset(
    dataset: str,
    data_folder: str | os.PathLike,
    save_folder: str | os.PathLike,
    expected: str,
    collect: Collect,
    *,
    fold: int | None = None,
    few_shot_samples: int | None = None,
    seed: int = 10,
    extra_options: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Prepare (or reuse) the train/valid/test manifests of one dataset.

    `collect(data_root)` returns the full rows of every split; few-shot
    sampling then keeps `few_shot_samples` items per class of train only.
    Folded protocols write into `save_folder/fold<k>` so that all folds can
    be prepared side by side. `expected` describes the official layout for
    error messages. `extra_options` (JSON values) join the recorded options,
    so a preparation is rebuilt when one of them changes.
    """
    root = require_dir(data_folder, dataset, expected)
    if few_shot_samples is not None:
        check_few_shot(few_shot_samples)
    folder = Path(save_folder) / f"fold{fold}" if fold is not None else Path(save_folder)
    options = {
        "dataset": dataset,
        "data_folder": str(root),
        "fold": fold,
        "few_shot_samples": few_shot_samples,
        "seed": seed,
        "format_version": _FORMAT_VERSION,
        **(extra_options or {}),
    }

    def build() -> dict[str, list[dict[str, Any]]]:
        splits = collect(root)
        if few_shot_samples is not None:
            splits["train"] = few_shot_sample(splits["train"], few_shot_samples, seed)
        return splits

    return prepare_once(folder, options, build)


def prepare_cli(
    prepare: Callable[..., dict[str, Path]],
    description: str | None,
    num_folds: int | None = None,
    argv: Sequence[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> dict[str, Path]:
    """Run `prepare` from the command line: `DATA_FOLDER SAVE_FOLDER [--fold K]`.

    `add_arguments(parser)` declares a dataset's own options, passed to `prepare` by name.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("data_folder", help="root of the dataset in its official layout")
    parser.add_argument("save_folder", help="where manifests are written")
    if num_folds is not None:
        parser.add_argument("--fold", type=int, default=1, choices=range(1, num_folds + 1))
    parser.add_argument("--few_shot_samples", type=int, default=None, help="K items per class in train")
    parser.add_argument("--seed", type=int, default=10, help="seed of the few-shot sample")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    manifests = prepare(**vars(args))
    for split, path in manifests.items():
        print(f"{split}: {path}")
    return manifests
