"""The five recipes' prepare scripts on synthetic data in the official layouts."""

from __future__ import annotations

import collections
import csv
import importlib.util
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from petl_apps.synthetic import make_esc50, make_fsc, make_gsc, make_iemocap, make_urbansound8k
from petl_modules.data import (
    CLASSES_FILE,
    OPTIONS_FILE,
    AudioError,
    DataPreparationError,
    read_classes,
    read_manifest,
)

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "valid", "test")


def _load(relative: str) -> ModuleType:
    """Import a recipe script by path: recipe folders are not packages."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fsc = _load("recipes/FSC/fsc_prepare.py")
esc50 = _load("recipes/ESC50/esc50_prepare.py")
us8k = _load("recipes/UrbanSound8K/urbansound8k_prepare.py")
gsc = _load("recipes/GSC/gsc_prepare.py")
iemocap = _load("recipes/IEMOCAP/iemocap_prepare.py")


def _read(manifests: dict[str, Path]) -> dict[str, list[dict[str, str]]]:
    assert list(manifests) == list(SPLITS)
    return {split: read_manifest(path) for split, path in manifests.items()}


def _labels(rows: list[dict[str, str]]) -> collections.Counter:
    return collections.Counter(row["label"] for row in rows)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One read-only copy of each synthetic dataset, shared by the tests."""
    root = tmp_path_factory.mktemp("datasets")
    return {
        "fsc": make_fsc(root, num_classes=4, n_per_class=3),
        "esc50": make_esc50(root, num_classes=5, n_per_fold=2),
        "us8k": make_urbansound8k(root, num_classes=3, n_per_fold=2),
        "gsc": make_gsc(root, num_words=4, n_per_class=3),
        "iemocap": make_iemocap(root, n_per_class=2),
    }


def test_fsc_official_splits(data: dict[str, Path], tmp_path: Path) -> None:
    splits = _read(fsc.prepare_fsc(data["fsc"], tmp_path))
    for rows in splits.values():
        assert list(rows[0]) == ["ID", "duration", "wav", "label", "speaker"]
        assert _labels(rows) == {label: 3 for label in _labels(splits["train"])}
        assert all(Path(row["wav"]).is_file() and float(row["duration"]) == 0.5 for row in rows)
    assert sorted(_labels(splits["train"])) == [
        "activate_lights_bedroom",
        "activate_lights_kitchen",
        "activate_lights_none",
        "activate_lights_washroom",
    ]
    assert read_classes(tmp_path / CLASSES_FILE) == sorted(_labels(splits["train"]))
    speakers = {split: {row["speaker"] for row in rows} for split, rows in splits.items()}
    assert not speakers["train"] & (speakers["valid"] | speakers["test"])


@pytest.mark.parametrize("fold", [1, 3, 5])
def test_esc50_rotations(data: dict[str, Path], tmp_path: Path, fold: int) -> None:
    manifests = esc50.prepare_esc50(data["esc50"], tmp_path, fold=fold)
    assert manifests["train"] == tmp_path / f"fold{fold}" / "train.csv"
    splits = _read(manifests)
    folds = {split: {int(row["ID"].split("-")[0]) for row in rows} for split, rows in splits.items()}
    valid = {1: 5, 3: 2, 5: 4}[fold]  # the reference's rotations: validate on the fold before the test fold
    assert folds["test"] == {fold} and folds["valid"] == {valid}
    assert folds["train"] == set(range(1, 6)) - {fold, valid}
    assert all(row["fold"] == str(int(row["ID"][0])) for rows in splits.values() for row in rows)
    assert _labels(splits["train"]) == {c: 6 for c in ("dog", "rooster", "pig", "cow", "frog")}
    assert _labels(splits["test"]) == {c: 2 for c in ("dog", "rooster", "pig", "cow", "frog")}
    assert read_classes(tmp_path / f"fold{fold}" / CLASSES_FILE) == [
        "cow",
        "dog",
        "frog",
        "pig",
        "rooster",
    ]


@pytest.mark.parametrize("fold", [1, 4, 10])
def test_urbansound8k_test_fold_is_never_trained_or_validated_on(
    data: dict[str, Path], tmp_path: Path, fold: int
) -> None:
    splits = _read(us8k.prepare_urbansound8k(data["us8k"], tmp_path, fold=fold))
    folds = {split: {row["fold"] for row in rows} for split, rows in splits.items()}
    assert folds["test"] == {str(fold)}
    assert folds["valid"] == {str(fold % 10 + 1)}
    assert str(fold) not in folds["train"] | folds["valid"]
    assert len(folds["train"]) == 8
    assert [len(splits[s]) for s in SPLITS] == [8 * 3 * 2, 3 * 2, 3 * 2]
    assert all(f"/audio/fold{row['fold']}/" in row["wav"] for rows in splits.values() for row in rows)
    assert set(_labels(splits["train"])) == {"air_conditioner", "car_horn", "children_playing"}


