"""ESC-50: manifests for one of the 5 cross-validation rotations.

Fold `k` tests on fold k, validates on the fold before it (`(k - 2) % 5 + 1`,
the reference's rotations) and trains on the other three; labels are the
`category` names (50 classes).
Usage: `python esc50_prepare.py DATA_FOLDER SAVE_FOLDER [--fold K]`.
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

DATASET = "ESC-50"
NUM_FOLDS = 5
EXPECTED = "the official layout <data_folder>/meta/esc50.csv and <data_folder>/audio/"


def prepare_esc50(
    data_folder: str | os.PathLike,
    save_folder: str | os.PathLike,
    fold: int,
    few_shot_samples: int | None = None,
    seed: int = 10,
) -> dict[str, Path]:
    """Write (or reuse) the manifests of rotation `fold` in `save_folder/fold<k>`."""
    plan = rotation_split(fold, NUM_FOLDS, valid="previous")

    def collect(root: Path) -> dict[str, list[dict[str, Any]]]:
        listed_in = root / "meta" / "esc50.csv"
        items = read_metadata_csv(listed_in, DATASET, ("filename", "fold", "category"), EXPECTED)
        rows = [
            audio_row(
                DATASET,
                listed_in,
                Path(item["filename"]).stem,
                root / "audio" / item["filename"],
                item["category"],
                fold=item["fold"],
            )
            for item in items
        ]
        return assign_splits(rows, "fold", plan, str(listed_in))

    return prepare_dataset(
        DATASET, data_folder, save_folder, EXPECTED, collect, fold=fold, few_shot_samples=few_shot_samples, seed=seed
    )


if __name__ == "__main__":
    prepare_cli(prepare_esc50, __doc__, num_folds=NUM_FOLDS)
