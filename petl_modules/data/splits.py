"""Fold protocols and seeded few-shot sampling shared by the preparation scripts.

A protocol is a *plan*: a mapping from split name to the set of groups (fold
numbers or speaker ids) that go into it. `assign_splits` then routes
manifest rows by their `fold` or `speaker` column, so every protocol is
enforced in one place.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from petl_modules.data.manifest import DataPreparationError

__all__ = [
    "IEMOCAP_NUM_FOLDS",
    "IEMOCAP_REFERENCE_FOLD",
    "assign_splits",
    "check_few_shot",
    "few_shot_sample",
    "iemocap_split",
    "rotation_split",
]

Row = TypeVar("Row", bound=Mapping[str, Any])

IEMOCAP_NUM_FOLDS = 10
# Our IEMOCAP fold -> the reference's fold number with the same held-out speakers (same split).
IEMOCAP_REFERENCE_FOLD = {fold: (fold + 1) % IEMOCAP_NUM_FOLDS + 1 for fold in range(1, IEMOCAP_NUM_FOLDS + 1)}


def _check_fold(fold: int, num_folds: int) -> None:
    """Reject bools and out-of-range folds before any file is touched."""
    if isinstance(fold, bool) or not isinstance(fold, int) or not 1 <= fold <= num_folds:
        raise DataPreparationError(f"fold must be an integer in 1..{num_folds}, got {fold!r}")


ROTATIONS = ("previous", "next")


def rotation_split(fold: int, num_folds: int, valid: str = "next") -> dict[str, frozenset[int]]:
    """Cross-validation rotation over folds numbered `1..num_folds`.

    Test is fold `fold`; validation is the fold before it (`valid="previous"`:
    `(fold - 2) % num_folds + 1`) or after it (`"next"`: `fold % num_folds + 1`),
    never the test fold, so model selection never sees test data; train is the
    remaining `num_folds - 2` folds.

    ESC-50 uses 5 folds with "previous", the reference's rotations (`main.py`:
    test 5 / valid 4, test 1 / valid 5, test 2 / valid 1, test 3 / valid 2,
    test 4 / valid 3; our fold number is the test fold). UrbanSound8K uses 10
    folds with "next": the reference selects on the test fold there (a defect),
    so the validation fold is ours.
    """
    _check_fold(fold, num_folds)
    if valid not in ROTATIONS:
        raise DataPreparationError(f"valid must be one of {', '.join(ROTATIONS)}, got {valid!r}")
    valid_fold = (fold - 2) % num_folds + 1 if valid == "previous" else fold % num_folds + 1
    train = frozenset(range(1, num_folds + 1)) - {fold, valid_fold}
    return {"train": train, "valid": frozenset({valid_fold}), "test": frozenset({fold})}


def iemocap_split(fold: int) -> dict[str, frozenset[str]]:
    """Speakers per split for IEMOCAP fold `1..10` (leave-one-speaker-out).

    Session `s = (fold + 1) // 2` is held out; the other four sessions train.
    Odd folds validate on its female speaker and test on its male speaker,
    even folds swap the two. Speaker ids look like `Ses01F`.

    The reference runs the same ten splits in another order, holding out
    sessions 5, 5, 1, 1, 2, 2, 3, 3, 4, 4 (validating on F, then on M): its
    fold `r` is our fold `(r - 3) % 10 + 1` (reference 1, 2 = our 9, 10;
    reference 3..10 = our 1..8). See `IEMOCAP_REFERENCE_FOLD`.
    """
    _check_fold(fold, IEMOCAP_NUM_FOLDS)
    session = (fold + 1) // 2
    female, male = f"Ses0{session}F", f"Ses0{session}M"
    valid, test = (female, male) if fold % 2 else (male, female)
    train = frozenset(f"Ses0{s}{g}" for s in range(1, 6) if s != session for g in "FM")
    return {"train": train, "valid": frozenset({valid}), "test": frozenset({test})}


def assign_splits(rows: Iterable[Row], key: str, plan: Mapping[str, frozenset], source: str) -> dict[str, list[Row]]:
    """Route each row to the split whose group set holds `row[key]`.

    Groups are compared as strings, as they read from metadata and manifests.
    A row whose group is in no split means the metadata does not follow the
    protocol (e.g. fold 11), so it stops naming the item and `source`.
    """
    owner = {str(group): split for split, groups in plan.items() for group in groups}
    splits: dict[str, list[Row]] = {split: [] for split in plan}
    for row in rows:
        group = str(row[key])
        if group not in owner:
            raise DataPreparationError(
                f"{source}: item {row['ID']!r} has {key} {group!r}, which no split of the "
                f"protocol covers (expected one of {sorted(owner)})"
            )
        splits[owner[group]].append(row)
    return splits


def check_few_shot(k: object) -> int:
    """Validate a few-shot count early, before any file is read."""
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise DataPreparationError(f"few-shot samples per class must be a positive int, got {k!r}")
    return k


def few_shot_sample(rows: Sequence[Row], k: int, seed: int, label_key: str = "label") -> list[Row]:
    """Seeded stratified sample of exactly `k` rows per class.

    Rows are sorted by `ID` first and classes visited in sorted order, so the
    result depends on the set of rows and `seed` only, never on file order.
    Returned rows are in `ID` order.
    """
    check_few_shot(k)
    by_class: dict[str, list[Row]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: r["ID"]):
        by_class[row[label_key]].append(row)
    short = [f"{label!r} has {len(items)}" for label, items in sorted(by_class.items()) if len(items) < k]
    if short:
        raise DataPreparationError(f"few-shot K={k} needs {k} items per class, but class {', class '.join(short)}")
    rng = random.Random(seed)
    picked = [row for _, items in sorted(by_class.items()) for row in rng.sample(items, k)]
    return sorted(picked, key=lambda r: r["ID"])
