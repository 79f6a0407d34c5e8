"""Fluent Speech Commands: manifests for the official train/valid/test CSVs.

The label is the intent `<action>_<object>_<location>` (31 intents).
Usage: `python fsc_prepare.py DATA_FOLDER SAVE_FOLDER [--few_shot_samples K]`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from petl_modules.data import audio_row, prepare_cli, prepare_dataset, read_metadata_csv

DATASET = "FSC"
EXPECTED = "the official layout <data_folder>/data/{train,valid,test}_data.csv and <data_folder>/wavs/speakers/"
COLUMNS = ("path", "speakerId", "action", "object", "location")


def _collect(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Read all three CSVs before any audio header, so layout errors come first."""
    tables = {}
    for split in ("train", "valid", "test"):
        listed_in = root / "data" / f"{split}_data.csv"
        tables[split] = (listed_in, read_metadata_csv(listed_in, DATASET, COLUMNS, EXPECTED))
    return {
        split: [
            audio_row(
                DATASET,
                listed_in,
                Path(item["path"]).stem,
                root / item["path"],
                f"{item['action']}_{item['object']}_{item['location']}",
                speaker=item["speakerId"],
            )
            for item in items
        ]
        for split, (listed_in, items) in tables.items()
    }


def prepare_fsc(
    data_folder: str | os.PathLike,
    save_folder: str | os.PathLike,
    few_shot_samples: int | None = None,
    seed: int = 10,
) -> dict[str, Path]:
    """Write (or reuse) FSC manifests in `save_folder`; returns `{split: csv path}`."""
    return prepare_dataset(
        DATASET, data_folder, save_folder, EXPECTED, _collect, few_shot_samples=few_shot_samples, seed=seed
    )


if __name__ == "__main__":
    prepare_cli(prepare_fsc, __doc__)
