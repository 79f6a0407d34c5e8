"""SpeechBrain-style CSV manifests, written atomically and reused only when valid.

A preparation folder holds one CSV per split, `classes.txt` and, written last,
`prepare_options.json`. The options file is the commit marker: a run that
crashes half way leaves no options file, so the next run rebuilds everything
instead of trusting a half-written folder.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from petl_modules.atomic import write_text_atomic
from petl_modules.data.audio import audio_info

__all__ = [
    "CLASSES_FILE",
    "OPTIONS_FILE",
    "REQUIRED_COLUMNS",
    "DataPreparationError",
    "audio_row",
    "prepare_once",
    "read_classes",
    "read_manifest",
    "read_metadata_csv",
    "require_dir",
    "write_manifest",
]

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("ID", "duration", "wav", "label")
CLASSES_FILE = "classes.txt"
OPTIONS_FILE = "prepare_options.json"


class DataPreparationError(ValueError):
    """The dataset on disk does not match what a preparation expects."""


def write_manifest(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write `rows` as a CSV readable by `DynamicItemDataset.from_csv`.

    Columns follow the first row; every row must have the same keys, the
    required columns and a unique `ID`, because SpeechBrain keys items by ID.
    """
    path = Path(path)
    if not rows:
        raise DataPreparationError(f"{path}: refusing to write an empty manifest")
    columns = list(rows[0])
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataPreparationError(f"{path}: rows lack required column(s) {missing}")
    seen: set[str] = set()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        if list(row) != columns:
            raise DataPreparationError(f"{path}: row {row.get('ID')!r} has columns {list(row)}, expected {columns}")
        if row["ID"] in seen:
            raise DataPreparationError(f"{path}: duplicate ID {row['ID']!r}")
        seen.add(row["ID"])
        writer.writerow(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, buffer.getvalue())
    return path


def read_manifest(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read a manifest back as a list of string dicts, in file order."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def read_classes(path: str | os.PathLike) -> list[str]:
    """Read `classes.txt`: one label per line, line `i` is class index `i`."""
    return Path(path).read_text(encoding="utf-8").splitlines()


def require_dir(folder: str | os.PathLike, dataset: str, expected: str) -> Path:
    """Return the absolute dataset root, or stop with what was expected there."""
    root = Path(os.path.abspath(folder))
    if not root.is_dir():
        raise DataPreparationError(f"{dataset}: data folder {root} not found; expected {expected}")
    if not any(root.iterdir()):
        raise DataPreparationError(f"{dataset}: data folder {root} is empty; expected {expected}")
    return root


def read_metadata_csv(path: Path, dataset: str, columns: Iterable[str], expected: str) -> list[dict[str, str]]:
    """Read an official metadata CSV, failing early on a wrong or empty file."""
    if not path.is_file():
        raise DataPreparationError(f"{dataset}: {path} not found; expected {expected}")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        found = reader.fieldnames or []
    missing = [c for c in columns if c not in found]
    if missing:
        raise DataPreparationError(f"{dataset}: {path} lacks column(s) {missing}; found {list(found)}")
    if not rows:
        raise DataPreparationError(f"{dataset}: {path} has a header but no rows")
    return rows


def audio_row(dataset: str, listed_in: Path, utt_id: str, wav: Path, label: str, **extra: str) -> dict[str, Any]:
    """Build one manifest row, reading the duration from the file header.

    Stops on the first file the metadata lists but the disk lacks, naming both.
    """
    if not wav.is_file():
        raise DataPreparationError(f"{dataset}: audio file {wav} listed in {listed_in} not found")
    frames, sample_rate = audio_info(wav)
    return {
        "ID": utt_id,
        "duration": frames / sample_rate,
        "wav": str(wav),
        "label": label,
        **extra,
    }


def _normalise(options: Mapping[str, Any]) -> dict[str, Any]:
    """Compare options as they will read back from JSON (tuples become lists...)."""
    return json.loads(json.dumps(options, sort_keys=True))


def _reusable(folder: Path, options: dict[str, Any]) -> dict[str, Path] | None:
    """Return the recorded manifests if they were built with `options` and all exist."""
    try:
        record = json.loads((folder / OPTIONS_FILE).read_text(encoding="utf-8"))
        if record["options"] != options:
            return None
        files = [folder / name for name in record["files"]]
        manifests = {split: folder / name for split, name in record["manifests"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not all(f.is_file() for f in files):
        return None
    return manifests


def prepare_once(
    save_folder: str | os.PathLike,
    options: Mapping[str, Any],
    build: Callable[[], Mapping[str, Sequence[Mapping[str, Any]]]],
) -> dict[str, Path]:
    """Write `<split>.csv` for each split `build` returns, unless already done.

    The folder is reused only when its options file records the same
    `options` and every file it lists exists; otherwise the options file is
    removed first, everything is rewritten and the options file comes last.
    `classes.txt` lists the sorted union of labels over all splits.
    """
    folder = Path(save_folder)
    wanted = _normalise(options)
    reused = _reusable(folder, wanted)
    if reused is not None:
        logger.info("Reusing data preparation in %s", folder)
        return reused
    logger.info("Preparing data in %s", folder)
    splits = build()  # reads and checks the data: a wrong layout stops here, before anything is written
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OPTIONS_FILE).unlink(missing_ok=True)
    manifests: dict[str, Path] = {}
    labels: set[str] = set()
    for split, rows in splits.items():
        if not rows:
            raise DataPreparationError(f"split {split!r} is empty; nothing to write in {folder}")
        manifests[split] = write_manifest(folder / f"{split}.csv", rows)
        labels.update(str(row["label"]) for row in rows)
    write_text_atomic(folder / CLASSES_FILE, "".join(f"{label}\n" for label in sorted(labels)))
    record = {
        "options": wanted,
        "manifests": {split: path.name for split, path in manifests.items()},
        "files": [path.name for path in manifests.values()] + [CLASSES_FILE],
    }
    write_text_atomic(folder / OPTIONS_FILE, json.dumps(record, indent=2) + "\n")
    return manifests
