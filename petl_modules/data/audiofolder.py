"""Your own data as recipe manifests: a folder of class sub-folders, or a CSV of `path,label[,split]`.

Two layouts, chosen by `csv_file`:

- **class folders** (`csv_file` None): every non-hidden sub-folder of the data folder is a class; its
  audio files (`.wav .flac .ogg .mp3`, any depth below it) are the class's items. Other files are ignored.
- **CSV** (`csv_file` given, relative to the data folder or absolute): columns `path` and `label`, and
  optionally `split` (`train`, `valid` / `validation` / `dev`, `test`); paths are relative to the
  CSV's folder.

Splits come, in this order of precedence, from the CSV's `split` column (every row has one), from the split
lists `valid_list` / `test_list` (one relative path per line, like Speech Commands' lists: listed items go
to that split, the rest to train), or are drawn by `stratified_split`: seeded by `split_seed` (not by
the training seed, so runs of several seeds share one test set), per class, `round(fraction * n)` but at
least one item to each drawn split and at least one left to train. A split without a list is drawn from the
unlisted items. Every class of valid and test must also be in train.

Invariants: item IDs are the relative paths with `/` replaced by `__` (unique, safe in file names); the
preparation is rebuilt when the options or the listing (paths, labels, splits, file sizes) change; the class
order is `classes.txt`'s (sorted labels), so `num_classes` comes from the data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from petl_modules.data.manifest import DataPreparationError, audio_row, read_metadata_csv, require_dir
from petl_modules.data.prepare import prepare_dataset

__all__ = [
    "AUDIO_EXTENSIONS",
    "DATASET",
    "collect_items",
    "prepare_audiofolder",
    "stratified_split",
]

DATASET = "AudioFolder"
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
SPLIT_NAMES = {"train": "train", "valid": "valid", "validation": "valid", "dev": "valid", "test": "test"}
EXPECTED = (
    "one sub-folder per class holding .wav/.flac/.ogg/.mp3 files, or --csv_file=FILE with the columns "
    "path,label[,split] (paths relative to the CSV)"
)


@dataclass(frozen=True)
class Item:
    """One audio file of the data, before its header is read."""

    rel: str  # POSIX path relative to the layout's base (data folder, or the CSV's folder)
    path: Path
    label: str
    split: str | None  # from the CSV's split column, else None
    listed_in: Path  # the data folder or the CSV, for error messages

    @property
    def uid(self) -> str:
        return self.rel.replace("/", "__")


def _fail(message: str) -> DataPreparationError:
    return DataPreparationError(f"{DATASET}: {message}")


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _scan_class_folders(root: Path) -> list[Item]:
    """Items of the class-folder layout, classes and files in sorted order."""
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise _fail(f"no class folders in {root}; expected {EXPECTED}")
    items = []
    for folder in folders:
        files = sorted(
            path
            for path in folder.rglob("*")
            if path.suffix.lower() in AUDIO_EXTENSIONS and path.is_file() and not _is_hidden(path.relative_to(root))
        )
        if not files:
            raise _fail(
                f"class folder {folder} holds no audio file ({'/'.join(AUDIO_EXTENSIONS)}); add some or move it away"
            )
        items += [Item(path.relative_to(root).as_posix(), path, folder.name, None, root) for path in files]
    return items


def _normal_rel(entry: str) -> str:
    """A relative path as written in a CSV or a list, in the POSIX form items are keyed by."""
    return PurePosixPath(entry.strip().replace("\\", "/")).as_posix()


def _read_csv(csv_path: Path) -> list[Item]:
    """Items of the CSV layout, in file order; the CSV's problems are reported with their line."""
    rows = read_metadata_csv(csv_path, DATASET, ("path", "label"), EXPECTED)
    has_split = "split" in rows[0]
    items, seen = [], {}
    for line, row in enumerate(rows, start=2):
        entry, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not entry or not label:
            raise _fail(f"{csv_path}: line {line}: empty path or label")
        rel = _normal_rel(entry)
        if PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
            raise _fail(f"{csv_path}: line {line}: path {entry!r} must be relative to the CSV's folder, inside it")
        if rel in seen:
            raise _fail(f"{csv_path}: line {line}: {entry!r} is listed again (first on line {seen[rel]})")
        seen[rel] = line
        split = None
        if has_split:
            value = (row.get("split") or "").strip().lower()
            if value not in SPLIT_NAMES:
                raise _fail(f"{csv_path}: line {line}: split {value!r} is not train, valid (validation, dev) or test")
            split = SPLIT_NAMES[value]
        items.append(Item(rel, csv_path.parent / rel, label, split, csv_path))
    return items


