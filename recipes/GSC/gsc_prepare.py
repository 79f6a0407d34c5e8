"""Google Speech Commands v2 (35 words): manifests for the official split.

Valid and test are `validation_list.txt` and `testing_list.txt`; train is
every other wav in the word folders. `_background_noise_` is not a word.
Usage: `python gsc_prepare.py DATA_FOLDER SAVE_FOLDER [--few_shot_samples K]`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from petl_modules.data import DataPreparationError, audio_row, prepare_cli, prepare_dataset

DATASET = "GSC"
EXPECTED = (
    "the official speech_commands_v0.02 layout: one folder per word plus "
    "<data_folder>/validation_list.txt and <data_folder>/testing_list.txt"
)
LISTS = {"valid": "validation_list.txt", "test": "testing_list.txt"}


def _read_list(path: Path) -> list[str]:
    """Read a split list of `word/file.wav` entries, skipping blank lines."""
    if not path.is_file():
        raise DataPreparationError(f"{DATASET}: {path} not found; expected {EXPECTED}")
    entries = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    entries = [entry for entry in entries if entry]
    if not entries:
        raise DataPreparationError(f"{DATASET}: {path} lists no files")
    malformed = next((entry for entry in entries if entry.count("/") != 1), None)
    if malformed is not None:
        raise DataPreparationError(f"{DATASET}: {path}: entry {malformed!r} is not word/file.wav")
    return entries


def _row(root: Path, listed_in: Path, entry: str) -> dict[str, Any]:
    """Build one item's row, with ID `<word>_<file stem>`.

    File names repeat across words; words have no underscore, so these IDs are
    unique, and unlike `word/file` they are safe in file names.
    """
    word, name = entry.split("/")
    return audio_row(DATASET, listed_in, f"{word}_{Path(name).stem}", root / entry, word)


def _collect(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Read both lists before any audio header, so layout errors come first."""
    held_out = {split: _read_list(root / name) for split, name in LISTS.items()}
    words = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(("_", ".")))
    if not words:
        raise DataPreparationError(f"{DATASET}: no word folders in {root}; expected {EXPECTED}")
    excluded = {entry for entries in held_out.values() for entry in entries}
    train = [
        entry
        for word in words
        for entry in (f"{word}/{wav.name}" for wav in sorted((root / word).glob("*.wav")))
        if entry not in excluded
    ]
    splits = {"train": [_row(root, root, entry) for entry in train]}
    for split, entries in held_out.items():
        splits[split] = [_row(root, root / LISTS[split], entry) for entry in entries]
    return splits


def prepare_gsc(
    data_folder: str | os.PathLike,
    save_folder: str | os.PathLike,
    few_shot_samples: int | None = None,
    seed: int = 10,
) -> dict[str, Path]:
    """Write (or reuse) GSC v2 manifests in `save_folder`; returns `{split: csv path}`."""
    return prepare_dataset(
        DATASET, data_folder, save_folder, EXPECTED, _collect, few_shot_samples=few_shot_samples, seed=seed
    )


if __name__ == "__main__":
    prepare_cli(prepare_gsc, __doc__)
