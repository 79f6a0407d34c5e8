"""Fold protocols and few-shot sampling, without any audio."""

from __future__ import annotations

import random

import pytest

from petl_modules.data import (
    DataPreparationError,
    assign_splits,
    few_shot_sample,
    iemocap_split,
    rotation_split,
)
from petl_modules.data.splits import IEMOCAP_REFERENCE_FOLD

# The reference's ESC-50 rotations (main.py), written out: (test fold, validation fold).
ESC50_REFERENCE_ROTATIONS = [(5, 4), (1, 5), (2, 1), (3, 2), (4, 3)]
# UrbanSound8K: our validation fold (the reference selects on the test fold), the one after the test fold.
URBANSOUND8K_VALID = {1: 2, 2: 3, 3: 4, 4: 5, 5: 6, 6: 7, 7: 8, 8: 9, 9: 10, 10: 1}


@pytest.mark.parametrize(("test", "valid"), ESC50_REFERENCE_ROTATIONS)
def test_esc50_rotation_validates_on_the_reference_fold(test: int, valid: int) -> None:
    plan = rotation_split(test, 5, valid="previous")
    assert plan == {"train": {1, 2, 3, 4, 5} - {test, valid}, "valid": {valid}, "test": {test}}


@pytest.mark.parametrize(("test", "valid"), sorted(URBANSOUND8K_VALID.items()))
def test_urbansound8k_rotation_validates_on_the_next_fold(test: int, valid: int) -> None:
    plan = rotation_split(test, 10)
    assert plan == {"train": set(range(1, 11)) - {test, valid}, "valid": {valid}, "test": {test}}


def test_rotation_split_rejects_an_unknown_validation_rule() -> None:
    with pytest.raises(DataPreparationError, match="valid must be one of previous, next, got 'before'"):
        rotation_split(1, 5, valid="before")


@pytest.mark.parametrize("fold", [0, 6, -1, True, 1.0, "1"])
def test_rotation_split_rejects_bad_folds(fold: object) -> None:
    with pytest.raises(DataPreparationError, match=r"fold must be an integer in 1\.\.5"):
        rotation_split(fold, 5)  # type: ignore[arg-type]


def test_iemocap_folds_hold_out_one_session_two_ways() -> None:
    assert iemocap_split(1) == {
        "train": {f"Ses0{s}{g}" for s in (2, 3, 4, 5) for g in "FM"},
        "valid": {"Ses01F"},
        "test": {"Ses01M"},
    }
    assert iemocap_split(2)["valid"] == {"Ses01M"} and iemocap_split(2)["test"] == {"Ses01F"}
    assert iemocap_split(9)["valid"] == {"Ses05F"} and iemocap_split(10)["test"] == {"Ses05F"}
    tested = [next(iter(iemocap_split(fold)["test"])) for fold in range(1, 11)]
    assert sorted(tested) == sorted(f"Ses0{s}{g}" for s in range(1, 6) for g in "FM")
    for fold in range(1, 11):
        plan = iemocap_split(fold)
        assert not plan["train"] & (plan["valid"] | plan["test"])
    with pytest.raises(DataPreparationError):
        iemocap_split(11)


# The reference's IEMOCAP folds 1..10, written out: (held-out session, validation speaker's gender).
IEMOCAP_REFERENCE_FOLDS = [
    (5, "F"),
    (5, "M"),
    (1, "F"),
    (1, "M"),
    (2, "F"),
    (2, "M"),
    (3, "F"),
    (3, "M"),
    (4, "F"),
    (4, "M"),
]


@pytest.mark.parametrize("reference_fold", range(1, 11))
def test_iemocap_reference_fold_numbers_name_the_same_split(reference_fold: int) -> None:
    session, gender = IEMOCAP_REFERENCE_FOLDS[reference_fold - 1]
    other = "M" if gender == "F" else "F"
    (ours,) = [fold for fold, ref in IEMOCAP_REFERENCE_FOLD.items() if ref == reference_fold]
    plan = iemocap_split(ours)
    assert plan["valid"] == {f"Ses0{session}{gender}"} and plan["test"] == {f"Ses0{session}{other}"}


def test_assign_splits_routes_by_group_and_rejects_strays() -> None:
    rows = [{"ID": f"u{i}", "fold": str(i)} for i in range(1, 6)]
    splits = assign_splits(rows, "fold", rotation_split(2, 5), "meta.csv")
    assert [r["ID"] for r in splits["test"]] == ["u2"]
    assert [r["ID"] for r in splits["valid"]] == ["u3"]
    assert [r["ID"] for r in splits["train"]] == ["u1", "u4", "u5"]
    with pytest.raises(DataPreparationError, match=r"meta.csv: item 'x' has fold '7'"):
        assign_splits([{"ID": "x", "fold": "7"}], "fold", rotation_split(2, 5), "meta.csv")


def _rows(per_class: dict[str, int]) -> list[dict[str, str]]:
    return [{"ID": f"{label}-{i:03d}", "label": label} for label, count in per_class.items() for i in range(count)]


def test_few_shot_takes_exactly_k_per_class() -> None:
    rows = _rows({"a": 10, "b": 7, "c": 3})
    picked = few_shot_sample(rows, 3, seed=10)
    counts = {label: sum(r["label"] == label for r in picked) for label in "abc"}
    assert counts == {"a": 3, "b": 3, "c": 3}
    assert [r["ID"] for r in picked] == sorted(r["ID"] for r in picked)
    assert all(r in rows for r in picked)


def test_few_shot_is_seeded_and_ignores_input_order() -> None:
    rows = _rows({"a": 20, "b": 20})
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    first = few_shot_sample(rows, 4, seed=10)
    assert few_shot_sample(rows, 4, seed=10) == first
    assert few_shot_sample(shuffled, 4, seed=10) == first
    assert any(few_shot_sample(rows, 4, seed=s) != first for s in range(11, 14))


def test_few_shot_custom_label_key() -> None:
    rows = [{"ID": str(i), "emotion": "x" if i % 2 else "y"} for i in range(6)]
    assert len(few_shot_sample(rows, 2, seed=1, label_key="emotion")) == 4


def test_few_shot_too_large_names_the_class_and_its_count() -> None:
    with pytest.raises(DataPreparationError, match=r"K=4 .* class 'c' has 3$"):
        few_shot_sample(_rows({"a": 10, "c": 3}), 4, seed=10)


@pytest.mark.parametrize("k", [0, -2, 1.5, True, "3", None])
def test_few_shot_k_must_be_a_positive_int(k: object) -> None:
    with pytest.raises(DataPreparationError, match="positive int"):
        few_shot_sample(_rows({"a": 5}), k, seed=10)  # type: ignore[arg-type]