def test_gsc_lists_and_background_noise(data: dict[str, Path], tmp_path: Path) -> None:
    splits = _read(gsc.prepare_gsc(data["gsc"], tmp_path))
    for split, rows in splits.items():
        assert _labels(rows) == {w: 3 for w in ("yes", "no", "up", "down")}, split
    root = data["gsc"]
    for split, name in (("valid", "validation_list.txt"), ("test", "testing_list.txt")):
        listed = (root / name).read_text().split()
        assert [row["ID"].replace("_", "/", 1) + ".wav" for row in splits[split]] == listed
        assert [row["wav"] for row in splits[split]] == [str(root / entry) for entry in listed]
    ids = [row["ID"] for rows in splits.values() for row in rows]
    assert len(ids) == len(set(ids))
    assert not any("_background_noise_" in row["wav"] for rows in splits.values() for row in rows)
    assert {float(row["duration"]) for row in splits["train"]} == {0.6, 1.0}


@pytest.mark.parametrize(
    "fold, valid, test",
    [
        (1, "Ses01F", "Ses01M"),
        (2, "Ses01M", "Ses01F"),
        (7, "Ses04F", "Ses04M"),
        (10, "Ses05M", "Ses05F"),
    ],
)
def test_iemocap_folds_labels_and_speakers(
    data: dict[str, Path], tmp_path: Path, fold: int, valid: str, test: str
) -> None:
    splits = _read(iemocap.prepare_iemocap(data["iemocap"], tmp_path, fold=fold))
    assert {row["speaker"] for row in splits["valid"]} == {valid}
    assert {row["speaker"] for row in splits["test"]} == {test}
    session = valid[:5]
    train_speakers = {row["speaker"] for row in splits["train"]}
    assert len(train_speakers) == 8 and not any(s.startswith(session) for s in train_speakers)
    # Per speaker, 2 turns of each raw label: hap + exc merge to 4, fru/xxx/sur dropped.
    assert _labels(splits["test"]) == {"neu": 2, "hap": 4, "sad": 2, "ang": 2}
    assert _labels(splits["train"]) == {"neu": 16, "hap": 32, "sad": 16, "ang": 16}
    assert read_classes(tmp_path / f"fold{fold}" / CLASSES_FILE) == ["ang", "hap", "neu", "sad"]
    for row in splits["train"]:
        assert row["ID"].startswith(row["speaker"][:5]) and row["ID"][-4] == row["speaker"][-1]
        assert Path(row["wav"]).parent.name == row["ID"].rsplit("_", 1)[0]


def test_few_shot_applies_to_train_only(data: dict[str, Path], tmp_path: Path) -> None:
    full = _read(esc50.prepare_esc50(data["esc50"], tmp_path / "full", fold=2))
    few = _read(esc50.prepare_esc50(data["esc50"], tmp_path / "few", fold=2, few_shot_samples=4))
    assert _labels(few["train"]) == {c: 4 for c in _labels(full["train"])}
    assert {row["ID"] for row in few["train"]} <= {row["ID"] for row in full["train"]}
    assert few["valid"] == full["valid"] and few["test"] == full["test"]


def test_few_shot_is_seeded_and_independent_of_file_order(data: dict[str, Path], tmp_path: Path) -> None:
    def sample(root: Path, out: str, seed: int) -> list[str]:
        manifests = esc50.prepare_esc50(root, tmp_path / out, fold=1, few_shot_samples=2, seed=seed)
        return [row["ID"] for row in read_manifest(manifests["train"])]

    shuffled = tmp_path / "shuffled"
    shutil.copytree(data["esc50"], shuffled)
    meta = shuffled / "meta" / "esc50.csv"
    header, *rows = meta.read_text().splitlines()
    random.Random(3).shuffle(rows)
    meta.write_text("\n".join([header, *rows]) + "\n")

    reference = sample(data["esc50"], "a", seed=10)
    assert sample(data["esc50"], "b", seed=10) == reference
    assert sample(shuffled, "c", seed=10) == reference
    assert any(sample(data["esc50"], f"s{seed}", seed=seed) != reference for seed in (11, 12, 13))


