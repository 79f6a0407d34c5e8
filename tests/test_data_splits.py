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


@pytest.mark.parametrize("num_folds", [5, 10])
def test_rotation_split_covers_every_fold_once(num_folds: int) -> None:
    tested = []
    for fold in range(1, num_folds + 1):
        plan = rotation_split(fold, num_folds)
        assert plan["test"] == {fold}
        assert plan["valid"] == {fold % num_folds + 1}
        assert len(plan["train"]) == num_folds - 2
        assert fold not in plan["train"] | plan["valid"]
        assert plan["train"] | plan["valid"] | plan["test"] == set(range(1, num_folds + 1))
        tested.append(fold)
    assert tested == list(range(1, num_folds + 1))


def test_esc50_last_rotation_wraps_to_fold_one() -> None:
    assert rotation_split(5, 5) == {"train": {2, 3, 4}, "valid": {1}, "test": {5}}


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