def _read_split_list(path: Path, option: str, known: Mapping[str, Item]) -> set[str]:
    """The relative paths a split list names; each must be an item of the data."""
    if not path.is_file():
        raise _fail(f"--{option}: {path} not found")
    entries = [_normal_rel(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not entries:
        raise _fail(f"--{option}: {path} lists no files")
    unknown = next((entry for entry in entries if entry not in known), None)
    if unknown is not None:
        raise _fail(f"--{option}: {path} lists {unknown!r}, which is not an audio item of the data")
    return set(entries)


def _round(value: float) -> int:
    return math.floor(value + 0.5)


def stratified_split(labels: Mapping[str, str], fractions: Mapping[str, float], seed: int) -> dict[str, list[str]]:
    """Seeded per-class split of item ids into `train` and the splits of `fractions`.

    Each class (sorted ids, shuffled by one `random.Random(seed)` visiting classes in sorted order) gives
    `max(1, round(fraction * n))` items to each split of `fractions` (in its order) and the rest to train,
    which must keep at least one. The result depends on the set of ids, their labels and `seed` only; ids
    are returned sorted.
    """
    by_class: dict[str, list[str]] = defaultdict(list)
    for uid in sorted(labels):
        by_class[labels[uid]].append(uid)
    rng = random.Random(seed)
    splits: dict[str, list[str]] = {"train": [], **{split: [] for split in fractions}}
    for label in sorted(by_class):
        uids = by_class[label]
        rng.shuffle(uids)
        counts = {split: max(1, _round(fraction * len(uids))) for split, fraction in fractions.items()}
        if sum(counts.values()) >= len(uids):
            wanted = ", ".join(f"{count} to {split}" for split, count in counts.items())
            raise _fail(
                f"class {label!r} has {len(uids)} item(s), too few to give {wanted} and keep one for train; "
                "add items to it, remove it, or give --valid_list/--test_list"
            )
        start = 0
        for split, count in counts.items():
            splits[split] += uids[start : start + count]
            start += count
        splits["train"] += uids[start:]
    return {split: sorted(uids) for split, uids in splits.items()}


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise _fail(f"--{name} must be a number between 0 and 1 (exclusive), got {value!r}")
    return float(value)


def _resolve(root: Path, value: str | os.PathLike | None) -> Path | None:
    """An option's path: relative to the data folder, or absolute."""
    return None if value is None or str(value) == "" else root / Path(value)


def collect_items(
    root: Path,
    csv_file: str | os.PathLike | None = None,
    valid_list: str | os.PathLike | None = None,
    test_list: str | os.PathLike | None = None,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = 0,
) -> dict[str, list[Item]]:
    """Every item of the data, assigned to train / valid / test (see the module docstring); no header is read."""
    csv_path, lists = _resolve(root, csv_file), {"valid": _resolve(root, valid_list), "test": _resolve(root, test_list)}
    items = _read_csv(csv_path) if csv_path is not None else _scan_class_folders(root)
    by_rel = {item.rel: item for item in items}
    if any(item.split for item in items):
        if any(lists.values()):
            raise _fail(f"{csv_path} has a split column; give it or --valid_list/--test_list, not both")
        assigned = {split: [item for item in items if item.split == split] for split in ("train", "valid", "test")}
    else:
        fixed = {split: _read_split_list(path, f"{split}_list", by_rel) for split, path in lists.items() if path}
        if "valid" in fixed and "test" in fixed and fixed["valid"] & fixed["test"]:
            raise _fail(f"{sorted(fixed['valid'] & fixed['test'])[0]!r} is in both --valid_list and --test_list")
        listed = set().union(*fixed.values())
        fractions = {"valid": valid_fraction, "test": test_fraction}
        drawn = {split: _check_fraction(f"{split}_fraction", f) for split, f in fractions.items() if split not in fixed}
        if sum(drawn.values()) >= 1:
            raise _fail(f"--valid_fraction + --test_fraction must be below 1, got {sum(drawn.values())}")
        rest = {item.uid: item.label for item in items if item.rel not in listed}
        by_uid = {item.uid: item for item in items}
        ids = stratified_split(rest, drawn, split_seed)
        assigned = {split: [by_uid[uid] for uid in ids[split]] for split in ids}
        assigned.update({split: [by_rel[rel] for rel in sorted(rels)] for split, rels in fixed.items()})
    for split in ("train", "valid", "test"):
        if not assigned.get(split):
            raise _fail(f"split {split!r} has no item; every split needs at least one")
    trained = {item.label for item in assigned["train"]}
    for split in ("valid", "test"):
        missing = sorted({item.label for item in assigned[split]} - trained)
        if missing:
            raise _fail(f"class {missing[0]!r} is in {split} but has no training item")
    return {split: assigned[split] for split in ("train", "valid", "test")}


def _fingerprint(splits: Mapping[str, Sequence[Item]]) -> str:
    """What the manifests depend on: every item's path, label, split and file size (missing: -1)."""
    listing = {
        split: [[item.rel, item.label, item.path.stat().st_size if item.path.is_file() else -1] for item in items]
        for split, items in splits.items()
    }
    return hashlib.sha1(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def prepare_audiofolder(
    data_folder: str | os.PathLike,
    save_folder: str | os.PathLike,
    few_shot_samples: int | None = None,
    seed: int = 10,
    csv_file: str | os.PathLike | None = None,
    valid_list: str | os.PathLike | None = None,
    test_list: str | os.PathLike | None = None,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = 0,
) -> dict[str, Path]:
    """Write (or reuse) the manifests of your own data in `save_folder`; returns `{split: csv path}`.

    `few_shot_samples` keeps K items per class of train, sampled with `seed` (as in every recipe);
    the other options choose the layout and the split (module docstring). `classes.txt` is written beside
    the manifests.
    """
    root = require_dir(data_folder, DATASET, EXPECTED)
    splits = collect_items(root, csv_file, valid_list, test_list, valid_fraction, test_fraction, split_seed)
    options = {
        "csv_file": None if csv_file is None else str(csv_file),
        "valid_list": None if valid_list is None else str(valid_list),
        "test_list": None if test_list is None else str(test_list),
        "valid_fraction": valid_fraction,
        "test_fraction": test_fraction,
        "split_seed": split_seed,
        "listing_sha1": _fingerprint(splits),
    }

    def rows(_: Path) -> dict[str, list[dict[str, Any]]]:  # the items are known: read their headers
        return {
            split: [audio_row(DATASET, item.listed_in, item.uid, item.path, item.label) for item in items]
            for split, items in splits.items()
        }

    return prepare_dataset(
        DATASET,
        root,
        save_folder,
        EXPECTED,
        rows,
        few_shot_samples=few_shot_samples,
        seed=seed,
        extra_options=options,
    )
