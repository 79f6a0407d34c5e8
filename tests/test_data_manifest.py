"""Manifest writing and the reuse-or-rewrite contract of prepare_once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from speechbrain.dataio.dataset import DynamicItemDataset

from petl_modules.data import (
    CLASSES_FILE,
    OPTIONS_FILE,
    DataPreparationError,
    prepare_once,
    read_classes,
    read_manifest,
    write_manifest,
)


def _row(utt: str, label: str, **extra: str) -> dict[str, object]:
    return {"ID": utt, "duration": 1.25, "wav": f"/data/{utt}.wav", "label": label, **extra}


def test_manifest_round_trips_through_speechbrain(tmp_path: Path) -> None:
    rows = [_row("a", "dog", speaker="s1"), _row("b", "cat, black", speaker="s2")]
    path = write_manifest(tmp_path / "train.csv", rows)

    assert path.read_text().splitlines()[0] == "ID,duration,wav,label,speaker"
    assert [p.name for p in tmp_path.iterdir()] == ["train.csv"]  # no temp file left
    data = DynamicItemDataset.from_csv(path)
    data.set_output_keys(["id", "duration", "label"])
    assert data[1] == {"id": "b", "duration": 1.25, "label": "cat, black"}
    assert read_manifest(path)[0]["speaker"] == "s1"


@pytest.mark.parametrize(
    "rows, message",
    [
        ([], "empty manifest"),
        ([{"ID": "a", "wav": "x", "label": "y"}], "required column"),
        ([_row("a", "x"), _row("a", "y")], "duplicate ID 'a'"),
        ([_row("a", "x"), _row("b", "y", speaker="s")], "has columns"),
    ],
)
def test_write_manifest_rejects_bad_rows(tmp_path: Path, rows: list, message: str) -> None:
    with pytest.raises(DataPreparationError, match=message):
        write_manifest(tmp_path / "m.csv", rows)
    assert not (tmp_path / "m.csv").exists()


class _Builder:
    """Counts builds, so tests can tell reuse from rewrite."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self) -> dict[str, list[dict[str, object]]]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("build failed")
        return {
            "train": [_row("a", "b-label"), _row("b", "a-label")],
            "test": [_row("c", "c-label")],
        }


def test_prepare_once_writes_manifests_classes_and_options(tmp_path: Path) -> None:
    manifests = prepare_once(tmp_path / "out", {"fold": 1}, _Builder())

    assert manifests == {"train": tmp_path / "out/train.csv", "test": tmp_path / "out/test.csv"}
    assert read_classes(tmp_path / "out" / CLASSES_FILE) == ["a-label", "b-label", "c-label"]
    record = json.loads((tmp_path / "out" / OPTIONS_FILE).read_text())
    assert record["options"] == {"fold": 1}
    assert sorted(record["files"]) == ["classes.txt", "test.csv", "train.csv"]


def test_prepare_once_reuses_only_matching_complete_preparations(tmp_path: Path) -> None:
    build = _Builder()
    first = prepare_once(tmp_path, {"fold": 1, "k": None}, build)
    assert prepare_once(tmp_path, {"k": None, "fold": 1}, build) == first
    assert build.calls == 1

    prepare_once(tmp_path, {"fold": 2, "k": None}, build)  # options changed
    assert build.calls == 2

    (tmp_path / "test.csv").unlink()  # a listed file vanished
    prepare_once(tmp_path, {"fold": 2, "k": None}, build)
    assert build.calls == 3

    (tmp_path / OPTIONS_FILE).write_text("{not json")  # corrupt options file
    prepare_once(tmp_path, {"fold": 2, "k": None}, build)
    assert build.calls == 4


def test_a_failed_rebuild_leaves_the_previous_preparation_whole(tmp_path: Path) -> None:
    """The data is read (and checked) before anything is written: a rebuild that fails there leaves the folder
    as the last complete preparation wrote it, options and manifests together."""
    build = _Builder()
    prepare_once(tmp_path, {"fold": 1}, build)
    files = {path.name: path.read_text() for path in tmp_path.iterdir()}
    with pytest.raises(RuntimeError):
        prepare_once(tmp_path, {"fold": 2}, _Builder(fail=True))
    assert {path.name: path.read_text() for path in tmp_path.iterdir()} == files
    prepare_once(tmp_path, {"fold": 1}, build)
    assert build.calls == 1  # reused


def test_a_failed_first_preparation_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        prepare_once(tmp_path / "manifests", {"fold": 1}, _Builder(fail=True))
    assert not (tmp_path / "manifests").exists()


def test_prepare_once_rejects_an_empty_split(tmp_path: Path) -> None:
    with pytest.raises(DataPreparationError, match="split 'valid' is empty"):
        prepare_once(tmp_path, {}, lambda: {"train": [_row("a", "x")], "valid": []})
    assert not (tmp_path / OPTIONS_FILE).exists()
