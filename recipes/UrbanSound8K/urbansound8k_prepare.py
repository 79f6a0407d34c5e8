"""UrbanSound8K: manifests for one of the 10 official folds.

Fold `k` tests on fold k. The original protocol has no validation set and
the reference code selected models on the test fold; here validation is fold
`k % 10 + 1`, taken out of the nine training folds, and train is the
remaining eight, so the test fold is never seen before testing.
Labels are the `class` names (10 classes).
Usage: `python urbansound8k_prepare.py DATA_FOLDER SAVE_FOLDER [--fold K]`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from petl_modules.data import (
    assign_splits,
    audio_row,
    prepare_cli,
    prepare_dataset,
    read_metadata_csv,
    rotation_split,
)

DATASET = "UrbanSound8K"
NUM_FOLDS = 10
EXPECTED = "the official layout <data_folder>/metadata/UrbanSound8K.csv and <data_folder>/audio/fold<k>/"


def prepare_urbansound8k(
    data_folder: str | os.PathLike,
    save_folder: str | os.PathLike,
    fold: int,
    few_shot_samples: int | None = None,
    seed: int = 10,
) -> dict[str, Path]:
    """Write (or reuse) the manifests of fold `fold` in `save_folder/fold<k>`."""
    plan = rotation_split(fold, NUM_FOLDS)

    def collect(root: Path) -> dict[str, list[dict[str, Any]]]:
        listed_in = root / "metadata" / "UrbanSound8K.csv"
        items = read_metadata_csv(listed_in, DATASET, ("slice_file_name", "fold", "class"), EXPECTED)
        rows = [
            audio_row(
                DATASET,
                listed_in,
                Path(item["slice_file_name"]).stem,
                root / "audio" / f"fold{item['fold']}" / item["slice_file_name"],
                item["class"],
                fold=item["fold"],
            )
            for item in items
        ]
        return assign_splits(rows, "fold", plan, str(listed_in))

    return prepare_dataset(
        DATASET, data_folder, save_folder, EXPECTED, collect, fold=fold, few_shot_samples=few_shot_samples, seed=seed
    )


if __name__ == "__main__":
    prepare_cli(prepare_urbansound8k, __doc__, num_folds=NUM_FOLDS)