def test_few_shot_too_large_names_the_class(data: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(DataPreparationError, match=r"K=4 .*class '[a-z_]+' has 3"):
        fsc.prepare_fsc(data["fsc"], tmp_path, few_shot_samples=4)
    with pytest.raises(DataPreparationError, match="positive int"):
        gsc.prepare_gsc(data["gsc"], tmp_path, few_shot_samples=0)


def test_reuse_and_rewrite(data: dict[str, Path], tmp_path: Path) -> None:
    first = gsc.prepare_gsc(data["gsc"], tmp_path)
    stamp = first["train"].stat().st_mtime_ns
    assert gsc.prepare_gsc(data["gsc"], tmp_path) == first
    assert first["train"].stat().st_mtime_ns == stamp  # reused, not rewritten

    gsc.prepare_gsc(data["gsc"], tmp_path, few_shot_samples=1)  # options changed
    assert len(read_manifest(first["train"])) == 4
    gsc.prepare_gsc(data["gsc"], tmp_path)
    assert len(read_manifest(first["train"])) == 12


def test_folds_prepare_side_by_side(data: dict[str, Path], tmp_path: Path) -> None:
    one = us8k.prepare_urbansound8k(data["us8k"], tmp_path, fold=1)
    two = us8k.prepare_urbansound8k(data["us8k"], tmp_path, fold=2)
    assert one["test"].parent != two["test"].parent
    assert (one["test"].parent / OPTIONS_FILE).is_file() and (two["test"].parent / OPTIONS_FILE).is_file()


def test_missing_or_empty_data_folder(tmp_path: Path) -> None:
    with pytest.raises(
        DataPreparationError,
        match=rf"ESC-50: data folder {re.escape(str(tmp_path / 'nope'))} not found",
    ):
        esc50.prepare_esc50(tmp_path / "nope", tmp_path / "out", fold=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataPreparationError, match=r"GSC: data folder .*/empty is empty"):
        gsc.prepare_gsc(tmp_path / "empty", tmp_path / "out")


@pytest.mark.parametrize(
    "key, remove, prepare, message",
    [
        (
            "esc50",
            "meta/esc50.csv",
            lambda d, o: esc50.prepare_esc50(d, o, fold=1),
            r"ESC-50: .*/meta/esc50.csv not found; expected the official layout "
            r"<data_folder>/meta/esc50.csv and <data_folder>/audio/",
        ),
        ("fsc", "data/valid_data.csv", fsc.prepare_fsc, r"FSC: .*/data/valid_data.csv not found"),
        (
            "us8k",
            "metadata/UrbanSound8K.csv",
            lambda d, o: us8k.prepare_urbansound8k(d, o, fold=1),
            r"UrbanSound8K: .*/metadata/UrbanSound8K.csv not found",
        ),
        ("gsc", "testing_list.txt", gsc.prepare_gsc, r"GSC: .*/testing_list.txt not found"),
        (
            "iemocap",
            "Session3/dialog/EmoEvaluation",
            lambda d, o: iemocap.prepare_iemocap(d, o, fold=1),
            r"IEMOCAP: no .*/Session3/dialog/EmoEvaluation/\*.txt found",
        ),
    ],
)
def test_missing_metadata_names_the_expected_layout(
    data: dict[str, Path],
    tmp_path: Path,
    key: str,
    remove: str,
    prepare: Callable[[Path, Path], object],
    message: str,
) -> None:
    root = shutil.copytree(data[key], tmp_path / "copy")
    target = root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(DataPreparationError, match=message):
        prepare(root, tmp_path / "out")


def test_first_missing_audio_file_is_named(data: dict[str, Path], tmp_path: Path) -> None:
    root = shutil.copytree(data["us8k"], tmp_path / "copy")
    with open(root / "metadata" / "UrbanSound8K.csv", newline="") as handle:
        items = list(csv.DictReader(handle))
    first, second = (root / "audio" / f"fold{m['fold']}" / m["slice_file_name"] for m in items[3:5])
    second.unlink()
    first.unlink()
    with pytest.raises(
        DataPreparationError,
        match=rf"audio file {re.escape(str(first))} listed in .*UrbanSound8K.csv not found",
    ):
        us8k.prepare_urbansound8k(root, tmp_path / "out", fold=1)


def test_missing_column_is_named(data: dict[str, Path], tmp_path: Path) -> None:
    root = shutil.copytree(data["esc50"], tmp_path / "copy")
    meta = root / "meta" / "esc50.csv"
    meta.write_text(meta.read_text().replace("category", "kind", 1))
    with pytest.raises(DataPreparationError, match=r"lacks column\(s\) \['category'\]"):
        esc50.prepare_esc50(root, tmp_path / "out", fold=1)


def test_corrupt_audio_names_the_file(data: dict[str, Path], tmp_path: Path) -> None:
    root = shutil.copytree(data["iemocap"], tmp_path / "copy")
    bad = next(iter(sorted((root / "Session2" / "sentences" / "wav").rglob("*_F000.wav"))))
    bad.write_bytes(b"not a wav file at all")
    with pytest.raises(AudioError, match=rf"{re.escape(str(bad))}: cannot read audio header"):
        iemocap.prepare_iemocap(root, tmp_path / "out", fold=1)


def test_invalid_fold_stops_before_reading(data: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(DataPreparationError, match=r"1..10, got 11"):
        us8k.prepare_urbansound8k(data["us8k"], tmp_path, fold=11)
    with pytest.raises(DataPreparationError, match=r"1..5, got 0"):
        esc50.prepare_esc50(data["esc50"], tmp_path, fold=0)
    assert not any(tmp_path.iterdir())


def test_command_line(data: dict[str, Path], tmp_path: Path) -> None:
    script = REPO / "recipes" / "IEMOCAP" / "iemocap_prepare.py"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, str(script), str(data["iemocap"]), str(tmp_path), "--fold", "3"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert f"test: {tmp_path / 'fold3' / 'test.csv'}" in result.stdout
    assert {row["speaker"] for row in read_manifest(tmp_path / "fold3" / "test.csv")} == {"Ses02M"}
